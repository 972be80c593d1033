//! The ledger behind the component contract (see `crate::component`). SQLite blocks, so every
//! phase runs on the blocking pool.

use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{backup, restore};
use crate::AgentConfig;
use crate::component::{self, RestoreRequest, RestoreTarget, Uploaded, blocking, json};
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
                prepared.cut()
            })
            .await?;
            Ok(Box::new(Cut(cut)) as Box<dyn component::Cut>)
        })
    }

    /// Dropping the fences rolls their transactions back: writers go.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
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
                let pause = cut.release();
                Ok((Box::new(Cut(cut)) as Box<dyn component::Cut>, pause))
            })
            .await
        })
    }

    fn upload<'a>(
        self: Box<Self>,
        repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        Box::pin(async move {
            let report = Box::pin(self.0.upload(repo, label, full_scan, progress, cancel)).await?;
            Ok(Uploaded {
                manifest_id: report.manifest.clone(),
                report: json(report)?,
            })
        })
    }
}
