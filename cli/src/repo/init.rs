//! `aitbc-backup repo init`: creating a repository, encrypted and/or under S3 Object Lock.

use std::time::Duration;

use aitbc_backup_repository::storage::LockMode;
use aitbc_backup_repository::{ChunkerParams, ObjectLock, Repository};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

use super::RepoArgs;
use crate::output::outln;

#[derive(clap::Args)]
pub(super) struct InitArgs {
    #[arg(long)]
    encrypt: bool,
    /// Encrypt in the version 1 scheme (one master key), as programs before the sealed scheme
    /// did: for benchmarks and upgrade tests only.
    #[arg(
        long,
        hide = true,
        requires = "encrypt",
        conflicts_with = "object_lock"
    )]
    version1: bool,
    /// Lock every object with S3 Object Lock in this mode (governance or compliance); the
    /// bucket must have been created with Object Lock enabled.
    #[arg(long)]
    object_lock: Option<LockMode>,
    /// Days every object stays locked from its write (and kept objects from each extension).
    #[arg(long, requires = "object_lock")]
    lock_days: Option<u32>,
    /// Extend a kept object's lock once less than this is left (default: a quarter of the
    /// lock period, at most 7 days); the coordinator extends at least twice within it.
    #[arg(long, requires = "object_lock", value_parser = humantime::parse_duration)]
    lock_margin: Option<Duration>,
}

fn object_lock(init: &InitArgs) -> anyhow::Result<Option<ObjectLock>> {
    let Some(mode) = init.object_lock else {
        return Ok(None);
    };
    let Some(days) = init.lock_days else {
        bail!("--object-lock needs --lock-days: how long every object stays locked");
    };
    let mut lock = ObjectLock::new(mode, days);
    if let Some(margin) = init.lock_margin {
        lock.margin_secs = margin.as_secs();
    }
    lock.validate()
        .map_err(|e| anyhow::anyhow!("--lock-days/--lock-margin: {e}"))?;
    Ok(Some(lock))
}

pub(super) async fn run_init(
    args: &RepoArgs,
    init: &InitArgs,
    json: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let secret = args.secret()?;
    if init.encrypt && secret.is_none() {
        bail!("--encrypt needs --passphrase-file, --key-file or AITBC_CLI_PASSPHRASE");
    }
    let secret = if init.encrypt { secret } else { None };
    let repo = match (&secret, init.version1) {
        (Some(secret), true) => {
            Repository::init_version1_encrypted(
                args.storage().await?,
                ChunkerParams::default(),
                secret,
                cancel,
            )
            .await?
        }
        _ => {
            Repository::init_locked(
                args.storage().await?,
                ChunkerParams::default(),
                secret.as_ref(),
                object_lock(init)?,
                cancel,
            )
            .await?
        }
    };

    if json {
        outln!("{}", serde_json::to_string_pretty(repo.config())?)?;
        return Ok(());
    }
    let mut traits = Vec::new();
    if repo.config().encrypted {
        traits.push(if repo.config().root_public.is_some() {
            "encrypted, sealed".to_owned()
        } else {
            "encrypted, version 1".to_owned()
        });
    }
    if let Some(lock) = repo.config().object_lock {
        traits.push(format!("{} lock of {} days", lock.mode, lock.days));
    }
    outln!(
        "initialized repository {} at {}{}",
        repo.config().id,
        repo.storage().describe(),
        if traits.is_empty() {
            String::new()
        } else {
            format!(" ({})", traits.join(", "))
        }
    )?;
    Ok(())
}
