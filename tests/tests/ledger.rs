//! The ledger component end to end, beyond the contract the conformance suite checks
//! (`conformance.rs`, in both journal modes: cuts of a live node, fenced sets, refused and trial
//! restores): the file cache and page reuse, hostile archives (fixed and generated),
//! interrupted restores, and targets that would hold the repository.

use std::path::Path;
use std::time::Duration;

use aitbc_backup_repository::manifest::ConsistencyPoint;
use aitbc_backup_repository::{BackupRequest, Progress};
use aitbc_backup_tests::agent::init_local_repository;
use aitbc_backup_tests::chain::check_chain;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::node::{LedgerAgent, NodeSim, tree_digest};
use aitbc_backup_tests::wait_until;
use tokio_util::sync::CancellationToken;

/// The sandbox and generated archives of the agent's confinement tests.
#[allow(dead_code)]
#[path = "../../agent/tests/hostile/mod.rs"]
mod hostile;

/// A data directory, a scratch directory and an initialized local repository.
fn setup(dir: &Path) -> LedgerAgent {
    let repository = init_local_repository(dir);
    LedgerAgent {
        data_dir: dir.join("node"),
        repository,
        scratch: dir.join("scratch"),
    }
}

#[test]
fn unchanged_files_are_not_read_again() {
    let dir = aitbc_backup_tests::temp_dir("ledger-cache");
    let agent = setup(dir.path());
    NodeSim::write_blocks(dir.path(), "wal", 600, 8000);

    let full = agent.ok(&["backup"]);
    assert_eq!(full["bytes_reused"].as_u64(), Some(0), "{full}");
    let stream = full["stream_bytes"].as_u64().expect("stream bytes");

    NodeSim::write_blocks(dir.path(), "wal", 10, 8000);
    let daily = agent.ok(&["backup"]);
    let reused = daily["bytes_reused"].as_u64().expect("reused");
    let read = daily["bytes_read"].as_u64().expect("read");
    assert!(
        reused > stream / 2 && read < stream / 2,
        "after 10 new blocks: read {read}, reused {reused} of {stream}"
    );
    assert!(daily["height"].as_u64() > full["height"].as_u64());

    // --full-scan reads everything again, and dedup stores next to nothing new.
    let rescan = agent.ok(&["backup", "--full-scan"]);
    assert_eq!(rescan["bytes_reused"].as_u64(), Some(0), "{rescan}");
    assert_eq!(rescan["bytes_read"], rescan["stream_bytes"]);
    assert!(
        rescan["new_stored_bytes"].as_u64().expect("stored") < stream / 10,
        "{rescan}"
    );

    // The incremental backup restores to exactly the data directory's files.
    let target = dir.path().join("restored");
    agent.restore_into(&daily, &target);
    let skip = ["metadata.json", "chain.db"];
    assert_eq!(
        tree_digest(&target, &skip),
        tree_digest(
            &agent.data_dir,
            &["chain.db-wal", "chain.db-shm", "chain.db"]
        ),
        "restored files differ from the source"
    );
    let chain = check_chain(&target.join("chain/chain.db")).expect("chain");
    assert_eq!(chain.height, daily["height"].as_u64().expect("height"));
}

/// Folds the WAL into chain.db (the simulator has exited): the file is then the snapshot.
fn checkpointed_chain_db(data_dir: &Path) -> Vec<u8> {
    let path = data_dir.join("chain/chain.db");
    let conn = rusqlite::Connection::open(&path).expect("open chain.db");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    })
    .expect("checkpoint");
    drop(conn);
    std::fs::read(&path).expect("read chain.db")
}

