//! `aitbc-backup-agent`: parse flags, load config, then either run the sidecar until SIGTERM
//! (no subcommand) or run one backup or restore of the configured component and exit.

use std::path::PathBuf;

use std::sync::Arc;

use aitbc_backup_agent::component::{RestoreRequest, RestoreTarget};
use aitbc_backup_agent::{Agent, AgentConfig, config, oneshot};
use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "aitbc-backup-agent",
    version,
    about = "The aitbc-backup sidecar agent"
)]
struct Args {
    /// TOML config file; every key can also be set by AITBC_BACKUP_<SECTION>__<KEY>.
    #[arg(long, env = "AITBC_BACKUP_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Back up the configured component once, straight to the repository, and print a report.
    Backup {
        /// Ledger: read every file again instead of reusing unchanged ones from the last backup.
        #[arg(long)]
        full_scan: bool,
        /// Hold writers for an exact cut: PostgreSQL locks postgres.fence_tables, Redis runs
        /// CLIENT PAUSE WRITE, the ledger BEGIN IMMEDIATE on each database; at most the
        /// component's fence_max_pause.
        #[arg(long)]
        fenced: bool,
    },
    /// Restore a backup (a component manifest id) of the configured component.
    Restore {
        manifest: String,
        /// Ledger: the directory to restore into (default the configured data directory);
        /// Redis: write dump.rdb into this directory of a stopped server instead.
        #[arg(long)]
        target: Option<PathBuf>,
        /// Replace a non-empty directory (ledger), a database other sessions use, terminating
        /// them (PostgreSQL), or an existing dump.rdb (Redis, offline).
        #[arg(long)]
        force: bool,
        /// Restore into another server: PostgreSQL libpq URL (no password), Redis host:port.
        #[arg(long)]
        target_url: Option<String>,
        /// PostgreSQL: restore only this database of the backup.
        #[arg(long)]
        database: Option<String>,
        /// PostgreSQL: restore under this name (with --database when the backup has several).
        #[arg(long = "as", value_name = "NAME")]
        rename: Option<String>,
        /// PostgreSQL: create the backup's roles and tablespaces first (an empty server).
        #[arg(long)]
        globals: bool,
        /// A restore test: restore into scratch targets (databases under temporary names, a
        /// scratch directory, an offline dump.rdb), verify, remove them; nothing live changes.
        #[arg(long, conflicts_with_all = ["target", "target_url", "rename", "force"])]
        trial: bool,
    },
    /// PostgreSQL: take a physical base backup (pg_basebackup) into the repository; with the
    /// archived WAL it is the start of point-in-time restores.
    BaseBackup,
    /// PostgreSQL: archive the server's WAL into the repository until SIGTERM (the sidecar does
    /// this itself when postgres.wal.archive is on).
    WalArchive,
    /// PostgreSQL: restore a base backup plus archived WAL into a new data directory, recovered
    /// to a snapshot set's restore point, a time, an LSN, or the latest archived WAL.
    PitrRestore {
        /// The data directory to create (absent or empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// Recover to this snapshot set's restore point (its PostgreSQL cut).
        #[arg(long, group = "pitr_target")]
        to_set: Option<String>,
        /// Recover the transactions committed before this time (RFC 3339).
        #[arg(long, group = "pitr_target")]
        to_time: Option<chrono::DateTime<chrono::Utc>>,
        /// Recover the WAL up to this LSN (X/Y).
        #[arg(long, group = "pitr_target")]
        to_lsn: Option<String>,
        /// Recover everything archived (the default).
        #[arg(long, group = "pitr_target")]
        latest: bool,
        /// Start from this base backup (default: the newest that ends before the target).
        #[arg(long)]
        base: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aitbc-backup-agent: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    aitbc_backup_tls::install_crypto_provider();
    let Some(config) = aitbc_backup_config::load_for_main(
        args.config.as_deref(),
        &config::SCHEMA,
        AgentConfig::validate,
        args.check_config,
    )?
    else {
        return Ok(());
    };
    aitbc_backup_telemetry::init_tracing(&config.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let run = match args.command {
        None => return runtime.block_on(serve(config)),
        Some(Command::BaseBackup) => oneshot::Command::BaseBackup,
        Some(Command::WalArchive) => oneshot::Command::WalArchive,
        Some(Command::PitrRestore {
            data_dir,
            to_set,
            to_time,
            to_lsn,
            latest: _,
            base,
        }) => {
            use aitbc_backup_agent::postgres::pitr::TargetSpec;
            let target = match (to_set, to_time, to_lsn) {
                (Some(set), _, _) => TargetSpec::Set(set),
                (_, Some(at), _) => TargetSpec::Time(at),
                (_, _, Some(lsn)) => {
                    TargetSpec::Lsn(aitbc_backup_repository::wal::parse_lsn(&lsn).with_context(
                        || format!("--to-lsn `{lsn}` is not an LSN like 0/3000028"),
                    )?)
                }
                _ => TargetSpec::Latest,
            };
            oneshot::Command::PitrRestore {
                data_dir,
                target,
                base,
            }
        }
        Some(Command::Backup { full_scan, fenced }) => {
            oneshot::Command::Backup(oneshot::BackupOptions { full_scan, fenced })
        }
        Some(Command::Restore {
            manifest,
            target,
            force,
            target_url,
            database,
            rename,
            globals,
            trial,
        }) => oneshot::Command::Restore {
            manifest,
            request: RestoreRequest {
                target: RestoreTarget::from_parts(target, target_url)?,
                force,
                trial,
                database,
                rename,
                globals,
            },
        },
    };
    let grace = config.shutdown_grace;
    runtime.block_on(aitbc_backup_telemetry::run_until_signal(
        move |cancel| async move {
            let report = Box::pin(run.execute(&Arc::new(config), &cancel)).await?;
            println!("{report:#}");
            Ok(())
        },
        grace,
    ))
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    let agent = Agent::bind(config).await?;
    aitbc_backup_telemetry::run_until_signal(|shutdown| agent.run(shutdown), grace).await
}
