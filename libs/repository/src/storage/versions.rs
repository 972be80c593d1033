//! Object versions and S3 Object Lock: what an immutable repository needs from its bucket.
//!
//! Only the S3 backend keeps versions; the local directory has none, so a repository with an
//! object lock is S3 only (`init` refuses anything else). Three uses:
//! - every put of a [lockable](crate::layout::is_lockable) object carries a retention (mode and
//!   retain-until date), set once by the repository from its recorded lock ([`LockPolicy`]);
//! - reads fall back to older versions of an object whose current version does not verify
//!   ([`Storage::versions_of`], [`Storage::get_version`]);
//! - a read-only view of the bucket as it was at a time ([`Storage::as_of`]): listings and reads
//!   pick, per key, the newest version written at or before that time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Backend, ObjectMeta, Storage, StorageError};
use crate::path::RemotePath;

/// S3 Object Lock retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Removable before its date only by a credential holding `s3:BypassGovernanceRetention`.
    Governance,
    /// Removable by nobody, the bucket owner included, until its date.
    Compliance,
}

impl std::fmt::Display for LockMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        })
    }
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            _ => Err(format!("`{text}`: expected governance or compliance")),
        }
    }
}

/// One object version's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub mode: LockMode,
    pub until: SystemTime,
}

/// The lock every new lockable object gets: `mode` for `days` from its write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockPolicy {
    pub mode: LockMode,
    pub days: u32,
}

impl LockPolicy {
    pub fn period(&self) -> Duration {
        Duration::from_secs(u64::from(self.days) * 24 * 3600)
    }

    /// The retention of an object written now.
    pub fn retention_from(&self, now: SystemTime) -> Retention {
        Retention {
            mode: self.mode,
            until: now + self.period(),
        }
    }
}

/// One version of one key (or a delete marker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    pub path: RemotePath,
    pub version_id: String,
    pub modified: SystemTime,
    pub size: u64,
    /// The key's current version (what a plain read returns).
    pub latest: bool,
    /// A delete marker: the key reads as missing while this is its latest version.
    pub delete_marker: bool,
}

/// What a bucket offers for immutability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketLockStatus {
    pub versioning: bool,
    pub object_lock: bool,
}

/// The read-only view of [`Storage::as_of`]: the version chosen for each key read so far.
pub(super) struct AsOf {
    pub(super) time: SystemTime,
    chosen: Mutex<HashMap<String, Option<String>>>,
}

impl AsOf {
    fn remember(&self, key: &str, version: Option<String>) {
        if let Ok(mut chosen) = self.chosen.lock() {
            chosen.insert(key.to_owned(), version);
        }
    }

    fn recall(&self, key: &str) -> Option<Option<String>> {
        self.chosen.lock().ok()?.get(key).cloned()
    }
}

/// Of `versions` (any order, one key or many), each key's newest version written at or before
/// `time` that is not a delete marker; newest first within a key.
fn as_of_choice(versions: &[ObjectVersion], time: SystemTime) -> Vec<&ObjectVersion> {
    let mut newest: HashMap<&RemotePath, &ObjectVersion> = HashMap::new();
    for version in versions.iter().filter(|v| v.modified <= time) {
        let slot = newest.entry(&version.path).or_insert(version);
        // Stamps have a second's resolution: of two in the same second, the current one wins.
        if (version.modified, version.latest) > (slot.modified, slot.latest) {
            *slot = version;
        }
    }
    let mut chosen: Vec<&ObjectVersion> =
        newest.into_values().filter(|v| !v.delete_marker).collect();
    chosen.sort_by(|a, b| a.path.cmp(&b.path));
    chosen
}

fn read_only(op: &'static str, path: &str, time: SystemTime) -> StorageError {
    StorageError::Permanent {
        op,
        path: path.to_owned(),
        message: format!(
            "the repository is open as of {} (read-only)",
            chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339()
        ),
    }
}

impl Storage {
    /// This storage writing every lockable object under `policy`'s lock.
    pub fn with_lock(mut self, policy: Option<LockPolicy>) -> Self {
        self.lock = policy;
        self
    }

    pub fn lock(&self) -> Option<LockPolicy> {
        self.lock
    }

