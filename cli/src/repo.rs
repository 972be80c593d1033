//! `aitbc-backup repo ...`: direct repository access, no coordinator needed. This is also the
//! disaster-recovery path: everything needed to read backups is the repository URL and a key.

mod check;
mod init;
mod keys;
mod wal;

use crate::output::{errln, outln};
use check::{run_extend_locks, run_gc, run_verify};
use init::{InitArgs, run_init};
use keys::{KeysCommand, run_keys};
use wal::{WalCommand, run_wal};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aitbc_backup_repository::storage::StorageLimits;
use aitbc_backup_repository::{
    BackupRequest, Damaged, DamagedKind, KeySecret, Progress, RepoSettings, RepoUrl, Repository,
    S3Options, Storage, open,
};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::output::print_table;

#[derive(clap::Args)]
pub struct RepoArgs {
    /// file:///path or s3://bucket[/prefix].
    #[arg(long, env = "AITBC_CLI_REPOSITORY")]
    repository: String,
    /// S3 endpoint URL (S3-compatible servers); default AWS.
    #[arg(long, env = "AITBC_CLI_S3_ENDPOINT")]
    endpoint: Option<String>,
    /// S3 region (default from the AWS configuration, else us-east-1).
    #[arg(long, env = "AITBC_CLI_S3_REGION")]
    region: Option<String>,
    /// Path-style S3 addressing (most S3-compatible servers need it).
    #[arg(long, env = "AITBC_CLI_S3_PATH_STYLE")]
    path_style: bool,
    /// Server-side encryption: AES256, aws:kms or aws:kms:<key-id>.
    #[arg(long, env = "AITBC_CLI_S3_SSE")]
    sse: Option<String>,
    /// File holding the repository passphrase (or set AITBC_CLI_PASSPHRASE).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Key file opening the repository.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// zstd level 1..=19 (COMPRESSION_LEVEL of the old scripts).
    #[arg(long, env = "COMPRESSION_LEVEL", default_value_t = 3)]
    compression_level: i32,
    /// Upload limit, bytes per second with an optional K/M/G suffix (powers of 1024).
    #[arg(long, value_parser = parse_rate)]
    limit_upload: Option<u64>,
    /// Parallel chunk uploads.
    #[arg(long, default_value_t = 8)]
    upload_concurrency: usize,
    /// Parallel chunk downloads (0: 4 for a local directory, 16 for S3).
    #[arg(long, default_value_t = 0)]
    download_concurrency: usize,
    /// Read the repository as it was at this time (RFC 3339, e.g. 2026-12-07T10:15:03Z):
    /// every listing and read picks the object versions current then. Read-only; needs an S3
    /// bucket with versioning (a repository with an object lock has it).
    #[arg(long, value_parser = parse_time)]
    as_of: Option<std::time::SystemTime>,
    #[command(subcommand)]
    command: RepoCommand,
}

#[derive(clap::Subcommand)]
enum RepoCommand {
    /// Create a repository (encrypted with --encrypt and a passphrase or key file; every
    /// object locked with --object-lock).
    Init(InitArgs),
    /// Back up standard input as a stream named NAME; prints the manifest id.
    Put {
        name: String,
        /// What the stream is (raw, tar, pg_dump, rdb).
        #[arg(long, default_value = "raw")]
        stream: String,
    },
    /// Restore a manifest's stream to standard output or, atomically, to a file.
    Cat {
        id: String,
        /// Write to this file (complete and verified, or not at all); an existing file is
        /// refused unless --force.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Replace the --output file if it exists.
        #[arg(long, requires = "output")]
        force: bool,
    },
    /// List component manifests; a damaged one is listed as DAMAGED (and named on stderr),
    /// the others as usual, exit code 0.
    Ls,
    /// Show one manifest.
    Show { id: String },
    /// Check the repository; exit code 1 when anything is missing or corrupt.
    Verify {
        /// Also download and check every chunk's content.
        #[arg(long)]
        read_data: bool,
    },
    /// Extend the Object Locks of everything kept backups need (gc does it too).
    ExtendLocks,
    /// Remove chunks no manifest references, once unreferenced for the grace period.
    Gc {
        #[arg(long)]
        dry_run: bool,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        grace: Duration,
    },
    /// Delete a component manifest (its data goes with the next GC).
    Forget { id: String },
    /// Manage encryption keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Archived PostgreSQL WAL and base backups (point-in-time recovery).
    #[command(subcommand)]
    Wal(WalCommand),
}

/// RFC 3339 with any offset (`2026-12-07T10:15:03Z`, `...+01:00`), or without one as UTC
/// (`2026-12-07 10:15:03`).
fn parse_time(text: &str) -> Result<std::time::SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(std::time::SystemTime::from)
        .or_else(|_| humantime::parse_rfc3339_weak(text))
        .map_err(|_| format!("`{text}` is not a time like 2026-12-07T10:15:03Z"))
}

fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text
        .trim()
        .trim_end_matches("/s")
        .trim_end_matches('B')
        .trim_end_matches('i');
    let (digits, multiplier) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 1 << 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    let value: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a rate like 20M or 500K"))?;
    Ok(value * multiplier)
}

fn read_secret_file(path: &PathBuf, passphrase: bool) -> anyhow::Result<KeySecret> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if passphrase {
        let text =
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
        let text = text.trim_end_matches(['\n', '\r']).to_owned();
        if text.is_empty() {
            bail!("passphrase file {} is empty", path.display());
        }
        Ok(KeySecret::Passphrase(text))
    } else {
        if bytes.len() < 16 {
            bail!(
                "key file {} holds {} bytes; at least 16 are needed",
                path.display(),
                bytes.len()
            );
        }
        Ok(KeySecret::KeyFile(bytes))
    }
}

pub(crate) fn secret_from(
    passphrase_file: &Option<PathBuf>,
    key_file: &Option<PathBuf>,
    env_var: &str,
) -> anyhow::Result<Option<KeySecret>> {
    match (passphrase_file, key_file) {
        (Some(_), Some(_)) => bail!("give either a passphrase file or a key file, not both"),
        (Some(path), None) => Ok(Some(read_secret_file(path, true)?)),
        (None, Some(path)) => Ok(Some(read_secret_file(path, false)?)),
        (None, None) => Ok(std::env::var(env_var)
            .ok()
            .filter(|p| !p.is_empty())
            .map(KeySecret::Passphrase)),
    }
}

