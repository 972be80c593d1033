//! PostgreSQL point-in-time recovery against real PostgreSQL 15: continuous WAL archiving by the
//! agent, base backups, restore to a snapshot set's restore point, to a time, to the latest WAL
//! after the server's data directory is destroyed (and again after archiving goes on on the new
//! timeline), retention of base backups and WAL, and a WAL gap that verify names and restore
//! refuses to cross.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
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
        .with("AITBC_BACKUP_POSTGRES__SCRATCH_DIR", path(scratch))
        .with(PARTIAL_INTERVAL.0, PARTIAL_INTERVAL.1)
}

fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

/// `aitbc-backup-agent wal-archive` in the background, logging into `log`.
fn start_archiver(agent: &OneShot, log: &Path) -> Child {
    agent
        .command(&["wal-archive"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("archiver log"))
        .spawn()
        .expect("start the archiver")
}

fn stop(mut child: Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

fn base_backups(agent: &OneShot) -> Vec<serde_json::Value> {
    agent.repo_json(&["wal", "ls"])["base_backups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_for_base_backup(agent: &OneShot) {
    assert!(
        wait_until(Duration::from_secs(60), || !base_backups(agent).is_empty()),
        "no base backup was taken"
    );
}

/// `aitbc-backup repo --repository R wal verify`.
fn wal_verify(repository: &str) -> Output {
    Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", repository, "wal", "verify"])
        .output()
        .expect("run wal verify")
}

/// Archived completed segments, by name, in order.
fn segments(repository: &str) -> Vec<String> {
    let dir = PathBuf::from(repository.trim_start_matches("file://")).join("wal/segments");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .trim_end_matches(".json")
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A directory the PostgreSQL OS user may enter, and the (absent) data directory in it.
fn restore_target(label: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = temp_dir(label);
    hand_to_postgres(dir.path());
    let data = dir.path().join("data");
    (dir, data)
}

fn number(pg: &Postgres, database: &str, sql: &str) -> i64 {
    pg.psql(database, sql)
        .parse()
        .unwrap_or_else(|e| panic!("`{sql}`: {e}"))
}

/// Rows and an MD5 over every row of `table` in key order.
fn table_digest(pg: &Postgres, database: &str, table: &str, key: &str) -> String {
    pg.psql(
        database,
        &format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg({table}::text, ',' ORDER BY {key})), '') FROM {table}"
        ),
    )
}

#[test]
fn restore_to_a_sets_restore_point_and_to_a_time() {
    // The simulator mirrors 100 blocks/s into chain_blocks: one transaction each.
    let stack = Stack::start_with(100, &[], &[], &[ARCHIVE, PARTIAL_INTERVAL]);
    let oneshot = agent(&stack.pg, &stack.repository, &stack.path("oneshot"));
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
        &path(&data),
        "--to-set",
        &set_id,
    ]);
    let stopped = report["stopped"].as_str().unwrap_or_default();
    assert!(
        stopped.contains(&format!("aitbc-set-{set_id}")),
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
    let rows_at_cut = number(
        &stack.pg,
        "aitbc_logical",
        "SELECT count(*) FROM chain_blocks",
    );
    assert!(rows_at_cut > 0);
    drop(recovered);

    // The time: every block mirrored (its transaction begun) before it, except at most the one
    // in flight at that instant, and nothing begun after it.
    let (_dir2, data2) = restore_target("pitr-time");
    oneshot.ok(&[
        "pitr-restore",
        "--data-dir",
        &path(&data2),
        "--to-time",
        &at,
    ]);
    let recovered = Postgres::start_on(&data2);
    let after = number(
        &recovered,
        MIRROR_DB,
        &format!("SELECT count(*) FROM chain_blocks WHERE mirrored_at >= '{at}'"),
    );
    assert_eq!(after, 0, "no transaction begun after {at}");
    let restored = number(&recovered, MIRROR_DB, "SELECT count(*) FROM chain_blocks");
    let before = number(
        &stack.pg,
        MIRROR_DB,
        &format!("SELECT count(*) FROM chain_blocks WHERE mirrored_at < '{at}'"),
    );
    assert!(
        restored + 1 >= before && restored <= before,
        "restored {restored} blocks, {before} began before {at}"
    );
    assert!(restored > rows_at_cut, "the time is after the set");
    let span = number(
        &recovered,
        MIRROR_DB,
        "SELECT max(height) - min(height) + 1 FROM chain_blocks",
    );
    assert_eq!(span, restored, "no hole in the restored blocks");
}

