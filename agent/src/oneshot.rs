//! One backup or restore of the configured component, run from the command line (no
//! coordinator): for first steps, scripted jobs and disaster recovery.

use std::path::PathBuf;
use std::sync::Arc;

use aitbc_backup_proto::model::Component;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::AgentConfig;
use crate::ledger;

/// Backs up the configured component; returns the report as JSON.
pub async fn backup(config: &AgentConfig, full_scan: bool) -> anyhow::Result<serde_json::Value> {
    let cancel = cancel_on_signal();
    let repo = open(config, &cancel).await?;
    match config.component {
        Some(Component::Ledger) => {
            let report = ledger::backup::backup(
                &repo,
                &config.ledger,
                &config.backup_name(),
                full_scan,
                Arc::new(Progress::default()),
                &cancel,
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
) -> anyhow::Result<serde_json::Value> {
    let cancel = cancel_on_signal();
    let repo = open(config, &cancel).await?;
    let manifest = repo
        .component(id, &cancel)
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
                &cancel,
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

/// How long a cancelled command may take to stop before the process exits anyway (a restore
/// only ever swaps complete, checked data in, so exiting is always safe).
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A token cancelled by SIGINT or SIGTERM, so an interrupted command stops cleanly; the process
/// exits with status 130 if it has not stopped within [`CANCEL_GRACE`].
fn cancel_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("interrupted; stopping");
        token.cancel();
        tokio::time::sleep(CANCEL_GRACE).await;
        eprintln!(
            "aitbc-backup-agent: did not stop within {CANCEL_GRACE:?} of the signal; exiting"
        );
        std::process::exit(130);
    });
    cancel
}
