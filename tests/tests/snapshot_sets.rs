//! Snapshot sets end to end: coordinator, three agents, real PostgreSQL, Redis and the node
//! simulator (50 blocks/s, mirroring every block into PostgreSQL then Redis), one repository.
//! A damaged set manifest is skipped, not fatal, after a coordinator restart.

use std::time::Duration;

use aitbc_backup_tests::stack::Stack;
use serde_json::Value;

const RATE: u32 = 50;

fn install() {
    aitbc_backup_tls::install_crypto_provider();
}

/// The recorded height of `component` in a set's JSON.
fn recorded_height(set: &Value, component: &str) -> Option<u64> {
    set["components"]
        .as_array()?
        .iter()
        .find(|c| c["component"] == component)?["consistency"]["height"]
        .as_u64()
}

#[test]
fn fenced_set_restores_every_component_at_one_cut() {
    install();
    let stack = Stack::start(RATE, &[]);
    let set = stack.snapshot("fenced");
    assert_eq!(set["state"], "committed", "{set:#}");
    assert_eq!(set["mode"], "fenced");
    assert_eq!(
        set["components"].as_array().map(Vec::len),
        Some(3),
        "{set:#}"
    );
    let pause = set["write_pause_ms"].as_f64().expect("pause");
    assert!(pause > 0.0 && pause < 5000.0, "write pause {pause} ms");
    let id = set["id"].as_str().expect("id").to_owned();

    // The catalog lists it; its data verifies chunk by chunk.
    assert_eq!(stack.snapshot_listed(&id)["state"], "committed");
    let verified: Value =
        serde_json::from_str(&stack.cli_ok(&["verify", &id, "--read-data", "--json"]))
            .expect("verify JSON");
    assert_eq!(verified["ok"], true, "{verified:#}");
    assert!(verified["chunks_read"].as_u64() > Some(0));

    let ((ledger, postgres, redis), events) = stack.restore_fresh(&id);
    // Restored in the runbook's order, each verified before the next starts.
    let verified: Vec<&str> = events
        .iter()
        .filter(|e| e["phase"] == "verified")
        .filter_map(|e| e["component"].as_str())
        .collect();
    assert_eq!(verified, ["postgres", "redis", "ledger"], "{events:#?}");
    assert_eq!(
        events.last().map(|e| &e["phase"]),
        Some(&Value::from("done"))
    );
    // The writer's order at one instant: ledger, then PostgreSQL, then Redis, one block apart
    // at most.
    assert!(
        ledger >= postgres && postgres >= redis && redis + 1 >= ledger,
        "ledger {ledger}, postgres {postgres}, redis {redis}"
    );
    assert_eq!(recorded_height(&set, "ledger"), Some(ledger), "{set:#}");
}

#[test]
fn coordinated_set_spread_is_bounded_by_the_skew() {
    install();
    let stack = Stack::start(RATE, &[]);
    let set = stack.snapshot("coordinated");
    assert_eq!(set["state"], "committed", "{set:#}");
    assert_eq!(set["write_pause_ms"].as_f64(), Some(0.0));
    let skew = set["cut_skew_ms"].as_f64().expect("skew");
    let id = set["id"].as_str().expect("id").to_owned();
    let ((ledger, postgres, redis), _) = stack.restore_fresh(&id);
    let heights = [ledger, postgres, redis];
    let spread = heights.iter().max().unwrap_or(&0) - heights.iter().min().unwrap_or(&0);
    let bound = (f64::from(RATE) * skew / 1e3).ceil() as u64 + 1;
    assert!(
        spread <= bound,
        "ledger {ledger}, postgres {postgres}, redis {redis}: spread {spread} > {bound} (skew {skew} ms)"
    );

    // A restore test: every component restored into scratch targets and verified; nothing live
    // changes and nothing is left behind.
    let databases = || {
        stack
            .pg
            .psql("postgres", "SELECT count(*) FROM pg_database")
    };
    let before = databases();
    let out = stack.cli_ok(&["restore", &id, "--trial", "--json"]);
    let verified: Vec<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["phase"] == "verified")
        .filter_map(|e| e["component"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(verified, ["postgres", "redis", "ledger"], "{out}");
    assert_eq!(databases(), before, "trial databases are dropped");
    for component in ["postgres", "redis", "ledger"] {
        let scratch = stack.path(&format!("scratch-{component}"));
        let left: Vec<_> = std::fs::read_dir(&scratch)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            !left
                .iter()
                .any(|n| n.to_string_lossy().starts_with("trial-")),
            "{component}: {left:?}"
        );
    }
}

