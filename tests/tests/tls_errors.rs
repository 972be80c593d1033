//! The clients' side of mTLS, with real binaries: the CLI and the agents accept only a server
//! whose certificate grants role `coordinator`, and every TLS failure says what is wrong.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aitbc_backup_tests::fleet::{AgentProcess, CertFiles, CoordinatorProcess, Pki, binary, cli};
use aitbc_backup_tests::wait_until;
use aitbc_backup_tls::{IssuedCertificate, PeerIdentity, Role};

/// A TLS server on loopback presenting a certificate from our CA that is not a coordinator's
/// (a misissued one). It records what it was sent: a client that refuses it sends nothing.
struct Impostor {
    port: u16,
    /// Application bytes received over completed handshakes.
    received: Arc<AtomicUsize>,
    /// Handshakes that failed, with the server's reason.
    refused: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Impostor {
    fn start(cert: &IssuedCertificate) -> Impostor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let received = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let (count, reasons) = (received.clone(), refused.clone());
        runtime.spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count, reasons) = (acceptor.clone(), count.clone(), reasons.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = tls.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                count.fetch_add(n, Ordering::SeqCst);
                            }
                        }
                        Err(err) => reasons.lock().expect("lock").push(err.to_string()),
                    }
                });
            }
        });
        Impostor {
            port,
            received,
            refused,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn assert_nothing_received(&self) {
        let refused = self.refused.lock().expect("lock").clone();
        assert!(!refused.is_empty(), "no client dialled the impostor");
        assert_eq!(
            self.received.load(Ordering::SeqCst),
            0,
            "a client sent data to a server that is not a coordinator (handshakes refused: {refused:?})"
        );
    }
}

fn misissued(pki: &Pki, role: Option<Role>) -> IssuedCertificate {
    let identity = role.map(|role| PeerIdentity::new(role, "impostor").expect("name"));
    pki.ca()
        .issue_server_certificate(
            identity.as_ref(),
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
        )
        .expect("issue")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn clients_refuse_a_server_that_is_not_a_coordinator() {
    aitbc_backup_tls::install_crypto_provider();
    let pki = Pki::new();
    for (role, expected) in [
        (Some(Role::Agent), "grants role `agent`"),
        (None, "grants no role"),
    ] {
        let impostor = Impostor::start(&misissued(&pki, role));

        // The CLI: refused before any request, and it says which role it found.
        let out = cli(&pki.operator(), &impostor.url(), &["agents", "list"]);
        assert!(!out.status.success(), "the CLI talked to an impostor");
        let err = stderr(&out);
        assert!(
            err.contains(expected) && err.contains("not `coordinator`"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");

        // An agent: never registers, keeps refusing, and its log says why.
        let agent = AgentProcess::start(&pki, "pg-0", "ledger", &impostor.url(), &[]);
        let said = wait_until(Duration::from_secs(15), || agent.log().contains(expected));
        assert!(
            said,
            "the agent did not name the role it found:\n{}",
            agent.log()
        );
        assert!(
            !agent.log().contains("registered with coordinator"),
            "{}",
            agent.log()
        );
        impostor.assert_nothing_received();
    }
}

#[test]
fn a_refused_client_certificate_is_explained() {
    let pki = Pki::new();
    let coordinator = CoordinatorProcess::start(&pki, &[]);
    let url = coordinator.url();

    // A certificate from another CA (with the same name as ours, as `certs init` makes them).
    let foreign = Pki::new();
    let foreign_operator = CertFiles {
        ca: pki.operator().ca,
        ..foreign.operator()
    };
    let out = cli(&foreign_operator, &url, &["agents", "list"]);
    assert!(!out.status.success(), "foreign-CA certificate accepted");
    let err = stderr(&out);
    let cert = foreign_operator.cert.display().to_string();
    assert!(
        err.contains("the coordinator refused this client's certificate")
            && err.contains(&cert)
            && err.contains("TLS alert")
            && err.contains("issued by another CA"),
        "{err}"
    );
    assert!(
        !err.starts_with("aitbc-backup: error: ListAgents: Cancelled"),
        "{err}"
    );

    // An expired certificate from our own CA: the alert, and when it expired.
    let now = time::OffsetDateTime::now_utc();
    pki.ca()
        .issue_with_validity(
            &PeerIdentity::new(Role::Operator, "old").expect("name"),
            &[],
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .expect("issue")
        .write(&pki.dir, "operator-old")
        .expect("write");
    let expired = pki.files("operator-old");
    let out = cli(&expired, &url, &["agents", "list"]);
    assert!(!out.status.success(), "expired certificate accepted");
    let err = stderr(&out);
    assert!(
        err.contains("refused this client's certificate")
            && err.contains(&expired.cert.display().to_string())
            && err.contains("certificate_expired")
            && err.contains("expired on"),
        "{err}"
    );

    // An agent with a certificate from another CA says the same in its log.
    let foreign_agent = foreign.agent("a1");
    std::fs::copy(&foreign_agent.cert, pki.dir.join("agent-a1.pem")).expect("copy cert");
    std::fs::copy(&foreign_agent.key, pki.dir.join("agent-a1.key")).expect("copy key");
    let agent = AgentProcess::start(&pki, "a1", "ledger", &url, &[]);
    let said = wait_until(Duration::from_secs(15), || {
        agent
            .log()
            .contains("the coordinator refused this client's certificate")
    });
    assert!(said, "{}", agent.log());
}

#[test]
fn a_key_that_does_not_match_its_certificate_names_both_files() {
    let pki = Pki::new();
    let operator = pki.operator();
    let other_key = pki.agent("a1").key;
    let mismatched = CertFiles {
        key: other_key.clone(),
        ..operator.clone()
    };
    // No coordinator is needed: the pair is checked when it is loaded.
    let out = cli(&mismatched, "https://127.0.0.1:1", &["agents", "list"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&operator.cert.display().to_string())
            && err.contains(&other_key.display().to_string())
            && err.contains("does not belong to certificate file"),
        "{err}"
    );
    assert!(!err.contains("KeyMismatch"), "{err}");

    // The agent refuses to start with such a pair, naming both files.
    let agent_files = pki.agent("a2");
    let out = std::process::Command::new(binary("aitbc-backup-agent"))
        .env_clear()
        .env("AITBC_BACKUP_TLS__CERT", &agent_files.cert)
        .env("AITBC_BACKUP_TLS__KEY", &other_key)
        .env("AITBC_BACKUP_TLS__CA", &agent_files.ca)
        .env("AITBC_BACKUP_COMPONENT", "ledger")
        .env("AITBC_BACKUP_LEDGER__DATA_DIR", &pki.dir)
        .env("AITBC_BACKUP_COORDINATOR__URL", "https://127.0.0.1:1")
        .output()
        .expect("run the agent");
    assert!(
        !out.status.success(),
        "the agent started with a mismatched key"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&agent_files.cert.display().to_string())
            && err.contains(&other_key.display().to_string()),
        "{err}"
    );
}
