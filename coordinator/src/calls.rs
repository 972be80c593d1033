//! Commands to agents and their answers. A call sends one `Command` down an agent's session and
//! waits for the `CommandResult` with the same id, passing `Progress` messages on meanwhile. A
//! call ends with an error naming the agent when the agent reports a failure, misses the
//! deadline, or its session ends (the pending entries of a closed session are dropped, which
//! wakes their callers).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aitbc_backup_proto::{
    Command, CommandResult, CoordinatorMessage, Progress, command, coordinator_message,
};
use tokio::sync::mpsc;

use crate::fleet::Fleet;

/// A call's failure, for people: it names the agent and the step.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("agent `{agent}` is not connected")]
    Offline { agent: String },
    #[error("agent `{agent}` disconnected during {step}")]
    Disconnected { agent: String, step: &'static str },
    #[error("agent `{agent}` did not finish {step} within {deadline:?}")]
    Timeout {
        agent: String,
        step: &'static str,
        deadline: Duration,
    },
    #[error("agent `{agent}` failed {step}: {message}")]
    Failed {
        agent: String,
        step: &'static str,
        message: String,
    },
}

enum Reply {
    Progress(Progress),
    Done(CommandResult),
}

struct Pending {
    session_id: String,
    replies: mpsc::UnboundedSender<Reply>,
}

/// Calls in flight, by command id.
#[derive(Default)]
pub struct Calls {
    pending: Mutex<HashMap<String, Pending>>,
}

/// One call in flight.
pub struct Call {
    agent: String,
    step: &'static str,
    replies: mpsc::UnboundedReceiver<Reply>,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `action` for `set_id` to `agent`.
    pub fn start(
        &self,
        fleet: &Fleet,
        agent: &str,
        set_id: &str,
        action: command::Action,
    ) -> Result<Call, CallError> {
        let step = action.name();
        let offline = || CallError::Offline {
            agent: agent.to_owned(),
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
            body: Some(coordinator_message::Body::Command(Command {
                command_id: command_id.clone(),
                set_id: set_id.to_owned(),
                action: Some(action),
            })),
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
            let _ = call.replies.send(Reply::Done(result));
        }
    }

    /// A `Progress` arrived on `session_id`.
    pub fn progress(&self, session_id: &str, progress: Progress) {
        if let Some(call) = self.lock().get(&progress.command_id)
            && call.session_id == session_id
        {
            let _ = call.replies.send(Reply::Progress(progress));
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

    /// Waits for the result, passing progress to `on_progress`.
    pub async fn finish(
        mut self,
        deadline: Duration,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<CommandResult, CallError> {
        let waiting = async {
            loop {
                match self.replies.recv().await {
                    Some(Reply::Progress(progress)) => on_progress(&progress),
                    Some(Reply::Done(result)) => return Some(result),
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
            Ok(Some(result)) if !result.error.is_empty() => Err(CallError::Failed {
                agent: self.agent,
                step: self.step,
                message: result.error,
            }),
            Ok(Some(result)) => Ok(result),
        }
    }
}
