//! PostgreSQL under the contract: database `app` with a table `events` one writer fills, one
//! transaction per row, each row recording the transaction that wrote it; a cut's content is
//! exactly the rows the manifest's `txid_snapshot` sees.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Content, Subject};
use crate::agent::{OneShot, init_local_repository};
use crate::postgres::{Postgres, bin, spawn_client};

/// The table the writer fills: each row names its transaction, so a snapshot's rows are known.
pub const EVENTS: &str = "CREATE TABLE events (id bigserial PRIMARY KEY, \
                          txid xid8 NOT NULL DEFAULT pg_current_xact_id(), \
                          at timestamptz NOT NULL DEFAULT clock_timestamp())";

/// Every row of `events` (ids and transactions) as one fingerprint, over `filter`.
fn events_query(filter: &str) -> String {
    format!(
        "SELECT count(*) || ' ' || coalesce(max(id), 0) || ' ' || \
         md5(coalesce(string_agg(id || ':' || txid, ',' ORDER BY id), '')) \
         FROM events {filter}"
    )
}

fn content(fingerprint: &str) -> Content {
    let amount = fingerprint
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a row count in `{fingerprint}`"));
    Content {
        amount,
        detail: fingerprint.to_owned(),
    }
}

/// Inserts rows into `events` one transaction at a time until stopped; returns the longest
/// single insert.
pub fn spawn_writer(url: &str, stop: Arc<AtomicBool>) -> JoinHandle<Duration> {
    spawn_client(url, move |client| async move {
        let mut longest = Duration::ZERO;
        while !stop.load(Ordering::Relaxed) {
            let began = Instant::now();
            client
                .execute("INSERT INTO events DEFAULT VALUES", &[])
                .await
                .expect("insert");
            longest = longest.max(began.elapsed());
        }
        longest
    })
}

