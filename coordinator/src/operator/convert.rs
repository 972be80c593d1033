//! The operator service's edge: domain types to the generated messages, and the coordinator's
//! errors to gRPC statuses, in one place. Nothing behind this module returns a `Status` or builds
//! an operator message.

use std::time::SystemTime;

use aitbc_backup_proto::{
    Agent, AgentState, RestoreEvent, Snapshot, SnapshotComponent, SnapshotEvent, SnapshotState,
};
use tonic::Status;

use crate::catalog::{SetRecord, SetState};
use crate::fleet::{AgentView, Liveness};
use crate::restore::{self, RestoreError};
use crate::snapshot::{SetEvent, StartError};
use crate::stored::CatalogError;

/// The set as `GetSnapshot`, `ListSnapshots` and the last `SnapshotEvent` show it.
pub fn snapshot(record: &SetRecord) -> Snapshot {
    Snapshot {
        id: record.id.clone(),
        policy: record.policy.clone(),
        created: chrono::DateTime::parse_from_rfc3339(&record.created)
            .ok()
            .map(|t| prost_types::Timestamp::from(SystemTime::from(t))),
        mode: record.mode.to_proto() as i32,
        state: match record.state {
            SetState::Running => SnapshotState::Running,
            SetState::Committed => SnapshotState::Committed,
            SetState::Aborted => SnapshotState::Aborted,
        } as i32,
        components: record
            .components
            .iter()
            .map(|c| SnapshotComponent {
                agent: c.agent.clone(),
                component: c.component.to_proto() as i32,
                manifest_id: c.manifest_id.clone(),
                consistency_json: c
                    .consistency
                    .as_ref()
                    .and_then(|p| serde_json::to_string(p).ok())
                    .unwrap_or_default(),
                bytes_read: c.bytes_read,
                bytes_stored: c.bytes_stored,
            })
            .collect(),
        cut_skew_ms: record.cut_skew_ms,
        write_pause_ms: record.write_pause_ms,
        pinned: record.pinned,
        abort_reason: record.abort_reason.clone(),
    }
}

/// The first event of `CreateSnapshot`; its message names the sets it waits for, if any.
pub fn started(set_id: String, queued_behind: &[String]) -> SnapshotEvent {
    SnapshotEvent {
        set_id,
        phase: "started".to_owned(),
        message: if queued_behind.is_empty() {
            String::new()
        } else {
            crate::snapshot::queue::waiting_message(queued_behind)
        },
        ..SnapshotEvent::default()
    }
}

/// A set's event as `CreateSnapshot` streams it.
pub fn snapshot_event(set_id: &str, event: SetEvent) -> SnapshotEvent {
    let mut out = SnapshotEvent {
        set_id: set_id.to_owned(),
        phase: event.name().to_owned(),
        snapshot: event.set().map(snapshot),
        ..SnapshotEvent::default()
    };
    match event {
        SetEvent::Queued { ahead } => {
            out.message = crate::snapshot::queue::waiting_message(&ahead);
        }
        SetEvent::Step { agent, .. } => out.agent = agent,
        SetEvent::Progress {
            agent, progress, ..
        } => {
            out.agent = agent;
            out.bytes_read = progress.bytes_read;
            out.bytes_stored = progress.bytes_stored;
        }
        SetEvent::Aborted { error, .. } => out.message = error.to_string(),
        SetEvent::Commit | SetEvent::Committed(_) => {}
    }
    out
}

/// A restore's event as `RestoreSnapshot` streams it.
pub fn restore_event(set_id: &str, event: restore::RestoreEvent) -> RestoreEvent {
    let base = |component: aitbc_backup_proto::model::Component, agent: String, phase: &str| {
        RestoreEvent {
            set_id: set_id.to_owned(),
            component: component.to_proto() as i32,
            agent,
            phase: phase.to_owned(),
            ..RestoreEvent::default()
        }
    };
    match event {
        restore::RestoreEvent::Restoring { component, agent } => base(component, agent, "restore"),
        restore::RestoreEvent::Verified {
            component,
            agent,
            report_json,
            seconds,
        } => RestoreEvent {
            report_json,
            seconds,
            ..base(component, agent, "verified")
        },
        restore::RestoreEvent::Failed {
            component,
            agent,
            error,
            seconds,
        } => RestoreEvent {
            error: error.to_string(),
            seconds,
            ..base(component, agent.unwrap_or_default(), "failed")
        },
        restore::RestoreEvent::Done => RestoreEvent {
            set_id: set_id.to_owned(),
            phase: "done".to_owned(),
            ..RestoreEvent::default()
        },
    }
}

pub fn agent(view: AgentView) -> Agent {
    Agent {
        name: view.name,
        component: view.component.to_proto() as i32,
        version: view.version,
        host: view.host,
        state: match view.liveness {
            Liveness::Online => AgentState::Online,
            Liveness::Offline => AgentState::Offline,
        } as i32,
        last_seen: Some(prost_types::Timestamp::from(view.last_seen)),
        connected_since: Some(prost_types::Timestamp::from(view.connected_since)),
        session_id: view.session_id,
        peer_address: view.peer_address.map(|a| a.to_string()).unwrap_or_default(),
    }
}

impl From<CatalogError> for Status {
    /// Storage is unreachable: the call may be retried.
    fn from(err: CatalogError) -> Self {
        Status::unavailable(err.to_string())
    }
}

impl From<StartError> for Status {
    fn from(err: StartError) -> Self {
        Status::failed_precondition(err.to_string())
    }
}

impl From<RestoreError> for Status {
    fn from(err: RestoreError) -> Self {
        match err {
            RestoreError::NotFound(_) => Status::not_found(err.to_string()),
            RestoreError::NotCommitted(..) | RestoreError::NoComponent { .. } => {
                Status::failed_precondition(err.to_string())
            }
        }
    }
}
