//! Pruning archived WAL and keeping the newest base backups with the WAL they need.

use tokio_util::sync::CancellationToken;

use super::{Catalog, Segment, WalFile, parse_lsn};
use crate::error::RepoError;
use crate::manifest::{ComponentManifest, ConsistencyPoint};
use crate::repo::Repository;

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
