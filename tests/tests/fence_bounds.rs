//! Fences hold writers for at most `fence_max_pause`, counted from the moment writers can first
//! queue behind them, whoever disappears: a conflicting lock delays the fence, the coordinator
//! hangs (SIGSTOP) right after sending it, and probe writers on each component measure how long
//! their writes wait. A fence that cannot be taken in its budget aborts the set naming who is in
//! its way. Real PostgreSQL, Redis, node simulator, coordinator and agents.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use aitbc_backup_tests::postgres::spawn_client;
use aitbc_backup_tests::stack::{MIRROR_DB, Stack, last_snapshot};
use aitbc_backup_tests::wait_until;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const MAX_PAUSE: Duration = Duration::from_secs(3);
/// Scheduling, polling (SQLite's busy handler sleeps up to 100 ms) and the test's own view.
const SLACK: Duration = Duration::from_secs(1);

fn stack() -> Stack {
    aitbc_backup_tls::install_crypto_provider();
    Stack::start_with(
        20,
        &[],
        &[],
        &[
            ("AITBC_BACKUP_POSTGRES__FENCE_MAX_PAUSE", "3s"),
            ("AITBC_BACKUP_REDIS__FENCE_MAX_PAUSE", "3s"),
            ("AITBC_BACKUP_LEDGER__FENCE_MAX_PAUSE", "3s"),
        ],
    )
}

