//! Immutability with S3 Object Lock.
//!
//! A repository initialized with an [`ObjectLock`] writes every [lockable](layout::is_lockable)
//! object (config, keys, audit, chunks, manifests, archived WAL) with a retention of `days` in
//! the lock's mode, on a bucket with versioning and Object Lock (checked by [`check_bucket`]).
//! Then no credential this system hands out can destroy a committed backup while it is locked:
//! a put only adds a version, a plain delete only adds a delete marker, and the versions
//! themselves cannot be removed until their date.
//!
//! - **Locks follow retention** ([`extend_locks`]): every object a kept backup needs (the
//!   chunks its manifests reference, the manifests its sets name, keys, audit, config; the
//!   first version of each, the one this system wrote) is locked again for `days` once less
//!   than the lock's margin is left. A version that may be due is read from the bucket first,
//!   so a lock is never shortened; the dates read or set are remembered in memory only, since
//!   anything kept in the bucket could be forged to exempt a version.
//! - **Reads that verify** ([`Repository::read_verified`]): chunks are content-addressed and
//!   manifests carry checksums and ids, so a current version that is missing or does not
//!   verify (an overwrite or a delete marker by a writer) gives way to an older version that
//!   does; manifests, named by id rather than content, are read from their first version at
//!   once, and so are the config and the keys. Such objects are remembered and `verify`
//!   reports them.
//! - **GC and retention** delete what is unlocked and skip, count and report what is locked
//!   ([`remove_versions`], [`purge_deleted`]); they never fail on a lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::gc::Marked;
use crate::layout;
use crate::path::RemotePath;
use crate::repo::{ObjectLock, Repository};
use crate::storage::{ObjectVersion, Retention, Storage, StorageError};

/// Lock requests in flight at once.
const CONCURRENCY: usize = 16;
/// How much shorter than `period` from its stamp a version's first lock is assumed to be
/// (request time, retries, clock skew between writer and bucket).
const INITIAL_SLACK: Duration = Duration::from_secs(300);

/// Objects whose current version did not verify and were read from an older one.
#[derive(Clone, Default)]
pub struct Overwritten(Arc<Mutex<BTreeSet<String>>>);

impl Overwritten {
    fn record(&self, object: &RemotePath) {
        if let Ok(mut set) = self.0.lock() {
            set.insert(object.to_string());
        }
    }

