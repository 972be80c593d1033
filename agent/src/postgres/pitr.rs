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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint};
use aitbc_backup_repository::wal::{self, Catalog, End};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::PostgresSettings;
use super::server::{tool_in, tools_dir};
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

fn check_empty(data_dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty; a point-in-time restore writes a new data directory (stop the server and move the old one away first)",
                    data_dir.display()
                );
            }
            Ok(())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(anyhow::Error::new(err).context(format!("{}", data_dir.display()))),
    }
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

fn staging_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = data_dir
        .file_name()
        .context("the data directory has no name")?
        .to_string_lossy();
    let staging = parent.join(format!(
        ".{name}.aitbc-restore-{:08x}",
        rand::random::<u32>()
    ));
    std::fs::create_dir(&staging)
        .with_context(|| format!("create the staging directory {}", staging.display()))?;
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    Ok(staging)
}

/// Streams the base backup into the confined unpacker (nothing written outside `root`).
async fn unpack(
    repo: &Repository,
    manifest: &ComponentManifest,
    root: &Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let root = root.to_owned();
    let unpacked =
        aitbc_backup_repository::restore_with(repo, manifest, progress, cancel, move |reader| {
            confined::unpack(reader, &root, &mut |_, _| {})
        })
        .await
        .with_context(|| format!("read base backup {}", manifest.id))?;
    match unpacked {
        Ok(_) => Ok(()),
        Err(refused) => bail!("unpack base backup {}: {refused}", manifest.id),
    }
}

fn write_recovery_settings(staging: &Path, wal_dir: &Path, target: &Target) -> anyhow::Result<()> {
    let dir = wal_dir.to_str().context("the staging path is not UTF-8")?;
    if dir.contains(['\'', '"', '\\', '%']) {
        bail!(
            "the staging path {dir} holds a quote, backslash or %; choose another target directory"
        );
    }
    let mut block = vec![
        RECOVERY_BEGIN.to_owned(),
        format!("restore_command = 'cp \"{dir}/%f\" \"%p\"'"),
        "recovery_target_timeline = 'latest'".to_owned(),
    ];
    match target {
        Target::Latest => {}
        Target::Time(at) => {
            block.push(format!(
                "recovery_target_time = '{}'",
                at.format("%Y-%m-%d %H:%M:%S%.6f+00")
            ));
            // "Before it": a transaction committed exactly at the instant is left out.
            block.push("recovery_target_inclusive = off".to_owned());
        }
        Target::Lsn(lsn) => {
            block.push(format!("recovery_target_lsn = '{}'", wal::format_lsn(*lsn)))
        }
        Target::RestorePoint { name, .. } => {
            if name.contains(['\'', '\\']) {
                bail!("restore point name `{name}` holds a quote or backslash");
            }
            block.push(format!("recovery_target_name = '{name}'"));
        }
    }
    if *target != Target::Latest {
        block.push("recovery_target_action = 'promote'".to_owned());
    }
    block.push(RECOVERY_END.to_owned());
    let conf = staging.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&block.join("\n"));
    text.push('\n');
    // Written without following a link the base backup may hold under these names.
    confined::replace_file(staging, "postgresql.auto.conf", text.as_bytes())?;
    confined::replace_file(staging, "recovery.signal", b"")?;
    Ok(())
}

fn remove_recovery_settings(staging: &Path) -> anyhow::Result<()> {
    let conf = staging.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf)?;
    let mut kept = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line {
            RECOVERY_BEGIN => inside = true,
            RECOVERY_END => inside = false,
            _ if !inside => kept.push(line),
            _ => {}
        }
    }
    let mut out = kept.join("\n");
    out.push('\n');
    confined::replace_file(staging, "postgresql.auto.conf", out.as_bytes())?;
    let _ = std::fs::remove_file(staging.join("recovery.signal"));
    Ok(())
}

