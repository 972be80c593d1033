//! The state a ledger agent keeps between backups (file cache, page maps) under change: a new
//! repository, a source directory replaced by a restore, a scratch directory partly lost, and
//! chunks an earlier backup referenced removed by GC. Every backup must restore the source
//! byte for byte and pass `verify --read-data`.

use std::path::Path;
use std::process::Command;

use aitbc_backup_tests::agent::init_local_repository;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::node::{LedgerAgent, NodeSim, tree_digest};

/// Folds the WAL into chain.db (the simulator has exited): the file is then the snapshot.
fn checkpoint(data_dir: &Path) {
    let conn = rusqlite::Connection::open(data_dir.join("chain/chain.db")).expect("open chain.db");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    })
    .expect("checkpoint");
}

fn repo(repository: &str, args: &[&str]) -> String {
    let out = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", repository])
        .args(args)
        .output()
        .expect("run aitbc-backup");
    assert!(
        out.status.success(),
        "repo {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Backs up the quiet node and checks the restore is the source, byte for byte.
fn backup_and_compare(agent: &LedgerAgent, dir: &Path, label: &str) -> serde_json::Value {
    checkpoint(&agent.data_dir);
    let skip = ["chain.db-wal", "chain.db-shm", "metadata.json"];
    let source = tree_digest(&agent.data_dir, &skip);
    let report = agent.ok(&["backup"]);
    let target = dir.join(format!("restored-{label}"));
    agent.restore_into(&report, &target);
    assert!(
        tree_digest(&target, &skip) == source,
        "{label}: the restore differs from the source"
    );
    std::fs::remove_dir_all(&target).expect("clean up");
    repo(&agent.repository, &["verify", "--read-data"]);
    report
}

#[test]
fn kept_state_never_makes_a_backup_restore_other_bytes() {
    let dir = aitbc_backup_tests::temp_dir("ledger-incremental");
    let dir = dir.path();
    let mut agent = LedgerAgent {
        data_dir: dir.join("node"),
        repository: init_local_repository(&dir.join("first")),
        scratch: dir.join("scratch"),
    };
    NodeSim::write_blocks(dir, "wal", 2000, 300);
    let first = backup_and_compare(&agent, dir, "first");

    // A new repository with the same scratch directory: nothing may be reused from the other.
    let first_repository = agent.repository.clone();
    agent.repository = init_local_repository(&dir.join("second"));
    let fresh = backup_and_compare(&agent, dir, "new-repository");
    assert!(
        fresh["bytes_reused"].as_u64() == Some(0),
        "a new repository reused data: {fresh}"
    );
    agent.repository = first_repository;

    // The source replaced by a restore of the first backup, then the node goes on.
    std::fs::remove_dir_all(&agent.data_dir).expect("remove the source");
    agent.restore_into(&first, &agent.data_dir);
    std::fs::remove_file(agent.data_dir.join("metadata.json")).expect("metadata.json");
    NodeSim::write_blocks(dir, "wal", 40, 300);
    backup_and_compare(&agent, dir, "replaced-source");

    // Half the scratch directory lost.
    let mut lost = 0;
    for (i, entry) in walk(&agent.scratch).iter().enumerate() {
        if i % 2 == 0 {
            std::fs::remove_file(entry).expect("remove a scratch file");
            lost += 1;
        }
    }
    assert!(lost > 0, "the scratch directory held nothing");
    NodeSim::write_blocks(dir, "wal", 40, 300);
    backup_and_compare(&agent, dir, "scratch-lost");

    // A page map changed behind the agent's back (two records' chunk and offset swapped): it
    // no longer matches its checksum and is not used.
    let maps: Vec<_> = walk(&agent.scratch)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    assert!(!maps.is_empty(), "no page map in the scratch directory");
    for map in &maps {
        let mut records = std::fs::read(map).expect("read the page map");
        if records.len() >= 24 * 12 {
            let (ten, eleven) = (24 * 10 + 16, 24 * 11 + 16);
            for i in 0..8 {
                records.swap(ten + i, eleven + i);
            }
            std::fs::write(map, &records).expect("write the page map");
        }
    }
    NodeSim::write_blocks(dir, "wal", 5, 300);
    backup_and_compare(&agent, dir, "page-map-changed");

    // Every backup forgotten and its chunks collected: the cache now names deleted chunks.
    let ids: Vec<serde_json::Value> =
        serde_json::from_str(&repo(&agent.repository, &["--json", "ls"])).expect("json");
    for id in ids.iter().filter_map(|m| m["id"].as_str()) {
        repo(&agent.repository, &["forget", id]);
    }
    repo(&agent.repository, &["gc", "--grace", "0s"]);
    NodeSim::write_blocks(dir, "wal", 40, 300);
    backup_and_compare(&agent, dir, "after-gc");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}