/// A plain-text dump for comparing databases row for row (the per-run `\restrict` keys
/// removed).
pub fn plain_dump(pg: &Postgres, database: &str) -> String {
    let out = Command::new(bin("pg_dump"))
        .args(["--no-sync", "-d", &pg.url(database)])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `psql` session on `database` that stays connected, named `application_name` = `name`.
pub fn busy_session(pg: &Postgres, database: &str, name: &str) -> Child {
    let child = Command::new(bin("psql"))
        .args([
            "-X",
            "-q",
            "-d",
            &pg.url(database),
            "-c",
            "SELECT pg_sleep(120)",
        ])
        .env("PGAPPNAME", name)
        // Its end (terminated by a forced restore) is expected; its complaint is noise.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let query = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'");
    assert!(crate::wait_until(Duration::from_secs(10), || pg
        .psql("postgres", &query)
        == "1"));
    child
}

pub struct PostgresSubject {
    pg: Postgres,
    agent: OneShot,
    scratch: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<Duration>>,
}

/// A database on the source server or on a server of its own; a session holding it open.
pub struct PgTarget {
    server: Option<Postgres>,
    database: String,
    busy: Mutex<Option<Child>>,
}

impl PostgresSubject {
    fn server<'a>(&'a self, target: &'a PgTarget) -> &'a Postgres {
        target.server.as_ref().unwrap_or(&self.pg)
    }
}

impl Subject for PostgresSubject {
    const NAME: &'static str = "postgres";
    const ONE_SHOT_FENCE: bool = true;
    const REFUSAL: &'static [&'static str] = &[
        "database `app_occupied` is in use",
        "busy-report",
        "--force",
    ];
    type Target = PgTarget;

    fn start(dir: &Path) -> Self {
        let pg = Postgres::start();
        pg.psql("postgres", "CREATE DATABASE app");
        pg.psql("app", EVENTS);
        let scratch = dir.join("scratch");
        let agent = OneShot::new("postgres", &init_local_repository(dir))
            .with("AITBC_BACKUP_POSTGRES__URL", pg.url("postgres"))
            .with("AITBC_BACKUP_POSTGRES__DATABASES", r#"["app"]"#)
            .with(
                "AITBC_BACKUP_POSTGRES__FENCE_TABLES",
                r#"["app.public.events"]"#,
            )
            .with(
                "AITBC_BACKUP_POSTGRES__SCRATCH_DIR",
                scratch.display().to_string(),
            )
            .with(
                "AITBC_BACKUP_LEDGER__SCRATCH_DIR",
                scratch.display().to_string(),
            );
        let stop = Arc::new(AtomicBool::new(false));
        let writer = spawn_writer(&pg.url("app"), stop.clone());
        assert!(crate::wait_until(Duration::from_secs(10), || {
            pg.psql("app", "SELECT count(*) FROM events") != "0"
        }));
        PostgresSubject {
            pg,
            agent,
            scratch,
            stop,
            writer: Some(writer),
        }
    }

    fn agent(&self) -> OneShot {
        self.agent.clone()
    }

    fn stop_writer(&mut self) -> Option<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.take().and_then(|w| w.join().ok())
    }

    fn written(&self) -> u64 {
        self.pg
            .psql("app", "SELECT count(*) FROM events")
            .parse()
            .expect("count")
    }

    fn captured(&self, manifest: &str) -> Content {
        let shown = self.agent.repo_json(&["show", manifest]);
        let point = &shown["consistency"];
        assert_eq!(point["kind"], "postgres", "{shown}");
        let database = &point["databases"][0];
        assert_eq!(database["name"], "app", "{shown}");
        let snapshot = database["txid_snapshot"].as_str().expect("txid snapshot");
        let captured = content(&self.pg.psql(
            "app",
            &events_query(&format!(
                "WHERE pg_visible_in_snapshot(txid, '{snapshot}'::pg_snapshot)"
            )),
        ));
        // The manifest's own row count agrees.
        assert_eq!(
            database["row_counts"]["public.events"].as_u64(),
            Some(captured.amount),
            "{shown}"
        );
        captured
    }

    fn reported(&self, report: &Value) -> Option<u64> {
        let databases = report["databases"].as_array()?;
        assert_eq!(databases.len(), 1, "{report}");
        assert_eq!(databases[0]["from"], "app", "{report}");
        databases[0]["rows"].as_u64()
    }

    fn fresh_target(&self, _dir: &Path, n: usize) -> PgTarget {
        PgTarget {
            server: None,
            database: format!("app_copy_{n}"),
            busy: Mutex::new(None),
        }
    }

    fn separate_target(&self, _dir: &Path) -> PgTarget {
        PgTarget {
            server: Some(Postgres::start()),
            database: "app".into(),
            busy: Mutex::new(None),
        }
    }

    fn occupy(&self, _dir: &Path) -> PgTarget {
        self.pg.psql("postgres", "CREATE DATABASE app_occupied");
        self.pg.psql(
            "app_occupied",
            &format!("{EVENTS}; INSERT INTO events DEFAULT VALUES"),
        );
        let busy = busy_session(&self.pg, "app_occupied", "busy-report");
        PgTarget {
            server: None,
            database: "app_occupied".into(),
            busy: Mutex::new(Some(busy)),
        }
    }

    fn target_args(&self, target: &PgTarget) -> Vec<String> {
        let mut args = vec!["--database".into(), "app".into()];
        if let Some(server) = &target.server {
            args.extend(["--target-url".into(), server.url("postgres")]);
        }
        if target.database != "app" {
            args.extend(["--as".into(), target.database.clone()]);
        }
        args
    }

    fn set_target(&self, target: &PgTarget) -> String {
        assert_eq!(target.database, "app", "a set restores under the same name");
        self.server(target).url("postgres")
    }

    fn content(&self, target: &PgTarget) -> Content {
        content(
            &self
                .server(target)
                .psql(&target.database, &events_query("")),
        )
    }

    fn state(&self, target: &PgTarget) -> String {
        plain_dump(self.server(target), &target.database)
    }

    fn source_state(&self) -> String {
        let databases = self.pg.psql(
            "postgres",
            "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database",
        );
        format!("{databases}\n{}", plain_dump(&self.pg, "app"))
    }

    fn after_restore(&self, target: &PgTarget, _manifest: &str) {
        // A session the forced restore had to end was terminated.
        if let Some(mut busy) = target.busy.lock().expect("lock").take() {
            assert!(
                !busy.wait().expect("psql exits").success(),
                "the busy session was terminated"
            );
        }
        // No temporary or previous database stays behind.
        let left = self.server(target).psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_aitbc\\_%'",
        );
        assert_eq!(left, "0");
    }

    fn leftovers(&self) -> Vec<String> {
        let databases = self.pg.psql(
            "postgres",
            "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE '%\\_aitbc\\_%'",
        );
        let mut left: Vec<String> = databases
            .split(',')
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        left.extend(super::trial_dirs(&self.scratch));
        left
    }
}

impl Drop for PostgresSubject {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

impl Drop for PgTarget {
    fn drop(&mut self) {
        if let Some(mut busy) = self.busy.lock().map(|mut b| b.take()).ok().flatten() {
            let _ = busy.kill();
            let _ = busy.wait();
        }
    }
}
