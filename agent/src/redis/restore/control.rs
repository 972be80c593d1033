//! The control connection to the server being restored: borrowing it (journal first, then the
//! restore's settings and `REPLICAOF <agent>`), waiting for the load, and the checks against
//! the manifest afterwards.

use std::time::{Duration, Instant};

use aitbc_backup_repository::manifest::{RedisDb, RedisSample};
use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::super::config::RedisSettings;
use super::super::resp::{Connection, Reply};
use super::journal::{Borrowed, Record};
use super::master::Advertised;
use super::now_ms;

/// The client name a restore's control connection carries while it lasts, so that another
/// restore into the same server (from another agent, or under another spelling of its address)
/// is refused while it runs.
const RESTORE_CLIENT_NAME: &str = "aitbc-backup-restore";

/// Refuses when another restore holds the server, then names this connection as one. A server
/// that refuses `CLIENT` (an ACL without it) restores unmarked.
fn mark_as_restoring(connection: &mut Connection, settings: &RedisSettings) -> anyhow::Result<()> {
    let clients = match connection.call(&[b"CLIENT", b"LIST"])? {
        Reply::Error(err) => {
            tracing::warn!(address = %settings.address, error = %err, "CLIENT LIST refused: another restore into this server cannot be detected");
            return Ok(());
        }
        reply => reply.text(),
    };
    let marker = format!("name={RESTORE_CLIENT_NAME} ");
    if let Some(other) = clients.lines().find(|line| line.contains(&marker)) {
        let field = |key: &str| {
            other
                .split_whitespace()
                .find_map(|f| f.strip_prefix(key))
                .unwrap_or("?")
                .to_owned()
        };
        bail!(
            "another restore into Redis at {} is running (its connection from {}, open for {} s); \
             wait for it to end",
            settings.address,
            field("addr="),
            field("age=")
        );
    }
    if let Reply::Error(err) =
        connection.call(&[b"CLIENT", b"SETNAME", RESTORE_CLIENT_NAME.as_bytes()])?
    {
        tracing::warn!(address = %settings.address, error = %err, "CLIENT SETNAME refused: another restore into this server cannot be detected");
    }
    Ok(())
}

/// The control connection to the server being restored.
pub struct Control {
    connection: Connection,
}

impl Control {
    /// Reads what the restore will change (the server's role and settings), journals it, then
    /// changes it: the restore's settings, `REPLICAOF <agent>`. From the journal on, the server
    /// is [`Borrowed`]: the guard gives it back however the restore ends.
    pub fn attach(
        settings: &RedisSettings,
        master: &Advertised,
        force: bool,
    ) -> anyhow::Result<(Control, Borrowed, Option<String>)> {
        let mut connection = Connection::open(settings)?;
        mark_as_restoring(&mut connection, settings)?;
        let run_id = connection
            .info("server")?
            .get("run_id")
            .cloned()
            .unwrap_or_default();
        let replication = connection.info("replication")?;
        let mut warning = None;
        let previous_master = match replication.get("role").map(String::as_str) {
            Some("slave") => {
                let host = replication.get("master_host").cloned().unwrap_or_default();
                let port = replication.get("master_port").cloned().unwrap_or_default();
                // A replica of a master it cannot reach may be one an interrupted restore left
                // pointing at its (dead) agent: made a replica of that again afterwards, the
                // server would stay read-only for good.
                if replication.get("master_link_status").map(String::as_str) != Some("up") {
                    if !force {
                        bail!(
                            "Redis at {} is a replica of {host}:{port}, which it cannot reach \
                             (master_link_status down): an interrupted restore may have left it \
                             so (start the agent that restored it again), or its master is gone; \
                             --force restores it and leaves it a master",
                            settings.address
                        );
                    }
                    warning = Some(format!(
                        "the server was a replica of {host}:{port}, which it could not reach; \
                         it is left a master (--force)"
                    ));
                    None
                } else {
                    Some((host, port))
                }
            }
            _ => None,
        };
        let mut to_change = Vec::new();
        for (name, value, from) in RESTORE_SETTINGS {
            if connection.config_get(name)?.as_deref() == Some(from) {
                to_change.push((name.to_owned(), from.to_owned(), value.to_owned()));
            }
        }
        let record = Record {
            version: super::journal::VERSION,
            address: settings.address.clone(),
            run_id,
            agent: (master.0.clone(), master.1.to_string()),
            previous_master,
            settings: to_change.clone(),
            started_ms: now_ms(),
        };
        let borrowed = Borrowed::journal(settings, record)?;
        let mut change = || -> anyhow::Result<()> {
            // A server that refuses `CONFIG` (an ACL, a renamed command) restores as it is
            // configured to.
            for (name, _, value) in &to_change {
                connection.config_set(name, value)?;
            }
            connection.ok(&["REPLICAOF", &master.0, &master.1.to_string()])?;
            Ok(())
        };
        if let Err(err) = change() {
            return Err(match borrowed.give_back() {
                Ok(_) => err,
                Err(back) => err.context(format!("and giving the server back failed: {back:#}")),
            });
        }
        Ok((Control { connection }, borrowed, warning))
    }

    /// Waits until the server has loaded the RDB (link up, no sync or load in progress), or
    /// the restore is cancelled.
    pub fn wait_loaded(
        &mut self,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
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
            if cancel.is_cancelled() {
                bail!("the restore was cancelled while Redis loaded the data");
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

    /// Keys per database equal the backup's, less keys whose time to live ran out since.
    pub fn check_counts(&mut self, databases: &[RedisDb], expiring: &[i64]) -> anyhow::Result<()> {
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
    pub fn check_samples(&mut self, samples: &[RedisSample], lzf: bool) -> anyhow::Result<usize> {
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
/// from)`; each is journaled and set back afterwards.
const RESTORE_SETTINGS: [(&str, &str, &str); 2] = [
    // An empty server loads the sync straight from the socket instead of writing it to disk
    // first: loading overlaps the transfer. Only an empty one: a failed sync then leaves what
    // was there (nothing), while a server holding data keeps loading from disk and keeps its
    // data until the whole RDB has arrived.
    ("repl-diskless-load", "on-empty-db", "disabled"),
    // The dataset the sync replaces (once all of it has arrived) is freed in the background.
    ("replica-lazy-flush", "yes", "no"),
];
