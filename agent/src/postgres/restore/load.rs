//! Feeding a dump to pg_restore: streamed from the repository, or spooled to a scratch file for parallel jobs.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::postgres::server::{Server, conninfo};

/// Writes one part of the stream to a scratch file. Not synced: the file is read back at once
/// and thrown away (a crash restarts the restore), and syncing 500 MB cost seconds.
pub(super) async fn spool(
    repo: &Repository,
    manifest: &ComponentManifest,
    part: &str,
    path: &std::path::Path,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let part = aitbc_backup_repository::part(manifest, part)?;
    let file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("create {}", path.display()))?;
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
    aitbc_backup_repository::restore(repo, &part, &mut writer, progress, cancel).await?;
    Ok(())
}

/// Where `pg_restore` reads a dump from.
pub(super) enum Dump<'a> {
    /// A file in the scratch directory (`--jobs` needs one it can seek in).
    Spooled(PathBuf),
    /// Straight from the repository into its standard input (one job; nothing on disk, and
    /// the download overlaps the restore).
    Streamed {
        repo: &'a Repository,
        part: Box<ComponentManifest>,
        progress: Arc<Progress>,
    },
}

pub(super) async fn pg_restore(
    server: &Server,
    database: &str,
    dump: &Dump<'_>,
    jobs: u32,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let mut command = server.tool("pg_restore");
    command
        .args(["--exit-on-error", "--no-password"])
        .arg(format!("--dbname={}", conninfo(database)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match dump {
        Dump::Spooled(path) => {
            command
                .arg(format!("--jobs={jobs}"))
                .arg(path)
                .stdin(Stdio::null());
        }
        Dump::Streamed { .. } => {
            command.stdin(Stdio::piped());
        }
    }
    let mut child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .context("start pg_restore")?;
    let stdin = child.stdin.take();
    let mut stderr = child.stderr.take().context("pg_restore stderr")?;
    let feed = async {
        match (dump, stdin) {
            (
                Dump::Streamed {
                    repo,
                    part,
                    progress,
                },
                Some(stdin),
            ) => {
                aitbc_backup_repository::restore(repo, part, stdin, progress.clone(), cancel).await
            }
            _ => Ok(()),
        }
    };
    let errors = async {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    };
    let (fed, errors, status) = tokio::select! {
        all = async { tokio::join!(feed, errors, child.wait()) } => all,
        _ = cancel.cancelled() => bail!("cancelled"),
    };
    let status = status.context("run pg_restore")?;
    match fed {
        // A feed that failed on its own (a damaged chunk) explains pg_restore's failure too.
        Err(err) if !is_closed_pipe(&err) => {
            Err(anyhow::Error::new(err).context("read the dump from the repository"))
        }
        // Otherwise pg_restore's own message: when it stops early the feed only sees a closed pipe.
        _ if !status.success() => bail!("pg_restore failed ({status}): {}", errors.trim()),
        fed => fed.context("read the dump from the repository"),
    }
}

pub(super) fn is_closed_pipe(err: &aitbc_backup_repository::RepoError) -> bool {
    matches!(err, aitbc_backup_repository::RepoError::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The scratch directory for one restore: made on first use (a streamed restore without the
/// globals never touches the disk), removed when done.
pub(super) struct Spool {
    root: PathBuf,
    dir: Option<PathBuf>,
}

impl Spool {
    pub(super) fn new(root: &std::path::Path) -> Spool {
        Spool {
            root: root.to_owned(),
            dir: None,
        }
    }

    /// A path for `name` inside the directory.
    pub(super) fn path(&mut self, name: &str) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.dir {
            return Ok(dir.join(name));
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("create postgres.scratch_dir {}", self.root.display()))?;
        let dir = self
            .root
            .join(format!("pg-restore-{:08x}", rand::random::<u32>()));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(self.dir.insert(dir).join(name))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
