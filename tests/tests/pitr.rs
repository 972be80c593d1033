//! PostgreSQL point-in-time recovery against real PostgreSQL 15: continuous WAL archiving by the
//! agent, base backups, restore to a snapshot set's restore point, to a time, to the latest WAL
//! after the server's data directory is destroyed, and a WAL gap that verify names and restore
//! refuses to cross.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use aitbc_backup_tests::agent::{OneShot, init_local_repository};
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::postgres::{Postgres, TickWriter, hand_to_postgres};
use aitbc_backup_tests::stack::{MIRROR_DB, Stack};
use aitbc_backup_tests::{temp_dir, wait_until};

const ARCHIVE: (&str, &str) = ("AITBC_BACKUP_POSTGRES__WAL__ARCHIVE", "true");
const PARTIAL_INTERVAL: (&str, &str) = ("AITBC_BACKUP_POSTGRES__WAL__PARTIAL_INTERVAL", "300ms");

/// A PostgreSQL agent for one-shot commands against `pg`, archiving into `repository`.
fn agent(pg: &Postgres, repository: &str, scratch: &Path) -> OneShot {
    OneShot::new("postgres", repository)
        .with("AITBC_BACKUP_POSTGRES__URL", pg.url("postgres"))
        .with(
            "AITBC_BACKUP_POSTGRES__SCRATCH_DIR",
            scratch.display().to_string(),
        )
        .with(PARTIAL_INTERVAL.0, PARTIAL_INTERVAL.1)
}

/// `repo wal ls --json`.
fn wal_ls(agent: &OneShot) -> serde_json::Value {
    agent.repo_json(&["wal", "ls"])
}

fn wait_for_base_backup(agent: &OneShot) {
    assert!(
        wait_until(Duration::from_secs(60), || wal_ls(agent)["base_backups"]
            .as_array()
            .is_some_and(|b| !b.is_empty())),
        "no base backup was taken: {}",
        wal_ls(agent)
    );
}

/// A directory the PostgreSQL OS user may enter, and the (absent) data directory in it.
fn restore_target(label: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir(label);
    hand_to_postgres(dir.path());
    let data = dir.path().join("data");
    (dir, data)
}

