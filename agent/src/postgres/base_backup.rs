//! Physical base backups: `pg_basebackup`'s tar stream straight into the repository (no WAL in
//! it: the archived WAL completes it). Content-defined chunks make consecutive base backups
//! store only the relation files that changed. The backup's WAL range comes from the stream
//! itself (`backup_label` and `backup_manifest`), and a backup whose tool failed is never
//! committed.

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use aitbc_backup_repository::backup::{BackupRequest, ChunkSink, Label, backup_with};
use aitbc_backup_repository::manifest::ConsistencyPoint;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::PostgresSettings;
use super::server::{Server, wal_segment_size};

pub const STREAM: &str = "pg_basebackup";
/// The largest `backup_manifest` read (it lists every file of the cluster).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct BaseBackupReport {
    pub manifest: String,
    pub start_lsn: String,
    pub end_lsn: String,
    pub timeline: u32,
    pub stream_bytes: u64,
    pub new_stored_bytes: u64,
    pub seconds: f64,
}

/// Takes a base backup of the configured server and commits it as a component manifest.
pub async fn base_backup(
    repo: &Repository,
    settings: &PostgresSettings,
    label: &Label,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<BaseBackupReport> {
    let started = Instant::now();
    let (server, admin, info) = Server::open(settings).await?;
    let wal_segment_size = wal_segment_size(&admin).await?;
    drop(admin);
    let mut child = server
        .tool("pg_basebackup")
        .args([
            "--pgdata=-",
            "--format=tar",
            "--wal-method=none",
            "--checkpoint=fast",
            "--no-password",
            "--label=aitbc-backup base backup",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start pg_basebackup")?;
    let stdout = child.stdout.take().context("pg_basebackup stdout")?;
    aitbc_backup_repository::widen_pipe(&stdout);
    let stderr = child.stderr.take().context("pg_basebackup stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    let request = BackupRequest {
        name: label.name.clone(),
        set_id: label.set_id.clone(),
        stream: STREAM.to_owned(),
        ..Default::default()
    };
    let identity = (info.system_identifier.clone(), info.version.clone());
    let stored = backup_with(repo, request, progress, cancel, move |sink| {
        let found = tee_tar(stdout, sink);
        let status = match &found {
            Ok(_) => child.wait()?,
            Err(_) => {
                let _ = child.kill();
                child.wait()?
            }
        };
        let errors = errors.join().unwrap_or_default();
        if !status.success() {
            return Err(std::io::Error::other(format!(
                "pg_basebackup failed ({status}): {}",
                errors.trim()
            )));
        }
        let (label, manifest) = found?;
        let point = base_point(&label, &manifest, wal_segment_size, identity)
            .map_err(std::io::Error::other)?;
        sink.set_consistency(point);
        Ok(())
    })
    .await;
    let (manifest, ()) = stored.context("store the base backup")?;
    let Some(ConsistencyPoint::PostgresBase {
        start_lsn,
        end_lsn,
        timeline,
        ..
    }) = manifest.consistency.clone()
    else {
        anyhow::bail!("base backup {} has no WAL range", manifest.id);
    };
    Ok(BaseBackupReport {
        manifest: manifest.id.clone(),
        start_lsn,
        end_lsn,
        timeline,
        stream_bytes: manifest.raw_size,
        new_stored_bytes: manifest.stats.new_stored_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Copies the tar stream into `sink` while reading `backup_label` and `backup_manifest` out
/// of it.
fn tee_tar(
    stdout: std::process::ChildStdout,
    sink: &mut ChunkSink,
) -> std::io::Result<(String, String)> {
    let mut archive = tar::Archive::new(Tee {
        inner: stdout,
        sink,
    });
    let (mut label, mut manifest) = (String::new(), String::new());
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path_bytes().into_owned();
        match path.as_slice() {
            b"backup_label" => {
                entry.read_to_string(&mut label)?;
            }
            b"backup_manifest" => {
                entry
                    .by_ref()
                    .take(MAX_MANIFEST_BYTES)
                    .read_to_string(&mut manifest)?;
            }
            _ => {}
        }
    }
    // The end-of-archive blocks and padding after the last entry belong to the stream too.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())?;
    Ok((label, manifest))
}

/// A reader that writes everything it reads into the backup.
struct Tee<'a, R> {
    inner: R,
    sink: &'a mut ChunkSink,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The WAL range: start from `backup_label`, end from the manifest's `WAL-Ranges`.
fn base_point(
    label: &str,
    manifest: &str,
    wal_segment_size: u64,
    (system_identifier, server_version): (String, String),
) -> Result<ConsistencyPoint, String> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let start_lsn = field("START WAL LOCATION:")
        .and_then(|v| v.split_whitespace().next())
        .ok_or("the base backup has no backup_label with START WAL LOCATION")?
        .to_owned();
    let timeline: u32 = field("START TIMELINE:")
        .and_then(|v| v.parse().ok())
        .ok_or("backup_label has no START TIMELINE")?;
    let parsed: serde_json::Value = serde_json::from_str(manifest)
        .map_err(|e| format!("the base backup's backup_manifest: {e}"))?;
    let end_lsn = parsed["WAL-Ranges"]
        .as_array()
        .and_then(|ranges| ranges.last())
        .and_then(|range| range["End-LSN"].as_str())
        .ok_or("backup_manifest has no WAL-Ranges End-LSN")?
        .to_owned();
    Ok(ConsistencyPoint::PostgresBase {
        start_lsn,
        end_lsn,
        timeline,
        wal_segment_size,
        system_identifier,
        server_version,
        finished: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wal_range_comes_from_label_and_manifest() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }]}"#;
        let point =
            base_point(label, manifest, 16 << 20, ("7".into(), "15.8".into())).expect("parsed");
        let ConsistencyPoint::PostgresBase {
            start_lsn,
            end_lsn,
            timeline,
            ..
        } = point
        else {
            panic!("not a base backup point");
        };
        assert_eq!(
            (start_lsn.as_str(), end_lsn.as_str(), timeline),
            ("0/2000028", "0/2000100", 1)
        );
        assert!(base_point("", manifest, 16 << 20, Default::default()).is_err());
    }
}
