//! One backup or restore of the configured component, run from the command line (no
//! coordinator): for first steps, scripted jobs and disaster recovery. A signal cancels the
//! token; a restore only ever swaps complete, checked data in, so stopping is always safe.

use std::path::PathBuf;
use std::sync::Arc;

use aitbc_backup_proto::model::Component as Kind;
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::AgentConfig;
use crate::component::{self, RestoreRequest, json};
use crate::postgres;
use crate::scratch::protected_dirs;

/// The repository, for a command only the PostgreSQL component has.
async fn postgres_repository(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Repository> {
    if config.component != Some(Kind::Postgres) {
        bail!("this command is for the postgres component (AITBC_BACKUP_COMPONENT=postgres)");
    }
    component::open_repository(config, cancel).await
}

/// What a one-shot backup may be asked for.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Ledger: read every file again instead of reusing unchanged ones.
    pub full_scan: bool,
    /// Hold writers for the cut (PostgreSQL's fence tables, Redis `CLIENT PAUSE WRITE`,
    /// SQLite `BEGIN IMMEDIATE`).
    pub fenced: bool,
}

/// A one-shot command, owned so it can run as a spawned task.
pub enum Command {
    Backup(BackupOptions),
    Restore {
        manifest: String,
        request: RestoreRequest,
    },
    /// PostgreSQL: a physical base backup.
    BaseBackup,
    /// PostgreSQL: archive WAL until cancelled.
    WalArchive,
    /// PostgreSQL: point-in-time restore into a new data directory.
    PitrRestore {
        data_dir: PathBuf,
        target: postgres::pitr::TargetSpec,
        base: Option<String>,
    },
}

impl Command {
    /// Runs the command; returns its JSON report.
    pub async fn execute(
        self,
        config: &Arc<AgentConfig>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<serde_json::Value> {
        let component = component::of(config)?;
        // What an interrupted restore left borrowed is given back first (one attempt).
        component.recover().await;
        // Boxed: the pipelines' futures are deep enough to overflow the compiler's layout queries
        // in every caller.
        match self {
            Command::Backup(options) => {
                let repo = component::open_repository(config, cancel).await?;
                Box::pin(component::backup(
                    component.as_ref(),
                    &repo,
                    &Label::new(&config.backup_name()),
                    options.fenced,
                    options.full_scan,
                    Arc::new(Progress::default()),
                    cancel,
                ))
                .await
            }
            Command::Restore { manifest, request } => {
                let repo = component::open_repository(config, cancel).await?;
                Box::pin(component::restore(
                    component.as_ref(),
                    &repo,
                    &manifest,
                    request,
                    Arc::new(Progress::default()),
                    cancel,
                ))
                .await
            }
            Command::BaseBackup => {
                let repo = postgres_repository(config, cancel).await?;
                let label = Label::new(&format!("{}-base", config.backup_name()));
                json(
                    Box::pin(postgres::base_backup::base_backup(
                        &repo,
                        &config.postgres,
                        &label,
                        Arc::default(),
                        cancel,
                    ))
                    .await?,
                )
            }
            Command::WalArchive => {
                let repo = postgres_repository(config, cancel).await?;
                let metrics = crate::metrics::WalMetrics::default();
                Box::pin(postgres::wal_archive::run(
                    &config.postgres,
                    repo,
                    metrics.clone(),
                    cancel.clone(),
                ))
                .await?;
                Ok(serde_json::json!({
                    "archived_segments": metrics.archived_segments.get(),
                    "gaps": metrics.gaps.get(),
                }))
            }
            Command::PitrRestore {
                data_dir,
                target,
                base,
            } => {
                let repo = postgres_repository(config, cancel).await?;
                let target = Box::pin(target.resolve(&repo, cancel)).await?;
                json(
                    Box::pin(postgres::pitr::restore(
                        &repo,
                        &config.postgres,
                        &target,
                        base.as_deref(),
                        &data_dir,
                        &protected_dirs(config),
                        Arc::default(),
                        cancel,
                    ))
                    .await?,
                )
            }
        }
    }
}