    /// A read-only view of this storage as it was at `time` (S3 with versioning only).
    pub fn as_of(mut self, time: SystemTime) -> Self {
        self.as_of = Some(Arc::new(AsOf {
            time,
            chosen: Mutex::new(HashMap::new()),
        }));
        self
    }

    /// The time of an [`as_of`](Storage::as_of) view.
    pub fn as_of_time(&self) -> Option<SystemTime> {
        self.as_of.as_ref().map(|a| a.time)
    }

    pub(super) fn refuse_in_as_of(&self, op: &'static str, path: &str) -> Result<(), StorageError> {
        match &self.as_of {
            Some(as_of) => Err(read_only(op, path, as_of.time)),
            None => Ok(()),
        }
    }

    fn s3(&self, op: &'static str, path: &str) -> Result<&super::S3Storage, StorageError> {
        self.backend.s3().ok_or_else(|| StorageError::Permanent {
            op,
            path: path.to_owned(),
            message: format!(
                "{} keeps no object versions (an S3 bucket with versioning does)",
                self.describe()
            ),
        })
    }

    /// Whether the bucket has versioning and Object Lock enabled.
    pub async fn bucket_lock_status(
        &self,
        cancel: &CancellationToken,
    ) -> Result<BucketLockStatus, StorageError> {
        let s3 = self.s3("bucket lock status", "")?;
        self.call("bucket lock status", "", false, cancel, || s3.lock_status())
            .await
    }

