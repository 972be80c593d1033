//! `restore(manifest) → stream`: parallel downloads, verification of every chunk (id and length)
//! on a blocking pool, ordered reassembly, and a final check of the stream's size. (Every chunk is
//! checked against its id and the manifest against its checksum, so the stream is exactly the
//! one backed up.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
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
    let mut chunks = chunk_stream(repo, manifest, cancel);
    let mut size = 0u64;
    while let Some(data) = chunks.next().await {
        let data = data?;
        size += data.len() as u64;
        writer.write_all(&data).await?;
        progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    writer.flush().await?;
    check_size(manifest, size)
}

/// The stream of `manifest`, read by `consume` on a blocking thread (an unpacker): the verified
/// chunks are handed over without another copy. If the download fails, `consume`'s reads fail
/// and the download's error is returned; if `consume` stops reading early (it refused the
/// data), the download stops and its output is returned, to say why.
pub async fn restore_with<T, F>(
    repo: &Repository,
    manifest: &ComponentManifest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    consume: F,
) -> Result<T, RepoError>
where
    F: FnOnce(&mut dyn std::io::Read) -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
    let consumer = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        consume(&mut reader)
    });
    let fed = async {
        let mut chunks = chunk_stream(repo, manifest, cancel);
        let mut size = 0u64;
        while let Some(data) = chunks.next().await {
            let data = match data {
                Ok(data) => data,
                Err(err) => {
                    let _ = tx.send(Err(err.to_string())).await;
                    return Err(err);
                }
            };
            size += data.len() as u64;
            progress
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if tx.send(Ok(data)).await.is_err() {
                return Ok(()); // the consumer stopped; its output says why
            }
        }
        let checked = check_size(manifest, size);
        if let Err(err) = &checked {
            let _ = tx.send(Err(err.to_string())).await;
        }
        checked
    }
    .await;
    drop(tx);
    let output = consumer
        .await
        .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
    fed?;
    Ok(output)
}

/// A blocking reader over the chunks a [`restore_with`] download hands over.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    current: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(data)) => self.current = data,
                Some(Err(message)) => return Err(std::io::Error::other(message)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The verified chunks of `manifest` in stream order, downloaded and decoded in parallel.
fn chunk_stream<'a>(
    repo: &'a Repository,
    manifest: &'a ComponentManifest,
    cancel: &'a CancellationToken,
) -> impl futures::Stream<Item = Result<Bytes, RepoError>> + 'a {
    futures::stream::iter(manifest.chunks.iter().cloned())
        .map(move |chunk| {
            let repo = repo.clone();
            async move {
                if cancel.is_cancelled() {
                    return Err(RepoError::Cancelled);
                }
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
        .buffered(repo.download_concurrency())
}

fn check_size(manifest: &ComponentManifest, size: u64) -> Result<(), RepoError> {
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
