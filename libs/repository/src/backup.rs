//! `backup(stream) → component manifest`: a bounded pipeline.
//!
//! ```text
//! reader thread ──chunks──► hash + compress + seal (blocking pool, ordered) ──► upload (parallel, ordered) ──► manifest
//!   FastCDC                      skipped for chunks already stored              create-only puts, rate limited
//! ```
//! Every stage holds a fixed number of chunks, so memory is bounded by the chunk size times the
//! concurrency, whatever the stream's length. Chunks already in the repository are not uploaded
//! again (across backups and within one), which also makes a rerun after an interruption upload
//! only what is missing. The manifest is committed last, after checking that every chunk it
//! names is stored.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout;
use crate::manifest::{BackupStats, ChunkRef, ComponentManifest, ConsistencyPoint, FileEntry};
use crate::repo::{Repository, now_rfc3339};
use crate::storage::{PutMode, StorageError};

/// What to record about the stream.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    pub name: String,
    /// `raw`, `tar`, `pg_dump`, `rdb`, ...
    pub stream: String,
    pub consistency: Option<ConsistencyPoint>,
    pub files: Vec<FileEntry>,
}

/// Live counters, readable while a backup or restore runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_read: AtomicU64,
    pub bytes_stored: AtomicU64,
}

/// Chunks prepared for the stage after hashing: known already, or encoded for upload.
struct Prepared {
    chunk: ChunkRef,
    upload: Option<Bytes>,
}

/// Stored chunk sizes by id: the repository's chunks at the start, plus this backup's.
type Known = Arc<Mutex<HashMap<String, u32>>>;

/// [`backup`] of an async stream (a child process's stdout, a socket).
pub async fn backup_async<R>(
    repo: &Repository,
    reader: R,
    request: BackupRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<ComponentManifest, RepoError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    backup(repo, SyncIoBridge::new(reader), request, progress, cancel).await
}

/// Backs up a blocking reader (read on a dedicated thread) and commits its manifest.
pub async fn backup<R>(
    repo: &Repository,
    reader: R,
    request: BackupRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<ComponentManifest, RepoError>
where
    R: std::io::Read + Send + 'static,
{
    let existing = repo.storage.list(layout::CHUNKS, cancel).await?;
    let known: Known = Arc::new(Mutex::new(
        existing
            .iter()
            .map(|o| (o.path.file_name().to_owned(), o.size as u32))
            .collect(),
    ));

    // Stage 1: a blocking thread cuts the stream; nothing else is serial.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(2);
    let params = repo.config.chunker;
    let reader_progress = progress.clone();
    let reader_task = tokio::task::spawn_blocking(move || {
        let mut size = 0u64;
        for chunk in params.stream(reader) {
            let item = chunk.map(|c| c.data).map_err(std::io::Error::other);
            if let Ok(data) = &item {
                size += data.len() as u64;
                reader_progress
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break;
            }
        }
        size
    });

    // Stage 2: id, dedup check, compression and sealing, on the blocking pool, in order.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        + 1;
    let prepared = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|item| {
            let repo = repo.clone();
            let known = known.clone();
            async move {
                let data = item?;
                tokio::task::spawn_blocking(move || prepare(&repo, &known, data))
                    .await
                    .map_err(|e| RepoError::Io(std::io::Error::other(e)))
            }
        })
        .buffered(workers);

    // Stage 3: parallel uploads, in order.
    let limiter = repo
        .settings
        .limit_upload_bytes_per_sec
        .map(RateLimiter::new);
    let uploaded = prepared
        .map(|result: Result<Prepared, RepoError>| {
            let limiter = limiter.as_ref();
            let progress = progress.clone();
            async move {
                let Prepared { chunk, upload } = result?;
                let mut stored = 0;
                if let Some(body) = upload {
                    if let Some(limiter) = limiter {
                        limiter.acquire(body.len(), cancel).await?;
                    }
                    stored = body.len() as u64;
                    match repo
                        .storage
                        .put(&layout::chunk(&chunk.id), body, PutMode::Create, cancel)
                        .await
                    {
                        Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
                        Err(err) => return Err(RepoError::from(err)),
                    }
                    progress.bytes_stored.fetch_add(stored, Ordering::Relaxed);
                }
                Ok::<_, RepoError>((chunk, stored))
            }
        })
        .buffered(repo.settings.upload_concurrency.max(1));

    let results: Result<Vec<(ChunkRef, u64)>, RepoError> = tokio::select! {
        results = uploaded.try_collect() => results,
        _ = cancel.cancelled() => Err(RepoError::Cancelled),
    };
    // On failure the stream is dropped here, which closes the channel and stops the reader.
    let raw_size = reader_task
        .await
        .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
    let results = results?;

    let mut stats = BackupStats::default();
    let mut chunks = Vec::with_capacity(results.len());
    for (chunk, stored) in results {
        stats.chunks += 1;
        if stored > 0 {
            stats.new_chunks += 1;
            stats.new_stored_bytes += stored;
        }
        chunks.push(chunk);
    }

    ensure_chunks_present(repo, &chunks, cancel).await?;
    let manifest = ComponentManifest {
        id: layout::new_manifest_id(),
        name: request.name,
        stream: request.stream,
        created: now_rfc3339(),
        raw_size,
        chunks,
        files: request.files,
        consistency: request.consistency,
        stats,
    };
    repo.commit_component(&manifest, cancel).await?;
    Ok(manifest)
}

fn prepare(repo: &Repository, known: &Known, data: Vec<u8>) -> Prepared {
    let id = repo.chunk_id(&data).to_hex().to_string();
    let raw_len = data.len() as u32;
    let already = known.lock().ok().and_then(|k| k.get(&id).copied());
    if let Some(stored_len) = already {
        return Prepared {
            chunk: ChunkRef {
                id,
                raw_len,
                stored_len,
            },
            upload: None,
        };
    }
    let encoded = repo.encode_chunk(&data);
    let stored_len = encoded.len() as u32;
    if let Ok(mut k) = known.lock() {
        k.insert(id.clone(), stored_len);
    }
    Prepared {
        chunk: ChunkRef {
            id,
            raw_len,
            stored_len,
        },
        upload: Some(Bytes::from(encoded)),
    }
}

/// The last check before the commit: a chunk this backup reused may have been collected while
/// it ran (only possible when GC runs with a grace period shorter than the backup).
async fn ensure_chunks_present(
    repo: &Repository,
    chunks: &[ChunkRef],
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let stored: HashSet<String> = repo
        .storage
        .list(layout::CHUNKS, cancel)
        .await?
        .into_iter()
        .map(|o| o.path.file_name().to_owned())
        .collect();
    match chunks.iter().find(|c| !stored.contains(&c.id)) {
        Some(missing) => Err(RepoError::ChunkVanished(
            layout::chunk(&missing.id).to_string(),
        )),
        None => Ok(()),
    }
}

/// A smooth upload limit: every upload reserves its share of time on one schedule, so the rate
/// holds over any window longer than one chunk's slot, without bursts.
struct RateLimiter {
    bytes_per_sec: f64,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self, bytes: usize, cancel: &CancellationToken) -> Result<(), RepoError> {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
            start
        };
        tokio::select! {
            _ = tokio::time::sleep_until(start.into()) => Ok(()),
            _ = cancel.cancelled() => Err(RepoError::Cancelled),
        }
    }
}