/// Runs the server on the staging directory until recovery ends, then shuts it down.
/// Returns the line where the server said it stopped.
async fn recover(
    bin: &Path,
    staging: &Path,
    settings: &PostgresSettings,
    cancel: &CancellationToken,
) -> anyhow::Result<String> {
    let run = tempfile::Builder::new()
        .prefix("aitbc-pitr-")
        .tempdir()
        .context("create the recovery socket directory")?;
    let owner = os_user(settings)?;
    if let Some((uid, gid)) = owner {
        chown_tree(staging, uid, gid)?;
        chown_tree(run.path(), uid, gid)?;
    }
    let log_path = run.path().join("recovery.log");
    let log = std::fs::File::create(&log_path)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))?;
    }
    let mut command = tokio::process::Command::new(tool_in(bin, "postgres"));
    command
        .arg("-D")
        .arg(staging)
        .args([
            "-c",
            "listen_addresses=",
            "-c",
            "archive_mode=off",
            "-c",
            "port=5432",
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", run.path().display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("start {}", tool_in(bin, "postgres").display()))?;
    let signal = staging.join("recovery.signal");
    let deadline = Instant::now() + settings.wal.recovery_timeout;
    let outcome = loop {
        if !signal.exists() && ready(&log_path) {
            break Ok(());
        }
        if let Some(status) = child.try_wait()? {
            break Err(anyhow::anyhow!("the recovering server exited ({status})"));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "recovery did not finish within {:?} (postgres.wal.recovery_timeout)",
                settings.wal.recovery_timeout
            ));
        }
        if cancel.is_cancelled() {
            break Err(anyhow::anyhow!("cancelled"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SIGINT: fast shutdown, with a checkpoint.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if let Err(err) = outcome {
        bail!("{err}: {}", log_tail(&log_text));
    }
    match status {
        Ok(Ok(status)) if status.success() => {}
        _ => bail!(
            "the recovered server did not shut down cleanly: {}",
            log_tail(&log_text)
        ),
    }
    Ok(log_text
        .lines()
        .find(|l| l.contains("recovery stopping") || l.contains("redo done at"))
        .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).trim().to_owned())
        .unwrap_or_default())
}

fn ready(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .map(|t| t.contains("database system is ready to accept connections"))
        .unwrap_or(false)
}

/// The server's last few error lines, for an error message.
fn log_tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("FATAL") || l.contains("ERROR") || l.contains("PANIC"))
        .collect();
    let chosen = if lines.is_empty() {
        text.lines().rev().take(3).collect::<Vec<_>>()
    } else {
        lines.into_iter().rev().take(3).collect()
    };
    chosen.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The OS user to run the server as: when the agent is root, `postgres.wal.os_user`.
fn os_user(settings: &PostgresSettings) -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = &settings.wal.os_user;
    let user = nix::unistd::User::from_name(name)?.with_context(|| {
        format!(
            "OS user `{name}` does not exist (postgres.wal.os_user); PostgreSQL cannot run as root"
        )
    })?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `pg_controldata`: cluster state, timeline, latest checkpoint.
fn control_data(bin: &Path, dir: &Path) -> anyhow::Result<(String, u32, String)> {
    let output = std::process::Command::new(tool_in(bin, "pg_controldata"))
        .arg(dir)
        .env("LC_ALL", "C")
        .output()
        .context("run pg_controldata")?;
    let text = String::from_utf8_lossy(&super::server::check_output("pg_controldata", output)?)
        .into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    Ok((
        field("Database cluster state:"),
        field("Latest checkpoint's TimeLineID:")
            .parse()
            .unwrap_or(0),
        field("Latest checkpoint location:"),
    ))
}

/// Puts the recovered directory in place: the target must still be absent or empty.
fn swap_in(staging: &Path, data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.exists() {
        check_empty(data_dir)?;
        std::fs::remove_dir(data_dir)?;
    }
    std::fs::rename(staging, data_dir)
        .with_context(|| format!("move the restored cluster to {}", data_dir.display()))?;
    if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
