//! Offline: `dump.rdb` written for a stopped server.

use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::RestoreReport;

/// Writes `dump.rdb` for a stopped server, checked by `redis-check-rdb` before it takes the
/// name.
pub async fn offline(
    repo: &Repository,
    manifest: &ComponentManifest,
    dir: &std::path::Path,
    force: bool,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    started: Instant,
) -> anyhow::Result<RestoreReport> {
    let target = dir.join("dump.rdb");
    if target.exists() && !force {
        bail!(
            "{} exists; restore with --force to replace it",
            target.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let staged = dir.join(".dump.rdb.aitbc-restore");
    aitbc_backup_repository::restore_to_file(repo, manifest, &staged, progress, cancel)
        .await
        .context("write the RDB")?;
    let mut warnings = Vec::new();
    match std::process::Command::new("redis-check-rdb")
        .arg(&staged)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let _ = std::fs::remove_file(&staged);
            bail!(
                "redis-check-rdb rejects the restored file: {}",
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("ERR") || l.contains("error"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Err(err) => warnings.push(format!("redis-check-rdb not run: {err}")),
    }
    std::fs::rename(&staged, &target)
        .with_context(|| format!("rename into {}", target.display()))?;
    let Some(ConsistencyPoint::Redis { databases, .. }) = &manifest.consistency else {
        bail!("not a Redis backup");
    };
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        target: target.display().to_string(),
        keys: databases.iter().map(|d| d.keys).sum(),
        databases: databases.clone(),
        samples_checked: 0,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}
