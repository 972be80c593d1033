//! The restore journal: what a restore into a running server changed there, written (fsynced,
//! atomically) to `redis.state_dir` before the first change, removed once the server is given
//! back. It is what makes an interrupted restore safe:
//!
//! - while the agent lives, a [`Borrowed`] guard gives the server back on every path out of a
//!   restore — an error, a cancellation (an `Abort`, the coordinator's session lost, SIGTERM:
//!   the restore's future is dropped) — retrying for `redis.release_timeout`;
//! - an agent killed mid-restore leaves the journal behind, and the next agent start gives the
//!   server back from it ([`recover_at_start`]).
//!
//! Giving back = the server's own role again (`REPLICAOF NO ONE`, then `REPLICAOF <its master>`
//! when it was a replica) and its own values of the settings the restore changed. Only what the
//! restore did is undone: a server that restarted since (another `run_id`) came back with its
//! own configuration and is left alone; a server now replicating from someone other than the
//! agent was changed by someone else and keeps that; a setting that no longer holds the
//! restore's value is left as it is.
//!
//! Each journal has a lock file beside it, held (`flock`) by the process restoring into that
//! server: a second restore into the same server is refused, and a starting agent never undoes
//! a restore another live process is running.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::super::config::RedisSettings;
use super::super::resp::{Connection, Reply};

pub const VERSION: u32 = 1;
const PREFIX: &str = "restore-";
const SUFFIX: &str = ".json";

/// What a restore changed on one server, and what it was before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// The server (`host:port`).
    pub address: String,
    /// The server process's `run_id` when it was borrowed: another one means it restarted
    /// since, with its own configuration.
    pub run_id: String,
    /// The agent's master side the server was told to replicate from (`host`, `port`).
    pub agent: (String, String),
    /// The server's master before the restore (`host`, `port`); none when it was a master.
    pub previous_master: Option<(String, String)>,
    /// Settings the restore changes: (name, the server's value, the restore's value).
    pub settings: Vec<(String, String, String)>,
    /// When the restore began (Unix milliseconds).
    pub started_ms: i64,
}

/// The journal file of `address` in `dir` (the address, with everything but letters, digits,
/// dots and dashes made `_`).
fn path_for(dir: &Path, address: &str) -> PathBuf {
    let name: String = address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{PREFIX}{name}{SUFFIX}"))
}

fn lock_path(journal: &Path) -> PathBuf {
    journal.with_extension("lock")
}

/// The lock of one server's journal, held while a process restores into it or gives it back.
struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Takes the lock, or None when another restore (in this process or another) holds it.
    fn try_take(journal: &Path) -> anyhow::Result<Option<Lock>> {
        let path = lock_path(journal);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Lock(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(err)) => {
                Err(err).with_context(|| format!("lock {}", path.display()))
            }
        }
    }
}

/// Writes `record` to `path` through a temporary name: fsync the file, rename, fsync the
/// directory. A reader sees the whole journal or none.
fn write_atomically(path: &Path, record: &Record) -> anyhow::Result<()> {
    let dir = path.parent().context("journal path has no directory")?;
    let staged = path.with_extension("json.tmp");
    let mut file = File::create(&staged).with_context(|| format!("create {}", staged.display()))?;
    file.write_all(&serde_json::to_vec_pretty(record)?)?;
    file.sync_all()
        .with_context(|| format!("fsync {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("rename to {}", path.display()))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("remove {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<Record> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let record: Record = serde_json::from_slice(&bytes)
        .with_context(|| {
            format!(
                "{} is not a readable restore journal (damaged or cut short): give the server its \
                 file name names back by hand if a restore left it borrowed (`REPLICAOF NO ONE`, \
                 or its own master; `repl-diskless-load`, `replica-lazy-flush`), then remove the file",
                path.display()
            )
        })?;
    if record.version != VERSION {
        bail!(
            "{} has journal version {}, this agent writes {VERSION}",
            path.display(),
            record.version
        );
    }
    Ok(record)
}

/// A server a restore has borrowed: its journal is on disk and its lock held. Give it back with
/// [`Borrowed::give_back`]; dropped without that (an error, a cancelled restore), it gives the
/// server back on the blocking pool, which the runtime waits for before the process exits.
pub struct Borrowed {
    inner: Option<Inner>,
}

struct Inner {
    path: PathBuf,
    record: Record,
    settings: RedisSettings,
    _lock: Lock,
}

impl Borrowed {
    /// Journals `record` for the server at `settings.address` before anything changes there.
    /// Refuses when another restore holds the server; an older journal of the same server (an
    /// interrupted restore) is given back first.
    pub fn journal(settings: &RedisSettings, record: Record) -> anyhow::Result<Borrowed> {
        let dir = &settings.state_dir;
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "create the restore journal directory {} (redis.state_dir)",
                dir.display()
            )
        })?;
        let path = path_for(dir, &record.address);
        let Some(lock) = Lock::try_take(&path)? else {
            bail!(
                "another restore into Redis at {} is running (its journal is {})",
                record.address,
                path.display()
            );
        };
        if path.exists() {
            let previous = read(&path)?;
            let warnings = give_back(&previous, settings).with_context(|| {
                format!(
                    "give back Redis at {} after an earlier interrupted restore (journal {})",
                    previous.address,
                    path.display()
                )
            })?;
            remove(&path)?;
            for warning in warnings {
                tracing::warn!(server = %previous.address, "{warning}");
            }
        }
        write_atomically(&path, &record)?;
        Ok(Borrowed {
            inner: Some(Inner {
                path,
                record,
                settings: settings.clone(),
                _lock: lock,
            }),
        })
    }

    /// Gives the server back (blocking): its role, then its settings; retried for
    /// `redis.release_timeout` when it cannot be reached. The journal is removed once done, and
    /// kept for the next start when not. Returns warnings for the report.
    pub fn give_back(mut self) -> anyhow::Result<Vec<String>> {
        let Some(inner) = self.inner.take() else {
            return Ok(Vec::new());
        };
        inner.give_back()
    }
}

