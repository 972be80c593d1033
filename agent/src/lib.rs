//! The aitbc-backup sidecar agent: the mTLS session with the coordinator, the commands it sends
//! (snapshot-set phases, restores), the three components, and the probe server.
//!
//! - [`config`]: the TOML/env configuration.
//! - [`session`]: dial, register, heartbeat, reconnect.
//! - [`snapshot`]: runs the coordinator's commands, one task per set.
//! - [`component`]: the contract every component implements (prepare, fence, cut, release,
//!   upload, restore, background work) and the one place that picks the implementation.
//! - [`postgres`], [`redis`], [`ledger`]: the components, each behind that contract.
//! - [`scratch`]: scratch directories, and the directories a restore must stay apart from.
//! - [`oneshot`]: one backup or restore from the command line.
//! - [`confined`]: where a restore may write, and writing there without leaving it.
//! - [`metrics`]: every metric the agent exports.

pub mod component;
pub mod config;
pub mod confined;
pub mod ledger;
pub mod metrics;
pub mod oneshot;
pub mod postgres;
pub mod redis;
pub mod scratch;
pub mod session;
pub mod snapshot;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aitbc_backup_proto::model::Registration;
use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;

/// An agent whose configuration, certificates and HTTP listener are checked and bound.
pub struct Agent {
    settings: session::SessionSettings,
    http: tokio::net::TcpListener,
}

impl Agent {
    /// Loads the certificates, derives the registration and binds the probe port, so every
    /// startup error surfaces before anything runs.
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Self> {
        config.validate()?;
        let tls = config.tls.load()?;
        let identity = config.tls.own_identity()?;
        if identity.role != aitbc_backup_tls::Role::Agent {
            anyhow::bail!(
                "certificate file {} grants role `{}`; an agent needs a certificate with role `agent`",
                config.tls.cert.display(),
                identity.role
            );
        }
        if !config.name.is_empty() && config.name != identity.name {
            anyhow::bail!(
                "config key `name` is `{}` but certificate file {} names `{}`",
                config.name,
                config.tls.cert.display(),
                identity.name
            );
        }
        let kind = config
            .component
            .context("config key `component` is required")?;
        let config = Arc::new(config);
        let component = component::of(&config)?;
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let registration = Registration {
            name: identity.name,
            component: kind,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            host,
        };
        // The coordinator must present role `coordinator` (see aitbc_backup_tls::client).
        let tls = tls.coordinator_client(&config.coordinator.effective_server_name())?;
        let http = aitbc_backup_telemetry::bind_http(config.http.listen).await?;
        Ok(Agent {
            settings: session::SessionSettings {
                url: config.coordinator.url.clone(),
                connect_timeout: config.coordinator.connect_timeout,
                backoff: config.reconnect.backoff(),
                tls,
                registration,
                config: config.clone(),
                component,
            },
            http,
        })
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        // The component's own long-running work (WAL archiving, giving back servers an
        // interrupted restore borrowed) runs beside the session: it needs no coordinator, and a
        // restarted coordinator must not interrupt it.
        let background = self
            .settings
            .component
            .background(&mut registry, shutdown.clone());
        let up = Arc::new(AtomicBool::new(false));
        let probe_up = up.clone();
        let router = aitbc_backup_telemetry::probe_router(Arc::new(registry), move || {
            probe_up.load(Ordering::Relaxed)
        });
        tracing::info!(
            agent = %self.settings.registration.name,
            component = %self.settings.registration.component,
            coordinator = %self.settings.url,
            http_addr = ?self.http.local_addr().ok(),
            "agent starting"
        );
        let http = tokio::spawn(aitbc_backup_telemetry::serve_http(
            self.http,
            router,
            shutdown.clone(),
        ));
        let background = background.map(tokio::spawn);
        session::run(self.settings, up, metrics, shutdown).await;
        if let Some(background) = background {
            background.await?;
        }
        http.await?
    }
}
