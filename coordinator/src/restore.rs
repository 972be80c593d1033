//! Ordered restore of a snapshot set: one component after the other in the configured order
//! (PostgreSQL, Redis, ledger by default), each by an agent of its kind, each verified by that
//! agent against the component's consistency point before the next one starts. The first
//! failure stops the restore; components after it are not touched.
//!
//! [`Sets::restore`] checks a request against the catalog and runs a [`Restore`] in a task of
//! its own; watchers get [`RestoreEvent`]s (the operator service converts them), and a failure
//! is a [`RestoreFailure`], so the scheduler's restore test finds failures by type.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_proto::model::{
    self, Component, Done, Order, ProtocolError, RepoKey, RestoreOrder, RestoreTarget,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::calls::{CallError, Calls};
use crate::catalog::{SetRecord, SetState};
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::snapshot::Sets;

/// Events buffered for a slow reader; the restore waits for it beyond that.
const EVENT_BUFFER: usize = 16;

/// Where one component goes (empty strings: the agent's own server or directory).
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub dir: String,
    pub url: String,
}

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub set_id: String,
    /// Empty: every component of the set.
    pub components: Vec<Component>,
    pub targets: HashMap<Component, Target>,
    pub force: bool,
    /// A restore test into the agents' scratch targets (removed afterwards).
    pub trial: bool,
    /// The operator's key, passed on to each agent with its command.
    pub key: Option<RepoKey>,
}

/// Why a restore could not start.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no snapshot set `{0}`")]
    NotFound(String),
    #[error("snapshot set `{0}` is not committed (it is {1}); only committed sets can be restored")]
    NotCommitted(String, &'static str),
    #[error("snapshot set `{set}` has no {component} component")]
    NoComponent { set: String, component: Component },
}

/// Why one component's restore failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestoreFailure {
    #[error("no {0} agent is online")]
    NoAgent(Component),
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The agent failed the restore or its verification, or went away.
    #[error(transparent)]
    Agent(#[from] CallError),
}

/// One event of a running restore.
#[derive(Debug, Clone, PartialEq)]
pub enum RestoreEvent {
    /// `agent` restores `component`.
    Restoring { component: Component, agent: String },
    /// `component` is restored and verified; the agent's report (JSON).
    Verified {
        component: Component,
        agent: String,
        report_json: String,
        seconds: f64,
    },
    /// `component` failed; the rest is not touched. `agent` is `None` when none was online.
    Failed {
        component: Component,
        agent: Option<String>,
        error: RestoreFailure,
        seconds: f64,
    },
    /// Every component is restored and verified.
    Done,
}

/// A component that failed a restore test.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{component}: {error}")]
pub struct TrialFailure {
    pub component: Component,
    pub error: RestoreFailure,
}

/// One component of a restore, in order.
#[derive(Debug, Clone, PartialEq)]
struct Step {
    component: Component,
    /// The agent that backed it up (preferred if online).
    agent: String,
    manifest_id: String,
}

