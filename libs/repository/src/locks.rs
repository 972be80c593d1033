//! Writer and sweep locks: the protocol under which garbage collection never deletes a chunk a
//! manifest still to be committed relies on. `docs/repository-format.md` ("Garbage collection")
//! gives the argument in full; in short:
//!
//! - A **writer** (a backup, a WAL upload) creates `locks/writers/<id>.json` *before* it lists
//!   or checks the chunks it will rely on, then waits while a sweep lock exists, keeps its lock
//!   fresh while it works, confirms it before committing, and removes it after.
//! - A **sweep** (the deleting part of GC) creates `locks/sweeps/<id>.json`, *then* lists the
//!   writer locks, and deletes nothing while a fresh one exists.
//!
//! Both sides write their own lock before they list the other's, and listings are strongly
//! consistent (S3 since 2020, a local directory), so of a writer and a sweep that overlap, at
//! least one sees the other: either the sweep sees the writer and deletes nothing, or the writer
//! sees the sweep and lists chunks only after the sweep has finished deleting.
//!
//! Freshness is judged on the storage's clock (object modification times compared with each
//! other), never against a local clock. A lock not refreshed for [`LOCK_STALE`] belongs to a
//! process that died and is ignored (and removed by the next sweep). A writer that could not
//! refresh its lock for longer than [`LOCK_STALE`] minus a margin fails instead of committing,
//! since a sweep may have ignored it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout;
use crate::path::RemotePath;
use crate::storage::{ObjectMeta, PutMode, Storage, StorageError};

/// How often a held lock is rewritten.
pub const LOCK_REFRESH: Duration = Duration::from_secs(60);
/// A lock older than this (by the storage's clock) is taken for one of a dead process.
pub const LOCK_STALE: Duration = Duration::from_secs(10 * 60);
/// A writer commits only if its lock was refreshed this much sooner than [`LOCK_STALE`].
const STALE_MARGIN: Duration = Duration::from_secs(2 * 60);
/// How often a writer looks again while a sweep runs.
const SWEEP_POLL: Duration = Duration::from_millis(500);

#[derive(serde::Serialize)]
struct LockBody<'a> {
    what: &'a str,
    host: String,
    pid: u32,
}

/// A lock object, kept fresh by a task of its own until released.
struct Held {
    path: RemotePath,
    storage: Storage,
    /// When the last successful refresh started (local clock, only compared with itself).
    refreshed: Arc<Mutex<Instant>>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Held {
    async fn create(
        storage: &Storage,
        dir: &str,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<(Held, ObjectMeta), RepoError> {
        let path = layout::timestamped(dir);
        let body = Bytes::from(
            serde_json::to_vec(&LockBody {
                what,
                host: hostname(),
                pid: std::process::id(),
            })
            .map_err(|e| RepoError::Io(std::io::Error::other(e)))?,
        );
        let started = Instant::now();
        storage
            .put(&path, body.clone(), PutMode::Overwrite, cancel)
            .await?;
        let meta = storage.head(&path, cancel).await?;
        let refreshed = Arc::new(Mutex::new(started));
        let refresher = tokio::spawn(refresh(
            storage.clone(),
            path.clone(),
            body,
            refreshed.clone(),
        ));
        Ok((
            Held {
                path,
                storage: storage.clone(),
                refreshed,
                refresher,
            },
            meta,
        ))
    }

    /// Err unless the lock is still there and was refreshed recently enough that no sweep can
    /// have taken it for stale.
    async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        let since = self
            .refreshed
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX);
        let lost = || {
            RepoError::LockLost(format!(
                "{} (last refreshed {since:.0?} ago; a lock older than {LOCK_STALE:?} is taken for dead)",
                self.path
            ))
        };
        if since > LOCK_STALE.saturating_sub(STALE_MARGIN) {
            return Err(lost());
        }
        match self.storage.head(&self.path, cancel).await {
            Ok(_) => Ok(()),
            Err(StorageError::NotFound(_)) => Err(lost()),
            Err(err) => Err(err.into()),
        }
    }

