//! `restore(manifest) → stream`: parallel downloads, verification of every chunk (id and length)
//! on a blocking pool, ordered reassembly, and a final check of the stream's size. (Every chunk is
//! checked against its id and the manifest against its checksum, so the stream is exactly the
//! one backed up.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backup::Progress;
use crate::error::RepoError;
use crate::layout;
use crate::manifest::ComponentManifest;
use crate::repo::Repository;
use crate::storage::StorageError;

/// Writes the stream of `manifest` into `writer`. On error the writer has received a prefix of
/// the stream at most; use [`restore_to_file`] where a partial result must never be visible.
pub async fn restore<W>(
    repo: &Repository,
    manifest: &ComponentManifest,
    mut writer: W,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), RepoError>
where
    W: AsyncWrite + Unpin,
{
    let mut chunks = futures::stream::iter(manifest.chunks.iter().cloned())
        .map(|chunk| {
            let repo = repo.clone();
            async move {
                let object = layout::chunk(&chunk.id);
                let stored = match repo.storage.get(&object, cancel).await {
                    Ok(bytes) => bytes,
                    Err(StorageError::NotFound(_)) => {
                        return Err(RepoError::Missing(object.to_string()));
                    }
                    Err(err) => return Err(err.into()),
                };
                tokio::task::spawn_blocking(move || {
                    repo.decode_chunk(&chunk.id, chunk.raw_len, stored)
                })
                .await
                .map_err(|e| RepoError::Io(std::io::Error::other(e)))?
            }
        })
        .buffered(repo.settings.download_concurrency.max(1));

    let mut size = 0u64;
    while let Some(data) = chunks.next().await {
        if cancel.is_cancelled() {
            return Err(RepoError::Cancelled);
        }
        let data = data?;
        size += data.len() as u64;
        writer.write_all(&data).await?;
        progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    writer.flush().await?;
    if size != manifest.raw_size {
        return Err(RepoError::Corrupt {
            object: layout::component_manifest(&manifest.id).to_string(),
            reason: format!(
                "its chunks add up to {size} bytes, it records {}",
                manifest.raw_size
            ),
        });
    }
    Ok(())
}

/// Restores into `path` through a temporary file in the same directory that is renamed into
/// place only after the whole stream verified; on failure nothing is left at `path`.
pub async fn restore_to_file(
    repo: &Repository,
    manifest: &ComponentManifest,
    path: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let tmp = temp_sibling(path);
    let result = async {
        let file = tokio::fs::File::create(&tmp).await?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        restore(repo, manifest, &mut writer, progress, cancel).await?;
        let file = writer.into_inner();
        file.sync_all().await?;
        tokio::fs::rename(&tmp, path).await?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::File::open(dir).await?.sync_all().await?;
        }
        Ok::<_, RepoError>(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{:08x}", rand::random::<u32>()))
}

/// The part of `manifest`'s stream indexed as `path`, as a manifest of its own, for streams
/// whose parts each start and end on chunk boundaries (PostgreSQL's dumps): restoring it
/// fetches only that part's chunks.
pub fn part(manifest: &ComponentManifest, path: &str) -> Result<ComponentManifest, RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt {
        object: layout::component_manifest(&manifest.id).to_string(),
        reason,
    };
    let entry = manifest
        .files
        .iter()
        .find(|f| f.path == path)
        .ok_or_else(|| corrupt(format!("its stream has no part `{path}`")))?;
    let (start, end) = (entry.offset, entry.offset + entry.size);
    let mut offset = 0u64;
    let mut chunks = Vec::new();
    for chunk in &manifest.chunks {
        let next = offset + u64::from(chunk.raw_len);
        if offset >= start && next <= end {
            chunks.push(chunk.clone());
        } else if offset < end && next > start {
            return Err(corrupt(format!(
                "part `{path}` does not start and end on chunk boundaries"
            )));
        }
        offset = next;
    }
    let mut part = manifest.clone();
    part.chunks = chunks;
    part.raw_size = entry.size;
    part.files.clear();
    Ok(part)
}
