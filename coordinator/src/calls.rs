//! Commands to agents and their answers. A call sends one [`model::Command`] down an agent's
//! session and waits for the `CommandResult` with the same id, passing progress on meanwhile.
//! This is the edge: the generated messages are converted here (the result read for the step
//! the call asked for, see [`Reply::from_proto`]) and callers see domain types only. A call
//! ends with an error naming the agent and the step when the agent reports a failure, answers
//! with an invalid result, misses the deadline, or its session ends (the pending entries of a
//! closed session are dropped, which wakes their callers).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aitbc_backup_proto::model::{self, Done, Order, ProtocolError, Reply, Step};
use aitbc_backup_proto::{CommandResult, CoordinatorMessage, coordinator_message};
use tokio::sync::mpsc;

use crate::fleet::Fleet;

/// A call's failure, for people: it names the agent and the step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("agent `{agent}` is not connected")]
    Offline { agent: String, step: Step },
    #[error("agent `{agent}` disconnected during {step}")]
    Disconnected { agent: String, step: Step },
    #[error("agent `{agent}` did not finish {step} within {deadline:?}")]
    Timeout {
        agent: String,
        step: Step,
        deadline: Duration,
    },
    #[error("agent `{agent}` failed {step}: {message}")]
    Failed {
        agent: String,
        step: Step,
        message: String,
    },
    #[error("agent `{agent}` answered {step} with an invalid result: {error}")]
    Invalid {
        agent: String,
        step: Step,
        error: ProtocolError,
    },
}

impl CallError {
    /// The agent the call went to.
    pub fn agent(&self) -> &str {
        match self {
            CallError::Offline { agent, .. }
            | CallError::Disconnected { agent, .. }
            | CallError::Timeout { agent, .. }
            | CallError::Failed { agent, .. }
            | CallError::Invalid { agent, .. } => agent,
        }
    }

    /// The step the call asked for.
    pub fn step(&self) -> Step {
        match self {
            CallError::Offline { step, .. }
            | CallError::Disconnected { step, .. }
            | CallError::Timeout { step, .. }
            | CallError::Failed { step, .. }
            | CallError::Invalid { step, .. } => *step,
        }
    }
}

/// How far an upload or a restore has come, as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

impl From<&aitbc_backup_proto::Progress> for Progress {
    fn from(msg: &aitbc_backup_proto::Progress) -> Self {
        Progress {
            bytes_read: msg.bytes_read,
            bytes_stored: msg.bytes_stored,
        }
    }
}

/// What reaches a waiting call: progress, then its result (still the wire message: only the
/// call knows which step's result to read it as).
enum Answer {
    Progress(Progress),
    Done(CommandResult),
}

struct Pending {
    session_id: String,
    replies: mpsc::UnboundedSender<Answer>,
}

/// Calls in flight, by command id.
#[derive(Default)]
pub struct Calls {
    pending: Mutex<HashMap<String, Pending>>,
}

/// One call in flight.
pub struct Call {
    agent: String,
    step: Step,
    replies: mpsc::UnboundedReceiver<Answer>,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `order` for `set_id` to `agent`.
    pub fn start(
        &self,
        fleet: &Fleet,
        agent: &str,
        set_id: &str,
        order: Order,
    ) -> Result<Call, CallError> {
        let step = order.step();
        let offline = || CallError::Offline {
            agent: agent.to_owned(),
            step,
        };
        let (session_id, outbound) = fleet.outbound(agent).ok_or_else(offline)?;
        let command_id = format!("{set_id}-{step}-{:08x}", rand::random::<u32>());
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(
            command_id.clone(),
            Pending {
                session_id,
                replies: tx,
            },
        );
        let message = CoordinatorMessage {
            body: Some(coordinator_message::Body::Command(
                model::Command {
                    id: command_id.clone(),
                    set_id: set_id.to_owned(),
                    order,
                }
                .into(),
            )),
        };
        if outbound.try_send(Ok(message)).is_err() {
            self.lock().remove(&command_id);
            return Err(offline());
        }
        Ok(Call {
            agent: agent.to_owned(),
            step,
            replies: rx,
        })
    }

