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
use super::sync::{Framing, Payload, PsyncLine, Tee, read_header, read_psync_line};

/// The stream kind recorded in Redis manifests.
pub const STREAM: &str = "rdb";

/// The server checked; nothing held yet.
pub struct Prepared {
    settings: RedisSettings,
    control: Connection,
    /// The replica link, announced (REPLCONF) already, so the cut is one PSYNC round trip
    /// unless the server defers the sync.
    replica: Connection,
    version: String,
    used_memory: u64,
    /// Since when writers are paused on `control` ([`Prepared::fence`]).
    paused: Option<Instant>,
    /// The server saves with LZF and the agent may switch that off for its fork
    /// (`redis.plain_rdb`).
    plain_fork: bool,
    /// The server's `repl-diskless-sync-delay` when it is diskless and delays: 0 for the
    /// agent's fork.
    diskless_delay: Option<String>,
}

/// The fork happened (Redis answers FULLRESYNC once it has forked, a deferred sync included);
/// the RDB is waiting on `replica`.
pub struct Cut {
    replica: Connection,
    /// zstd level of the stream (`redis.compression_level`; 0: the repository's).
    compression_level: i32,
    pub point: Point,
    /// Writers paused (fenced mode) since this instant, on this connection.
    fence: Option<(Connection, Instant)>,
    pub at: Instant,
    /// The server deferred the sync (keepalives before the fork) or shared an older RDB.
    pub deferred: bool,
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
    /// The server deferred the full sync (another replica's sync or a BGSAVE was running) and
    /// the cut is the later fork.
    pub sync_deferred: bool,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

pub fn prepare(settings: &RedisSettings) -> anyhow::Result<Prepared> {
    let mut control = Connection::open(settings)?;
    let server = control.info("server")?;
    let memory = control.info("memory")?;
    let replica = announce(settings)?;
    let plain_fork =
        settings.plain_rdb && control.config_get("rdbcompression")?.as_deref() == Some("yes");
    // A diskless master waits `repl-diskless-sync-delay` seconds (Redis 7: 5) for more replicas
    // before it forks; the agent's cut is now, so the delay is 0 for its request.
    let diskless_delay = match control.config_get("repl-diskless-sync")?.as_deref() {
        Some("yes") => control
            .config_get("repl-diskless-sync-delay")?
            .filter(|delay| delay != "0"),
        _ => None,
    };
    Ok(Prepared {
        settings: settings.clone(),
        plain_fork,
        diskless_delay,
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

/// Opens the replica link and announces it: EOF-framed (diskless) payloads, RDB only.
///
/// Not `capa psync2`: it only matters for a partial resync, which `PSYNC ? -1` never is, and
/// without it the master cannot attach this link to a disk BGSAVE a real replica started
/// earlier (it attaches only a replica with every capability of that one), whose RDB would
/// predate the cut; it forks anew for it instead.
fn announce(settings: &RedisSettings) -> anyhow::Result<Connection> {
    let mut replica = Connection::open(settings)?;
    replica.ok(&["REPLCONF", "capa", "eof"])?;
    // Redis 7+: send only the RDB, not the command stream after it.
    if let Reply::Error(err) = replica.call(&[b"REPLCONF", b"rdb-only", b"1"])? {
        tracing::debug!(error = %err, "REPLCONF rdb-only not supported; the sync is closed after the RDB");
    }
    Ok(replica)
}

/// The master's replication offset now (`master_repl_offset`).
fn master_offset(control: &mut Connection) -> anyhow::Result<u64> {
    Ok(control
        .info("replication")?
        .get("master_repl_offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Server settings the agent changes for its own fork only (`rdbcompression no`,
/// `repl-diskless-sync-delay 0`), from just before `PSYNC` until the master's first answer
/// (the fork, or a keepalive saying the sync is deferred, after which the server's settings
/// are what any later fork should use). [`ForkSettings::restore`] puts them back and fails
/// naming what could not be; dropped without it (an error in between), it puts them back too,
/// best effort. A process killed in between leaves them changed (docs/redis.md, "The server's
/// settings").
struct ForkSettings<'a> {
    control: &'a mut Connection,
    settings: &'a RedisSettings,
    /// (name, the server's value), in the order they were changed.
    changed: Vec<(&'static str, String)>,
}

impl<'a> ForkSettings<'a> {
    fn apply(
        control: &'a mut Connection,
        settings: &'a RedisSettings,
        wanted: &[(&'static str, &'static str, String)],
    ) -> anyhow::Result<ForkSettings<'a>> {
        let mut guard = ForkSettings {
            control,
            settings,
            changed: Vec::new(),
        };
        for (name, ours, theirs) in wanted {
            if guard.control.config_set(name, ours)? {
                guard.changed.push((name, theirs.clone()));
            }
        }
        Ok(guard)
    }

    /// Sets every changed setting back, on the control connection or, if that is gone, on a
    /// new one.
    fn restore(mut self) -> anyhow::Result<()> {
        self.put_back()
    }

    fn put_back(&mut self) -> anyhow::Result<()> {
        while let Some((name, value)) = self.changed.first().cloned() {
            let back = match self.control.config_set(name, &value) {
                Ok(true) => true,
                _ => Connection::open(self.settings)
                    .and_then(|mut fresh| fresh.config_set(name, &value))
                    .unwrap_or(false),
            };
            if !back {
                bail!(
                    "could not set {name} back to {value} on Redis at {}: set it by hand \
                     (CONFIG SET {name} {value})",
                    self.settings.address
                );
            }
            self.changed.remove(0);
        }
        Ok(())
    }
}

impl Drop for ForkSettings<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.put_back() {
            tracing::error!(error = %format!("{err:#}"), "Redis settings left changed");
        }
    }
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

    /// Pauses writers (fenced, unless paused already), then asks for a full sync as a replica
    /// does and waits for the fork, which is the cut: keepalive newlines while the master defers
    /// it (another replica's sync streaming, a BGSAVE running), within `redis.sync_wait`. An
    /// RDB older than the request (a BGSAVE shared from before it) is refused and the sync asked
    /// again once that BGSAVE is over; so is a `-LOADING` answer. A fenced cut whose fork came
    /// after the fence ended fails: it would not be exact.
    pub fn cut(mut self, fenced: bool) -> anyhow::Result<Cut> {
        if fenced {
            self.fence()?;
        }
        let fence = self.paused;
        let deadline = Instant::now() + self.settings.sync_wait;
        let mut wanted = Vec::new();
        if self.plain_fork {
            wanted.push(("rdbcompression", "no", "yes".to_owned()));
        }
        if let Some(delay) = &self.diskless_delay {
            wanted.push(("repl-diskless-sync-delay", "0", delay.clone()));
        }
        let mut replica = self.replica;
        let mut deferred = false;
        let (replid, offset, at) = loop {
            // A fork made for this request records at least this offset.
            let requested = master_offset(&mut self.control)?;
            let tuned = ForkSettings::apply(&mut self.control, &self.settings, &wanted)?;
            replica.send(&[b"PSYNC", b"?", b"-1"])?;
            let first = read_psync_line(replica.raw());
            tuned.restore()?;
            let mut line = first?;
            while line == PsyncLine::Keepalive {
                if !deferred {
                    tracing::info!(
                        "Redis deferred the full sync (a replica's sync or a BGSAVE is running); waiting for the fork"
                    );
                    deferred = true;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "Redis at {} deferred the full sync for more than redis.sync_wait ({}): \
                         another replica's full sync or a BGSAVE holds the fork",
                        self.settings.address,
                        humantime_serde::re::humantime::format_duration(self.settings.sync_wait)
                    );
                }
                line = read_psync_line(replica.raw())?;
            }
            match line {
                PsyncLine::FullResync { replid, offset } if offset >= requested => {
                    break (replid, offset, Instant::now());
                }
                PsyncLine::FullResync { offset, .. } => {
                    tracing::info!(
                        offset,
                        requested,
                        "Redis shared an RDB forked before the request; asking again after it"
                    );
                    drop(replica);
                    deferred = true;
                    wait_for_no_bgsave(&mut self.control, &self.settings, deadline)?;
                }
                PsyncLine::TryLater(why) => {
                    if Instant::now() >= deadline {
                        bail!("Redis at {} cannot sync: {why}", self.settings.address);
                    }
                    std::thread::sleep(RETRY_PAUSE);
                }
                PsyncLine::Keepalive => unreachable!("keepalives are skipped above"),
            }
            replica = announce(&self.settings)?;
        };
        if let Some(since) = fence
            && at.duration_since(since) >= self.settings.fence_max_pause
        {
            bail!(
                "Redis at {} forked {:.1}s after the fence went up, after the fence ended \
                 (redis.fence_max_pause {}): the sync was deferred behind another sync or BGSAVE, \
                 so the cut would not be exact",
                self.settings.address,
                at.duration_since(since).as_secs_f64(),
                humantime_serde::re::humantime::format_duration(self.settings.fence_max_pause)
            );
        }
        let point = Point {
            replid,
            offset,
            version: self.version,
            used_memory: self.used_memory,
        };
        Ok(Cut {
            replica,
            compression_level: self.settings.compression_level,
            point,
            fence: fence.map(|at| (self.control, at)),
            at,
            deferred,
        })
    }
}

/// Waits until no BGSAVE runs (`rdb_bgsave_in_progress:0`), until `deadline`.
fn wait_for_no_bgsave(
    control: &mut Connection,
    settings: &RedisSettings,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let persistence = control.info("persistence")?;
        if persistence
            .get("rdb_bgsave_in_progress")
            .map(String::as_str)
            != Some("1")
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "Redis at {} kept a BGSAVE from before the cut running longer than \
                 redis.sync_wait ({})",
                settings.address,
                humantime_serde::re::humantime::format_duration(settings.sync_wait)
            );
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// Between two looks at a server that cannot sync yet.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
            deferred,
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
            sync_deferred: deferred,
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
