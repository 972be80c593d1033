//! Ordered restore of a snapshot set: one component after the other in the configured order
//! (PostgreSQL, Redis, ledger by default), each by an agent of its kind, each verified by that
//! agent against the component's consistency point before the next one starts. The first
//! failure stops the restore; components after it are not touched.

use std::collections::HashMap;
use std::time::Instant;

use aitbc_backup_proto::model::Component;
use aitbc_backup_proto::{Restore, RestoreEvent, command};
use tokio::sync::mpsc;

use crate::catalog::{SetRecord, SetState};
use crate::snapshot::Sets;

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

type Events = mpsc::Sender<Result<RestoreEvent, tonic::Status>>;

impl Sets {
    /// Checks the request, then restores in a task of its own (it outlives the caller, so an
    /// interrupted client never leaves a component half-restored by its own doing).
    pub fn restore(&self, request: RestoreRequest, events: Events) -> Result<(), RestoreError> {
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
        let steps = self.ordered(&record, &request.components);
        let fleet = self.fleet.clone();
        let calls = self.calls.clone();
        let deadline = self.settings.restore_timeout;
        let metrics = self.metrics.clone();
        let cancel = self.shutdown.child_token();
        self.tasks.spawn(async move {
            let restore_id = format!("restore-{}", aitbc_backup_repository::layout::new_manifest_id());
            let event = |component: Component, agent: &str, phase: &str| RestoreEvent {
                set_id: request.set_id.clone(),
                component: component.to_proto() as i32,
                agent: agent.to_owned(),
                phase: phase.to_owned(),
                ..RestoreEvent::default()
            };
            for (component, set_agent, manifest_id) in steps {
                let started = Instant::now();
                // The agent that made the backup if it is online, else any of its kind.
                let online = fleet.online();
                let agent = online
                    .iter()
                    .find(|a| a.name == set_agent)
                    .or_else(|| online.iter().find(|a| a.component == component))
                    .map(|a| a.name.clone());
                let target = request.targets.get(&component).cloned().unwrap_or_default();
                let outcome = match agent.as_deref() {
                    None => Err(format!("no {component} agent is online")),
                    Some(agent) => {
                        let _ = events.send(Ok(event(component, agent, "restore"))).await;
                        let action = command::Action::Restore(Restore {
                            manifest_id,
                            target_dir: target.dir,
                            target_url: target.url,
                            force: request.force,
                            trial: request.trial,
                        });
                        match calls.start(&fleet, agent, &restore_id, action) {
                            Err(err) => Err(err.to_string()),
                            Ok(call) => tokio::select! {
                                _ = cancel.cancelled() => Err("the coordinator is shutting down".to_owned()),
                                done = call.finish(deadline, |_| {}) => done.map_err(|e| e.to_string()),
                            },
                        }
                    }
                };
                let agent = agent.unwrap_or_default();
                let seconds = started.elapsed().as_secs_f64();
                match outcome {
                    Ok(result) => {
                        tracing::info!(%component, %agent, seconds, "component restored and verified");
                        metrics
                            .restore_duration
                            .get_or_create(&crate::metrics::ComponentLabel::of(component))
                            .observe(seconds);
                        let _ = events
                            .send(Ok(RestoreEvent {
                                report_json: result.report_json,
                                seconds,
                                ..event(component, &agent, "verified")
                            }))
                            .await;
                    }
                    Err(error) => {
                        tracing::warn!(%component, %agent, %error, "restore failed; later components not restored");
                        let _ = events
                            .send(Ok(RestoreEvent {
                                error,
                                seconds,
                                ..event(component, &agent, "failed")
                            }))
                            .await;
                        return;
                    }
                }
            }
            let _ = events
                .send(Ok(RestoreEvent {
                    set_id: request.set_id.clone(),
                    phase: "done".to_owned(),
                    ..RestoreEvent::default()
                }))
                .await;
        });
        Ok(())
    }

    /// A restore test of every component of a set; the failures, each naming its component.
    pub async fn trial_restore(&self, set_id: &str) -> anyhow::Result<Vec<String>> {
        let (tx, mut rx) = mpsc::channel(16);
        self.restore(
            RestoreRequest {
                set_id: set_id.to_owned(),
                components: Vec::new(),
                targets: HashMap::new(),
                force: false,
                trial: true,
            },
            tx,
        )?;
        let mut problems = Vec::new();
        while let Some(Ok(event)) = rx.recv().await {
            if event.phase == "failed" {
                let component = Component::from_proto("component", event.component)
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                problems.push(format!("{component}: {}", event.error));
            }
        }
        Ok(problems)
    }

    /// (component, agent that backed it up, manifest id) in restore order.
    fn ordered(&self, record: &SetRecord, only: &[Component]) -> Vec<(Component, String, String)> {
        let mut steps = Vec::new();
        for component in &self.settings.restore_order {
            if !only.is_empty() && !only.contains(component) {
                continue;
            }
            for c in record
                .components
                .iter()
                .filter(|c| c.component == *component)
            {
                steps.push((c.component, c.agent.clone(), c.manifest_id.clone()));
            }
        }
        steps
    }
}
