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

use std::io::Write;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncRead;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use crate::chunker::Cutter;
use crate::clock::now_rfc3339;
use crate::error::RepoError;
use crate::layout;
use crate::locks::WriterLock;
use crate::manifest::{BackupStats, ChunkRef, ComponentManifest, ConsistencyPoint, FileEntry};
use crate::repo::Repository;
use crate::storage::{PutMode, StorageError};

/// What a backup is called: its name, and the snapshot set it belongs to (empty for a backup
/// on its own).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Label {
    pub name: String,
    pub set_id: String,
}

impl Label {
    /// A backup that belongs to no set.
    pub fn new(name: &str) -> Label {
        Label {
            name: name.to_owned(),
            set_id: String::new(),
        }
    }
}

/// What to record about the stream.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    pub name: String,
    /// The snapshot set the backup is made for (empty: none).
    pub set_id: String,
    /// `raw`, `tar`, `pg_dump`, `rdb`, ...
    pub stream: String,
    pub consistency: Option<ConsistencyPoint>,
    pub files: Vec<FileEntry>,
}

/// Live counters, readable while a backup or restore runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read from the source (backup) or written to the target (restore).
    pub bytes_read: AtomicU64,
    /// Bytes of the stream taken from an earlier backup's chunks without reading them.
    pub bytes_reused: AtomicU64,
    /// Bytes uploaded (after compression and encryption).
    pub bytes_stored: AtomicU64,
}

/// Chunks prepared for the stage after hashing: known already, or encoded for upload.
struct Prepared {
    chunk: ChunkRef,
    upload: Option<Bytes>,
    /// False for a pack: stored for the slices that reference it, not itself in the stream.
    in_stream: bool,
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
    mut reader: R,
    request: BackupRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<ComponentManifest, RepoError>
where
    R: std::io::Read + Send + 'static,
{
    let produce = move |sink: &mut ChunkSink| {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => sink.write_all(&buf[..n])?,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    };
    // Boxed: the pipeline's future is deep enough to overflow the compiler's layout
    // queries in callers that nest it further.
    let (manifest, ()) = Box::pin(backup_with(repo, request, progress, cancel, produce)).await?;
    Ok(manifest)
}

/// Widens a pipe the backup reads from to 1 MiB (the most an unprivileged process may set,
/// `/proc/sys/fs/pipe-max-size`). At its default 64 KiB, reading 1 GB/s through it wakes both
/// ends 16,000 times a second; wider, the writer runs ahead and a read takes up to a megabyte
/// (unchanged data through `tar cf -`: 1.4 s for 1 GB before, 1.1 s after). Not a pipe, or not
/// allowed: nothing changes.
pub fn widen_pipe(fd: &impl std::os::fd::AsFd) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

/// One piece of the stream handed to the pipeline: new bytes, a chunk already stored (or a
/// slice of one), or a pack: a chunk stored only for slices of it.
enum Piece {
    Data(Vec<u8>),
    /// In batches: a database's pages can be thousands of references.
    Stored(Vec<ChunkRef>),
    Pack {
        id: String,
        data: Vec<u8>,
    },
}

/// The pipeline's input, written to by a producer on a blocking thread: plain bytes (cut into
/// content-defined chunks) and, at chunk boundaries, chunks of an earlier backup that are known
/// to hold the next bytes — so unchanged data need not even be read.
pub struct ChunkSink {
    repo: Repository,
    cutter: Cutter,
    tx: tokio::sync::mpsc::Sender<Piece>,
    /// Appended references not yet sent; while there are any, the cutter holds no bytes.
    refs: Vec<ChunkRef>,
    stored: Known,
    offset: u64,
    files: Vec<FileEntry>,
    consistency: Option<ConsistencyPoint>,
    progress: Arc<Progress>,
}

impl ChunkSink {
    /// Records a file of a tar stream in the manifest's file index.
    pub fn index_file(&mut self, entry: FileEntry) {
        self.files.push(entry);
    }

    /// Sets the manifest's consistency point, replacing the request's: for what is only known
    /// once the stream is written (row counts taken while it was).
    pub fn set_consistency(&mut self, point: ConsistencyPoint) {
        self.consistency = Some(point);
    }

    /// Stream bytes written so far (new and reused).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Ends the current chunk: the next byte written starts a new one.
    pub fn boundary(&mut self) -> std::io::Result<()> {
        let tx = &self.tx;
        self.cutter
            .finish(&mut |chunk| send(tx, Piece::Data(chunk.to_vec())))
    }

    /// Sends the appended references (before any new bytes, and at the end).
    fn send_refs(&mut self) -> std::io::Result<()> {
        if self.refs.is_empty() {
            return Ok(());
        }
        send(&self.tx, Piece::Stored(std::mem::take(&mut self.refs)))
    }

