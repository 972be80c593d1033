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
use crate::postgres;
use crate::redis;

/// Backs up the configured component; returns the report as JSON.
pub async fn backup(
    config: &AgentConfig,
    options: &BackupOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let repo = open(config, cancel).await?;
    let (name, progress) = (config.backup_name(), Arc::new(Progress::default()));
    Ok(match component(config)? {
        Component::Postgres => json(
            postgres::backup::backup(
                &repo,
                &config.postgres,
                &name,
                options.fenced,
                progress,
                cancel,
            )
            .await?,
        )?,
        Component::Redis => json(
            redis::backup::backup(
                &repo,
                &config.redis,
                &name,
                options.fenced,
                progress,
                cancel,
            )
            .await?,
        )?,
        Component::Ledger => json(
            ledger::backup::backup(
                &repo,
                &config.ledger,
                &name,
                options.full_scan,
                progress,
                cancel,
            )
            .await?,
        )?,
    })
}

/// Restores manifest `id` of the configured component, counting bytes into `progress`; returns
/// the report as JSON.
pub async fn restore(
    config: &AgentConfig,
    id: &str,
    options: RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let RestoreOptions {
        target,
        force,
        trial,
        postgres: pg_options,
    } = options;
    // A restore test goes to a scratch directory of its own, removed afterwards.
    let trial_dir = trial.then(|| TrialDir::create(config)).transpose()?;
    let kind = component(config)?;
    let target = match &trial_dir {
        // PostgreSQL's trial targets are databases under temporary names, not a directory.
        Some(dir) if kind != Component::Postgres => Some(dir.0.join("target")),
        _ => target,
    };
    let repo = open(config, cancel).await?;
    let manifest = repo
        .component(id, cancel)
        .await
        .with_context(|| format!("read backup {id}"))?;
    Ok(match kind {
        Component::Postgres => {
            if target.is_some() {
                bail!(
                    "--target names a directory (ledger); for PostgreSQL use --target-url, --database and --as"
                );
            }
            let options = postgres::restore::RestoreOptions {
                force,
                trial,
                ..pg_options
            };
            json(
                postgres::restore::restore(
                    &repo,
                    &manifest,
                    &config.postgres,
                    &options,
                    progress,
                    cancel,
                )
                .await?,
            )?
        }
        Component::Redis => {
            let options = redis::restore::RestoreOptions {
                address: pg_options.server_url,
                offline_dir: target,
                force: force || trial,
            };
            json(
                redis::restore::restore(
                    &repo,
                    &manifest,
                    &config.redis,
                    &options,
                    progress,
                    cancel,
                )
                .await?,
            )?
        }
        Component::Ledger => {
            let options = ledger::restore::RestoreOptions {
                target: target.unwrap_or_else(|| config.ledger.data_dir.clone()),
                force,
                chain_db: config.ledger.chain_db.clone(),
                height_query: config.ledger.height_query.clone(),
                source: format!("{} ({})", manifest.name, config.repository.effective_url()),
                // A trial restores into a directory of its own inside the scratch directory.
                protected: protected_dirs(config)
                    .into_iter()
                    .filter(|p| !trial || p.what == REPOSITORY)
                    .collect(),
            };
            json(ledger::restore::restore(&repo, &manifest, &options, progress, cancel).await?)?
        }
    })
}

const REPOSITORY: &str = "repository";

/// What a restore's target may neither hold nor lie inside: a `file://` repository and the
/// agent's own scratch and spool directories.
pub fn protected_dirs(config: &AgentConfig) -> Vec<crate::confined::Protected> {
    use crate::confined::Protected;
    let mut dirs = Vec::new();
    if let Some(path) = config.repository.effective_url().strip_prefix("file://") {
        dirs.push(Protected::new(REPOSITORY, path));
    }
    dirs.push(Protected::new(
        "ledger scratch directory",
        &config.ledger.scratch_dir,
    ));
    dirs.push(Protected::new(
        "postgres scratch directory",
        &config.postgres.scratch_dir,
    ));
    dirs.push(Protected::new(
        "WAL spool directory",
        config.postgres.wal_spool_dir(),
    ));
    dirs
}

fn component(config: &AgentConfig) -> anyhow::Result<Component> {
    config
        .component
        .context("no component configured (AITBC_BACKUP_COMPONENT)")
}

fn json(report: impl serde::Serialize) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(report)?)
}

/// The repository, for a command only the PostgreSQL component has.
async fn postgres_repository(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Repository> {
    if component(config)? != Component::Postgres {
        bail!("this command is for the postgres component (AITBC_BACKUP_COMPONENT=postgres)");
    }
    open(config, cancel).await
}

pub(crate) async fn open(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Repository> {
    aitbc_backup_repository::open::open_configured(&config.repository, cancel)
        .await
        .with_context(|| format!("open repository {}", config.repository.effective_url()))
}

/// What a one-shot backup may be asked for.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Ledger: read every file again instead of reusing unchanged ones.
    pub full_scan: bool,
    /// PostgreSQL (fence tables) and Redis (`CLIENT PAUSE WRITE`): hold writers for the cut.
    pub fenced: bool,
}

/// A scratch directory for a restore test, removed when dropped.
struct TrialDir(PathBuf);

impl TrialDir {
    fn create(config: &AgentConfig) -> anyhow::Result<TrialDir> {
        let dir = config
            .ledger
            .scratch_dir
            .join(format!("trial-{:016x}", rand::random::<u64>()));
        // `target` inside it: the restore's (empty) target directory.
        std::fs::create_dir_all(dir.join("target"))
            .with_context(|| format!("create the trial directory {}", dir.display()))?;
        Ok(TrialDir(dir))
    }
}

impl Drop for TrialDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a one-shot restore may be asked for.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Ledger: the directory to restore into; Redis: write `dump.rdb` there (offline).
    pub target: Option<PathBuf>,
    /// Replace a non-empty directory (ledger) or a database in use (PostgreSQL).
    pub force: bool,
    /// A restore test into scratch targets, removed afterwards (the live component untouched).
    pub trial: bool,
    /// PostgreSQL: server, database selection and name, globals; Redis: `server_url` is the
    /// `host:port` of another server.
    pub postgres: postgres::restore::RestoreOptions,
}

/// A one-shot command, owned so it can run as a spawned task.
pub enum Command {
    Backup(BackupOptions),
    Restore {
        manifest: String,
        options: RestoreOptions,
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
        config: &AgentConfig,
        cancel: &CancellationToken,
    ) -> anyhow::Result<serde_json::Value> {
        // Servers an interrupted restore left borrowed are given back first (one attempt each).
        if config.component == Some(Component::Redis) {
            redis::restore::journal::recover_before_command(&config.redis).await;
        }
        // Boxed: the pipelines' futures are deep enough to overflow the compiler's layout queries
        // in every caller.
        match self {
            Command::Backup(options) => Box::pin(backup(config, &options, cancel)).await,
            Command::Restore { manifest, options } => {
                let progress = Arc::new(Progress::default());
                Box::pin(restore(config, &manifest, options, progress, cancel)).await
            }
            Command::BaseBackup => {
                let repo = postgres_repository(config, cancel).await?;
                let label = aitbc_backup_repository::backup::Label::new(&format!(
                    "{}-base",
                    config.backup_name()
                ));
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
