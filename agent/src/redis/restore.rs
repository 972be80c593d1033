//! Restore into a running Redis without a restart: the agent plays a master. It listens on
//! `redis.restore_listen`, tells the server `REPLICAOF <agent>`, answers its handshake with
//! `+FULLRESYNC` and streams the RDB from the repository (walking it again to know which keys
//! may expire meanwhile); once the server has loaded it, `REPLICAOF NO ONE` and the server's
//! previous replication settings come back — also when anything fails. Then the key counts
//! and the sampled values are checked against the manifest.
//! Offline: `dump.rdb` written into a stopped server's data directory, checked with
//! `redis-check-rdb`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aitbc_backup_repository::manifest::{
    ComponentManifest, ConsistencyPoint, RedisDb, RedisSample,
};
use aitbc_backup_repository::{Progress, Repository};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::config::RedisSettings;
use super::rdb;
use super::resp::{Connection, Reply};
use super::sync::Tee;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Another server (`host:port`) instead of `redis.address`.
    pub address: Option<String>,
    /// Offline: write `dump.rdb` into this directory instead.
    pub offline_dir: Option<PathBuf>,
    /// Offline: replace an existing `dump.rdb`.
    pub force: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub manifest: String,
    pub target: String,
    pub keys: u64,
    pub databases: Vec<RedisDb>,
    pub samples_checked: usize,
    pub seconds: f64,
    pub warnings: Vec<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn restore(
    repo: &Repository,
    manifest: &ComponentManifest,
    settings: &RedisSettings,
    options: &RestoreOptions,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let Some(ConsistencyPoint::Redis {
        databases,
        samples,
        counted,
        uncompressed,
        ..
    }) = &manifest.consistency
    else {
        bail!("backup {} is not a Redis backup", manifest.id);
    };
    let started = Instant::now();
    if let Some(dir) = &options.offline_dir {
        return offline(
            repo,
            manifest,
            dir,
            options.force,
            progress,
            cancel,
            started,
        )
        .await;
    }
    let mut settings = settings.clone();
    if let Some(address) = &options.address {
        settings.address = address.clone();
    }
    let mut warnings = Vec::new();
    let (advertised, master) = tokio::task::spawn_blocking({
        let settings = settings.clone();
        let size = manifest.raw_size;
        move || Master::start(&settings, size)
    })
    .await??;
    // The listener is bound, so the server's connection waits in its backlog until served.
    let mut control = tokio::task::spawn_blocking({
        let settings = settings.clone();
        move || Control::attach(&settings, advertised)
    })
    .await??;
    let transfer = transfer(repo, manifest, master, progress, cancel).await;
    let transferred = transfer.is_ok();
    let load_timeout = settings.load_timeout;
    let (result, released, mut control) = tokio::task::spawn_blocking(move || {
        // The socket stays open until the server is released, or it would retry the link.
        let result = transfer.and_then(|(summary, socket)| {
            control.wait_loaded(load_timeout)?;
            Ok((summary, socket))
        });
        let released = control.release(load_timeout);
        (result, released, control)
    })
    .await?;
    let summary = match (result, released) {
        (Ok((summary, _socket)), Ok(release_warnings)) => {
            warnings.extend(release_warnings);
            summary
        }
        (Err(err), Ok(_)) => {
            // A server holding data loads a sync only once all of it has arrived; an empty
            // one may load it as it arrives, and empties itself again when it breaks off.
            let kept = if transferred {
                ""
            } else {
                " and keeps its previous data"
            };
            return Err(err.context(format!(
                "restore into Redis at {}; the server was released (REPLICAOF NO ONE){kept}",
                settings.address
            )));
        }
        (Err(err), Err(release_err)) => {
            bail!(
                "{err:#}; and releasing the server (REPLICAOF NO ONE) failed too: {release_err:#}"
            )
        }
        (Ok(_), Err(release_err)) => return Err(release_err.context("release the server")),
    };
    let checked = tokio::task::spawn_blocking({
        let databases = databases.clone();
        let samples = samples.clone();
        let counted = *counted;
        let lzf = !*uncompressed;
        move || -> anyhow::Result<usize> {
            if counted {
                control.check_counts(&databases, &summary.expiring)?;
            }
            control.check_samples(&samples, lzf)
        }
    })
    .await??;
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        target: settings.address.clone(),
        keys: databases.iter().map(|d| d.keys).sum(),
        databases: databases.clone(),
        samples_checked: checked,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}

