//! Archived PostgreSQL write-ahead log: one small manifest per WAL file, its data chunked,
//! compressed, encrypted and deduplicated like every other stream.
//!
//! ```text
//! wal/segments/<24-hex segment name>.json         a completed segment (never overwritten)
//! wal/partial/<segment name>-<unix micros>.json    the segment being written, as of that time
//! wal/history/<8-hex timeline>.json               a timeline history file
//! ```
//! A partial upload is superseded by a newer one of the same segment and by the completed
//! segment; restore to "latest" uses the newest partial of the last segment, which is what
//! bounds the data lost with the server to the upload interval.
//!
//! Which segments a recovery needs ([`plan`]) follows the timeline history: segment `n` is read
//! from the newest timeline of the target's history that had begun by it, the rule PostgreSQL
//! itself applies. Any such segment not stored is a gap, and a gap refuses the restore.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout::{self, WAL_HISTORY, WAL_PARTIAL, WAL_SEGMENTS};
use crate::locks::WriterLock;
use crate::manifest::{BackupStats, ChunkRef, ComponentManifest, ConsistencyPoint};
use crate::path::RemotePath;
use crate::repo::{Repository, now_rfc3339};
use crate::storage::{PutMode, StorageError};

/// The `stream` of a WAL file's manifest.
pub const STREAM: &str = "wal";

/// A WAL segment: timeline and position, as in its 24-hex-digit file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    /// The segment number: its start LSN divided by the segment size.
    pub number: u64,
}

impl Segment {
    /// Parses `TTTTTTTTLLLLLLLLSSSSSSSS` for segments of `seg_size` bytes.
    pub fn parse(name: &str, seg_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let part = |i: usize| u32::from_str_radix(&name[i * 8..i * 8 + 8], 16).ok();
        let (timeline, log, seg) = (part(0)?, part(1)?, part(2)?);
        let per_log = segments_per_log(seg_size);
        (u64::from(seg) < per_log).then_some(Segment {
            timeline,
            number: u64::from(log) * per_log + u64::from(seg),
        })
    }

    /// The segment holding `lsn`.
    pub fn of_lsn(timeline: u32, lsn: u64, seg_size: u64) -> Segment {
        Segment {
            timeline,
            number: lsn / seg_size,
        }
    }

    pub fn name(&self, seg_size: u64) -> String {
        let per_log = segments_per_log(seg_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.number / per_log,
            self.number % per_log
        )
    }
}

fn segments_per_log(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size.max(1)
}

/// `X/Y` as PostgreSQL prints an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// One archived WAL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// A completed segment, by its 24-hex-digit name.
    Segment(String),
    /// The segment being written, as uploaded at `micros` (Unix microseconds).
    Partial { segment: String, micros: u64 },
    /// `<timeline>.history`.
    History(u32),
}

impl WalFile {
    /// The manifest's object.
    pub fn path(&self) -> RemotePath {
        // Hex names and digits only: always a valid key.
        layout::path(match self {
            WalFile::Segment(name) => format!("{WAL_SEGMENTS}{name}.json"),
            WalFile::Partial { segment, micros } => {
                format!("{WAL_PARTIAL}{segment}-{micros:016}.json")
            }
            WalFile::History(timeline) => format!("{WAL_HISTORY}{timeline:08X}.json"),
        })
    }

    /// The file name PostgreSQL gives it (a partial segment is restored under its full name).
    pub fn file_name(&self) -> String {
        match self {
            WalFile::Segment(name) | WalFile::Partial { segment: name, .. } => name.clone(),
            WalFile::History(timeline) => format!("{timeline:08X}.history"),
        }
    }