impl RepoArgs {
    async fn storage(&self) -> anyhow::Result<Storage> {
        let url =
            RepoUrl::parse(&self.repository).map_err(|e| anyhow::anyhow!("--repository: {e}"))?;
        let sse = self
            .sse
            .as_deref()
            .map(open::parse_sse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--sse: {e}"))?;
        let s3 = S3Options {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            sse,
        };
        let storage = open::open_storage(&url, &s3, StorageLimits::default()).await?;
        Ok(match self.as_of {
            Some(time) => storage.as_of(time),
            None => storage,
        })
    }

    fn secret(&self) -> anyhow::Result<Option<KeySecret>> {
        secret_from(
            &self.passphrase_file,
            &self.key_file,
            "AITBC_CLI_PASSPHRASE",
        )
    }

    fn settings(&self) -> anyhow::Result<RepoSettings> {
        if !(1..=19).contains(&self.compression_level) {
            bail!(
                "--compression-level {} is out of range 1..=19",
                self.compression_level
            );
        }
        Ok(RepoSettings {
            compression_level: self.compression_level,
            upload_concurrency: self.upload_concurrency.max(1),
            download_concurrency: self.download_concurrency,
            limit_upload_bytes_per_sec: self.limit_upload,
        })
    }

    async fn open(&self, cancel: &CancellationToken) -> anyhow::Result<Repository> {
        let storage = self.storage().await?;
        let secret = self.secret()?;
        Ok(Repository::open(storage, secret.as_ref(), cancel)
            .await?
            .with_settings(self.settings()?))
    }
}

pub async fn run(args: RepoArgs, json: bool) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });
    match &args.command {
        RepoCommand::Init(init) => run_init(&args, init, json, &cancel).await?,
        RepoCommand::Put { name, stream } => {
            let repo = args.open(&cancel).await?;
            let progress = Arc::new(Progress::default());
            let request = BackupRequest {
                name: name.clone(),
                stream: stream.clone(),
                ..Default::default()
            };
            let started = std::time::Instant::now();
            aitbc_backup_repository::widen_pipe(&std::io::stdin());
            let manifest = aitbc_backup_repository::backup(
                &repo,
                std::io::stdin(),
                request,
                progress,
                &cancel,
            )
            .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&summary(&manifest))?)?;
            } else {
                outln!("{}", manifest.id)?;
                errln!(
                    "{}: {} bytes in {} chunks, {} new ({} bytes stored) in {:.1}s",
                    manifest.name,
                    manifest.raw_size,
                    manifest.stats.chunks,
                    manifest.stats.new_chunks,
                    manifest.stats.new_stored_bytes,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        RepoCommand::Cat { id, output, force } => {
            // Checked before anything is downloaded; without --force the restore also refuses a
            // file that appears meanwhile (it publishes with a hard link, not a rename).
            if let Some(path) = output
                && let Ok(meta) = std::fs::symlink_metadata(path)
            {
                if !force {
                    bail!(
                        "{} already exists; pass --force to replace it, or choose another --output",
                        path.display()
                    );
                }
                // --force replaces a regular file, nothing else: a device, a FIFO or a link
                // would be replaced by a file (the output never reaching it), a directory lost.
                if !meta.file_type().is_file() {
                    bail!(
                        "{} is not a regular file ({}); --force replaces only regular files: write \
                         to standard output instead (`repo cat {id} > {}`)",
                        path.display(),
                        describe_file_type(&meta.file_type()),
                        path.display()
                    );
                }
            }
            let repo = args.open(&cancel).await?;
            let manifest = repo.component(id, &cancel).await?;
            let progress = Arc::new(Progress::default());
            match output {
                Some(path) if *force => {
                    aitbc_backup_repository::restore_to_file(
                        &repo, &manifest, path, progress, &cancel,
                    )
                    .await?
                }
                Some(path) => aitbc_backup_repository::restore_to_new_file(
                    &repo, &manifest, path, progress, &cancel,
                )
                .await
                .map_err(|err| match &err {
                    aitbc_backup_repository::RepoError::Io(io)
                        if io.kind() == std::io::ErrorKind::AlreadyExists =>
                    {
                        anyhow::anyhow!("{io}; pass --force to replace it")
                    }
                    _ => err.into(),
                })?,
                None => {
                    aitbc_backup_repository::restore(
                        &repo,
                        &manifest,
                        crate::output::Stdout::new(),
                        progress,
                        &cancel,
                    )
                    .await?
                }
            }
        }
        RepoCommand::Ls => {
            let repo = args.open(&cancel).await?;
            let scanned = repo.scan_components(&cancel).await?;
            let manifests = &scanned.good;
            if json {
                let list: Vec<_> = manifests
                    .iter()
                    .map(|m| {
                        let mut entry = summary(m);
                        entry["damaged"] = false.into();
                        entry
                    })
                    .chain(scanned.damaged.iter().map(damaged_summary))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let damaged_rows = scanned.damaged.iter().map(|d| {
                    let mut row = vec![d.id.clone(), "DAMAGED".to_owned()];
                    row.resize(7, "-".to_owned());
                    row
                });
                let rows: Vec<Vec<String>> = manifests
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.name.clone(),
                            m.stream.clone(),
                            m.created.clone(),
                            m.raw_size.to_string(),
                            m.stats.chunks.to_string(),
                            m.stats.new_stored_bytes.to_string(),
                        ]
                    })
                    .chain(damaged_rows)
                    .collect();
                print_table(
                    &[
                        "ID",
                        "NAME",
                        "STREAM",
                        "CREATED",
                        "BYTES",
                        "CHUNKS",
                        "NEW STORED",
                    ],
                    &rows,
                )?;
            }
            // The good backups are listed (exit 0); each damaged one is named on stderr too.
            for damaged in &scanned.damaged {
                errln!(
                    "warning: {damaged}; its backup cannot be restored. `aitbc-backup repo verify` checks the rest"
                );
            }
        }
        RepoCommand::Show { id } => {
            let repo = args.open(&cancel).await?;
            let manifest = repo.component(id, &cancel).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&manifest)?)?;
            } else {
                let s = summary(&manifest);
                for (key, value) in s.as_object().into_iter().flatten() {
                    outln!("{key:<16} {}", value.to_string().trim_matches('"'))?;
                }
            }
        }
        RepoCommand::Verify { read_data } => {
            let repo = args.open(&cancel).await?;
            run_verify(&repo, *read_data, json, &cancel).await?
        }
        RepoCommand::ExtendLocks => {
            let repo = args.open(&cancel).await?;
            run_extend_locks(&repo, json, &cancel).await?
        }
        RepoCommand::Gc { dry_run, grace } => {
            let repo = args.open(&cancel).await?;
            run_gc(&repo, *grace, *dry_run, json, &cancel).await?
        }
        RepoCommand::Forget { id } => {
            let repo = args.open(&cancel).await?;
            // A damaged manifest can be forgotten too: that is how an operator removes it
            // deliberately so that GC can run again.
            if let Err(err) = repo.component(id, &cancel).await {
                match Damaged::from_error(DamagedKind::ComponentManifest, id, &err) {
                    Some(damaged) => errln!("{damaged}; forgetting it"),
                    None => return Err(err.into()),
                }
            }
            repo.delete_component(id, &cancel).await?;
            outln!("forgot {id}; its data is removed by the next gc after the grace period")?;
        }
        RepoCommand::Keys(command) => run_keys(&args, command, json, &cancel).await?,
        RepoCommand::Wal(command) => {
            let repo = args.open(&cancel).await?;
            run_wal(&repo, command, json, &cancel).await?
        }
    }
    Ok(())
}

/// A damaged component manifest in `ls --json`: its id, key and why it cannot be read.
fn damaged_summary(d: &Damaged) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "damaged": true,
        "object": d.object,
        "reason": d.reason,
    })
}

fn summary(m: &aitbc_backup_repository::manifest::ComponentManifest) -> serde_json::Value {
    serde_json::json!({
        "id": m.id,
        "name": m.name,
        "stream": m.stream,
        "created": m.created,
        "raw_size": m.raw_size,
        "chunks": m.stats.chunks,
        "new_chunks": m.stats.new_chunks,
        "new_stored_bytes": m.stats.new_stored_bytes,
    })
}

/// What kind of file a path is, for messages.
fn describe_file_type(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}
