//! What the repository holds of the WAL, and reading WAL files back.

use std::collections::BTreeMap;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::WalFile;
use crate::error::RepoError;
use crate::layout::{WAL_HISTORY, WAL_PARTIAL, WAL_SEGMENTS};
use crate::manifest::ComponentManifest;
use crate::path::RemotePath;
use crate::repo::Repository;

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
    pub(super) fn file_for(&self, name: &str, partial_ok: bool) -> Option<WalFile> {
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
