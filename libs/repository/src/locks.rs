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
//! other), never against a local clock. A writer lock not refreshed for [`LOCK_STALE`], or a
//! sweep lock not refreshed for [`SWEEP_STALE`], belongs to a process that died and is ignored
//! (and removed by the next sweep). A holder whose lock was not refreshed for its stale time
//! minus a margin stops (a writer fails instead of committing, a sweep stops deleting), since
//! the other side may have ignored it. Sweep locks are short-lived, so a killed GC holds
//! writers up for [`SWEEP_STALE`] at most.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout;
use crate::path::RemotePath;
use crate::storage::{ObjectMeta, PutMode, Storage, StorageError};

/// How often a writer lock is rewritten.
pub const LOCK_REFRESH: Duration = Duration::from_secs(60);
/// A writer lock older than this (by the storage's clock) is taken for one of a dead process.
pub const LOCK_STALE: Duration = Duration::from_secs(10 * 60);
/// How often a sweep lock is rewritten.
pub const SWEEP_REFRESH: Duration = Duration::from_secs(5);
/// A sweep lock older than this is taken for one of a dead GC.
pub const SWEEP_STALE: Duration = Duration::from_secs(30);
/// How often a writer looks again while a sweep runs.
const SWEEP_POLL: Duration = Duration::from_millis(500);

/// The timing of one kind of lock.
#[derive(Debug, Clone, Copy)]
struct Timing {
    refresh: Duration,
    stale: Duration,
    /// The holder goes on only while its last refresh is this much younger than `stale`.
    margin: Duration,
}

const WRITER: Timing = Timing {
    refresh: LOCK_REFRESH,
    stale: LOCK_STALE,
    margin: Duration::from_secs(2 * 60),
};

const SWEEP: Timing = Timing {
    refresh: SWEEP_REFRESH,
    stale: SWEEP_STALE,
    margin: Duration::from_secs(10),
};

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
    timing: Timing,
}

impl Held {
    async fn create(
        storage: &Storage,
        dir: &str,
        what: &str,
        timing: Timing,
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
            timing.refresh,
        ));
        let held = Held {
            path,
            storage: storage.clone(),
            refreshed,
            refresher,
            timing,
        };
        Ok((held, meta))
    }

    fn refreshed_elapsed(&self) -> Duration {
        self.refreshed
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX)
    }

    /// Err unless the lock was refreshed recently enough that nobody can have taken it for
    /// stale. Local, so free to call before every step.
    fn confirm_fresh(&self) -> Result<(), RepoError> {
        let since = self.refreshed_elapsed();
        if since > self.timing.stale.saturating_sub(self.timing.margin) {
            return Err(self.lost(since));
        }
        Ok(())
    }

    /// [`Held::confirm_fresh`], and the lock object is still there.
    async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.confirm_fresh()?;
        match self.storage.head(&self.path, cancel).await {
            Ok(_) => Ok(()),
            Err(StorageError::NotFound(_)) => Err(self.lost(self.refreshed_elapsed())),
            Err(err) => Err(err.into()),
        }
    }

    fn lost(&self, since: Duration) -> RepoError {
        RepoError::LockLost(format!(
            "{} (last refreshed {since:.0?} ago; a lock older than {:?} is taken for dead)",
            self.path, self.timing.stale
        ))
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

async fn refresh(
    storage: Storage,
    path: RemotePath,
    body: Bytes,
    refreshed: Arc<Mutex<Instant>>,
    every: Duration,
) {
    let cancel = CancellationToken::new();
    loop {
        tokio::time::sleep(every).await;
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

/// Locks under `dir`, (fresh, stale) relative to `now` (a modification time of the storage's).
async fn locks_under(
    storage: &Storage,
    dir: &str,
    now: SystemTime,
    stale_after: Duration,
    except: &RemotePath,
    cancel: &CancellationToken,
) -> Result<(Vec<ObjectMeta>, Vec<ObjectMeta>), RepoError> {
    let (fresh, stale) = storage
        .list(dir, cancel)
        .await?
        .into_iter()
        .filter(|o| &o.path != except)
        .partition(|o| now.duration_since(o.modified).unwrap_or_default() < stale_after);
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
        let (held, meta) =
            Held::create(storage, layout::WRITER_LOCKS, what, WRITER, cancel).await?;
        let lock = WriterLock(held);
        let waiting_since = Instant::now();
        let mut said = false;
        loop {
            // The storage's "now": our lock's time, moved on by how long we have waited.
            let now = meta.modified + waiting_since.elapsed();
            let listed = locks_under(
                storage,
                layout::SWEEP_LOCKS,
                now,
                SWEEP_STALE,
                &lock.0.path,
                cancel,
            )
            .await;
            let sweeps = match listed {
                Ok((sweeps, _)) => sweeps,
                Err(err) => {
                    lock.release(cancel).await;
                    return Err(err);
                }
            };
            if sweeps.is_empty() {
                return Ok(lock);
            }
            if !said {
                tracing::warn!(sweep = %sweeps[0].path, "garbage collection is deleting chunks; waiting for it to finish (a sweep lock not refreshed for {SWEEP_STALE:?} is taken for a dead GC's)");
                said = true;
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

    /// The last check before a commit: the lock is still there and certainly fresh.
    pub async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.0.confirm(cancel).await
    }

    pub async fn release(self, cancel: &CancellationToken) {
        self.0.release(cancel).await
    }
}

/// A sweep's lock, and what it found.
pub struct SweepLock {
    held: Held,
    /// Fresh writer locks: while there are any, the sweep deletes nothing.
    pub writers: Vec<ObjectMeta>,
    /// Writer and sweep locks of dead processes, to remove.
    pub stale_locks: Vec<ObjectMeta>,
}

impl SweepLock {
    /// Creates the sweep lock, then lists the writer locks (and stale sweep locks).
    pub async fn acquire(
        storage: &Storage,
        cancel: &CancellationToken,
    ) -> Result<SweepLock, RepoError> {
        let (held, meta) = Held::create(storage, layout::SWEEP_LOCKS, "gc", SWEEP, cancel).await?;
        let listed = async {
            let (writers, mut stale) = locks_under(
                storage,
                layout::WRITER_LOCKS,
                meta.modified,
                LOCK_STALE,
                &held.path,
                cancel,
            )
            .await?;
            let (_, stale_sweeps) = locks_under(
                storage,
                layout::SWEEP_LOCKS,
                meta.modified,
                SWEEP_STALE,
                &held.path,
                cancel,
            )
            .await?;
            stale.extend(stale_sweeps);
            Ok::<_, RepoError>((writers, stale))
        }
        .await;
        match listed {
            Ok((writers, stale_locks)) => Ok(SweepLock {
                held,
                writers,
                stale_locks,
            }),
            Err(err) => {
                held.release(cancel).await;
                Err(err)
            }
        }
    }

    /// Err when the sweep must stop deleting: its lock may be taken for a dead GC's. Local and
    /// free: checked before every deletion.
    pub fn confirm_fresh(&self) -> Result<(), RepoError> {
        self.held.confirm_fresh()
    }

    /// [`SweepLock::confirm_fresh`], and the lock object is still there.
    pub async fn confirm(&self, cancel: &CancellationToken) -> Result<(), RepoError> {
        self.held.confirm(cancel).await
    }

    pub async fn release(self, cancel: &CancellationToken) {
        self.held.release(cancel).await
    }
}