    /// Every object recorded so far, sorted.
    pub fn list(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Refuses a bucket that cannot keep locked versions, naming what is missing.
pub async fn check_bucket(storage: &Storage, cancel: &CancellationToken) -> Result<(), RepoError> {
    let bucket = storage.describe();
    let status = match storage.bucket_lock_status(cancel).await {
        Ok(status) => status,
        Err(StorageError::Permanent { message, .. })
            if message.contains("keeps no object versions") =>
        {
            return Err(RepoError::CannotLock(format!(
                "an object lock needs an S3 bucket with Object Lock enabled; {bucket} is not one"
            )));
        }
        Err(err) => return Err(err.into()),
    };
    if !status.object_lock {
        return Err(RepoError::CannotLock(format!(
            "bucket {bucket} does not have Object Lock enabled{}; an object lock is configured, \
             so every object must be locked. Create the bucket with Object Lock \
             (`aws s3api create-bucket --object-lock-enabled-for-bucket ...`) or configure no lock",
            if status.versioning {
                ""
            } else {
                " (nor versioning)"
            }
        )));
    }
    if !status.versioning {
        return Err(RepoError::CannotLock(format!(
            "bucket {bucket} has Object Lock but versioning is not enabled"
        )));
    }
    Ok(())
}

/// Whether a read error means the object's content is damaged or gone (so an older version
/// may hold the true one), not that the read itself failed.
fn is_damage(err: &RepoError) -> bool {
    matches!(
        err,
        RepoError::Corrupt { .. }
            | RepoError::Manifest { .. }
            | RepoError::Missing(_)
            | RepoError::NoSuchManifest(_)
    )
}

impl Repository {
    /// Whether the bucket keeps versions that reads may fall back to.
    fn keeps_versions(&self) -> bool {
        self.config.object_lock.is_some() || self.storage.as_of_time().is_some()
    }

    /// Objects read from an older version so far (see [`Repository::read_verified`]).
    pub fn overwritten(&self) -> Vec<String> {
        self.overwritten.list()
    }

    /// Reads `path` and decodes it with `decode`, which verifies it. In a repository whose
    /// bucket keeps versions, a current version that is missing or does not verify gives way
    /// to an older version that does (the first one first: the one this system wrote, since
    /// objects are created once; then the others, newest first); `missing()` is the error
    /// when none is there. With `first`, the first version is read at once: for objects whose
    /// content does not give their name (manifests), a later version that verifies is still
    /// someone else's.
    pub(crate) async fn read_verified<T, F, Fut>(
        &self,
        path: &RemotePath,
        first: bool,
        missing: impl Fn() -> RepoError,
        cancel: &CancellationToken,
        decode: F,
    ) -> Result<T, RepoError>
    where
        F: Fn(Bytes) -> Fut,
        Fut: Future<Output = Result<T, RepoError>>,
    {
        let first = first && self.keeps_versions();
        let mut err = None;
        if !first {
            let current = match Box::pin(self.storage.get(path, cancel)).await {
                Ok(bytes) => decode(bytes).await,
                Err(StorageError::NotFound(_)) => Err(missing()),
                Err(err) => return Err(err.into()),
            };
            match current {
                Ok(value) => return Ok(value),
                Err(e) if self.keeps_versions() && is_damage(&e) => err = Some(e),
                Err(e) => return Err(e),
            }
        }
        let all = Box::pin(self.storage.versions_of(path, cancel)).await?;
        let replaced = all.len() > 1;
        let mut versions: Vec<_> = all.into_iter().filter(|v| !v.delete_marker).collect();
        if let Some(oldest) = versions.pop() {
            versions.insert(0, oldest);
        }
        for version in &versions {
            let bytes = match self
                .storage
                .get_version(path, &version.version_id, cancel)
                .await
            {
                Ok(bytes) => bytes,
                Err(StorageError::NotFound(_)) => continue,
                Err(err) => return Err(err.into()),
            };
            match decode(bytes).await {
                Ok(value) => {
                    if err.is_some() || replaced {
                        tracing::warn!(
                            object = %path,
                            version = %version.version_id,
                            "the object was replaced or deleted after it was written; read the version that verifies"
                        );
                        self.overwritten.record(path);
                    }
                    return Ok(value);
                }
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        }
        Err(err.unwrap_or_else(missing))
    }

    /// Downloads, decodes and checks one chunk (decoding on the blocking pool).
    pub(crate) async fn read_chunk(
        &self,
        id: &str,
        raw_len: u32,
        cancel: &CancellationToken,
    ) -> Result<Bytes, RepoError> {
        let object = layout::chunk(id);
        let missing = || RepoError::Missing(object.to_string());
        self.read_verified(&object, false, missing, cancel, |stored| {
            let (repo, id) = (self.clone(), id.to_owned());
            async move {
                tokio::task::spawn_blocking(move || repo.decode_chunk(&id, raw_len, stored))
                    .await
                    .map_err(|e| RepoError::Io(std::io::Error::other(e)))?
            }
        })
        .await
    }
}

/// What removing every version of an object did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// At least one version is still locked (until the latest such date); the others went.
    Locked(SystemTime),
}

/// Removes an object for good. Without a lock that is a plain delete; with one, every version
/// and delete marker is removed, and a locked version is left in place and reported.
pub async fn remove_versions(
    repo: &Repository,
    path: &RemotePath,
    cancel: &CancellationToken,
) -> Result<Removal, RepoError> {
    if repo.config.object_lock.is_none() {
        repo.storage.delete(path, cancel).await?;
        return Ok(Removal::Removed);
    }
    let versions = repo.storage.versions_of(path, cancel).await?;
    remove_listed(repo, path, &versions.iter().collect::<Vec<_>>(), cancel).await
}

/// Removes the listed versions of one key: the data versions first, then, only if none of
/// them is still locked, the delete markers (removing a marker in front of a locked version
/// would bring a deleted object back).
async fn remove_listed(
    repo: &Repository,
    path: &RemotePath,
    versions: &[&ObjectVersion],
    cancel: &CancellationToken,
) -> Result<Removal, RepoError> {
    let period = repo
        .config
        .object_lock
        .filter(|_| layout::is_lockable(path))
        .map(|l| l.policy().period())
        .unwrap_or_default();
    let now = SystemTime::now();
    let mut locked: Option<SystemTime> = None;
    let (markers, data): (Vec<&ObjectVersion>, Vec<&ObjectVersion>) =
        versions.iter().partition(|v| v.delete_marker);
    for version in data {
        // Still inside the lock every object gets at its write: no request needed.
        let until = version.modified + period;
        let result = if until > now {
            Err(StorageError::Locked {
                path: path.clone(),
                until,
            })
        } else {
            repo.storage
                .delete_version(path, &version.version_id, cancel)
                .await
        };
        match result {
            Ok(()) => {}
            Err(StorageError::Locked { until, .. }) => {
                locked = Some(locked.map_or(until, |l| l.max(until)));
            }
            Err(err) => return Err(err.into()),
        }
    }
    if let Some(until) = locked {
        return Ok(Removal::Locked(until));
    }
    for marker in markers {
        repo.storage
            .delete_version(path, &marker.version_id, cancel)
            .await?;
    }
    Ok(Removal::Removed)
}

/// What [`purge_deleted`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeReport {
    /// Versions of deleted objects removed for good.
    pub versions_removed: usize,
    /// Deleted objects whose versions are still locked, left for a later run.
    pub locked: usize,
}

/// Removes the versions of deleted manifests and chunks (those whose current version is a
/// delete marker: sets removed by retention, chunks removed by GC) once their locks have
/// expired. Chunks in `referenced` are never touched, whatever their current version: a
/// referenced chunk with a delete marker was deleted by someone else, and its older versions
/// are what reads fall back to.
pub async fn purge_deleted(
    repo: &Repository,
    referenced: &HashSet<String>,
    cancel: &CancellationToken,
) -> Result<PurgeReport, RepoError> {
    let mut report = PurgeReport::default();
    // The unlocked prefixes too: every backup leaves its writer lock's version and delete
    // marker behind in a versioned bucket.
    let prefixes = [
        layout::CHUNKS,
        "manifests/",
        "wal/",
        layout::WRITER_LOCKS,
        layout::SWEEP_LOCKS,
        layout::GC_CONDEMNED,
        layout::PINS,
        layout::ATTEMPTS,
    ];
    for prefix in prefixes {
        let versions = repo.storage.versions(prefix, cancel).await?;
        for (path, versions) in by_key(&versions) {
            let deleted = versions.iter().any(|v| v.latest && v.delete_marker);
            if !deleted || (prefix == layout::CHUNKS && referenced.contains(path.file_name())) {
                continue;
            }
            let data = versions.iter().filter(|v| !v.delete_marker).count();
            match remove_listed(repo, path, &versions, cancel).await? {
                Removal::Removed => report.versions_removed += data,
                Removal::Locked(_) => report.locked += 1,
            }
        }
    }
    Ok(report)
}

/// `versions` (sorted by key, newest first) grouped by key.
pub(crate) fn by_key(versions: &[ObjectVersion]) -> Vec<(&RemotePath, Vec<&ObjectVersion>)> {
    let mut out: Vec<(&RemotePath, Vec<&ObjectVersion>)> = Vec::new();
    for version in versions {
        match out.last_mut() {
            Some((path, group)) if *path == &version.path => group.push(version),
            _ => out.push((&version.path, vec![version])),
        }
    }
    out
}

/// What [`extend_locks`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LockReport {
    /// Kept objects (the chunks kept manifests reference, the manifests kept sets need, keys,
    /// audit records, the config): one version each, the first (see [`extend_locks`]).
    pub kept_versions: usize,
    /// Of those, versions whose lock may end within the margin (by what this process knows).
    pub candidates: usize,
    /// Locks extended.
    pub extended: usize,
    /// Candidates whose lock, read from the bucket, was long enough already.
    pub already_locked: usize,
    /// Requests made to the bucket for locks (reads and extensions; listings not counted).
    pub requests: usize,
    /// Manifests the mark could not read (skipped: their chunks are not known).
    pub manifests_skipped: usize,
    /// Seconds since the Unix epoch until which every extended lock now runs.
    pub until: u64,
}

