//! Continuous WAL archiving. `pg_receivewal` streams the server's WAL over a replication
//! connection into a spool directory (through a replication slot, so the server keeps what is not
//! archived yet); this task stores every completed segment and history file in the repository
//! and then removes it from the spool, and uploads the segment being written every
//! `partial_interval` when it changed — which bounds what is lost with the server to that
//! interval. A receiver that exits is restarted with backoff; gaps in the archived sequence and
//! timeline switches are logged and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use aitbc_backup_backoff::Backoff;
use aitbc_backup_repository::Repository;
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::wal::{self, Catalog, Segment, WalFile, WalWriter};
use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::PostgresSettings;
use super::server::{Server, wal_segment_size};
use crate::metrics::WalMetrics;

const RESTART: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// Archives until `cancel` fires; then stops the receiver and uploads what it flushed.
pub async fn run(
    settings: &PostgresSettings,
    repo: Repository,
    metrics: WalMetrics,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let spool = settings.wal_spool_dir();
    tokio::fs::create_dir_all(&spool)
        .await
        .with_context(|| format!("create the WAL spool directory {}", spool.display()))?;
    let mut uploader = Uploader::start(repo.clone(), &spool, metrics.clone(), &cancel).await?;
    let base_backups = (!settings.wal.base_backup_every.is_zero()).then(|| {
        let (settings, cancel, metrics) = (settings.clone(), cancel.clone(), metrics.clone());
        let streaming = uploader.streaming.clone();
        tokio::spawn(async move {
            // A base backup is only restorable if the WAL from its start is archived: wait
            // until the receiver writes WAL (its start is then at or before any new backup's).
            while !streaming.load(Ordering::Relaxed) {
                if !aitbc_backup_backoff::sleep_or_cancel(Duration::from_millis(200), &cancel).await
                {
                    return;
                }
            }
            base_backups(&settings, &repo, &metrics, &cancel).await
        })
    });
    let mut attempt = 0;
    while !cancel.is_cancelled() {
        let started = std::time::Instant::now();
        let outcome = receive(settings, &spool, &mut uploader, &cancel).await;
        uploader.pass(&cancel).await;
        if started.elapsed() > STREAMED_WELL {
            attempt = 0;
        }
        match outcome {
            Ok(()) => break,
            Err(err) => {
                metrics.receiver_restarts.inc();
                let delay = RESTART.delay(attempt);
                attempt += 1;
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?delay, "WAL receiver stopped");
                if cannot_resume(&format!("{err:#}")) {
                    // What the spool holds is stored (the pass above); start again from where
                    // the server can stream. A gap this leaves is reported with the next segment.
                    tracing::warn!(spool = %spool.display(), "the server cannot stream from the spool's position (a restored or rewound server); restarting the stream from the server's");
                    clear_spool(&spool).await?;
                    uploader.partials.clear();
                }
                if !aitbc_backup_backoff::sleep_or_cancel(delay, &cancel).await {
                    break;
                }
            }
        }
    }
    uploader.pass(&CancellationToken::new()).await;
    if let Some(task) = base_backups {
        let _ = task.await;
    }
    Ok(())
}

/// Takes a base backup whenever the newest is older than `base_backup_every` (at once when
/// there is none), then keeps `keep_base_backups` of them and the WAL they need.
async fn base_backups(
    settings: &PostgresSettings,
    repo: &Repository,
    metrics: &WalMetrics,
    cancel: &CancellationToken,
) {
    let every = settings.wal.base_backup_every;
    while !cancel.is_cancelled() {
        let wait = match newest_base_backup_age(settings, repo, cancel).await {
            Ok(Some(age)) if age < every => every - age,
            Ok(_) => match take_base_backup(settings, repo, cancel).await {
                Ok(()) => {
                    metrics.last_base_backup.set(unix_now());
                    every
                }
                Err(err) => {
                    tracing::error!(error = %format!("{err:#}"), retry_in = ?RETRY_BASE_BACKUP, "base backup failed");
                    RETRY_BASE_BACKUP
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "could not list base backups");
                RETRY_BASE_BACKUP
            }
        };
        // Checked again at least hourly: an operator may have taken one meanwhile.
        if !aitbc_backup_backoff::sleep_or_cancel(wait.min(Duration::from_secs(3600)), cancel).await
        {
            return;
        }
    }
}

