//! The snapshot-set protocol, one task per set: prepare → [fence] → cut (and release) →
//! upload → commit, each phase under its deadline. Any failure aborts the set: every agent is told to
//! abort (fences come down, uploads stop before committing), the attempt record says why, and
//! no set manifest is written — a set exists exactly when its manifest does.
//!
//! Modes: `coordinated` sends the cut to every agent at once; `fenced` first raises every
//! agent's fence and waits for all of them, so the writers are stopped everywhere before any cut
//! (an exact cut), then has each agent cut and release at once (each component is cut before
//! its own fence comes down, so the cut stays exact); `independent` cuts one agent after the
//! other.
//!
//! Sets that share an agent never overlap: a later one waits in [`queue`] until the earlier has
//! ended, in arrival order, whether an operator or the schedule asked for it.
//!
//! Everything here is typed: agents get [`Order`]s and answer [`Done`] (see [`crate::calls`]),
//! watchers get [`SetEvent`]s, an abort is a [`SetError`]; the operator service converts.

pub mod error;
pub mod event;
pub mod queue;

use std::sync::Arc;
use std::time::Duration;

use aitbc_backup_proto::model::{Component, Done, Mode, Order, ProtocolError, Step, Uploaded};
use aitbc_backup_repository::Repository;
use aitbc_backup_repository::manifest::{SetComponent, SetManifest};
use aitbc_backup_repository::sets::Attempt;
use futures::future::try_join_all;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use self::error::SetError;
pub use self::event::{Phase, SetEvent};
use crate::calls::{CallError, Calls};
use crate::catalog::{Catalog, ComponentRecord, RepoHandle, SetRecord, SetState};
pub use crate::config::DEFAULT_POLICY;
use crate::config::SnapshotSettings;
use crate::fleet::Fleet;
use crate::metrics::Metrics;

/// Events buffered per set for slow readers (progress is sent once a second per agent).
const EVENT_BUFFER: usize = 1024;

/// What everything that runs sets shares.
pub struct Sets {
    pub fleet: Arc<Fleet>,
    pub calls: Arc<Calls>,
    pub catalog: Arc<Catalog>,
    pub repo: Arc<RepoHandle>,
    pub settings: SnapshotSettings,
    pub tasks: TaskTracker,
    /// Cancelled at coordinator shutdown: running sets abort.
    pub shutdown: CancellationToken,
    /// Set once the catalog has been rebuilt from the repository.
    pub loaded: tokio::sync::OnceCell<()>,
    pub metrics: Arc<Metrics>,
    /// Sets not ended yet; a set sharing an agent with an earlier one waits for it.
    pub queue: queue::Queue,
}

/// What a set is asked to capture.
#[derive(Debug, Clone)]
pub struct SetRequest {
    pub policy: String,
    /// Empty: every component with an agent online.
    pub components: Vec<Component>,
    /// Only these agents (by name); empty: any.
    pub agents: Vec<String>,
    pub mode: Option<Mode>,
}

/// Why a set could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no agent is online{}", for_components(.0))]
    NoAgents(Vec<Component>),
    #[error("agent `{0}` is not online")]
    AgentOffline(String),
}

fn for_components(components: &[Component]) -> String {
    if components.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = components.iter().map(|c| c.as_str()).collect();
        format!(" for {}", names.join(", "))
    }
}

/// The agents of a running set.
struct Plan {
    id: String,
    mode: Mode,
    agents: Vec<(String, Component)>,
}

/// The events of one running set. A slow reader may miss progress events, never the last one
/// (`committed` or `aborted`, carrying the set): the stream ends after it, when the set's task
/// drops its sender.
pub struct SetEvents {
    receiver: broadcast::Receiver<SetEvent>,
    /// The earlier sets this one was queued behind when it started (empty: it ran at once).
    pub queued_behind: Vec<String>,
}

impl SetEvents {
    /// The next event; None once the set has ended and every event was read.
    pub async fn next(&mut self) -> Option<SetEvent> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// Waits for the set's end; true if it committed.
    pub async fn committed(mut self) -> bool {
        while let Some(event) = self.next().await {
            match event {
                SetEvent::Committed(_) => return true,
                SetEvent::Aborted { .. } => return false,
                _ => {}
            }
        }
        false
    }
}