    async fn release(self, cancel: &CancellationToken) {
        self.refresher.abort();
        if let Err(err) = self.storage.delete(&self.path, cancel).await {
            // Harmless: the lock goes stale and the next sweep removes it.
            tracing::warn!(lock = %self.path, error = %err, "could not remove a lock; it expires on its own");
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

async fn refresh(storage: Storage, path: RemotePath, body: Bytes, refreshed: Arc<Mutex<Instant>>) {
    let cancel = CancellationToken::new();
    loop {
        tokio::time::sleep(LOCK_REFRESH).await;
        let started = Instant::now();
        match storage
            .put(&path, body.clone(), PutMode::Overwrite, &cancel)
            .await
        {
            Ok(()) => {
                if let Ok(mut t) = refreshed.lock() {
                    *t = started;
                }
            }
            Err(err) => tracing::warn!(lock = %path, error = %err, "could not refresh a lock"),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Locks under `dir` that are fresh relative to `now` (a modification time of the storage's).
async fn fresh_locks(
    storage: &Storage,
    dir: &str,
    now: SystemTime,
    except: &RemotePath,
    cancel: &CancellationToken,
) -> Result<(Vec<ObjectMeta>, Vec<ObjectMeta>), RepoError> {
    let (fresh, stale) = storage
        .list(dir, cancel)
        .await?
        .into_iter()
        .filter(|o| &o.path != except)
        .partition(|o| now.duration_since(o.modified).unwrap_or_default() < LOCK_STALE);
    Ok((fresh, stale))
}

/// A writer's lock: held from before the writer lists the chunks it relies on until after it
/// committed (or gave up).
pub struct WriterLock(Held);

impl WriterLock {
    /// Creates the lock, then waits until no fresh sweep lock exists.
    pub async fn acquire(
        storage: &Storage,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<WriterLock, RepoError> {
        let (held, meta) = Held::create(storage, layout::WRITER_LOCKS, what, cancel).await?;
        let lock = WriterLock(held);
        let mut waited = false;
        loop {
            // The storage's "now": our lock's time, moved on by how long we have waited.
            let now = meta.modified + lock.0.refreshed_elapsed();
            let (sweeps, _) =
                fresh_locks(storage, layout::SWEEP_LOCKS, now, &lock.0.path, cancel).await?;
            if sweeps.is_empty() {
                return Ok(lock);
            }
            if !waited {
                tracing::info!(sweep = %sweeps[0].path, "garbage collection is deleting; waiting for it to finish");
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_POLL) => {}
                _ = cancel.cancelled() => {
                    lock.release(cancel).await;
                    return Err(RepoError::Cancelled);
                }
            }
        }
    }

    /// The last check before a commit (see [`Held::confirm`]).
    pub async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.0.confirm(cancel).await
    }

    pub async fn release(self, cancel: &CancellationToken) {
        self.0.release(cancel).await
    }
}

impl Held {
    fn refreshed_elapsed(&self) -> Duration {
        self.refreshed
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
}

/// A sweep's lock, and what it found.
pub struct SweepLock {
    held: Held,
    /// Fresh writer locks: while there are any, the sweep deletes nothing.
    pub writers: Vec<ObjectMeta>,
    /// Writer locks of dead processes, to remove.
    pub stale_writers: Vec<ObjectMeta>,
}

impl SweepLock {
    /// Creates the sweep lock, then lists the writer locks.
    pub async fn acquire(
        storage: &Storage,
        cancel: &CancellationToken,
    ) -> Result<SweepLock, RepoError> {
        let (held, meta) = Held::create(storage, layout::SWEEP_LOCKS, "gc", cancel).await?;
        let (writers, stale_writers) = fresh_locks(
            storage,
            layout::WRITER_LOCKS,
            meta.modified,
            &held.path,
            cancel,
        )
        .await?;
        Ok(SweepLock {
            held,
            writers,
            stale_writers,
        })
    }

    /// Err when the sweep must stop deleting: its lock is no longer certainly fresh.
    pub async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.held.confirm(cancel).await
    }

    pub async fn release(self, cancel: &CancellationToken) {
        self.held.release(cancel).await
    }
}
