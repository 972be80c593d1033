//! Versions and Object Lock on S3 (see [`crate::storage::versions`]).

use std::time::SystemTime;

use aws_sdk_s3::types::{
    BucketVersioningStatus, ObjectLockEnabled, ObjectLockMode, ObjectLockRetention,
    ObjectLockRetentionMode,
};
use aws_smithy_types::DateTime;
use bytes::Bytes;

use super::{S3Storage, classify, classify_str};
use crate::path::RemotePath;
use crate::storage::{BucketLockStatus, LockMode, ObjectVersion, Retention, StorageError};

pub(super) fn put_mode(mode: LockMode) -> ObjectLockMode {
    match mode {
        LockMode::Governance => ObjectLockMode::Governance,
        LockMode::Compliance => ObjectLockMode::Compliance,
    }
}

pub(super) fn date(time: SystemTime) -> DateTime {
    DateTime::from(time)
}

fn time(date: Option<&DateTime>) -> SystemTime {
    date.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl S3Storage {
    pub(crate) async fn lock_status(&self) -> Result<BucketLockStatus, StorageError> {
        let bucket = &self.settings.bucket;
        let versioning = self
            .client
            .get_bucket_versioning()
            .bucket(bucket)
            .send()
            .await
            .map_err(|err| classify_str("get bucket versioning", bucket, err))?;
        let object_lock = match self
            .client
            .get_object_lock_configuration()
            .bucket(bucket)
            .send()
            .await
        {
            Ok(out) => {
                out.object_lock_configuration()
                    .and_then(|c| c.object_lock_enabled())
                    == Some(&ObjectLockEnabled::Enabled)
            }
            // A bucket without Object Lock answers 404 ObjectLockConfigurationNotFoundError.
            Err(err) => match classify_str("get object lock configuration", bucket, err) {
                StorageError::Permanent { message, .. } if message.starts_with("404 ") => false,
                other => return Err(other),
            },
        };
        Ok(BucketLockStatus {
            versioning: versioning.status() == Some(&BucketVersioningStatus::Enabled),
            object_lock,
        })
    }

    pub(crate) async fn versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, StorageError> {
        let full_prefix = self.key(prefix);
        let strip = if self.settings.prefix.is_empty() {
            0
        } else {
            self.settings.prefix.len() + 1
        };
        let relative = |key: Option<&str>| {
            key.and_then(|k| k.get(strip..))
                .and_then(|k| RemotePath::new(k).ok())
        };
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.settings.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|err| classify_str("list versions", prefix, err))?;
            for v in page.versions() {
                let Some(path) = relative(v.key()) else {
                    continue;
                };
                out.push(ObjectVersion {
                    path,
                    version_id: v.version_id().unwrap_or("null").to_owned(),
                    modified: time(v.last_modified()),
                    size: v.size().unwrap_or(0).max(0) as u64,
                    latest: v.is_latest().unwrap_or(false),
                    delete_marker: false,
                });
            }
            for m in page.delete_markers() {
                let Some(path) = relative(m.key()) else {
                    continue;
                };
                out.push(ObjectVersion {
                    path,
                    version_id: m.version_id().unwrap_or("null").to_owned(),
                    modified: time(m.last_modified()),
                    size: 0,
                    latest: m.is_latest().unwrap_or(false),
                    delete_marker: true,
                });
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() && version_marker.is_none() {
                return Ok(out);
            }
        }
    }

    pub(crate) async fn get_version(
        &self,
        path: &RemotePath,
        version_id: &str,
    ) -> Result<Bytes, StorageError> {
        self.get_object(path, Some(version_id)).await
    }

    pub(crate) async fn delete_version(
        &self,
        path: &RemotePath,
        version_id: &str,
    ) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(self.key(path.as_str()))
            .version_id(version_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|err| classify("delete", path, err))
    }

    pub(crate) async fn retention(
        &self,
        path: &RemotePath,
        version_id: &str,
    ) -> Result<Option<Retention>, StorageError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.settings.bucket)
            .key(self.key(path.as_str()))
            .version_id(version_id)
            .send()
            .await
            .map_err(|err| classify("head", path, err))?;
        let mode = match head.object_lock_mode() {
            Some(ObjectLockMode::Governance) => LockMode::Governance,
            Some(ObjectLockMode::Compliance) => LockMode::Compliance,
            _ => return Ok(None),
        };
        Ok(head.object_lock_retain_until_date().map(|until| Retention {
            mode,
            until: time(Some(until)),
        }))
    }

    pub(crate) async fn set_retention(
        &self,
        path: &RemotePath,
        version_id: &str,
        retention: Retention,
    ) -> Result<(), StorageError> {
        let mode = match retention.mode {
            LockMode::Governance => ObjectLockRetentionMode::Governance,
            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
        };
        self.client
            .put_object_retention()
            .bucket(&self.settings.bucket)
            .key(self.key(path.as_str()))
            .version_id(version_id)
            .retention(
                ObjectLockRetention::builder()
                    .mode(mode)
                    .retain_until_date(date(retention.until))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|err| classify("set retention", path, err))
    }
}