#[test]
fn a_set_of_some_components_and_its_lifecycle() {
    install();
    let stack = Stack::start(RATE, &[]);
    let out = stack.cli_ok(&[
        "snapshot",
        "create",
        "--wait",
        "--json",
        "--components",
        "ledger,redis",
    ]);
    let set = aitbc_backup_tests::stack::last_snapshot(&out).expect("final event");
    assert_eq!(set["state"], "committed");
    let components: Vec<&str> = set["components"]
        .as_array()
        .expect("components")
        .iter()
        .filter_map(|c| c["component"].as_str())
        .collect();
    assert_eq!(components.len(), 2);
    assert!(components.contains(&"ledger") && components.contains(&"redis"));
    let id = set["id"].as_str().expect("id").to_owned();

    // Pinned sets cannot be deleted; unpinned they can, with their component manifests.
    let pinned: Value =
        serde_json::from_str(&stack.cli_ok(&["snapshot", "pin", &id, "--json"])).expect("JSON");
    assert_eq!(pinned["pinned"], true);
    let refused = stack.cli(&["snapshot", "delete", &id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pinned"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    stack.cli_ok(&["snapshot", "unpin", &id]);
    let deleted: Value =
        serde_json::from_str(&stack.cli_ok(&["snapshot", "delete", &id, "--json"])).expect("JSON");
    assert_eq!(
        deleted["deleted_manifests"].as_array().map(Vec::len),
        Some(2)
    );
    let shown = stack.cli(&["snapshot", "show", &id]);
    assert!(!shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stderr).contains("no snapshot set"));

    // An agent selector picks agents by name; one that is not online is named.
    let out = stack.cli_ok(&[
        "snapshot", "create", "--wait", "--json", "--agents", "redis",
    ]);
    let set = aitbc_backup_tests::stack::last_snapshot(&out).expect("final event");
    assert_eq!(
        set["components"].as_array().map(Vec::len),
        Some(1),
        "{set:#}"
    );
    assert_eq!(set["components"][0]["agent"], "redis");
    let ghost = stack.cli(&["snapshot", "create", "--agents", "ghost"]);
    assert!(!ghost.status.success());
    assert!(
        String::from_utf8_lossy(&ghost.stderr).contains("agent `ghost` is not online"),
        "{}",
        String::from_utf8_lossy(&ghost.stderr)
    );
    let restore_unknown = stack.cli(&["restore", "20990101T000000000Z-00000000"]);
    assert!(!restore_unknown.status.success());
    assert!(String::from_utf8_lossy(&restore_unknown.stderr).contains("no snapshot set"));
}

#[test]
fn a_damaged_set_manifest_is_skipped_after_a_restart_and_backups_go_on() {
    install();
    let mut stack = Stack::start(RATE, &[]);
    let first = stack.snapshot("coordinated")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let second = stack.snapshot("coordinated")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let object = format!("manifests/sets/{first}.json");
    aitbc_backup_tests::repository::damage_manifest(&stack.repository_dir().join(&object));
    stack.coordinator.restart();

    // The other set is listed and shown; the damaged one is not listed, and asking for it names
    // the object.
    let listed: Vec<String> = stack
        .snapshots()
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, std::slice::from_ref(&second));
    assert_eq!(stack.snapshot_listed(&second)["state"], "committed");
    let shown = stack.cli(&["snapshot", "show", &first]);
    assert!(!shown.status.success());
    let stderr = String::from_utf8_lossy(&shown.stderr);
    assert!(
        stderr.contains(&object) && stderr.contains("damaged"),
        "{stderr}"
    );

    // The metric counts it.
    let metric = |line: &str| {
        aitbc_backup_tests::fleet::http_get(stack.coordinator.http_port, "/metrics")
            .is_some_and(|(_, text)| text.lines().any(|l| l == line))
    };
    assert!(
        aitbc_backup_tests::wait_until(Duration::from_secs(10), || metric(
            r#"repository_damaged_objects{kind="set_manifest"} 1"#
        )),
        "{}",
        stack.coordinator.log()
    );
    assert!(metric(
        r#"repository_damaged_objects{kind="component_manifest"} 0"#
    ));

    // Backups go on: once the agents are back, a new set commits and is listed.
    let (operator, url) = (stack.operator(), stack.coordinator.url());
    assert!(aitbc_backup_tests::wait_until(
        Duration::from_secs(20),
        || {
            ["postgres", "redis", "ledger"].iter().all(|a| {
                aitbc_backup_tests::fleet::agent_state(&operator, &url, a).as_deref()
                    == Some("online")
            })
        }
    ));
    let next = stack.snapshot("coordinated");
    assert_eq!(next["state"], "committed", "{next:#}");
    let next = next["id"].as_str().expect("id").to_owned();
    assert_eq!(stack.snapshot_listed(&next)["state"], "committed");

    // The damaged set was not mistaken for an interrupted one (whose data retention would
    // delete): its attempt record is untouched.
    let attempt: Value = serde_json::from_slice(
        &std::fs::read(
            stack
                .repository_dir()
                .join(format!("attempts/{first}.json")),
        )
        .expect("attempt record"),
    )
    .expect("attempt JSON");
    assert_eq!(attempt["state"], "running", "{attempt:#}");

    // `repo verify` fails naming the damaged manifest.
    let out = std::process::Command::new(aitbc_backup_tests::fleet::binary("aitbc-backup"))
        .args(["repo", "--repository", &stack.repository, "verify"])
        .output()
        .expect("run aitbc-backup");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{object}: damaged:")), "{text}");
}