/// A phase's results, one per agent, in plan order.
type Results = Vec<Done>;

impl Sets {
    /// Picks the agents and starts the set; events follow on the returned receiver.
    pub fn start(self: &Arc<Self>, request: SetRequest) -> Result<(String, SetEvents), StartError> {
        let online = self.fleet.online();
        if let Some(missing) = request
            .agents
            .iter()
            .find(|name| !online.iter().any(|a| &a.name == *name))
        {
            return Err(StartError::AgentOffline(missing.clone()));
        }
        let wanted =
            |c: Component| request.components.is_empty() || request.components.contains(&c);
        let chosen = |name: &String| request.agents.is_empty() || request.agents.contains(name);
        let agents: Vec<(String, Component)> = online
            .iter()
            .filter(|a| wanted(a.component) && chosen(&a.name))
            .map(|a| (a.name.clone(), a.component))
            .collect();
        let missing: Vec<Component> = request
            .components
            .iter()
            .copied()
            .filter(|c| !agents.iter().any(|(_, ac)| ac == c))
            .collect();
        if agents.is_empty() || !missing.is_empty() {
            return Err(StartError::NoAgents(missing));
        }
        let plan = Plan {
            id: aitbc_backup_repository::layout::new_manifest_id(),
            mode: request.mode.unwrap_or(self.settings.mode),
            agents,
        };
        let record = SetRecord {
            id: plan.id.clone(),
            policy: request.policy.clone(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            mode: plan.mode,
            state: SetState::Running,
            components: plan
                .agents
                .iter()
                .map(|(agent, component)| ComponentRecord {
                    agent: agent.clone(),
                    component: *component,
                    manifest_id: String::new(),
                    consistency: None,
                    bytes_read: 0,
                    bytes_stored: 0,
                })
                .collect(),
            cut_skew_ms: 0.0,
            write_pause_ms: 0.0,
            pinned: false,
            abort_reason: String::new(),
        };
        self.catalog.put(record);
        let queued_behind = self.queue.join(
            &plan.id,
            plan.agents.iter().map(|(agent, _)| agent.clone()).collect(),
        );
        let (events, receiver) = broadcast::channel(EVENT_BUFFER);
        let id = plan.id.clone();
        let span = tracing::info_span!("set", set = %plan.id, mode = %plan.mode);
        let sets = self.clone();
        // Boxed: the protocol's future is deep enough to overflow the compiler's layout queries.
        let drive: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move { sets.drive(plan, events).await });
        self.tasks.spawn(drive.instrument(span));
        Ok((
            id,
            SetEvents {
                receiver,
                queued_behind,
            },
        ))
    }

