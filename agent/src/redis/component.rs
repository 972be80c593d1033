//! Redis behind the component contract (see `crate::component`). The Redis client blocks, so
//! every phase runs on the blocking pool.

use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{backup, restore};
use crate::AgentConfig;
use crate::component::{self, RestoreRequest, RestoreTarget, Uploaded, blocking, json};
use crate::scratch::ScratchDir;

pub struct Redis {
    config: Arc<AgentConfig>,
}

impl Redis {
    pub fn new(config: Arc<AgentConfig>) -> Redis {
        Redis { config }
    }
}

impl component::Component for Redis {
    fn prepare<'a>(
        &'a self,
        _set_id: Option<&'a str>,
    ) -> BoxFuture<'a, anyhow::Result<Box<dyn component::Prepared>>> {
        let settings = self.config.redis.clone();
        Box::pin(async move {
            let prepared = blocking(move || backup::prepare(&settings)).await?;
            Ok(Box::new(Prepared(prepared)) as Box<dyn component::Prepared>)
        })
    }

    fn restore<'a>(
        &'a self,
        repo: &'a Repository,
        manifest: &'a ComponentManifest,
        request: RestoreRequest,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            // A restore test writes an offline dump.rdb into a directory of its own.
            let trial = request
                .trial
                .then(|| ScratchDir::create(&self.config.redis.state_dir, "trial"))
                .transpose()?;
            let (address, offline_dir) = match (&trial, request.target) {
                (Some(dir), _) => (None, Some(dir.path().to_owned())),
                (None, RestoreTarget::Own) => (None, None),
                (None, RestoreTarget::Server(address)) => (Some(address), None),
                (None, RestoreTarget::Directory(dir)) => (None, Some(dir)),
            };
            let options = restore::RestoreOptions {
                address,
                offline_dir,
                force: request.force || request.trial,
            };
            json(
                restore::restore(
                    repo,
                    manifest,
                    &self.config.redis,
                    &options,
                    progress,
                    cancel,
                )
                .await?,
            )
        })
    }

    fn recover(&self) -> BoxFuture<'_, ()> {
        Box::pin(restore::journal::recover_before_command(&self.config.redis))
    }

    /// Servers an interrupted restore left borrowed are given back in the background at start:
    /// the session does not wait for a server that cannot be reached.
    fn background(
        &self,
        _registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(restore::journal::recover_at_start(
            self.config.redis.clone(),
            shutdown,
        )))
    }
}

struct Prepared(backup::Prepared);

impl component::Prepared for Prepared {
    fn fence(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Prepared>>> {
        Box::pin(async move {
            let mut prepared = self.0;
            let prepared = blocking(move || {
                prepared.fence()?;
                Ok(prepared)
            })
            .await?;
            Ok(Box::new(Prepared(prepared)) as Box<dyn component::Prepared>)
        })
    }

    /// The wait happens on the thread that cuts, so the cut follows its own timer.
    fn cut(
        self: Box<Self>,
        when: Option<Instant>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Cut>>> {
        Box::pin(async move {
            let prepared = self.0;
            let cut = blocking(move || {
                if let Some(when) = when {
                    std::thread::sleep(when.saturating_duration_since(Instant::now()));
                }
                prepared.cut(false)
            })
            .await?;
            Ok(Box::new(Cut(cut)) as Box<dyn component::Cut>)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let mut prepared = self.0;
            if let Err(err) = blocking(move || prepared.unfence()).await {
                tracing::warn!(error = %format!("{err:#}"), "CLIENT UNPAUSE failed; the pause ends at its deadline");
            }
        })
    }
}

struct Cut(backup::Cut);

impl component::Cut for Cut {
    fn at(&self) -> Instant {
        self.0.at
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<component::Released>> {
        Box::pin(async move {
            let mut cut = self.0;
            blocking(move || {
                let pause = cut.release()?;
                Ok((Box::new(Cut(cut)) as Box<dyn component::Cut>, pause))
            })
            .await
        })
    }

    fn upload<'a>(
        self: Box<Self>,
        repo: &'a Repository,
        label: &'a Label,
        _full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        Box::pin(async move {
            let report = Box::pin(self.0.upload(repo, label, progress, cancel)).await?;
            Ok(Uploaded {
                manifest_id: report.manifest.clone(),
                report: json(report)?,
            })
        })
    }
}