#[test]
fn a_database_backup_costs_the_pages_that_changed() {
    let dir = aitbc_backup_tests::temp_dir("ledger-pages");
    let agent = setup(dir.path());
    // Small receipts: the database is most of the data.
    NodeSim::write_blocks(dir.path(), "wal", 3000, 200);
    let before = checkpointed_chain_db(&agent.data_dir);
    let full = agent.ok(&["backup"]);

    NodeSim::write_blocks(dir.path(), "wal", 30, 200);
    let after = checkpointed_chain_db(&agent.data_dir);
    let page = 4096;
    let changed = after
        .chunks(page)
        .enumerate()
        .filter(|(i, p)| before.get(i * page..(i + 1) * page) != Some(*p))
        .count();
    let daily = agent.ok(&["backup"]);
    let stored = daily["new_stored_bytes"].as_u64().expect("stored");
    let read = daily["bytes_read"].as_u64().expect("read");
    // What was read is the changed pages plus the 30 new receipt files (and their directory's
    // group); what was stored is less, compressed. The whole database was not.
    assert!(
        read >= (changed * page) as u64 && read < (changed * page) as u64 + (1 << 20),
        "{changed} pages of {} changed; read {read}",
        after.len() / page
    );
    assert!(
        stored < read && stored < after.len() as u64 / 4,
        "stored {stored} for {changed} changed pages of a {}-byte database",
        after.len()
    );
    let full_stored = full["new_stored_bytes"].as_u64().expect("stored");
    assert!(stored < full_stored / 4, "{stored} vs {full_stored}");

    // Unchanged again: no page is stored again. (Only the `chain` directory's header may be:
    // its mtime moves when SQLite creates and removes the -wal file as the agent reads.)
    let same = agent.ok(&["backup"]);
    let (read, stored) = (
        same["bytes_read"].as_u64(),
        same["new_stored_bytes"].as_u64(),
    );
    assert!(
        read < Some(4096) && stored < Some(1024),
        "read {read:?}, stored {stored:?}"
    );

    // A restore of the page-referencing backup is the database byte for byte.
    let target = dir.path().join("restored");
    agent.restore_into(&same, &target);
    let restored = std::fs::read(target.join("chain/chain.db")).expect("restored chain.db");
    assert!(
        restored == after,
        "the restored chain.db differs from the source"
    );
}

/// A tar entry header with a raw (unchecked) name, type and optional link name.
fn raw_entry(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn hostile_archives_are_refused_and_nothing_is_written_outside() {
    let dir = aitbc_backup_tests::temp_dir("ledger-hostile");
    let agent = setup(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let target = dir.path().join("deep/target");
    std::fs::create_dir_all(target.join("chain")).expect("mkdir");
    std::fs::write(target.join("chain/old.txt"), b"the old data").expect("write");
    let abs = outside.join("absolute.txt");
    let abs = abs.to_str().expect("utf-8");

    let regular = tar::EntryType::Regular;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "`../../outside/dotdot.txt`",
            raw_entry("../../outside/dotdot.txt", regular, None, b"x"),
        ),
        ("`/", raw_entry(abs, regular, None, b"x")),
        (
            "symlink to `/`",
            [
                raw_entry("chain/root", tar::EntryType::Symlink, Some("/"), b""),
                raw_entry("chain/root/tmp/escaped.txt", regular, None, b"x"),
            ]
            .concat(),
        ),
        (
            "symlink to `../../../outside`",
            raw_entry(
                "chain/up",
                tar::EntryType::Symlink,
                Some("../../../outside"),
                b"",
            ),
        ),
        (
            "hard link to `../../outside/victim.txt`",
            raw_entry(
                "wallets/pw",
                tar::EntryType::Link,
                Some("../../outside/victim.txt"),
                b"",
            ),
        ),
        (
            "hard link to `/etc/passwd`",
            raw_entry("wallets/pw", tar::EntryType::Link, Some("/etc/passwd"), b""),
        ),
        (
            "Char",
            raw_entry("chain/tty", tar::EntryType::Char, None, b""),
        ),
    ];
    std::fs::write(outside.join("victim.txt"), b"victim").expect("write");

    for (expected, mut archive) in cases {
        archive.extend([0u8; 1024]);
        let id = store_crafted(&agent, archive, 1, &"ab".repeat(32));
        let err = agent.fails(&[
            "restore",
            &id,
            "--target",
            target.to_str().expect("utf-8"),
            "--force",
        ]);
        assert!(
            err.contains("refused archive entry") && err.contains(expected),
            "expected a refusal naming {expected}: {err}"
        );
        // Nothing outside, the target as it was, no staging left behind.
        let outside_now = tree_digest(&outside, &[]);
        assert_eq!(outside_now.len(), 1, "{outside_now:?}");
        assert_eq!(
            std::fs::read(outside.join("victim.txt")).expect("victim"),
            b"victim"
        );
        assert!(!Path::new("/tmp/escaped.txt").exists());
        assert_eq!(
            tree_digest(&target, &[])
                .keys()
                .cloned()
                .collect::<Vec<_>>(),
            ["chain/", "chain/old.txt"]
        );
    }
}

