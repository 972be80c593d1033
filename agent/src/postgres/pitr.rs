//! Point-in-time recovery: a base backup plus archived WAL, replayed by PostgreSQL itself to a
//! snapshot set's restore point, a time, an LSN, or the end of what is archived.
//!
//! The steps, all in a staging directory beside the target (so a failure leaves the target as
//! it was, and a success appears at once):
//! 1. pick the newest base backup that ends before the target, plan the WAL from its start to
//!    the target and refuse if any segment on the way is missing (named);
//! 2. unpack the base backup, fetch the planned WAL into `aitbc_wal/`;
//! 3. write the recovery settings (a marked block in `postgresql.auto.conf`, `recovery.signal`);
//! 4. run the server on a private socket, no TCP, until recovery ends (it removes
//!    `recovery.signal` on promotion), then shut it down cleanly;
//! 5. remove the recovery settings and the fetched WAL, check `pg_controldata` says "shut down",
//!    and rename the staging directory to the target.

mod recovery;
mod staging;
use recovery::{control_data, recover};
use staging::{
    check_empty, remove_recovery_settings, staging_dir, swap_in, unpack, write_recovery_settings,
};

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint};
use aitbc_backup_repository::wal::{self, Catalog, End};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::PostgresSettings;
use super::server::tools_dir;
use crate::confined;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Everything archived, the newest partial segment included.
    Latest,
    /// Transactions committed before this instant.
    Time(DateTime<Utc>),
    /// WAL up to this LSN.
    Lsn(u64),
    /// A named restore point (a snapshot set's cut) at this LSN.
    RestorePoint { name: String, lsn: u64 },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Latest => write!(f, "latest"),
            Target::Time(at) => write!(f, "time {}", at.to_rfc3339()),
            Target::Lsn(lsn) => write!(f, "LSN {}", wal::format_lsn(*lsn)),
            Target::RestorePoint { name, lsn } => {
                write!(f, "restore point {name} ({})", wal::format_lsn(*lsn))
            }
        }
    }
}

/// A target as given on the command line; a set is looked up in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    Latest,
    Set(String),
    Time(DateTime<Utc>),
    Lsn(u64),
}

