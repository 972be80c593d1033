//! Restore into a running Redis without a restart: the agent plays a master. It listens on
//! `redis.restore_listen`, tells the server `REPLICAOF <agent>`, answers its handshake with
//! `+FULLRESYNC` and streams the RDB from the repository (walking it again to know which keys
//! may expire meanwhile); once the server has loaded it, the server is given back: its own
//! role (`REPLICAOF NO ONE`, or its previous master again) and settings — also when anything
//! fails, when the restore is cancelled, and, through the journal, when the agent was killed.
//! Then the key counts and the sampled values are checked against the manifest.
//! Offline: `dump.rdb` written into a stopped server's data directory, checked with
//! `redis-check-rdb`.
//!
//! - [`master`]: the agent's master side (listener, handshake, the RDB stream).
//! - [`control`]: the control connection (borrow, wait for the load, checks).
//! - [`journal`]: what a restore changed, on disk, and giving it back.
//! - [`offline`]: `dump.rdb` for a stopped server.

mod control;
pub mod journal;
mod master;
mod offline;

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint, RedisDb};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::config::RedisSettings;
use super::rdb;
use control::Control;
use master::Master;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Another server (`host:port`) instead of `redis.address`.
    pub address: Option<String>,
    /// Offline: write `dump.rdb` into this directory instead.
    pub offline_dir: Option<PathBuf>,
    /// Offline: replace an existing `dump.rdb`.
    pub force: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub manifest: String,
    pub target: String,
    pub keys: u64,
    pub databases: Vec<RedisDb>,
    pub samples_checked: usize,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn restore(
    repo: &Repository,
    manifest: &ComponentManifest,
    settings: &RedisSettings,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let Some(ConsistencyPoint::Redis {
        databases,
        samples,
        counted,
        uncompressed,
        ..
    }) = &manifest.consistency
    else {
        bail!("backup {} is not a Redis backup", manifest.id);
    };
    let started = Instant::now();
    if let Some(dir) = &options.offline_dir {
        return offline::offline(
            repo,
            manifest,
            dir,
            options.force,
            progress,
            cancel,
            started,
        )
        .await;
    }
    let mut settings = settings.clone();
    if let Some(address) = &options.address {
        settings.address = address.clone();
    }
    let mut warnings = Vec::new();
    let (advertised, master) = tokio::task::spawn_blocking({
        let settings = settings.clone();
        let size = manifest.raw_size;
        move || Master::start(&settings, size)
    })
    .await??;
    // The listener is bound, so the server's connection waits in its backlog until served.
    // From here on the server is borrowed: `borrowed` gives it back if this future is dropped.
    let (mut control, borrowed, warning) = tokio::task::spawn_blocking({
        let settings = settings.clone();
        let force = options.force;
        move || Control::attach(&settings, &advertised, force)
    })
    .await??;
    warnings.extend(warning);
    let transfer = transfer(repo, manifest, master, progress, cancel).await;
    let transferred = transfer.is_ok();
    let load_timeout = settings.load_timeout;
    let (result, released, control) = tokio::task::spawn_blocking({
        let cancel = cancel.clone();
        move || {
            // The socket stays open until the server is given back, or it would retry the link.
            let result = transfer.and_then(|(summary, socket)| {
                control.wait_loaded(load_timeout, &cancel)?;
                Ok((summary, socket))
            });
            let released = borrowed.give_back();
            (result, released, control)
        }
    })
    .await?;
    let summary = match (result, released) {
        (Ok((summary, _socket)), Ok(release_warnings)) => {
            warnings.extend(release_warnings);
            summary
        }
        (Err(err), Ok(_)) => {
            // A server holding data loads a sync only once all of it has arrived; an empty
            // one may load it as it arrives, and empties itself again when it breaks off.
            let kept = if transferred {
                ""
            } else {
                " and keeps its previous data"
            };
            return Err(err.context(format!(
                "restore into Redis at {}; the server was released (REPLICAOF NO ONE){kept}",
                settings.address
            )));
        }
        (Err(err), Err(release_err)) => {
            bail!(
                "{err:#}; and releasing the server (REPLICAOF NO ONE) failed too: {release_err:#}"
            )
        }
        (Ok(_), Err(release_err)) => return Err(release_err.context("release the server")),
    };
    let mut control = control;
    let checked = tokio::task::spawn_blocking({
        let databases = databases.clone();
        let samples = samples.clone();
        let counted = *counted;
        let lzf = !*uncompressed;
        move || -> anyhow::Result<usize> {
            if counted {
                control.check_counts(&databases, &summary.expiring)?;
            }
            control.check_samples(&samples, lzf)
        }
    })
    .await??;
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        target: settings.address.clone(),
        keys: databases.iter().map(|d| d.keys).sum(),
        databases: databases.clone(),
        samples_checked: checked,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Streams the backup from the repository through the agent's master side to the server: the
/// verified chunks go straight to the serving thread, which writes them to the replica socket.
async fn transfer(
    repo: &Repository,
    manifest: &ComponentManifest,
    master: Master,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<(rdb::Summary, TcpStream)> {
    let served = aitbc_backup_repository::restore_with(repo, manifest, progress, cancel, |rdb| {
        master.serve(rdb)
    })
    .await;
    served.context("read the backup")?
}
