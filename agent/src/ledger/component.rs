//! The ledger behind the component contract (see `crate::component`). SQLite blocks, so the
//! phases run on the blocking pool ([`OnBlockingPool`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{backup, restore};
use crate::AgentConfig;
use crate::component::{
    self, BlockingCut, BlockingPrepared, RestoreRequest, RestoreTarget, Uploaded, json,
    prepare_on_blocking_pool,
};
use crate::scratch::{REPOSITORY, ScratchDir, protected_dirs};

pub struct Ledger {
    config: Arc<AgentConfig>,
}

impl Ledger {
    pub fn new(config: Arc<AgentConfig>) -> Ledger {
        Ledger { config }
    }
}

impl component::Component for Ledger {
    fn prepare<'a>(
        &'a self,
        _set_id: Option<&'a str>,
    ) -> BoxFuture<'a, anyhow::Result<Box<dyn component::Prepared>>> {
        let settings = self.config.ledger.clone();
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
            component::refuse_database_selection("ledger", &request)?;
            let config = &self.config;
            // A restore test goes to an empty directory inside a scratch directory of its own,
            // removed afterwards.
            let trial = request
                .trial
                .then(|| ScratchDir::create(&config.ledger.scratch_dir, "trial"))
                .transpose()?;
            let target = match (&trial, request.target) {
                (Some(dir), _) => {
                    let target = dir.path().join("target");
                    std::fs::create_dir(&target)
                        .with_context(|| format!("create {}", target.display()))?;
                    target
                }
                (None, RestoreTarget::Own) => config.ledger.data_dir.clone(),
                (None, RestoreTarget::Directory(dir)) => dir,
                (None, RestoreTarget::Server(url)) => bail!(
                    "the ledger restores into a directory (--target DIR), not a server ({url})"
                ),
            };
            let options = restore::RestoreOptions {
                target,
                force: request.force,
                chain_db: config.ledger.chain_db.clone(),
                height_query: config.ledger.height_query.clone(),
                source: format!("{} ({})", manifest.name, config.repository.effective_url()),
                // A trial restores inside the scratch directory: only the repository is kept
                // apart from it.
                protected: protected_dirs(config)
                    .into_iter()
                    .filter(|p| trial.is_none() || p.what == REPOSITORY)
                    .collect(),
            };
            json(restore::restore(repo, manifest, &options, progress, cancel).await?)
        })
    }
}

impl BlockingPrepared for backup::Prepared {
    type Cut = backup::Cut;

    fn fence(&mut self) -> anyhow::Result<()> {
        backup::Prepared::fence(self)
    }

    fn cut(self) -> anyhow::Result<backup::Cut> {
        backup::Prepared::cut(self)
    }

    /// Dropping the fences rolls their transactions back: writers go.
    fn abort(self) {}
}

impl BlockingCut for backup::Cut {
    fn at(&self) -> Instant {
        self.at
    }

    fn release(&mut self) -> anyhow::Result<Option<Duration>> {
        Ok(backup::Cut::release(self))
    }

    fn upload<'a>(
        self,
        repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        Box::pin(async move {
            let report = Box::pin(backup::Cut::upload(
                self, repo, label, full_scan, progress, cancel,
            ))
            .await?;
            Uploaded::new(&report.manifest, &report)
        })
    }
}