/// One base backup, then retention of base backups and WAL.
async fn take_base_backup(
    settings: &PostgresSettings,
    repo: &Repository,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let label = Label::new("postgres-base");
    let report = Box::pin(super::base_backup::base_backup(
        repo,
        settings,
        &label,
        Arc::default(),
        cancel,
    ))
    .await?;
    tracing::info!(manifest = %report.manifest, start_lsn = %report.start_lsn, seconds = report.seconds, "base backup stored");
    let stamp = last_base_backup_stamp(settings);
    if let Err(err) = tokio::fs::write(&stamp, chrono::Utc::now().to_rfc3339()).await {
        tracing::warn!(path = %stamp.display(), error = %err, "could not record the base backup's time");
    }
    if !repo.reads_manifests() {
        // A writer credential reads no manifest, so it cannot tell which base backups and WAL
        // are old: retention is the operator's (`repo wal retain`) in a sealed repository.
        tracing::warn!(
            keep = settings.wal.keep_base_backups,
            "base backup and WAL retention skipped: this agent's writer credential reads no \
             manifests; run `aitbc-backup repo wal retain --keep N` with an operator's key"
        );
        return Ok(());
    }
    let retained = wal::retain(repo, settings.wal.keep_base_backups, cancel)
        .await
        .context("retention of base backups and WAL")?;
    tracing::info!(deleted = ?retained.deleted_base_backups, segments = retained.pruned.segments, "older base backups and their WAL removed");
    Ok(())
}

const RETRY_BASE_BACKUP: Duration = Duration::from_secs(300);
/// A receiver that ran this long before it stopped starts the backoff afresh.
const STREAMED_WELL: Duration = Duration::from_secs(60);

/// Where the agent notes when it last took a base backup: what a writer credential, which
/// reads no manifest, goes by (lost with the scratch directory: one base backup early).
fn last_base_backup_stamp(settings: &PostgresSettings) -> std::path::PathBuf {
    settings.scratch_dir.join("last-base-backup")
}

async fn newest_base_backup_age(
    settings: &PostgresSettings,
    repo: &Repository,
    cancel: &CancellationToken,
) -> Result<Option<Duration>, aitbc_backup_repository::RepoError> {
    let newest = if repo.reads_manifests() {
        wal::base_backups(repo, cancel)
            .await?
            .into_iter()
            .filter_map(|b| chrono::DateTime::parse_from_rfc3339(&b.manifest.created).ok())
            .max()
    } else {
        tokio::fs::read_to_string(last_base_backup_stamp(settings))
            .await
            .ok()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok())
    };
    Ok(newest.map(|at| {
        (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
            .to_std()
            .unwrap_or_default()
    }))
}

/// One life of `pg_receivewal`: uploads every interval while it runs. Ok when cancelled.
async fn receive(
    settings: &PostgresSettings,
    spool: &Path,
    uploader: &mut Uploader,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let (server, admin, info) = Server::open(settings).await?;
    uploader.set_segment_size(wal_segment_size(&admin).await?);
    drop(admin);
    claim_spool(spool, &info.system_identifier, uploader).await?;
    let slot = &settings.wal.slot;
    if !slot.is_empty() {
        let output = server
            .tool("pg_receivewal")
            .args([
                "--create-slot",
                "--if-not-exists",
                "--slot",
                slot,
                "--no-password",
            ])
            .output()
            .context("run pg_receivewal --create-slot")?;
        super::server::check_output("pg_receivewal --create-slot", output)?;
    }
    let mut command = tokio::process::Command::from(server.tool("pg_receivewal"));
    command
        .arg("--directory")
        .arg(spool)
        .args(["--no-loop", "--no-password", "--status-interval=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if !slot.is_empty() {
        command.args(["--slot", slot]);
    }
    let mut child = command.spawn().context("start pg_receivewal")?;
    let mut stderr = child.stderr.take().context("pg_receivewal stderr")?;
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    tracing::info!(spool = %spool.display(), slot = %slot, "WAL receiver started");
    let mut tick = tokio::time::interval(settings.wal.partial_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tick.tick() => uploader.pass(cancel).await,
            _ = cancel.cancelled() => {
                // SIGINT: pg_receivewal flushes what it received and exits.
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGINT,
                    );
                }
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                return Ok(());
            }
        }
    };
    let text = errors.await.unwrap_or_default();
    anyhow::bail!("pg_receivewal exited ({status}): {}", text.trim())
}

