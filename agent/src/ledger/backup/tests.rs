//! A node that writes and checkpoints inside the backup's read window, deterministically: the
//! writer is another process (`sqlite3`), as the node is, because SQLite connections of one
//! process coordinate through memory and would hide a lost POSIX lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::{Progress, Repository};
use tokio_util::sync::CancellationToken;

use super::super::config::LedgerSettings;
use super::super::sqlite;
use super::{prepare, scan};

struct Node {
    root: PathBuf,
    settings: LedgerSettings,
}

impl Node {
    /// A WAL-mode chain of `blocks` blocks, each with indexed rows spread over the file.
    fn new(blocks: u64) -> Node {
        let root = std::env::temp_dir().join(format!("aitbc-torn-{:016x}", rand::random::<u64>()));
        let data = root.join("data");
        std::fs::create_dir_all(data.join("chain")).expect("mkdir");
        std::fs::create_dir_all(data.join("receipts")).expect("mkdir");
        std::fs::write(data.join("receipts/0.json"), b"{}").expect("receipt");
        let node = Node {
            settings: LedgerSettings {
                data_dir: data,
                scratch_dir: root.join("scratch"),
                ..LedgerSettings::default()
            },
            root,
        };
        node.sql(
            "PRAGMA journal_mode=WAL; \
             CREATE TABLE block(height INTEGER PRIMARY KEY, hash TEXT, parent_hash TEXT); \
             CREATE TABLE tx(id INTEGER PRIMARY KEY, height INTEGER, body TEXT); \
             CREATE INDEX tx_body ON tx(body);",
        );
        node.write_blocks(0, blocks);
        node.sql("PRAGMA wal_checkpoint(TRUNCATE);");
        node
    }

    fn db(&self) -> PathBuf {
        self.settings.data_dir.join("chain/chain.db")
    }

