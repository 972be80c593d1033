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

    /// A fresh backend object for the repository (a new prefix per call to `fresh_prefix`).
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

    /// Starts over with an empty repository location.
    pub fn fresh_prefix(&mut self) {
        self.prefix = format!("r{:08x}", rand::random::<u32>());
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