/// Streams the backup from the repository through the agent's master side to the server: the
/// verified chunks go straight to the serving thread, which writes them to the replica socket.
async fn transfer(
    repo: &Repository,
    manifest: &ComponentManifest,
    master: Master,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
) -> anyhow::Result<(rdb::Summary, TcpStream)> {
    let served = aitbc_backup_repository::restore_with(repo, manifest, progress, cancel, |rdb| {
        master.serve(rdb)
    })
    .await;
    served.context("read the backup")?
}

/// The agent's side of the replication link.
struct Master {
    listener: TcpListener,
    size: u64,
    timeout: Duration,
}

/// Where the server is told to replicate from.
struct Advertised(String, u16);

impl Master {
    fn start(settings: &RedisSettings, size: u64) -> anyhow::Result<(Advertised, Master)> {
        let listener = TcpListener::bind(settings.restore_listen).with_context(|| {
            format!("listen on redis.restore_listen {}", settings.restore_listen)
        })?;
        let local = listener.local_addr()?;
        let advertised = if settings.restore_advertise.is_empty() {
            Advertised(local.ip().to_string(), local.port())
        } else {
            match settings.restore_advertise.rsplit_once(':') {
                Some((host, port)) => Advertised(
                    host.to_owned(),
                    port.parse().context("redis.restore_advertise port")?,
                ),
                None => Advertised(settings.restore_advertise.clone(), local.port()),
            }
        };
        Ok((
            advertised,
            Master {
                listener,
                size,
                timeout: settings.io_timeout,
            },
        ))
    }

    /// Accepts the replica, answers its handshake, sends the RDB while walking it. Returns the
    /// walk and the still-open socket (closing it before the server is released would make the
    /// server retry the link).
    fn serve(self, rdb_stream: &mut dyn Read) -> anyhow::Result<(rdb::Summary, TcpStream)> {
        let socket = accept_within(&self.listener, self.timeout)?;
        socket.set_read_timeout(Some(self.timeout))?;
        socket.set_write_timeout(Some(self.timeout))?;
        let mut reader = BufReader::new(socket.try_clone()?);
        let mut writer = socket.try_clone()?;
        loop {
            let command = read_command(&mut reader)?;
            let name = command
                .first()
                .map(|c| c.to_ascii_uppercase())
                .unwrap_or_default();
            match name.as_str() {
                "PING" => writer.write_all(b"+PONG\r\n")?,
                "AUTH" | "REPLCONF" => writer.write_all(b"+OK\r\n")?,
                "PSYNC" | "SYNC" => {
                    let replid = hex::encode(rand::random::<[u8; 20]>());
                    writer.write_all(
                        format!("+FULLRESYNC {replid} 0\r\n${}\r\n", self.size).as_bytes(),
                    )?;
                    break;
                }
                other => writer.write_all(format!("-ERR unexpected {other}\r\n").as_bytes())?,
            }
        }
        let horizon = now_ms() + 24 * 3600 * 1000;
        let mut tee = BufReader::with_capacity(
            1 << 20,
            Tee {
                input: rdb_stream,
                out: std::io::BufWriter::with_capacity(1 << 20, writer),
            },
        );
        let summary = rdb::walk(&mut tee, Some(horizon)).context("stream the RDB to the server")?;
        rdb::drain(&mut tee)?;
        let Tee { out, .. } = tee.into_inner();
        out.into_inner().map_err(|e| e.into_error())?.flush()?;
        Ok((summary, socket))
    }
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(false)?;
                return Ok(socket);
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "the server did not connect to the agent at {} within {timeout:?} (redis.restore_listen, redis.restore_advertise)",
                        listener.local_addr()?
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// One RESP command from the replica (arrays, or an inline command).
fn read_command(reader: &mut BufReader<TcpStream>) -> anyhow::Result<Vec<String>> {
    let mut line = String::new();
    if reader
        .read_line(&mut line)
        .context("read the server's handshake")?
        == 0
    {
        bail!("the server closed the replication link during the handshake");
    }
    let line = line.trim_end();
    let Some(count) = line.strip_prefix('*') else {
        return Ok(line.split_whitespace().map(str::to_owned).collect());
    };
    let count: usize = count.parse().context("malformed command from the server")?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let len: usize = header
            .trim_end()
            .trim_start_matches('$')
            .parse()
            .context("malformed argument")?;
        let mut data = vec![0u8; len + 2];
        std::io::Read::read_exact(reader, &mut data)?;
        data.truncate(len);
        args.push(String::from_utf8_lossy(&data).into_owned());
    }
    Ok(args)
}