    fn of_object(path: &RemotePath) -> Option<WalFile> {
        let stem = path.file_name().strip_suffix(".json")?;
        let key = path.as_str();
        if key.starts_with(WAL_SEGMENTS) {
            Some(WalFile::Segment(stem.to_owned()))
        } else if key.starts_with(WAL_PARTIAL) {
            let (segment, micros) = stem.split_once('-')?;
            Some(WalFile::Partial {
                segment: segment.to_owned(),
                micros: micros.parse().ok()?,
            })
        } else if key.starts_with(WAL_HISTORY) {
            Some(WalFile::History(u32::from_str_radix(stem, 16).ok()?))
        } else {
            None
        }
    }
}

/// How many chunk ids a [`WalWriter`] remembers (a few hundred segments' worth).
const MAX_KNOWN_CHUNKS: usize = 4096;

/// Stores WAL files, remembering the chunks it stored so that the next upload of a growing
/// partial segment sends only what changed.
pub struct WalWriter {
    repo: Repository,
    /// Chunk id → stored length, of the chunks this writer stored or found.
    known: HashMap<String, u32>,
}

impl WalWriter {
    pub fn new(repo: Repository) -> Self {
        WalWriter {
            repo,
            known: HashMap::new(),
        }
    }

    /// Stores `data` as `file` and commits its manifest. Storing a completed segment or history
    /// file again with the same content succeeds (a rerun after a crash); other content is
    /// refused, since archived WAL is never replaced.
    pub async fn store(
        &mut self,
        file: &WalFile,
        data: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        // Held from before the chunk checks to after the commit (`locks.rs`).
        let lock = WriterLock::acquire(&self.repo.storage, &file.file_name(), cancel).await?;
        let result = self.store_locked(file, data, &lock, cancel).await;
        lock.release(cancel).await;
        result
    }

    async fn store_locked(
        &mut self,
        file: &WalFile,
        data: Vec<u8>,
        lock: &WriterLock,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        let raw_size = data.len() as u64;
        let repo = self.repo.clone();
        let known = self.known.clone();
        let encoded = tokio::task::spawn_blocking(move || encode(&repo, &known, &data))
            .await
            .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
        let mut stats = BackupStats::default();
        let mut chunks = Vec::with_capacity(encoded.len());
        for (chunk, body) in encoded {
            stats.chunks += 1;
            let object = layout::chunk(&chunk.id);
            match body {
                Some(body) => {
                    stats.new_chunks += 1;
                    stats.new_stored_bytes += body.len() as u64;
                    match self
                        .repo
                        .storage
                        .put(&object, body, PutMode::Create, cancel)
                        .await
                    {
                        Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
                        Err(err) => return Err(err.into()),
                    }
                    self.known.insert(chunk.id.clone(), chunk.stored_len);
                }
                // Stored by an earlier upload; GC may have taken it since (between two
                // uploads), so check it under this upload's lock before referencing it.
                None => match self.repo.storage.head(&object, cancel).await {
                    Ok(_) => {}
                    Err(StorageError::NotFound(_)) => {
                        self.known.remove(&chunk.id);
                        return Err(RepoError::ChunkVanished(object.to_string()));
                    }
                    Err(err) => return Err(err.into()),
                },
            }
            chunks.push(chunk);
        }
        let manifest = ComponentManifest {
            id: file.file_name().replace('.', "-"),
            name: file.file_name(),
            set_id: String::new(),
            stream: STREAM.to_owned(),
            created: now_rfc3339(),
            raw_size,
            chunks,
            files: Vec::new(),
            consistency: None,
            stats,
        };
        lock.confirm(cancel).await?;
        self.repo
            .commit_wal(&file.path(), &manifest, cancel)
            .await?;
        if self.known.len() > MAX_KNOWN_CHUNKS {
            // Bounded memory for an agent that archives for months; forgetting costs one
            // create-only put that finds the chunk there.
            self.known.clear();
        }
        Ok(manifest)
    }

    /// Removes an archived file's manifest (superseded partial uploads).
    pub async fn delete(
        &self,
        file: &WalFile,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        Ok(self.repo.storage.delete(&file.path(), cancel).await?)
    }
}

