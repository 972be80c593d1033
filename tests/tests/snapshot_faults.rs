//! Snapshot sets under failure: an agent killed mid-upload, the coordinator killed mid-upload
//! (and restarted), the coordinator killed while writers are fenced. Real everything; the
//! uploads are slowed with the agents' own throughput limit so there is a "mid".

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use aitbc_backup_tests::stack::{MIRROR_DB, Stack, last_snapshot};
use aitbc_backup_tests::wait_until;
use serde_json::Value;

fn install() {
    aitbc_backup_tls::install_crypto_provider();
}

/// Starts `snapshot create --wait --json` and reads its events until `until` matches one.
/// The caller waits for the returned child.
#[allow(clippy::zombie_processes)]
fn create_until(
    stack: &Stack,
    mode: &str,
    until: impl Fn(&Value) -> bool,
) -> (Child, BufReader<ChildStdout>) {
    let mut child = stack
        .cli_command(&["snapshot", "create", "--wait", "--json", "--mode", mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the CLI");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let read = out.read_line(&mut line).unwrap_or(0);
        let event: Option<Value> = serde_json::from_str(&line).ok();
        if read == 0 || event.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the event stream ended before the awaited event: {line}");
        }
        if event.as_ref().is_some_and(&until) {
            return (child, out);
        }
    }
}

/// A slow ledger upload: 64 KiB/s.
const SLOW: &[(&str, &str)] = &[(
    "AITBC_BACKUP_REPOSITORY__LIMIT_UPLOAD_BYTES_PER_SEC",
    "65536",
)];

#[test]
fn an_agent_killed_mid_upload_aborts_the_set_naming_it() {
    install();
    let mut stack = Stack::start(50, &[]);
    stack.start_agent("ledger", SLOW);
    let (mut child, mut out) = create_until(&stack, "coordinated", |e| {
        e["agent"] == "ledger" && e["phase"] == "upload"
    });
    // PostgreSQL and Redis have committed their component manifests; the slow ledger has not.
    let components = stack.repository_dir().join("manifests/components");
    let count = || {
        std::fs::read_dir(&components)
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(wait_until(Duration::from_secs(20), || count() == 2));
    let killed = Instant::now();
    stack.agent("ledger").service().kill9();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("rest of the events");
    let status = child.wait().expect("CLI exit");
    let aborted_in = killed.elapsed();
    assert!(!status.success(), "an aborted set is a failed command");
    let set = last_snapshot(&rest).expect("final event");
    assert_eq!(set["state"], "aborted", "{set:#}");
    let reason = set["abort_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("`ledger`"),
        "reason names the agent: {reason}"
    );
    assert!(
        aborted_in < Duration::from_secs(10),
        "aborted after {aborted_in:?}"
    );
    // No set manifest; the repository holds nothing dangling; the catalog says why.
    assert!(stack.stored_sets().is_empty());
    let id = set["id"].as_str().expect("id");
    assert_eq!(stack.snapshot_listed(id)["state"], "aborted");
    let verify = std::process::Command::new(aitbc_backup_tests::fleet::binary("aitbc-backup"))
        .args(["repo", "--repository", &stack.repository, "verify"])
        .output()
        .expect("repo verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // The other agents committed their component manifests for the set; deleting the aborted
    // set removes exactly those (GC then reclaims their data).
    assert_eq!(count(), 2);
    let deleted: Value = serde_json::from_str(&stack.cli_ok(&["snapshot", "delete", id, "--json"]))
        .expect("delete JSON");
    assert_eq!(
        deleted["deleted_manifests"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(count(), 0);
    assert_eq!(stack.snapshot_listed(id), Value::Null);
}

#[test]
fn a_coordinator_killed_mid_upload_records_the_set_aborted_after_restart() {
    install();
    let mut stack = Stack::start(50, &[]);
    stack.start_agent("ledger", SLOW);
    let (mut child, _out) = create_until(&stack, "coordinated", |e| {
        e["agent"] == "ledger" && e["phase"] == "upload"
    });
    let id = stack.snapshots()[0]["id"]
        .as_str()
        .expect("the running set is listed")
        .to_owned();
    stack.coordinator.kill9();
    let _ = child.wait();
    stack.coordinator.restart();
    // The catalog is rebuilt from the repository: the interrupted set is aborted, not lost.
    let set = stack.snapshot_listed(&id);
    assert_eq!(set["state"], "aborted", "{set:#}");
    assert!(
        set["abort_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{set:#}"
    );
    assert!(stack.stored_sets().is_empty());

    // The agents reconnect and the next set commits.
    stack.start_agent("ledger", &[]);
    let (operator, url) = (stack.operator(), stack.coordinator.url());
    assert!(wait_until(Duration::from_secs(20), || {
        ["postgres", "redis", "ledger"].iter().all(|a| {
            aitbc_backup_tests::fleet::agent_state(&operator, &url, a).as_deref() == Some("online")
        })
    }));
    let next = stack.snapshot("coordinated");
    assert_eq!(next["state"], "committed", "{next:#}");
    assert_eq!(stack.stored_sets().len(), 1);
}

#[test]
fn writers_go_on_when_the_coordinator_dies_during_the_fence() {
    install();
    // The agents' deadline is 3 s.
    let mut stack = Stack::start_with(
        50,
        &[],
        &[],
        &[
            ("AITBC_BACKUP_POSTGRES__FENCE_MAX_PAUSE", "3s"),
            ("AITBC_BACKUP_REDIS__FENCE_MAX_PAUSE", "3s"),
            ("AITBC_BACKUP_LEDGER__FENCE_MAX_PAUSE", "3s"),
        ],
    );
    // Another session holds a lock on the fenced table for 2 s, so the PostgreSQL fence waits
    // while the Redis and ledger fences are up: the coordinator is killed in that window.
    let mut holder = Command::new(aitbc_backup_tests::postgres::bin("psql"))
        .args(["-X", "-q", "-d", &stack.pg.url(MIRROR_DB), "-c"])
        .arg("BEGIN; LOCK TABLE chain_blocks IN ROW EXCLUSIVE MODE; SELECT pg_sleep(2); COMMIT;")
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    std::thread::sleep(Duration::from_millis(300));
    let (mut child, _out) = create_until(&stack, "fenced", |e| e["phase"] == "fence");
    std::thread::sleep(Duration::from_millis(300));
    stack.coordinator.kill9();
    let killed = Instant::now();
    let _ = child.wait();
    let _ = holder.wait();
    let heights = |stack: &Stack| -> (u64, u64, u64) {
        let ledger = stack.node.head().map(|(h, _)| h).unwrap_or(0);
        let pg: u64 = stack
            .pg
            .psql(MIRROR_DB, "SELECT max(height) FROM chain_blocks")
            .parse()
            .unwrap_or(0);
        let head: Value =
            serde_json::from_str(&stack.redis.cli(&["GET", "chain:head"])).unwrap_or(Value::Null);
        (ledger, pg, head["height"].as_u64().unwrap_or(0))
    };
    let before = heights(&stack);
    // Every writer moves again well within the agents' deadline plus margin.
    assert!(
        wait_until(Duration::from_secs(8), || {
            let now = heights(&stack);
            now.0 > before.0 + 5 && now.1 > before.1 + 5 && now.2 > before.2 + 5
        }),
        "writers still blocked {:?} after the coordinator died: {before:?} -> {:?}",
        killed.elapsed(),
        heights(&stack)
    );
}