#[test]
fn a_destroyed_server_is_restored_to_within_a_second_and_archiving_goes_on() {
    let dir = temp_dir("pitr-latest");
    let repository = init_local_repository(dir.path());
    let mut pg = Postgres::start();
    let scratch = dir.path().join("scratch");
    let oneshot = agent(&pg, &repository, &scratch);
    let archiver = start_archiver(&oneshot, &dir.path().join("archiver.log"));
    wait_for_base_backup(&oneshot);
    let mut writer = TickWriter::start(&pg.url("postgres"), 100);
    std::thread::sleep(Duration::from_secs(3));

    // The disaster: the server dies and its data directory is gone.
    pg.kill9();
    let acked = writer.stop();
    assert!(acked > 100, "the writer ran: {acked}");
    std::fs::remove_dir_all(&pg.data_dir).expect("delete the data directory");
    // The archiver uploads what it received on its next pass; then it is stopped.
    std::thread::sleep(Duration::from_secs(2));
    stop(archiver);

    let (_target, data) = restore_target("pitr-latest-target");
    let report = oneshot.ok(&["pitr-restore", "--data-dir", &path(&data), "--latest"]);
    assert_eq!(
        report["timeline"], 2,
        "recovery ends on a new timeline: {report}"
    );
    let recovered = Postgres::start_on(&data);
    let restored = number(&recovered, "postgres", "SELECT max(id) FROM ticks");
    let count = number(&recovered, "postgres", "SELECT count(*) FROM ticks");
    assert_eq!(count, restored, "every tick up to the last restored one");
    assert!(
        restored >= acked - 100,
        "at most a second (100 transactions) lost: acknowledged {acked}, restored {restored}"
    );
    assert!(
        restored <= acked + 1,
        "nothing invented: {restored} > {acked}"
    );

    // Archiving goes on from the recovered server, on timeline 2; a second disaster restores
    // through the timeline history from the same base backup.
    let oneshot = agent(&recovered, &repository, &scratch);
    let archiver = start_archiver(&oneshot, &dir.path().join("archiver-2.log"));
    recovered.psql(
        "postgres",
        "INSERT INTO ticks DEFAULT VALUES; SELECT pg_switch_wal()",
    );
    let newest = number(&recovered, "postgres", "SELECT max(id) FROM ticks");
    let history =
        PathBuf::from(repository.trim_start_matches("file://")).join("wal/history/00000002.json");
    assert!(
        wait_until(Duration::from_secs(20), || history.exists()
            && segments(&repository)
                .iter()
                .any(|s| s.starts_with("00000002"))),
        "timeline 2 archived: {:?}",
        segments(&repository)
    );
    std::thread::sleep(Duration::from_secs(1));
    stop(archiver);
    drop(recovered);
    let (_target2, data2) = restore_target("pitr-timeline-target");
    let report = oneshot.ok(&["pitr-restore", "--data-dir", &path(&data2), "--latest"]);
    assert_eq!(report["timeline"], 3, "{report}");
    let again = Postgres::start_on(&data2);
    assert_eq!(
        number(&again, "postgres", "SELECT max(id) FROM ticks"),
        newest
    );
}

