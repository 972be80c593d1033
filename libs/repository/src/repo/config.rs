//! The `config` object: what a repository is (format, chunker, encryption and its scheme,
//! Object Lock),
//! written once by `init` and read, where the bucket keeps versions, from its first version.

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{REPOSITORY_FORMAT, REPOSITORY_VERSION};
use crate::chunker::ChunkerParams;
use crate::error::RepoError;
use crate::layout;
use crate::storage::{LockMode, LockPolicy, Storage, StorageError};

/// The `config` object: plaintext, created once by `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub created: String,
    pub chunker: ChunkerParams,
    pub encrypted: bool,
    /// S3 Object Lock of every chunk, manifest and key object (see [`crate::immutable`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
    /// Sealed repositories (version 3, see [`crate::sealed`]): the root public key (Ed25519,
    /// hex) every keyring object is signed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_public: Option<String>,
}

/// A repository's Object Lock, recorded by `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectLock {
    pub mode: LockMode,
    /// Every object is locked this long from its write, and kept objects again from each
    /// extension.
    pub days: u32,
    /// A kept object's lock is extended once less than this is left (seconds); the
    /// coordinator extends at least twice within it.
    pub margin_secs: u64,
}

impl ObjectLock {
    pub fn policy(&self) -> LockPolicy {
        LockPolicy {
            mode: self.mode,
            days: self.days,
        }
    }

    pub fn margin(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.margin_secs)
    }

    /// A lock of `days` with the default margin: a quarter of the period, at most 7 days.
    pub fn new(mode: LockMode, days: u32) -> ObjectLock {
        let quarter = u64::from(days) * 24 * 3600 / 4;
        ObjectLock {
            mode,
            days,
            margin_secs: quarter.min(7 * 24 * 3600),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.days == 0 || self.days > 36500 {
            return Err(format!("{} days is not 1..=36500", self.days));
        }
        // At least an hour: the coordinator extends four times within the margin, at most
        // once a minute.
        if self.margin_secs < 3600 || self.margin_secs >= u64::from(self.days) * 24 * 3600 {
            return Err(format!(
                "the margin ({} s) must be at least an hour and less than the lock period ({} days)",
                self.margin_secs, self.days
            ));
        }
        Ok(())
    }
}

/// `storage` writing under the Object Lock its repository records, for tools that write
/// without opening the repository (key management). Unchanged where there is no repository
/// (the tool reports that itself) or no lock.
pub async fn with_recorded_lock(
    storage: Storage,
    cancel: &CancellationToken,
) -> Result<Storage, RepoError> {
    match read_config(&storage, cancel).await {
        Ok(config) => Ok(storage.with_lock(config.object_lock.map(|l| l.policy()))),
        Err(RepoError::NotInitialized(_)) => Ok(storage),
        Err(err) => Err(err),
    }
}

/// The versions of the `config` object, newest first; none where the backend keeps no
/// versions (a local directory, an S3 server without ListObjectVersions).
pub(crate) async fn config_versions(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Vec<crate::storage::ObjectVersion> {
    Box::pin(storage.versions_of(&layout::config(), cancel))
        .await
        .unwrap_or_default()
}

/// Reads the repository config. `init` creates it once, create-only, so where the bucket
/// keeps versions the first version is the config and any later one (or a delete marker) was
/// put by someone else: the first is used, with a warning. So a writer cannot unlock, weaken
/// or remove a repository's lock, or change its chunker, by replacing the config.
pub(crate) async fn read_config(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<RepoConfig, RepoError> {
    let versions = config_versions(storage, cancel).await;
    let data: Vec<_> = versions.iter().filter(|v| !v.delete_marker).collect();
    let bytes = match data.last() {
        Some(first) if versions.len() > 1 => {
            tracing::warn!(
                versions = versions.len(),
                version = %first.version_id,
                "the repository config was replaced or deleted after init; its first version is used"
            );
            Box::pin(storage.get_version(&layout::config(), &first.version_id, cancel)).await?
        }
        _ => match Box::pin(storage.get(&layout::config(), cancel)).await {
            Ok(bytes) => bytes,
            Err(StorageError::NotFound(_)) => {
                return Err(RepoError::NotInitialized(storage.describe()));
            }
            Err(err) => return Err(err.into()),
        },
    };
    let config: RepoConfig =
        serde_json::from_slice(&bytes).map_err(|e| RepoError::BadConfig(e.to_string()))?;
    if config.format != REPOSITORY_FORMAT {
        return Err(RepoError::BadConfig(format!(
            "unknown format `{}`",
            config.format
        )));
    }
    if config.version > REPOSITORY_VERSION {
        return Err(RepoError::BadConfig(format!(
            "format version {} is newer than this program (supports {REPOSITORY_VERSION})",
            config.version
        )));
    }
    config.chunker.validate().map_err(RepoError::BadConfig)?;
    Ok(config)
}
