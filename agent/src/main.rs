//! `aitbc-backup-agent`: parse flags, load config, run until SIGTERM, drain.

use std::path::PathBuf;

use aitbc_backup_agent::{Agent, AgentConfig, config};
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
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?
        .block_on(serve(config))
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    let grace = config.shutdown_grace;
    let agent = Agent::bind(config).await?;
    aitbc_backup_telemetry::run_until_signal(|shutdown| agent.run(shutdown), grace).await
}
