//! The aitbc-backup sidecar agent: the mTLS session with the coordinator, the commands it sends
//! (snapshot-set phases, restores), the three components, and the probe server.
//!
//! - [`config`]: the TOML/env configuration.
//! - [`session`]: dial, register, heartbeat, reconnect.
//! - [`snapshot`]: runs the coordinator's commands, one task per set.
//! - [`postgres`], [`redis`], [`ledger`]: the components (prepare, fence, cut, upload, restore).
//! - [`oneshot`]: one backup or restore from the command line.
//! - [`confined`]: where a restore may write, and writing there without leaving it.
//! - [`metrics`]: every metric the agent exports.

pub mod config;
pub mod confined;
pub mod ledger;
pub mod metrics;
pub mod oneshot;
pub mod postgres;
pub mod redis;
pub mod session;
pub mod snapshot;

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
        let component = config
            .component
            .context("config key `component` is required")?;
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let registration = Registration {
            name: identity.name,
            component,
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
                config: Arc::new(config.clone()),
            },
            http,
        })
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut registry = Registry::default();
        let metrics = metrics::Metrics::register(&mut registry);
        let config = self.settings.config.clone();
        let archiving = config.component == Some(aitbc_backup_proto::model::Component::Postgres)
            && config.postgres.wal.archive;
        let wal_metrics = metrics::WalMetrics::default();
        if archiving {
            wal_metrics.register(&mut registry);
        }
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
        // Servers an interrupted restore left borrowed are given back first, in the
        // background: the session does not wait for a server that cannot be reached.
        let redis =
            (config.component == Some(aitbc_backup_proto::model::Component::Redis)).then(|| {
                tokio::spawn(redis::restore::journal::recover_at_start(
                    config.redis.clone(),
                    shutdown.clone(),
                ))
            });
        // The WAL archiver lives as long as the agent, beside the session: it needs no
        // coordinator, and a restarted coordinator must not interrupt it.
        let wal = archiving.then(|| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // Only starting can fail (the repository or the spool unreachable): retried.
                let backoff = config.reconnect.backoff();
                for attempt in 0.. {
                    let archived = async {
                        let repo = oneshot::open(&config, &shutdown).await?;
                        Box::pin(postgres::wal_archive::run(
                            &config.postgres,
                            repo,
                            wal_metrics.clone(),
                            shutdown.clone(),
                        ))
                        .await
                    };
                    let Err(err) = archived.await else { return };
                    let delay = backoff.delay(attempt);
                    tracing::error!(error = %format!("{err:#}"), retry_in = ?delay, "WAL archiving could not start");
                    if !aitbc_backup_backoff::sleep_or_cancel(delay, &shutdown).await {
                        return;
                    }
                }
            })
        });
        session::run(self.settings, up, metrics, shutdown).await;
        if let Some(redis) = redis {
            redis.await?;
        }
        if let Some(wal) = wal {
            wal.await?;
        }
        http.await?
    }
}
