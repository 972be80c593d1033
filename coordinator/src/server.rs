//! Wires the coordinator together: TLS, the gRPC services, the probe/metrics HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aitbc_backup_proto::agent_session_server::AgentSessionServer;
use aitbc_backup_proto::operator_server::OperatorServer;
use aitbc_backup_tls::Role;
use anyhow::{Context, bail};
use prometheus_client::registry::Registry;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::RequireRole;
use crate::calls::Calls;
use crate::catalog::{Catalog, RepoHandle};
use crate::config::CoordinatorConfig;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::operator::OperatorService;
use crate::scheduler::Scheduler;
use crate::session::SessionService;
use crate::snapshot::Sets;

/// HTTP/2 pings on idle connections, so half-open agent connections are noticed.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);

/// A coordinator whose listeners are bound, ready to [`Coordinator::serve`].
pub struct Coordinator {
    config: CoordinatorConfig,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
}

impl Coordinator {
    /// Reads the TLS files and binds both listeners, so every startup error surfaces here.
    pub async fn bind(config: CoordinatorConfig) -> anyhow::Result<Self> {
        let own = config.tls.own_identity()?;
        if own.role != Role::Coordinator {
            bail!(
                "certificate file {} grants role `{}`; the coordinator needs a certificate with role `coordinator`",
                config.tls.cert.display(),
                own.role
            );
        }
        config.tls.load()?;
        let grpc = tokio::net::TcpListener::bind(config.server.grpc_listen)
            .await
            .with_context(|| format!("bind gRPC listener {}", config.server.grpc_listen))?;
        let http = aitbc_backup_telemetry::bind_http(config.server.http_listen).await?;
        Ok(Coordinator { config, grpc, http })
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// Serves until `shutdown` fires, then closes every session and waits for them.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Coordinator { config, grpc, http } = self;
        let tls = config.tls.load()?;
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let policies = config.effective_policies();
        metrics.init_policies(policies.iter().map(|p| p.name.as_str()));
        let fleet = Arc::new(Fleet::new(config.fleet.offline_after(), metrics.clone()));
        let sessions = TaskTracker::new();

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<OperatorServer<OperatorService>>()
            .await;
        health
            .set_serving::<AgentSessionServer<SessionService>>()
            .await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(aitbc_backup_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // Each builder adds its own version's descriptor; add the other so that `list`
                // shows both reflection services whichever version the client speaks.
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1()?;
        // grpcurl 1.8 speaks only v1alpha.
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let calls = Arc::new(Calls::default());
        let set_tasks = TaskTracker::new();
        let sets = Arc::new(Sets {
            fleet: fleet.clone(),
            calls: calls.clone(),
            catalog: Arc::new(Catalog::default()),
            repo: Arc::new(RepoHandle::new(config.repository.clone())),
            settings: config.snapshot.clone(),
            tasks: set_tasks.clone(),
            shutdown: shutdown.child_token(),
            loaded: tokio::sync::OnceCell::new(),
            metrics: metrics.clone(),
            queue: Default::default(),
        });
        {
            // Rebuild the catalog now rather than on the first call; a failure is retried then.
            let sets = sets.clone();
            set_tasks.spawn(async move {
                match sets.catalog_ready().await {
                    Ok(()) => sets.refresh_repository_metrics().await,
                    Err(err) => {
                        tracing::warn!(error = %err, "catalog not loaded yet; retried on the next operator call")
                    }
                }
            });
        }
        set_tasks.spawn(crate::stored::lock_upkeep(
            sets.clone(),
            shutdown.child_token(),
        ));
        if config.schedule.enabled {
            let scheduler = Arc::new(Scheduler {
                sets: sets.clone(),
                policies,
                default_days: config.retention.days,
                gc: config.gc.clone(),
                metrics: metrics.clone(),
            });
            let cancel = shutdown.child_token();
            set_tasks.spawn(scheduler.run(cancel));
        }
        let session_service = SessionService {
            fleet: fleet.clone(),
            calls,
            metrics: metrics.clone(),
            heartbeat_interval: config.fleet.heartbeat_interval,
            offline_after: config.fleet.offline_after(),
            register_timeout: config.fleet.register_timeout,
            shutdown: shutdown.child_token(),
            tasks: sessions.clone(),
        };
        let operator_service = OperatorService {
            fleet: fleet.clone(),
            sets,
        };

        let ready = Arc::new(AtomicBool::new(false));
        let probe_ready = ready.clone();
        let router = aitbc_backup_telemetry::probe_router(Arc::new(registry), move || {
            probe_ready.load(Ordering::Relaxed)
        });
        let http_task = tokio::spawn(aitbc_backup_telemetry::serve_http(
            http,
            router,
            shutdown.clone(),
        ));

        let grpc_addr = grpc.local_addr()?;
        tracing::info!(%grpc_addr, http_addr = %config.server.http_listen, "coordinator serving");
        ready.store(true, Ordering::Relaxed);
        let served = tonic::transport::Server::builder()
            .tls_config(tls.server_config())?
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(AgentSessionServer::with_interceptor(
                session_service,
                RequireRole(Role::Agent),
            ))
            .add_service(OperatorServer::with_interceptor(
                operator_service,
                RequireRole(Role::Operator),
            ))
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), shutdown.cancelled())
            .await;
        ready.store(false, Ordering::Relaxed);
        set_tasks.close();
        set_tasks.wait().await;
        sessions.close();
        sessions.wait().await;
        http_task.await??;
        served.context("gRPC server")
    }
}
