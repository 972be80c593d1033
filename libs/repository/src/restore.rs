//! `restore(manifest) → stream`: parallel downloads, verification of every chunk (id and length)
//! on a blocking pool, ordered reassembly, and a final check of the stream's size. (Every chunk is
//! checked against its id and the manifest against its checksum, so the stream is exactly the
//! one backed up.)

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backup::Progress;
use crate::digest::Checker;
use crate::error::RepoError;
use crate::layout;
use crate::manifest::{ChunkRef, ComponentManifest};
use crate::repo::Repository;

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
    let mut digests = Checker::new(manifest);
    let mut size = 0u64;
    while let Some(data) = chunks.next().await {
        let data = data?;
        size += data.len() as u64;
        check_digests(manifest, &mut digests, Some(&data))?;
        writer.write_all(&data).await?;
        progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    writer.flush().await?;
    check_digests(manifest, &mut digests, None)?;
    check_size(manifest, size)
}

/// Feeds the next bytes of the stream (None at its end) to the digest check.
fn check_digests(
    manifest: &ComponentManifest,
    digests: &mut Checker,
    data: Option<&[u8]>,
) -> Result<(), RepoError> {
    let checked = match data {
        Some(data) => digests.update(data),
        None => digests.finish(),
    };
    checked.map_err(|reason| RepoError::Corrupt {
        object: layout::component_manifest(&manifest.id).to_string(),
        reason,
    })
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
        let mut digests = Checker::new(manifest);
        let mut size = 0u64;
        while let Some(data) = chunks.next().await {
            let data = match data.and_then(|d| {
                check_digests(manifest, &mut digests, Some(&d))?;
                Ok(d)
            }) {
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
        let checked =
            check_digests(manifest, &mut digests, None).and_then(|()| check_size(manifest, size));
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

/// Decoded chunks kept for a later reference to them in the same stream (page-granular
/// databases reference one chunk many times, slice by slice), at most this many raw bytes.
const REUSE_CACHE_BYTES: usize = 16 << 20;

/// The verified bytes of `manifest`'s references in stream order, downloaded and decoded in
/// parallel; a chunk referenced again soon is kept instead of downloaded again (see [`plan`]).
fn chunk_stream<'a>(
    repo: &'a Repository,
    manifest: &'a ComponentManifest,
    cancel: &'a CancellationToken,
) -> impl futures::Stream<Item = Result<Bytes, RepoError>> + 'a {
    let mut cache: HashMap<String, Bytes> = HashMap::new();
    // Chunks are checked against ids keyed as the backup was (sealed repositories).
    let keyed = repo.reading(&manifest.keyed_by).map_err(|e| e.to_string());
    futures::stream::iter(plan(&manifest.chunks, REUSE_CACHE_BYTES))
        .map(move |step| {
            let repo = keyed.clone();
            async move {
                let repo = repo.map_err(RepoError::NoKey)?;
                let fetched = if step.fetch {
                    Some(fetch(&repo, &step.chunk, cancel).await?)
                } else {
                    None
                };
                Ok::<_, RepoError>((step, fetched))
            }
        })
        .buffered(repo.download_concurrency())
        .map(move |result| {
            let (step, fetched) = result?;
            let chunk = &step.chunk;
            let data = match fetched {
                Some(data) => data,
                None => cache.get(&chunk.id).cloned().ok_or_else(|| {
                    RepoError::Io(std::io::Error::other(format!(
                        "restore plan: chunk {} is not in the cache",
                        chunk.id
                    )))
                })?,
            };
            if step.keep {
                cache.insert(chunk.id.clone(), data.clone());
            } else {
                cache.remove(&chunk.id);
            }
            for id in &step.evict {
                cache.remove(id);
            }
            if data.len() != chunk.raw_len as usize || !chunk.slice_in_bounds() {
                return Err(RepoError::Corrupt {
                    object: layout::component_manifest(&manifest.id).to_string(),
                    reason: format!(
                        "its reference to chunk {} ({:?} of {} bytes) does not fit the chunk's {} bytes",
                        chunk.id,
                        chunk.slice,
                        chunk.raw_len,
                        data.len()
                    ),
                });
            }
            Ok(data.slice(chunk.range()))
        })
}

/// Downloads and verifies one chunk.
async fn fetch(
    repo: &Repository,
    chunk: &ChunkRef,
    cancel: &CancellationToken,
) -> Result<Bytes, RepoError> {
    if cancel.is_cancelled() {
        return Err(RepoError::Cancelled);
    }
    repo.read_chunk(&chunk.id, chunk.raw_len, cancel).await
}

/// What restoring one reference takes.
#[derive(Debug, PartialEq, Eq)]
struct Step {
    chunk: ChunkRef,
    /// Download the chunk (else it is in the cache).
    fetch: bool,
    /// Keep it in the cache for its next reference.
    keep: bool,
    /// Cached chunks to drop after this step.
    evict: Vec<String>,
}

/// Plans the downloads of `chunks` with a cache of at most `budget` raw bytes: a chunk that is
/// referenced again stays cached until then, unless the cache is full, in which case the chunk
/// whose next reference is furthest away goes (and is downloaded again when its turn comes).
/// Planned ahead, so the parallel downloads know what they need; a stream without repeated
/// chunks downloads each once and caches nothing, as before.
fn plan(chunks: &[ChunkRef], budget: usize) -> Vec<Step> {
    const NEVER: usize = usize::MAX;
    let mut next = vec![NEVER; chunks.len()];
    let mut later: HashMap<&str, usize> = HashMap::new();
    for (i, chunk) in chunks.iter().enumerate().rev() {
        if let Some(j) = later.insert(&chunk.id, i) {
            next[i] = j;
        }
    }
    // id → (next reference, raw length), and the same ordered by next reference.
    let mut cached: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut by_next: BTreeSet<(usize, &str)> = BTreeSet::new();
    let mut bytes = 0usize;
    let mut steps = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let id = chunk.id.as_str();
        let fetch = match cached.remove(id) {
            Some((at, len)) => {
                by_next.remove(&(at, id));
                bytes -= len;
                false
            }
            None => true,
        };
        let mut keep = false;
        let mut evict = Vec::new();
        if next[i] != NEVER {
            let len = chunk.raw_len as usize;
            cached.insert(id, (next[i], len));
            by_next.insert((next[i], id));
            bytes += len;
            keep = true;
            while bytes > budget {
                let Some((_, victim)) = by_next.pop_last() else {
                    break;
                };
                if let Some((_, len)) = cached.remove(victim) {
                    bytes -= len;
                }
                if victim == id {
                    keep = false;
                } else {
                    evict.push(victim.to_owned());
                }
            }
        }
        steps.push(Step {
            chunk: chunk.clone(),
            fetch,
            keep,
            evict,
        });
    }
    steps
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
/// place only after the whole stream verified; on failure nothing is left at `path`. A file
/// already at `path` is replaced.
pub async fn restore_to_file(
    repo: &Repository,
    manifest: &ComponentManifest,
    path: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    restore_publishing(repo, manifest, path, true, progress, cancel).await
}

/// [`restore_to_file`] that never replaces anything: the complete file is published with a
/// hard link, which fails if `path` exists by then (an `AlreadyExists` I/O error naming it),
/// so a file that appears while the stream downloads is not overwritten either.
pub async fn restore_to_new_file(
    repo: &Repository,
    manifest: &ComponentManifest,
    path: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    restore_publishing(repo, manifest, path, false, progress, cancel).await
}

async fn restore_publishing(
    repo: &Repository,
    manifest: &ComponentManifest,
    path: &Path,
    replace: bool,
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
        if replace {
            tokio::fs::rename(&tmp, path).await?;
        } else {
            tokio::fs::hard_link(&tmp, path).await.map_err(|err| {
                if err.kind() == std::io::ErrorKind::AlreadyExists {
                    std::io::Error::new(err.kind(), format!("{} already exists", path.display()))
                } else {
                    err
                }
            })?;
            tokio::fs::remove_file(&tmp).await?;
        }
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
        let next = offset + u64::from(chunk.stream_len());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(ids: &str) -> Vec<ChunkRef> {
        ids.chars()
            .map(|c| ChunkRef::whole(c.to_string(), 100, 50))
            .collect()
    }

    fn fetched(steps: &[Step]) -> String {
        steps
            .iter()
            .map(|s| if s.fetch { s.chunk.id.as_str() } else { "." })
            .collect()
    }

    #[test]
    fn distinct_chunks_are_fetched_once_and_never_cached() {
        let steps = plan(&refs("abcd"), 1000);
        assert_eq!(fetched(&steps), "abcd");
        assert!(steps.iter().all(|s| !s.keep && s.evict.is_empty()));
    }

    #[test]
    fn a_chunk_referenced_again_is_kept_until_its_last_reference() {
        let steps = plan(&refs("abab"), 1000);
        assert_eq!(fetched(&steps), "ab..");
        let kept: Vec<bool> = steps.iter().map(|s| s.keep).collect();
        assert_eq!(kept, [true, true, false, false]);
    }

    #[test]
    fn a_full_cache_drops_the_chunk_needed_furthest_ahead() {
        // Room for two: at `c`, the cache holds a and b, needed before c is again.
        let steps = plan(&refs("abcabc"), 200);
        assert_eq!(fetched(&steps), "abc..c");
        assert!(!steps[2].keep);
        // Here a is needed last: it goes when c comes in, and is fetched again.
        let steps = plan(&refs("abcbca"), 200);
        assert_eq!(fetched(&steps), "abc..a");
        assert_eq!(steps[2].evict, ["a".to_owned()]);
        // A chunk larger than the cache is never kept.
        let steps = plan(&refs("aa"), 50);
        assert_eq!(fetched(&steps), "aa");
    }
}
