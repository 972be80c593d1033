//! Backup of a running Redis over its own replication protocol: the agent connects as an
//! RDB-only replica (`REPLCONF rdb-only 1`, `PSYNC ? -1`), the master forks (that instant is the
//! cut: `+FULLRESYNC <replid> <offset>`) and streams the RDB, which goes straight into the
//! repository while it is walked (counted, sampled, checked whole). No shared volume, no BGSAVE
//! file, no restart.

use std::io::BufReader;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ConsistencyPoint;
use aitbc_backup_repository::{BackupRequest, ChunkSink, Progress, Repository, backup_with};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::config::RedisSettings;
use super::rdb;
use super::resp::{Connection, Reply};
use super::sync::{Framing, Payload, Tee, read_header};

/// The stream kind recorded in Redis manifests.
pub const STREAM: &str = "rdb";

/// The server checked; nothing held yet.
pub struct Prepared {
    settings: RedisSettings,
    control: Connection,
    /// The replica link, announced (REPLCONF) already, so the cut is one PSYNC round trip.
    replica: Connection,
    version: String,
    used_memory: u64,
    /// Since when writers are paused on `control` ([`Prepared::fence`]).
    paused: Option<Instant>,
    /// The server saves with LZF and the agent may switch that off for its fork
    /// (`redis.plain_rdb`).
    plain_fork: bool,
}

/// The fork happened (Redis answers FULLRESYNC once it has forked); the RDB is waiting on
/// `replica`.
pub struct Cut {
    replica: Connection,
    /// zstd level of the stream (`redis.compression_level`; 0: the repository's).
    compression_level: i32,
    pub point: Point,
    /// Writers paused (fenced mode) since this instant, on this connection.
    fence: Option<(Connection, Instant)>,
    pub at: Instant,
}

