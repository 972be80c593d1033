//! PostgreSQL 15 on a free loopback port.
//!
//! `initdb` runs once per machine into a template cluster (under the system temp dir, keyed by
//! the major version); each test copies it, which takes a fraction of a second instead of
//! several. initdb and postgres refuse to run as root, so as root they run as the `postgres`
//! OS user and the test's directory is handed to that user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{Service, Spec};

pub const PG_MAJOR: u32 = 15;

pub struct Postgres {
    pub port: u16,
    pub data_dir: PathBuf,
    service: Service,
    _dir: tempfile::TempDir,
}

/// A PostgreSQL 15 program (`psql`, `pg_dump`, `pgbench`, ...).
pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(format!("/usr/lib/postgresql/{PG_MAJOR}/bin/{name}"))
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The OS user PostgreSQL runs as: `postgres` under root, else ourselves.
fn os_user() -> Option<&'static str> {
    running_as_root().then_some("postgres")
}

fn chown_to_postgres(path: &Path) {
    if running_as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown {} to postgres", path.display());
    }
}

/// Runs a command as the PostgreSQL OS user.
fn run_as_postgres(program: &Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("setpriv");
    if let Some(user) = os_user() {
        command.args(["--reuid", user, "--regid", user, "--init-groups"]);
    }
    command
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("run {}: {err}", program.display()))
}

/// The template cluster, created on first use (atomically: initdb into a scratch directory,
/// then rename, so concurrent test processes never see half a cluster).
fn template() -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "aitbc-backup-harness-pg{PG_MAJOR}-uid{}",
        nix::unistd::geteuid()
    ));
    let template = root.join("template");
    if template.join("PG_VERSION").exists() {
        return template;
    }
    std::fs::create_dir_all(&root).expect("create template root");
    let scratch = tempfile::Builder::new()
        .prefix("initdb-")
        .tempdir_in(&root)
        .expect("scratch dir");
    let data = scratch.path().join("data");
    chown_to_postgres(scratch.path());
    let out = run_as_postgres(
        &bin("initdb"),
        &[
            "-D",
            data.to_str().expect("utf-8 path"),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
    );
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another process may have won the race; either cluster is fine.
    let _ = std::fs::rename(&data, &template);
    assert!(template.join("PG_VERSION").exists(), "template cluster");
    template
}

impl Postgres {
    /// Starts a fresh cluster (superuser `postgres`, trust auth on loopback).
    pub fn start() -> Postgres {
        let dir = crate::temp_dir("pg");
        let data_dir = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template())
            .arg(&data_dir)
            .status()
            .expect("copy template cluster");
        assert!(status.success(), "copy template cluster");
        Postgres::start_in(dir, data_dir)
    }

    /// Starts a server on an existing data directory (a restored cluster); `dir` holds the
    /// socket and the log and is removed with the server.
    pub fn start_on(data_dir: &Path) -> Postgres {
        Postgres::start_in(crate::temp_dir("pg"), data_dir.to_owned())
    }

    fn start_in(dir: tempfile::TempDir, data_dir: PathBuf) -> Postgres {
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir_all(&socket_dir).expect("socket dir");
        chown_to_postgres(dir.path());
        let port = crate::free_port();
        let service = Service::spawn(Spec {
            name: "postgres",
            program: &bin("postgres"),
            args: vec![
                "-D".into(),
                data_dir.display().to_string(),
                "-p".into(),
                port.to_string(),
                "-k".into(),
                socket_dir.display().to_string(),
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
                "-c".into(),
                "fsync=off".into(),
            ],
            env: vec![],
            user: os_user(),
            cwd: Some(dir.path()),
            log: dir.path().join("postgres.log"),
            // SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients.
            stop_signal: Signal::SIGINT,
        });
        let pg = Postgres {
            port,
            data_dir,
            service,
            _dir: dir,
        };
        let ready = crate::wait_until(Duration::from_secs(30), || {
            Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        pg.service.expect_ready(ready, "accepting connections");
        pg
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(bin("psql"))
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(database),
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }

    /// SIGKILLs the postmaster (its backends exit when they notice).
    pub fn kill9(&mut self) {
        self.service.kill9();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.service.log()
    }
}

/// Hands a directory to the PostgreSQL OS user (a parent a restored cluster goes into).
pub fn hand_to_postgres(path: &Path) {
    chown_to_postgres(path);
}

/// Runs `work` with a connection to `url` on a thread of its own (with its own runtime), for
/// writers that go on beside a test's blocking steps.
pub fn spawn_client<T, F, Fut>(url: &str, work: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let url = url.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("the writer connects");
            tokio::spawn(connection);
            work(client).await
        })
    })
}

/// A writer committing one row into `ticks(id, at)` about every `1/rate` seconds, one
/// transaction at a time, remembering the last id the server acknowledged.
pub struct TickWriter {
    acked: std::sync::Arc<std::sync::atomic::AtomicI64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TickWriter {
    pub fn start(url: &str, rate: u32) -> TickWriter {
        use std::sync::atomic::Ordering;
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (thread_acked, thread_stop) = (acked.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_client(url, move |client| async move {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS ticks(id bigserial PRIMARY KEY, \
                     at timestamptz NOT NULL DEFAULT clock_timestamp())",
                )
                .await
                .expect("create ticks");
            let _ = ready_tx.send(());
            let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            while !thread_stop.load(Ordering::Relaxed) {
                match client
                    .query_one("INSERT INTO ticks DEFAULT VALUES RETURNING id", &[])
                    .await
                {
                    Ok(row) => thread_acked.store(row.get(0), Ordering::SeqCst),
                    Err(_) => return, // the server is gone
                }
                tokio::time::sleep(period).await;
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the writer starts");
        TickWriter {
            acked,
            stop,
            thread: Some(thread),
        }
    }

    /// The last id the server acknowledged as committed.
    pub fn acked(&self) -> i64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn stop(&mut self) -> i64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.acked()
    }
}

impl Drop for TickWriter {
    fn drop(&mut self) {
        self.stop();
    }
}