    /// Every version and delete marker of every key under `prefix`, sorted by key, newest first
    /// within a key. In an as-of view, only versions written at or before its time.
    pub async fn versions(
        &self,
        prefix: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<ObjectVersion>, StorageError> {
        let s3 = self.s3("list versions", prefix)?;
        let mut versions = self
            .call("list versions", prefix, false, cancel, || {
                s3.versions(prefix)
            })
            .await?;
        if let Some(as_of) = &self.as_of {
            versions.retain(|v| v.modified <= as_of.time);
        }
        // Newest first; of versions stamped in the same second, the current one first.
        versions.sort_by(|a, b| {
            (a.path.cmp(&b.path))
                .then(b.modified.cmp(&a.modified))
                .then(b.latest.cmp(&a.latest))
        });
        Ok(versions)
    }

    /// The versions of one key, newest first.
    pub async fn versions_of(
        &self,
        path: &RemotePath,
        cancel: &CancellationToken,
    ) -> Result<Vec<ObjectVersion>, StorageError> {
        let mut versions = self.versions(path.as_str(), cancel).await?;
        versions.retain(|v| &v.path == path);
        Ok(versions)
    }

    pub async fn get_version(
        &self,
        path: &RemotePath,
        version_id: &str,
        cancel: &CancellationToken,
    ) -> Result<Bytes, StorageError> {
        let s3 = self.s3("get", path.as_str())?;
        self.call("get", path.as_str(), false, cancel, || {
            s3.get_version(path, version_id)
        })
        .await
    }

    /// Removes one version for good; a locked version is refused by the bucket
    /// ([`StorageError::Locked`]).
    pub async fn delete_version(
        &self,
        path: &RemotePath,
        version_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StorageError> {
        self.refuse_in_as_of("delete", path.as_str())?;
        let s3 = self.s3("delete", path.as_str())?;
        let result = self
            .call("delete", path.as_str(), true, cancel, || {
                s3.delete_version(path, version_id)
            })
            .await;
        match result {
            Err(StorageError::Permanent { ref message, .. }) if message.starts_with("403 ") => {
                match self.retention(path, version_id, cancel).await {
                    Ok(Some(retention)) if retention.until > SystemTime::now() => {
                        Err(StorageError::Locked {
                            path: path.clone(),
                            until: retention.until,
                        })
                    }
                    _ => result,
                }
            }
            Err(StorageError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    /// The lock of one version, if it has one.
    pub async fn retention(
        &self,
        path: &RemotePath,
        version_id: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Retention>, StorageError> {
        let s3 = self.s3("get retention", path.as_str())?;
        self.call("get retention", path.as_str(), false, cancel, || {
            s3.retention(path, version_id)
        })
        .await
    }

    /// Sets one version's lock. The bucket refuses to shorten a lock (either mode, without a
    /// governance bypass nobody here asks for).
    pub async fn set_retention(
        &self,
        path: &RemotePath,
        version_id: &str,
        retention: Retention,
        cancel: &CancellationToken,
    ) -> Result<(), StorageError> {
        self.refuse_in_as_of("set retention", path.as_str())?;
        let s3 = self.s3("set retention", path.as_str())?;
        self.call("set retention", path.as_str(), true, cancel, || {
            s3.set_retention(path, version_id, retention)
        })
        .await
    }

    /// `list` of an as-of view.
    pub(super) async fn list_as_of(
        &self,
        as_of: &AsOf,
        prefix: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        let versions = self.versions(prefix, cancel).await?;
        Ok(as_of_choice(&versions, as_of.time)
            .into_iter()
            .map(|v| {
                as_of.remember(v.path.as_str(), Some(v.version_id.clone()));
                ObjectMeta {
                    path: v.path.clone(),
                    size: v.size,
                    modified: v.modified,
                    server_side_encryption: None,
                }
            })
            .collect())
    }

    /// The version an as-of view reads for `path`, None when the key did not exist then.
    async fn chosen_version(
        &self,
        as_of: &AsOf,
        path: &RemotePath,
        cancel: &CancellationToken,
    ) -> Result<Option<ObjectVersion>, StorageError> {
        let versions = self.versions_of(path, cancel).await?;
        let chosen = as_of_choice(&versions, as_of.time)
            .first()
            .map(|v| (*v).clone());
        as_of.remember(path.as_str(), chosen.as_ref().map(|v| v.version_id.clone()));
        Ok(chosen)
    }

    /// `get` of an as-of view.
    pub(super) async fn get_as_of(
        &self,
        as_of: &AsOf,
        path: &RemotePath,
        cancel: &CancellationToken,
    ) -> Result<Bytes, StorageError> {
        let version = match as_of.recall(path.as_str()) {
            Some(version) => version,
            None => self
                .chosen_version(as_of, path, cancel)
                .await?
                .map(|v| v.version_id),
        };
        match version {
            Some(id) => self.get_version(path, &id, cancel).await,
            None => Err(StorageError::NotFound(path.clone())),
        }
    }

    /// `head` of an as-of view.
    pub(super) async fn head_as_of(
        &self,
        as_of: &AsOf,
        path: &RemotePath,
        cancel: &CancellationToken,
    ) -> Result<ObjectMeta, StorageError> {
        match self.chosen_version(as_of, path, cancel).await? {
            Some(v) => Ok(ObjectMeta {
                path: v.path,
                size: v.size,
                modified: v.modified,
                server_side_encryption: None,
            }),
            None => Err(StorageError::NotFound(path.clone())),
        }
    }
}

impl Backend {
    /// The S3 backend underneath, if this is one.
    fn s3(&self) -> Option<&super::S3Storage> {
        match self {
            Backend::S3(s3) => Some(s3),
            Backend::Local(_) => None,
            Backend::Faulty(faulty) => faulty.inner().s3(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(key: &str, id: &str, at: u64, marker: bool) -> ObjectVersion {
        ObjectVersion {
            path: RemotePath::new(key).expect("a valid key"),
            version_id: id.into(),
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            size: 1,
            latest: false,
            delete_marker: marker,
        }
    }

    #[test]
    fn as_of_picks_the_newest_version_at_the_time() {
        let versions = vec![
            version("a", "a1", 10, false),
            version("a", "a2", 20, false),
            version("a", "a3", 30, true),
            version("b", "b1", 25, false),
            version("c", "c1", 5, false),
            version("c", "c2", 15, true),
        ];
        let at = |t| {
            as_of_choice(&versions, SystemTime::UNIX_EPOCH + Duration::from_secs(t))
                .into_iter()
                .map(|v| v.version_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(at(4), Vec::<String>::new());
        assert_eq!(at(12), vec!["a1", "c1"]);
        assert_eq!(at(20), vec!["a2"], "c was deleted at 15");
        assert_eq!(at(26), vec!["a2", "b1"]);
        assert_eq!(at(31), vec!["b1"], "a was deleted at 30");
    }
}
