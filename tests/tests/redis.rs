//! The `redis` agent component against real Redis 7 servers, beyond the contract the
//! conformance suite checks (`conformance.rs`: cuts, fenced cuts, refused and trial restores):
//! every type restored equal to its source, a fence nobody releases, credentials, failures
//! midway and a server started from an offline restore.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aitbc_backup_agent::redis::{RedisSettings, backup};
use aitbc_backup_tests::agent::{OneShot, init_local_repository};
use aitbc_backup_tests::conformance::redis::{resp, spawn_writer};
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::{assert_fence_held, temp_dir};

fn agent(redis: &Redis, dir: &Path) -> OneShot {
    OneShot::new("redis", &init_local_repository(dir)).with(
        "AITBC_BACKUP_REDIS__ADDRESS",
        format!("127.0.0.1:{}", redis.port),
    )
}

/// What a backup needs, `CONFIG` not among it.
const BACKUP_PERMISSIONS: &[&str] = &["+info", "+replconf", "+psync", "+ping"];

/// `ACL SETUSER <name> on ><name>-pw <permissions>`.
fn acl_user(redis: &Redis, name: &str, permissions: &[&str]) {
    let password = format!(">{name}-pw");
    let mut args = vec!["ACL", "SETUSER", name, "on", &password];
    args.extend_from_slice(permissions);
    redis.cli(&args);
}

fn at(agent: &OneShot, port: u16) -> OneShot {
    agent
        .clone()
        .with("AITBC_BACKUP_REDIS__ADDRESS", format!("127.0.0.1:{port}"))
}

/// `keys` keys of every type over three databases, a seventh with a time to live, plus large
/// values in each type's big encoding and a stream with a consumer group and pending entries.
fn every_type(redis: &Redis, keys: usize) {
    let mut script = Vec::new();
    for db in 0..3 {
        resp(&mut script, &["SELECT", &db.to_string()]);
        for i in (db..keys).step_by(3) {
            let n = i.to_string();
            match i % 6 {
                0 => resp(
                    &mut script,
                    &["SET", &format!("s:{n}"), &format!("value-{n}")],
                ),
                1 => resp(&mut script, &["HSET", &format!("h:{n}"), "a", &n, "b", "x"]),
                2 => resp(&mut script, &["RPUSH", &format!("l:{n}"), "a", &n, "c"]),
                3 => resp(&mut script, &["SADD", &format!("set:{n}"), &n, "m"]),
                4 => resp(
                    &mut script,
                    &["ZADD", &format!("z:{n}"), "1.5", &n, "2", "b"],
                ),
                _ => resp(&mut script, &["XADD", &format!("x:{n}"), "*", "f", &n]),
            }
            if i % 7 == 0 {
                let prefix = ["s", "h", "l", "set", "z", "x"][i % 6];
                let ttl = (3_600_000 + i).to_string();
                resp(&mut script, &["PEXPIRE", &format!("{prefix}:{n}"), &ttl]);
            }
        }
    }
    resp(&mut script, &["SELECT", "0"]);
    for j in 0..2000 {
        let j = j.to_string();
        resp(&mut script, &["HSET", "big:hash", &j, &"v".repeat(100)]);
        resp(&mut script, &["RPUSH", "big:list", &j]);
        resp(&mut script, &["SADD", "big:intset", &j]);
        resp(&mut script, &["SADD", "big:set", &format!("m{j}")]);
        resp(&mut script, &["ZADD", "big:zset", &j, &format!("m{j}")]);
        resp(&mut script, &["XADD", "big:stream", "*", "n", &j]);
    }
    resp(
        &mut script,
        &["SET", "big:string", &"compressible ".repeat(10_000)],
    );
    resp(
        &mut script,
        &["XGROUP", "CREATE", "big:stream", "workers", "0"],
    );
    resp(
        &mut script,
        &[
            "XREADGROUP",
            "GROUP",
            "workers",
            "alice",
            "COUNT",
            "10",
            "STREAMS",
            "big:stream",
            ">",
        ],
    );
    redis.pipe(&script);
}