#[test]
fn a_failed_or_killed_restore_leaves_the_old_data_directory() {
    let dir = aitbc_backup_tests::temp_dir("ledger-interrupt");
    let agent = setup(dir.path());
    NodeSim::write_blocks(dir.path(), "delete", 100, 0);
    // Some bulk, so that the restore takes long enough to be killed midway.
    let bulk = agent.data_dir.join("receipts/bulk");
    std::fs::create_dir_all(&bulk).expect("mkdir");
    for i in 0..12 {
        let data = aitbc_backup_tests::data::generate(8 << 20, i);
        std::fs::write(bulk.join(format!("{i}.bin")), data).expect("write");
    }
    let report = agent.ok(&["backup"]);
    let manifest = report["manifest"].as_str().expect("id").to_owned();

    // The target holds an older node's data.
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("chain")).expect("mkdir");
    std::fs::write(target.join("chain/chain.db"), b"the old ledger").expect("write");
    let old = tree_digest(&target, &[]);
    let target_arg = target.to_str().expect("utf-8").to_owned();

    // Killed (SIGKILL) while unpacking: the old data stays.
    let mut child = agent
        .oneshot()
        .command(&["restore", &manifest, "--target", &target_arg, "--force"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn restore");
    let staging_has_data = || {
        std::fs::read_dir(&target)
            .map(|entries| {
                entries.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".aitbc-backup-staging")
                        && tree_digest(&e.path(), &[]).len() > 5
                })
            })
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(30), staging_has_data),
        "no staging seen"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let after_kill = tree_digest(&target, &[]);
    let visible: std::collections::BTreeMap<_, _> = after_kill
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".aitbc-backup-staging"))
        .collect();
    assert_eq!(visible, old, "a killed restore changed the target");

    // A failed restore (a damaged chunk) leaves the old data and no staging.
    let chunks = dir.path().join("repo/chunks");
    let shown = agent.oneshot().repo_json(&["show", &manifest]);
    let id = shown["chunks"][0]["id"].as_str().expect("a chunk");
    let victim = chunks.join(&id[..2]).join(id);
    let original = std::fs::read(&victim).expect("read chunk");
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&victim, &damaged).expect("damage");
    let err = agent.fails(&["restore", &manifest, "--target", &target_arg, "--force"]);
    assert!(err.contains(&manifest), "{err}");
    assert_eq!(
        tree_digest(&target, &[]),
        old,
        "a failed restore changed the target"
    );

    // Repaired, the restore completes and cleans up what the killed one left.
    std::fs::write(&victim, &original).expect("repair");
    let done = agent.ok(&["restore", &manifest, "--target", &target_arg, "--force"]);
    assert_eq!(done["height"], report["height"]);
    let restored = tree_digest(&target, &["metadata.json"]);
    assert!(
        restored.keys().all(|k| !k.starts_with(".aitbc-backup")),
        "{restored:?}"
    );
    assert_eq!(
        restored.get("receipts/bulk/3.bin"),
        tree_digest(&agent.data_dir, &[]).get("receipts/bulk/3.bin")
    );
}

