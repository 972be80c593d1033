//! The blockchain node simulator: a live, hash-chained SQLite ledger in both journal modes.

use std::time::Duration;

use aitbc_backup_tests::chain::check_chain;
use aitbc_backup_tests::fleet::http_get;
use aitbc_backup_tests::node::NodeSim;
use aitbc_backup_tests::wait_until;

fn start(dir: &std::path::Path, journal: &str) -> NodeSim {
    NodeSim::start(dir, journal, 50, &[])
}

#[test]
fn writes_a_hash_chained_ledger_in_both_journal_modes() {
    for journal in ["wal", "delete"] {
        let dir = aitbc_backup_tests::temp_dir("node-sim");
        let mut node = start(dir.path(), journal);
        assert!(
            wait_until(Duration::from_secs(10), || node
                .head()
                .is_some_and(|(h, _)| h >= 50)),
            "{}",
            node.service.log()
        );
        assert_eq!(http_get(node.port, "/v1/health").map(|r| r.0), Some(200));

        // A live read while the node writes: consistent and chained.
        let live = check_chain(&dir.path().join("node/chain/chain.db")).expect("live chain");
        assert!(live.height >= 50);

        let status = node.service.stop().expect("exit status");
        assert!(
            status.success(),
            "{journal}: {status}\n{}",
            node.service.log()
        );
        let stopped =
            check_chain(&dir.path().join("node/chain/chain.db")).expect("chain after stop");
        assert_eq!(stopped.blocks, stopped.height + 1);
        let receipts = walk_count(&dir.path().join("node/receipts"));
        assert_eq!(
            receipts as u64, stopped.blocks,
            "{journal}: one receipt file per block"
        );
        assert!(walk_count(&dir.path().join("node/wallets")) > 10);
        let journal_file = dir.path().join("node/chain/chain.db-wal");
        if journal == "delete" {
            assert!(!journal_file.exists(), "rollback-journal mode wrote a WAL");
        }

        // Restarted on the same directory, it continues the chain.
        let mut node = start(dir.path(), journal);
        assert!(wait_until(Duration::from_secs(10), || node
            .head()
            .is_some_and(|(h, _)| h > stopped.height + 5)));
        node.service.stop();
        let continued =
            check_chain(&dir.path().join("node/chain/chain.db")).expect("continued chain");
        assert!(continued.height > stopped.height);
    }
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
