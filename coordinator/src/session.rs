//! The agent session service: one bidirectional stream per agent.
//!
//! The handler waits for `Register`, checks the name against the certificate, records the
//! session in the fleet and answers `Registered`; a task (tracked, so shutdown waits for it)
//! then serves heartbeats and routes command results to their callers until the agent goes away, goes silent, is replaced by a newer session
//! of the same agent, or the coordinator shuts down.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_proto::agent_session_server::AgentSession;
use aitbc_backup_proto::model::Registration;
use aitbc_backup_proto::{
    AgentMessage, CoordinatorMessage, HeartbeatAck, Registered, agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::calls::Calls;
use crate::fleet::Fleet;
use crate::metrics::{Metrics, ReasonLabel};

/// Messages queued towards one agent before the session counts as stuck.
const OUTBOUND_QUEUE: usize = 16;

pub struct SessionService {
    pub fleet: Arc<Fleet>,
    pub calls: Arc<Calls>,
    pub metrics: Arc<Metrics>,
    pub heartbeat_interval: Duration,
    pub offline_after: Duration,
    pub register_timeout: Duration,
    /// Parent of every session's token; cancelled at shutdown.
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

type Outbound = Result<CoordinatorMessage, Status>;

#[tonic::async_trait]
impl AgentSession for SessionService {
    type SessionStream = Pin<Box<dyn Stream<Item = Outbound> + Send + 'static>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let identity = auth::authenticated(&request)?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(self.register_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message in time"))??;
        let registration = match first.and_then(|m| m.body) {
            Some(agent_message::Body::Register(register)) => Registration::try_from(register)?,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be Register",
                ));
            }
        };
        if registration.name != identity.name {
            return Err(Status::permission_denied(format!(
                "agent registers as `{}` but its certificate names `{}`",
                registration.name, identity.name
            )));
        }

        let name = registration.name.clone();
        let component = registration.component;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let ticket = self
            .fleet
            .connect(registration, peer, &self.shutdown, tx.clone());
        tracing::info!(agent = %name, %component, session = %ticket.session_id, ?peer, "agent registered");

        let registered = CoordinatorMessage {
            body: Some(coordinator_message::Body::Registered(Registered {
                session_id: ticket.session_id.clone(),
                heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u64,
            })),
        };
        // The queue is empty and its receiver alive: this cannot fail.
        let _ = tx.try_send(Ok(registered));

        let session = Session {
            name,
            session_id: ticket.session_id,
            cancel: ticket.cancel,
            fleet: self.fleet.clone(),
            calls: self.calls.clone(),
            metrics: self.metrics.clone(),
            offline_after: self.offline_after,
            tx,
        };
        self.tasks.spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    name: String,
    session_id: String,
    cancel: CancellationToken,
    fleet: Arc<Fleet>,
    calls: Arc<Calls>,
    metrics: Arc<Metrics>,
    offline_after: Duration,
    tx: mpsc::Sender<Outbound>,
}

impl Session {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let reason = loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => {
                    let _ = self.tx.try_send(Err(Status::unavailable(
                        "session closed: replaced by a newer session or coordinator shutting down",
                    )));
                    break "cancelled";
                }
                next = tokio::time::timeout(self.offline_after, inbound.message()) => next,
            };
            match next {
                Err(_) => {
                    tracing::warn!(agent = %self.name, silent_for = ?self.offline_after, "agent missed its heartbeats; closing session");
                    let _ = self
                        .tx
                        .try_send(Err(Status::deadline_exceeded("heartbeats missed")));
                    break "heartbeat_timeout";
                }
                Ok(Ok(Some(message))) => {
                    if let Err(status) = self.handle(message) {
                        let _ = self.tx.try_send(Err(status));
                        break "protocol_error";
                    }
                }
                Ok(Ok(None)) => break "agent_closed",
                Ok(Err(status)) => {
                    tracing::debug!(agent = %self.name, %status, "session stream failed");
                    break "stream_error";
                }
            }
        };
        self.fleet.disconnect(&self.name, &self.session_id);
        self.calls.session_closed(&self.session_id);
        self.metrics
            .sessions_closed
            .get_or_create(&ReasonLabel { reason })
            .inc();
        tracing::info!(agent = %self.name, session = %self.session_id, reason, "agent session ended");
    }

    fn handle(&self, message: AgentMessage) -> Result<(), Status> {
        match message.body {
            Some(agent_message::Body::Heartbeat(heartbeat)) => {
                let started = Instant::now();
                self.fleet.heartbeat(&self.name, &self.session_id);
                let ack = CoordinatorMessage {
                    body: Some(coordinator_message::Body::HeartbeatAck(HeartbeatAck {
                        sequence: heartbeat.sequence,
                    })),
                };
                // A full queue means the agent does not read; dropping an ack is harmless (the
                // heartbeat was recorded) and never blocks this task.
                let _ = self.tx.try_send(Ok(ack));
                self.metrics
                    .heartbeat_handling
                    .observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Some(agent_message::Body::Progress(progress)) => {
                self.fleet.heartbeat(&self.name, &self.session_id);
                self.calls.progress(&self.session_id, progress);
                Ok(())
            }
            Some(agent_message::Body::Result(result)) => {
                self.fleet.heartbeat(&self.name, &self.session_id);
                self.calls.complete(&self.session_id, result);
                Ok(())
            }
            Some(agent_message::Body::Register(_)) => Err(Status::invalid_argument(
                "Register may only be the first message of a session",
            )),
            None => Err(Status::invalid_argument("empty AgentMessage")),
        }
    }
}