    /// Runs the set to its end, committed or aborted.
    async fn drive(&self, plan: Plan, events: broadcast::Sender<SetEvent>) {
        // However the set ends, the sets queued behind it may go.
        struct Leave<'a>(&'a queue::Queue, &'a str);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.leave(self.1);
            }
        }
        let _leave = Leave(&self.queue, &plan.id);
        let cancel = self.shutdown.child_token();
        tracing::info!(agents = plan.agents.len(), "snapshot set started");
        let started = std::time::Instant::now();
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Err(SetError::ShuttingDown),
            outcome = self.run(&plan, &events, &cancel) => outcome,
        };
        match outcome {
            Ok(()) => {
                self.catalog
                    .update(&plan.id, |r| r.state = SetState::Committed);
                if let Some(record) = self.catalog.get(&plan.id) {
                    self.record_success(&record, started.elapsed());
                }
                tracing::info!("snapshot set committed");
                if let Some(set) = self.catalog.get(&plan.id) {
                    let _ = events.send(SetEvent::Committed(set));
                }
                // After the event: whoever waits for the set does not wait for this scan.
                self.refresh_repository_metrics().await;
            }
            Err(error) => {
                let reason = error.to_string();
                tracing::warn!(%reason, agent = error.agent(), phase = error.phase().map(Phase::as_str), "snapshot set aborted");
                for (agent, _) in &plan.agents {
                    let abort = Order::Abort {
                        reason: reason.clone(),
                    };
                    // Best effort: an agent whose session is gone aborted the set already.
                    let _ = self.calls.start(&self.fleet, agent, &plan.id, abort);
                }
                self.catalog.update(&plan.id, |r| {
                    r.state = SetState::Aborted;
                    r.abort_reason = reason.clone();
                });
                self.record_failure(plan.agents.iter().map(|(_, component)| *component));
                if let Ok(repo) = self.repo.get(&CancellationToken::new()).await {
                    let attempt = self.attempt(&plan, "aborted", &reason);
                    if let Err(err) = repo
                        .record_attempt(&attempt, &CancellationToken::new())
                        .await
                    {
                        tracing::warn!(error = %err, "could not record the aborted set");
                    }
                }
                if let Some(set) = self.catalog.get(&plan.id) {
                    let _ = events.send(SetEvent::Aborted {
                        set,
                        error: Arc::new(error),
                    });
                }
            }
        }
    }

    fn attempt(&self, plan: &Plan, state: &str, reason: &str) -> Attempt {
        let record = self.catalog.get(&plan.id);
        Attempt {
            id: plan.id.clone(),
            policy: record
                .as_ref()
                .map(|r| r.policy.clone())
                .unwrap_or_default(),
            mode: plan.mode.to_string(),
            started: record.map(|r| r.created).unwrap_or_default(),
            state: state.to_owned(),
            reason: reason.to_owned(),
        }
    }

    async fn run(
        &self,
        plan: &Plan,
        events: &broadcast::Sender<SetEvent>,
        cancel: &CancellationToken,
    ) -> Result<(), SetError> {
        let repo = self.repo.get(cancel).await.map_err(SetError::Repository)?;
        repo.record_attempt(&self.attempt(plan, "running", ""), cancel)
            .await
            .map_err(SetError::RecordAttempt)?;
        let ahead = self.queue.ahead(&plan.id);
        if !ahead.is_empty() {
            tracing::info!(?ahead, "set queued behind earlier sets on the same agents");
            let _ = events.send(SetEvent::Queued { ahead });
            self.queue.wait_turn(&plan.id).await;
            tracing::info!("queued set runs");
        }
        let s = &self.settings;
        self.phase(plan, events, s.prepare_timeout, || Order::Prepare)
            .await?;
        let (cuts, pause_ms) = match plan.mode {
            Mode::Fenced => {
                let fences = self
                    .phase(plan, events, s.cut_timeout, || Order::Fence)
                    .await?;
                // Every fence is up: each agent cuts and lets its writers go at once.
                let cuts = self
                    .phase(plan, events, s.cut_timeout, || Order::Cut {
                        release: true,
                        at_unix_micros: None,
                    })
                    .await?;
                let first_fence = fences.iter().filter_map(Done::at_unix_micros).min();
                let last_release = cuts
                    .iter()
                    .filter_map(|done| match done {
                        Done::Cut {
                            released: Some(released),
                            ..
                        } => Some(released.at_unix_micros),
                        _ => None,
                    })
                    .max();
                let pause = match (first_fence, last_release) {
                    (Some(up), Some(down)) if down > up => (down - up) as f64 / 1e3,
                    _ => 0.0,
                };
                (cuts, Some(pause))
            }
            Mode::Coordinated => {
                // One instant for every agent, a little ahead: each cuts on its own timer.
                let at = std::time::SystemTime::now() + s.cut_lead;
                let at_unix_micros = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_micros() as i64)
                    .filter(|_| !s.cut_lead.is_zero());
                let timed = || Order::Cut {
                    release: false,
                    at_unix_micros,
                };
                (self.phase(plan, events, s.cut_timeout, timed).await?, None)
            }
            Mode::Independent => {
                let mut cuts = Vec::new();
                for (agent, _) in &plan.agents {
                    let cut = Order::Cut {
                        release: false,
                        at_unix_micros: None,
                    };
                    let call = self.calls.start(&self.fleet, agent, &plan.id, cut)?;
                    let _ = events.send(SetEvent::Step {
                        agent: agent.clone(),
                        step: Step::Cut,
                    });
                    cuts.push(call.finish(s.cut_timeout, |_| {}).await?);
                }
                (cuts, None)
            }
        };
        let skew_ms = spread(cuts.iter());
        self.catalog.update(&plan.id, |r| {
            r.cut_skew_ms = skew_ms;
            r.write_pause_ms = pause_ms.unwrap_or(0.0);
        });
        tracing::info!(skew_ms, pause_ms, "cut taken");

        let uploads = self
            .phase(plan, events, s.upload_timeout, || Order::Upload {
                name: None,
                full_scan: false,
            })
            .await?;
        let _ = events.send(SetEvent::Commit);
        self.commit(repo, plan, &uploads, skew_ms, pause_ms, cancel)
            .await
    }

    /// Reads back every component manifest (so the set never names a missing one) and writes
    /// the set manifest.
    async fn commit(
        &self,
        repo: &Repository,
        plan: &Plan,
        uploads: &Results,
        skew_ms: f64,
        pause_ms: Option<f64>,
        cancel: &CancellationToken,
    ) -> Result<(), SetError> {
        let mut components = Vec::new();
        for ((agent, _), done) in plan.agents.iter().zip(uploads) {
            let upload = uploaded(agent, done)?;
            let manifest = repo
                .component(&upload.manifest_id, cancel)
                .await
                .map_err(|source| SetError::Manifest {
                    agent: agent.clone(),
                    manifest_id: upload.manifest_id.clone(),
                    source,
                })?;
            self.catalog.update(&plan.id, |r| {
                if let Some(c) = r.components.iter_mut().find(|c| &c.agent == agent) {
                    c.manifest_id = manifest.id.clone();
                    c.consistency = manifest.consistency.clone();
                    c.bytes_read = upload.bytes_read;
                    c.bytes_stored = upload.bytes_stored;
                }
            });
            components.push(SetComponent {
                name: agent.clone(),
                manifest_id: manifest.id,
                consistency: manifest.consistency,
            });
        }
        let record = self.catalog.get(&plan.id);
        let manifest = SetManifest {
            id: plan.id.clone(),
            created: record
                .as_ref()
                .map(|r| r.created.clone())
                .unwrap_or_default(),
            policy: record.map(|r| r.policy).unwrap_or_default(),
            mode: plan.mode.to_string(),
            components,
            cut_skew_ms: skew_ms,
            write_pause_ms: pause_ms.unwrap_or(0.0),
            pinned: false,
        };
        repo.commit_set(&manifest, cancel)
            .await
            .map_err(SetError::Commit)
    }

    /// Sends one step to every agent at once and waits for all of them; the first failure ends
    /// the phase (the others are abandoned and aborted by the caller).
    async fn phase(
        &self,
        plan: &Plan,
        events: &broadcast::Sender<SetEvent>,
        deadline: Duration,
        order: impl Fn() -> Order,
    ) -> Result<Results, SetError> {
        let step = order().step();
        let calls = plan
            .agents
            .iter()
            .map(|(agent, _)| self.calls.start(&self.fleet, agent, &plan.id, order()))
            .collect::<Result<Vec<_>, _>>()?;
        for (agent, _) in &plan.agents {
            let _ = events.send(SetEvent::Step {
                agent: agent.clone(),
                step,
            });
        }
        Ok(try_join_all(calls.into_iter().map(|call| {
            let agent = call.agent().to_owned();
            call.finish(deadline, move |progress| {
                let _ = events.send(SetEvent::Progress {
                    agent: agent.clone(),
                    step,
                    progress,
                });
            })
        }))
        .await?)
    }
}

/// The upload an agent reported. [`crate::calls`] reads an upload's result as one, so anything
/// else is an invalid answer.
fn uploaded<'a>(agent: &str, done: &'a Done) -> Result<&'a Uploaded, SetError> {
    match done {
        Done::Uploaded(upload) => Ok(upload),
        other => Err(SetError::Agent(CallError::Invalid {
            agent: agent.to_owned(),
            step: Step::Upload,
            error: ProtocolError::new("result", format!("is a {} result", other.step())),
        })),
    }
}

/// Milliseconds between the earliest and the latest agent instant of a phase.
fn spread<'a>(results: impl Iterator<Item = &'a Done>) -> f64 {
    let instants: Vec<i64> = results.filter_map(Done::at_unix_micros).collect();
    match (instants.iter().min(), instants.iter().max()) {
        (Some(first), Some(last)) => (last - first) as f64 / 1e3,
        _ => 0.0,
    }
}