/// The control connection to the server being restored.
struct Control {
    connection: Connection,
    /// `Some((host, port))` when the server was a replica before.
    previous_master: Option<(String, String)>,
    /// Settings the agent changed for the restore, with their previous values.
    changed: Vec<(&'static str, String)>,
}

impl Control {
    fn attach(settings: &RedisSettings, master: Advertised) -> anyhow::Result<Control> {
        let mut connection = Connection::open(settings)?;
        let replication = connection.info("replication")?;
        let previous_master = match replication.get("role").map(String::as_str) {
            Some("slave") => Some((
                replication.get("master_host").cloned().unwrap_or_default(),
                replication.get("master_port").cloned().unwrap_or_default(),
            )),
            _ => None,
        };
        let changed = tune_for_restore(&mut connection)?;
        let mut control = Control {
            connection,
            previous_master,
            changed,
        };
        if let Err(err) = control
            .connection
            .ok(&["REPLICAOF", &master.0, &master.1.to_string()])
        {
            control.put_back_settings()?;
            return Err(err);
        }
        Ok(control)
    }

    fn put_back_settings(&mut self) -> anyhow::Result<()> {
        for (name, value) in std::mem::take(&mut self.changed) {
            self.connection.ok(&["CONFIG", "SET", name, &value])?;
        }
        Ok(())
    }

