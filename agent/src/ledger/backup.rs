//! Backup of a node's data directory: prepare (find the databases), cut (capture every database
//! in one instant and read the head from the captured chain), upload (one tar stream; groups of
//! unchanged files reuse the previous backup's chunks).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::{ChunkRef, ConsistencyPoint, FileEntry};
use aitbc_backup_repository::{BackupRequest, ChunkSink, Progress, Repository, backup_with};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::archive::{self, Written};
use super::cache::{self, FileCache, GroupSpan};
use super::config::LedgerSettings;
use super::pages::{self, PageMap};
use super::scan::{self, Entry, Kind};
use super::sqlite::{self, Head};
use crate::scratch::ScratchDir;

/// The stream kind recorded in ledger manifests.
pub const STREAM: &str = "tar";

/// Ready to cut: the databases to capture are known.
pub struct Prepared {
    settings: LedgerSettings,
    /// Every database, opened (not yet in a transaction).
    databases: Vec<sqlite::Opened>,
    /// Writers held off every database ([`Prepared::fence`]); carried into the cut.
    fences: Vec<sqlite::WriteFence>,
}

/// The cut: a read transaction open on every database, and the head of the chain's.
pub struct Cut {
    settings: LedgerSettings,
    pub head: Head,
    /// When the read transactions were opened.
    pub at: Instant,
    snapshots: Vec<sqlite::OpenSnapshot>,
    fences: Vec<sqlite::WriteFence>,
}

/// The databases as captured: what the tar stream is made of.
struct Captured {
    settings: LedgerSettings,
    head: Head,
    /// From the cut to the end of the copies: how long writers could have been held up
    /// (rollback-journal mode).
    capture: Duration,
    databases: HashMap<String, Database>,
    workdir: ScratchDir,
}

/// A captured database: its snapshot, still open (WAL mode), or a copy of it.
enum Database {
    Snapshot(sqlite::OpenSnapshot),
    Copy(PathBuf),
}

/// What a ledger backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub manifest: String,
    pub height: u64,
    pub hash: String,
    pub files: usize,
    pub databases: usize,
    pub bytes_read: u64,
    pub bytes_reused: u64,
    pub stream_bytes: u64,
    pub new_stored_bytes: u64,
    pub capture_ms: f64,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

/// Checks the data directory and finds its databases.
pub fn prepare(settings: &LedgerSettings) -> anyhow::Result<Prepared> {
    let mut found = scan::scan(&settings.data_dir, &settings.include)
        .with_context(|| format!("scan {}", settings.data_dir.display()))?;
    let chain_db = chain_db_rel(settings);
    scan::one_name_per_database(&mut found, &settings.data_dir, &chain_db);
    let databases = found.databases();
    if !databases.contains(&chain_db) {
        bail!(
            "the chain database {chain_db} is not a SQLite database under {} (ledger.chain_db, ledger.include)",
            settings.data_dir.display()
        );
    }
    std::fs::create_dir_all(&settings.scratch_dir).with_context(|| {
        format!(
            "create ledger.scratch_dir {}",
            settings.scratch_dir.display()
        )
    })?;
    let busy = Duration::from_secs(settings.sqlite_busy_timeout_secs);
    let databases = databases
        .iter()
        .map(|rel| sqlite::open(&settings.data_dir.join(rel), rel, busy))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    Ok(Prepared {
        settings: settings.clone(),
        databases,
        fences: Vec::new(),
    })
}

