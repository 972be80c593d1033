//! Why a snapshot set aborted, typed: the abort reason recorded in the catalog, the attempt
//! record and the `aborted` event is this error's `Display`, which names the agent and the
//! step whenever one of them is the cause; code that needs to know asks [`SetError::agent`] and
//! [`SetError::phase`] instead of reading the text.

use aitbc_backup_repository::RepoError;

use super::event::Phase;
use crate::calls::CallError;

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The repository could not be opened (the message names it).
    #[error("{0:#}")]
    Repository(anyhow::Error),
    #[error("record the attempt: {0}")]
    RecordAttempt(RepoError),
    /// An agent failed a step, answered it wrongly, missed its deadline or went away.
    #[error(transparent)]
    Agent(#[from] CallError),
    /// The component manifest an agent reported cannot be read back.
    #[error("agent `{agent}` reported manifest {manifest_id}: {source}")]
    Manifest {
        agent: String,
        manifest_id: String,
        source: RepoError,
    },
    #[error("commit the set manifest: {0}")]
    Commit(RepoError),
}

impl SetError {
    /// The agent that caused the abort, if one did.
    pub fn agent(&self) -> Option<&str> {
        match self {
            SetError::Agent(err) => Some(err.agent()),
            SetError::Manifest { agent, .. } => Some(agent),
            _ => None,
        }
    }

    /// The protocol phase the set aborted in, if it had begun one.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            SetError::Agent(err) => Phase::of(err.step()),
            SetError::Manifest { .. } | SetError::Commit(_) => Some(Phase::Commit),
            SetError::ShuttingDown | SetError::Repository(_) | SetError::RecordAttempt(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aitbc_backup_proto::model::{ProtocolError, Step};

    use super::*;

    #[test]
    fn an_agent_failure_names_the_agent_and_the_phase() {
        let cases = [
            (
                CallError::Failed {
                    agent: "ledger".into(),
                    step: Step::Upload,
                    message: "disk full".into(),
                },
                Phase::Upload,
                "agent `ledger` failed upload: disk full",
            ),
            (
                CallError::Disconnected {
                    agent: "ledger".into(),
                    step: Step::Upload,
                },
                Phase::Upload,
                "agent `ledger` disconnected during upload",
            ),
            (
                CallError::Timeout {
                    agent: "pg-0".into(),
                    step: Step::Fence,
                    deadline: Duration::from_secs(10),
                },
                Phase::Fence,
                "agent `pg-0` did not finish fence within 10s",
            ),
            (
                CallError::Invalid {
                    agent: "redis-0".into(),
                    step: Step::Upload,
                    error: ProtocolError::new("result.manifest_id", "is empty"),
                },
                Phase::Upload,
                "agent `redis-0` answered upload with an invalid result: result.manifest_id: is empty",
            ),
            (
                CallError::Offline {
                    agent: "redis-0".into(),
                    step: Step::Prepare,
                },
                Phase::Prepare,
                "agent `redis-0` is not connected",
            ),
        ];
        for (call, phase, text) in cases {
            let agent = call.agent().to_owned();
            let err = SetError::from(call);
            assert_eq!(err.to_string(), text);
            assert_eq!(err.agent(), Some(agent.as_str()));
            assert_eq!(err.phase(), Some(phase));
        }
    }

    #[test]
    fn commit_failures_are_in_the_commit_phase() {
        let err = SetError::Manifest {
            agent: "ledger".into(),
            manifest_id: "m-1".into(),
            source: RepoError::NoSuchManifest("m-1".into()),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("agent `ledger` reported manifest m-1: "),
            "{text}"
        );
        assert_eq!(err.agent(), Some("ledger"));
        assert_eq!(err.phase(), Some(Phase::Commit));
        let err = SetError::ShuttingDown;
        assert_eq!(err.to_string(), "the coordinator is shutting down");
        assert_eq!((err.agent(), err.phase()), (None, None));
    }
}