/// Cuts, hashes and (for chunks not in `known`) encodes `data`.
fn encode(
    repo: &Repository,
    known: &HashMap<String, u32>,
    data: &[u8],
) -> Vec<(ChunkRef, Option<Bytes>)> {
    let mut pieces = Vec::new();
    let mut cutter = repo.config.chunker.cutter();
    let mut emit = |chunk: &[u8]| {
        let id = repo.chunk_id(chunk).to_hex().to_string();
        let (stored_len, body) = match known.get(&id) {
            Some(&stored_len) => (stored_len, None),
            None => {
                let body = Bytes::from(repo.encode_chunk(chunk));
                (body.len() as u32, Some(body))
            }
        };
        pieces.push((ChunkRef::whole(id, chunk.len() as u32, stored_len), body));
        Ok::<(), std::io::Error>(())
    };
    // Writing into memory cannot fail.
    let _ = cutter.push(data, &mut emit);
    let _ = cutter.finish(&mut emit);
    pieces
}

/// What the repository holds of the WAL.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Completed segments, by name, with when each was stored.
    pub segments: BTreeMap<String, SystemTime>,
    /// Partial uploads: segment name → the newest upload's time (Unix micros).
    pub partials: BTreeMap<String, u64>,
    /// Every partial upload object (superseded ones included).
    pub partial_objects: Vec<WalFile>,
    pub histories: BTreeMap<u32, RemotePath>,
}

impl Catalog {
    pub async fn load(repo: &Repository, cancel: &CancellationToken) -> Result<Self, RepoError> {
        let mut catalog = Catalog::default();
        for prefix in [WAL_SEGMENTS, WAL_PARTIAL, WAL_HISTORY] {
            for object in repo.storage.list(prefix, cancel).await? {
                match WalFile::of_object(&object.path) {
                    Some(WalFile::Segment(name)) => {
                        catalog.segments.insert(name, object.modified);
                    }
                    Some(WalFile::Partial { segment, micros }) => {
                        let newest = catalog.partials.entry(segment.clone()).or_insert(micros);
                        *newest = (*newest).max(micros);
                        catalog
                            .partial_objects
                            .push(WalFile::Partial { segment, micros });
                    }
                    Some(WalFile::History(timeline)) => {
                        catalog.histories.insert(timeline, object.path);
                    }
                    None => {}
                }
            }
        }
        Ok(catalog)
    }

    /// Every archived file: segments, partial uploads, history files.
    pub fn files(&self) -> Vec<WalFile> {
        let segments = self.segments.keys().cloned().map(WalFile::Segment);
        let histories = self.histories.keys().copied().map(WalFile::History);
        segments
            .chain(self.partial_objects.iter().cloned())
            .chain(histories)
            .collect()
    }

    /// The file to restore as `segment`: the completed one, else (when `partial_ok`) the
    /// newest partial upload.
    fn file_for(&self, name: &str, partial_ok: bool) -> Option<WalFile> {
        if self.segments.contains_key(name) {
            return Some(WalFile::Segment(name.to_owned()));
        }
        let micros = *self.partials.get(name).filter(|_| partial_ok)?;
        Some(WalFile::Partial {
            segment: name.to_owned(),
            micros,
        })
    }
}

/// Where a recovery stops, as far as which WAL it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Everything archived, the newest partial segment included.
    Latest,
    /// Up to the segment holding this LSN.
    Lsn(u64),
    /// Up to the first segment stored at or after this time (the one that holds it), else
    /// everything.
    Time(SystemTime),
}

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

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Pruned {
    pub segments: usize,
    pub partials: usize,
}

