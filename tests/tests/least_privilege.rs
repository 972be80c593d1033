//! Agents never delete from the repository (only the coordinator's retention and GC do), so
//! their storage credentials can lack delete rights: every component backs up and restores
//! through storage that refuses every delete, as a bucket policy without `s3:DeleteObject`
//! would (`deploy/aws/agent-policy.json`).

use std::sync::Arc;

use aitbc_backup_agent::ledger::{self, LedgerSettings};
use aitbc_backup_agent::postgres::{self, PostgresSettings};
use aitbc_backup_agent::redis::{self, RedisSettings};
use aitbc_backup_repository::path::RemotePath;
use aitbc_backup_repository::storage::FaultConfig;
use aitbc_backup_repository::{Progress, Repository};
use aitbc_backup_tests::node::NodeSim;
use aitbc_backup_tests::postgres::Postgres;
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::repository::{Kind, TestBackend, init_repo};
use aitbc_backup_tests::temp_dir;
use tokio_util::sync::CancellationToken;

fn progress() -> Arc<Progress> {
    Arc::new(Progress::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_backs_up_and_restores_without_the_right_to_delete() {
    aitbc_backup_tls::install_crypto_provider();
    let cancel = CancellationToken::new();
    let dir = temp_dir("no-delete");
    let backend = TestBackend::start(Kind::Local);
    init_repo(backend.storage().await).await;
    let no_delete = backend
        .faulty(FaultConfig {
            deny_deletes: true,
            ..FaultConfig::default()
        })
        .await;
    let repo = Repository::open(no_delete, None, &cancel)
        .await
        .expect("open the repository");
    let refused = repo
        .storage()
        .delete(&RemotePath::new("config.json").expect("path"), &cancel)
        .await
        .expect_err("deletes are refused");
    assert!(refused.to_string().contains("AccessDenied"), "{refused}");

    // Ledger
    NodeSim::write_blocks(dir.path(), "wal", 40, 0);
    let ledger_settings = LedgerSettings {
        data_dir: dir.path().join("node"),
        scratch_dir: dir.path().join("scratch"),
        ..LedgerSettings::default()
    };
    let report = ledger::backup::backup(
        &repo,
        &ledger_settings,
        "ledger",
        false,
        progress(),
        &cancel,
    )
    .await
    .expect("ledger backup");
    let manifest = repo
        .component(&report.manifest, &cancel)
        .await
        .expect("manifest");
    let options = ledger::restore::RestoreOptions {
        target: dir.path().join("restored"),
        force: false,
        chain_db: ledger_settings.chain_db.clone(),
        height_query: ledger_settings.height_query.clone(),
        source: "least-privilege test".into(),
        protected: Vec::new(),
    };
    let restored = ledger::restore::restore(&repo, &manifest, &options, progress(), &cancel)
        .await
        .expect("ledger restore");
    assert_eq!(restored.height, report.height);

    // PostgreSQL
    let pg = Postgres::start();
    pg.psql("postgres", "CREATE DATABASE app");
    pg.psql(
        "app",
        "CREATE TABLE t AS SELECT g AS n FROM generate_series(1, 1000) g",
    );
    let pg_settings = PostgresSettings {
        url: pg.url("postgres"),
        databases: vec!["app".into()],
        scratch_dir: dir.path().join("pg-scratch"),
        ..PostgresSettings::default()
    };
    let report =
        postgres::backup::backup(&repo, &pg_settings, "postgres", false, progress(), &cancel)
            .await
            .expect("postgres backup");
    let manifest = repo
        .component(&report.manifest, &cancel)
        .await
        .expect("manifest");
    let options = postgres::restore::RestoreOptions {
        database: Some("app".into()),
        rename: Some("app_copy".into()),
        ..Default::default()
    };
    postgres::restore::restore(
        &repo,
        &manifest,
        &pg_settings,
        &options,
        progress(),
        &cancel,
    )
    .await
    .expect("postgres restore");
    assert_eq!(pg.psql("app_copy", "SELECT sum(n) FROM t"), "500500");

    // Redis
    let source = Redis::start();
    source.cli(&["SET", "k", "v"]);
    let redis_settings = RedisSettings {
        address: format!("127.0.0.1:{}", source.port),
        ..RedisSettings::default()
    };
    let report = redis::backup::backup(&repo, &redis_settings, "redis", false, progress(), &cancel)
        .await
        .expect("redis backup");
    let manifest = repo
        .component(&report.manifest, &cancel)
        .await
        .expect("manifest");
    let target = Redis::start();
    let options = redis::restore::RestoreOptions {
        address: Some(format!("127.0.0.1:{}", target.port)),
        ..Default::default()
    };
    redis::restore::restore(
        &repo,
        &manifest,
        &redis_settings,
        &options,
        progress(),
        &cancel,
    )
    .await
    .expect("redis restore");
    assert_eq!(target.cli(&["GET", "k"]), "v");
}

/// The shipped IAM examples: the agents' policy grants no delete, the coordinator's does.
#[test]
fn the_shipped_agent_policy_cannot_delete_and_the_coordinator_policy_can() {
    let actions = |file: &str| -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/aws")
            .join(file);
        let policy: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read policy"))
                .expect("policy JSON");
        policy["Statement"]
            .as_array()
            .expect("statements")
            .iter()
            .flat_map(|s| s["Action"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    };
    let agent = actions("agent-policy.json");
    assert!(agent.contains(&"s3:PutObject".to_owned()), "{agent:?}");
    assert!(
        !agent.iter().any(|a| a.contains("Delete") || a == "s3:*"),
        "{agent:?}"
    );
    let coordinator = actions("coordinator-policy.json");
    assert!(
        coordinator.contains(&"s3:DeleteObject".to_owned()),
        "{coordinator:?}"
    );
}
