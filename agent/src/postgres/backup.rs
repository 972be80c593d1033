//! Backup of a PostgreSQL server at a cut: `pg_dumpall --globals-only` (roles, tablespaces),
//! then `pg_dump --format=custom --compress=0 --snapshot=<exported>` of each database, one after
//! another into one stream. Each part starts a new chunk and is indexed in the manifest
//! (`globals.sql`, `databases/<name>.dump`), so a restore fetches any part on its own.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::FileEntry;
use aitbc_backup_repository::{BackupRequest, ChunkSink, Progress, Repository, backup_with};
use anyhow::Context;
use futures::future::try_join_all;
use tokio_util::sync::CancellationToken;

use super::cut::{self, Cut, Point};
use super::server::{Server, check_output, conninfo};

/// The stream kind recorded in PostgreSQL manifests.
pub const STREAM: &str = "pg_dump";
pub const GLOBALS: &str = "globals.sql";

/// The index path of a database's dump.
pub fn dump_path(database: &str) -> String {
    format!("databases/{database}.dump")
}

/// What a PostgreSQL backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub manifest: String,
    pub lsn: String,
    pub databases: Vec<String>,
    pub tables: usize,
    pub rows: u64,
    pub stream_bytes: u64,
    pub new_stored_bytes: u64,
    /// How long fenced writers were held, if fenced.
    pub write_pause_ms: Option<f64>,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

impl Cut {
    /// Streams globals and every database's dump into the repository, counting rows inside
    /// the exported snapshots meanwhile, and commits the manifest.
    pub async fn upload(
        self,
        repo: &Repository,
        label: &Label,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<BackupReport> {
        let started = Instant::now();
        let Cut {
            server,
            point,
            exporters,
            ..
        } = self;
        let request = BackupRequest {
            name: label.name.clone(),
            set_id: label.set_id.clone(),
            stream: STREAM.to_owned(),
            consistency: None,
            files: Vec::new(),
        };
        let (counts_tx, counts_rx) = std::sync::mpsc::channel();
        let counting =
            async {
                let counts =
                    try_join_all(point.databases.iter().map(|(db, exported)| {
                        cut::row_counts(&server, &db.name, &exported.snapshot)
                    }))
                    .await;
                let _ = counts_tx.send(counts.map_err(|e| format!("{e:#}")));
            };
        let producer_point = point.clone();
        let producer_server = server.clone();
        let storing = backup_with(repo, request, progress, cancel, move |sink| {
            produce(sink, &producer_server, &producer_point, counts_rx)
        });
        let (stored, ()) = tokio::join!(storing, counting);
        let (manifest, warnings) = stored.context("store the PostgreSQL stream")?;
        // The exporting transactions end only now: every dump has imported its snapshot.
        drop(exporters);
        let (tables, rows) = match &manifest.consistency {
            Some(aitbc_backup_repository::manifest::ConsistencyPoint::Postgres {
                databases,
                ..
            }) => databases.iter().fold((0, 0), |(t, r), db| {
                (
                    t + db.row_counts.len(),
                    r + db.row_counts.values().sum::<u64>(),
                )
            }),
            _ => (0, 0),
        };
        for warning in &warnings {
            tracing::warn!(manifest = %manifest.id, "{warning}");
        }
        Ok(BackupReport {
            manifest: manifest.id.clone(),
            lsn: point.lsn.clone(),
            databases: point
                .databases
                .iter()
                .map(|(db, _)| db.name.clone())
                .collect(),
            tables,
            rows,
            stream_bytes: manifest.raw_size,
            new_stored_bytes: manifest.stats.new_stored_bytes,
            write_pause_ms: None,
            seconds: started.elapsed().as_secs_f64(),
            warnings,
        })
    }
}

type Counts = Result<Vec<BTreeMap<String, u64>>, String>;

/// Writes the stream (on the pipeline's blocking thread); returns warnings.
fn produce(
    sink: &mut ChunkSink,
    server: &Server,
    point: &Point,
    counts: std::sync::mpsc::Receiver<Counts>,
) -> std::io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let globals = dump_globals(server, &mut warnings).map_err(std::io::Error::other)?;
    write_part(sink, GLOBALS, &mut globals.as_slice())?;
    for (db, exported) in &point.databases {
        let mut child = ChildGuard(
            server
                .tool("pg_dump")
                .args(["--format=custom", "--compress=0", "--no-sync"])
                .arg(format!("--snapshot={}", exported.snapshot))
                .arg(format!("--dbname={}", conninfo(&db.name)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| std::io::Error::other(format!("start pg_dump: {e}")))?,
        );
        let stderr = child.0.stderr.take().map(collect_stderr);
        let mut stdout = child
            .0
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("pg_dump stdout"))?;
        aitbc_backup_repository::widen_pipe(&stdout);
        let written = write_part(sink, &dump_path(&db.name), &mut stdout);
        // Closed first, so a pg_dump we stopped reading from exits instead of blocking.
        drop(stdout);
        let status = child.0.wait()?;
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        written?;
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "pg_dump of database `{}` failed ({status}): {}",
                db.name,
                stderr.trim()
            )));
        }
    }
    let counts = counts
        .recv()
        .map_err(|_| std::io::Error::other("row counting stopped"))?
        .map_err(std::io::Error::other)?;
    sink.set_consistency(point.record(counts));
    Ok(warnings)
}

/// Copies one part into the stream, starting a new chunk, and indexes it.
fn write_part(sink: &mut ChunkSink, path: &str, reader: &mut dyn Read) -> std::io::Result<()> {
    sink.boundary()?;
    let offset = sink.offset();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => sink.write_all(&buf[..n])?,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    sink.index_file(FileEntry {
        path: path.to_owned(),
        offset,
        size: sink.offset() - offset,
        digest: None,
    });
    Ok(())
}

/// Roles and tablespaces. Without the right to read passwords (not a superuser) they are
/// dumped without them, with a warning.
fn dump_globals(server: &Server, warnings: &mut Vec<String>) -> anyhow::Result<Vec<u8>> {
    let run = |extra: &[&str]| {
        server
            .tool("pg_dumpall")
            .args(["--globals-only", "--no-sync"])
            .args(extra)
            .arg(format!("--dbname={}", conninfo(&server.maintenance_db)))
            .stdin(Stdio::null())
            .output()
            .context("start pg_dumpall")
    };
    let output = run(&[])?;
    if !output.status.success() && String::from_utf8_lossy(&output.stderr).contains("pg_authid") {
        warnings.push(
            "roles were dumped without passwords: the backup role cannot read pg_authid".to_owned(),
        );
        return check_output("pg_dumpall --globals-only", run(&["--no-role-passwords"])?);
    }
    check_output("pg_dumpall --globals-only", output)
}

fn collect_stderr(mut stderr: std::process::ChildStderr) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

/// Kills the child if the backup stops before it exits.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
