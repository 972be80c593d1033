//! Commands down an agent session and their results, as domain types in front of the generated
//! `Command` and `CommandResult`.
//!
//! A [`Command`] is one [`Order`] for one set (or restore); the coordinator builds it and
//! converts it with `From` when it sends it, an agent reads it with `TryFrom` on receipt. The
//! answer is a [`Reply`]: [`Reply::from_proto`] reads a `CommandResult` knowing which [`Step`]
//! it answers, so each step's result carries exactly what that step reports and nothing past
//! the edge looks at a field the step does not set.

use std::fmt;

use super::ProtocolError;
use crate::command::Action;

/// The steps an agent performs, by name: those of a snapshot set and a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Prepare,
    Fence,
    Cut,
    Upload,
    Abort,
    Restore,
}

impl Step {
    pub const ALL: [Step; 6] = [
        Step::Prepare,
        Step::Fence,
        Step::Cut,
        Step::Upload,
        Step::Abort,
        Step::Restore,
    ];

    /// The step's name, as logs, events and errors say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::Fence => "fence",
            Step::Cut => "cut",
            Step::Upload => "upload",
            Step::Abort => "abort",
            Step::Restore => "restore",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Action {
    /// Which step the action asks for.
    pub fn step(&self) -> Step {
        match self {
            Action::Prepare(_) => Step::Prepare,
            Action::Fence(_) => Step::Fence,
            Action::Cut(_) => Step::Cut,
            Action::Upload(_) => Step::Upload,
            Action::Abort(_) => Step::Abort,
            Action::Restore(_) => Step::Restore,
        }
    }

    /// The step's name, as logs and errors say it.
    pub fn name(&self) -> &'static str {
        self.step().as_str()
    }
}

/// Where a restore writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// The agent's own server or directory, or the directory and URL given (either may be
    /// left to the agent's configuration).
    Live {
        dir: Option<String>,
        url: Option<String>,
    },
    /// A restore test: scratch targets, verified, then removed; the live component is not
    /// touched.
    Trial,
}

/// Restore one component manifest and verify it against its consistency point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOrder {
    pub manifest_id: String,
    pub target: RestoreTarget,
    /// Replace a non-empty directory, a database in use, or an existing dump.rdb.
    pub force: bool,
    /// The operator's key, for a repository whose data the agent cannot read itself.
    pub key: Option<crate::model::RepoKey>,
}

/// What a command asks of an agent, with the step's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Prepare,
    Fence,
    Cut {
        /// Fenced sets: let the writers go right after the cut.
        release: bool,
        /// When to cut, microseconds since the Unix epoch; `None`: at once.
        at_unix_micros: Option<i64>,
    },
    Upload {
        /// The component manifest's label; `None`: the agent's own.
        name: Option<String>,
        full_scan: bool,
    },
    Abort {
        reason: String,
    },
    Restore(RestoreOrder),
}

impl Order {
    pub fn step(&self) -> Step {
        match self {
            Order::Prepare => Step::Prepare,
            Order::Fence => Step::Fence,
            Order::Cut { .. } => Step::Cut,
            Order::Upload { .. } => Step::Upload,
            Order::Abort { .. } => Step::Abort,
            Order::Restore(_) => Step::Restore,
        }
    }
}

/// One command for one set (or restore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Unique per command; the reply and progress messages name it.
    pub id: String,
    pub set_id: String,
    pub order: Order,
}

fn nonempty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// An instant in microseconds since the Unix epoch; 0 means "not given".
fn instant(field: &'static str, micros: i64) -> Result<Option<i64>, ProtocolError> {
    match micros {
        0 => Ok(None),
        m if m < 0 => Err(ProtocolError::new(
            field,
            format!("is negative ({m} µs before 1970)"),
        )),
        m => Ok(Some(m)),
    }
}

impl From<Order> for Action {
    fn from(order: Order) -> Self {
        match order {
            Order::Prepare => Action::Prepare(crate::Prepare {}),
            Order::Fence => Action::Fence(crate::Fence {}),
            Order::Cut {
                release,
                at_unix_micros,
            } => Action::Cut(crate::Cut {
                release,
                at_unix_micros: at_unix_micros.unwrap_or(0),
            }),
            Order::Upload { name, full_scan } => Action::Upload(crate::Upload {
                name: name.unwrap_or_default(),
                full_scan,
            }),
            Order::Abort { reason } => Action::Abort(crate::Abort { reason }),
            Order::Restore(restore) => {
                let (dir, url, trial) = match restore.target {
                    RestoreTarget::Live { dir, url } => (dir, url, false),
                    RestoreTarget::Trial => (None, None, true),
                };
                Action::Restore(crate::Restore {
                    manifest_id: restore.manifest_id,
                    target_dir: dir.unwrap_or_default(),
                    target_url: url.unwrap_or_default(),
                    force: restore.force,
                    trial,
                    key: restore.key.map(Into::into),
                })
            }
        }
    }
}

impl TryFrom<Action> for Order {
    type Error = ProtocolError;

    fn try_from(action: Action) -> Result<Self, ProtocolError> {
        Ok(match action {
            Action::Prepare(_) => Order::Prepare,
            Action::Fence(_) => Order::Fence,
            Action::Cut(cut) => Order::Cut {
                release: cut.release,
                at_unix_micros: instant("command.cut.at_unix_micros", cut.at_unix_micros)?,
            },
            Action::Upload(upload) => Order::Upload {
                name: nonempty(upload.name),
                full_scan: upload.full_scan,
            },
            Action::Abort(abort) => Order::Abort {
                reason: abort.reason,
            },
            Action::Restore(restore) => {
                if restore.manifest_id.is_empty() {
                    return Err(ProtocolError::new(
                        "command.restore.manifest_id",
                        "is empty",
                    ));
                }
                Order::Restore(RestoreOrder {
                    manifest_id: restore.manifest_id,
                    // A trial ignores the targets (see the proto).
                    target: if restore.trial {
                        RestoreTarget::Trial
                    } else {
                        RestoreTarget::Live {
                            dir: nonempty(restore.target_dir),
                            url: nonempty(restore.target_url),
                        }
                    },
                    force: restore.force,
                    key: crate::model::RepoKey::from_proto("command.restore.key", restore.key)?,
                })
            }
        })
    }
}