/// Deletes archived segments before segment number `keep_from` (on every timeline) and partial
/// uploads that a completed segment or a newer partial supersedes. History files stay.
pub async fn prune(
    repo: &Repository,
    seg_size: u64,
    keep_from: u64,
    cancel: &CancellationToken,
) -> Result<Pruned, RepoError> {
    let catalog = Catalog::load(repo, cancel).await?;
    let mut pruned = Pruned::default();
    let before = |name: &str| Segment::parse(name, seg_size).is_some_and(|s| s.number < keep_from);
    for name in catalog.segments.keys().filter(|n| before(n)) {
        repo.storage
            .delete(&WalFile::Segment(name.clone()).path(), cancel)
            .await?;
        pruned.segments += 1;
    }
    for file in &catalog.partial_objects {
        let WalFile::Partial { segment, micros } = file else {
            continue;
        };
        let superseded = catalog.segments.contains_key(segment)
            || catalog.partials.get(segment).is_some_and(|m| m > micros)
            || before(segment);
        if superseded {
            repo.storage.delete(&file.path(), cancel).await?;
            pruned.partials += 1;
        }
    }
    Ok(pruned)
}

/// A base backup's WAL needs: where it starts and how big its segments are.
#[derive(Debug, Clone)]
pub struct BaseBackup {
    pub manifest: ComponentManifest,
    pub timeline: u32,
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub seg_size: u64,
}

/// Every base backup in the repository, oldest first. Manifests that cannot be read are
/// skipped here (`verify` names them): a damaged one is no starting point.
pub async fn base_backups(
    repo: &Repository,
    cancel: &CancellationToken,
) -> Result<Vec<BaseBackup>, RepoError> {
    let mut out = Vec::new();
    for id in repo.component_ids(cancel).await? {
        let manifest = match repo.component(&id, cancel).await {
            Ok(manifest) => manifest,
            Err(RepoError::Manifest { .. } | RepoError::Corrupt { .. }) => continue,
            Err(err) => return Err(err),
        };
        out.extend(BaseBackup::of(manifest));
    }
    out.sort_by_key(|b| b.end_lsn);
    Ok(out)
}

impl BaseBackup {
    /// `manifest` if it is a base backup (with a readable WAL range).
    pub fn of(manifest: ComponentManifest) -> Option<BaseBackup> {
        let Some(ConsistencyPoint::PostgresBase {
            start_lsn,
            end_lsn,
            timeline,
            wal_segment_size,
            ..
        }) = &manifest.consistency
        else {
            return None;
        };
        Some(BaseBackup {
            timeline: *timeline,
            start_lsn: parse_lsn(start_lsn)?,
            end_lsn: parse_lsn(end_lsn)?,
            seg_size: *wal_segment_size,
            manifest,
        })
    }
}

/// What [`retain`] removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Retained {
    pub deleted_base_backups: Vec<String>,
    pub kept_base_backups: usize,
    pub pruned: Pruned,
}

