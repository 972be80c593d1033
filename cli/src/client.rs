//! Connecting to the coordinator's operator API over mTLS.

use std::path::PathBuf;
use std::time::Duration;

use aitbc_backup_proto::operator_client::OperatorClient;
use aitbc_backup_tls::{CoordinatorTls, TlsFiles};
use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args, Clone)]
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
    /// Our TLS towards the coordinator; an error names the file that is wrong.
    pub fn coordinator_tls(&self) -> anyhow::Result<CoordinatorTls> {
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
        Ok(tls.coordinator_client(&server_name)?)
    }

    pub async fn operator(&self) -> anyhow::Result<OperatorClient<Channel>> {
        let tls = self.coordinator_tls()?;
        let endpoint = Endpoint::from_shared(self.coordinator.clone())
            .with_context(|| format!("bad coordinator address `{}`", self.coordinator))?;
        let channel = tls
            .endpoint(endpoint)?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .connect()
            .await
            .map_err(|err| {
                let why = tls
                    .explain(&err)
                    .unwrap_or_else(|| aitbc_backup_telemetry::error_chain(&err));
                anyhow::anyhow!("connect to coordinator {}: {why}", self.coordinator)
            })?;
        Ok(OperatorClient::new(channel))
    }

    /// Explains a call that failed the way a refused client certificate fails (TLS 1.3
    /// delivers the refusal after the handshake, and tonic reports it as `Cancelled`):
    /// dials again and says what the coordinator answered. `None` when nothing is learnt.
    pub async fn explain_failure(&self, failed: &RpcFailed) -> Option<String> {
        if !matches!(
            failed.code,
            tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
        ) {
            return None;
        }
        let tls = self.coordinator_tls().ok()?;
        tls.diagnose(&self.coordinator).await
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

/// A call the coordinator answered with an error status (or that never reached it).
#[derive(Debug, thiserror::Error)]
#[error("{call}: {code:?}: {message}")]
pub struct RpcFailed {
    pub call: String,
    pub code: tonic::Code,
    pub message: String,
}

/// A gRPC status as a one-line error ([`RpcFailed`], which `main` may explain further).
pub fn status_error(call: &str, status: tonic::Status) -> anyhow::Error {
    RpcFailed {
        call: call.to_owned(),
        code: status.code(),
        message: status.message().to_owned(),
    }
    .into()
}
