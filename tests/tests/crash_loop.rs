//! A crash loop: the ledger agent or the coordinator killed with SIGKILL at a random moment of
//! a snapshot set, again and again, beside a node writing blocks. After each kill, everything
//! committed verifies (`repo verify --read-data`, content digests included) and every committed
//! set's ledger restores a sound chain at its recorded head. `AITBC_CRASH_LOOPS` sets the
//! count (default 3; `scripts/soak.sh` runs more).

use std::process::Command;
use std::time::Duration;

use aitbc_backup_tests::fleet::{agent_state, binary};
use aitbc_backup_tests::node::LedgerAgent;
use aitbc_backup_tests::stack::Stack;
use aitbc_backup_tests::wait_until;
use rand::{Rng, SeedableRng};

fn verify(stack: &Stack) {
    let out = Command::new(binary("aitbc-backup"))
        .args([
            "repo",
            "--repository",
            &stack.repository,
            "verify",
            "--read-data",
        ])
        .output()
        .expect("repo verify");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn all_online(stack: &Stack) -> bool {
    let (operator, url) = (stack.operator(), stack.coordinator.url());
    ["postgres", "redis", "ledger"]
        .iter()
        .all(|a| agent_state(&operator, &url, a).as_deref() == Some("online"))
}

#[test]
fn sets_killed_at_random_moments_never_leave_a_broken_committed_set() {
    aitbc_backup_tls::install_crypto_provider();
    let loops: usize = std::env::var("AITBC_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Uploads limited to 128 KiB/s, so a set lasts long enough to be killed in its middle.
    let slow = [(
        "AITBC_BACKUP_REPOSITORY__LIMIT_UPLOAD_BYTES_PER_SEC",
        "131072",
    )];
    let mut stack = Stack::start_with(100, &[], &[], &slow);
    let mut kills = Vec::new();
    for round in 0..loops {
        let mut child = stack
            .cli_command(&[
                "snapshot",
                "create",
                "--wait",
                "--json",
                "--mode",
                "coordinated",
                // Named: a set asked for while the ledger agent is already dead is refused,
                // not committed without the ledger (a set takes the agents online otherwise).
                "--components",
                "postgres,redis,ledger",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the CLI");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..3000)));
        let victim = if round % 2 == 0 {
            "ledger"
        } else {
            "coordinator"
        };
        if victim == "ledger" {
            stack.agent("ledger").service().kill9();
        } else {
            stack.coordinator.kill9();
        }
        let _ = child.wait();
        if victim == "ledger" {
            stack.start_agent("ledger", &slow);
        } else {
            stack.coordinator.restart();
        }
        assert!(
            wait_until(Duration::from_secs(30), || all_online(&stack)),
            "the agents did not come back after the {victim} was killed"
        );
        kills.push(victim);
        verify(&stack);
    }
    // The set after the crashes commits, and stores only what is not stored yet: the data
    // of the killed attempts and of earlier sets is reused, not uploaded again.
    let last = stack.snapshot("coordinated");
    assert_eq!(last["state"], "committed", "{last:#}");
    verify(&stack);
    let ledger_manifest = stack
        .stored_sets()
        .iter()
        .find(|s| s["id"] == last["id"])
        .and_then(|s| {
            s["components"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "ledger")
                .and_then(|c| c["manifest_id"].as_str().map(str::to_owned))
        })
        .expect("the last set's ledger manifest");
    let envelope: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            stack
                .repository_dir()
                .join(format!("manifests/components/{ledger_manifest}.json")),
        )
        .expect("read the manifest"),
    )
    .expect("manifest JSON");
    let (raw, new) = (
        envelope["body"]["raw_size"].as_u64().unwrap_or(0),
        envelope["body"]["stats"]["new_stored_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX),
    );
    assert!(
        new < raw / 2,
        "the set after the crashes stored {new} new bytes of a {raw}-byte ledger stream"
    );

    let ledger = LedgerAgent {
        data_dir: stack.node.data_dir.clone(),
        repository: stack.repository.clone(),
        scratch: stack.path("scratch-restore"),
    };
    let sets = stack.stored_sets();
    assert!(!sets.is_empty());
    for (i, set) in sets.iter().enumerate() {
        let component = set["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "ledger"))
            .expect("every set has the ledger");
        let target = stack.path(&format!("restored-{i}"));
        let report = serde_json::json!({ "manifest": component["manifest_id"] });
        let restored = ledger.restore_into(&report, &target);
        let chain = aitbc_backup_tests::chain::check_chain(&target.join("chain/chain.db"))
            .expect("a sound chain");
        assert_eq!(
            Some(chain.height),
            component["consistency"]["height"].as_u64(),
            "{restored}"
        );
    }
    let aborted = stack
        .snapshots()
        .iter()
        .filter(|s| s["state"] == "aborted")
        .count();
    eprintln!(
        "kills {kills:?}; {} sets committed, {aborted} aborted",
        sets.len()
    );
}
