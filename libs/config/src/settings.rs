//! Config sections shared by several binaries, and the value types they use.
//!
//! The old scripts' variables land here: `S3_BUCKET_PREFIX` and `COMPRESSION_LEVEL` in
//! [`RepositorySettings`], `BACKUP_RETENTION_DAYS` in [`RetentionSettings`], `BACKUP_SCHEDULE`
//! as the default policy's [`CronSchedule`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{ConfigError, LegacyVar, Secret};

pub const DEFAULT_REPOSITORY_URL: &str = "file:///var/lib/aitbc-backup/repository";
pub const DEFAULT_BUCKET_PREFIX: &str = "aitbc-backups";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
pub const DEFAULT_SCHEDULE: &str = "0 2 * * *";

/// The old scripts' repository variables.
pub const REPOSITORY_LEGACY_VARS: &[LegacyVar] = &[
    LegacyVar {
        env: "S3_BUCKET_PREFIX",
        key: "repository.bucket_prefix",
    },
    LegacyVar {
        env: "COMPRESSION_LEVEL",
        key: "repository.compression_level",
    },
];

/// Where backups are stored and how data is compressed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositorySettings {
    /// `file:///path` or `s3://bucket/prefix`. `s3://` alone means the old scripts' bucket,
    /// `<bucket_prefix>-<namespace>`.
    pub url: String,
    /// `S3_BUCKET_PREFIX` of the old scripts.
    pub bucket_prefix: String,
    /// The Kubernetes namespace, the old scripts' bucket suffix.
    pub namespace: String,
    /// zstd level, 1 (fast) to 19 (small); `COMPRESSION_LEVEL` of the old scripts.
    pub compression_level: i32,
    /// Encryption passphrase; a secret: environment only (`AITBC_BACKUP_REPOSITORY__PASSPHRASE`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<Secret>,
    /// A sealed repository's credential (`aitbc-backup repo keys issue`): an agent's writer
    /// credential, which writes its component's backups and reads none, or the coordinator's
    /// metadata credential, which reads manifests and no data. A secret: environment only
    /// (`AITBC_BACKUP_REPOSITORY__CREDENTIAL`). Use it or `passphrase`, not both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<Secret>,
    /// S3 endpoint URL for S3-compatible servers; empty means AWS.
    pub s3_endpoint: String,
    /// S3 region; empty means the AWS configuration's, else us-east-1.
    pub s3_region: String,
    /// Path-style S3 addressing (most S3-compatible servers need it).
    pub s3_path_style: bool,
    /// Server-side encryption: empty, `AES256`, `aws:kms` or `aws:kms:<key-id>`.
    pub s3_sse: String,
    /// Chunks uploaded at once.
    pub upload_concurrency: usize,
    /// Chunks downloaded at once; 0: the backend's own (4 for a local directory, 16 for S3).
    pub download_concurrency: usize,
    /// Smooth upload throughput limit in bytes per second (0: unlimited), so a backup never
    /// saturates the pod's link.
    pub limit_upload_bytes_per_sec: u64,
    /// The S3 Object Lock the repository must have been initialized with
    /// (`aitbc-backup repo init --object-lock MODE --lock-days DAYS`); a daemon refuses to
    /// open a repository without it, so no writer is ever pointed at unlocked storage.
    pub object_lock: Option<ObjectLockSettings>,
}

/// `[repository.object_lock]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectLockSettings {
    /// `governance` or `compliance`.
    pub mode: String,
    /// Days every object stays locked (the repository's recorded lock must be at least this).
    pub days: u32,
}

pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 8;
pub const DEFAULT_DOWNLOAD_CONCURRENCY: usize = 0;

/// Keys of [`RepositorySettings`] that are secrets, as dotted paths under `repository`.
pub const REPOSITORY_SECRETS: &[&str] = &["repository.passphrase", "repository.credential"];

/// zstd levels a repository writes at.
const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// A component's own zstd level: one of the repository's levels, or 0 for the repository's.
pub fn check_component_level(key: &str, level: i32) -> Result<(), ConfigError> {
    if level == 0 || LEVELS.contains(&level) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{level} is not 1..=19 (or 0 for the repository's level)"),
        ))
    }
}

impl Default for RepositorySettings {
    fn default() -> Self {
        RepositorySettings {
            url: DEFAULT_REPOSITORY_URL.to_owned(),
            bucket_prefix: DEFAULT_BUCKET_PREFIX.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            passphrase: None,
            credential: None,
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_path_style: false,
            s3_sse: String::new(),
            limit_upload_bytes_per_sec: 0,
            upload_concurrency: DEFAULT_UPLOAD_CONCURRENCY,
            download_concurrency: DEFAULT_DOWNLOAD_CONCURRENCY,
            object_lock: None,
        }
    }
}

