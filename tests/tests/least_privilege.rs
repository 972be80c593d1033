//! Agents never delete from the repository (only the coordinator's retention and GC do), so
//! their storage credentials can lack delete rights: every component backs up and restores
//! through storage that refuses every delete, as a bucket policy without `s3:DeleteObject`
//! would (`deploy/aws/agent-policy.json`).

use std::sync::Arc;

use aitbc_backup_agent::AgentConfig;
use aitbc_backup_agent::component::{self, RestoreRequest, RestoreTarget};
use aitbc_backup_agent::ledger::LedgerSettings;
use aitbc_backup_agent::postgres::PostgresSettings;
use aitbc_backup_agent::redis::RedisSettings;
use aitbc_backup_proto::model::Component as Kind;
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::path::RemotePath;
use aitbc_backup_repository::storage::FaultConfig;
use aitbc_backup_repository::{Progress, Repository};
use aitbc_backup_tests::node::NodeSim;
use aitbc_backup_tests::postgres::Postgres;
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::repository::{Kind as Backend, TestBackend, init_repo};
use aitbc_backup_tests::temp_dir;
use tokio_util::sync::CancellationToken;

/// Backs up with `config`'s component through the component contract, then restores the
/// backup as `request` says; returns the backup's and the restore's reports.
async fn round_trip(
    repo: &Repository,
    config: AgentConfig,
    request: RestoreRequest,
    cancel: &CancellationToken,
) -> (serde_json::Value, serde_json::Value) {
    let config = Arc::new(config);
    let component = component::of(&config).expect("component");
    let label = Label::new(&config.backup_name());
    let progress = Arc::new(Progress::default());
    let report = component::backup(
        component.as_ref(),
        repo,
        &label,
        false,
        false,
        progress.clone(),
        cancel,
    )
    .await
    .expect("backup");
    let manifest = report["manifest"].as_str().expect("manifest id");
    let restored = component::restore(
        component.as_ref(),
        repo,
        manifest,
        request,
        progress,
        cancel,
    )
    .await
    .expect("restore");
    (report, restored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_backs_up_and_restores_without_the_right_to_delete() {
    aitbc_backup_tls::install_crypto_provider();
    let cancel = CancellationToken::new();
    let dir = temp_dir("no-delete");
    let backend = TestBackend::start(Backend::Local);
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
    let config = AgentConfig {
        component: Some(Kind::Ledger),
        ledger: LedgerSettings {
            data_dir: dir.path().join("node"),
            scratch_dir: dir.path().join("scratch"),
            ..LedgerSettings::default()
        },
        ..AgentConfig::default()
    };
    let request = RestoreRequest {
        target: RestoreTarget::Directory(dir.path().join("restored")),
        ..RestoreRequest::default()
    };
    let (report, restored) = round_trip(&repo, config, request, &cancel).await;
    assert_eq!(restored["height"], report["height"]);
    assert!(
        report["height"].as_u64().is_some_and(|h| h >= 40),
        "{report}"
    );

    // PostgreSQL
    let pg = Postgres::start();
    pg.psql("postgres", "CREATE DATABASE app");
    pg.psql(
        "app",
        "CREATE TABLE t AS SELECT g AS n FROM generate_series(1, 1000) g",
    );
    let config = AgentConfig {
        component: Some(Kind::Postgres),
        postgres: PostgresSettings {
            url: pg.url("postgres"),
            databases: vec!["app".into()],
            scratch_dir: dir.path().join("pg-scratch"),
            ..PostgresSettings::default()
        },
        ..AgentConfig::default()
    };
    let request = RestoreRequest {
        database: Some("app".into()),
        rename: Some("app_copy".into()),
        ..RestoreRequest::default()
    };
    round_trip(&repo, config, request, &cancel).await;
    assert_eq!(pg.psql("app_copy", "SELECT sum(n) FROM t"), "500500");

    // Redis
    let source = Redis::start();
    source.cli(&["SET", "k", "v"]);
    let target = Redis::start();
    let config = AgentConfig {
        component: Some(Kind::Redis),
        redis: RedisSettings {
            address: format!("127.0.0.1:{}", source.port),
            state_dir: dir.path().join("redis-state"),
            ..RedisSettings::default()
        },
        ..AgentConfig::default()
    };
    let request = RestoreRequest {
        target: RestoreTarget::Server(format!("127.0.0.1:{}", target.port)),
        ..RestoreRequest::default()
    };
    round_trip(&repo, config, request, &cancel).await;
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
