//! The mTLS control plane end to end: real coordinator, agents and CLI processes.

use std::time::{Duration, Instant};

use aitbc_backup_proto::agent_session_client::AgentSessionClient;
use aitbc_backup_proto::operator_client::OperatorClient;
use aitbc_backup_proto::{AgentMessage, ComponentKind, ListAgentsRequest, Register, agent_message};
use aitbc_backup_tests::fleet::{
    AgentProcess, CertFiles, CoordinatorProcess, Pki, agent_state, agents_json, cli, http_get,
};
use aitbc_backup_tests::{tool, wait_until};
use aitbc_backup_tls::{PeerIdentity, Role};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

fn wait_online(
    pki: &Pki,
    coordinator: &CoordinatorProcess,
    names: &[&str],
    within: Duration,
) -> bool {
    wait_until(within, || {
        names.iter().all(|name| {
            agent_state(&pki.operator(), &coordinator.url(), name).as_deref() == Some("online")
        })
    })
}

fn runtime() -> tokio::runtime::Runtime {
    aitbc_backup_tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn tls_channel(url: &str, files: &CertFiles) -> Result<Channel, tonic::transport::Error> {
    let read = |p: &std::path::Path| std::fs::read(p).expect("read PEM");
    let tls = ClientTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert), read(&files.key)))
        .ca_certificate(Certificate::from_pem(read(&files.ca)))
        .domain_name("localhost");
    Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Opens an agent session with `files` registering as `name`; the gRPC status on refusal.
async fn open_session(url: &str, files: &CertFiles, name: &str) -> Result<(), tonic::Status> {
    let channel = tls_channel(url, files)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        body: Some(agent_message::Body::Register(Register {
            name: name.into(),
            component: ComponentKind::Redis as i32,
            version: "test".into(),
            host: "test".into(),
        })),
    })
    .await
    .expect("queue register");
    let mut stream = AgentSessionClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?;
    Ok(())
}