fn table_digest(pg: &Postgres, database: &str, table: &str, key: &str) -> String {
    pg.psql(
        database,
        &format!("SELECT count(*) || ' ' || coalesce(md5(string_agg({table}::text, ',' ORDER BY {key})), '') FROM {table}"),
    )
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

#[test]
fn restore_to_a_sets_restore_point_and_to_a_time() {
    // The simulator mirrors 100 blocks/s into chain_blocks: one transaction each.
    let stack = Stack::start_with(100, &[], &[], &[ARCHIVE, PARTIAL_INTERVAL]);
    let scratch = stack.path("oneshot");
    let oneshot = agent(&stack.pg, &stack.repository, &scratch);
    // The archiving agent takes the first base backup itself.
    wait_for_base_backup(&oneshot);

    let set = stack.snapshot("fenced");
    let set_id = set["id"].as_str().expect("set id").to_owned();
    let stored = stack
        .stored_sets()
        .into_iter()
        .find(|s| s["id"] == set_id)
        .expect("set manifest stored");
    let pg_point = stored["components"]
        .as_array()
        .expect("components")
        .iter()
        .find(|c| c["name"] == "postgres")
        .expect("postgres component")
        .clone();
    assert_eq!(
        pg_point["consistency"]["restore_point"],
        format!("aitbc-set-{set_id}"),
        "the set records its restore point: {pg_point}"
    );

    // A time a second later, while blocks keep coming.
    std::thread::sleep(Duration::from_secs(1));
    let at = stack.pg.psql(
        MIRROR_DB,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    // Let the archiver upload the WAL past both targets.
    std::thread::sleep(Duration::from_secs(2));

    // The restore point: exactly the state the set's (fenced) logical dump holds.
    let (_dir, data) = restore_target("pitr-set");
    let report = oneshot.ok(&[
        "pitr-restore",
        "--data-dir",
        data.to_str().unwrap(),
        "--to-set",
        &set_id,
    ]);
    assert!(
        report["stopped"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("aitbc-set-{set_id}")),
        "recovery stopped at the restore point: {report}"
    );
    assert!(!data.join("recovery.signal").exists());
    let auto_conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).expect("auto.conf");
    assert!(
        !auto_conf.contains("restore_command"),
        "recovery settings removed: {auto_conf}"
    );
    assert!(!data.join("aitbc_wal").exists(), "fetched WAL removed");
    let recovered = Postgres::start_on(&data);
    let logical = pg_point["manifest_id"].as_str().expect("manifest id");
    oneshot.ok(&[
        "restore",
        logical,
        "--database",
        MIRROR_DB,
        "--as",
        "aitbc_logical",
    ]);
    let expected = table_digest(&stack.pg, "aitbc_logical", "chain_blocks", "height");
    assert_eq!(
        table_digest(&recovered, MIRROR_DB, "chain_blocks", "height"),
        expected,
        "the restore point reproduces the set's logical state"
    );
    let rows_at_cut: u64 = expected.split(' ').next().unwrap().parse().unwrap();
    assert!(rows_at_cut > 0);
    drop(recovered);

    // The time: every block mirrored (transaction started) before it, except at most the one
    // in flight at that instant, and nothing that started after it.
    let (_dir2, data2) = restore_target("pitr-time");
    oneshot.ok(&[
        "pitr-restore",
        "--data-dir",
        data2.to_str().unwrap(),
        "--to-time",
        &at,
    ]);
    let recovered = Postgres::start_on(&data2);
    let after: u64 = recovered
        .psql(
            MIRROR_DB,
            &format!("SELECT count(*) FROM chain_blocks WHERE mirrored_at >= '{at}'"),
        )
        .parse()
        .unwrap();
    assert_eq!(after, 0, "no transaction that began after {at}");
    let restored: u64 = recovered
        .psql(MIRROR_DB, "SELECT count(*) FROM chain_blocks")
        .parse()
        .unwrap();
    let before: u64 = stack
        .pg
        .psql(
            MIRROR_DB,
            &format!("SELECT count(*) FROM chain_blocks WHERE mirrored_at < '{at}'"),
        )
        .parse()
        .unwrap();
    assert!(
        restored + 1 >= before && restored <= before,
        "restored {restored} blocks, {before} began before {at}"
    );
    assert!(restored > rows_at_cut, "the time is after the set");
    let max: u64 = recovered
        .psql(
            MIRROR_DB,
            "SELECT max(height) - min(height) + 1 FROM chain_blocks",
        )
        .parse()
        .unwrap();
    assert_eq!(max, restored, "no hole in the restored blocks");
}

#[test]
fn a_destroyed_server_is_restored_to_within_a_second() {
    let dir = temp_dir("pitr-latest");
    let repository = init_local_repository(dir.path());
    let mut pg = Postgres::start();
    let oneshot = agent(&pg, &repository, &dir.path().join("scratch"));
    let archiver = oneshot
        .command(&["wal-archive"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("archiver.log")).unwrap())
        .spawn()
        .expect("start the archiver");
    wait_for_base_backup(&oneshot);
    let mut writer = TickWriter::start(&pg.url("postgres"), 100);
    std::thread::sleep(Duration::from_secs(3));

    // The disaster: the server dies and its data directory is gone.
    let acked = writer.acked();
    pg.kill9();
    let lost_at_kill = writer.stop();
    assert!(
        lost_at_kill >= acked && acked > 100,
        "the writer ran: {acked}"
    );
    std::fs::remove_dir_all(&pg.data_dir).expect("delete the data directory");
    // The archiver uploads what it received on its next pass, then is stopped.
    std::thread::sleep(Duration::from_secs(2));
    stop(archiver);

    let (_target, data) = restore_target("pitr-latest-target");
    let report = oneshot.ok(&[
        "pitr-restore",
        "--data-dir",
        data.to_str().unwrap(),
        "--latest",
    ]);
    assert!(
        report["timeline"].as_u64().unwrap() >= 2,
        "recovery ends on a new timeline: {report}"
    );
    let recovered = Postgres::start_on(&data);
    let restored: i64 = recovered
        .psql("postgres", "SELECT max(id) FROM ticks")
        .parse()
        .unwrap();
    let count: i64 = recovered
        .psql("postgres", "SELECT count(*) FROM ticks")
        .parse()
        .unwrap();
    assert_eq!(count, restored, "every tick up to the last restored one");
    assert!(
        restored >= lost_at_kill - 100,
        "at most a second (100 transactions) lost: acknowledged {lost_at_kill}, restored {restored}"
    );
    assert!(
        restored <= lost_at_kill + 1,
        "nothing invented: {restored} > {lost_at_kill}"
    );
}

#[test]
fn a_missing_segment_is_named_and_restore_refuses_to_cross_it() {
    let dir = temp_dir("pitr-gap");
    let repository = init_local_repository(dir.path());
    let pg = Postgres::start();
    let oneshot = agent(&pg, &repository, &dir.path().join("scratch"));
    let archiver = oneshot
        .command(&["wal-archive"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("archiver.log")).unwrap())
        .spawn()
        .expect("start the archiver");
    wait_for_base_backup(&oneshot);
    pg.psql("postgres", "CREATE TABLE t(i int)");
    for i in 0..4 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t VALUES ({i}); SELECT pg_switch_wal()"),
        );
    }
    let segments_dir = PathBuf::from(repository.trim_start_matches("file://")).join("wal/segments");
    let count = || {
        std::fs::read_dir(&segments_dir)
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || count() >= 5),
        "segments archived: {}",
        count()
    );
    stop(archiver);
    let verified = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &repository, "wal", "verify"])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "complete before the gap: {}",
        String::from_utf8_lossy(&verified.stdout)
    );

    let mut names: Vec<String> = std::fs::read_dir(&segments_dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_owned()
        })
        .collect();
    names.sort();
    // One the switches completed after the base backup, with one more after it.
    let victim = names[names.len() - 2].clone();
    std::fs::remove_file(segments_dir.join(format!("{victim}.json"))).unwrap();

    let verified = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &repository, "wal", "verify"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "verify fails: {text}");
    assert!(text.contains(&victim), "verify names {victim}: {text}");

    let (target, data) = restore_target("pitr-gap-target");
    let err = oneshot.fails(&[
        "pitr-restore",
        "--data-dir",
        data.to_str().unwrap(),
        "--latest",
    ]);
    assert!(err.contains(&victim), "restore names {victim}: {err}");
    assert!(!data.exists(), "nothing written");
    assert_eq!(
        std::fs::read_dir(target.path()).unwrap().count(),
        0,
        "no staging left behind"
    );
}
