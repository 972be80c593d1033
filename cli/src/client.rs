//! Connecting to the coordinator's operator API over mTLS.

use std::path::PathBuf;
use std::time::Duration;

use aitbc_backup_proto::operator_client::OperatorClient;
use aitbc_backup_tls::TlsFiles;
use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct ConnectionArgs {
    /// The coordinator's gRPC address.
    #[arg(
        long,
        global = true,
        env = "AITBC_CLI_COORDINATOR",
        default_value = "https://127.0.0.1:7443"
    )]
    pub coordinator: String,
    /// The name expected in the coordinator's certificate (default: the address's host).
    #[arg(long, global = true, env = "AITBC_CLI_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Operator certificate (PEM).
    #[arg(long, global = true, env = "AITBC_CLI_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, global = true, env = "AITBC_CLI_KEY")]
    pub key: Option<PathBuf>,
    /// CA certificate that signed the coordinator's certificate (PEM).
    #[arg(long, global = true, env = "AITBC_CLI_CA")]
    pub ca: Option<PathBuf>,
}

impl ConnectionArgs {
    pub async fn operator(&self) -> anyhow::Result<OperatorClient<Channel>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) else {
            anyhow::bail!(
                "an operator certificate is needed: pass --cert, --key and --ca \
                 (or set AITBC_CLI_CERT, AITBC_CLI_KEY, AITBC_CLI_CA)"
            );
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        };
        let tls = files.load()?;
        let server_name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_of(&self.coordinator)
                .with_context(|| format!("`{}` is not https://host:port", self.coordinator))?,
        };
        let channel = Endpoint::from_shared(self.coordinator.clone())
            .with_context(|| format!("bad coordinator address `{}`", self.coordinator))?
            .tls_config(tls.client_config(&server_name))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect()
            .await
            .map_err(|err| {
                anyhow::anyhow!(
                    "connect to coordinator {}: {}",
                    self.coordinator,
                    aitbc_backup_telemetry::error_chain(&err)
                )
            })?;
        Ok(OperatorClient::new(channel))
    }
}

fn host_of(url: &str) -> Option<String> {
    let authority = url.strip_prefix("https://")?.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// A gRPC status as a one-line error.
pub fn status_error(call: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{call}: {:?}: {}", status.code(), status.message())
}