/// The lock dates this process has read or set, by (key, version): so that a version is read
/// from the bucket at most once per extension. Kept in memory only: an object in the bucket
/// could be forged by anyone with write access, and a forged date would exempt a version from
/// extension.
#[derive(Clone, Default)]
pub struct LockDates(Arc<Mutex<HashMap<(String, String), u64>>>);

impl LockDates {
    fn get(&self, v: &ObjectVersion) -> Option<u64> {
        let dates = self.0.lock().ok()?;
        dates
            .get(&(v.path.to_string(), v.version_id.clone()))
            .copied()
    }

    fn set(&self, v: &ObjectVersion, until: u64) {
        if let Ok(mut dates) = self.0.lock() {
            dates.insert((v.path.to_string(), v.version_id.clone()), until);
        }
    }
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The kept objects, one version each: the first data version of every chunk the mark
/// found referenced, of every component manifest it read, and of every set manifest, archived
/// WAL file and audit record whose current version is not a delete marker, every key not
/// revoked, and the config. The first version is the one this system wrote (chunks and
/// manifests are created once, create-only; a writer cannot predict the id of a manifest), so a
/// later version is someone else's and is not kept locked at the repository's expense.
async fn kept_versions(
    repo: &Repository,
    marked: &Marked,
    cancel: &CancellationToken,
) -> Result<Vec<ObjectVersion>, RepoError> {
    let revoked: HashSet<String> = repo
        .storage
        .versions(layout::REVOKED_KEYS, cancel)
        .await?
        .into_iter()
        .filter(|v| !v.delete_marker)
        .filter_map(|v| v.path.file_name().strip_suffix(".json").map(str::to_owned))
        .collect();
    let mut kept = Vec::new();
    let prefixes = [
        layout::CHUNKS,
        layout::COMPONENT_MANIFESTS,
        layout::SET_MANIFESTS,
        "wal/",
        layout::KEYS,
        layout::REVOKED_KEYS,
        layout::AUDIT,
        layout::KEYRING,
        layout::CONFIG,
    ];
    for prefix in prefixes {
        let versions = repo.storage.versions(prefix, cancel).await?;
        for (path, versions) in by_key(&versions) {
            if !layout::is_lockable(path) {
                continue;
            }
            let deleted = versions.iter().any(|v| v.latest && v.delete_marker);
            let name = path.file_name();
            let id = name.strip_suffix(".json").unwrap_or(name);
            let keep = match prefix {
                layout::CHUNKS => marked.chunks.contains(name),
                layout::COMPONENT_MANIFESTS => marked.components.contains(id) || !deleted,
                // A key is deleted when it is revoked; one deleted without its tombstone was
                // deleted by someone else and still opens the repository.
                layout::KEYS => !revoked.contains(id),
                layout::CONFIG => path.as_str() == layout::CONFIG,
                layout::REVOKED_KEYS | layout::AUDIT | layout::KEYRING => true,
                _ => !deleted,
            };
            if let Some(first) = versions.iter().rev().find(|v| !v.delete_marker)
                && keep
            {
                kept.push((*first).clone());
            }
        }
    }
    Ok(kept)
}

/// Extends the locks of everything kept backups need (see the module documentation): each
/// kept version whose lock may end within the lock's margin is read from the bucket and, if
/// it does, locked again for the lock's period from now. Never shortens a lock. What a version
/// was first locked for is taken from its stamp (the period, less `INITIAL_SLACK`); what this
/// process read or set since, from the repository's [`LockDates`].
pub async fn extend_locks(
    repo: &Repository,
    marked: &Marked,
    cancel: &CancellationToken,
) -> Result<LockReport, RepoError> {
    let lock: ObjectLock = repo.config.object_lock.ok_or_else(|| {
        RepoError::BadConfig("the repository has no object lock to extend".into())
    })?;
    let now = SystemTime::now();
    // Rounded up: every kept version ends up locked past `now + margin`, fractions included.
    let needed = epoch(now + lock.margin()) + 1;
    let target = now + lock.policy().period();
    let kept = kept_versions(repo, marked, cancel).await?;
    // A version's first lock runs `period` from the writer's clock when it sent the put; the
    // bucket stamps the version when it stored it, a little later (and on another clock), so
    // the estimate is taken `INITIAL_SLACK` short: a version near its date is read, not
    // assumed locked.
    let initial = |v: &ObjectVersion| {
        epoch(v.modified + lock.policy().period()).saturating_sub(INITIAL_SLACK.as_secs())
    };
    let dates = &repo.lock_dates;
    // Owned versions: a stream closure over borrowed ones is not `Send` for every lifetime.
    let candidates: Vec<ObjectVersion> = kept
        .iter()
        .filter(|v| dates.get(v).unwrap_or(0).max(initial(v)) < needed)
        .cloned()
        .collect();
    let mut report = LockReport {
        kept_versions: kept.len(),
        candidates: candidates.len(),
        manifests_skipped: marked.skipped,
        until: epoch(target),
        ..Default::default()
    };
    let mut results = futures::stream::iter(candidates)
        .map(|v| async move {
            let result = extend_one(repo, &v, lock, needed, target, cancel).await;
            (v, result)
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((version, result)) = results.next().await {
        let (until, extended) = result?;
        dates.set(&version, until);
        report.requests += 1 + usize::from(extended);
        if extended {
            report.extended += 1;
        } else {
            report.already_locked += 1;
        }
    }
    Ok(report)
}

/// Reads one version's lock and extends it to `target` unless it already runs past `needed`;
/// returns its date (seconds since the Unix epoch) and whether it was extended.
async fn extend_one(
    repo: &Repository,
    version: &ObjectVersion,
    lock: ObjectLock,
    needed: u64,
    target: SystemTime,
    cancel: &CancellationToken,
) -> Result<(u64, bool), RepoError> {
    let current = repo
        .storage
        .retention(&version.path, &version.version_id, cancel)
        .await?;
    if let Some(current) = current
        && epoch(current.until) >= needed
    {
        return Ok((epoch(current.until), false));
    }
    // A compliance lock stays compliance (the bucket refuses to weaken it).
    let mode = match current {
        Some(Retention { mode, .. }) if mode == crate::storage::LockMode::Compliance => mode,
        _ => lock.mode,
    };
    let until = current.map_or(target, |c| c.until.max(target));
    repo.storage
        .set_retention(
            &version.path,
            &version.version_id,
            Retention { mode, until },
            cancel,
        )
        .await?;
    Ok((epoch(until), true))
}