/// A restore of one set, checked and ordered, ready to run.
pub struct Restore {
    set_id: String,
    steps: Vec<Step>,
    targets: HashMap<Component, Target>,
    force: bool,
    trial: bool,
    key: Option<RepoKey>,
    fleet: Arc<Fleet>,
    calls: Arc<Calls>,
    deadline: Duration,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl Sets {
    /// Checks the request, then restores in a task of its own (it outlives the caller, so an
    /// interrupted client never leaves a component half-restored by its own doing).
    pub fn restore(
        &self,
        request: RestoreRequest,
    ) -> Result<mpsc::Receiver<RestoreEvent>, RestoreError> {
        let restore = self.plan_restore(request)?;
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        self.tasks.spawn(restore.run(events));
        Ok(receiver)
    }

    /// A restore test of every component of a set; the failures, each naming its component.
    pub async fn trial_restore(
        &self,
        set_id: &str,
        key: Option<RepoKey>,
    ) -> Result<Vec<TrialFailure>, RestoreError> {
        let mut events = self.restore(RestoreRequest {
            set_id: set_id.to_owned(),
            components: Vec::new(),
            targets: HashMap::new(),
            force: false,
            trial: true,
            key,
        })?;
        let mut failures = Vec::new();
        while let Some(event) = events.recv().await {
            if let RestoreEvent::Failed {
                component, error, ..
            } = event
            {
                failures.push(TrialFailure { component, error });
            }
        }
        Ok(failures)
    }

    fn plan_restore(&self, request: RestoreRequest) -> Result<Restore, RestoreError> {
        let record = self
            .catalog
            .get(&request.set_id)
            .ok_or_else(|| RestoreError::NotFound(request.set_id.clone()))?;
        match record.state {
            SetState::Committed => {}
            SetState::Running => return Err(RestoreError::NotCommitted(record.id, "running")),
            SetState::Aborted => return Err(RestoreError::NotCommitted(record.id, "aborted")),
        }
        for component in &request.components {
            if !record.components.iter().any(|c| c.component == *component) {
                return Err(RestoreError::NoComponent {
                    set: record.id,
                    component: *component,
                });
            }
        }
        Ok(Restore {
            steps: ordered(&self.settings.restore_order, &record, &request.components),
            set_id: request.set_id,
            targets: request.targets,
            force: request.force,
            trial: request.trial,
            key: request.key,
            fleet: self.fleet.clone(),
            calls: self.calls.clone(),
            deadline: self.settings.restore_timeout,
            metrics: self.metrics.clone(),
            cancel: self.shutdown.child_token(),
        })
    }
}

impl Restore {
    /// Restores every component in order; stops at the first failure.
    async fn run(self, events: mpsc::Sender<RestoreEvent>) {
        let restore_id = format!(
            "restore-{}",
            aitbc_backup_repository::layout::new_manifest_id()
        );
        for step in &self.steps {
            let component = step.component;
            let started = Instant::now();
            // The agent that made the backup if it is online, else any of its kind.
            let online = self.fleet.online();
            let agent = online
                .iter()
                .find(|a| a.name == step.agent)
                .or_else(|| online.iter().find(|a| a.component == component))
                .map(|a| a.name.clone());
            let outcome = match &agent {
                None => Err(RestoreFailure::NoAgent(component)),
                Some(agent) => {
                    let _ = events
                        .send(RestoreEvent::Restoring {
                            component,
                            agent: agent.clone(),
                        })
                        .await;
                    self.one(&restore_id, agent, step).await
                }
            };
            let seconds = started.elapsed().as_secs_f64();
            match outcome {
                Ok(report_json) => {
                    let agent = agent.unwrap_or_default();
                    tracing::info!(set = %self.set_id, %component, %agent, seconds, "component restored and verified");
                    self.metrics
                        .restore_duration
                        .get_or_create(&crate::metrics::ComponentLabel::of(component))
                        .observe(seconds);
                    let _ = events
                        .send(RestoreEvent::Verified {
                            component,
                            agent,
                            report_json,
                            seconds,
                        })
                        .await;
                }
                Err(error) => {
                    tracing::warn!(set = %self.set_id, %component, agent = agent.as_deref().unwrap_or_default(), %error, "restore failed; later components not restored");
                    let _ = events
                        .send(RestoreEvent::Failed {
                            component,
                            agent,
                            error,
                            seconds,
                        })
                        .await;
                    return;
                }
            }
        }
        let _ = events.send(RestoreEvent::Done).await;
    }

    /// One component's restore by `agent`; the agent's report.
    async fn one(
        &self,
        restore_id: &str,
        agent: &str,
        step: &Step,
    ) -> Result<String, RestoreFailure> {
        let target = if self.trial {
            RestoreTarget::Trial
        } else {
            let given = self
                .targets
                .get(&step.component)
                .cloned()
                .unwrap_or_default();
            let nonempty = |s: String| (!s.is_empty()).then_some(s);
            RestoreTarget::Live {
                dir: nonempty(given.dir),
                url: nonempty(given.url),
            }
        };
        let order = Order::Restore(RestoreOrder {
            manifest_id: step.manifest_id.clone(),
            target,
            force: self.force,
            key: self.key.clone(),
        });
        let call = self.calls.start(&self.fleet, agent, restore_id, order)?;
        let done = tokio::select! {
            _ = self.cancel.cancelled() => return Err(RestoreFailure::ShuttingDown),
            done = call.finish(self.deadline, |_| {}) => done?,
        };
        match done {
            Done::Restored { report_json } => Ok(report_json),
            // `calls` reads a restore's result as one: anything else is no answer to it.
            other => Err(RestoreFailure::Agent(CallError::Invalid {
                agent: agent.to_owned(),
                step: model::Step::Restore,
                error: ProtocolError::new("result", format!("is a {} result", other.step())),
            })),
        }
    }
}

/// The components of `record` in restore order (only those of `only`, if any).
fn ordered(order: &[Component], record: &SetRecord, only: &[Component]) -> Vec<Step> {
    order
        .iter()
        .filter(|component| only.is_empty() || only.contains(component))
        .flat_map(|component| {
            record
                .components
                .iter()
                .filter(move |c| c.component == *component)
                .map(|c| Step {
                    component: c.component,
                    agent: c.agent.clone(),
                    manifest_id: c.manifest_id.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests;