    /// Runs `sql` in a `sqlite3` process; its output.
    fn sql(&self, sql: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("sqlite3")
            .arg(self.db())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run sqlite3 (installed by scripts/setup.sh)");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(sql.as_bytes()).expect("write the SQL");
        drop(stdin);
        let out = child.wait_with_output().expect("wait for sqlite3");
        assert!(
            out.status.success(),
            "sqlite3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Blocks `from..from + count`, hash-chained, twenty random-keyed indexed rows each.
    fn write_blocks(&self, from: u64, count: u64) {
        let mut sql = String::from("BEGIN;");
        for height in from..from + count {
            let parent = if height == 0 {
                "genesis".to_owned()
            } else {
                format!("h{}", height - 1)
            };
            sql.push_str(&format!(
                "INSERT INTO block VALUES ({height}, 'h{height}', '{parent}');"
            ));
            for i in 0..20 {
                sql.push_str(&format!(
                    "INSERT INTO tx(height, body) VALUES ({height}, '{:032x}-{i}');",
                    rand::random::<u128>()
                ));
            }
        }
        sql.push_str("COMMIT;");
        self.sql(&sql);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn repository(root: &Path) -> Repository {
    crate::testing::local_repository(&root.join("repo")).await.1
}

/// The stored chain database, written to `dest`.
async fn restored_db(repo: &Repository, manifest_id: &str, dest: &Path) {
    let cancel = CancellationToken::new();
    let manifest = repo
        .component(manifest_id, &cancel)
        .await
        .expect("manifest");
    let mut stream = Vec::new();
    aitbc_backup_repository::restore(repo, &manifest, &mut stream, Arc::default(), &cancel)
        .await
        .expect("restore the stream");
    let file = manifest
        .files
        .iter()
        .find(|f| f.path == "chain/chain.db")
        .expect("chain.db in the file index");
    let digest = file
        .digest
        .as_ref()
        .expect("a database carries its content digest");
    let start = digest.data_offset as usize;
    let bytes = &stream[start..start + file.size as usize];
    assert_eq!(blake3::hash(bytes).to_hex().as_str(), digest.blake3);
    std::fs::write(dest, bytes).expect("write the restored database");
}

#[tokio::test]
async fn writes_and_checkpoints_inside_the_read_window_do_not_tear_the_stored_database() {
    let node = Node::new(400);
    let repo = repository(&node.root).await;
    let settings = node.settings.clone();
    let cut = tokio::task::spawn_blocking(move || prepare(&settings)?.cut())
        .await
        .expect("join")
        .expect("cut");
    assert_eq!(cut.head.height, 399);
    // What the upload does first, and what used to drop the snapshot's locks: the file scan.
    scan::scan(&node.settings.data_dir, &node.settings.include).expect("scan");
    // The node goes on: more blocks than the database held, then a checkpoint that would copy
    // them over the pages the snapshot reads, and restart the WAL.
    node.write_blocks(400, 600);
    let checkpoint = node.sql("PRAGMA wal_checkpoint(TRUNCATE);");
    assert!(
        checkpoint.starts_with('1'),
        "the checkpoint must be held back by the snapshot's read mark, got {checkpoint:?}"
    );
    let report = cut
        .upload(
            &repo,
            &Label::new("ledger"),
            false,
            Arc::new(Progress::default()),
            &CancellationToken::new(),
        )
        .await
        .expect("backup");
    assert_eq!(report.height, 399);
    let restored = node.root.join("restored.db");
    restored_db(&repo, &report.manifest, &restored).await;
    sqlite::integrity_check(&restored).expect("the stored database passes integrity_check");
    let head = sqlite::check_chain(&restored, &node.settings.height_query).expect("sound chain");
    assert_eq!((head.height, head.hash.as_str()), (399, "h399"));
}

#[tokio::test]
async fn a_snapshot_that_lost_its_locks_is_not_stored() {
    let node = Node::new(400);
    let repo = repository(&node.root).await;
    let settings = node.settings.clone();
    let cut = tokio::task::spawn_blocking(move || prepare(&settings)?.cut())
        .await
        .expect("join")
        .expect("cut");
    // The defect the invariant forbids, done on purpose: a plain open and close of the
    // database's files drops every lock this process holds on them.
    drop(std::fs::File::open(node.db()).expect("open"));
    let mut shm = node.db().into_os_string();
    shm.push("-shm");
    drop(std::fs::File::open(&shm).expect("open -shm"));
    node.write_blocks(400, 600);
    let checkpoint = node.sql("PRAGMA wal_checkpoint(TRUNCATE);");
    assert!(
        checkpoint.starts_with('0'),
        "without the locks the checkpoint completes: {checkpoint:?}"
    );
    let result = cut
        .upload(
            &repo,
            &Label::new("ledger"),
            false,
            Arc::new(Progress::default()),
            &CancellationToken::new(),
        )
        .await;
    let err = format!(
        "{:#}",
        result.expect_err("a torn snapshot must fail the backup")
    );
    assert!(
        err.contains("the snapshot lost")
            || err.contains("malformed")
            || err.contains("sound chain"),
        "{err}"
    );
    let cancel = CancellationToken::new();
    assert!(
        repo.component_ids(&cancel).await.expect("list").is_empty(),
        "no manifest may be committed for a torn snapshot"
    );
}

#[tokio::test]
async fn a_second_name_of_the_chain_database_is_not_opened_and_the_capture_holds() {
    let node = Node::new(400);
    // Sorts before chain.db: opened under this name, SQLite would use a-alias.db-wal and -shm,
    // not the node's, and the snapshot would hold nothing back.
    let alias = node.settings.data_dir.join("chain/a-alias.db");
    std::fs::hard_link(node.db(), &alias).expect("hard link");
    let repo = repository(&node.root).await;
    let settings = node.settings.clone();
    let cut = tokio::task::spawn_blocking(move || prepare(&settings)?.cut())
        .await
        .expect("join")
        .expect("cut");
    node.write_blocks(400, 600);
    let checkpoint = node.sql("PRAGMA wal_checkpoint(TRUNCATE);");
    assert!(checkpoint.starts_with('1'), "{checkpoint:?}");
    let report = cut
        .upload(
            &repo,
            &Label::new("ledger"),
            false,
            Arc::new(Progress::default()),
            &CancellationToken::new(),
        )
        .await
        .expect("backup");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("a-alias.db is another name")),
        "{:?}",
        report.warnings
    );
    let restored = node.root.join("restored.db");
    restored_db(&repo, &report.manifest, &restored).await;
    sqlite::integrity_check(&restored).expect("integrity_check");
    let head = sqlite::check_chain(&restored, &node.settings.height_query).expect("sound chain");
    assert_eq!(head.height, 399);
    let mut wal = alias.into_os_string();
    wal.push("-wal");
    assert!(
        !std::path::Path::new(&wal).exists(),
        "the agent created files beside the alias"
    );
}