impl RepositorySettings {
    /// The repository URL with the old scripts' bucket filled in for a bare `s3://`.
    pub fn effective_url(&self) -> String {
        match self.url.as_str() {
            "s3://" | "s3:" => format!("s3://{}-{}", self.bucket_prefix, self.namespace),
            url => url.to_owned(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !LEVELS.contains(&self.compression_level) {
            return Err(ConfigError::invalid(
                "repository.compression_level",
                format!("{} is out of range 1..=19", self.compression_level),
            ));
        }
        let bucket_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !bucket_ok(&self.bucket_prefix) || self.bucket_prefix.len() > 40 {
            return Err(ConfigError::invalid(
                "repository.bucket_prefix",
                format!(
                    "`{}` is not a valid bucket name prefix (a-z, 0-9, -; at most 40 characters)",
                    self.bucket_prefix
                ),
            ));
        }
        if !bucket_ok(&self.namespace) {
            return Err(ConfigError::invalid(
                "repository.namespace",
                format!(
                    "`{}` is not a valid Kubernetes namespace name",
                    self.namespace
                ),
            ));
        }
        if !(1..=64).contains(&self.upload_concurrency) {
            return Err(ConfigError::invalid(
                "repository.upload_concurrency",
                format!("{} is out of range 1..=64", self.upload_concurrency),
            ));
        }
        if self.download_concurrency > 64 {
            return Err(ConfigError::invalid(
                "repository.download_concurrency",
                format!(
                    "{} is out of range 0..=64 (0: the backend's own)",
                    self.download_concurrency
                ),
            ));
        }
        let url = self.effective_url();
        let scheme_ok = url
            .strip_prefix("file://")
            .map(|path| path.starts_with('/'))
            .or_else(|| url.strip_prefix("s3://").map(|rest| !rest.is_empty()))
            .unwrap_or(false);
        if !scheme_ok {
            return Err(ConfigError::invalid(
                "repository.url",
                format!("`{url}` is neither file:///absolute/path nor s3://bucket[/prefix]"),
            ));
        }
        if let Some(lock) = &self.object_lock {
            if !["governance", "compliance"].contains(&lock.mode.as_str()) {
                return Err(ConfigError::invalid(
                    "repository.object_lock.mode",
                    format!("`{}` is neither governance nor compliance", lock.mode),
                ));
            }
            if !(1..=36500).contains(&lock.days) {
                return Err(ConfigError::invalid(
                    "repository.object_lock.days",
                    format!("{} is out of range 1..=36500", lock.days),
                ));
            }
            if !url.starts_with("s3://") {
                return Err(ConfigError::invalid(
                    "repository.object_lock",
                    format!(
                        "`{url}` is not an S3 bucket: only S3 Object Lock keeps objects locked"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// How long backups are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Sets older than this many days are removed; `BACKUP_RETENTION_DAYS` of the old scripts.
    pub days: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            days: DEFAULT_RETENTION_DAYS,
        }
    }
}

impl RetentionSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.days == 0 {
            return Err(ConfigError::invalid("retention.days", "must be at least 1"));
        }
        Ok(())
    }
}

/// A standard five-field cron expression (minute hour day-of-month month day-of-week), UTC; a
/// sixth, leading field of seconds is accepted for fast schedules.
#[derive(Debug, Clone, PartialEq)]
pub struct CronSchedule {
    text: String,
    schedule: cron::Schedule,
}

impl CronSchedule {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The next firing strictly after `after`.
    pub fn next_after(
        &self,
        after: &chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.schedule.after(after).next()
    }
}

impl FromStr for CronSchedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let fields = text.split_whitespace().count();
        // Five fields as in crontab; six with a leading seconds field (fast schedules).
        let full = match fields {
            5 => format!("0 {text}"),
            6 => text.to_owned(),
            _ => {
                return Err(format!(
                    "`{text}` has {fields} fields; expected 5 (minute hour day-of-month month day-of-week), or 6 with seconds first"
                ));
            }
        };
        let schedule = cron::Schedule::from_str(&full)
            .map_err(|err| format!("`{text}` is not a valid cron expression: {err}"))?;
        Ok(CronSchedule {
            text: text.to_owned(),
            schedule,
        })
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for CronSchedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for CronSchedule {
    fn default() -> Self {
        DEFAULT_SCHEDULE
            .parse()
            .unwrap_or_else(|err| panic!("default schedule: {err}"))
    }
}
