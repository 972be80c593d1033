//! Restore of a ledger backup into a data directory.
//!
//! The stream is unpacked into a staging directory inside the target (same filesystem, and a
//! mounted volume works too), every SQLite database passes `PRAGMA integrity_check`, the chain is
//! checked link by link and its head against the manifest, `metadata.json` is written, and only
//! then are the target's old entries moved aside and the staged ones moved in (renames). A restore
//! that fails or is killed before the swap leaves the target as it was.
//!
//! The stream is untrusted: it is unpacked by [`crate::confined::unpack`], which cannot write
//! outside the staging directory, and `metadata.json` is written without following a link. A
//! target that holds or lies inside the repository or the agent's own directories is refused
//! before anything is created ([`crate::confined::check_apart`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::manifest::{ComponentManifest, ConsistencyPoint};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::backup::STREAM;
use super::scan::is_sqlite;
use super::sqlite;
use crate::confined;

const STAGING_PREFIX: &str = ".aitbc-backup-staging-";
const PREVIOUS_PREFIX: &str = ".aitbc-backup-previous-";
pub const METADATA_FILE: &str = "metadata.json";

/// Where and how to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Replace a non-empty target.
    pub force: bool,
    /// The chain database, relative to the target.
    pub chain_db: String,
    pub height_query: String,
    /// Recorded in `metadata.json` as `source`.
    pub source: String,
    /// Directories the target may neither hold nor lie inside (a `file://` repository, the
    /// agent's scratch and spool directories), refused with or without `force`.
    pub protected: Vec<confined::Protected>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub manifest: String,
    pub target: String,
    pub height: u64,
    pub hash: String,
    pub files: u64,
    pub bytes: u64,
    pub databases_checked: usize,
    pub seconds: f64,
}

/// The metadata file the old tooling reads.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    pub backup_name: String,
    pub timestamp: String,
    pub latest_block_height: u64,
    pub latest_block_hash: String,
    pub source: String,
    pub restored_at: String,
}

pub async fn restore(
    repo: &Repository,
    manifest: &ComponentManifest,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    let Some(ConsistencyPoint::Ledger { height, hash }) = manifest.consistency.clone() else {
        bail!(
            "manifest {} is not a ledger backup (it holds a `{}` stream of `{}`)",
            manifest.id,
            manifest.stream,
            manifest.name
        );
    };
    if manifest.stream != STREAM {
        bail!(
            "manifest {} holds a `{}` stream, not a tar stream",
            manifest.id,
            manifest.stream
        );
    }
    let staging = prepare_target(&options.target, options.force, &options.protected)?;
    let expected = sqlite::Head {
        height,
        hash: hash.clone(),
    };
    let result = unpack_and_check(
        repo, manifest, &staging, options, &expected, progress, cancel,
    )
    .await;
    let (unpacked, databases_checked) = match result {
        Ok(done) => done,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let metadata = Metadata {
        backup_name: manifest.id.clone(),
        timestamp: manifest.created.clone(),
        latest_block_height: height,
        latest_block_hash: hash.clone(),
        source: options.source.clone(),
        restored_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let written = serde_json::to_vec_pretty(&metadata)
        .map_err(std::io::Error::other)
        .and_then(|body| confined::replace_file(&staging, METADATA_FILE, &body));
    if let Err(err) = written.and_then(|()| swap_in(&options.target, &staging)) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(anyhow::Error::new(err).context(format!(
            "swap the restored data into {}",
            options.target.display()
        )));
    }
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        target: options.target.display().to_string(),
        height,
        hash,
        files: unpacked.files,
        bytes: unpacked.bytes,
        databases_checked,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Checks the target and creates the staging directory in it.
fn prepare_target(
    target: &Path,
    force: bool,
    protected: &[confined::Protected],
) -> anyhow::Result<PathBuf> {
    confined::check_apart(target, protected).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(target).with_context(|| format!("create {}", target.display()))?;
    let mut others = Vec::new();
    for entry in std::fs::read_dir(target).with_context(|| format!("read {}", target.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREVIOUS_PREFIX) {
            bail!(
                "{} holds {name}: an earlier restore was interrupted while swapping and the previous \
                 data is in it; move it back or remove it, then restore again",
                target.display()
            );
        }
        if name.starts_with(STAGING_PREFIX) {
            // Left by a restore that was killed before its swap.
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("remove the stale {}", entry.path().display()))?;
            continue;
        }
        others.push(name);
    }
    if !others.is_empty() && !force {
        others.sort();
        bail!(
            "target {} is not empty ({}{}); pass --force to replace its contents",
            target.display(),
            others
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            if others.len() > 3 { ", ..." } else { "" }
        );
    }
    let staging = target.join(format!("{STAGING_PREFIX}{:016x}", rand::random::<u64>()));
    std::fs::create_dir(&staging).with_context(|| format!("create {}", staging.display()))?;
    Ok(staging)
}

/// A database check running beside the unpacker: integrity, and for the chain its head.
type Check = std::thread::JoinHandle<Result<Option<sqlite::Head>, String>>;

/// Streams the manifest through a pipe into the unpacker (a blocking thread). Each database is
/// checked on its own thread as soon as it is unpacked, while the rest of the stream unpacks;
/// then every check must pass and the chain's head must be the manifest's. Returns what was
/// unpacked and the number of databases checked.
async fn unpack_and_check(
    repo: &Repository,
    manifest: &ComponentManifest,
    staging: &Path,
    options: &RestoreOptions,
    expected: &sqlite::Head,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<(confined::Unpacked, usize)> {
    let root = staging.to_owned();
    let chain = staging.join(&options.chain_db);
    let query = options.height_query.clone();
    let unpack = move |reader: &mut dyn std::io::Read| {
        let mut checks: Vec<(PathBuf, Check)> = Vec::new();
        let mut on_file = |path: &Path, size: u64| {
            if is_sqlite(path, size).unwrap_or(false) {
                let is_chain = path == chain;
                let (owned, query) = (path.to_owned(), query.clone());
                let check = std::thread::spawn(move || {
                    check_database(&owned, is_chain.then_some(query.as_str()))
                });
                checks.push((path.to_owned(), check));
            }
        };
        let flusher = Flusher::start(&root);
        let unpacked = confined::unpack(reader, &root, &mut on_file);
        drop(flusher);
        // Wait for every check, whatever happened, so no thread outlives the staging directory.
        let results: Vec<_> = checks
            .into_iter()
            .map(|(path, check)| {
                let result = check
                    .join()
                    .unwrap_or_else(|_| Err("the check panicked".to_owned()));
                (path, result)
            })
            .collect();
        (unpacked, results)
    };
    let fetched =
        aitbc_backup_repository::restore_with(repo, manifest, progress, cancel, unpack).await;
    let (unpacked, results) = fetched.with_context(|| format!("read backup {}", manifest.id))?;
    let unpacked = match unpacked {
        Ok(unpacked) => unpacked,
        Err(refused) => bail!(refused),
    };
    let mut head = None;
    for (path, result) in &results {
        match result {
            Ok(found) => head = head.or_else(|| found.clone()),
            Err(e) => bail!("restored database {}: {e}", relative(staging, path)),
        }
    }
    let head = head.with_context(|| {
        format!(
            "the backup holds no SQLite database at {} (ledger.chain_db)",
            options.chain_db
        )
    })?;
    if &head != expected {
        bail!(
            "restored chain ends at block {} {}, the backup recorded {} {}",
            head.height,
            head.hash,
            expected.height,
            expected.hash
        );
    }
    Ok((unpacked, results.len()))
}

/// Writes the restored data back to disk while it is being unpacked: a `syncfs` of the target's
/// filesystem every [`Flusher::EVERY`] until dropped (and a last one running is waited for). The
/// `syncfs` before the swap then finds little left to write: for 1 GB it had waited 0.6 s for
/// everything at the end, now 0-40 ms. (`sync_file_range` per file would be narrower, but is
/// not in safe bindings; during a restore the node is stopped, so there is little else to flush.)
/// Without a handle on the directory nothing is flushed early (the final `syncfs` still is).
struct Flusher(Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>);

impl Flusher {
    const EVERY: std::time::Duration = std::time::Duration::from_millis(100);

    fn start(dir: &Path) -> Flusher {
        let Ok(dir) = std::fs::File::open(dir) else {
            return Flusher(None);
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            loop {
                let _ = nix::unistd::syncfs(&dir);
                if stopped.recv_timeout(Flusher::EVERY)
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    return;
                }
            }
        });
        Flusher(Some((stop, thread)))
    }
}

