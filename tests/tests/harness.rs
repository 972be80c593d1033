//! The harness itself: every service answers, and nothing outlives its test.

use aitbc_backup_tests::fleet::{AgentProcess, CoordinatorProcess, Pki, agent_state};
use aitbc_backup_tests::postgres::Postgres;
use aitbc_backup_tests::process::{children_of, is_running};
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::s3::S3Server;
use aitbc_backup_tests::wait_until;
use std::time::Duration;

#[test]
fn every_service_answers_and_stops_with_its_guard() {
    let pg = Postgres::start();
    assert_eq!(pg.psql("postgres", "SELECT 40 + 2"), "42");
    assert!(
        pg.psql("postgres", "SHOW server_version")
            .starts_with("15.")
    );

    let redis = Redis::start();
    assert_eq!(redis.cli(&["SET", "k", "v"]), "OK");
    assert_eq!(redis.cli(&["GET", "k"]), "v");
    assert!(redis.cli(&["INFO", "server"]).contains("redis_version:7"));

    let s3s = S3Server::s3s_fs();
    let moto = S3Server::moto();
    for s3 in [&s3s, &moto] {
        let body = std::env::temp_dir().join(format!("harness-body-{}", std::process::id()));
        std::fs::write(&body, b"hello").expect("write body");
        let key = format!("s3://{}/probe", s3.bucket);
        let put = s3.aws(&["s3", "cp", body.to_str().expect("utf-8"), &key]);
        assert!(
            put.status.success(),
            "put: {}",
            String::from_utf8_lossy(&put.stderr)
        );
        let get = s3.aws(&["s3", "cp", &key, "-"]);
        assert_eq!(
            get.stdout,
            b"hello",
            "{}",
            String::from_utf8_lossy(&get.stderr)
        );
        std::fs::remove_file(&body).ok();
    }
    // s3s-fs enforces SigV4: a wrong secret is refused.
    let mut forged = s3s.client_env();
    forged[1].1 = "wrong-secret".into();
    let out = std::process::Command::new(aitbc_backup_tests::tool("venv/bin/aws"))
        .args([
            "--endpoint-url",
            &s3s.endpoint(),
            "s3",
            "ls",
            &format!("s3://{}", s3s.bucket),
        ])
        .env_clear()
        .env("HOME", std::env::temp_dir())
        .envs(forged)
        .output()
        .expect("aws");
    assert!(!out.status.success(), "s3s-fs accepted a forged signature");

    let pki = Pki::new();
    let coordinator = CoordinatorProcess::start(&pki, &[]);
    let agent = AgentProcess::start(&pki, "h1", "ledger", &coordinator.url(), &[]);
    let online = wait_until(Duration::from_secs(10), || {
        agent_state(&pki.operator(), &coordinator.url(), "h1").as_deref() == Some("online")
    });
    assert!(online, "agent not online:\n{}", agent.log());

    let pids = [
        pg.pid(),
        redis.pid(),
        s3s.pid(),
        moto.pid(),
        coordinator.pid(),
        agent.pid(),
    ];
    drop((pg, redis, s3s, moto, coordinator, agent));
    for pid in pids {
        assert!(
            !is_running(pid),
            "pid {pid} still running after its guard dropped"
        );
    }
}

#[test]
fn a_panicking_test_leaves_nothing_running() {
    let pid = std::sync::Mutex::new(0);
    let result = std::panic::catch_unwind(|| {
        let redis = Redis::start();
        *pid.lock().expect("lock") = redis.pid();
        panic!("the test fails while Redis runs");
    });
    assert!(result.is_err());
    let pid = *pid.lock().expect("lock");
    assert!(pid > 0);
    assert!(
        !is_running(pid),
        "Redis (pid {pid}) outlived the panicking test"
    );
}

#[test]
fn a_postgres_with_a_client_stops_fast_and_leaves_no_process() {
    let pg = Postgres::start();
    // An idle client: PostgreSQL's smart shutdown (SIGTERM) would wait for it indefinitely.
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let client =
        aitbc_backup_tests::postgres::spawn_client(&pg.url("postgres"), move |client| async move {
            client.simple_query("SELECT 1").await.expect("query");
            connected_tx.send(()).expect("signal");
            let _ = tokio::task::spawn_blocking(move || release_rx.recv()).await;
            drop(client);
        });
    connected_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the client connects");
    let postmaster = pg.pid();
    let children = children_of(postmaster);
    assert!(
        children.len() >= 2,
        "a postmaster with a client has a backend and workers: {children:?}"
    );

    let started = std::time::Instant::now();
    drop(pg);
    // Fast shutdown, not the 10 s timeout and SIGKILL.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stopping PostgreSQL took {:?}",
        started.elapsed()
    );
    for pid in std::iter::once(postmaster).chain(children) {
        assert!(!is_running(pid), "pid {pid} outlived its PostgreSQL guard");
    }
    let _ = release_tx.send(());
    client.join().expect("client thread");
}