#[test]
fn a_broken_chain_in_a_backup_is_refused_before_the_swap() {
    let dir = aitbc_backup_tests::temp_dir("ledger-broken");
    let agent = setup(dir.path());
    // A database whose block 2 names the wrong parent.
    let bytes = chain_db(&dir.path().join("broken.db"), "not-h1");
    let mut archive = with_chain(&bytes);
    archive.extend([0u8; 1024]);
    let id = store_crafted(&agent, archive, 2, "h2");

    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::write(target.join("keep.txt"), b"old").expect("write");
    let err = agent.fails(&[
        "restore",
        &id,
        "--target",
        target.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(err.contains("block 2 names parent not-h1"), "{err}");
    assert_eq!(
        tree_digest(&target, &[])
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["keep.txt"]
    );
}

/// Opens the repository at `url`.
async fn open(url: &str) -> aitbc_backup_repository::Repository {
    let url = aitbc_backup_repository::RepoUrl::parse(url).expect("url");
    let storage =
        aitbc_backup_repository::open_storage(&url, &Default::default(), Default::default())
            .await
            .expect("storage");
    aitbc_backup_repository::Repository::open(storage, None, &CancellationToken::new())
        .await
        .expect("open")
}

/// Stores a tar stream as a ledger backup with the given head; returns its id.
async fn store(
    repo: &aitbc_backup_repository::Repository,
    archive: Vec<u8>,
    height: u64,
    hash: &str,
) -> String {
    let request = BackupRequest {
        name: "ledger".into(),
        stream: "tar".into(),
        consistency: Some(ConsistencyPoint::Ledger {
            height,
            hash: hash.into(),
        }),
        ..Default::default()
    };
    let progress = std::sync::Arc::new(Progress::default());
    let cursor = std::io::Cursor::new(archive);
    aitbc_backup_repository::backup(repo, cursor, request, progress, &CancellationToken::new())
        .await
        .expect("store the archive")
        .id
}

/// Stores a crafted tar stream as a ledger backup with the given head; returns its id.
fn store_crafted(agent: &LedgerAgent, archive: Vec<u8>, height: u64, hash: &str) -> String {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async { store(&open(&agent.repository).await, archive, height, hash).await })
}

#[test]
fn a_restore_into_the_repositorys_parent_is_refused_even_with_force() {
    let dir = aitbc_backup_tests::temp_dir("ledger-into-repo");
    let agent = setup(dir.path());
    NodeSim::write_blocks(dir.path(), "delete", 20, 0);
    let backup = agent.ok(&["backup"]);
    let manifest = backup["manifest"].as_str().expect("manifest");
    let repo_dir = dir.path().join("repo");
    // Everything beside and inside the repository, byte for byte.
    let before = tree_digest(dir.path(), &[]);
    // The repository's parent (which holds it), another spelling of it, and a directory inside it.
    let inside = repo_dir.join("restored");
    let respelled = dir.path().join("node/../.");
    for (target, relation) in [
        (dir.path(), "holds"),
        (respelled.as_path(), "holds"),
        (inside.as_path(), "lies inside"),
    ] {
        let out = agent.run(&[
            "restore",
            manifest,
            "--target",
            target.to_str().expect("utf-8"),
            "--force",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(0),
            "restore into {}: {err}",
            target.display()
        );
        assert!(
            err.contains(&format!(
                "it {relation} the repository {}",
                repo_dir.display()
            )),
            "restore into {}: {err}",
            target.display()
        );
    }
    assert_eq!(tree_digest(dir.path(), &[]), before);
    assert!(!inside.exists());
    let verified = std::process::Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &agent.repository, "verify"])
        .output()
        .expect("aitbc-backup repo verify");
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    // The same backup still restores where it may.
    let report = agent.restore_into(&backup, &dir.path().join("elsewhere"));
    assert_eq!(report["height"], backup["height"]);
}

