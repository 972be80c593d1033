//! Successive backups of sources written while they are backed up, every one restored and
//! checked: the ledger on its own, and whole snapshot sets while the node mirrors every block
//! into PostgreSQL and Redis. This is the case that stored torn databases (half the backups of a node writing
//! 200 blocks/s) while single backups of quiet nodes passed. Counts come from
//! `AITBC_LIVE_BACKUPS` (backups per rate and interval, default 4); `scripts/soak.sh` runs
//! hundreds.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aitbc_backup_tests::agent::init_local_repository;
use aitbc_backup_tests::chain::check_chain;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::node::{LedgerAgent, NodeSim};
use aitbc_backup_tests::stack::Stack;
use aitbc_backup_tests::wait_until;

fn integrity(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).expect("open");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

#[test]
fn every_backup_of_a_writing_node_restores_its_own_head() {
    let per_case: usize = std::env::var("AITBC_LIVE_BACKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    // (blocks per second, pause between backups)
    for (rate, pause_ms) in [(200u32, 0u64), (500, 250)] {
        let dir = aitbc_backup_tests::temp_dir("ledger-successive");
        let agent = LedgerAgent {
            data_dir: dir.path().join("node"),
            repository: init_local_repository(dir.path()),
            scratch: dir.path().join("scratch"),
        };
        NodeSim::write_blocks(dir.path(), "wal", 3000, 200);
        let mut node = NodeSim::start(dir.path(), "wal", rate, &[]);
        assert!(
            wait_until(Duration::from_secs(15), || node
                .head()
                .is_some_and(|(h, _)| h > 3050)),
            "{}",
            node.service.log()
        );
        let mut reports = Vec::new();
        for _ in 0..per_case {
            reports.push(agent.ok(&["backup"]));
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
        let (live, _) = node.head().expect("node head");
        let status = node.service.stop().expect("node exit");
        assert!(status.success(), "{}", node.service.log());

        let verify = Command::new(binary("aitbc-backup"))
            .args(["repo", "--repository", &agent.repository])
            .args(["verify", "--read-data"])
            .output()
            .expect("run verify");
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        for (i, report) in reports.iter().enumerate() {
            let height = report["height"].as_u64().expect("height");
            let hash = report["hash"].as_str().expect("hash");
            assert!(height <= live, "{report}");
            let target = dir.path().join(format!("restored-{i}"));
            let restored = agent.restore_into(report, &target);
            assert_eq!(restored["height"].as_u64(), Some(height));
            let db = target.join("chain/chain.db");
            assert_eq!(integrity(&db), "ok", "rate {rate}, backup {i}");
            let chain = check_chain(&db).expect("restored chain is sound");
            assert_eq!((chain.height, chain.hash.as_str()), (height, hash));
            std::fs::remove_dir_all(&target).expect("clean up");
        }
        eprintln!(
            "{rate} blocks/s, {per_case} backups {pause_ms} ms apart: heights {:?}",
            reports
                .iter()
                .map(|r| r["height"].as_u64())
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn successive_sets_under_writes_restore_every_component_at_its_cut() {
    aitbc_backup_tls::install_crypto_provider();
    let sets: usize = std::env::var("AITBC_LIVE_SETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // Every block goes into the ledger, then PostgreSQL, then Redis, 200 times a second.
    let stack = Stack::start(200, &[]);
    let mut ids = Vec::new();
    for _ in 0..sets {
        let set = stack.snapshot("fenced");
        assert_eq!(set["state"], "committed", "{set:#}");
        ids.push(set["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        let ((ledger, postgres, redis), _) = stack.restore_fresh(id);
        // One cut: the writer's order at one instant, one block apart at most.
        assert!(
            ledger >= postgres && postgres >= redis && redis + 1 >= ledger,
            "set {id}: ledger {ledger}, postgres {postgres}, redis {redis}"
        );
    }
}