/// Whether `pg_receivewal` failed because the server cannot stream from where the spool ends.
fn cannot_resume(error: &str) -> bool {
    error.contains("has already been removed")
        || error.contains("ahead of the WAL flush position")
        || error.contains("is not in this server's history")
}

/// Removes the WAL files of the spool (not its marker).
async fn clear_spool(spool: &Path) -> anyhow::Result<usize> {
    let mut entries = tokio::fs::read_dir(spool).await?;
    let mut removed = 0;
    while let Some(entry) = entries.next_entry().await? {
        if !entry.file_name().to_string_lossy().starts_with('.') {
            tokio::fs::remove_file(entry.path()).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The spool holds the WAL of one server: `pg_receivewal` resumes from the newest file in it,
/// so files of another cluster (a reused scratch directory) would make it ask for a position
/// this server never had. Such files are removed (they are not this server's WAL).
async fn claim_spool(
    spool: &Path,
    system_identifier: &str,
    uploader: &mut Uploader,
) -> anyhow::Result<()> {
    let marker = spool.join(".system_identifier");
    let owner = tokio::fs::read_to_string(&marker).await.unwrap_or_default();
    if owner.trim() == system_identifier {
        return Ok(());
    }
    let removed = clear_spool(spool).await?;
    if removed > 0 {
        tracing::warn!(
            spool = %spool.display(),
            files = removed,
            previous = %owner.trim(),
            system_identifier,
            "the WAL spool held another server's files; cleared"
        );
    }
    uploader.partials.clear();
    tokio::fs::write(&marker, system_identifier).await?;
    Ok(())
}

/// Moves what the receiver wrote into the repository.
struct Uploader {
    writer: WalWriter,
    spool: PathBuf,
    seg_size: u64,
    metrics: WalMetrics,
    /// Segments archived, before this run and by it.
    archived: std::collections::BTreeSet<String>,
    /// Set once the receiver has written any WAL.
    streaming: Arc<AtomicBool>,
    /// The newest segment stored, to notice gaps and timeline switches.
    last: Option<Segment>,
    /// Partial segments in the spool by name: the one being written, and the last one of an
    /// earlier timeline, which `pg_receivewal` leaves partial at a switch.
    partials: BTreeMap<String, Partial>,
}

/// A partial segment: its uploads so far and what its file looked like at the last.
#[derive(Default)]
struct Partial {
    uploads: Vec<WalFile>,
    seen: Option<(u64, SystemTime)>,
}

impl Uploader {
    async fn start(
        repo: Repository,
        spool: &Path,
        metrics: WalMetrics,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let catalog = Catalog::load(&repo, cancel)
            .await
            .context("list the archived WAL")?;
        Ok(Uploader {
            writer: WalWriter::new(repo),
            spool: spool.to_owned(),
            seg_size: 16 << 20,
            metrics,
            archived: catalog.segments.into_keys().collect(),
            streaming: Arc::default(),
            last: None,
            partials: BTreeMap::new(),
        })
    }

    /// The server's segment size, known once connected; finds the newest archived segment.
    fn set_segment_size(&mut self, seg_size: u64) {
        self.seg_size = seg_size;
        let newest = self
            .archived
            .iter()
            .filter_map(|name| Segment::parse(name, seg_size))
            .max_by_key(|s| (s.number, s.timeline));
        self.last = self.last.max(newest);
    }

    /// One pass over the spool; failures are logged and retried on the next pass (the files
    /// stay in the spool until stored).
    async fn pass(&mut self, cancel: &CancellationToken) {
        if let Err(err) = self.upload(cancel).await {
            self.metrics.upload_failures.inc();
            tracing::warn!(error = %format!("{err:#}"), "WAL upload failed; retrying");
        }
    }

    async fn upload(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let mut names = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.spool).await?;
        while let Some(entry) = entries.next_entry().await? {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        if names
            .iter()
            .any(|n| n.ends_with(".partial") || n.len() == 24)
        {
            self.streaming.store(true, Ordering::Relaxed);
        }
        for name in &names {
            if name.ends_with(".history") {
                let Some(timeline) = name
                    .strip_suffix(".history")
                    .and_then(|t| u32::from_str_radix(t, 16).ok())
                else {
                    continue;
                };
                self.store_file(WalFile::History(timeline), name, cancel)
                    .await?;
                tracing::info!(timeline, "timeline history archived");
            } else if let Some(segment) = Segment::parse(name, self.seg_size) {
                self.note_sequence(segment, name);
                self.store_file(WalFile::Segment(name.clone()), name, cancel)
                    .await?;
                self.metrics.archived_segments.inc();
                self.metrics.last_archived.set(unix_now());
                if let Some(done) = self.partials.remove(name) {
                    self.delete(&done.uploads, cancel).await;
                }
            }
        }
        for name in names.iter().filter_map(|n| n.strip_suffix(".partial")) {
            self.upload_partial(name, cancel).await?;
        }
        Ok(())
    }

    fn note_sequence(&mut self, segment: Segment, name: &str) {
        if let Some(last) = self.last {
            if segment.timeline != last.timeline {
                tracing::info!(
                    from = last.timeline,
                    to = segment.timeline,
                    segment = name,
                    "WAL timeline switch"
                );
            } else if segment.number > last.number + 1 {
                self.metrics.gaps.inc();
                tracing::error!(
                    after = %last.name(self.seg_size),
                    next = name,
                    missing = segment.number - last.number - 1,
                    "WAL gap: segments between these were never archived; point-in-time recovery cannot cross it until the next base backup"
                );
            }
        }
        if self
            .last
            .is_none_or(|l| (segment.number, segment.timeline) > (l.number, l.timeline))
        {
            self.last = Some(segment);
        }
    }

    /// Stores a spool file and removes it from the spool.
    async fn store_file(
        &mut self,
        file: WalFile,
        name: &str,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let path = self.spool.join(name);
        // Stored before a crash, before its spool file went: a completed segment never
        // changes, so it is not stored again (in a sealed repository this agent could not
        // even read the stored one to compare).
        if matches!(&file, WalFile::Segment(segment) if self.archived.contains(segment)) {
            tracing::info!(segment = name, "already archived; removed from the spool");
            tokio::fs::remove_file(&path).await?;
            return Ok(());
        }
        let data = tokio::fs::read(&path)
            .await
            .with_context(|| format!("read {}", path.display()))?;
        self.writer
            .store(&file, data, cancel)
            .await
            .with_context(|| format!("archive {name}"))?;
        if let WalFile::Segment(segment) = &file {
            self.archived.insert(segment.clone());
        }
        tokio::fs::remove_file(&path).await?;
        Ok(())
    }

    /// Uploads the segment being written if it changed since its last upload, then removes the
    /// uploads it supersedes.
    async fn upload_partial(
        &mut self,
        name: &str,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let path = self.spool.join(format!("{name}.partial"));
        let meta = tokio::fs::metadata(&path).await?;
        let seen = Some((meta.len(), meta.modified()?));
        let mut partial = self.partials.remove(name).unwrap_or_default();
        if partial.seen == seen {
            self.partials.insert(name.to_owned(), partial);
            return Ok(());
        }
        let data = tokio::fs::read(&path).await?;
        let file = WalFile::Partial {
            segment: name.to_owned(),
            micros: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
        };
        let stored = self.writer.store(&file, data, cancel).await;
        if stored.is_ok() {
            self.delete(&partial.uploads, cancel).await;
            partial.uploads = vec![file];
            partial.seen = seen;
        }
        self.partials.insert(name.to_owned(), partial);
        stored.with_context(|| format!("upload the partial segment {name}"))?;
        Ok(())
    }

    /// Removes superseded partial uploads (a failure leaves them to `repo wal prune`).
    async fn delete(&self, files: &[WalFile], cancel: &CancellationToken) {
        for file in files {
            if let Err(err) = self.writer.delete(file, cancel).await {
                tracing::debug!(error = %err, object = %file.path(), "could not remove a superseded partial upload");
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
