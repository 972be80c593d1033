//! Garbage collection: mark every chunk a manifest references, sweep the rest — but only chunks
//! that have been unreferenced for the whole grace period.
//!
//! Why two phases: a backup in flight reuses chunks it found stored (possibly leftovers of an
//! interrupted backup) and uploads new ones, and none of them is referenced until its manifest
//! is committed. So a run only *condemns* unreferenced chunks (writes their ids to
//! `gc/<time>-<rand>.json`); a later run deletes those still unreferenced once the condemnation
//! and the chunk itself are older than the grace period (default 24 h). Any backup shorter than
//! the grace period is therefore safe; a longer one fails its final check instead of committing
//! a dangling manifest. With a zero grace period one run condemns and deletes.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout;
use crate::repo::Repository;
use crate::storage::PutMode;

pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

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
    pub dry_run: bool,
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
    let now = SystemTime::now();
    let cutoff = epoch_secs(now).saturating_sub(grace.as_secs());
    // Chunks first, manifests second: a chunk stored after this listing is never a candidate.
    let chunks = repo.storage.list(layout::CHUNKS, cancel).await?;
    let mut referenced = HashSet::new();
    let mut report = GcReport {
        dry_run,
        chunks: chunks.len(),
        ..Default::default()
    };
    for id in repo.component_ids(cancel).await? {
        // A manifest that cannot be read stops GC: deleting on partial knowledge loses data.
        let manifest = repo.component(&id, cancel).await?;
        report.manifests += 1;
        referenced.extend(manifest.chunks.into_iter().map(|c| c.id));
    }
    for manifest in crate::wal::manifests(repo, cancel).await? {
        report.manifests += 1;
        referenced.extend(manifest.chunks.into_iter().map(|c| c.id));
    }
    report.referenced = referenced.len();

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
            if !dry_run {
                repo.storage.delete(&object.path, cancel).await?;
            }
            report.deleted_chunks += 1;
            report.deleted_bytes += object.size;
        } else {
            report.in_grace += 1;
        }
    }
    if dry_run {
        return Ok(report);
    }
    if !newly_condemned.is_empty() && !grace.is_zero() {
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
        if at <= cutoff {
            repo.storage.delete(&path, cancel).await?;
        }
    }
    Ok(report)
}