impl Inner {
    fn give_back(self) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + self.settings.release_timeout;
        let mut attempt = 0u32;
        loop {
            match give_back(&self.record, &self.settings) {
                Ok(warnings) => {
                    remove(&self.path)?;
                    return Ok(warnings);
                }
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!(
                        "Redis at {} could not be given back within {:?} (redis.release_timeout); the journal {} stays for the agent's next start",
                        self.record.address,
                        self.settings.release_timeout,
                        self.path.display()
                    )));
                }
                Err(err) => {
                    let delay = retry_delay(attempt);
                    tracing::warn!(server = %self.record.address, error = %format!("{err:#}"), retry_in = ?delay, "giving the server back failed");
                    std::thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let address = inner.record.address.clone();
        let run = move || match inner.give_back() {
            Ok(_) => {
                tracing::info!(server = %address, "interrupted restore: the server was given back")
            }
            Err(err) => {
                tracing::error!(server = %address, error = %format!("{err:#}"), "interrupted restore: the server was not given back")
            }
        };
        // On the blocking pool when there is a runtime: shutting it down waits for the task, so
        // a restore cancelled by SIGTERM gives the server back before the process exits.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(run)),
            Err(_) => run(),
        }
    }
}

/// Short retries first (a blip), then every 2 s.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(4)).min(2000))
}

/// One attempt to give the server of `record` back (a server answering `LOADING` is waited
/// for up to `redis.load_timeout`).
fn give_back(record: &Record, settings: &RedisSettings) -> anyhow::Result<Vec<String>> {
    let mut server = settings.clone();
    server.address = record.address.clone();
    let mut connection = Connection::open(&server)?;
    let mut warnings = Vec::new();
    let run_id = connection
        .info("server")?
        .get("run_id")
        .cloned()
        .unwrap_or_default();
    if run_id != record.run_id {
        warnings.push(format!(
            "Redis at {} restarted since the interrupted restore: it runs with its own configuration, nothing to give back",
            record.address
        ));
        return Ok(warnings);
    }
    let replication = connection.info("replication")?;
    let master = match replication.get("role").map(String::as_str) {
        Some("slave") => Some((
            replication.get("master_host").cloned().unwrap_or_default(),
            replication.get("master_port").cloned().unwrap_or_default(),
        )),
        _ => None,
    };
    let loading_deadline = Instant::now() + settings.load_timeout;
    match &master {
        Some(current) if *current == record.agent => {
            replicaof(&mut connection, None, loading_deadline)?;
            if let Some(previous) = &record.previous_master {
                replicaof(&mut connection, Some(previous), loading_deadline)?;
            }
        }
        None => {
            if let Some(previous) = &record.previous_master {
                replicaof(&mut connection, Some(previous), loading_deadline)?;
            }
        }
        Some(current) if Some(current) == record.previous_master.as_ref() => {}
        Some((host, port)) => warnings.push(format!(
            "Redis at {} replicates from {host}:{port}, set by someone else since the restore: left so",
            record.address
        )),
    }
    if let Some((host, port)) = &record.previous_master {
        warnings.push(format!(
            "the server was a replica of {host}:{port} and is again: it will resync from there, replacing the restored data"
        ));
    }
    for (name, original, during) in &record.settings {
        if connection.config_get(name)?.as_deref() == Some(during.as_str()) {
            connection.ok(&["CONFIG", "SET", name, original])?;
        }
    }
    Ok(warnings)
}