/// Keeps the newest `keep` base backups (at least one) and the WAL they need, and nothing
/// older: older base backups' manifests go (their data with GC), then every segment before
/// the oldest kept backup's start.
pub async fn retain(
    repo: &Repository,
    keep: usize,
    cancel: &CancellationToken,
) -> Result<Retained, RepoError> {
    let all = base_backups(repo, cancel).await?;
    let mut report = Retained::default();
    let first_kept = all.len().saturating_sub(keep.max(1));
    for old in &all[..first_kept] {
        repo.delete_component(&old.manifest.id, cancel).await?;
        report.deleted_base_backups.push(old.manifest.id.clone());
    }
    let kept = &all[first_kept..];
    report.kept_base_backups = kept.len();
    if let Some(oldest) = kept.iter().min_by_key(|b| b.start_lsn) {
        report.pruned = prune(
            repo,
            oldest.seg_size,
            oldest.start_lsn / oldest.seg_size,
            cancel,
        )
        .await?;
    }
    Ok(report)
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

/// Every WAL file's manifest (for GC marking).
pub async fn manifests(
    repo: &Repository,
    cancel: &CancellationToken,
) -> Result<Vec<ComponentManifest>, RepoError> {
    let mut out = Vec::new();
    for file in Catalog::load(repo, cancel).await?.files() {
        out.push(repo.wal_manifest(&file.path(), cancel).await?);
    }
    Ok(out)
}

/// Restores one WAL file into `path` (atomically). A partial upload superseded since it was
/// planned (the archiver runs on) is replaced by what superseded it: the completed segment or
/// a newer partial, both holding more of the same segment.
pub async fn fetch(
    repo: &Repository,
    file: &WalFile,
    path: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<u64, RepoError> {
    match fetch_exact(repo, file, path, cancel).await {
        Err(RepoError::Missing(object)) if matches!(file, WalFile::Partial { .. }) => {
            let catalog = Catalog::load(repo, cancel).await?;
            let current = catalog
                .file_for(&file.file_name(), true)
                .ok_or(RepoError::Missing(object))?;
            fetch_exact(repo, &current, path, cancel).await
        }
        other => other,
    }
}

async fn fetch_exact(
    repo: &Repository,
    file: &WalFile,
    path: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<u64, RepoError> {
    let manifest = repo.wal_manifest(&file.path(), cancel).await?;
    crate::restore::restore_to_file(repo, &manifest, path, std::sync::Arc::default(), cancel)
        .await?;
    Ok(manifest.raw_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn segment_names_round_trip() {
        let s = Segment::parse("000000010000000A000000FF", SEG).expect("valid");
        assert_eq!(s.timeline, 1);
        assert_eq!(s.number, 10 * 256 + 255);
        assert_eq!(s.name(SEG), "000000010000000A000000FF");
        assert_eq!(Segment::parse("000000010000000A00000100", SEG), None);
        assert_eq!(Segment::parse("00000001.history", SEG), None);
        assert_eq!(parse_lsn("A/FF000028"), Some((10 << 32) | 0xFF00_0028));
        assert_eq!(format_lsn((10 << 32) | 0xFF00_0028), "A/FF000028");
        assert_eq!(Segment::of_lsn(1, (10 << 32) | 0xFF00_0028, SEG), s);
    }

    fn catalog(segments: &[&str], partials: &[&str], histories: &[u32]) -> Catalog {
        let mut c = Catalog::default();
        for s in segments {
            c.segments.insert((*s).to_owned(), SystemTime::UNIX_EPOCH);
        }
        for p in partials {
            c.partials.insert((*p).to_owned(), 1);
        }
        for &h in histories {
            c.histories.insert(h, WalFile::History(h).path());
        }
        c
    }

    #[test]
    fn a_missing_segment_is_a_named_gap() {
        let c = catalog(
            &[
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000005",
            ],
            &["000000010000000000000006"],
            &[],
        );
        let before_gap =
            plan(&c, &[], SEG, 1, 2 * SEG + 40, End::Lsn(3 * SEG + 8)).expect("no gap");
        assert_eq!(before_gap.files.len(), 2);
        assert_eq!(
            plan(&c, &[], SEG, 1, 2 * SEG, End::Latest),
            Err(ChainError::Gap {
                missing: vec!["000000010000000000000004".into()]
            })
        );
    }

    #[test]
    fn latest_ends_with_the_partial_and_follows_timelines() {
        let c = catalog(
            &[
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000003",
            ],
            &["000000020000000000000004", "000000010000000000000004"],
            &[2],
        );
        let history =
            History::parse(2, "1\t0/3000100\tno recovery target specified\n").expect("history");
        let plan = plan(&c, &[history], SEG, 1, 2 * SEG, End::Latest).expect("plan");
        assert_eq!(plan.timeline, 2);
        assert_eq!(
            plan.files,
            vec![
                WalFile::Segment("000000010000000000000002".into()),
                WalFile::Segment("000000020000000000000003".into()),
                WalFile::Partial {
                    segment: "000000020000000000000004".into(),
                    micros: 1
                },
                WalFile::History(2),
            ]
        );
    }
}
