//! Garbage collection: mark every chunk a manifest references, sweep the rest — but only chunks
//! that have been unreferenced for the whole grace period, and only while no writer is in
//! flight.
//!
//! Safety does not rest on timing: the whole run holds a sweep lock, and deletes nothing while
//! any backup or WAL upload holds a fresh writer lock; a writer that starts during the sweep
//! waits for it to end before it lists the chunks it will rely on (see [`crate::locks`] and
//! `docs/repository-format.md`). So the mark, taken under the sweep lock, sees every manifest
//! that can still reference a chunk, at any grace period, zero included.
//!
//! The grace period is for the data itself: a run *condemns* unreferenced chunks (their ids
//! go to `gc/<time>-<rand>.json`) and a later run deletes those still unreferenced once the
//! condemnation and the chunk are older than the grace (default 24 h), so the leftovers of an
//! interrupted backup stay for its rerun to reuse. With a zero grace one run condemns and
//! deletes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::immutable::{LockReport, PurgeReport, Removal};
use crate::layout;
use crate::locks::SweepLock;
use crate::repo::Repository;
use crate::storage::PutMode;

pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// A long sweep checks its lock object is still there before every this many deletions.
const CONFIRM_EVERY: usize = 1000;

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub manifests: usize,
    pub chunks: usize,
    pub referenced: usize,
    pub unreferenced: usize,
    /// Unreferenced chunks still inside their grace period.
    pub in_grace: usize,
    pub deleted_chunks: usize,
    pub deleted_bytes: u64,
    /// Backups or WAL uploads in flight when the run started: nothing was deleted.
    pub writers_in_flight: usize,
    /// Locks of dead writers removed.
    pub stale_locks_removed: usize,
    pub dry_run: bool,
    /// Unreferenced chunks past their grace still under Object Lock: left for a later run.
    pub locked: usize,
    /// Object Lock extension of what the kept manifests need (locked repositories).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locks: Option<LockReport>,
    /// Versions of deleted objects removed once unlocked (locked repositories).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged: Option<PurgeReport>,
}

/// What the kept backups need: the result of GC's mark.
#[derive(Debug, Default)]
pub struct Marked {
    /// Every chunk a component or archived-WAL manifest references.
    pub chunks: HashSet<String>,
    /// Component manifests read: the listed ones, and those a set names that the listing
    /// lacks (behind a delete marker, read from their older version where the bucket keeps
    /// versions: a set still needs them).
    pub components: HashSet<String>,
    pub manifests: usize,
    /// Manifests that could not be read (only when marking leniently).
    pub skipped: usize,
}

/// Marks what the kept backups need. `strict`: a manifest that cannot be read stops the mark
/// (GC: deleting on partial knowledge loses data); otherwise it is skipped and counted (lock
/// extension: extending what is known is always safe). One removed since the listing (a
/// `forget` meanwhile) references nothing.
pub async fn mark(
    repo: &Repository,
    strict: bool,
    cancel: &CancellationToken,
) -> Result<Marked, RepoError> {
    let mut marked = Marked::default();
    let mut ids = repo.component_ids(cancel).await?;
    for set_id in repo.set_ids(cancel).await? {
        match repo.set(&set_id, cancel).await {
            Ok(set) => ids.extend(set.components.into_iter().map(|c| c.manifest_id)),
            Err(RepoError::NoSuchManifest(_)) => {}
            // A damaged set manifest names nothing GC could keep anyway.
            Err(err)
                if !strict
                    || crate::damaged::Damaged::from_error(
                        crate::damaged::DamagedKind::SetManifest,
                        &set_id,
                        &err,
                    )
                    .is_some() =>
            {
                marked.skipped += 1;
            }
            Err(err) => return Err(err),
        }
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        let manifest = match repo.component(&id, cancel).await {
            Ok(manifest) => manifest,
            Err(RepoError::NoSuchManifest(_)) => continue,
            Err(err) if !strict => {
                tracing::warn!(manifest = %id, error = %err, "manifest skipped by the mark");
                marked.skipped += 1;
                continue;
            }
            Err(err) => return Err(err),
        };
        marked.manifests += 1;
        marked.components.insert(id);
        marked
            .chunks
            .extend(manifest.chunks.into_iter().map(|c| c.id));
    }
    for manifest in crate::wal::manifests(repo, cancel).await? {
        marked.manifests += 1;
        marked
            .chunks
            .extend(manifest.chunks.into_iter().map(|c| c.id));
    }
    Ok(marked)
}

