//! Logging, the signal that starts a drain, and the small HTTP server that serves `/metrics`,
//! `/healthz` and `/readyz` on every binary.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The `[log]` section of every binary's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `info,aitbc_backup_agent=debug`.
    /// `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Plain,
            level: "info".to_owned(),
        }
    }
}

/// Installs the global tracing subscriber; logs go to stderr.
pub fn init_tracing(settings: &LogSettings) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive)?,
        _ => EnvFilter::try_new(&settings.level)
            .map_err(|err| anyhow::anyhow!("config key `log.level`: {err}"))?,
    };
    // Colours only for a person at a terminal: a pod's log collector or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let installed = match settings.format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("install tracing subscriber: {err}"))
}

/// An error with all its sources, `outer: inner: innermost` (tonic's transport errors keep the
/// useful part, such as a TLS alert, in their sources).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Runs `task` (given the process's shutdown token) until it ends or SIGTERM/SIGINT arrives;
/// then cancels the token and waits up to `grace` for the task to drain.
pub async fn run_until_signal<F>(
    task: impl FnOnce(CancellationToken) -> F,
    grace: std::time::Duration,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let mut running = tokio::spawn(task(shutdown.clone()));
    tokio::select! {
        result = &mut running => return result.map_err(|e| anyhow::anyhow!("task panicked: {e}"))?,
        signal = shutdown_signal() => {
            tracing::info!(signal = signal?, ?grace, "shutting down");
        }
    }
    shutdown.cancel();
    match tokio::time::timeout(grace, running).await {
        Ok(result) => result.map_err(|e| anyhow::anyhow!("task panicked: {e}"))?,
        Err(_) => anyhow::bail!("shutdown did not finish within {grace:?}"),
    }
}

/// The probe and metrics routes: `/healthz` (the process runs), `/readyz` (`ready()` says it can
/// do its job), `/metrics`: OpenMetrics to clients that accept it (Prometheus does), else the
/// classic Prometheus text format (curl, `promtool check metrics`).
pub fn probe_router(
    registry: Arc<Registry>,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                async move {
                    let openmetrics = headers
                        .get_all(axum::http::header::ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains("application/openmetrics-text"));
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) if openmetrics => (
                            StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        ),
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            openmetrics_to_text(&body),
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "metrics encoding failed\n".to_owned(),
                        ),
                    }
                }
            }),
        )
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): counters' HELP and TYPE
/// name their `_total` samples, and the `# EOF` and `# UNIT` lines go.
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                } else {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Binds `addr` (so a busy port is reported at start, not later).
pub async fn bind_http(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("bind HTTP listener {addr}: {err}"))
}

/// Serves `router` on `listener` until `cancel` fires.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(|err| anyhow::anyhow!("HTTP server: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_text_format() {
        let om = "# HELP jobs Jobs run.\n# TYPE jobs counter\njobs_total 3\n\
                  # HELP up Up.\n# TYPE up gauge\n# UNIT up seconds\nup 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP jobs_total Jobs run.\n# TYPE jobs_total counter\njobs_total 3\n\
             # HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
