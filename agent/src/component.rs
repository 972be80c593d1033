//! The contract every component implements, and the one place that picks the implementation.
//!
//! A backup goes through the same phases for every component: **prepare** (connect and check,
//! nothing held) → **fence** (fenced mode only: writers held, for at most the component's
//! `fence_max_pause`) → **cut** (the consistency point) → **release** (writers go) → **upload**
//! (the data from the cut into the repository, committed as a component manifest). A snapshot
//! set drives the phases one command at a time (`snapshot.rs`); a one-shot backup runs them in
//! one go ([`backup`]). Restores take one [`RestoreRequest`]; long-running work (PostgreSQL's
//! WAL archiving, giving back a Redis server an interrupted restore borrowed) is
//! [`Component::background`].
//!
//! Each component implements the traits in its own folder (`postgres/component.rs`, ...), and
//! does its own hops to the blocking pool: callers only see async methods. Adding a component
//! means a folder with those implementations, its settings in [`AgentConfig`], and one arm in
//! [`of`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_config::ConfigError;
use aitbc_backup_proto::model::Component as Kind;
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::AgentConfig;

mod blocking;
pub use blocking::{BlockingCut, BlockingPrepared, OnBlockingPool, prepare_on_blocking_pool};

/// What an upload committed: the component manifest and the component's report.
pub struct Uploaded {
    pub manifest_id: String,
    pub report: serde_json::Value,
}

impl Uploaded {
    /// The component manifest `manifest_id` and its component's `report`.
    pub fn new(manifest_id: &str, report: &impl serde::Serialize) -> anyhow::Result<Uploaded> {
        Ok(Uploaded {
            manifest_id: manifest_id.to_owned(),
            report: json(report)?,
        })
    }
}

/// Where a restore goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The agent's own server or data directory.
    #[default]
    Own,
    /// Another server: a PostgreSQL libpq URL, a Redis `host:port`.
    Server(String),
    /// A directory: the ledger's target, Redis's offline `dump.rdb`.
    Directory(PathBuf),
}

impl RestoreTarget {
    /// From the command line's or the coordinator's two optional fields.
    pub fn from_parts(dir: Option<PathBuf>, url: Option<String>) -> anyhow::Result<Self> {
        Ok(match (dir, url) {
            (Some(dir), Some(url)) => bail!(
                "a restore goes to a directory ({}) or a server ({url}), not both",
                dir.display()
            ),
            (Some(dir), None) => RestoreTarget::Directory(dir),
            (None, Some(url)) => RestoreTarget::Server(url),
            (None, None) => RestoreTarget::Own,
        })
    }
}

/// One restore, whatever the component. A component refuses by name what it does not support.
#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub target: RestoreTarget,
    /// Replace what is there (a non-empty directory, a database in use, a `dump.rdb`).
    pub force: bool,
    /// A restore test into scratch targets, verified and removed; the live component untouched.
    pub trial: bool,
    /// PostgreSQL: which database of the backup, under which name, with the globals.
    pub database: Option<String>,
    pub rename: Option<String>,
    pub globals: bool,
}

/// A component, built from the agent's configuration.
pub trait Component: Send + Sync {
    /// Connects and checks; nothing is held yet. `set_id` names the snapshot set, if any.
    fn prepare<'a>(
        &'a self,
        set_id: Option<&'a str>,
    ) -> BoxFuture<'a, anyhow::Result<Box<dyn Prepared>>>;

    /// Restores `manifest` as `request` says and verifies it against the manifest's
    /// consistency point; returns the component's report.
    fn restore<'a>(
        &'a self,
        repo: &'a Repository,
        manifest: &'a ComponentManifest,
        request: RestoreRequest,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<serde_json::Value>>;

    /// Gives back what an interrupted restore left borrowed (one attempt), before a one-shot
    /// command runs.
    fn recover(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Work that lives as long as the sidecar, beside its session, with its metrics
    /// registered in `registry`; None when there is none.
    fn background(
        &self,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        let _ = (registry, shutdown);
        None
    }
}

/// A cut whose fence is down, and how long writers could have waited (None when not fenced).
pub type Released = (Box<dyn Cut>, Option<Duration>);

