//! Repositories on every backend the tests cover: a local directory and s3s-fs (and moto for
//! server-side encryption), as library objects for in-process tests.

use aitbc_backup_repository::storage::{
    Backend, FaultConfig, FaultyStorage, LocalStorage, S3Settings, S3Storage,
};
use aitbc_backup_repository::{Storage, StorageLimits};

use crate::s3::S3Server;

/// Which backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Local,
    S3sFs,
}

pub const KINDS: [Kind; 2] = [Kind::Local, Kind::S3sFs];

/// A backend with whatever keeps it alive (temp dir, server process).
pub struct TestBackend {
    pub kind: Kind,
    pub server: Option<S3Server>,
    pub dir: tempfile::TempDir,
    prefix: String,
}

impl TestBackend {
    pub fn start(kind: Kind) -> TestBackend {
        let dir = crate::temp_dir("repo");
        let server = (kind == Kind::S3sFs).then(S3Server::s3s_fs);
        TestBackend {
            kind,
            server,
            dir,
            prefix: format!("r{:08x}", rand::random::<u32>()),
        }
    }

    /// A backend object for this test's repository location.
    pub async fn backend(&self) -> Backend {
        match &self.server {
            None => Backend::Local(
                LocalStorage::new(self.dir.path().join(&self.prefix)).expect("local storage"),
            ),
            Some(server) => Backend::S3(S3Storage::new(self.s3_settings(server)).await),
        }
    }

    pub fn s3_settings(&self, server: &S3Server) -> S3Settings {
        let mut settings = S3Settings::new(server.bucket.clone(), self.prefix.clone());
        settings.endpoint = Some(server.endpoint());
        settings.path_style = true;
        settings.region = Some(crate::s3::REGION.to_owned());
        settings.static_credentials = Some((server.access_key.clone(), server.secret_key.clone()));
        settings
    }

    pub async fn storage(&self) -> Storage {
        Storage::new(self.backend().await, test_limits())
    }

    /// The same storage behind a fault injector.
    pub async fn faulty(&self, config: FaultConfig) -> Storage {
        Storage::new(
            Backend::Faulty(Box::new(FaultyStorage::new(self.backend().await, config))),
            test_limits(),
        )
    }
}

/// Short timeouts and quick retries so fault tests finish fast.
pub fn test_limits() -> StorageLimits {
    StorageLimits {
        request_timeout: std::time::Duration::from_secs(5),
        max_attempts: 10,
        backoff: aitbc_backup_backoff::Backoff::new(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_millis(200),
        ),
        ..StorageLimits::default()
    }
}

use std::sync::Arc;

use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{BackupRequest, ChunkerParams, Progress, RepoError, Repository};
use tokio_util::sync::CancellationToken;

/// A new unencrypted repository with the default chunker.
pub async fn init_repo(storage: Storage) -> Repository {
    Repository::init(
        storage,
        ChunkerParams::default(),
        None,
        &CancellationToken::new(),
    )
    .await
    .expect("init repository")
}

/// Backs up an in-memory buffer.
pub async fn backup_bytes(
    repo: &Repository,
    data: Vec<u8>,
    name: &str,
) -> Result<ComponentManifest, RepoError> {
    let request = BackupRequest {
        name: name.to_owned(),
        stream: "raw".to_owned(),
        ..Default::default()
    };
    aitbc_backup_repository::backup(
        repo,
        std::io::Cursor::new(data),
        request,
        Arc::new(Progress::default()),
        &CancellationToken::new(),
    )
    .await
}

/// Restores a manifest into memory.
pub async fn restore_bytes(
    repo: &Repository,
    manifest: &ComponentManifest,
) -> Result<Vec<u8>, RepoError> {
    let mut out = Vec::new();
    aitbc_backup_repository::restore(
        repo,
        manifest,
        &mut out,
        Arc::new(Progress::default()),
        &CancellationToken::new(),
    )
    .await?;
    Ok(out)
}

/// Number of chunk objects stored.
pub async fn chunk_count(repo: &Repository) -> usize {
    repo.storage()
        .list(
            aitbc_backup_repository::layout::CHUNKS,
            &CancellationToken::new(),
        )
        .await
        .expect("list chunks")
        .len()
}

/// Damages a stored (unencrypted) manifest file as a flipped bit on disk would: one byte of its
/// body's `created` changes, so the envelope's checksum no longer matches.
pub fn damage_manifest(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).expect("read manifest");
    let needle = br#""created":""#;
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("a created field in the manifest body")
        + needle.len();
    bytes[at] ^= 1;
    std::fs::write(path, bytes).expect("write manifest");
}
