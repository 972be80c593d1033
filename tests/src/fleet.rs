//! The aitbc-backup binaries as real processes: a dev PKI, the coordinator, agents and the CLI.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use aitbc_backup_tls::{CertificateAuthority, PeerIdentity, Role};
use nix::sys::signal::Signal;

use crate::process::{Service, Spec};

/// A built binary of this workspace (`cargo build` puts them next to the test's `deps/`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// A CA with certificates for a coordinator and an operator, issuing agent certificates on
/// demand. Files are `<dir>/<stem>.pem` and `.key`.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertificateAuthority,
    _tmp: tempfile::TempDir,
}

/// Paths of one certificate, its key and the CA.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let tmp = crate::temp_dir("pki");
        let dir = tmp.path().to_owned();
        let ca = CertificateAuthority::generate("aitbc-backup test CA").expect("generate CA");
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write ca.pem");
        let pki = Pki { dir, ca, _tmp: tmp };
        pki.issue(
            Role::Coordinator,
            "coordinator",
            &["localhost", "127.0.0.1"],
        );
        pki.issue(Role::Operator, "admin", &[]);
        pki
    }

    /// Issues (or re-issues) `<role>-<name>.pem`.
    pub fn issue(&self, role: Role, name: &str, hosts: &[&str]) -> CertFiles {
        let identity = PeerIdentity::new(role, name).expect("valid name");
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let stem = format!("{role}-{name}");
        self.ca
            .issue(&identity, &hosts)
            .expect("issue certificate")
            .write(&self.dir, &stem)
            .expect("write certificate");
        self.files(&stem)
    }

    /// Files of an already issued certificate.
    pub fn files(&self, stem: &str) -> CertFiles {
        CertFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            ca: self.dir.join("ca.pem"),
        }
    }

    pub fn coordinator(&self) -> CertFiles {
        self.files("coordinator-coordinator")
    }

    pub fn operator(&self) -> CertFiles {
        self.files("operator-admin")
    }

    pub fn agent(&self, name: &str) -> CertFiles {
        let stem = format!("agent-{name}");
        if self.dir.join(format!("{stem}.pem")).exists() {
            self.files(&stem)
        } else {
            self.issue(Role::Agent, name, &[])
        }
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

fn tls_env(files: &CertFiles) -> Vec<(String, String)> {
    vec![
        (
            "AITBC_BACKUP_TLS__CERT".into(),
            files.cert.display().to_string(),
        ),
        (
            "AITBC_BACKUP_TLS__KEY".into(),
            files.key.display().to_string(),
        ),
        (
            "AITBC_BACKUP_TLS__CA".into(),
            files.ca.display().to_string(),
        ),
    ]
}

/// Test-friendly liveness: heartbeats every 300 ms, offline after 3 missed (0.9 s).
pub const TEST_HEARTBEAT: &str = "300ms";

/// The coordinator as a process.
pub struct CoordinatorProcess {
    pub grpc_port: u16,
    pub http_port: u16,
    env: Vec<(String, String)>,
    service: Service,
    dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Starts a coordinator with the test heartbeat and `extra` env vars, and waits until its
    /// gRPC port accepts connections.
    pub fn start(pki: &Pki, extra: &[(&str, &str)]) -> CoordinatorProcess {
        let dir = crate::temp_dir("coordinator");
        let (grpc_port, http_port) = (crate::free_port(), crate::free_port());
        let mut env = tls_env(&pki.coordinator());
        env.extend([
            (
                "AITBC_BACKUP_SERVER__GRPC_LISTEN".into(),
                format!("127.0.0.1:{grpc_port}"),
            ),
            (
                "AITBC_BACKUP_SERVER__HTTP_LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "AITBC_BACKUP_FLEET__HEARTBEAT_INTERVAL".into(),
                TEST_HEARTBEAT.into(),
            ),
            (
                "AITBC_BACKUP_REPOSITORY__URL".into(),
                format!("file://{}", dir.path().join("repository").display()),
            ),
            // No scheduled sets unless a test asks for them.
            ("AITBC_BACKUP_SCHEDULE__ENABLED".into(), "false".into()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let service = Self::spawn(&dir, &env);
        let coordinator = CoordinatorProcess {
            grpc_port,
            http_port,
            env,
            service,
            dir,
        };
        coordinator.wait_ready();
        coordinator
    }

    fn spawn(dir: &tempfile::TempDir, env: &[(String, String)]) -> Service {
        Service::spawn(Spec {
            name: "aitbc-backup-coordinator",
            program: &binary("aitbc-backup-coordinator"),
            args: vec![],
            env: env.to_vec(),
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join(format!(
                "coordinator-{}.log",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            )),
            stop_signal: Signal::SIGTERM,
        })
    }

    fn wait_ready(&self) {
        let port = self.grpc_port;
        let ready = crate::wait_until(Duration::from_secs(20), || crate::port_open(port));
        self.service.expect_ready(ready, "listening");
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.service.kill9();
    }

    /// Starts the coordinator again on the same ports with the same config.
    pub fn restart(&mut self) {
        self.service.stop();
        self.service = Self::spawn(&self.dir, &self.env);
        self.wait_ready();
    }

    pub fn service(&mut self) -> &mut Service {
        &mut self.service
    }

    pub fn log(&self) -> String {
        self.service.log()
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }
}

/// An agent as a process.
pub struct AgentProcess {
    pub name: String,
    pub http_port: u16,
    service: Service,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts agent `name` of `component` against `coordinator_url`.
    pub fn start(
        pki: &Pki,
        name: &str,
        component: &str,
        coordinator_url: &str,
        extra: &[(&str, &str)],
    ) -> AgentProcess {
        let dir = crate::temp_dir("agent");
        let http_port = crate::free_port();
        let mut env = tls_env(&pki.agent(name));
        env.extend([
            ("AITBC_BACKUP_COMPONENT".into(), component.into()),
            (
                "AITBC_BACKUP_COORDINATOR__URL".into(),
                coordinator_url.into(),
            ),
            (
                "AITBC_BACKUP_HTTP__LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            ("AITBC_BACKUP_RECONNECT__MAX".into(), "2s".into()),
            (
                "AITBC_BACKUP_LEDGER__DATA_DIR".into(),
                dir.path().display().to_string(),
            ),
        ]);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let service = Service::spawn(Spec {
            name: "aitbc-backup-agent",
            program: &binary("aitbc-backup-agent"),
            args: vec![],
            env,
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join("agent.log"),
            stop_signal: Signal::SIGTERM,
        });
        AgentProcess {
            name: name.to_owned(),
            http_port,
            service,
            _dir: dir,
        }
    }

    /// GETs `path` on the agent's probe port; (status code, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http_port, path)
    }

    pub fn service(&mut self) -> &mut Service {
        &mut self.service
    }

    pub fn log(&self) -> String {
        self.service.log()
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }
}

/// A minimal HTTP/1.1 GET on loopback (probes and /metrics), without an HTTP client crate.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Runs the `aitbc-backup` CLI with `files` as its certificate against `coordinator_url`.
pub fn cli(files: &CertFiles, coordinator_url: &str, args: &[&str]) -> Output {
    cli_command(files, coordinator_url, args)
        .output()
        .expect("run aitbc-backup")
}

/// The `aitbc-backup` CLI command, not started (to read its output while it runs).
pub fn cli_command(
    files: &CertFiles,
    coordinator_url: &str,
    args: &[&str],
) -> std::process::Command {
    let mut command = std::process::Command::new(binary("aitbc-backup"));
    command
        .args(["--coordinator", coordinator_url])
        .arg("--cert")
        .arg(&files.cert)
        .arg("--key")
        .arg(&files.key)
        .arg("--ca")
        .arg(&files.ca)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// `aitbc-backup agents list --json` as JSON; panics with the CLI's stderr on failure.
pub fn agents_json(files: &CertFiles, coordinator_url: &str) -> serde_json::Value {
    let out = cli(files, coordinator_url, &["agents", "list", "--json"]);
    assert!(
        out.status.success(),
        "agents list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("agents list prints JSON")
}

/// The `state` of agent `name` in `agents list --json`, if listed.
pub fn agent_state(files: &CertFiles, coordinator_url: &str, name: &str) -> Option<String> {
    let out = cli(files, coordinator_url, &["agents", "list", "--json"]);
    if !out.status.success() {
        return None;
    }
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    agents
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .and_then(|a| a["state"].as_str().map(str::to_owned))
}