#[test]
fn retention_keeps_the_wal_of_kept_base_backups_and_base_backups_deduplicate() {
    let dir = temp_dir("pitr-retain");
    let repository = init_local_repository(dir.path());
    let pg = Postgres::start();
    let oneshot = agent(&pg, &repository, &dir.path().join("scratch"))
        .with("AITBC_BACKUP_POSTGRES__WAL__BASE_BACKUP_EVERY", "0s");
    let archiver = start_archiver(&oneshot, &dir.path().join("archiver.log"));
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT i, md5(i::text) AS v FROM generate_series(1, 200000) i",
    );
    std::thread::sleep(Duration::from_secs(1));
    let first = oneshot.ok(&["base-backup"]);
    for i in 0..3 {
        pg.psql(
            "postgres",
            &format!("CREATE TABLE t{i}(i int); SELECT pg_switch_wal()"),
        );
    }
    let second = oneshot.ok(&["base-backup"]);
    let first_stored = first["new_stored_bytes"].as_u64().expect("bytes");
    let second_stored = second["new_stored_bytes"].as_u64().expect("bytes");
    assert!(
        second_stored * 4 < first_stored,
        "the second base backup stores only what changed: {second_stored} of {first_stored}"
    );
    pg.psql("postgres", "SELECT pg_switch_wal()");
    let second_start = second["start_lsn"].as_str().expect("start").to_owned();
    assert!(
        wait_until(Duration::from_secs(20), || wal_verify(&repository)
            .status
            .success()),
        "the WAL of both base backups is complete: {}",
        String::from_utf8_lossy(&wal_verify(&repository).stdout)
    );
    stop(archiver);
    let before = segments(&repository);

    let retained = oneshot.repo_json(&["wal", "retain", "--keep", "1"]);
    assert_eq!(
        retained["deleted_base_backups"],
        serde_json::json!([first["manifest"]])
    );
    let after = segments(&repository);
    // The segment holding the second backup's start, by its number (the low 32 bits).
    let start_lsn =
        u64::from_str_radix(second_start.split('/').nth(1).expect("lsn"), 16).expect("hex lsn");
    let first_kept = format!("{:08X}", start_lsn >> 24);
    let (older, kept): (Vec<&String>, Vec<&String>) =
        before.iter().partition(|s| s[16..] < first_kept[..]);
    assert!(!older.is_empty(), "the first backup's WAL was archived");
    assert_eq!(
        after.iter().collect::<Vec<_>>(),
        kept,
        "exactly the segments before the kept backup's start are removed"
    );
    assert_eq!(retained["pruned"]["segments"], older.len());
    assert!(wal_verify(&repository).status.success());
    let (_target, data) = restore_target("pitr-retain-target");
    oneshot.ok(&["pitr-restore", "--data-dir", &path(&data), "--latest"]);
    let recovered = Postgres::start_on(&data);
    assert_eq!(
        number(&recovered, "postgres", "SELECT count(*) FROM big"),
        200_000
    );
}

#[test]
fn a_missing_segment_is_named_and_restore_refuses_to_cross_it() {
    let dir = temp_dir("pitr-gap");
    let repository = init_local_repository(dir.path());
    let pg = Postgres::start();
    let oneshot = agent(&pg, &repository, &dir.path().join("scratch"));
    let archiver = start_archiver(&oneshot, &dir.path().join("archiver.log"));
    wait_for_base_backup(&oneshot);
    pg.psql("postgres", "CREATE TABLE t(i int)");
    // Two rows per segment, i and 100 + i, each committed on its own; the WAL position
    // between them.
    let mut lsns = Vec::new();
    for i in 0..4 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({i})"));
        lsns.push(pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()"));
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({})", 100 + i));
        pg.psql("postgres", "SELECT pg_switch_wal()");
    }
    assert!(
        wait_until(Duration::from_secs(20), || segments(&repository).len() >= 5),
        "segments archived: {:?}",
        segments(&repository)
    );
    stop(archiver);
    let verified = wal_verify(&repository);
    assert!(
        verified.status.success(),
        "complete before the gap: {}",
        String::from_utf8_lossy(&verified.stdout)
    );

    // One of the segments the switches completed after the base backup, with more after it.
    let names = segments(&repository);
    let victim = names[names.len() - 2].clone();
    let objects = PathBuf::from(repository.trim_start_matches("file://")).join("wal/segments");
    std::fs::remove_file(objects.join(format!("{victim}.json"))).expect("remove a segment");

    let verified = wal_verify(&repository);
    let text = String::from_utf8_lossy(&verified.stdout);
    assert_eq!(verified.status.code(), Some(1), "verify fails: {text}");
    assert!(text.contains(&victim), "verify names {victim}: {text}");
    let out = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &repository, "verify"])
        .output()
        .expect("run repo verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "repo verify fails too: {text}");
    assert!(
        text.contains(&format!("wal/segments/{victim}.json")),
        "{text}"
    );

    let (target, data) = restore_target("pitr-gap-target");
    let err = oneshot.fails(&["pitr-restore", "--data-dir", &path(&data), "--latest"]);
    assert!(err.contains(&victim), "restore names {victim}: {err}");
    assert!(!data.exists(), "nothing written");
    let left = std::fs::read_dir(target.path())
        .expect("target dir")
        .count();
    assert_eq!(left, 0, "no staging left behind");

    // Up to an LSN before the gap (between rows 1 and 101, in the segment before the missing
    // one) recovery works, and stops exactly there.
    oneshot.ok(&[
        "pitr-restore",
        "--data-dir",
        &path(&data),
        "--to-lsn",
        &lsns[1],
    ]);
    let recovered = Postgres::start_on(&data);
    assert_eq!(
        recovered.psql(
            "postgres",
            "SELECT string_agg(i::text, ',' ORDER BY i) FROM t"
        ),
        "0,1,100"
    );

    // A chunk only the newest segment's manifest references, deleted: verify names it and the
    // WAL manifest that uses it.
    let chunk_ids = |name: &str| -> Vec<String> {
        let text = std::fs::read(objects.join(format!("{name}.json"))).expect("WAL manifest");
        let envelope: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        envelope["body"]["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let names = segments(&repository);
    let newest = names.last().expect("segments").clone();
    let elsewhere: Vec<String> = names[..names.len() - 1]
        .iter()
        .flat_map(|n| chunk_ids(n))
        .collect();
    let only_newest = chunk_ids(&newest)
        .into_iter()
        .find(|id| !elsewhere.contains(id))
        .expect("a chunk of its own");
    let chunk = PathBuf::from(repository.trim_start_matches("file://"))
        .join("chunks")
        .join(&only_newest[..2])
        .join(&only_newest);
    std::fs::remove_file(&chunk).expect("remove the chunk");
    let out = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &repository, "verify"])
        .output()
        .expect("run repo verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let expected = format!(
        "chunks/{}/{only_newest}: missing (used by wal/segments/{newest}.json)",
        &only_newest[..2]
    );
    assert!(text.contains(&expected), "{text}");
}

