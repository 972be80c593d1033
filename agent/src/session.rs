//! The agent's session with the coordinator: dial out over mTLS, register, heartbeat, and
//! reconnect with capped jittered backoff when the session is lost.
//!
//! There is exactly one session attempt at a time (a plain loop, no spawned retries), so a
//! coordinator outage never piles up connections or tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aitbc_backup_backoff::{Backoff, sleep_or_cancel};
use aitbc_backup_proto::agent_session_client::AgentSessionClient;
use aitbc_backup_proto::model::Registration;
use aitbc_backup_proto::{AgentMessage, Heartbeat, agent_message, coordinator_message};
use aitbc_backup_tls::CoordinatorTls;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::AgentConfig;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::snapshot::Executor;

/// HTTP/2 pings so a vanished coordinator is noticed even without traffic.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(10);
/// How many heartbeat intervals without any message from the coordinator end the session.
const MISSED_ACKS: u32 = 3;

/// Everything needed to open sessions.
pub struct SessionSettings {
    pub url: String,
    pub connect_timeout: Duration,
    pub backoff: Backoff,
    /// Our certificate, and the check that the server is the coordinator (name and role).
    pub tls: CoordinatorTls,
    pub registration: Registration,
    /// What the snapshot-set and restore commands run against.
    pub config: Arc<AgentConfig>,
    pub component: Arc<dyn crate::component::Component>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect to {url}: {why}")]
    Connect { url: String, why: String },
    #[error("coordinator refused the session: {0}")]
    Refused(tonic::Status),
    /// A refusal in TLS, explained (see [`CoordinatorTls::diagnose`]).
    #[error("coordinator refused the session: {why} ({status})")]
    RefusedTls { why: String, status: tonic::Status },
    #[error("session lost: {0}")]
    Lost(tonic::Status),
    #[error("coordinator closed the session")]
    Closed,
    #[error("no message from the coordinator for {0:?}")]
    Silent(Duration),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("bad coordinator URL: {0}")]
    BadUrl(tonic::transport::Error),
}

/// Keeps a session open until `cancel` fires. `up` is true while registered.
pub async fn run(
    settings: SessionSettings,
    up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut attempt = 0;
    while !cancel.is_cancelled() {
        let mut registered = false;
        let result = run_once(&settings, &up, &metrics, &cancel, &mut registered).await;
        up.store(false, Ordering::Relaxed);
        metrics.session_up.set(0);
        let outcome = if registered { "registered" } else { "failed" };
        metrics
            .session_attempts
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        if cancel.is_cancelled() {
            break;
        }
        if registered {
            attempt = 0;
        }
        let delay = settings.backoff.delay(attempt);
        match result {
            Ok(()) => {}
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?delay, attempt, "coordinator session down")
            }
        }
        attempt = attempt.saturating_add(1);
        if !sleep_or_cancel(delay, &cancel).await {
            break;
        }
    }
}

async fn run_once(
    settings: &SessionSettings,
    up: &AtomicBool,
    metrics: &Metrics,
    cancel: &CancellationToken,
    registered: &mut bool,
) -> Result<(), SessionError> {
    let endpoint = Endpoint::from_shared(settings.url.clone()).map_err(SessionError::BadUrl)?;
    let endpoint = settings
        .tls
        .endpoint(endpoint)
        .map_err(SessionError::BadUrl)?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE)
        .keep_alive_timeout(HTTP2_KEEPALIVE)
        .keep_alive_while_idle(true);
    let channel = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        channel = endpoint.connect() => channel.map_err(|err| SessionError::Connect {
            url: settings.url.clone(),
            why: settings
                .tls
                .explain(&err)
                .unwrap_or_else(|| aitbc_backup_telemetry::error_chain(&err)),
        })?,
    };
    let mut client = AgentSessionClient::new(channel);

    let (tx, rx) = mpsc::channel(16);
    let register = AgentMessage {
        body: Some(agent_message::Body::Register(
            settings.registration.clone().into(),
        )),
    };
    tx.send(register)
        .await
        .map_err(|_| SessionError::Protocol("outbound queue closed"))?;
    let response = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        response = client.session(ReceiverStream::new(rx)) => response,
    };
    let mut inbound = match response {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(refused(settings, status).await),
    };
    let first = match tokio::time::timeout(settings.connect_timeout, inbound.message())
        .await
        .map_err(|_| SessionError::Silent(settings.connect_timeout))?
    {
        Ok(first) => first,
        Err(status) => return Err(refused(settings, status).await),
    };
    let Some(coordinator_message::Body::Registered(accepted)) = first.and_then(|m| m.body) else {
        return Err(SessionError::Protocol("first message was not Registered"));
    };
    let interval = Duration::from_millis(accepted.heartbeat_interval_ms.max(100));
    *registered = true;
    up.store(true, Ordering::Relaxed);
    metrics.session_up.set(1);
    tracing::info!(session = %accepted.session_id, heartbeat_interval = ?interval, "registered with coordinator");

    let mut executor = Executor::new(
        settings.config.clone(),
        settings.component.clone(),
        tx.clone(),
        cancel.child_token(),
    );
    let served = serve(&mut inbound, &tx, &mut executor, interval, metrics, cancel).await;
    // Sets do not outlive their session: the coordinator aborts them when the session ends.
    executor.shutdown().await;
    served
}

/// Why the session was refused. A client certificate the coordinator's TLS refuses shows up
/// only as a cancelled call (TLS 1.3 sends the refusal after the handshake), so that case is
/// asked about on a second connection.
async fn refused(settings: &SessionSettings, status: tonic::Status) -> SessionError {
    if matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::Unavailable | tonic::Code::Unknown
    ) && let Some(why) = settings.tls.diagnose(&settings.url).await
    {
        return SessionError::RefusedTls { why, status };
    }
    SessionError::Refused(status)
}

/// Heartbeats up, acks and commands down, until the session ends.
async fn serve(
    inbound: &mut tonic::Streaming<aitbc_backup_proto::CoordinatorMessage>,
    tx: &mpsc::Sender<AgentMessage>,
    executor: &mut Executor,
    interval: Duration,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // the first tick is immediate; Register just went up
    let mut sequence = 0u64;
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let silence_limit = interval * MISSED_ACKS;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                sequence += 1;
                sent.insert(sequence, Instant::now());
                // Acks lost with a dying coordinator must not pile up.
                sent.retain(|seq, _| seq + u64::from(MISSED_ACKS) * 2 >= sequence);
                let heartbeat = AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(Heartbeat { sequence })),
                };
                if tx.try_send(heartbeat).is_err() {
                    return Err(SessionError::Silent(silence_limit));
                }
            }
            message = tokio::time::timeout(silence_limit, inbound.message()) => {
                match message {
                    Err(_) => return Err(SessionError::Silent(silence_limit)),
                    Ok(Err(status)) => return Err(SessionError::Lost(status)),
                    Ok(Ok(None)) => return Err(SessionError::Closed),
                    Ok(Ok(Some(message))) => match message.body {
                        Some(coordinator_message::Body::HeartbeatAck(ack)) => {
                            if let Some(at) = sent.remove(&ack.sequence) {
                                metrics.heartbeat_rtt.observe(at.elapsed().as_secs_f64());
                            }
                        }
                        Some(coordinator_message::Body::Command(command)) => {
                            executor.dispatch(command);
                        }
                        Some(coordinator_message::Body::Registered(_)) | None => {
                            return Err(SessionError::Protocol("unexpected message in a session"));
                        }
                    },
                }
            }
        }
    }
}
