//! Redis backups while a real replica (a second redis-server with REPLICAOF) does its initial
//! sync under write load, with Redis 7's own replication defaults (diskless, a 5 s delay) and
//! with disk-based sync: the agent one-shot and snapshot sets through the coordinator, several
//! times, each restored into a fresh server and checked by its keys. And overlapping snapshot
//! sets: queued behind the running set (the CLI says which), disjoint ones at once, every
//! committed set restores.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aitbc_backup_tests::agent::{OneShot, init_local_repository};
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::stack::{Stack, last_snapshot};
use aitbc_backup_tests::{temp_dir, wait_until};
use serde_json::Value;

/// Keys seeded before the writer starts: `seed:<n>`.
const SEED_KEYS: u64 = 30_000;
/// Per key, in the fork child: a full sync of the seed takes about 3 s, long enough for the
/// agent's request to arrive while a replica's sync is streaming.
const SLOW_CHILD: &[&str] = &["--rdb-key-save-delay", "100"];

fn seed(redis: &Redis) {
    let mut script = Vec::new();
    for n in 0..SEED_KEYS {
        let (key, value) = (format!("seed:{n}"), format!("value-{n}"));
        script.extend(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )
            .as_bytes(),
        );
    }
    redis.pipe(&script);
}

/// Writes `w:last` = n for n = 1, 2, ... (about a thousand a second, so the key count and
/// the fork child's time stay bounded) until stopped; returns the last n.
fn spawn_writer(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("writer connects");
        let mut reply = [0u8; 5];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let value = n.to_string();
            let command = format!(
                "*3\r\n$3\r\nSET\r\n$6\r\nw:last\r\n${}\r\n{value}\r\n",
                value.len()
            );
            if socket.write_all(command.as_bytes()).is_err()
                || socket.read_exact(&mut reply).is_err()
            {
                break; // the server stopped (a failed test tears down)
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    })
}

/// A second redis-server replicating `master` (its initial sync starts at once).
fn replica_of(master: &Redis) -> Redis {
    Redis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()])
}