/// Where the server was cut.
#[derive(Debug, Clone)]
pub struct Point {
    /// The master's replication id and offset at the fork.
    pub replid: String,
    pub offset: u64,
    pub version: String,
    pub used_memory: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub manifest: String,
    pub replid: String,
    pub offset: u64,
    pub version: String,
    pub keys: u64,
    pub databases: Vec<aitbc_backup_repository::manifest::RedisDb>,
    pub stream_bytes: u64,
    pub new_stored_bytes: u64,
    pub write_pause_ms: Option<f64>,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

pub fn prepare(settings: &RedisSettings) -> anyhow::Result<Prepared> {
    let mut control = Connection::open(settings)?;
    let server = control.info("server")?;
    let memory = control.info("memory")?;
    let mut replica = Connection::open(settings)?;
    replica.ok(&["REPLCONF", "capa", "eof", "capa", "psync2"])?;
    // Redis 7+: send only the RDB, not the command stream after it.
    if let Reply::Error(err) = replica.call(&[b"REPLCONF", b"rdb-only", b"1"])? {
        tracing::debug!(error = %err, "REPLCONF rdb-only not supported; the sync is closed after the RDB");
    }
    let plain_fork =
        settings.plain_rdb && control.config_get("rdbcompression")?.as_deref() == Some("yes");
    Ok(Prepared {
        settings: settings.clone(),
        plain_fork,
        control,
        replica,
        version: server.get("redis_version").cloned().unwrap_or_default(),
        used_memory: memory
            .get("used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        paused: None,
    })
}

impl Prepared {
    /// `CLIENT PAUSE <fence_max_pause> WRITE`: the server itself lets writers go at the deadline.
    pub fn fence(&mut self) -> anyhow::Result<()> {
        if self.paused.is_none() {
            let millis = self.settings.fence_max_pause.as_millis().to_string();
            // Taken before the command: the server's timer starts when it reads it.
            let since = Instant::now();
            self.control.ok(&["CLIENT", "PAUSE", &millis, "WRITE"])?;
            self.paused = Some(since);
        }
        Ok(())
    }

    /// Lets paused writers go without cutting (an aborted set). Blocking.
    pub fn unfence(&mut self) -> anyhow::Result<()> {
        if self.paused.take().is_some() {
            self.control.ok(&["CLIENT", "UNPAUSE"])?;
        }
        Ok(())
    }

    /// Pauses writers (fenced, unless paused already), then asks for a full sync: the fork is
    /// the cut.
    pub fn cut(mut self, fenced: bool) -> anyhow::Result<Cut> {
        if fenced {
            self.fence()?;
        }
        let fence = self.paused;
        let plain = self.plain_fork && self.control.config_set("rdbcompression", "no")?;
        let mut replica = self.replica;
        let reply = replica.ok(&["PSYNC", "?", "-1"]);
        let at = Instant::now();
        // The reply comes once the child is forked: the server's own setting applies again to
        // every later fork.
        if plain && !self.control.config_set("rdbcompression", "yes")? {
            bail!(
                "could not set rdbcompression back to yes on Redis at {}: set it by hand",
                self.control.address
            );
        }
        let reply = reply?.text();
        if let Some(since) = fence {
            let max = self.settings.fence_max_pause;
            if at.duration_since(since) >= max {
                bail!(
                    "the Redis pause ended at its deadline (redis.fence_max_pause = {max:?}) before \
                     the fork, so the cut would not be exact; the set is aborted (the server \
                     may have deferred the sync behind another BGSAVE: raise fence_max_pause)"
                );
            }
        }
        let mut words = reply.split_whitespace();
        let (Some("FULLRESYNC"), Some(replid), Some(offset)) =
            (words.next(), words.next(), words.next())
        else {
            bail!(
                "Redis at {} answered PSYNC with `{reply}`, not FULLRESYNC",
                replica.address
            );
        };
        let point = Point {
            replid: replid.to_owned(),
            offset: offset.parse().context("the FULLRESYNC offset")?,
            version: self.version,
            used_memory: self.used_memory,
        };
        Ok(Cut {
            replica,
            compression_level: self.settings.compression_level,
            point,
            fence: fence.map(|at| (self.control, at)),
            at,
        })
    }
}

impl Cut {
    /// Lets writers go (fenced mode); returns how long they were paused. Blocking.
    pub fn release(&mut self) -> anyhow::Result<Option<Duration>> {
        release(self.fence.take())
    }

    /// Streams the RDB into the repository and commits the manifest.
    pub async fn upload(
        self,
        repo: &Repository,
        label: &Label,
        progress: Arc<Progress>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<BackupReport> {
        let started = Instant::now();
        let request = BackupRequest {
            name: label.name.clone(),
            set_id: label.set_id.clone(),
            stream: STREAM.to_owned(),
            consistency: None,
            files: Vec::new(),
        };
        let Cut {
            mut replica,
            compression_level,
            point,
            fence,
            ..
        } = self;
        let repo = &repo.with_compression_level(compression_level);
        let recorded = point.clone();
        let (manifest, summary) = backup_with(repo, request, progress, cancel, move |sink| {
            // A fence nobody released ends here, on the blocking thread, before the transfer.
            release(fence).map_err(std::io::Error::other)?;
            // The payload's framing comes once the forked child starts sending: after the cut,
            // so the fence never waits for it.
            let framing = read_header(replica.raw()).map_err(std::io::Error::other)?;
            produce(sink, replica.raw(), framing, &recorded)
        })
        .await
        .context("store the RDB stream")?;
        let mut warnings = Vec::new();
        if let Some(note) = &summary.incomplete {
            warnings.push(note.clone());
        }
        let databases: Vec<_> = summary.databases.into_values().collect();
        Ok(BackupReport {
            manifest: manifest.id.clone(),
            replid: point.replid,
            offset: point.offset,
            version: point.version,
            keys: databases.iter().map(|d| d.keys).sum(),
            databases,
            stream_bytes: manifest.raw_size,
            new_stored_bytes: manifest.stats.new_stored_bytes,
            write_pause_ms: None,
            seconds: started.elapsed().as_secs_f64(),
            warnings,
        })
    }
}

/// `CLIENT UNPAUSE` on the fence's connection, if there is a fence; how long it held.
fn release(fence: Option<(Connection, Instant)>) -> anyhow::Result<Option<Duration>> {
    match fence {
        Some((mut control, since)) => {
            control.ok(&["CLIENT", "UNPAUSE"])?;
            Ok(Some(since.elapsed()))
        }
        None => Ok(None),
    }
}

/// Copies the payload into the pipeline while walking it; records the consistency point.
fn produce(
    sink: &mut ChunkSink,
    socket: &mut BufReader<std::net::TcpStream>,
    framing: Framing,
    point: &Point,
) -> std::io::Result<rdb::Summary> {
    let payload = Payload::new(socket, framing);
    let tee = Tee {
        input: payload,
        out: &mut *sink,
    };
    let mut buffered = BufReader::with_capacity(1 << 20, tee);
    let summary = rdb::walk(&mut buffered, None).map_err(std::io::Error::other)?;
    let rest = rdb::drain(&mut buffered)?;
    if rest > 0 && summary.incomplete.is_none() {
        return Err(std::io::Error::other(format!(
            "{rest} bytes follow the RDB's end marker"
        )));
    }
    sink.set_consistency(ConsistencyPoint::Redis {
        replid: point.replid.clone(),
        offset: point.offset,
        version: point.version.clone(),
        rdb_version: summary.version,
        used_memory: point.used_memory,
        databases: summary.databases.values().cloned().collect(),
        samples: summary.samples.clone(),
        counted: summary.incomplete.is_none(),
        uncompressed: summary.lzf_strings == 0,
    });
    Ok(summary)
}

/// Prepare, cut (releasing any fence at once) and upload: the standalone `backup` command.
pub async fn backup(
    repo: &Repository,
    settings: &RedisSettings,
    name: &str,
    fenced: bool,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<BackupReport> {
    let started = Instant::now();
    let settings = settings.clone();
    let (cut, pause) = tokio::task::spawn_blocking(move || {
        let mut cut = prepare(&settings)?.cut(fenced)?;
        let pause = cut.release()?;
        anyhow::Ok((cut, pause))
    })
    .await??;
    let mut report = Box::pin(cut.upload(repo, &Label::new(name), progress, cancel)).await?;
    report.write_pause_ms = pause.map(|p| p.as_secs_f64() * 1e3);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
