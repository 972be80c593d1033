//! What a running set tells whoever watches it: its protocol [`Phase`]s and the [`SetEvent`]s
//! of one set, as domain types. The operator service turns them into `SnapshotEvent`s.

use std::fmt;
use std::sync::Arc;

use aitbc_backup_proto::model::Step;

use super::error::SetError;
use crate::calls::Progress;
use crate::catalog::SetRecord;

/// The phases of the snapshot-set protocol, in order (fence in fenced mode only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Prepare,
    Fence,
    Cut,
    Upload,
    Commit,
}

impl Phase {
    /// The phase an agent's step belongs to (abort and restore are no phase of a set).
    pub fn of(step: Step) -> Option<Phase> {
        match step {
            Step::Prepare => Some(Phase::Prepare),
            Step::Fence => Some(Phase::Fence),
            Step::Cut => Some(Phase::Cut),
            Step::Upload => Some(Phase::Upload),
            Step::Abort | Step::Restore => None,
        }
    }

    /// The phase's name, as events and logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Fence => "fence",
            Phase::Cut => "cut",
            Phase::Upload => "upload",
            Phase::Commit => "commit",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of a running set.
#[derive(Debug, Clone)]
pub enum SetEvent {
    /// The set waits for these earlier sets sharing its agents to end.
    Queued { ahead: Vec<String> },
    /// A phase's step went to `agent`.
    Step { agent: String, step: Step },
    /// `agent` reported progress in `step` (uploads).
    Progress {
        agent: String,
        step: Step,
        progress: Progress,
    },
    /// Every agent uploaded: the set manifest is being written.
    Commit,
    /// The last event: the set is stored.
    Committed(SetRecord),
    /// The last event: the set aborted, and why.
    Aborted {
        set: SetRecord,
        error: Arc<SetError>,
    },
}

impl SetEvent {
    /// The event's phase name on the wire (`SnapshotEvent.phase`).
    pub fn name(&self) -> &'static str {
        match self {
            SetEvent::Queued { .. } => "queued",
            SetEvent::Step { step, .. } | SetEvent::Progress { step, .. } => step.as_str(),
            SetEvent::Commit => Phase::Commit.as_str(),
            SetEvent::Committed(_) => "committed",
            SetEvent::Aborted { .. } => "aborted",
        }
    }

    /// The set, on the last event.
    pub fn set(&self) -> Option<&SetRecord> {
        match self {
            SetEvent::Committed(set) | SetEvent::Aborted { set, .. } => Some(set),
            _ => None,
        }
    }
}
