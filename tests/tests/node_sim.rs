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

#[test]
fn mirrors_every_block_into_postgres_then_redis() {
    let pg = aitbc_backup_tests::postgres::Postgres::start();
    let redis = aitbc_backup_tests::redis::Redis::start();
    let dir = aitbc_backup_tests::temp_dir("node-sim-mirror");
    let redis_addr = format!("127.0.0.1:{}", redis.port);
    let pg_url = pg.url("postgres");
    let mut node = NodeSim::start(
        dir.path(),
        "wal",
        50,
        &["--mirror-postgres", &pg_url, "--mirror-redis", &redis_addr],
    );
    assert!(
        wait_until(Duration::from_secs(15), || node
            .head()
            .is_some_and(|(h, _)| h >= 40)),
        "{}",
        node.service.log()
    );
    // While it runs: Redis never ahead of PostgreSQL, PostgreSQL never ahead of the ledger.
    let redis_height = |r: &aitbc_backup_tests::redis::Redis| -> u64 {
        let head: serde_json::Value =
            serde_json::from_str(&r.cli(&["GET", "chain:head"])).expect("chain:head JSON");
        head["height"].as_u64().expect("height")
    };
    let r = redis_height(&redis);
    let p: u64 = pg
        .psql("postgres", "SELECT max(height) FROM chain_blocks")
        .parse()
        .expect("pg height");
    let l = check_chain(&dir.path().join("node/chain/chain.db"))
        .expect("chain")
        .height;
    assert!(r <= p && p <= l, "redis {r}, postgres {p}, ledger {l}");

    let status = node.service.stop().expect("exit");
    assert!(status.success(), "{}", node.service.log());
    let ledger = check_chain(&dir.path().join("node/chain/chain.db")).expect("chain");
    let rows: u64 = pg
        .psql("postgres", "SELECT count(*) FROM chain_blocks")
        .parse()
        .expect("count");
    assert_eq!(rows, ledger.blocks);
    assert_eq!(
        pg.psql(
            "postgres",
            &format!(
                "SELECT hash FROM chain_blocks WHERE height = {}",
                ledger.height
            )
        ),
        ledger.hash
    );
    assert_eq!(redis_height(&redis), ledger.height);
}
