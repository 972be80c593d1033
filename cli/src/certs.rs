//! `aitbc-backup certs init | issue`: a development PKI. Production deployments use
//! cert-manager (see docs/operations.md, "Certificates and roles"); the files have the same
//! role SANs either way.

use crate::output::outln;

use std::path::{Path, PathBuf};

use aitbc_backup_tls::authority::write_file;
use aitbc_backup_tls::{CertificateAuthority, PeerIdentity, Role};
use anyhow::{Context, bail};

/// Host names the coordinator's certificate always carries, for local use and in-cluster DNS.
const DEFAULT_COORDINATOR_HOSTS: &[&str] =
    &["localhost", "127.0.0.1", "::1", "aitbc-backup-coordinator"];

#[derive(clap::Subcommand)]
pub enum CertsCommand {
    /// Create a CA and certificates for the coordinator, agents and an operator in DIR:
    /// ca.pem/ca.key, coordinator.pem/.key, agent-<name>.pem/.key, operator.pem/.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS names or IPs for the coordinator's certificate.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Agent names to issue certificates for.
        #[arg(long = "agent", default_values = ["postgres", "redis", "ledger"])]
        agents: Vec<String>,
        /// The operator's name.
        #[arg(long, default_value = "admin")]
        operator: String,
        /// Overwrite existing files in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more certificate from the CA in DIR (ca.pem, ca.key) into DIR/<role>-<name>.pem.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// agent, operator or coordinator.
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        /// DNS names or IPs (for a coordinator certificate).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            hosts,
            agents,
            operator,
            force,
        } => init(&dir, &hosts, &agents, &operator, force),
        CertsCommand::Issue {
            dir,
            role,
            name,
            hosts,
        } => issue(&dir, &role, &name, &hosts),
    }
}

fn init(
    dir: &Path,
    hosts: &[String],
    agents: &[String],
    operator: &str,
    force: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if !force && dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA (ca.key); pass --force to replace it, or use `certs issue`",
            dir.display()
        );
    }
    let ca = CertificateAuthority::generate("aitbc-backup dev CA")?;
    write_file(&dir.join("ca.pem"), ca.cert_pem(), 0o644)?;
    write_file(&dir.join("ca.key"), &ca.key_pem(), 0o600)?;

    let mut coordinator_hosts: Vec<String> = DEFAULT_COORDINATOR_HOSTS
        .iter()
        .map(|h| h.to_string())
        .collect();
    coordinator_hosts.extend(hosts.iter().cloned());
    let mut written = vec![];
    let mut issue_one =
        |role: Role, name: &str, hosts: &[String], stem: String| -> anyhow::Result<()> {
            let identity = PeerIdentity::new(role, name)?;
            ca.issue(&identity, hosts)?.write(dir, &stem)?;
            written.push(format!("{stem}.pem  {}", identity.uri()));
            Ok(())
        };
    issue_one(
        Role::Coordinator,
        "coordinator",
        &coordinator_hosts,
        "coordinator".into(),
    )?;
    for agent in agents {
        issue_one(Role::Agent, agent, &[], format!("agent-{agent}"))?;
    }
    issue_one(Role::Operator, operator, &[], "operator".into())?;
    outln!("wrote into {}: ca.pem, ca.key", dir.display())?;
    for line in written {
        outln!("  {line}")?;
    }
    Ok(())
}

fn issue(dir: &Path, role: &str, name: &str, hosts: &[String]) -> anyhow::Result<()> {
    let role = match role {
        "agent" => Role::Agent,
        "operator" => Role::Operator,
        "coordinator" => Role::Coordinator,
        other => bail!("unknown role `{other}` (expected agent, operator or coordinator)"),
    };
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    };
    let ca = CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca.key")?)?;
    let identity = PeerIdentity::new(role, name)?;
    let stem = format!("{role}-{name}");
    ca.issue(&identity, hosts)?.write(dir, &stem)?;
    outln!("wrote {}/{stem}.pem  {}", dir.display(), identity.uri())?;
    Ok(())
}
