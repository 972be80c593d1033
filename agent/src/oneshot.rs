//! One backup or restore of the configured component, run from the command line (no
//! coordinator): for first steps, scripted jobs and disaster recovery. A signal cancels the
//! token; a restore only ever swaps complete, checked data in, so stopping is always safe.

use std::path::PathBuf;
use std::sync::Arc;

use aitbc_backup_proto::model::Component;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::AgentConfig;
use crate::ledger;

/// Backs up the configured component; returns the report as JSON.
pub async fn backup(
    config: &AgentConfig,
    full_scan: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let repo = open(config, cancel).await?;
    match config.component {
        Some(Component::Ledger) => {
            let report = ledger::backup::backup(
                &repo,
                &config.ledger,
                &config.backup_name(),
                full_scan,
                Arc::new(Progress::default()),
                cancel,
            )
            .await?;
            Ok(serde_json::to_value(report)?)
        }
        other => bail!("backup of component {other:?} is not available yet"),
    }
}

/// Restores manifest `id` of the configured component; returns the report as JSON.
pub async fn restore(
    config: &AgentConfig,
    id: &str,
    target: Option<PathBuf>,
    force: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let repo = open(config, cancel).await?;
    let manifest = repo
        .component(id, cancel)
        .await
        .with_context(|| format!("read backup {id}"))?;
    match config.component {
        Some(Component::Ledger) => {
            let options = ledger::restore::RestoreOptions {
                target: target.unwrap_or_else(|| config.ledger.data_dir.clone()),
                force,
                chain_db: config.ledger.chain_db.clone(),
                height_query: config.ledger.height_query.clone(),
                source: format!("{} ({})", manifest.name, config.repository.effective_url()),
            };
            let report = ledger::restore::restore(
                &repo,
                &manifest,
                &options,
                Arc::new(Progress::default()),
                cancel,
            )
            .await?;
            Ok(serde_json::to_value(report)?)
        }
        other => bail!("restore of component {other:?} is not available yet"),
    }
}

async fn open(config: &AgentConfig, cancel: &CancellationToken) -> anyhow::Result<Repository> {
    aitbc_backup_repository::open::open_configured(&config.repository, cancel)
        .await
        .with_context(|| format!("open repository {}", config.repository.effective_url()))
}

/// A one-shot command, owned so it can run as a spawned task.
pub enum Command {
    Backup {
        full_scan: bool,
    },
    Restore {
        manifest: String,
        target: Option<PathBuf>,
        force: bool,
    },
}

impl Command {
    /// Runs the command; returns its JSON report.
    pub async fn execute(
        self,
        config: &AgentConfig,
        cancel: &CancellationToken,
    ) -> anyhow::Result<serde_json::Value> {
        // Boxed: the pipelines' futures are deep enough to overflow the compiler's layout queries
        // in every caller.
        match self {
            Command::Backup { full_scan } => Box::pin(backup(config, full_scan, cancel)).await,
            Command::Restore {
                manifest,
                target,
                force,
            } => Box::pin(restore(config, &manifest, target, force, cancel)).await,
        }
    }
}
