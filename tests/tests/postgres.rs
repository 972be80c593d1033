//! The `postgres` agent component against real PostgreSQL 15 clusters, beyond the contract the
//! conformance suite checks (`conformance.rs`: cuts, fenced cuts, refused and trial restores):
//! a rich database restored equal to its source, a fence nobody releases, bad input, and a
//! restore killed midway.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aitbc_backup_agent::postgres::{PostgresSettings, cut};
use aitbc_backup_tests::agent::{OneShot, init_local_repository};
use aitbc_backup_tests::conformance::postgres::{EVENTS, plain_dump, spawn_writer};
use aitbc_backup_tests::postgres::{Postgres, bin};
use aitbc_backup_tests::{assert_fence_held, free_port, temp_dir, wait_until};

/// The agent for `pg` storing into a fresh repository under `dir`.
fn agent(pg: &Postgres, dir: &Path) -> OneShot {
    OneShot::new("postgres", &init_local_repository(dir))
        .with("AITBC_BACKUP_POSTGRES__URL", pg.url("postgres"))
        .with(
            "AITBC_BACKUP_POSTGRES__SCRATCH_DIR",
            dir.join("scratch").display().to_string(),
        )
}

/// The same agent pointed at another server.
fn with_url(agent: &OneShot, url: &str) -> OneShot {
    agent.clone().with("AITBC_BACKUP_POSTGRES__URL", url)
}

/// Runs SQL through psql in `database` (several statements allowed).
fn sql(pg: &Postgres, database: &str, script: &str) -> String {
    pg.psql(database, script)
}