#[test]
fn agents_register_and_show_up_with_their_fields() {
    let pki = Pki::new();
    let coordinator = CoordinatorProcess::start(&pki, &[]);
    let pg = AgentProcess::start(&pki, "pg-0", "postgres", &coordinator.url(), &[]);
    let _redis = AgentProcess::start(&pki, "redis-0", "redis", &coordinator.url(), &[]);
    assert!(
        wait_online(
            &pki,
            &coordinator,
            &["pg-0", "redis-0"],
            Duration::from_secs(10)
        ),
        "agents not online; coordinator log:\n{}\nagent log:\n{}",
        coordinator.log(),
        pg.log()
    );

    let agents = agents_json(&pki.operator(), &coordinator.url());
    let agents = agents.as_array().expect("array");
    assert_eq!(agents.len(), 2);
    let pg_json = &agents[0];
    assert_eq!(pg_json["name"], "pg-0");
    assert_eq!(pg_json["component"], "postgres");
    assert_eq!(pg_json["state"], "online");
    assert_eq!(pg_json["version"], env!("CARGO_PKG_VERSION"));
    assert!(!pg_json["host"].as_str().unwrap_or_default().is_empty());
    assert_eq!(pg_json["session_id"].as_str().map(str::len), Some(32));
    assert!(
        pg_json["peer_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:"))
    );
    assert!(
        pg_json["last_seen"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(agents[1]["name"], "redis-0");
    assert_eq!(agents[1]["component"], "redis");

    // The human table lists both.
    let out = cli(&pki.operator(), &coordinator.url(), &["agents", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("pg-0") && l.contains("online")),
        "{table}"
    );

    // One agent by name, and a clear error for an unknown one.
    let out = cli(
        &pki.operator(),
        &coordinator.url(),
        &["agents", "get", "nobody", "--json"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound") && err.contains("nobody"), "{err}");

    // The agent's probes: ready while its session is up; its metrics say so too.
    assert_eq!(pg.http_get("/readyz").map(|r| r.0), Some(200));
    assert_eq!(pg.http_get("/healthz").map(|r| r.0), Some(200));
    let metrics = pg.http_get("/metrics").map(|r| r.1).unwrap_or_default();
    assert!(
        metrics.contains("aitbc_backup_agent_session_up 1"),
        "{metrics}"
    );
    let metrics = http_get(coordinator.http_port, "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    assert!(
        metrics.contains("aitbc_backup_coordinator_agents_online{component=\"postgres\"} 1"),
        "{metrics}"
    );
}

#[test]
fn wrong_clients_are_refused() {
    let pki = Pki::new();
    let coordinator = CoordinatorProcess::start(&pki, &[]);
    let url = coordinator.url();
    let rt = runtime();

    // Plaintext gRPC to the TLS port.
    let plaintext = rt.block_on(async {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", coordinator.grpc_port))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        OperatorClient::new(channel)
            .list_agents(ListAgentsRequest {})
            .await
    });
    assert!(plaintext.is_err(), "plaintext client was served");

    // A certificate from a foreign CA (the client still trusts our CA for the server).
    let foreign = Pki::new();
    let foreign_operator = CertFiles {
        ca: pki.operator().ca,
        ..foreign.operator()
    };
    let out = cli(&foreign_operator, &url, &["agents", "list"]);
    assert!(!out.status.success(), "foreign-CA certificate accepted");

    // An expired certificate from our own CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = pki
        .ca()
        .issue_with_validity(
            &PeerIdentity::new(Role::Operator, "old").expect("name"),
            &[],
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .expect("issue");
    expired.write(&pki.dir, "operator-old").expect("write");
    let out = cli(&pki.files("operator-old"), &url, &["agents", "list"]);
    assert!(!out.status.success(), "expired certificate accepted");

    // An agent certificate on an operator RPC.
    let agent = pki.agent("a1");
    let out = cli(&agent, &url, &["agents", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PermissionDenied"), "{err}");

    // An operator certificate opening an agent session, and an agent posing as another.
    let status = rt
        .block_on(open_session(&url, &pki.operator(), "admin"))
        .expect_err("operator opened a session");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    let status = rt
        .block_on(open_session(&url, &agent, "someone-else"))
        .expect_err("agent registered under another name");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    rt.block_on(open_session(&url, &agent, "a1"))
        .expect("the right certificate opens a session");

    // None of that disturbed the coordinator: the right operator is served.
    let out = cli(&pki.operator(), &url, &["agents", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fleet_survives_a_coordinator_crash_and_notices_a_dead_agent() {
    let pki = Pki::new();
    let mut coordinator = CoordinatorProcess::start(&pki, &[]);
    let names = ["l-0", "l-1", "l-2"];
    let mut agents: Vec<AgentProcess> = names
        .iter()
        .map(|n| AgentProcess::start(&pki, n, "ledger", &coordinator.url(), &[]))
        .collect();
    assert!(wait_online(
        &pki,
        &coordinator,
        &names,
        Duration::from_secs(10)
    ));
    let fds_before = open_fds(agents[0].pid());

    coordinator.kill9();
    // Agents notice and retry; their readiness drops while the coordinator is gone.
    assert!(wait_until(Duration::from_secs(5), || {
        agents[0].http_get("/readyz").map(|r| r.0) == Some(503)
    }));
    std::thread::sleep(Duration::from_secs(3)); // several failed attempts
    let fds_down = open_fds(agents[0].pid());
    assert!(
        fds_down <= fds_before + 2,
        "agent holds {fds_down} fds during the outage, {fds_before} before: connections pile up"
    );

    let restarted = Instant::now();
    coordinator.restart();
    assert!(
        wait_online(&pki, &coordinator, &names, Duration::from_secs(10)),
        "fleet not back within 10 s of the restart; coordinator log:\n{}",
        coordinator.log()
    );
    eprintln!(
        "fleet back online {:?} after the restart",
        restarted.elapsed()
    );
    let fds_after = open_fds(agents[0].pid());
    assert!(
        fds_after <= fds_before + 2,
        "{fds_after} fds after reconnect vs {fds_before}"
    );

    // An agent killed: offline after the heartbeat timeout (3 x 300 ms); the others stay.
    agents[1].service().kill9();
    assert!(wait_until(Duration::from_secs(5), || {
        agent_state(&pki.operator(), &coordinator.url(), "l-1").as_deref() == Some("offline")
    }));
    assert_eq!(
        agent_state(&pki.operator(), &coordinator.url(), "l-0").as_deref(),
        Some("online")
    );

    // SIGTERM drains: both binaries exit 0 promptly.
    let status = agents[0].service().stop().expect("agent exit status");
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    let started = Instant::now();
    let status = coordinator
        .service()
        .stop()
        .expect("coordinator exit status");
    assert!(status.success(), "coordinator exit on SIGTERM: {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn grpcurl_lists_services_and_checks_health() {
    let pki = Pki::new();
    let coordinator = CoordinatorProcess::start(&pki, &[]);
    let _agent = AgentProcess::start(&pki, "g-0", "redis", &coordinator.url(), &[]);
    assert!(wait_online(
        &pki,
        &coordinator,
        &["g-0"],
        Duration::from_secs(10)
    ));
    let addr = format!("127.0.0.1:{}", coordinator.grpc_port);
    let grpcurl = |files: &CertFiles, args: &[&str]| {
        std::process::Command::new(tool("venv/bin/grpcurl"))
            .arg("-cacert")
            .arg(&files.ca)
            .arg("-cert")
            .arg(&files.cert)
            .arg("-key")
            .arg(&files.key)
            .args(args)
            .output()
            .expect("run grpcurl")
    };
    let operator = pki.operator();
    let out = grpcurl(&operator, &[&addr, "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in [
        "aitbc.backup.v1.AgentSession",
        "aitbc.backup.v1.Operator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            list.lines().any(|l| l == service),
            "{service} missing from:\n{list}"
        );
    }
    let out = grpcurl(&operator, &[&addr, "grpc.health.v1.Health/Check"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"SERVING\""));
    let out = grpcurl(&operator, &[&addr, "aitbc.backup.v1.Operator/ListAgents"]);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(body["agents"][0]["name"], "g-0");
    assert_eq!(body["agents"][0]["state"], "AGENT_STATE_ONLINE");
    let out = grpcurl(
        &pki.agent("g-0"),
        &[&addr, "aitbc.backup.v1.Operator/ListAgents"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
}