#[derive(Serialize, Deserialize)]
struct Condemned {
    /// Seconds since the Unix epoch.
    at: u64,
    chunks: Vec<String>,
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn gc(
    repo: &Repository,
    grace: Duration,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<GcReport, RepoError> {
    // The lock comes before the mark: every writer that can still commit is either done (its
    // manifest is listed below), seen here (nothing is deleted), or waits for this run to end.
    let lock = SweepLock::acquire(&repo.storage, cancel).await?;
    let result = Box::pin(collect(repo, grace, dry_run, &lock, cancel)).await;
    lock.release(cancel).await;
    result
}

async fn collect(
    repo: &Repository,
    grace: Duration,
    dry_run: bool,
    lock: &SweepLock,
    cancel: &CancellationToken,
) -> Result<GcReport, RepoError> {
    let may_delete = !dry_run && lock.writers.is_empty();
    let now = SystemTime::now();
    let cutoff = epoch_secs(now).saturating_sub(grace.as_secs());
    // Chunks first, manifests second: a chunk stored after this listing is never a candidate.
    let chunks = repo.storage.list(layout::CHUNKS, cancel).await?;
    let mut report = GcReport {
        dry_run,
        chunks: chunks.len(),
        writers_in_flight: lock.writers.len(),
        ..Default::default()
    };
    if !dry_run {
        for stale in &lock.stale_locks {
            repo.storage.delete(&stale.path, cancel).await?;
            report.stale_locks_removed += 1;
        }
    }
    let marked = mark(repo, true, cancel).await?;
    report.manifests = marked.manifests;
    report.referenced = marked.chunks.len();
    if repo.config.object_lock.is_some() && !dry_run {
        report.locks = Some(crate::immutable::extend_locks(repo, &marked, cancel).await?);
    }
    let referenced = marked.chunks;

    let mut condemned_at: HashMap<String, u64> = HashMap::new();
    // (list object, when it was written), kept to remove expired lists at the end.
    let mut lists = Vec::new();
    for meta in repo.storage.list(layout::GC_CONDEMNED, cancel).await? {
        let bytes = repo.storage.get(&meta.path, cancel).await?;
        let list: Condemned = serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
            object: meta.path.to_string(),
            reason: e.to_string(),
        })?;
        for chunk in list.chunks {
            let at = condemned_at.entry(chunk).or_insert(list.at);
            *at = (*at).min(list.at);
        }
        lists.push((meta.path, list.at));
    }

    let now_secs = epoch_secs(now);
    let mut newly_condemned = Vec::new();
    for object in &chunks {
        let id = object.path.file_name();
        if referenced.contains(id) {
            continue;
        }
        report.unreferenced += 1;
        let since = condemned_at.get(id).copied().unwrap_or(now_secs);
        if !condemned_at.contains_key(id) {
            newly_condemned.push(id.to_owned());
        }
        if since <= cutoff && epoch_secs(object.modified) <= cutoff {
            if !may_delete {
                // A dry run counts what it would delete; with writers in flight, nothing is.
                if dry_run {
                    report.deleted_chunks += 1;
                    report.deleted_bytes += object.size;
                } else {
                    report.in_grace += 1;
                }
                continue;
            }
            // A GC paused past its lock's stale time stops before its next deletion.
            lock.confirm_fresh()?;
            if report.deleted_chunks.is_multiple_of(CONFIRM_EVERY) {
                lock.confirm(cancel).await?;
            }
            match crate::immutable::remove_versions(repo, &object.path, cancel).await? {
                Removal::Removed => {
                    report.deleted_chunks += 1;
                    report.deleted_bytes += object.size;
                }
                Removal::Locked(_) => report.locked += 1,
            }
        } else {
            report.in_grace += 1;
        }
    }
    if dry_run {
        return Ok(report);
    }
    if repo.config.object_lock.is_some() && may_delete {
        report.purged = Some(crate::immutable::purge_deleted(repo, &referenced, cancel).await?);
    }
    // With a zero grace and deletion allowed, everything condemnable was just deleted.
    let all_deleted = grace.is_zero() && may_delete;
    if !newly_condemned.is_empty() && !all_deleted {
        let body = serde_json::to_vec(&Condemned {
            at: now_secs,
            chunks: newly_condemned,
        })
        .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
        repo.storage
            .put(
                &layout::timestamped(layout::GC_CONDEMNED),
                Bytes::from(body),
                PutMode::Create,
                cancel,
            )
            .await?;
    }
    // Lists past the grace period have done their job: every chunk in them was just deleted or
    // is referenced again (and will be condemned afresh if it loses its last reference).
    for (path, at) in lists {
        if at <= cutoff && may_delete {
            repo.storage.delete(&path, cancel).await?;
        }
    }
    Ok(report)
}
