//! Running PostgreSQL on the staged data directory until it has replayed the WAL to the target.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::postgres::config::PostgresSettings;
use crate::postgres::server::tool_in;

/// Runs the server on the staging directory until recovery ends, then shuts it down.
/// Returns the line where the server said it stopped.
pub(super) async fn recover(
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
pub(super) fn control_data(bin: &Path, dir: &Path) -> anyhow::Result<(String, u32, String)> {
    let output = std::process::Command::new(tool_in(bin, "pg_controldata"))
        .arg(dir)
        .env("LC_ALL", "C")
        .output()
        .context("run pg_controldata")?;
    let text = String::from_utf8_lossy(&crate::postgres::server::check_output(
        "pg_controldata",
        output,
    )?)
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