/// A chain database of three blocks, head `h2` at height 2, block 2 naming `parent2`.
fn chain_db(db: &Path, parent2: &str) -> Vec<u8> {
    let conn = rusqlite::Connection::open(db).expect("create");
    conn.execute_batch(aitbc_backup_tests::chain::SCHEMA)
        .expect("schema");
    for (height, hash, parent) in [(0, "h0", "p"), (1, "h1", "h0"), (2, "h2", parent2)] {
        conn.execute(
            "INSERT INTO block VALUES (?1, ?2, ?3, 'v', 0, 0, 'root')",
            rusqlite::params![height, hash, parent],
        )
        .expect("insert");
    }
    drop(conn);
    std::fs::read(db).expect("read db")
}

/// The start of a ledger archive: `chain/` and `chain/chain.db` holding `db`.
fn with_chain(db: &[u8]) -> Vec<u8> {
    let mut archive = raw_entry("chain/", tar::EntryType::Directory, None, b"");
    archive.extend(raw_entry(
        "chain/chain.db",
        tar::EntryType::Regular,
        None,
        db,
    ));
    archive
}

/// One repository, runtime and chain database for every generated case.
struct Generated {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    repo: aitbc_backup_repository::Repository,
    chain: Vec<u8>,
}

fn generated() -> &'static Generated {
    static SHARED: std::sync::OnceLock<Generated> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = aitbc_backup_tests::temp_dir("ledger-generated");
        let repository = init_local_repository(dir.path());
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let repo = runtime.block_on(open(&repository));
        let chain = chain_db(&dir.path().join("sound.db"), "h1");
        Generated {
            _dir: dir,
            runtime,
            repo,
            chain,
        }
    })
}

