//! `aitbc-backup-coordinator`: parse flags, load config, serve until SIGTERM, drain.

use std::path::PathBuf;

use aitbc_backup_coordinator::{Coordinator, CoordinatorConfig, config};
use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "aitbc-backup-coordinator",
    version,
    about = "The aitbc-backup coordinator"
)]
struct Args {
    /// TOML config file; every key can also be set by AITBC_BACKUP_<SECTION>__<KEY>.
    #[arg(long, env = "AITBC_BACKUP_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective config (secrets redacted) and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aitbc-backup-coordinator: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    aitbc_backup_tls::install_crypto_provider();
    let Some(config) = aitbc_backup_config::load_for_main(
        args.config.as_deref(),
        &config::SCHEMA,
        CoordinatorConfig::validate,
        args.check_config,
    )?
    else {
        return Ok(());
    };
    aitbc_backup_telemetry::init_tracing(&config.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: CoordinatorConfig) -> anyhow::Result<()> {
    let grace = config.server.shutdown_grace;
    let coordinator = Coordinator::bind(config).await?;
    aitbc_backup_telemetry::run_until_signal(|shutdown| coordinator.serve(shutdown), grace).await
}