fn info(redis: &Redis, section: &str, key: &str) -> String {
    redis
        .cli(&["INFO", section])
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// Waits until the master's fork for a replica's sync is running.
fn wait_for_sync_child(master: &Redis) {
    assert!(
        wait_until(Duration::from_secs(30), || info(
            master,
            "persistence",
            "rdb_bgsave_in_progress"
        ) == "1"),
        "the replica's sync never started"
    );
}

fn config(redis: &Redis, name: &str) -> String {
    redis
        .cli(&["CONFIG", "GET", name])
        .lines()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// What a restored server must hold: every seed key, and the writer's last value at the cut,
/// at most what was written. Returns that value.
fn check_restored(target: &Redis, written: u64) -> u64 {
    assert_eq!(
        target.cli(&["EVAL", "return #redis.call('KEYS', 'seed:*')", "0"]),
        SEED_KEYS.to_string()
    );
    assert_eq!(target.cli(&["GET", "seed:12345"]), "value-12345");
    let m: u64 = target.cli(&["GET", "w:last"]).parse().expect("w:last");
    assert!(m <= written, "{m} restored of {written} written");
    m
}

fn one_shot(redis: &Redis, dir: &Path) -> OneShot {
    OneShot::new("redis", &init_local_repository(dir)).with(
        "AITBC_BACKUP_REDIS__ADDRESS",
        format!("127.0.0.1:{}", redis.port),
    )
}

/// `rounds` one-shot backups of `master`, each while a new replica does its initial sync
/// (`while_streaming`: the agent asks once the replica's fork runs, so its sync is deferred),
/// each restored and checked; the server's settings are its own again after each.
fn backups_beside_a_syncing_replica(master_args: &[&str], while_streaming: bool) {
    let dir = temp_dir("redis-replica");
    let master = Redis::start_with(master_args);
    seed(&master);
    master.cli(&["CONFIG", "SET", "rdb-key-save-delay", SLOW_CHILD[1]]);
    let (diskless, delay) = (
        config(&master, "repl-diskless-sync"),
        config(&master, "repl-diskless-sync-delay"),
    );
    let agent = one_shot(&master, dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.port, stop.clone());
    let mut reports = Vec::new();
    for _round in 0..3 {
        let replica = replica_of(&master);
        if while_streaming {
            wait_for_sync_child(&master);
        }
        let report = agent.ok(&["backup"]);
        assert_eq!(report["sync_deferred"], while_streaming, "{report}");
        // The real replica completes its own sync.
        assert!(
            wait_until(Duration::from_secs(60), || info(
                &replica,
                "replication",
                "master_link_status"
            ) == "up"),
            "the replica did not finish its sync"
        );
        assert_eq!(config(&master, "rdbcompression"), "yes");
        assert_eq!(config(&master, "repl-diskless-sync"), diskless);
        assert_eq!(config(&master, "repl-diskless-sync-delay"), delay);
        reports.push(report);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("writer");
    let mut restored = Vec::new();
    for report in &reports {
        let target = Redis::start();
        agent
            .clone()
            .with(
                "AITBC_BACKUP_REDIS__ADDRESS",
                format!("127.0.0.1:{}", target.port),
            )
            .ok(&["restore", report["manifest"].as_str().expect("id")]);
        restored.push(check_restored(&target, written));
    }
    // Each backup is a later cut of the same writer.
    assert!(
        restored.windows(2).all(|w| w[0] < w[1]) && restored[0] > 0,
        "{restored:?} of {written}"
    );
}

#[test]
fn one_shot_backups_while_a_replica_syncs_diskless_with_the_default_delay() {
    // Redis 7's defaults: diskless sync, 5 s delay (the harness sets 0; this puts it back).
    backups_beside_a_syncing_replica(&["--repl-diskless-sync-delay", "5"], false);
}

#[test]
fn one_shot_backups_deferred_behind_a_replicas_diskless_sync() {
    backups_beside_a_syncing_replica(&["--repl-diskless-sync-delay", "5"], true);
}

#[test]
fn one_shot_backups_deferred_behind_a_replicas_disk_sync() {
    backups_beside_a_syncing_replica(&["--repl-diskless-sync", "no"], true);
}

fn install() {
    aitbc_backup_tls::install_crypto_provider();
}

/// The stack with Redis 7's replication defaults and a slow fork child.
fn stack() -> Stack {
    let mut redis_args = vec!["--repl-diskless-sync-delay", "5"];
    redis_args.extend_from_slice(SLOW_CHILD);
    let stack = Stack::start_with(
        50,
        &[("AITBC_BACKUP_SNAPSHOT__CUT_TIMEOUT", "60s")],
        &redis_args,
        &[],
    );
    seed(&stack.redis);
    stack
}

#[test]
fn snapshot_sets_while_a_replica_syncs_restore_at_one_cut() {
    install();
    let stack = stack();
    for round in 0..3 {
        let replica = replica_of(&stack.redis);
        // Rounds 1 and 3: the set asks while the replica's fork streams (deferred); round 2:
        // within the replica's diskless delay (one fork for both).
        if round != 1 {
            wait_for_sync_child(&stack.redis);
        }
        let set = stack.snapshot("coordinated");
        assert_eq!(set["state"], "committed", "round {round}: {set:#}");
        let id = set["id"].as_str().expect("id");
        // The Redis component alone into a fresh server: every key of the seed.
        let target = Redis::start();
        stack.cli_ok(&[
            "restore",
            id,
            "--component",
            "redis",
            "--target",
            &format!("redis=127.0.0.1:{}", target.port),
        ]);
        assert_eq!(
            target.cli(&["EVAL", "return #redis.call('KEYS', 'seed:*')", "0"]),
            SEED_KEYS.to_string()
        );
        let ((ledger, postgres, redis), _) = stack.restore_fresh(id);
        // A deferred fork is a later cut: the heights spread no more than the recorded skew
        // allows at the node's rate, plus a second of blocks for the mirror's own lag behind the
        // ledger on a loaded machine (seen once with five suites sharing two cores).
        let skew = set["cut_skew_ms"].as_f64().expect("skew");
        let heights = [ledger, postgres, redis];
        let spread = heights.iter().max().unwrap_or(&0) - heights.iter().min().unwrap_or(&0);
        let bound = (50.0 * (skew + 1e3) / 1e3).ceil() as u64 + 1;
        assert!(
            redis > 0 && spread <= bound,
            "round {round}: ledger {ledger}, postgres {postgres}, redis {redis}: spread {spread} > {bound} (skew {skew} ms)"
        );
        println!("round {round}: cut skew {skew} ms, heights {heights:?}");
        assert!(
            wait_until(Duration::from_secs(60), || info(
                &replica,
                "replication",
                "master_link_status"
            ) == "up"),
            "the replica did not finish its sync"
        );
        assert_eq!(config(&stack.redis, "rdbcompression"), "yes");
        assert_eq!(config(&stack.redis, "repl-diskless-sync-delay"), "5");
    }
}

/// `snapshot create` in the background.
fn create(stack: &Stack, args: &[&str]) -> std::process::Child {
    let mut full = vec!["snapshot", "create"];
    full.extend_from_slice(args);
    stack
        .cli_command(&full)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the CLI")
}

fn running(stack: &Stack) -> Vec<String> {
    stack
        .snapshots()
        .into_iter()
        .filter(|s| s["state"] == "running")
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn overlapping_sets_are_queued_behind_the_running_set_and_all_restore() {
    install();
    let stack = stack();
    // Two operators at once: both commit, one after the other; the later one said it waits.
    let first = create(&stack, &["--wait", "--json"]);
    let second = create(&stack, &["--wait", "--json"]);
    let (first, second) = (
        first.wait_with_output().expect("first"),
        second.wait_with_output().expect("second"),
    );
    let mut ids = Vec::new();
    let mut queued = Vec::new();
    for out in [&first, &second] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let set = last_snapshot(&stdout).expect("final event");
        assert_eq!(set["state"], "committed", "{set:#}");
        ids.push(set["id"].as_str().expect("id").to_owned());
        let started: Value = stdout
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .expect("first event");
        assert_eq!(started["phase"], "started");
        queued.push(started["message"].as_str().unwrap_or_default().to_owned());
    }
    // Exactly one was queued, behind the other.
    let waits: Vec<(usize, &String)> = queued
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.is_empty())
        .collect();
    assert_eq!(waits.len(), 1, "{queued:?}");
    let (i, message) = waits[0];
    assert!(
        message.contains(&format!("`{}`", ids[1 - i])) && message.starts_with("queued"),
        "{message}"
    );

    // Human output: a set asked for while one runs says which it waits for, on stderr; stdout
    // is its id. A set on other agents only runs at once and says nothing.
    let running_set = create(&stack, &["--components", "redis,postgres", "--wait"]);
    assert!(
        wait_until(Duration::from_secs(30), || !running(&stack).is_empty()),
        "the first set never ran"
    );
    let blocking = running(&stack);
    let disjoint = stack.cli(&["snapshot", "create", "--components", "ledger"]);
    assert!(disjoint.status.success());
    assert_eq!(String::from_utf8_lossy(&disjoint.stderr), "");
    let queued = stack.cli(&["snapshot", "create", "--components", "redis"]);
    assert!(queued.status.success());
    let queued_id = String::from_utf8_lossy(&queued.stdout).trim().to_owned();
    let said = String::from_utf8_lossy(&queued.stderr);
    assert!(
        said.contains(&format!(
            "snapshot set {queued_id} queued: waits for snapshot set `{}`",
            blocking[0]
        )),
        "{said}"
    );
    let out = running_set.wait_with_output().expect("running set");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disjoint_id = String::from_utf8_lossy(&disjoint.stdout).trim().to_owned();
    for id in [&queued_id, &disjoint_id] {
        assert!(
            wait_until(
                Duration::from_secs(120),
                || stack.snapshot_listed(id)["state"] == "committed"
            ),
            "set {id}: {:#}",
            stack.snapshot_listed(id)
        );
    }

    // Every set committed and restores.
    for id in &ids {
        let ((ledger, postgres, redis), _) = stack.restore_fresh(id);
        assert!(
            redis <= postgres && postgres <= ledger && redis > 0,
            "{id}: ledger {ledger}, postgres {postgres}, redis {redis}"
        );
    }
    let committed: Vec<Value> = stack
        .snapshots()
        .into_iter()
        .filter(|s| s["state"] == "committed")
        .collect();
    assert_eq!(committed.len(), 5, "{committed:#?}");
}