/// The real ledger restore of `archive` (after a sound chain database) into `target`, forced.
fn restore_generated(archive: &[u8], target: &Path) -> Result<(), String> {
    let shared = generated();
    let mut stream = with_chain(&shared.chain);
    stream.extend_from_slice(archive);
    stream.extend([0u8; 1024]);
    let cancel = CancellationToken::new();
    shared.runtime.block_on(async {
        let id = store(&shared.repo, stream, 2, "h2").await;
        let manifest = shared.repo.component(&id, &cancel).await.expect("manifest");
        let settings = aitbc_backup_agent::ledger::LedgerSettings::default();
        let options = aitbc_backup_agent::ledger::restore::RestoreOptions {
            target: target.to_owned(),
            force: true,
            chain_db: "chain/chain.db".into(),
            height_query: settings.height_query,
            source: "generated".into(),
            protected: Vec::new(),
        };
        aitbc_backup_agent::ledger::restore::restore(
            &shared.repo,
            &manifest,
            &options,
            std::sync::Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        // 256 unless PROPTEST_CASES says otherwise (the soak runs many thousands).
        cases: hostile::cases(256),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever the archive, the real restore changes nothing outside its target; when it
    /// fails, the target is as it was (its old data, no staging left); when it succeeds, the
    /// target holds the backup and `metadata.json`, and not the old data.
    #[test]
    fn a_generated_archive_restores_inside_its_target_or_not_at_all(
        specs in proptest::collection::vec(hostile::spec(), 1..10)
    ) {
        let sandbox = hostile::Sandbox::new();
        std::fs::create_dir_all(sandbox.target.join("old/deeper")).expect("mkdir");
        std::fs::write(sandbox.target.join("old/deeper/keep.txt"), b"the old data").expect("write");
        hostile::set(&sandbox.target.join("old"), 0o705, 4_000);
        let nowhere = sandbox.root.join("no such path");
        let target_before = hostile::snapshot(&sandbox.target, &nowhere);
        let before = sandbox.outside();
        let archive = hostile::build(&specs, &sandbox.root);
        let outcome = restore_generated(&archive, &sandbox.target);
        hostile::assert_same(&before, &sandbox.outside(), &format!("{outcome:?}"));
        let mut target_after = hostile::snapshot(&sandbox.target, &nowhere);
        match outcome {
            Err(_) => {
                // The target directory's own mtime moves (staging came and went); nothing else.
                let (old_root, new_root) = (&target_before[Path::new("")], &target_after[Path::new("")]);
                assert_eq!(old_root.mode, new_root.mode);
                target_after.insert(Path::new("").to_owned(), old_root.clone());
                hostile::assert_same(&target_before, &target_after, &format!("{outcome:?}"));
            }
            Ok(()) => {
                assert!(!sandbox.target.join("old").exists());
                assert_eq!(
                    std::fs::read(sandbox.target.join("chain/chain.db")).expect("chain.db"),
                    generated().chain
                );
                let metadata = std::fs::symlink_metadata(sandbox.target.join("metadata.json"))
                    .expect("metadata.json");
                assert!(metadata.is_file());
            }
        }
    }
}

#[test]
fn a_writer_credential_costs_the_changed_pages_even_after_losing_its_cache() {
    const OPERATOR: &str = "the operator's passphrase";
    let dir = aitbc_backup_tests::temp_dir("ledger-sealed");
    let repository = format!("file://{}", dir.path().join("repo").display());
    let repo_cli = |args: &[&str]| {
        let out = std::process::Command::new(aitbc_backup_tests::fleet::binary("aitbc-backup"))
            .args(["repo", "--repository", &repository])
            .args(args)
            .env("AITBC_CLI_PASSPHRASE", OPERATOR)
            .output()
            .expect("aitbc-backup repo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    };
    repo_cli(&["init", "--encrypt"]);
    let credential = repo_cli(&["keys", "issue", "--writer", "ledger"]);
    let agent = LedgerAgent {
        data_dir: dir.path().join("node"),
        repository: repository.clone(),
        scratch: dir.path().join("scratch"),
    };
    let writer = agent
        .oneshot()
        .with("AITBC_BACKUP_REPOSITORY__CREDENTIAL", credential);
    NodeSim::write_blocks(dir.path(), "wal", 3000, 200);
    let full = writer.ok(&["backup"]);
    NodeSim::write_blocks(dir.path(), "wal", 30, 200);
    let daily = writer.ok(&["backup"]);
    let (full_stored, stored) = (
        full["new_stored_bytes"].as_u64().expect("stored"),
        daily["new_stored_bytes"].as_u64().expect("stored"),
    );
    assert!(stored < full_stored / 4, "{stored} vs {full_stored}");
    // The scratch directory (page maps, file cache) is lost: the page maps come back from the
    // writer state in the repository (sealed with the component's state key, which the writer
    // credential holds): every file is read once, only what changed is stored.
    std::fs::remove_dir_all(&agent.scratch).expect("lose the cache");
    NodeSim::write_blocks(dir.path(), "wal", 30, 200);
    let after_loss = writer.ok(&["backup"]);
    let read = after_loss["bytes_read"].as_u64().expect("read");
    let stored_again = after_loss["new_stored_bytes"].as_u64().expect("stored");
    // The files are read (more than a day's read); the database's unchanged pages are found
    // in the page maps that came back (reused, not stored).
    assert!(
        read > daily["bytes_read"].as_u64().expect("read") * 2
            && after_loss["bytes_reused"].as_u64() > Some(0),
        "{after_loss}"
    );
    assert!(
        stored_again < full_stored / 4,
        "{stored_again} vs {full_stored}"
    );
    // The writer cannot restore; the operator's key can, at the right height.
    let manifest = after_loss["manifest"].as_str().expect("manifest");
    let target = dir.path().join("restored");
    let refused = writer.fails(&[
        "restore",
        manifest,
        "--target",
        target.to_str().expect("utf-8"),
    ]);
    assert!(refused.contains("operator's key"), "{refused}");
    let operator = agent
        .oneshot()
        .with("AITBC_BACKUP_REPOSITORY__PASSPHRASE", OPERATOR);
    let restored = operator.ok(&[
        "restore",
        manifest,
        "--target",
        target.to_str().expect("utf-8"),
    ]);
    assert_eq!(restored["height"], after_loss["height"], "{restored}");
}