/// Every write a probe made: when it was sent and when it was acknowledged.
type Writes = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// A writer that writes to one component in a loop and records each write's wait.
struct Probe {
    name: &'static str,
    writes: Writes,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Runs `write` in a loop on a thread of its own until stopped.
    fn start(
        name: &'static str,
        mut write: impl FnMut() -> Result<(), String> + Send + 'static,
    ) -> Probe {
        let writes: Writes = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (writes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if let Err(err) = write() {
                    panic!("the {name} probe's write failed: {err}");
                }
                w.lock().expect("writes").push((sent, Instant::now()));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Probe {
            name,
            writes,
            stop,
            thread: Some(thread),
        }
    }

    /// UPDATEs nothing in the fenced table: it takes the same lock a writer does.
    fn postgres(stack: &Stack) -> Probe {
        let (tx, rx) = mpsc::channel::<()>();
        let writes: Writes = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (writes.clone(), stop.clone());
        let thread = spawn_client(&stack.pg.url(MIRROR_DB), move |client| async move {
            let _ = tx.send(());
            while !s.load(Ordering::Relaxed) {
                let sent = Instant::now();
                client
                    .batch_execute("UPDATE chain_blocks SET height = height WHERE false")
                    .await
                    .expect("the postgres probe writes");
                w.lock().expect("writes").push((sent, Instant::now()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("connects");
        Probe {
            name: "postgres",
            writes,
            stop,
            thread: Some(thread),
        }
    }

    fn redis(stack: &Stack) -> Probe {
        let mut conn = TcpStream::connect(("127.0.0.1", stack.redis.port)).expect("redis");
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        Probe::start("redis", move || {
            conn.write_all(b"*3\r\n$3\r\nSET\r\n$11\r\nfence:probe\r\n$1\r\n1\r\n")
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if line == "+OK\r\n" { Ok(()) } else { Err(line) }
        })
    }

    fn ledger(stack: &Stack) -> Probe {
        let conn = rusqlite::Connection::open(chain_db(stack)).expect("open chain.db");
        conn.busy_timeout(Duration::from_secs(60)).expect("busy");
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS fence_probe(n INTEGER); INSERT INTO fence_probe VALUES (0)",
        )
        .expect("probe table");
        Probe::start("ledger", move || {
            conn.execute_batch("UPDATE fence_probe SET n = n + 1")
                .map_err(|e| e.to_string())
        })
    }

    /// Stops the writer; its writes.
    fn stop(mut self) -> (&'static str, Vec<(Instant, Instant)>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("probe thread");
        }
        let writes = std::mem::take(&mut *self.writes.lock().expect("writes"));
        (self.name, writes)
    }
}

fn chain_db(stack: &Stack) -> std::path::PathBuf {
    stack.node.data_dir.join("chain/chain.db")
}

/// Holds a PostgreSQL lock that conflicts with the fence (an open writing transaction) until
/// the returned sender is dropped or sent to; its backend pid.
fn hold_postgres_lock(stack: &Stack) -> (mpsc::Sender<()>, i32, std::thread::JoinHandle<()>) {
    let (release, released) = mpsc::channel::<()>();
    let (pid_tx, pid_rx) = mpsc::channel();
    let url = format!("{}?application_name=fence-blocker", stack.pg.url(MIRROR_DB));
    let thread = spawn_client(&url, move |client| async move {
        client
            .batch_execute("BEGIN; LOCK TABLE chain_blocks IN ROW EXCLUSIVE MODE")
            .await
            .expect("lock");
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        let _ = pid_tx.send(pid);
        let _ = tokio::task::spawn_blocking(move || released.recv()).await;
        let _ = client.batch_execute("COMMIT").await;
    });
    let pid = pid_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("holder");
    (release, pid, thread)
}

/// Holds chain.db's write lock until released; the thread's process is this test.
fn hold_ledger_lock(stack: &Stack) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (release, released) = mpsc::channel::<()>();
    let (ready_tx, ready) = mpsc::channel();
    let path = chain_db(stack);
    let thread = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(path).expect("open");
        conn.busy_timeout(Duration::from_secs(10)).expect("busy");
        conn.execute_batch("BEGIN IMMEDIATE").expect("write lock");
        let _ = ready_tx.send(());
        let _ = released.recv();
        conn.execute_batch("COMMIT").expect("commit");
    });
    ready.recv_timeout(Duration::from_secs(15)).expect("holder");
    (release, thread)
}

/// Whether the fence's `LOCK TABLE` waits on the server now.
fn fence_pending(stack: &Stack) -> bool {
    stack.pg.psql(
        MIRROR_DB,
        "SELECT count(*) FROM pg_locks WHERE mode = 'ShareRowExclusiveLock' AND NOT granted",
    ) != "0"
}

fn create_fenced(stack: &Stack) -> Child {
    stack
        .cli_command(&["snapshot", "create", "--wait", "--json", "--mode", "fenced"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the CLI")
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().expect("CLI");
    let stdout = String::from_utf8_lossy(&out.stdout);
    last_snapshot(&stdout).unwrap_or_else(|| {
        panic!(
            "no final event: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The longest wait of a write that ended after `from`, and the last moment a write that was
/// held up (over 200 ms) was acknowledged.
fn waits(writes: &[(Instant, Instant)], from: Instant) -> (Duration, Option<Instant>) {
    let longest = writes
        .iter()
        .filter(|(_, done)| *done > from)
        .map(|(sent, done)| *done - *sent)
        .max()
        .unwrap_or_default();
    let last_held = writes
        .iter()
        .filter(|(sent, done)| *done - *sent > Duration::from_millis(200))
        .map(|(_, done)| *done)
        .max();
    (longest, last_held)
}

#[test]
fn writers_wait_at_most_the_pause_from_the_first_lock_with_the_coordinator_hung() {
    let stack = stack();
    let probes = [
        Probe::postgres(&stack),
        Probe::redis(&stack),
        Probe::ledger(&stack),
    ];
    // The PostgreSQL fence will queue behind this transaction; writers queue behind the fence
    // from that moment. The ledger's write lock is held as well, so its fence waits too.
    let (pg_release, _, pg_holder) = hold_postgres_lock(&stack);
    let (ledger_release, ledger_holder) = hold_ledger_lock(&stack);
    let child = create_fenced(&stack);
    assert!(
        wait_until(Duration::from_secs(30), || fence_pending(&stack)),
        "the PostgreSQL fence never waited for the lock"
    );
    // Every fence has been asked for by now (the coordinator sends them together): hang the
    // coordinator so nobody releases them, then let the conflicting locks go 1.5 s later.
    let asked = Instant::now();
    let coordinator = Pid::from_raw(stack.coordinator.pid() as i32);
    kill(coordinator, Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = pg_release.send(());
    let _ = ledger_release.send(());
    std::thread::sleep(MAX_PAUSE + SLACK + Duration::from_millis(500));
    let results: Vec<_> = probes.into_iter().map(Probe::stop).collect();
    kill(coordinator, Signal::SIGCONT).expect("SIGCONT");
    pg_holder.join().expect("holder");
    ledger_holder.join().expect("holder");

    for (name, writes) in &results {
        let (longest, last_held) = waits(writes, asked);
        println!("{name}: longest writer wait {longest:?} with the coordinator hung");
        assert!(
            writes
                .iter()
                .any(|(sent, _)| *sent > asked + MAX_PAUSE + SLACK),
            "{name}: the probe kept writing after the fence"
        );
        if let Some(last) = last_held {
            assert!(
                last <= asked + MAX_PAUSE + SLACK,
                "{name}: a writer was held {:?} after the fence was asked for (bound {MAX_PAUSE:?})",
                last - asked
            );
        }
    }
    // The coordinator, woken, finds the fences gone: the set is aborted, never committed with
    // a cut that was not exact.
    let set = finish(child);
    assert_eq!(set["state"], "aborted", "{set:#}");
    assert!(stack.stored_sets().is_empty());
    // A fenced set goes through once nothing is in the way.
    stack.wait_agents_online();
    let next = stack.snapshot("fenced");
    assert_eq!(next["state"], "committed", "{next:#}");
}

#[test]
fn a_fence_that_cannot_be_taken_in_its_budget_aborts_the_set_naming_who_holds_the_lock() {
    let stack = stack();

    // PostgreSQL: the conflicting transaction outlives the budget.
    let probe = Probe::postgres(&stack);
    let (release, pid, holder) = hold_postgres_lock(&stack);
    let child = create_fenced(&stack);
    assert!(wait_until(Duration::from_secs(30), || fence_pending(
        &stack
    )));
    let asked = Instant::now();
    let set = finish(child);
    let (_, writes) = probe.stop();
    let _ = release.send(());
    holder.join().expect("holder");
    assert_eq!(set["state"], "aborted", "{set:#}");
    let reason = set["abort_reason"].as_str().unwrap_or_default();
    for expected in [
        "chain_blocks",
        "fence_max_pause",
        &format!("pid {pid}"),
        "fence-blocker",
    ] {
        assert!(reason.contains(expected), "`{expected}` in: {reason}");
    }
    let (longest, last_held) = waits(&writes, asked);
    println!("postgres, fence not granted: longest writer wait {longest:?}");
    if let Some(last) = last_held {
        assert!(
            last <= asked + MAX_PAUSE + SLACK,
            "a writer was held {:?} after the fence was asked for",
            last - asked
        );
    }

    // The ledger: another process's write transaction outlives the budget.
    let (release, holder) = hold_ledger_lock(&stack);
    let set = finish(create_fenced(&stack));
    let _ = release.send(());
    holder.join().expect("holder");
    assert_eq!(set["state"], "aborted", "{set:#}");
    let reason = set["abort_reason"].as_str().unwrap_or_default();
    for expected in [
        "chain/chain.db",
        "ledger.fence_max_pause",
        &format!("pid {}", std::process::id()),
    ] {
        assert!(reason.contains(expected), "`{expected}` in: {reason}");
    }

    assert!(stack.stored_sets().is_empty());
    let next = stack.snapshot("fenced");
    assert_eq!(next["state"], "committed", "{next:#}");
}

#[test]
fn a_postgres_fence_granted_while_its_agent_hangs_is_ended_by_the_server_in_time() {
    let mut stack = stack();
    let probe = Probe::postgres(&stack);
    let (release, _, holder) = hold_postgres_lock(&stack);
    let child = create_fenced(&stack);
    assert!(wait_until(Duration::from_secs(30), || fence_pending(
        &stack
    )));
    let asked = Instant::now();
    // The agent hangs while its LOCK waits; the lock is granted 1 s later, and nobody on the
    // agent's side is left to end it.
    let agent = Pid::from_raw(stack.agent("postgres").pid() as i32);
    kill(agent, Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_secs(1));
    let _ = release.send(());
    holder.join().expect("holder");
    std::thread::sleep(MAX_PAUSE + SLACK + Duration::from_millis(500));
    let (_, writes) = probe.stop();
    kill(agent, Signal::SIGCONT).expect("SIGCONT");
    let (longest, last_held) = waits(&writes, asked);
    println!("postgres, agent hung after its LOCK: longest writer wait {longest:?}");
    assert!(
        writes
            .iter()
            .any(|(sent, _)| *sent > asked + MAX_PAUSE + SLACK),
        "the probe kept writing after the fence"
    );
    if let Some(last) = last_held {
        assert!(
            last <= asked + MAX_PAUSE + SLACK,
            "a writer was held {:?} after the fence was asked for (bound {MAX_PAUSE:?})",
            last - asked
        );
    }
    let set = finish(child);
    assert_ne!(set["state"], "committed", "{set:#}");
}
