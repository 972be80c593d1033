//! Timeline histories, recovery plans along them, and the completeness of WAL chains.

use tokio_util::sync::CancellationToken;

use super::{BaseBackup, Catalog, End, Segment, WalFile, format_lsn, parse_lsn};
use crate::error::RepoError;
use crate::repo::Repository;

/// A timeline's history: for each ancestor, the LSN where the next timeline branched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub timeline: u32,
    /// (ancestor timeline, LSN where it ended), oldest first.
    pub ancestors: Vec<(u32, u64)>,
}

impl History {
    /// Parses a `.history` file (`<parent tli>\t<switch LSN>\t<reason>` lines).
    pub fn parse(timeline: u32, text: &str) -> Option<History> {
        let mut ancestors = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let parent: u32 = fields.next()?.parse().ok()?;
            let lsn = parse_lsn(fields.next()?)?;
            ancestors.push((parent, lsn));
        }
        Some(History {
            timeline,
            ancestors,
        })
    }

    /// The timelines of this history with the LSN each begins at, oldest first.
    fn path(&self) -> Vec<(u32, u64)> {
        let mut begin = 0;
        let mut out = Vec::new();
        for &(timeline, end) in &self.ancestors {
            out.push((timeline, begin));
            begin = end;
        }
        out.push((self.timeline, begin));
        out
    }
}

/// Reads every stored history file.
pub async fn histories(
    repo: &Repository,
    catalog: &Catalog,
    cancel: &CancellationToken,
) -> Result<Vec<History>, RepoError> {
    let mut out = Vec::new();
    for (&timeline, path) in &catalog.histories {
        let manifest = repo.wal_manifest(path, cancel).await?;
        let mut text = Vec::new();
        crate::restore::restore(
            repo,
            &manifest,
            &mut text,
            std::sync::Arc::default(),
            cancel,
        )
        .await?;
        let history =
            History::parse(timeline, &String::from_utf8_lossy(&text)).ok_or_else(|| {
                RepoError::Corrupt {
                    object: path.to_string(),
                    reason: "not a timeline history file".into(),
                }
            })?;
        out.push(history);
    }
    Ok(out)
}

/// The WAL a recovery from `start` (a base backup's start LSN on its timeline) to `end` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The timeline recovery ends on.
    pub timeline: u32,
    /// Segment files in order, then the history files of the path.
    pub files: Vec<WalFile>,
    /// The segment recovery reads last.
    pub last_segment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "the WAL chain has {} gap(s): missing segment(s) {}",
        missing.len(),
        missing.join(", ")
    )]
    Gap { missing: Vec<String> },
    #[error("no WAL is archived from segment {0} on; is archiving running?")]
    Nothing(String),
}

/// Plans the WAL from `start_lsn` on `start_timeline` to `end`: on the newest timeline that
/// descends from the start (PostgreSQL's `recovery_target_timeline = 'latest'`), every segment
/// must be stored; the last one may be a partial upload when recovering to the latest.
pub fn plan(
    catalog: &Catalog,
    histories: &[History],
    seg_size: u64,
    start_timeline: u32,
    start_lsn: u64,
    end: End,
) -> Result<Plan, ChainError> {
    let start = start_lsn / seg_size;
    // The newest timeline whose history passes through the start timeline at the start LSN.
    let mut path = vec![(start_timeline, 0u64)];
    for history in histories {
        let candidate = history.path();
        let branches_after_start = candidate.iter().enumerate().any(|(i, &(tli, begin))| {
            tli == start_timeline
                && begin <= start_lsn
                && candidate
                    .get(i + 1)
                    .is_none_or(|&(_, next)| next > start_lsn)
        });
        if branches_after_start && history.timeline > path.last().map_or(0, |p| p.0) {
            path = candidate;
        }
    }
    let timeline_of = |number: u64| {
        path.iter()
            .rev()
            .find(|&&(_, begin)| begin / seg_size <= number)
            .map_or(start_timeline, |&(tli, _)| tli)
    };
    let name_of = |number: u64| {
        Segment {
            timeline: timeline_of(number),
            number,
        }
        .name(seg_size)
    };
    let last = match end {
        End::Lsn(lsn) => lsn / seg_size,
        End::Latest | End::Time(_) => {
            let on_path = |name: &String| {
                Segment::parse(name, seg_size)
                    .filter(|s| s.number >= start && timeline_of(s.number) == s.timeline)
                    .map(|s| s.number)
            };
            let newest = catalog
                .segments
                .keys()
                .chain(catalog.partials.keys())
                .filter_map(on_path)
                .max()
                .ok_or_else(|| ChainError::Nothing(name_of(start)))?;
            match end {
                End::Time(at) => catalog
                    .segments
                    .iter()
                    .filter(|&(_, stored)| *stored >= at)
                    .filter_map(|(name, _)| on_path(name))
                    .min()
                    .unwrap_or(newest),
                _ => newest,
            }
        }
    };
    let mut files = Vec::new();
    let mut missing = Vec::new();
    for number in start..=last.max(start) {
        let name = name_of(number);
        match catalog.file_for(&name, number == last) {
            Some(file) => files.push(file),
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        return Err(ChainError::Gap { missing });
    }
    files.extend(
        path.iter()
            .filter(|&&(tli, _)| catalog.histories.contains_key(&tli))
            .map(|&(tli, _)| WalFile::History(tli)),
    );
    Ok(Plan {
        timeline: path.last().map_or(start_timeline, |p| p.0),
        files,
        last_segment: name_of(last.max(start)),
    })
}

/// A base backup's WAL chain to the newest archived WAL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChainReport {
    pub base_backup: String,
    pub first_segment: String,
    pub last_segment: String,
    pub files: usize,
    /// Segments missing on the way (empty: complete).
    pub missing: Vec<String>,
    pub problem: String,
}

/// Checks, for every base backup in `bases`, that the WAL of `catalog` from its start to the
/// newest archived is complete.
pub async fn verify_chains(
    repo: &Repository,
    catalog: &Catalog,
    bases: &[BaseBackup],
    cancel: &CancellationToken,
) -> Result<Vec<ChainReport>, RepoError> {
    let histories = histories(repo, catalog, cancel).await?;
    let mut out = Vec::new();
    for base in bases {
        let first =
            Segment::of_lsn(base.timeline, base.start_lsn, base.seg_size).name(base.seg_size);
        let mut report = ChainReport {
            base_backup: base.manifest.id.clone(),
            first_segment: first,
            last_segment: String::new(),
            files: 0,
            missing: Vec::new(),
            problem: String::new(),
        };
        match plan(
            catalog,
            &histories,
            base.seg_size,
            base.timeline,
            base.start_lsn,
            End::Latest,
        ) {
            Ok(plan) => {
                // The backup is only restorable once the WAL reaches its end.
                if plan_end(&plan, base.seg_size) < base.end_lsn / base.seg_size {
                    report.problem = format!(
                        "the archived WAL ends before the backup's end ({})",
                        format_lsn(base.end_lsn)
                    );
                }
                report.files = plan.files.len();
                report.last_segment = plan.last_segment;
            }
            Err(ChainError::Gap { missing }) => {
                report.problem = format!("missing segment(s) {}", missing.join(", "));
                report.missing = missing;
            }
            Err(err) => report.problem = err.to_string(),
        }
        out.push(report);
    }
    Ok(out)
}

fn plan_end(plan: &Plan, seg_size: u64) -> u64 {
    Segment::parse(&plan.last_segment, seg_size).map_or(0, |s| s.number)
}