#[test]
fn every_type_restores_into_a_running_server_equal_to_the_source() {
    let dir = temp_dir("redis-types");
    let source = Redis::start_with(&["--enable-debug-command", "yes"]);
    every_type(&source, 1_000_000);
    let agent = agent(&source, dir.path());
    let report = agent.ok(&["backup"]);
    let keys = 1_000_000 + 7;
    assert_eq!(report["keys"], keys, "{report}");
    assert_eq!(
        report["databases"].as_array().expect("dbs").len(),
        3,
        "{report}"
    );
    let manifest = report["manifest"].as_str().expect("id");
    // The agent's fork saved without LZF; the server's own setting is untouched.
    assert_eq!(
        source.cli(&["CONFIG", "GET", "rdbcompression"]),
        "rdbcompression\nyes"
    );
    let shown = agent.repo_json(&["show", manifest]);
    assert_eq!(shown["consistency"]["uncompressed"], true, "{shown}");

    let target = Redis::start_with(&["--enable-debug-command", "yes"]);
    target.cli(&["SET", "stale", "old data"]);
    let restored = at(&agent, target.port).ok(&["restore", manifest]);
    assert!(
        restored["samples_checked"].as_u64().expect("samples") >= 16,
        "{restored}"
    );
    assert_eq!(
        target.cli(&["CONFIG", "GET", "rdbcompression"]),
        "rdbcompression\nyes"
    );
    // The settings the restore changed are the server's own again.
    assert_eq!(
        target.cli(&["CONFIG", "GET", "replica-lazy-flush"]),
        "replica-lazy-flush\nno"
    );
    assert_eq!(
        target.cli(&["CONFIG", "GET", "repl-diskless-load"]),
        "repl-diskless-load\ndisabled"
    );

    assert_eq!(
        source.cli(&["DEBUG", "DIGEST"]),
        target.cli(&["DEBUG", "DIGEST"])
    );
    assert_eq!(
        source
            .cli(&["INFO", "keyspace"])
            .lines()
            .filter(|l| l.starts_with("db"))
            .count(),
        3
    );
    for db in ["db0", "db1", "db2"] {
        let line = |r: &Redis| {
            r.cli(&["INFO", "keyspace"])
                .lines()
                .find(|l| l.starts_with(db))
                .map(|l| l.split(",avg_ttl").next().unwrap_or_default().to_owned())
        };
        assert_eq!(line(&source), line(&target), "{db}");
    }
    // Key i is in db i % 3; keys with i % 7 == 0 have a time to live.
    for (db, key) in [
        ("0", "s:0"),
        ("0", "set:21"),
        ("1", "h:7"),
        ("1", "z:28"),
        ("2", "l:14"),
        ("2", "x:35"),
    ] {
        let ttl = |r: &Redis| {
            r.cli(&["-n", db, "PEXPIRETIME", key])
                .parse::<i64>()
                .expect("ttl")
        };
        assert!(ttl(&source) > 0, "{key} has a time to live");
        assert!((ttl(&source) - ttl(&target)).abs() <= 1000, "{key}");
    }
    assert_eq!(target.cli(&["EXISTS", "stale"]), "0");
    assert!(target.cli(&["INFO", "replication"]).contains("role:master"));
    assert_eq!(
        target
            .cli(&["XPENDING", "big:stream", "workers"])
            .lines()
            .next(),
        Some("10")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_holds_writers_no_longer_than_its_pause_even_if_never_released() {
    let redis = Redis::start();
    let pause = Duration::from_millis(1500);
    let settings = RedisSettings {
        address: format!("127.0.0.1:{}", redis.port),
        fence_max_pause: pause,
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(redis.port, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Nobody releases the fence: Redis ends the pause itself.
    let cut = tokio::task::spawn_blocking(move || backup::prepare(&settings)?.cut(true))
        .await
        .expect("join")
        .expect("fenced cut");
    let count = |r: &Redis| r.cli(&["DBSIZE"]).parse::<u64>().expect("dbsize");
    let before = count(&redis);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = count(&redis);
    tokio::time::sleep(pause + Duration::from_millis(800)).await;
    let after = count(&redis);
    stop.store(true, Ordering::Relaxed);
    let (_, longest) = writer.join().expect("writer");
    drop(cut);
    assert_fence_held((before, during, after), longest, pause);
}

#[test]
fn passwords_and_acl_users_work_and_a_missing_permission_is_named() {
    let dir = temp_dir("redis-auth");
    let redis = Redis::start_with(&["--requirepass", "pass-word"]);
    let agent = agent(&redis, dir.path());
    let err = agent.fails(&["backup"]);
    assert!(
        err.contains("NOAUTH") || err.contains("Authentication"),
        "{err}"
    );
    let err = agent
        .clone()
        .with("AITBC_BACKUP_REDIS__PASSWORD", "wrong-word")
        .fails(&["backup"]);
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("wrong-word"), "the password leaked: {err}");
    agent
        .clone()
        .with("AITBC_BACKUP_REDIS__PASSWORD", "pass-word")
        .ok(&["backup"]);

    acl_user(&redis, "backup", BACKUP_PERMISSIONS);
    acl_user(&redis, "weak", &["+info", "+replconf"]);
    let as_user = |user: &str, pw: &str| {
        agent
            .clone()
            .with("AITBC_BACKUP_REDIS__USERNAME", user)
            .with("AITBC_BACKUP_REDIS__PASSWORD", pw)
    };
    as_user("backup", "backup-pw").ok(&["backup"]);
    let err = as_user("weak", "weak-pw").fails(&["backup"]);
    assert!(err.contains("psync") && err.contains("permission"), "{err}");
}

#[test]
fn without_config_permission_the_fork_saves_as_configured_and_restores_checked() {
    let dir = temp_dir("redis-no-config");
    let source = Redis::start();
    every_type(&source, 20_000);
    acl_user(&source, "backup", BACKUP_PERMISSIONS);
    let plain = agent(&source, dir.path());
    let report = plain
        .clone()
        .with("AITBC_BACKUP_REDIS__USERNAME", "backup")
        .with("AITBC_BACKUP_REDIS__PASSWORD", "backup-pw")
        .ok(&["backup"]);
    let manifest = report["manifest"].as_str().expect("id");
    // LZF-compressed strings, as the server saves them: samples compare with LZF.
    let shown = plain.repo_json(&["show", manifest]);
    assert!(
        shown["consistency"].get("uncompressed").is_none(),
        "{shown}"
    );

    let target = Redis::start();
    target.cli(&["CONFIG", "SET", "rdbcompression", "no"]);
    let restored = at(&plain, target.port).ok(&["restore", manifest]);
    assert!(
        restored["samples_checked"].as_u64().expect("samples") >= 16,
        "{restored}"
    );
    assert_eq!(
        target.cli(&["CONFIG", "GET", "rdbcompression"]),
        "rdbcompression\nno"
    );
}

/// Forwards one connection to `port`, closing both sides after `limit` bytes from the server.
fn cutting_proxy(port: u16, limit: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let proxy_port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let server = TcpStream::connect(("127.0.0.1", port)).expect("connect redis");
            let (mut c_in, mut s_out) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut sent = 0;
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 || sent + n > limit {
                        break;
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    proxy_port
}

#[test]
fn a_connection_dropped_mid_sync_fails_the_backup_and_stores_no_manifest() {
    let dir = temp_dir("redis-drop");
    let redis = Redis::start();
    every_type(&redis, 30_000);
    let agent = agent(&redis, dir.path());
    let proxy = cutting_proxy(redis.port, 200_000);
    let err = at(&agent, proxy).fails(&["backup"]);
    assert!(err.contains("RDB stream ended early"), "{err}");
    let listed = agent.repo_json(&["ls"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn a_restore_failing_midway_releases_the_server_with_its_data_intact() {
    let dir = temp_dir("redis-fail");
    let source = Redis::start();
    every_type(&source, 200_000);
    let agent = agent(&source, dir.path());
    let manifest = agent.ok(&["backup"])["manifest"]
        .as_str()
        .expect("id")
        .to_owned();
    // Damage a chunk in the middle of the stream.
    let shown = agent.repo_json(&["show", &manifest]);
    let chunks = shown["chunks"].as_array().expect("chunks");
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    let id = chunks[chunks.len() / 2]["id"].as_str().expect("chunk id");
    let path = dir
        .path()
        .join("repo")
        .join("chunks")
        .join(&id[..2])
        .join(id);
    let mut bytes = std::fs::read(&path).expect("chunk file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&path, bytes).expect("damage chunk");

    let target = Redis::start();
    target.cli(&["SET", "precious", "still here"]);
    let err = at(&agent, target.port).fails(&["restore", &manifest]);
    assert!(err.contains(id) || err.contains("corrupt"), "{err}");
    assert!(err.contains("REPLICAOF NO ONE"), "{err}");
    assert!(target.cli(&["INFO", "replication"]).contains("role:master"));
    assert_eq!(target.cli(&["GET", "precious"]), "still here");
    assert_eq!(target.cli(&["DBSIZE"]), "1");

    // An empty server loads the sync as it arrives: a failure midway leaves it empty again.
    let empty = Redis::start();
    let err = at(&agent, empty.port).fails(&["restore", &manifest]);
    assert!(err.contains("REPLICAOF NO ONE"), "{err}");
    let replication = empty.cli(&["INFO", "replication"]);
    assert!(replication.contains("role:master"), "{err}\n{replication}");
    assert_eq!(empty.cli(&["DBSIZE"]), "0");
    assert_eq!(
        empty.cli(&["CONFIG", "GET", "repl-diskless-load"]),
        "repl-diskless-load\ndisabled"
    );
}

#[test]
fn an_offline_restore_writes_a_checked_dump_rdb_a_server_starts_from() {
    let dir = temp_dir("redis-offline");
    let source = Redis::start_with(&["--enable-debug-command", "yes"]);
    every_type(&source, 20_000);
    let agent = agent(&source, dir.path());
    let manifest = agent.ok(&["backup"])["manifest"]
        .as_str()
        .expect("id")
        .to_owned();
    let data = dir.path().join("data");
    let report = agent.ok(&[
        "restore",
        &manifest,
        "--target",
        data.to_str().expect("utf-8"),
    ]);
    assert!(
        report["target"]
            .as_str()
            .expect("target")
            .ends_with("dump.rdb")
    );
    // (A second restore there without --force is the suite's `refused_restore`.)
    let started = Redis::start_with(&[
        "--enable-debug-command",
        "yes",
        "--dir",
        data.to_str().expect("utf-8"),
        "--dbfilename",
        "dump.rdb",
    ]);
    assert_eq!(
        source.cli(&["DEBUG", "DIGEST"]),
        started.cli(&["DEBUG", "DIGEST"])
    );
}
