//! A fault-injecting wrapper for tests: fails a share of requests the way real object stores do
//! (5xx before or after the work was done, timeouts, connection resets), or every request with a
//! permanent error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::{Backend, ObjectMeta, PutMode, Retention, StorageError};
use crate::path::RemotePath;

#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Share of requests that fail transiently, 0.0 to 1.0.
    pub failure_rate: f64,
    /// How long an injected "timeout" hangs (set above the storage request timeout).
    pub hang: Duration,
    /// Fail every request with this permanent error message (e.g. "403 AccessDenied").
    pub permanent: Option<String>,
    /// Refuse every delete as a bucket policy without `s3:DeleteObject` would (the agents'
    /// least-privilege credentials).
    pub deny_deletes: bool,
}

pub struct FaultyStorage {
    inner: Backend,
    config: FaultConfig,
    injected: AtomicU64,
}

enum Fault {
    ErrorBefore,
    ErrorAfter,
    Hang,
    Reset,
}

impl FaultyStorage {
    pub fn new(inner: Backend, config: FaultConfig) -> Self {
        FaultyStorage {
            inner,
            config,
            injected: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &Backend {
        &self.inner
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn pick(&self, op: &'static str, path: &str) -> Result<Option<Fault>, StorageError> {
        if let Some(message) = &self.config.permanent {
            return Err(StorageError::Permanent {
                op,
                path: path.to_owned(),
                message: message.clone(),
            });
        }
        if rand::random::<f64>() >= self.config.failure_rate {
            return Ok(None);
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Ok(Some(match rand::random::<u8>() % 4 {
            0 => Fault::ErrorBefore,
            1 => Fault::ErrorAfter,
            2 => Fault::Hang,
            _ => Fault::Reset,
        }))
    }

    async fn run<T>(
        &self,
        op: &'static str,
        path: &str,
        work: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let transient = |message: &str| StorageError::Transient {
            op,
            path: path.to_owned(),
            message: message.to_owned(),
        };
        match self.pick(op, path)? {
            None => work.await,
            Some(Fault::ErrorBefore) => Err(transient("injected 503 SlowDown")),
            Some(Fault::Reset) => Err(transient("injected connection reset by peer")),
            Some(Fault::ErrorAfter) => {
                // The request took effect but its response was lost.
                let _ = work.await;
                Err(transient(
                    "injected 500 InternalError after the request took effect",
                ))
            }
            Some(Fault::Hang) => {
                tokio::time::sleep(self.config.hang).await;
                Err(transient("injected hang"))
            }
        }
    }

    pub async fn put(
        &self,
        path: &RemotePath,
        body: Bytes,
        mode: PutMode,
        retention: Option<Retention>,
    ) -> Result<(), StorageError> {
        self.run(
            "put",
            path.as_str(),
            Box::pin(self.inner.put(path, body, mode, retention)),
        )
        .await
    }

    pub async fn get(&self, path: &RemotePath) -> Result<Bytes, StorageError> {
        self.run("get", path.as_str(), Box::pin(self.inner.get(path)))
            .await
    }

    pub async fn head(&self, path: &RemotePath) -> Result<ObjectMeta, StorageError> {
        self.run("head", path.as_str(), Box::pin(self.inner.head(path)))
            .await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.run("list", prefix, Box::pin(self.inner.list(prefix)))
            .await
    }

    pub async fn delete(&self, path: &RemotePath) -> Result<(), StorageError> {
        if self.config.deny_deletes {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StorageError::Permanent {
                op: "delete",
                path: path.as_str().to_owned(),
                message: "403 AccessDenied: this credential may not delete".to_owned(),
            });
        }
        self.run("delete", path.as_str(), Box::pin(self.inner.delete(path)))
            .await
    }
}