impl From<Command> for crate::Command {
    fn from(command: Command) -> Self {
        crate::Command {
            command_id: command.id,
            set_id: command.set_id,
            action: Some(command.order.into()),
        }
    }
}

impl TryFrom<crate::Command> for Command {
    type Error = ProtocolError;

    fn try_from(msg: crate::Command) -> Result<Self, ProtocolError> {
        if msg.command_id.is_empty() {
            return Err(ProtocolError::new("command.command_id", "is empty"));
        }
        if msg.set_id.is_empty() {
            return Err(ProtocolError::new("command.set_id", "is empty"));
        }
        let action = msg
            .action
            .ok_or_else(|| ProtocolError::new("command.action", "is not set"))?;
        Ok(Command {
            id: msg.command_id,
            set_id: msg.set_id,
            order: action.try_into()?,
        })
    }
}

/// A fenced agent's writers came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// When the fence came down (the agent's clock), microseconds since the Unix epoch.
    pub at_unix_micros: i64,
    /// How long the writers were held.
    pub pause_micros: u64,
}

/// A component manifest an upload committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub manifest_id: String,
    /// The agent's report (component-specific JSON).
    pub report_json: String,
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

/// What a step that succeeded reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    Prepared,
    Fenced {
        /// When the fence went up (the agent's clock); `None` if the agent did not say.
        at_unix_micros: Option<i64>,
    },
    Cut {
        /// The cut instant (the agent's clock); `None` if the agent did not say.
        at_unix_micros: Option<i64>,
        /// Cut with release: when the writers came back.
        released: Option<Released>,
    },
    Uploaded(Uploaded),
    Aborted,
    Restored {
        /// The agent's restore report (component-specific JSON).
        report_json: String,
    },
}

impl Done {
    pub fn step(&self) -> Step {
        match self {
            Done::Prepared => Step::Prepare,
            Done::Fenced { .. } => Step::Fence,
            Done::Cut { .. } => Step::Cut,
            Done::Uploaded(_) => Step::Upload,
            Done::Aborted => Step::Abort,
            Done::Restored { .. } => Step::Restore,
        }
    }

    /// The instant a fence went up or a cut was taken.
    pub fn at_unix_micros(&self) -> Option<i64> {
        match self {
            Done::Fenced { at_unix_micros } | Done::Cut { at_unix_micros, .. } => *at_unix_micros,
            _ => None,
        }
    }
}

/// An agent's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done(Done),
    /// The step failed; what went wrong, for people.
    Failed(String),
}

impl Reply {
    /// Reads the `CommandResult` answering a `step` (the command id is the caller's to match).
    pub fn from_proto(step: Step, msg: crate::CommandResult) -> Result<Reply, ProtocolError> {
        if !msg.error.is_empty() {
            return Ok(Reply::Failed(msg.error));
        }
        let at = || instant("result.at_unix_micros", msg.at_unix_micros);
        let done = match step {
            Step::Prepare => Done::Prepared,
            Step::Fence => Done::Fenced {
                at_unix_micros: at()?,
            },
            Step::Cut => Done::Cut {
                at_unix_micros: at()?,
                released: instant(
                    "result.released_at_unix_micros",
                    msg.released_at_unix_micros,
                )?
                .map(|at_unix_micros| Released {
                    at_unix_micros,
                    pause_micros: msg.pause_micros,
                }),
            },
            Step::Upload => {
                if msg.manifest_id.is_empty() {
                    return Err(ProtocolError::new(
                        "result.manifest_id",
                        "is empty (an upload commits a component manifest)",
                    ));
                }
                Done::Uploaded(Uploaded {
                    manifest_id: msg.manifest_id,
                    report_json: msg.report_json,
                    bytes_read: msg.bytes_read,
                    bytes_stored: msg.bytes_stored,
                })
            }
            Step::Abort => Done::Aborted,
            Step::Restore => Done::Restored {
                report_json: msg.report_json,
            },
        };
        Ok(Reply::Done(done))
    }

    /// The `CommandResult` answering command `command_id`.
    pub fn into_proto(self, command_id: String) -> crate::CommandResult {
        let mut msg = crate::CommandResult {
            command_id,
            ..crate::CommandResult::default()
        };
        match self {
            Reply::Failed(error) => msg.error = error,
            Reply::Done(Done::Prepared | Done::Aborted) => {}
            Reply::Done(Done::Fenced { at_unix_micros }) => {
                msg.at_unix_micros = at_unix_micros.unwrap_or(0);
            }
            Reply::Done(Done::Cut {
                at_unix_micros,
                released,
            }) => {
                msg.at_unix_micros = at_unix_micros.unwrap_or(0);
                if let Some(released) = released {
                    msg.released_at_unix_micros = released.at_unix_micros;
                    msg.pause_micros = released.pause_micros;
                }
            }
            Reply::Done(Done::Uploaded(uploaded)) => {
                msg.manifest_id = uploaded.manifest_id;
                msg.report_json = uploaded.report_json;
                msg.bytes_read = uploaded.bytes_read;
                msg.bytes_stored = uploaded.bytes_stored;
            }
            Reply::Done(Done::Restored { report_json }) => msg.report_json = report_json,
        }
        msg
    }
}

#[cfg(test)]
mod tests;