    /// Appends `chunks` (from an earlier backup) without their data, if every one of them is
    /// still stored; returns false, appending nothing, otherwise. Ends the current chunk first.
    pub fn reuse(&mut self, chunks: &[ChunkRef]) -> std::io::Result<bool> {
        self.boundary()?;
        if !chunks.iter().all(|c| self.is_stored(c)) {
            return Ok(false);
        }
        for chunk in chunks {
            self.append(chunk.clone())?;
        }
        Ok(true)
    }

    /// Whether `chunk` (of an earlier backup) is stored, with the recorded size.
    pub fn is_stored(&self, chunk: &ChunkRef) -> bool {
        self.stored
            .lock()
            .is_ok_and(|stored| stored.get(&chunk.id) == Some(&chunk.stored_len))
    }

    /// The id `data` is stored under.
    pub fn chunk_id(&self, data: &[u8]) -> blake3::Hash {
        self.repo.chunk_id(data)
    }

    /// Stores `data` as a pack: a chunk that is not itself part of the stream, for slices of it
    /// to be [`append`](Self::append)ed with `stored_len` [`ChunkSink::PACK`] (filled in at the
    /// commit). Returns its id.
    pub fn store_pack(&mut self, data: Vec<u8>) -> std::io::Result<String> {
        self.send_refs()?;
        let id = self.repo.chunk_id(&data).to_hex().to_string();
        self.progress
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        send(
            &self.tx,
            Piece::Pack {
                id: id.clone(),
                data,
            },
        )?;
        Ok(id)
    }

    /// The `stored_len` of a slice of a pack of this backup until the commit fills it in.
    pub const PACK: u32 = 0;

    /// Appends stored bytes without their data: a chunk or slice of an earlier backup (check
    /// [`is_stored`](Self::is_stored) first) or a slice of a pack of this one. Ends the current
    /// chunk first.
    pub fn append(&mut self, chunk: ChunkRef) -> std::io::Result<()> {
        self.boundary()?;
        let len = u64::from(chunk.stream_len());
        self.offset += len;
        if chunk.stored_len != ChunkSink::PACK {
            self.progress.bytes_reused.fetch_add(len, Ordering::Relaxed);
        }
        self.refs.push(chunk);
        if self.refs.len() >= REF_BATCH {
            self.send_refs()?;
        }
        Ok(())
    }
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.send_refs()?;
        let tx = &self.tx;
        self.cutter
            .push(buf, &mut |chunk| send(tx, Piece::Data(chunk.to_vec())))?;
        self.offset += buf.len() as u64;
        self.progress
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// References sent to the pipeline at once.
const REF_BATCH: usize = 4096;

fn send(tx: &tokio::sync::mpsc::Sender<Piece>, piece: Piece) -> std::io::Result<()> {
    tx.blocking_send(piece).map_err(|_| pipeline_stopped())
}

fn pipeline_stopped() -> std::io::Error {
    std::io::Error::other("the backup pipeline stopped")
}

/// Runs `produce` on a blocking thread, writing the stream into a [`ChunkSink`], stores the
/// chunks and commits the manifest. Returns the manifest and what `produce` returned.
pub async fn backup_with<T, F>(
    repo: &Repository,
    request: BackupRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    produce: F,
) -> Result<(ComponentManifest, T), RepoError>
where
    F: FnOnce(&mut ChunkSink) -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    repo.check_writes()?;
    // The lock comes before the listing of the chunks this backup will rely on (`locks.rs`).
    let lock = Box::pin(WriterLock::acquire(&repo.storage, &request.name, cancel)).await?;
    let result = Box::pin(store_and_commit(
        repo, request, progress, cancel, produce, &lock,
    ))
    .await;
    lock.release(cancel).await;
    result
}

async fn store_and_commit<T, F>(
    repo: &Repository,
    request: BackupRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    produce: F,
    lock: &WriterLock,
) -> Result<(ComponentManifest, T), RepoError>
where
    F: FnOnce(&mut ChunkSink) -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    let existing = repo.storage.list(layout::CHUNKS, cancel).await?;
    let known: Known = Arc::new(Mutex::new(
        existing
            .iter()
            .map(|o| (o.path.file_name().to_owned(), o.size as u32))
            .collect(),
    ));

