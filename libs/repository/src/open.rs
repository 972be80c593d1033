//! From a repository URL to a [`Storage`]: `file:///path` or `s3://bucket[/prefix]`.

use std::time::Duration;

use crate::storage::{
    Backend, LocalStorage, S3Settings, S3Storage, ServerSideEncryption, Storage, StorageError,
    StorageLimits,
};

/// Options that apply to S3 URLs.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub sse: Option<ServerSideEncryption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    Local(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl RepoUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`{url}`: a file URL needs an absolute path, file:///path"
                ));
            }
            return Ok(RepoUrl::Local(path.into()));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !bucket_ok {
                return Err(format!("`{url}`: `{bucket}` is not a valid bucket name"));
            }
            let prefix = prefix.trim_matches('/').to_owned();
            if !prefix.is_empty() && crate::path::RemotePath::new(prefix.clone()).is_err() {
                return Err(format!("`{url}`: invalid prefix `{prefix}`"));
            }
            return Ok(RepoUrl::S3 {
                bucket: bucket.to_owned(),
                prefix,
            });
        }
        Err(format!(
            "`{url}` is neither file:///path nor s3://bucket[/prefix]"
        ))
    }
}

/// Parses an `--sse` value: `AES256`, `aws:kms` or `aws:kms:<key-id>`.
pub fn parse_sse(text: &str) -> Result<ServerSideEncryption, String> {
    match text {
        "AES256" => Ok(ServerSideEncryption::Aes256),
        "aws:kms" => Ok(ServerSideEncryption::Kms { key_id: None }),
        other => match other.strip_prefix("aws:kms:") {
            Some(key) if !key.is_empty() => Ok(ServerSideEncryption::Kms {
                key_id: Some(key.to_owned()),
            }),
            _ => Err(format!(
                "`{text}`: expected AES256, aws:kms or aws:kms:<key-id>"
            )),
        },
    }
}

/// Opens the storage behind `url`.
pub async fn open_storage(
    url: &RepoUrl,
    s3: &S3Options,
    limits: StorageLimits,
) -> Result<Storage, StorageError> {
    let backend = match url {
        RepoUrl::Local(path) => Backend::Local(LocalStorage::new(path.clone())?),
        RepoUrl::S3 { bucket, prefix } => {
            let mut settings = S3Settings::new(bucket.clone(), prefix.clone());
            settings.endpoint = s3.endpoint.clone();
            settings.region = s3.region.clone();
            settings.path_style = s3.path_style;
            settings.sse = s3.sse.clone();
            Backend::S3(S3Storage::new(settings).await)
        }
    };
    Ok(Storage::new(backend, limits))
}

/// Opens the repository a daemon's `[repository]` config section names.
pub async fn open_configured(
    settings: &aitbc_backup_config::settings::RepositorySettings,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<crate::Repository, crate::RepoError> {
    let bad = |key: &str, e: String| crate::RepoError::BadConfig(format!("repository.{key}: {e}"));
    let url = RepoUrl::parse(&settings.effective_url()).map_err(|e| bad("url", e))?;
    let sse = Some(settings.s3_sse.as_str())
        .filter(|s| !s.is_empty())
        .map(parse_sse)
        .transpose()
        .map_err(|e| bad("s3_sse", e))?;
    let non_empty = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    let s3 = S3Options {
        endpoint: non_empty(&settings.s3_endpoint),
        region: non_empty(&settings.s3_region),
        path_style: settings.s3_path_style,
        sse,
    };
    let storage = open_storage(&url, &s3, StorageLimits::default()).await?;
    let secret = settings
        .passphrase
        .as_ref()
        .map(|p| crate::KeySecret::Passphrase(p.expose().to_owned()));
    let credential = settings
        .credential
        .as_ref()
        .map(|c| crate::sealed::credential::Credential::parse(c.expose()))
        .transpose()
        .map_err(|e| bad("credential", e))?;
    let opener = match (&secret, &credential) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "credential",
                "set repository.credential or repository.passphrase, not both".into(),
            ));
        }
        (Some(secret), None) => Some(crate::repo::Opener::Key(secret)),
        (None, Some(credential)) => Some(crate::repo::Opener::Credential(credential)),
        (None, None) => None,
    };
    let repo = Box::pin(crate::Repository::open_as(storage, opener, cancel)).await?;
    if let Some(expected) = &settings.object_lock {
        check_recorded_lock(&repo, expected)?;
    }
    Ok(repo.with_settings(crate::RepoSettings {
        compression_level: settings.compression_level,
        upload_concurrency: settings.upload_concurrency.max(1),
        download_concurrency: settings.download_concurrency,
        limit_upload_bytes_per_sec: Some(settings.limit_upload_bytes_per_sec)
            .filter(|&limit| limit > 0),
    }))
}

/// Refuses a repository whose recorded Object Lock is missing or weaker than configured.
fn check_recorded_lock(
    repo: &crate::Repository,
    expected: &aitbc_backup_config::settings::ObjectLockSettings,
) -> Result<(), crate::RepoError> {
    let recorded = repo.config().object_lock;
    let matches = recorded
        .is_some_and(|lock| lock.mode.to_string() == expected.mode && lock.days >= expected.days);
    if matches {
        return Ok(());
    }
    Err(crate::RepoError::BadConfig(format!(
        "repository.object_lock: {} lock of {} days is configured, but the repository at {} \
         records {}; a repository gets its lock at `aitbc-backup repo init --object-lock`",
        expected.mode,
        expected.days,
        repo.storage().describe(),
        match recorded {
            Some(lock) => format!("a {} lock of {} days", lock.mode, lock.days),
            None => "none".to_owned(),
        }
    )))
}

/// Default per-request timeout: generous for 4 MiB chunks on slow links.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            RepoUrl::parse("file:///var/x"),
            Ok(RepoUrl::Local("/var/x".into()))
        );
        assert_eq!(
            RepoUrl::parse("s3://aitbc-backups-prod/cluster-a/"),
            Ok(RepoUrl::S3 {
                bucket: "aitbc-backups-prod".into(),
                prefix: "cluster-a".into()
            })
        );
        assert!(RepoUrl::parse("file://relative").is_err());
        assert!(RepoUrl::parse("s3://UPPER").is_err());
        assert!(RepoUrl::parse("s3://bucket/../x").is_err());
        assert!(RepoUrl::parse("ftp://x").is_err());
        assert_eq!(
            parse_sse("aws:kms:k1"),
            Ok(ServerSideEncryption::Kms {
                key_id: Some("k1".into())
            })
        );
        assert!(parse_sse("des").is_err());
    }
}
