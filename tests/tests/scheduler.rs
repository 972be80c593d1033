//! Policies on fast (per-second) schedules against the real stack: retention keeps exactly
//! what the policy says, a pinned set survives, overlapping runs are skipped and counted, and a
//! run missed while the coordinator was down runs at start.

use std::time::Duration;

use aitbc_backup_tests::fleet::http_get;
use aitbc_backup_tests::stack::Stack;
use aitbc_backup_tests::wait_until;
use serde_json::Value;

fn install() {
    aitbc_backup_tls::install_crypto_provider();
}

fn sets_of(stack: &Stack, policy: &str) -> Vec<Value> {
    stack
        .snapshots()
        .into_iter()
        .filter(|s| s["policy"] == policy)
        .collect()
}

/// A counter of the coordinator's /metrics with this exact label set, 0 if absent.
fn counter(stack: &Stack, name_and_labels: &str) -> u64 {
    let (_, body) = http_get(stack.coordinator.http_port, "/metrics").unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn retention_keeps_what_the_policy_says_and_overlaps_are_skipped() {
    install();
    let policies = r#"[
        {name = "fast", schedule = "*/2 * * * * *", components = ["redis"],
         retention = {days = 0, keep_last = 2}, verify = "read_data"},
        {name = "slow", schedule = "* * * * * *", components = ["ledger"],
         retention = {days = 0, keep_last = 1}}]"#;
    let mut stack = Stack::start(
        50,
        &[
            ("AITBC_BACKUP_SCHEDULE__ENABLED", "true"),
            ("AITBC_BACKUP_POLICIES", policies),
        ],
    );
    // Ledger uploads at 32 KiB/s take longer than the slow policy's one-second period.
    stack.start_agent(
        "ledger",
        &[(
            "AITBC_BACKUP_REPOSITORY__LIMIT_UPLOAD_BYTES_PER_SEC",
            "32768",
        )],
    );

    // Pin the first committed set of the fast policy.
    let mut pinned = String::new();
    assert!(wait_until(Duration::from_secs(20), || {
        let first = sets_of(&stack, "fast")
            .into_iter()
            .find(|s| s["state"] == "committed");
        if let Some(set) = first {
            pinned = set["id"].as_str().unwrap_or_default().to_owned();
        }
        !pinned.is_empty()
    }));
    stack.cli_ok(&["snapshot", "pin", &pinned]);

    let started =
        r#"aitbc_backup_coordinator_scheduler_runs_total{policy="fast",outcome="started"}"#;
    assert!(
        wait_until(Duration::from_secs(30), || counter(&stack, started) >= 6),
        "{}",
        stack.coordinator.log()
    );
    // Between runs (nothing of the policy running), exactly the pinned set and the two newest
    // remain, in the catalog and in the repository alike (the deleted ones' manifests are gone).
    let ids_of = |sets: &[Value]| -> Vec<String> {
        let mut ids: Vec<String> = sets
            .iter()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let mut last = Vec::new();
    let mut stored = Vec::new();
    let settled = wait_until(Duration::from_secs(20), || {
        last = sets_of(&stack, "fast");
        stored = stack
            .stored_sets()
            .into_iter()
            .filter(|s| s["policy"] == "fast")
            .collect();
        !last.iter().any(|s| s["state"] == "running")
            && last.iter().filter(|s| s["state"] == "committed").count() == 3
            && ids_of(&stored) == ids_of(&last)
    });
    assert!(settled, "{last:#?}\nstored: {stored:#?}");
    let ids: Vec<&str> = last.iter().filter_map(|s| s["id"].as_str()).collect();
    assert!(
        ids.contains(&pinned.as_str()),
        "the pinned set survives: {ids:?}"
    );
    assert!(last.iter().any(|s| s["pinned"] == true), "{last:#?}");
    // Every committed run of the fast policy was verified chunk by chunk, none failed.
    let verified = r#"aitbc_backup_coordinator_verifications_total{policy="fast",outcome="ok"}"#;
    let failed = r#"aitbc_backup_coordinator_verifications_total{policy="fast",outcome="failed"}"#;
    assert!(
        counter(&stack, verified) >= 3,
        "{}",
        stack.coordinator.log()
    );
    assert_eq!(counter(&stack, failed), 0);

    let skips = r#"aitbc_backup_coordinator_scheduler_skips_total{policy="slow"}"#;
    assert!(
        wait_until(Duration::from_secs(20), || counter(&stack, skips) >= 1),
        "overlapping runs of the slow policy are skipped and counted"
    );
    assert!(
        sets_of(&stack, "slow")
            .iter()
            .filter(|s| s["state"] == "running")
            .count()
            <= 1
    );
}

#[test]
fn a_run_missed_while_the_coordinator_was_down_runs_at_start() {
    install();
    let policies = r#"[{name = "nightly", schedule = "0 0 0 * * *", components = ["redis"],
                          verify = "restore"}]"#;
    let mut stack = Stack::start(
        20,
        &[
            ("AITBC_BACKUP_SCHEDULE__ENABLED", "true"),
            ("AITBC_BACKUP_POLICIES", policies),
        ],
    );
    assert!(sets_of(&stack, "nightly").is_empty());
    // The policy's last run was two days ago: tonight's and last night's runs were missed.
    let repo = stack.repository_dir().display().to_string();
    let started = chrono::Utc::now() - chrono::Duration::days(2);
    let id = format!("{}-0badc0de", started.format("%Y%m%dT%H%M%S%3fZ"));
    std::fs::create_dir_all(format!("{repo}/attempts")).expect("attempts dir");
    let record = serde_json::json!({"id": id, "policy": "nightly", "mode": "coordinated",
        "started": started.to_rfc3339(), "state": "aborted", "reason": "test"});
    std::fs::write(format!("{repo}/attempts/{id}.json"), record.to_string()).expect("record");
    stack.coordinator.restart();
    let mut sets = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            sets = sets_of(&stack, "nightly");
            sets.iter().any(|s| s["state"] == "committed")
        }),
        "{sets:#?}\n{}",
        stack.coordinator.log()
    );
    // Its restore test (into the agent's scratch targets) passed.
    let verified = r#"aitbc_backup_coordinator_verifications_total{policy="nightly",outcome="ok"}"#;
    assert!(
        wait_until(Duration::from_secs(20), || counter(&stack, verified) == 1),
        "{}",
        stack.coordinator.log()
    );
    // Once, not once per missed night.
    std::thread::sleep(Duration::from_secs(2));
    let runs = sets_of(&stack, "nightly")
        .iter()
        .filter(|s| s["id"] != id.as_str())
        .count();
    assert_eq!(runs, 1);
}