#[test]
fn a_writer_credential_archives_wal_that_only_the_operators_key_restores() {
    const OPERATOR: &str = "operator passphrase";
    let dir = temp_dir("pitr-sealed");
    let repository = format!("file://{}", dir.path().join("repo").display());
    let repo_cli = |args: &[&str]| {
        let out = Command::new(binary("aitbc-backup"))
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
    let credential = repo_cli(&["keys", "issue", "--writer", "postgres"]);
    let mut pg = Postgres::start();
    let scratch = dir.path().join("scratch");
    let writer =
        agent(&pg, &repository, &scratch).with("AITBC_BACKUP_REPOSITORY__CREDENTIAL", credential);
    let log = dir.path().join("archiver.log");
    let archiver = start_archiver(&writer, &log);
    // Its base backup, told by its stamp (it reads no manifest to tell by).
    assert!(
        wait_until(Duration::from_secs(60), || scratch
            .join("last-base-backup")
            .exists()),
        "no base backup: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let mut ticks = TickWriter::start(&pg.url("postgres"), 100);
    std::thread::sleep(Duration::from_secs(2));
    pg.psql("postgres", "SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_secs(2));
    pg.kill9();
    let acked = ticks.stop();
    std::fs::remove_dir_all(&pg.data_dir).expect("delete the data directory");
    std::thread::sleep(Duration::from_secs(2));
    stop(archiver);
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    // A rerun never meets its own earlier upload as someone else's (the writer cannot read it).
    assert!(!log.contains("never overwritten"), "{log}");
    assert!(!log.contains(OPERATOR));

    // The writer cannot restore what it archived; the operator's key can.
    let (_target, data) = restore_target("pitr-sealed-target");
    let refused = writer.fails(&["pitr-restore", "--data-dir", &path(&data), "--latest"]);
    assert!(refused.contains("operator's key"), "{refused}");
    let operator = OneShot::new("postgres", &repository)
        .with("AITBC_BACKUP_POSTGRES__URL", pg.url("postgres"))
        .with(
            "AITBC_BACKUP_POSTGRES__SCRATCH_DIR",
            path(&dir.path().join("op")),
        )
        .with("AITBC_BACKUP_REPOSITORY__PASSPHRASE", OPERATOR);
    operator.ok(&["pitr-restore", "--data-dir", &path(&data), "--latest"]);
    let recovered = Postgres::start_on(&data);
    let restored = number(&recovered, "postgres", "SELECT max(id) FROM ticks");
    assert!(
        restored >= acked - 100 && restored <= acked + 1,
        "acknowledged {acked}, restored {restored}"
    );
}