fn pgbench_init(pg: &Postgres, database: &str, scale: u32) {
    let out = Command::new(bin("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-d",
            &pg.url(database),
        ])
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database owned by its own role, using jsonb, numeric, bytea, arrays, hstore (contrib),
/// a sequence, a view, a function, a trigger, a large object, plus pgbench's tables.
fn rich_database(pg: &Postgres) {
    sql(
        pg,
        "postgres",
        "CREATE ROLE app_owner LOGIN PASSWORD 'owner-secret'",
    );
    sql(pg, "postgres", "CREATE DATABASE app OWNER app_owner");
    pgbench_init(pg, "app", 1);
    sql(
        pg,
        "app",
        r#"
        CREATE EXTENSION hstore;
        CREATE TABLE docs (id serial PRIMARY KEY, body jsonb, price numeric(20,6), blob bytea,
                           tags text[], attrs hstore, changed int DEFAULT 0);
        INSERT INTO docs (body, price, blob, tags, attrs)
          SELECT jsonb_build_object('n', g, 'nested', jsonb_build_array(g, g * 2)),
                 g * 1.000001, decode(md5(g::text), 'hex'), ARRAY['a' || g, 'b'],
                 hstore('k', g::text)
          FROM generate_series(1, 5000) g;
        CREATE SEQUENCE ticket_seq START 100;
        SELECT nextval('ticket_seq'), nextval('ticket_seq');
        CREATE VIEW expensive AS SELECT id, price FROM docs WHERE price > 100;
        CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN NEW.changed := NEW.changed + 1; RETURN NEW; END $$;
        CREATE TRIGGER docs_touch BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION touch();
        UPDATE docs SET price = price + 1 WHERE id <= 10;
        SELECT lo_from_bytea(424242, 'large object payload'::bytea);
        ALTER TABLE docs OWNER TO app_owner;
        "#,
    );
}

#[test]
fn a_rich_database_restores_into_a_fresh_cluster_equal_to_the_source() {
    let dir = temp_dir("pg-rich");
    let source = Postgres::start();
    rich_database(&source);
    let agent = agent(&source, dir.path());
    let report = agent.ok(&["backup"]);
    assert_eq!(report["databases"], serde_json::json!(["app", "postgres"]));
    let app_rows = 100_000 + 10 + 1 + 5000; // accounts, tellers, branches, docs
    assert!(
        report["rows"].as_u64().expect("rows") >= app_rows,
        "{report}"
    );
    let manifest = report["manifest"].as_str().expect("manifest id");

    // Parallel: the dump is spooled, given its data offsets, and restored with two jobs.
    let target = Postgres::start();
    let restored = with_url(&agent, &target.url("postgres"))
        .with("AITBC_BACKUP_POSTGRES__JOBS", "2")
        .ok(&["restore", manifest, "--globals"]);
    // Every database of the backup: `app` new, `postgres` (the maintenance database) replaced.
    assert_eq!(restored["databases"][0]["name"], "app", "{restored}");
    assert_eq!(restored["databases"][0]["replaced"], false, "{restored}");
    assert_eq!(restored["databases"][1]["name"], "postgres", "{restored}");
    assert_eq!(restored["databases"][1]["replaced"], true, "{restored}");

    assert_eq!(plain_dump(&source, "app"), plain_dump(&target, "app"));
    assert_eq!(
        sql(
            &target,
            "app",
            "SELECT convert_from(lo_get(424242), 'UTF8')"
        ),
        "large object payload"
    );
    assert_eq!(sql(&target, "app", "SELECT nextval('ticket_seq')"), "102");
    assert_eq!(
        sql(
            &target,
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        ),
        "app_owner"
    );
    // The role came back with its password (globals were dumped as superuser).
    assert_eq!(
        sql(
            &target,
            "postgres",
            "SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = 'app_owner'"
        ),
        "t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_holds_writers_no_longer_than_its_pause_even_if_never_released() {
    aitbc_backup_tls::install_crypto_provider();
    let pg = Postgres::start();
    sql(&pg, "postgres", "CREATE DATABASE app");
    sql(&pg, "app", EVENTS);
    let pause = Duration::from_millis(1500);
    let settings = PostgresSettings {
        url: pg.url("app"),
        databases: vec!["app".into()],
        fence_tables: vec!["public.events".into()],
        fence_max_pause: pause,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&pg.url("app"), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The coordinator "vanishes": nobody releases the fence.
    let mut cut = cut::prepare(&settings)
        .await
        .expect("prepare")
        .cut(true)
        .await
        .expect("fenced cut");
    let before = count(&pg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = count(&pg);
    tokio::time::sleep(pause + Duration::from_millis(1000)).await;
    let after = count(&pg);
    stop.store(true, Ordering::Relaxed);
    let longest = writer.join().expect("writer");
    let held = cut.fence.take().expect("a fence").release().await;

    assert_fence_held((before, during, after), longest, pause);
    assert!(
        held >= pause && held < pause + Duration::from_millis(700),
        "held {held:?}"
    );
}

fn count(pg: &Postgres) -> u64 {
    sql(pg, "app", "SELECT count(*) FROM events")
        .parse()
        .expect("count")
}

#[test]
fn bad_input_gets_errors_naming_the_cause() {
    let dir = temp_dir("pg-bad");
    let pg = Postgres::start();
    let agent = agent(&pg, dir.path());

    let port = free_port();
    let err = with_url(
        &agent,
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    )
    .fails(&["backup"]);
    assert!(
        err.contains(&format!("connect to PostgreSQL at 127.0.0.1:{port}"))
            && err.to_lowercase().contains("refused"),
        "{err}"
    );

    let err = agent
        .clone()
        .with("AITBC_BACKUP_POSTGRES__DATABASES", r#"["nope"]"#)
        .fails(&["backup"]);
    assert!(err.contains("database `nope` does not exist"), "{err}");

    // Password authentication for one role.
    sql(
        &pg,
        "postgres",
        "CREATE ROLE pwuser LOGIN SUPERUSER PASSWORD 'right-one'",
    );
    std::fs::write(
        pg.data_dir.join("pg_hba.conf"),
        "host all pwuser 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\nlocal all all trust\n",
    )
    .expect("write pg_hba.conf");
    sql(&pg, "postgres", "SELECT pg_reload_conf()");
    let pw_agent = with_url(
        &agent,
        &format!("postgres://pwuser@127.0.0.1:{}/postgres", pg.port),
    );
    let err = pw_agent
        .clone()
        .with("AITBC_BACKUP_POSTGRES__PASSWORD", "wrong-one")
        .fails(&["backup"]);
    assert!(
        err.contains("password authentication failed for user \"pwuser\""),
        "{err}"
    );
    assert!(!err.contains("wrong-one"), "the password leaked: {err}");
    pw_agent
        .with("AITBC_BACKUP_POSTGRES__PASSWORD", "right-one")
        .ok(&["backup"]);

    let err = with_url(
        &agent,
        &format!("postgres://u:secret@127.0.0.1:{}/postgres", pg.port),
    )
    .fails(&["backup"]);
    assert!(
        err.contains("postgres.url") && !err.contains("secret"),
        "{err}"
    );

    // A role without the rights a backup needs.
    sql(&pg, "postgres", "CREATE ROLE weak LOGIN");
    let weak = with_url(
        &agent,
        &format!("postgres://weak@127.0.0.1:{}/postgres", pg.port),
    );
    sql(&pg, "postgres", "CREATE TABLE secret (x int)");
    let err = weak.fails(&["backup"]);
    assert!(err.contains("permission denied for table secret"), "{err}");
}

/// (A target in use refused without `--force` is the suite's `refused_restore`.)
#[test]
fn a_killed_restore_leaves_the_database_intact_and_the_next_one_cleans_up() {
    let dir = temp_dir("pg-killed");
    let pg = Postgres::start();
    sql(&pg, "postgres", "CREATE DATABASE app");
    pgbench_init(&pg, "app", 3);
    let agent = agent(&pg, dir.path()).with("AITBC_BACKUP_POSTGRES__DATABASES", r#"["app"]"#);
    let manifest = agent.ok(&["backup"])["manifest"]
        .as_str()
        .expect("id")
        .to_owned();
    sql(&pg, "app", "DELETE FROM pgbench_accounts WHERE aid > 1000");

    // Killed midway: the old database is untouched.
    let mut child = agent
        .command(&["restore", &manifest, "--force"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start restore");
    let temp_exists = || {
        sql(
            &pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'app_aitbc_restore_%'",
        ) == "1"
    };
    assert!(
        wait_until(Duration::from_secs(60), temp_exists),
        "no restore in progress"
    );
    child.kill().expect("kill the agent");
    child.wait().expect("reap");
    assert_eq!(
        sql(&pg, "app", "SELECT count(*) FROM pgbench_accounts"),
        "1000"
    );

    // The next restore drops the leftover and puts the backup in place.
    let report = agent.ok(&["restore", &manifest, "--force"]);
    assert_eq!(report["databases"][0]["replaced"], true, "{report}");
    assert_eq!(
        sql(&pg, "app", "SELECT count(*) FROM pgbench_accounts"),
        "300000"
    );
    assert_eq!(
        sql(
            &pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'app\\_aitbc\\_%'"
        ),
        "0"
    );
}
