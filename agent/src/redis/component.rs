//! Redis behind the component contract (see `crate::component`). The Redis client blocks, so
//! the phases run on the blocking pool ([`OnBlockingPool`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{backup, restore};
use crate::AgentConfig;
use crate::component::{
    self, BlockingCut, BlockingPrepared, RestoreRequest, RestoreTarget, Uploaded, json,
    prepare_on_blocking_pool,
};
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
        prepare_on_blocking_pool(move || backup::prepare(&settings))
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
            component::refuse_database_selection("Redis", &request)?;
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

impl BlockingPrepared for backup::Prepared {
    type Cut = backup::Cut;

    fn fence(&mut self) -> anyhow::Result<()> {
        backup::Prepared::fence(self)
    }

    fn cut(self) -> anyhow::Result<backup::Cut> {
        backup::Prepared::cut(self, false)
    }

    fn abort(mut self) {
        if let Err(err) = self.unfence() {
            tracing::warn!(error = %format!("{err:#}"), "CLIENT UNPAUSE failed; the pause ends at its deadline");
        }
    }
}

impl BlockingCut for backup::Cut {
    fn at(&self) -> Instant {
        self.at
    }

    fn release(&mut self) -> anyhow::Result<Option<Duration>> {
        backup::Cut::release(self)
    }

    fn upload<'a>(
        self,
        repo: &'a Repository,
        label: &'a Label,
        _full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        Box::pin(async move {
            let report = Box::pin(backup::Cut::upload(self, repo, label, progress, cancel)).await?;
            Uploaded::new(&report.manifest, &report)
        })
    }
}