    // Stage 1: the producer on a blocking thread; the sink cuts its bytes into chunks.
    let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(2);
    let mut sink = ChunkSink {
        repo: repo.clone(),
        cutter: repo.cutter(),
        tx,
        refs: Vec::new(),
        stored: known.clone(),
        offset: 0,
        files: Vec::new(),
        consistency: None,
        progress: progress.clone(),
    };
    let producer = tokio::task::spawn_blocking(move || {
        let output = produce(&mut sink)?;
        sink.boundary()?;
        sink.send_refs()?;
        let indexed = std::mem::take(&mut sink.files);
        Ok::<_, std::io::Error>((output, sink.offset, indexed, sink.consistency.take()))
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
                let (data, id) = match item {
                    Piece::Stored(chunks) => {
                        return Ok(chunks
                            .into_iter()
                            .map(|chunk| Prepared {
                                chunk,
                                upload: None,
                                in_stream: true,
                            })
                            .collect());
                    }
                    Piece::Data(data) => (data, None),
                    Piece::Pack { id, data } => (data, Some(id)),
                };
                tokio::task::spawn_blocking(move || vec![prepare(&repo, &known, data, id)])
                    .await
                    .map_err(|e| RepoError::Io(std::io::Error::other(e)))
            }
        })
        .buffered(workers)
        .map_ok(|prepared: Vec<Prepared>| futures::stream::iter(prepared).map(Ok))
        .try_flatten();

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
                let Prepared {
                    chunk,
                    upload,
                    in_stream,
                } = result?;
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
                Ok::<_, RepoError>((chunk, stored, in_stream))
            }
        })
        .buffered(repo.settings.upload_concurrency.max(1));

    let results: Result<Vec<(ChunkRef, u64, bool)>, RepoError> = tokio::select! {
        results = uploaded.try_collect() => results,
        _ = cancel.cancelled() => Err(RepoError::Cancelled),
    };
    // On failure the stream is dropped here, which closes the channel and stops the producer;
    // its "pipeline stopped" error is then only the echo of the error in `results`.
    let produced = producer
        .await
        .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
    let results = results?;
    let (output, raw_size, indexed, consistency) = produced?;

    let mut stats = BackupStats::default();
    let mut chunks = Vec::with_capacity(results.len());
    let mut packs = HashMap::new();
    for (chunk, stored, in_stream) in results {
        if stored > 0 {
            stats.new_chunks += 1;
            stats.new_stored_bytes += stored;
        }
        if in_stream {
            stats.chunks += 1;
            chunks.push(chunk);
        } else {
            packs.insert(chunk.id, chunk.stored_len);
        }
    }
    for chunk in chunks
        .iter_mut()
        .filter(|c| c.stored_len == ChunkSink::PACK)
    {
        chunk.stored_len = *packs.get(&chunk.id).ok_or_else(|| {
            RepoError::Io(std::io::Error::other(format!(
                "a slice references chunk {}, which this backup did not store",
                chunk.id
            )))
        })?;
    }

    Box::pin(ensure_chunks_present(repo, &chunks, cancel)).await?;
    lock.confirm(cancel).await?;
    let manifest = ComponentManifest {
        id: layout::new_manifest_id(),
        name: request.name,
        set_id: request.set_id,
        stream: request.stream,
        created: now_rfc3339(),
        raw_size,
        chunks,
        files: request.files.into_iter().chain(indexed).collect(),
        consistency: consistency.or(request.consistency),
        stats,
        keyed_by: repo.keyed_by(),
    };
    Box::pin(repo.commit_component(&manifest, cancel)).await?;
    Ok((manifest, output))
}

/// Hashes (unless the id is known: a pack's), checks and encodes one chunk.
fn prepare(repo: &Repository, known: &Known, data: Vec<u8>, id: Option<String>) -> Prepared {
    let in_stream = id.is_none();
    let id = id.unwrap_or_else(|| repo.chunk_id(&data).to_hex().to_string());
    let raw_len = data.len() as u32;
    let already = known.lock().ok().and_then(|k| k.get(&id).copied());
    if let Some(stored_len) = already {
        return Prepared {
            chunk: ChunkRef::whole(id, raw_len, stored_len),
            upload: None,
            in_stream,
        };
    }
    let encoded = repo.encode_chunk(&data);
    let stored_len = encoded.len() as u32;
    if let Ok(mut k) = known.lock() {
        k.insert(id.clone(), stored_len);
    }
    Prepared {
        chunk: ChunkRef::whole(id, raw_len, stored_len),
        upload: Some(Bytes::from(encoded)),
        in_stream,
    }
}

/// The last check before the commit, beside the lock: every chunk the manifest names is stored
/// (one listing; catches chunks removed by hand or by a GC that ignored the lock).
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

#[cfg(test)]
mod tests {
    use nix::fcntl::{FcntlArg, fcntl};

    #[test]
    fn a_pipe_is_widened_to_a_megabyte_and_anything_else_is_left_alone() {
        let (read, _write) = nix::unistd::pipe().expect("pipe");
        // 64 KiB by default (less once a user's pipes hold `pipe-user-pages-soft`).
        assert!(fcntl(&read, FcntlArg::F_GETPIPE_SZ).is_ok_and(|size| size < 1 << 20));
        super::widen_pipe(&read);
        assert_eq!(fcntl(&read, FcntlArg::F_GETPIPE_SZ), Ok(1 << 20));

        let file = tempfile::tempfile().expect("temporary file");
        super::widen_pipe(&file);
        assert!(fcntl(&file, FcntlArg::F_GETPIPE_SZ).is_err());
    }
}