/// Closing the channel stops the thread.
impl Drop for Flusher {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.0.take() {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// `PRAGMA integrity_check`, and for the chain database the hash chain and its head.
fn check_database(path: &Path, chain_query: Option<&str>) -> Result<Option<sqlite::Head>, String> {
    sqlite::integrity_check(path).map_err(|e| format!("fails integrity_check: {e}"))?;
    chain_query
        .map(|query| sqlite::check_chain(path, query).map_err(|e| format!("chain: {e}")))
        .transpose()
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Moves the target's entries into a `previous` directory and the staged ones into the target;
/// on failure moves everything back.
fn swap_in(target: &Path, staging: &Path) -> std::io::Result<()> {
    let previous = target.join(format!("{PREVIOUS_PREFIX}{:016x}", rand::random::<u64>()));
    std::fs::create_dir(&previous)?;
    let names = |dir: &Path| -> std::io::Result<Vec<std::ffi::OsString>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let text = name.to_string_lossy();
            if !text.starts_with(STAGING_PREFIX) && !text.starts_with(PREVIOUS_PREFIX) {
                names.push(name);
            }
        }
        Ok(names)
    };
    let old = names(target)?;
    let moved_out = move_all(&old, target, &previous)?;
    let new = names(staging)?;
    if let Err(err) = move_all(&new, staging, target) {
        // Put the old data back; the staged entries already moved go back to staging first.
        let _ = move_all(&new, target, staging);
        let _ = move_all(&moved_out, &previous, target);
        let _ = std::fs::remove_dir(&previous);
        return Err(err);
    }
    // Everything restored reaches the disk before the previous data goes: a crash before this
    // point leaves the previous directory, which a new restore refuses to pass over (above).
    nix::unistd::syncfs(std::fs::File::open(target)?).map_err(std::io::Error::from)?;
    std::fs::remove_dir(staging)?;
    std::fs::remove_dir_all(&previous)
}

/// Renames `names` from `from` to `to`; on failure moves back what it moved and fails.
fn move_all(
    names: &[std::ffi::OsString],
    from: &Path,
    to: &Path,
) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut moved = Vec::new();
    for name in names {
        if let Err(err) = std::fs::rename(from.join(name), to.join(name)) {
            for back in &moved {
                let _ = std::fs::rename(to.join(back), from.join(back));
            }
            return Err(err);
        }
        moved.push(name.clone());
    }
    Ok(moved)
}