    /// A `CommandResult` arrived on `session_id`.
    pub fn complete(&self, session_id: &str, result: CommandResult) {
        let mut pending = self.lock();
        if pending
            .get(&result.command_id)
            .is_some_and(|p| p.session_id == session_id)
            && let Some(call) = pending.remove(&result.command_id)
        {
            let _ = call.replies.send(Answer::Done(result));
        }
    }

    /// A `Progress` arrived on `session_id`.
    pub fn progress(&self, session_id: &str, progress: aitbc_backup_proto::Progress) {
        if let Some(call) = self.lock().get(&progress.command_id)
            && call.session_id == session_id
        {
            let _ = call.replies.send(Answer::Progress((&progress).into()));
        }
    }

    /// The session ended: its calls fail now.
    pub fn session_closed(&self, session_id: &str) {
        self.lock().retain(|_, call| call.session_id != session_id);
    }
}

impl Call {
    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// Waits for the result, passing progress to `on_progress`.
    pub async fn finish(
        mut self,
        deadline: Duration,
        mut on_progress: impl FnMut(Progress),
    ) -> Result<Done, CallError> {
        let waiting = async {
            loop {
                match self.replies.recv().await {
                    Some(Answer::Progress(progress)) => on_progress(progress),
                    Some(Answer::Done(result)) => return Some(result),
                    None => return None,
                }
            }
        };
        match tokio::time::timeout(deadline, waiting).await {
            Err(_) => Err(CallError::Timeout {
                agent: self.agent,
                step: self.step,
                deadline,
            }),
            Ok(None) => Err(CallError::Disconnected {
                agent: self.agent,
                step: self.step,
            }),
            Ok(Some(result)) => match Reply::from_proto(self.step, result) {
                Ok(Reply::Done(done)) => Ok(done),
                Ok(Reply::Failed(message)) => Err(CallError::Failed {
                    agent: self.agent,
                    step: self.step,
                    message,
                }),
                Err(error) => Err(CallError::Invalid {
                    agent: self.agent,
                    step: self.step,
                    error,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use aitbc_backup_proto::model::{Component, Uploaded};

    use super::*;
    use crate::testing;

    const DEADLINE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_result_is_read_for_the_step_the_call_asked_for() {
        let sets = testing::sets();
        // An agent that answers every step as if it were an upload without a manifest.
        let _agent = testing::agent(&sets, "redis-0", Component::Redis, |_| {
            Reply::Done(Done::Uploaded(Uploaded {
                manifest_id: String::new(),
                report_json: String::new(),
                bytes_read: 1,
                bytes_stored: 1,
            }))
        });
        let call = |order| sets.calls.start(&sets.fleet, "redis-0", "set-1", order);
        let upload = Order::Upload {
            name: None,
            full_scan: false,
        };
        let err = call(upload)
            .expect("sent")
            .finish(DEADLINE, |_| {})
            .await
            .expect_err("an upload without a manifest");
        let CallError::Invalid { agent, step, error } = &err else {
            panic!("{err:?}");
        };
        assert_eq!((agent.as_str(), *step), ("redis-0", Step::Upload));
        assert_eq!(error.field, "result.manifest_id");
        assert!(err.to_string().contains("result.manifest_id"), "{err}");
        // The same answer to a prepare is a prepare's success: a step reads its own fields.
        let done = call(Order::Prepare)
            .expect("sent")
            .finish(DEADLINE, |_| {})
            .await
            .expect("prepared");
        assert_eq!(done, Done::Prepared);
    }

    #[tokio::test]
    async fn a_call_to_an_agent_not_connected_names_agent_and_step() {
        let sets = testing::sets();
        let err = sets
            .calls
            .start(&sets.fleet, "ghost", "set-1", Order::Fence)
            .err()
            .expect("offline");
        assert_eq!(
            err,
            CallError::Offline {
                agent: "ghost".to_owned(),
                step: Step::Fence,
            }
        );
        assert_eq!(err.to_string(), "agent `ghost` is not connected");
    }
}
