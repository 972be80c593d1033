//! The staging directory a point-in-time restore builds beside the target: checked, unpacked, configured for recovery, swapped in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::wal;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::{RECOVERY_BEGIN, RECOVERY_END, Target};
use crate::confined;

pub(super) fn check_empty(data_dir: &Path) -> anyhow::Result<()> {
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

pub(super) fn staging_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
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
pub(super) async fn unpack(
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

pub(super) fn write_recovery_settings(
    staging: &Path,
    wal_dir: &Path,
    target: &Target,
) -> anyhow::Result<()> {
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

pub(super) fn remove_recovery_settings(staging: &Path) -> anyhow::Result<()> {
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

/// Puts the recovered directory in place: the target must still be absent or empty.
pub(super) fn swap_in(staging: &Path, data_dir: &Path) -> anyhow::Result<()> {
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
