//! PostgreSQL behind the component contract (see `crate::component`).

use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::bail;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{cut, restore};
use crate::AgentConfig;
use crate::component::{self, RestoreRequest, RestoreTarget, Uploaded, json};

pub struct Postgres {
    config: Arc<AgentConfig>,
}

impl Postgres {
    pub fn new(config: Arc<AgentConfig>) -> Postgres {
        Postgres { config }
    }
}

/// The restore point a set's cut writes when WAL is archived.
pub fn restore_point_name(set_id: &str) -> String {
    format!("aitbc-set-{set_id}")
}

impl component::Component for Postgres {
    fn prepare<'a>(
        &'a self,
        set_id: Option<&'a str>,
    ) -> BoxFuture<'a, anyhow::Result<Box<dyn component::Prepared>>> {
        Box::pin(async move {
            let mut prepared = cut::prepare(&self.config.postgres).await?;
            if let Some(set_id) = set_id.filter(|_| self.config.postgres.wal.archive) {
                prepared = prepared
                    .with_restore_point(restore_point_name(set_id))
                    .await?;
            }
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
            let server_url = match request.target {
                RestoreTarget::Own => None,
                // A trial restores into databases under temporary names on the own server.
                RestoreTarget::Server(_) if request.trial => None,
                RestoreTarget::Server(url) => Some(url),
                RestoreTarget::Directory(_) => bail!(
                    "--target names a directory (ledger); for PostgreSQL use --target-url, --database and --as"
                ),
            };
            let options = restore::RestoreOptions {
                server_url,
                database: request.database,
                rename: request.rename,
                force: request.force,
                globals: request.globals,
                trial: request.trial,
            };
            json(
                restore::restore(
                    repo,
                    manifest,
                    &self.config.postgres,
                    &options,
                    progress,
                    cancel,
                )
                .await?,
            )
        })
    }

    /// WAL archiving, when configured: it needs no coordinator and lives as long as the agent.
    fn background(
        &self,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        if !self.config.postgres.wal.archive {
            return None;
        }
        let metrics = crate::metrics::WalMetrics::default();
        metrics.register(registry);
        let config = self.config.clone();
        Some(Box::pin(async move {
            // Only starting can fail (the repository or the spool unreachable): retried.
            let backoff = config.reconnect.backoff();
            for attempt in 0.. {
                let archived = async {
                    let repo = component::open_repository(&config, &shutdown).await?;
                    Box::pin(super::wal_archive::run(
                        &config.postgres,
                        repo,
                        metrics.clone(),
                        shutdown.clone(),
                    ))
                    .await
                };
                let Err(err) = archived.await else { return };
                let delay = backoff.delay(attempt);
                tracing::error!(error = %format!("{err:#}"), retry_in = ?delay, "WAL archiving could not start");
                if !aitbc_backup_backoff::sleep_or_cancel(delay, &shutdown).await {
                    return;
                }
            }
        }))
    }
}

struct Prepared(cut::Prepared);

impl component::Prepared for Prepared {
    fn fence(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Prepared>>> {
        Box::pin(async move {
            let mut prepared = self.0;
            prepared.fence().await?;
            Ok(Box::new(Prepared(prepared)) as Box<dyn component::Prepared>)
        })
    }

    fn cut(
        self: Box<Self>,
        when: Option<Instant>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Cut>>> {
        Box::pin(async move {
            if let Some(when) = when {
                tokio::time::sleep_until(when.into()).await;
            }
            let cut = self.0.cut(false).await?;
            Ok(Box::new(Cut(cut)) as Box<dyn component::Cut>)
        })
    }

    /// Dropping the fence's connections ends their transactions: writers go.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { drop(self) })
    }
}

struct Cut(cut::Cut);

impl component::Cut for Cut {
    fn at(&self) -> Instant {
        self.0.at
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<component::Released>> {
        Box::pin(async move {
            let mut cut = self.0;
            let pause = match cut.fence.take() {
                Some(fence) => Some(fence.release().await),
                None => None,
            };
            Ok((Box::new(Cut(cut)) as Box<dyn component::Cut>, pause))
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
            Uploaded::new(&report.manifest, &report)
        })
    }
}