fn chain_db_rel(settings: &LedgerSettings) -> String {
    archive::safe_relative(&settings.chain_db)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Prepared {
    /// `BEGIN IMMEDIATE` on every database: writers wait (their busy timeout) until
    /// [`Cut::release`] or `fence_max_pause`, whichever is first. Blocking.
    pub fn fence(&mut self) -> anyhow::Result<()> {
        if !self.fences.is_empty() {
            return Ok(());
        }
        let busy = Duration::from_secs(self.settings.sqlite_busy_timeout_secs);
        for database in &self.databases {
            let rel = &database.rel;
            let path = self.settings.data_dir.join(rel);
            let fence = sqlite::WriteFence::raise(&path, rel, busy, self.settings.fence_max_pause)
                .map_err(anyhow::Error::msg)?;
            self.fences.push(fence);
        }
        Ok(())
    }

    /// Starts a read transaction on every database at once (that instant is the cut) and reads
    /// the head inside the chain's. Blocking; the copies are made by the upload.
    pub fn cut(self) -> anyhow::Result<Cut> {
        let settings = self.settings;
        let snapshots = self
            .databases
            .into_iter()
            .map(sqlite::Opened::begin)
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let at = Instant::now();
        if self.fences.iter().any(|f| !f.holding()) {
            bail!(
                "the ledger fence ended at its deadline (ledger.fence_max_pause = {:?}) before the \
                 cut was taken, so the cut would not be exact; the set is aborted (a slow \
                 coordinator or agent: raise fence_max_pause or check their load)",
                settings.fence_max_pause
            );
        }
        let chain_db = chain_db_rel(&settings);
        let head = snapshots
            .iter()
            .find(|s| s.rel == chain_db)
            .context("the chain database vanished")?
            .head(&settings.height_query)
            .map_err(anyhow::Error::msg)?;
        Ok(Cut {
            settings,
            head,
            at,
            snapshots,
            fences: self.fences,
        })
    }
}

impl Cut {
    /// Lets fenced writers go; how long they were held (None when not fenced).
    pub fn release(&mut self) -> Option<Duration> {
        let fences = std::mem::take(&mut self.fences);
        fences.into_iter().map(sqlite::WriteFence::release).max()
    }

    /// Copies each snapshot that cannot be read while the node writes (rollback-journal mode)
    /// to the scratch directory, and checks the captured chain. Blocking.
    fn capture(mut self) -> anyhow::Result<Captured> {
        self.release();
        let settings = self.settings;
        let workdir = ScratchDir::create(&settings.scratch_dir, "ledger")?;
        let mut databases = HashMap::new();
        for (i, snapshot) in self.snapshots.into_iter().enumerate() {
            let rel = snapshot.rel.clone();
            let database = if snapshot.readable_in_place() {
                Database::Snapshot(snapshot)
            } else {
                let copy = snapshot
                    .copy_to(&workdir.path().join(format!("{i}.db")))
                    .map_err(anyhow::Error::msg)?;
                Database::Copy(copy)
            };
            databases.insert(rel, database);
        }
        let capture = self.at.elapsed();
        let chain_db = chain_db_rel(&settings);
        let copied_head = match &databases[&chain_db] {
            Database::Snapshot(snapshot) => snapshot.check_chain(&settings.height_query),
            Database::Copy(copy) => sqlite::check_chain(copy, &settings.height_query),
        }
        .map_err(|e| anyhow::anyhow!("the captured {chain_db} is not a sound chain: {e}"))?;
        if copied_head != self.head {
            bail!(
                "the captured {chain_db} ends at {copied_head:?}, its snapshot said {:?}",
                self.head
            );
        }
        Ok(Captured {
            settings,
            head: self.head,
            capture,
            databases,
            workdir,
        })
    }
}

/// What the producer hands back.
struct Produced {
    spans: Vec<GroupSpan>,
    /// The page map of each database, for the next backup.
    databases: HashMap<String, PageMap>,
    files: usize,
    warnings: Vec<String>,
}

impl Cut {
    /// Copies the snapshots out, streams the data directory into the repository and commits
    /// the component manifest.
    pub async fn upload(
        self,
        repo: &Repository,
        label: &Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<BackupReport> {
        let started = Instant::now();
        let captured = tokio::task::spawn_blocking(move || self.capture()).await??;
        Box::pin(captured.upload(repo, label, full_scan, progress, cancel, started)).await
    }
}

/// Stores the cache in the repository's writer state, so that losing the scratch directory
/// costs one full read and no more uploads (a writer credential reads no earlier backup to
/// rebuild it). A failure costs that, nothing else.
async fn keep_cache(repo: &Repository, cache: &FileCache, name: &str, cancel: &CancellationToken) {
    let stored = match cache.export() {
        Ok(bundle) => repo
            .put_writer_state(name, &bundle, cancel)
            .await
            .map_err(anyhow::Error::from),
        Err(err) => Err(err.into()),
    };
    if let Err(err) = stored {
        tracing::warn!(error = %format!("{err:#}"), "could not keep the file cache in the repository; losing the scratch directory will cost a full backup");
    }
}

/// Brings back the cache [`keep_cache`] stored, when the scratch directory lost it.
async fn restore_cache(
    repo: &Repository,
    name: &str,
    cache_path: &std::path::Path,
    data_dir: &std::path::Path,
    cancel: &CancellationToken,
) {
    match repo.writer_state(name, cancel).await {
        Ok(Some(bundle)) => match FileCache::import(&bundle, cache_path, data_dir) {
            Ok(()) => {
                tracing::info!(cache = %cache_path.display(), "file cache brought back from the repository")
            }
            Err(err) => {
                tracing::warn!(error = %err, "the file cache kept in the repository could not be used")
            }
        },
        Ok(None) => {}
        Err(err) => {
            tracing::warn!(error = %err, "could not read the file cache kept in the repository")
        }
    }
}

impl Captured {
    async fn upload(
        mut self,
        repo: &Repository,
        label: &Label,
        full_scan: bool,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
        started: Instant,
    ) -> anyhow::Result<BackupReport> {
        let settings = self.settings.clone();
        let cache_path = cache::path_for(&settings.scratch_dir, &settings.data_dir);
        let repo_id = repo.config().id.clone();
        let state_name = cache::state_name(&label.name, &settings.data_dir);
        if !full_scan && !cache_path.exists() {
            restore_cache(repo, &state_name, &cache_path, &settings.data_dir, cancel).await;
        }
        let (cache, cache_note) = if full_scan {
            (
                FileCache::default(),
                Some("--full-scan: every file is read".to_owned()),
            )
        } else {
            FileCache::load(&cache_path, &repo_id)
        };
        if let Some(note) = cache_note {
            tracing::info!(cache = %cache_path.display(), "{note}");
        }
        // Files are listed after the cut, so every file the captured chain refers to is there.
        let (root, include) = (settings.data_dir.clone(), settings.include.clone());
        let found = tokio::task::spawn_blocking(move || scan::scan(&root, &include))
            .await?
            .with_context(|| format!("scan {}", settings.data_dir.display()))?;
        let mut warnings = found.warnings;
        let mut entries = found.entries;
        // Other names of a captured database: the file is in the stream once, under the name
        // captured (see `scan::one_name_per_database`).
        let captured: HashMap<(u64, u64), String> = self
            .databases
            .keys()
            .filter_map(|rel| {
                let meta = std::fs::symlink_metadata(settings.data_dir.join(rel)).ok()?;
                let meta = scan::Meta::of(&meta);
                Some(((meta.dev, meta.inode), rel.clone()))
            })
            .collect();
        entries.retain(|e| {
            let alias = e.kind == Kind::Sqlite && !self.databases.contains_key(&e.path);
            match captured.get(&(e.meta.dev, e.meta.inode)).filter(|_| alias) {
                Some(keep) => {
                    warnings.push(format!(
                        "{} is another name (hard link) of the database {keep}; backed up once, as {keep}",
                        e.path
                    ));
                    false
                }
                None => true,
            }
        });
        let databases = std::mem::take(&mut self.databases);
        let database_count = databases.len();
        let dirs = Dirs {
            data: settings.data_dir.clone(),
            scratch: settings.scratch_dir.clone(),
        };
        let request = BackupRequest {
            name: label.name.clone(),
            set_id: label.set_id.clone(),
            stream: STREAM.to_owned(),
            consistency: Some(ConsistencyPoint::Ledger {
                height: self.head.height,
                hash: self.head.hash.clone(),
            }),
            files: Vec::new(),
        };
        let repo = &repo.with_compression_level(settings.compression_level);
        let (manifest, produced) =
            backup_with(repo, request, progress.clone(), cancel, move |sink| {
                produce(sink, &entries, &dirs, &databases, &cache)
            })
            .await
            .context("store the ledger stream")?;
        warnings.extend(produced.warnings);
        for warning in &warnings {
            tracing::warn!(manifest = %manifest.id, "{warning}");
        }
        let next = FileCache::from_backup(&repo_id, &manifest, &produced.spans, produced.databases);
        if let Err(err) = next.save(&cache_path, &settings.data_dir) {
            tracing::warn!(cache = %cache_path.display(), error = %err, "could not save the file cache; the next backup reads every file");
        }
        keep_cache(repo, &next, &state_name, cancel).await;
        drop(self.workdir);
        use std::sync::atomic::Ordering::Relaxed;
        Ok(BackupReport {
            manifest: manifest.id.clone(),
            height: self.head.height,
            hash: self.head.hash.clone(),
            files: produced.files,
            databases: database_count,
            bytes_read: progress.bytes_read.load(Relaxed),
            bytes_reused: progress.bytes_reused.load(Relaxed),
            stream_bytes: manifest.raw_size,
            new_stored_bytes: manifest.stats.new_stored_bytes,
            capture_ms: self.capture.as_secs_f64() * 1e3,
            seconds: started.elapsed().as_secs_f64(),
            warnings,
        })
    }
}

/// The data directory, and the scratch directory the page maps go to.
struct Dirs {
    data: PathBuf,
    scratch: PathBuf,
}

/// Writes the tar stream group by group, reusing cached chunks where a group is unchanged and
/// unchanged pages where a database is.
fn produce(
    sink: &mut ChunkSink,
    entries: &[Entry],
    dirs: &Dirs,
    databases: &HashMap<String, Database>,
    cache: &FileCache,
) -> std::io::Result<Produced> {
    let mut produced = Produced {
        spans: Vec::new(),
        databases: HashMap::new(),
        files: 0,
        warnings: Vec::new(),
    };
    for range in archive::groups(entries) {
        let members = &entries[range];
        let key = archive::group_key(members);
        sink.boundary()?;
        let start = sink.offset();
        let cached = key.as_deref().and_then(|k| reusable(cache, k, members));
        if let Some((chunks, index)) = cached
            && sink.reuse(chunks)?
        {
            for (entry, offset, size) in index {
                sink.index_file(FileEntry {
                    path: entry.path.clone(),
                    offset: start + offset,
                    size,
                    digest: None,
                });
                produced.files += 1;
            }
            produced.spans.push(GroupSpan {
                key,
                start,
                end: sink.offset(),
            });
            continue;
        }
        let mut unchanged = key.is_some();
        for entry in members {
            let offset = sink.offset();
            if entry.kind == Kind::Sqlite {
                let database = databases.get(&entry.path).ok_or_else(|| {
                    std::io::Error::other(format!(
                        "{} became a database after the cut; it is not part of this backup's cut",
                        entry.path
                    ))
                })?;
                let map_file = cache::new_page_map_path(&dirs.scratch, &dirs.data);
                let previous = cache.pages(&entry.path);
                let source = match database {
                    Database::Snapshot(snapshot) => pages::Source::Snapshot(snapshot),
                    Database::Copy(copy) => pages::Source::Copy(copy),
                };
                let written = pages::write_database(sink, entry, source, previous, &map_file)?;
                if let Some(map) = written.map {
                    produced.databases.insert(entry.path.clone(), map);
                }
                sink.index_file(FileEntry {
                    path: entry.path.clone(),
                    offset,
                    size: written.size,
                    digest: written.digest,
                });
                produced.files += 1;
                continue;
            }
            let source = dirs.data.join(&entry.path);
            match archive::write_entry(sink, entry, &source)? {
                Written::Entry {
                    size,
                    unchanged: same,
                } => {
                    unchanged &= same;
                    if entry.kind == Kind::File {
                        sink.index_file(FileEntry {
                            path: entry.path.clone(),
                            offset,
                            size,
                            digest: None,
                        });
                        produced.files += 1;
                    }
                }
                Written::Vanished => {
                    unchanged = false;
                    produced.warnings.push(format!(
                        "{} was removed during the backup; not included",
                        entry.path
                    ));
                }
            }
        }
        sink.boundary()?;
        produced.spans.push(GroupSpan {
            key: key.filter(|_| unchanged),
            start,
            end: sink.offset(),
        });
    }
    // The end-of-archive marker.
    sink.write_all(&[0u8; 1024])?;
    Ok(produced)
}

/// A cached group's chunks and file index (entry, offset in the group, size), if the chunks
/// add up to exactly the bytes its entries take.
type Reusable<'c, 'e> = (&'c [ChunkRef], Vec<(&'e Entry, u64, u64)>);

fn reusable<'c, 'e>(
    cache: &'c FileCache,
    key: &str,
    members: &'e [Entry],
) -> Option<Reusable<'c, 'e>> {
    let chunks = cache.get(key)?;
    let mut index = Vec::new();
    let mut offset = 0u64;
    for entry in members {
        let size = match entry.kind {
            Kind::File => entry.meta.size,
            _ => 0,
        };
        if entry.kind == Kind::File {
            index.push((entry, offset, size));
        }
        offset += archive::header(entry, size).ok()?.len() as u64 + archive::padded(size);
    }
    let cached: u64 = chunks.iter().map(|c| u64::from(c.stream_len())).sum();
    (cached == offset).then_some((chunks, index))
}

#[cfg(test)]
mod tests;