    /// Waits until the server has loaded the RDB (link up, no sync or load in progress).
    fn wait_loaded(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let replication = self.connection.info("replication")?;
            let persistence = self.connection.info("persistence")?;
            let up = replication.get("master_link_status").map(String::as_str) == Some("up");
            let syncing = replication
                .get("master_sync_in_progress")
                .map(String::as_str)
                == Some("1");
            let loading = persistence.get("loading").map(String::as_str) == Some("1");
            if up && !syncing && !loading {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Redis at {} did not finish loading within {timeout:?} (redis.load_timeout)",
                    self.connection.address
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `REPLICAOF NO ONE`, then the previous master again if there was one. A server loading
    /// a sync from the socket answers `LOADING` until it notices the link is gone (the agent
    /// closed it), so that is waited out.
    fn release(&mut self, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connection.call(&[b"REPLICAOF", b"NO", b"ONE"])? {
                Reply::Error(err) if err.starts_with("LOADING") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Reply::Error(err) => bail!(
                    "Redis at {} refused REPLICAOF NO ONE: {err}",
                    self.connection.address
                ),
                _ => break,
            }
        }
        self.put_back_settings()?;
        let mut warnings = Vec::new();
        if let Some((host, port)) = &self.previous_master {
            self.connection.ok(&["REPLICAOF", host, port])?;
            warnings.push(format!(
                "the server was a replica of {host}:{port} and is again: it will resync from there, replacing the restored data"
            ));
        }
        Ok(warnings)
    }

    /// Keys per database equal the backup's, less keys whose time to live ran out since.
    fn check_counts(&mut self, databases: &[RedisDb], expiring: &[i64]) -> anyhow::Result<()> {
        let keyspace = self.connection.info("keyspace")?;
        let limit = now_ms() + 1000;
        let mut wrong = Vec::new();
        for db in databases {
            let found: u64 = keyspace
                .get(&format!("db{}", db.db))
                .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("keys=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            // Expiring keys are not attributed to databases; allow them all (a bound, not a
            // count: it is zero when nothing expires).
            let may_have_expired = expiring.iter().filter(|at| **at <= limit).count() as u64;
            if found > db.keys || found + may_have_expired < db.keys {
                wrong.push(format!(
                    "db{}: {found} keys, the backup holds {}",
                    db.db, db.keys
                ));
            }
        }
        for (name, value) in &keyspace {
            let Some(number) = name.strip_prefix("db").and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if !databases.iter().any(|d| d.db == number) {
                wrong.push(format!(
                    "{name}: {value}, the backup holds no such database"
                ));
            }
        }
        if !wrong.is_empty() {
            bail!(
                "the restored keys do not match the backup: {}",
                wrong.join("; ")
            );
        }
        Ok(())
    }

    /// Compares each sampled key's `DUMP` and expiry with the backup's. `DUMP` compresses
    /// strings as `rdbcompression` says, so that is set as it was for the backup's fork while
    /// the samples are read, then set back.
    fn check_samples(&mut self, samples: &[RedisSample], lzf: bool) -> anyhow::Result<usize> {
        let wanted = if lzf { "yes" } else { "no" };
        // The server's own setting, when it differs (None too when `CONFIG` is refused).
        let previous = self
            .connection
            .config_get("rdbcompression")?
            .filter(|current| current != wanted);
        if previous.is_some() {
            self.connection.config_set("rdbcompression", wanted)?;
        }
        let checked = self.compare_samples(samples);
        if let Some(previous) = &previous {
            self.connection
                .ok(&["CONFIG", "SET", "rdbcompression", previous])?;
        }
        checked
    }

    fn compare_samples(&mut self, samples: &[RedisSample]) -> anyhow::Result<usize> {
        let mut checked = 0;
        let now = now_ms();
        for sample in samples {
            if sample.expire_ms.is_some_and(|at| at <= now + 1000) {
                continue;
            }
            let key = hex::decode(&sample.key_hex).context("sample key")?;
            self.connection.ok(&["SELECT", &sample.db.to_string()])?;
            let dump = match self.connection.call(&[b"DUMP", &key])? {
                Reply::Bulk(Some(payload)) if payload.len() >= 10 => payload,
                Reply::Error(err) => bail!("DUMP refused: {err}"),
                _ => bail!(
                    "key {} of db{} is missing after the restore",
                    String::from_utf8_lossy(&key),
                    sample.db
                ),
            };
            let digest = blake3::hash(&dump[..dump.len() - 10]).to_hex().to_string();
            if digest != sample.value_blake3 {
                bail!(
                    "key {} of db{} differs from the backup",
                    String::from_utf8_lossy(&key),
                    sample.db
                );
            }
            let expire = match self.connection.call(&[b"PEXPIRETIME", &key])? {
                Reply::Int(at) if at >= 0 => Some(at),
                Reply::Int(_) => None,
                Reply::Error(err) => bail!("PEXPIRETIME refused: {err}"),
                other => bail!("unexpected PEXPIRETIME reply {other:?}"),
            };
            if expire != sample.expire_ms {
                bail!(
                    "key {} of db{} expires at {expire:?}, the backup says {:?}",
                    String::from_utf8_lossy(&key),
                    sample.db,
                    sample.expire_ms
                );
            }
            checked += 1;
        }
        self.connection.ok(&["SELECT", "0"])?;
        Ok(checked)
    }
}

/// Settings a restore changes while it runs, as `(name, value for the restore, changed only
/// from)`; each is set back afterwards. A server that refuses `CONFIG` (an ACL, a renamed
/// command) restores as it is configured to.
const RESTORE_SETTINGS: [(&str, &str, &str); 2] = [
    // An empty server loads the sync straight from the socket instead of writing it to disk
    // first: loading overlaps the transfer. Only an empty one: a failed sync then leaves what
    // was there (nothing), while a server holding data keeps loading from disk and keeps its
    // data until the whole RDB has arrived.
    ("repl-diskless-load", "on-empty-db", "disabled"),
    // The dataset the sync replaces (once all of it has arrived) is freed in the background.
    ("replica-lazy-flush", "yes", "no"),
];

/// Applies [`RESTORE_SETTINGS`]; returns what was changed, with the previous values.
fn tune_for_restore(connection: &mut Connection) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut changed = Vec::new();
    for (name, value, from) in RESTORE_SETTINGS {
        if connection.config_get(name)?.as_deref() == Some(from)
            && connection.config_set(name, value)?
        {
            changed.push((name, from.to_owned()));
        }
    }
    Ok(changed)
}

/// Writes `dump.rdb` for a stopped server, checked by `redis-check-rdb` before it takes the
/// name.
async fn offline(
    repo: &Repository,
    manifest: &ComponentManifest,
    dir: &std::path::Path,
    force: bool,
    progress: Arc<Progress>,
    cancel: &CancellationToken,
    started: Instant,
) -> anyhow::Result<RestoreReport> {
    let target = dir.join("dump.rdb");
    if target.exists() && !force {
        bail!(
            "{} exists; restore with --force to replace it",
            target.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let staged = dir.join(".dump.rdb.aitbc-restore");
    aitbc_backup_repository::restore_to_file(repo, manifest, &staged, progress, cancel)
        .await
        .context("write the RDB")?;
    let mut warnings = Vec::new();
    match std::process::Command::new("redis-check-rdb")
        .arg(&staged)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let _ = std::fs::remove_file(&staged);
            bail!(
                "redis-check-rdb rejects the restored file: {}",
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("ERR") || l.contains("error"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Err(err) => warnings.push(format!("redis-check-rdb not run: {err}")),
    }
    std::fs::rename(&staged, &target)
        .with_context(|| format!("rename into {}", target.display()))?;
    let Some(ConsistencyPoint::Redis { databases, .. }) = &manifest.consistency else {
        bail!("not a Redis backup");
    };
    Ok(RestoreReport {
        manifest: manifest.id.clone(),
        target: target.display().to_string(),
        keys: databases.iter().map(|d| d.keys).sum(),
        databases: databases.clone(),
        samples_checked: 0,
        seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}