/// Connected and checked; maybe fenced.
pub trait Prepared: Send + 'static {
    /// Holds the component's writers until [`Cut::release`], an abort or the component's own
    /// deadline, whichever is first.
    fn fence(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Box<dyn Prepared>>>;

    /// Takes the consistency point at `when` (or at once). Fenced writers stay held.
    fn cut(
        self: Box<Self>,
        when: Option<Instant>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn Cut>>>;

    /// Gives everything up; fenced writers go now.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// The consistency point is taken; maybe still fenced.
pub trait Cut: Send + 'static {
    /// When the point was taken.
    fn at(&self) -> Instant;

    /// Lets fenced writers go; how long they could have waited (None when not fenced).
    fn release(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Released>>;

    /// Streams the data from the cut into the repository and commits the component manifest.
    fn upload<'a>(
        self: Box<Self>,
        repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>>;

    /// Gives everything up; fenced writers go now.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(err) = self.release().await {
                tracing::warn!(error = %format!("{err:#}"), "releasing the fence failed; it ends at its deadline");
            }
        })
    }
}

/// The configured component, its settings checked. The one `match` on the component's kind.
pub fn of(config: &Arc<AgentConfig>) -> Result<Arc<dyn Component>, ConfigError> {
    let kind = config.component.ok_or_else(|| {
        ConfigError::invalid(
            "component",
            "no component configured (AITBC_BACKUP_COMPONENT)",
        )
    })?;
    Ok(match kind {
        Kind::Postgres => {
            config.postgres.validate()?;
            Arc::new(crate::postgres::component::Postgres::new(config.clone()))
        }
        Kind::Redis => {
            config.redis.validate()?;
            Arc::new(crate::redis::component::Redis::new(config.clone()))
        }
        Kind::Ledger => {
            config.ledger.validate()?;
            Arc::new(crate::ledger::component::Ledger::new(config.clone()))
        }
    })
}

/// Refuses the PostgreSQL-only parts of a request in another component, by name.
pub(crate) fn refuse_database_selection(
    component: &str,
    request: &RestoreRequest,
) -> anyhow::Result<()> {
    if request.database.is_some() || request.rename.is_some() || request.globals {
        bail!(
            "--database, --as and --globals select PostgreSQL databases; a {component} backup has none"
        );
    }
    Ok(())
}

/// A whole backup in one go: prepare, (fence,) cut, release, upload. Returns the component's
/// report with the write pause (fenced) and the total time.
pub async fn backup(
    component: &dyn Component,
    repo: &Repository,
    label: &Label,
    fenced: bool,
    full_scan: bool,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let mut prepared = component.prepare(None).await?;
    if fenced {
        prepared = prepared.fence().await?;
    }
    let (cut, pause) = prepared.cut(None).await?.release().await?;
    let mut report = cut
        .upload(repo, label, full_scan, progress, cancel)
        .await?
        .report;
    if let Some(pause) = pause {
        report["write_pause_ms"] = serde_json::json!(pause.as_secs_f64() * 1e3);
    }
    report["seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
    Ok(report)
}

/// Restores backup `id` (a component manifest) as `request` says.
pub async fn restore(
    component: &dyn Component,
    repo: &Repository,
    id: &str,
    request: RestoreRequest,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<serde_json::Value> {
    let manifest = repo
        .component(id, cancel)
        .await
        .with_context(|| format!("read backup {id}"))?;
    // In a sealed repository a backup names the component whose secret keyed it: another
    // component's writer may have written it under this one's name.
    if let Some(own) = repo.component_name()
        && !manifest.keyed_by.is_empty()
        && manifest.keyed_by != own
    {
        anyhow::bail!(
            "backup {id} was written by the `{}` writer, not by this component's (`{own}`); \
             refusing to restore it here",
            manifest.keyed_by
        );
    }
    component
        .restore(repo, &manifest, request, progress, cancel)
        .await
}

/// Opens the configured repository.
pub async fn open_repository(
    config: &AgentConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<Repository> {
    let repo = aitbc_backup_repository::open::open_configured(&config.repository, cancel)
        .await
        .with_context(|| format!("open repository {}", config.repository.effective_url()))?;
    // In a sealed repository chunks are keyed and cut with this component's secret; a writer
    // credential issued for another component is refused here.
    match config.component {
        Some(component) => Ok(repo
            .for_component(component.as_str())
            .context("repository.credential")?),
        None => Ok(repo),
    }
}

/// Runs blocking component work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work).await?
}

/// The report as JSON.
pub(crate) fn json(report: impl serde::Serialize) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::to_value(report)?)
}