impl TargetSpec {
    pub async fn resolve(
        self,
        repo: &Repository,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Target> {
        Ok(match self {
            TargetSpec::Latest => Target::Latest,
            TargetSpec::Time(at) => Target::Time(at),
            TargetSpec::Lsn(lsn) => Target::Lsn(lsn),
            TargetSpec::Set(id) => {
                let set = repo
                    .set(&id, cancel)
                    .await
                    .with_context(|| format!("read snapshot set {id}"))?;
                let point = set.components.iter().find_map(|c| match &c.consistency {
                    Some(ConsistencyPoint::Postgres {
                        restore_point,
                        restore_point_lsn,
                        ..
                    }) if !restore_point.is_empty() => {
                        Some((restore_point.clone(), restore_point_lsn.clone()))
                    }
                    _ => None,
                });
                let (name, lsn) = point.with_context(|| {
                    format!("snapshot set {id} has no PostgreSQL restore point (postgres.wal.archive was off when it was taken)")
                })?;
                Target::RestorePoint {
                    lsn: wal::parse_lsn(&lsn)
                        .with_context(|| format!("set {id}: restore point LSN `{lsn}`"))?,
                    name,
                }
            }
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PitrReport {
    pub data_dir: String,
    pub base_backup: String,
    pub target: String,
    pub wal_files: usize,
    pub wal_bytes: u64,
    /// The last WAL segment recovery read.
    pub last_segment: String,
    /// What the server logged where it stopped.
    pub stopped: String,
    /// `pg_controldata` of the result.
    pub timeline: u32,
    pub checkpoint_lsn: String,
    pub seconds: f64,
    /// Where the time went: unpacking the base backup, fetching WAL, recovery.
    pub unpack_seconds: f64,
    pub wal_seconds: f64,
    pub recovery_seconds: f64,
}

const RECOVERY_BEGIN: &str = "# aitbc-backup point-in-time recovery (removed when it ends)";
const RECOVERY_END: &str = "# end of aitbc-backup point-in-time recovery";
const WAL_DIR: &str = "aitbc_wal";

/// Restores into `data_dir` (absent or empty), from `base` or the newest fitting base backup.
/// A `data_dir` that holds or lies inside one of `protected` is refused.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    repo: &Repository,
    settings: &PostgresSettings,
    target: &Target,
    base: Option<&str>,
    data_dir: &Path,
    protected: &[confined::Protected],
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<PitrReport> {
    let started = Instant::now();
    confined::check_apart(data_dir, protected).map_err(anyhow::Error::msg)?;
    check_empty(data_dir)?;
    let planned = plan_restore(repo, target, base, cancel).await?;
    let staging = staging_dir(data_dir)?;
    let rebuilt = match rebuild(repo, settings, &planned, target, &staging, progress, cancel).await
    {
        Ok(rebuilt) => rebuilt,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    swap_in(&staging, data_dir)?;
    Ok(PitrReport {
        data_dir: data_dir.display().to_string(),
        base_backup: planned.base.id.clone(),
        target: target.to_string(),
        wal_files: planned.plan.files.len(),
        wal_bytes: rebuilt.wal_bytes,
        last_segment: planned.plan.last_segment,
        stopped: rebuilt.stopped,
        timeline: rebuilt.timeline,
        checkpoint_lsn: rebuilt.checkpoint_lsn,
        seconds: started.elapsed().as_secs_f64(),
        unpack_seconds: rebuilt.phases[0],
        wal_seconds: rebuilt.phases[1],
        recovery_seconds: rebuilt.phases[2],
    })
}

/// The base backup and the WAL a restore to `target` needs.
struct Planned {
    base: ComponentManifest,
    plan: wal::Plan,
    server_major: u32,
}

/// Picks the base backup and plans the WAL; refuses a target recovery cannot reach.
async fn plan_restore(
    repo: &Repository,
    target: &Target,
    base: Option<&str>,
    cancel: &CancellationToken,
) -> anyhow::Result<Planned> {
    let base = choose_base(repo, base, target, cancel).await?;
    let Some(ConsistencyPoint::PostgresBase {
        start_lsn,
        end_lsn,
        timeline,
        wal_segment_size,
        server_version,
        ..
    }) = base.consistency.clone()
    else {
        bail!("manifest {} is not a PostgreSQL base backup", base.id);
    };
    let start = wal::parse_lsn(&start_lsn).context("base backup start LSN")?;
    let end = match target {
        Target::Latest => End::Latest,
        Target::Time(at) => End::Time(SystemTime::from(*at)),
        Target::Lsn(lsn) | Target::RestorePoint { lsn, .. } => End::Lsn(*lsn),
    };
    if let End::Lsn(lsn) = end
        && lsn < wal::parse_lsn(&end_lsn).unwrap_or(u64::MAX)
    {
        bail!(
            "{target} is before the end of base backup {} ({end_lsn}); pick an older base backup",
            base.id
        );
    }
    let catalog = Catalog::load(repo, cancel).await?;
    let histories = wal::histories(repo, &catalog, cancel).await?;
    let plan = wal::plan(&catalog, &histories, wal_segment_size, timeline, start, end)
        .with_context(|| format!("cannot restore base backup {} to {target}", base.id))?;
    let server_major = server_version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(15);
    Ok(Planned {
        base,
        plan,
        server_major,
    })
}

/// What [`rebuild`] did.
struct Rebuilt {
    wal_bytes: u64,
    stopped: String,
    timeline: u32,
    checkpoint_lsn: String,
    /// Seconds unpacking, fetching WAL, recovering.
    phases: [f64; 3],
}

/// Unpacks the base backup into `staging`, fetches the WAL, recovers and cleans up.
async fn rebuild(
    repo: &Repository,
    settings: &PostgresSettings,
    planned: &Planned,
    target: &Target,
    staging: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<Rebuilt> {
    let mut phases = [0.0; 3];
    let mut phase = Instant::now();
    unpack(repo, &planned.base, staging, progress, cancel).await?;
    phases[0] = phase.elapsed().as_secs_f64();
    phase = Instant::now();
    let wal_dir = staging.join(WAL_DIR);
    tokio::fs::create_dir(&wal_dir).await?;
    let mut wal_bytes = 0;
    for file in &planned.plan.files {
        wal_bytes += wal::fetch(repo, file, &wal_dir.join(file.file_name()), cancel)
            .await
            .with_context(|| format!("fetch WAL {}", file.path()))?;
    }
    phases[1] = phase.elapsed().as_secs_f64();
    phase = Instant::now();
    write_recovery_settings(staging, &wal_dir, target)?;
    let bin = tools_dir(&settings.bin_dir, planned.server_major, "postgres");
    let stopped = recover(&bin, staging, settings, cancel).await?;
    remove_recovery_settings(staging)?;
    tokio::fs::remove_dir_all(&wal_dir).await?;
    let (state, timeline, checkpoint_lsn) = control_data(&bin, staging)?;
    if state != "shut down" {
        bail!("after recovery the cluster state is `{state}`, not `shut down`");
    }
    phases[2] = phase.elapsed().as_secs_f64();
    Ok(Rebuilt {
        wal_bytes,
        stopped,
        timeline,
        checkpoint_lsn,
        phases,
    })
}

/// The base backup to start from: the one asked for, else the newest that ends before the
/// target (so recovery can reach it).
async fn choose_base(
    repo: &Repository,
    wanted: Option<&str>,
    target: &Target,
    cancel: &CancellationToken,
) -> anyhow::Result<ComponentManifest> {
    if let Some(id) = wanted {
        return Ok(repo.component(id, cancel).await?);
    }
    let fitting = wal::base_backups(repo, cancel)
        .await?
        .into_iter()
        .filter(|base| match target {
            Target::Latest => true,
            Target::Lsn(lsn) | Target::RestorePoint { lsn, .. } => base.end_lsn <= *lsn,
            Target::Time(at) => match &base.manifest.consistency {
                Some(ConsistencyPoint::PostgresBase { finished, .. }) => {
                    DateTime::parse_from_rfc3339(finished)
                        .is_ok_and(|f| f.with_timezone(&Utc) < *at)
                }
                _ => false,
            },
        })
        .max_by_key(|base| base.end_lsn);
    fitting.map(|base| base.manifest).with_context(|| {
        format!("no base backup in the repository ends before {target}; take one with `aitbc-backup-agent base-backup`")
    })
}