/// `REPLICAOF NO ONE` (`to` None) or `REPLICAOF host port`. A server loading a sync from the
/// socket answers `LOADING` until it notices the link is gone; that is waited out.
fn replicaof(
    connection: &mut Connection,
    to: Option<&(String, String)>,
    loading_deadline: Instant,
) -> anyhow::Result<()> {
    let args: [&[u8]; 3] = match to {
        None => [b"REPLICAOF", b"NO", b"ONE"],
        Some((host, port)) => [b"REPLICAOF", host.as_bytes(), port.as_bytes()],
    };
    loop {
        match connection.call(&args)? {
            Reply::Error(err)
                if err.starts_with("LOADING") && Instant::now() < loading_deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Reply::Error(err) => bail!(
                "Redis at {} refused {}: {err}",
                connection.address,
                args.iter()
                    .map(|a| String::from_utf8_lossy(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            _ => return Ok(()),
        }
    }
}

/// The journals left in `redis.state_dir` by interrupted restores.
fn journals(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("list {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// What happened to one journal at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// The server was given back (with warnings).
    GivenBack(Vec<String>),
    /// Another live process is restoring into that server.
    InUse,
}

/// One attempt at every journal in `redis.state_dir` (blocking). A journal another process
/// holds is skipped; one whose server cannot be reached stays, with its error.
pub fn recover_once(
    settings: &RedisSettings,
) -> anyhow::Result<Vec<(PathBuf, anyhow::Result<Recovered>)>> {
    let mut outcomes = Vec::new();
    for path in journals(&settings.state_dir)? {
        let outcome = recover_one(settings, &path);
        outcomes.push((path, outcome));
    }
    Ok(outcomes)
}

fn recover_one(settings: &RedisSettings, path: &Path) -> anyhow::Result<Recovered> {
    let Some(_lock) = Lock::try_take(path)? else {
        return Ok(Recovered::InUse);
    };
    let record = match read(path) {
        Ok(record) => record,
        Err(err) if !path.exists() => {
            // Given back meanwhile by the process that held it.
            let _ = err;
            return Ok(Recovered::GivenBack(Vec::new()));
        }
        Err(err) => return Err(err),
    };
    let warnings = give_back(&record, settings).with_context(|| {
        format!(
            "give back Redis at {} (journal {})",
            record.address,
            path.display()
        )
    })?;
    remove(path)?;
    Ok(Recovered::GivenBack(warnings))
}

/// A one-shot command's start: one attempt per journal, logged; never fails the command (a
/// restore into a server still borrowed tries again and fails if it cannot give it back).
pub async fn recover_before_command(settings: &RedisSettings) {
    let settings = settings.clone();
    let outcomes = tokio::task::spawn_blocking(move || recover_once(&settings)).await;
    match outcomes {
        Ok(Ok(outcomes)) => log_outcomes(&outcomes, false),
        Ok(Err(err)) => tracing::error!(error = %format!("{err:#}"), "restore journals not read"),
        Err(err) => tracing::error!(error = %err, "restore journals not read"),
    }
}

fn log_outcomes(outcomes: &[(PathBuf, anyhow::Result<Recovered>)], retrying: bool) {
    for (path, outcome) in outcomes {
        match outcome {
            Ok(Recovered::GivenBack(warnings)) => {
                tracing::info!(journal = %path.display(), "interrupted restore: the server was given back");
                for warning in warnings {
                    tracing::warn!(journal = %path.display(), "{warning}");
                }
            }
            Ok(Recovered::InUse) => {
                tracing::debug!(journal = %path.display(), "a restore in another process holds this server")
            }
            Err(err) if retrying => {
                tracing::warn!(journal = %path.display(), error = %format!("{err:#}"), "interrupted restore: the server is not given back yet")
            }
            Err(err) => {
                tracing::error!(journal = %path.display(), error = %format!("{err:#}"), "interrupted restore: the server is not given back; the journal stays")
            }
        }
    }
}

/// A sidecar's start, in the background: every journal is given back, retried with short
/// backoff for `redis.release_timeout`. A server still unreachable then is reported (what it
/// needs, by hand) and its journal removed: a Redis down that long has restarted with its own
/// configuration (a `REPLICAOF` given at run time is not in it) or is gone.
pub async fn recover_at_start(settings: RedisSettings, shutdown: CancellationToken) {
    let deadline = Instant::now() + settings.release_timeout;
    let mut attempt = 0u32;
    loop {
        let pass = {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || recover_once(&settings)).await
        };
        let outcomes = match pass {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(err)) => {
                tracing::error!(error = %format!("{err:#}"), "restore journals not read");
                return;
            }
            Err(err) => {
                tracing::error!(error = %err, "restore journals not read");
                return;
            }
        };
        let out_of_time = Instant::now() >= deadline;
        log_outcomes(&outcomes, !out_of_time);
        let failed: Vec<&PathBuf> = outcomes
            .iter()
            .filter(|(_, outcome)| outcome.is_err())
            .map(|(path, _)| path)
            .collect();
        if failed.is_empty() {
            return;
        }
        if out_of_time {
            for path in failed {
                let advice = read(path).map(|r| advice(&r)).unwrap_or_default();
                tracing::error!(journal = %path.display(), release_timeout = ?settings.release_timeout, "interrupted restore: giving up on this server; {advice}");
                if let Err(err) = remove(path) {
                    tracing::error!(journal = %path.display(), error = %format!("{err:#}"), "journal not removed");
                }
            }
            return;
        }
        let delay = retry_delay(attempt);
        attempt += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What an operator runs on a server the agent could not give back.
fn advice(record: &Record) -> String {
    let mut steps = vec![match &record.previous_master {
        None => "REPLICAOF NO ONE".to_owned(),
        Some((host, port)) => format!("REPLICAOF {host} {port}"),
    }];
    for (name, original, _) in &record.settings {
        steps.push(format!("CONFIG SET {name} {original}"));
    }
    format!(
        "if Redis at {} still replicates from {}:{}, run: {}",
        record.address,
        record.agent.0,
        record.agent.1,
        steps.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(address: &str) -> Record {
        Record {
            version: VERSION,
            address: address.to_owned(),
            run_id: "abc".into(),
            agent: ("127.0.0.1".into(), "4000".into()),
            previous_master: Some(("10.0.0.1".into(), "6379".into())),
            settings: vec![("replica-lazy-flush".into(), "no".into(), "yes".into())],
            started_ms: 1,
        }
    }

    #[test]
    fn a_journal_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_for(dir.path(), "redis-0.redis:6379");
        assert_eq!(
            path.file_name().and_then(|n| n.to_str()),
            Some("restore-redis-0.redis_6379.json")
        );
        write_atomically(&path, &record("redis-0.redis:6379")).expect("write");
        assert_eq!(read(&path).expect("read"), record("redis-0.redis:6379"));
        assert_eq!(journals(dir.path()).expect("list"), vec![path.clone()]);
        remove(&path).expect("remove");
        assert!(journals(dir.path()).expect("list").is_empty());
    }

    #[test]
    fn a_journal_cut_short_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_for(dir.path(), "127.0.0.1:6379");
        write_atomically(&path, &record("127.0.0.1:6379")).expect("write");
        let whole = std::fs::read(&path).expect("read");
        std::fs::write(&path, &whole[..whole.len() / 2]).expect("truncate");
        let err = format!("{:#}", read(&path).expect_err("a cut journal"));
        assert!(
            err.contains("restore-127.0.0.1_6379.json")
                && err.contains("cut short")
                && err.contains("remove the file"),
            "{err}"
        );
    }

    #[test]
    fn a_second_lock_on_the_same_server_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_for(dir.path(), "127.0.0.1:6379");
        let first = Lock::try_take(&path).expect("lock").expect("free");
        assert!(Lock::try_take(&path).expect("lock").is_none());
        drop(first);
        assert!(Lock::try_take(&path).expect("lock").is_some());
    }

    #[test]
    fn the_advice_names_the_role_and_settings_to_set_back() {
        let advice = advice(&record("r:1"));
        assert!(advice.contains("REPLICAOF 10.0.0.1 6379"), "{advice}");
        assert!(
            advice.contains("CONFIG SET replica-lazy-flush no"),
            "{advice}"
        );
    }
}
