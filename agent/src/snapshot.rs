//! Commands from the coordinator: one task per set (or restore) runs that set's commands in
//! order against the component and answers each with a `CommandResult`. An `Abort`, or the end
//! of the session, cancels the set's task wherever it is: fences are released, an upload in
//! flight stops before committing, nothing is left held.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use aitbc_backup_proto::model::RepoKey;
use aitbc_backup_proto::{
    AgentMessage, CommandResult, Progress as ProgressMessage, agent_message, command,
};
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::{Progress, Repository};
use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::AgentConfig;
use crate::component::{self, Component, Cut, Prepared, RestoreRequest, RestoreTarget};

/// How often a running upload or restore reports its bytes.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Commands queued for one set before the coordinator counts as misbehaving.
const SET_QUEUE: usize = 8;

/// Routes the session's commands to their sets' tasks.
pub struct Executor {
    config: Arc<AgentConfig>,
    component: Arc<dyn Component>,
    out: mpsc::Sender<AgentMessage>,
    sets: HashMap<String, SetHandle>,
    /// The session's token: its end cancels every set.
    cancel: CancellationToken,
    tasks: TaskTracker,
}

struct SetHandle {
    commands: mpsc::Sender<aitbc_backup_proto::Command>,
    cancel: CancellationToken,
}

impl Executor {
    pub fn new(
        config: Arc<AgentConfig>,
        component: Arc<dyn Component>,
        out: mpsc::Sender<AgentMessage>,
        cancel: CancellationToken,
    ) -> Executor {
        Executor {
            config,
            component,
            out,
            sets: HashMap::new(),
            cancel,
            tasks: TaskTracker::new(),
        }
    }

    /// Hands a command to its set's task, starting the task for a new set.
    pub fn dispatch(&mut self, command: aitbc_backup_proto::Command) {
        self.sets.retain(|_, set| !set.commands.is_closed());
        if let Some(command::Action::Abort(abort)) = &command.action {
            match self.sets.remove(&command.set_id) {
                Some(set) => {
                    tracing::info!(set = %command.set_id, reason = %abort.reason, "set aborted by the coordinator");
                    set.cancel.cancel();
                }
                None => {
                    tracing::debug!(set = %command.set_id, "abort of a set this agent does not hold")
                }
            }
            // Answered at once: the set's task cleans up on its own.
            let _ = self
                .out
                .try_send(result(&command.command_id, Ok(Done::default())));
            return;
        }
        let set = self.sets.entry(command.set_id.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(SET_QUEUE);
            let cancel = self.cancel.child_token();
            let task = SetTask {
                config: self.config.clone(),
                component: self.component.clone(),
                out: self.out.clone(),
                cancel: cancel.clone(),
                stage: Stage::Idle,
                repo: None,
            };
            let span = tracing::info_span!("set", set = %command.set_id);
            self.tasks.spawn(task.run(rx).instrument(span));
            SetHandle {
                commands: tx,
                cancel,
            }
        });
        if let Err(err) = set.commands.try_send(command) {
            let command = err.into_inner();
            let _ = self.out.try_send(result(
                &command.command_id,
                Err(anyhow::anyhow!(
                    "the agent is busy with set {}",
                    command.set_id
                )),
            ));
        }
    }

    /// Cancels every set and waits for their tasks (fences released, uploads stopped).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Where a set stands on this agent.
enum Stage {
    Idle,
    Prepared(Box<dyn Prepared>),
    Cut(Box<dyn Cut>),
    /// Uploaded, restored or failed: nothing held.
    Finished,
}

/// What a successful command reports beyond success.
#[derive(Default)]
struct Done {
    at: Option<SystemTime>,
    released_at: Option<SystemTime>,
    pause: Option<Duration>,
    manifest_id: String,
    report: Option<serde_json::Value>,
    bytes_read: u64,
    bytes_stored: u64,
}

struct SetTask {
    config: Arc<AgentConfig>,
    component: Arc<dyn Component>,
    out: mpsc::Sender<AgentMessage>,
    cancel: CancellationToken,
    stage: Stage,
    repo: Option<Repository>,
}

impl SetTask {
    async fn run(mut self, mut commands: mpsc::Receiver<aitbc_backup_proto::Command>) {
        loop {
            let command = tokio::select! {
                _ = self.cancel.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => break,
                },
            };
            let id = command.command_id.clone();
            // Cancelling drops the step's state mid-way; fences held in it end by drop
            // (PostgreSQL, SQLite) or at the server's own deadline (Redis CLIENT PAUSE).
            let cancel = self.cancel.clone();
            let outcome = tokio::select! {
                _ = cancel.cancelled() => Err(anyhow::anyhow!("set aborted")),
                outcome = self.execute(command) => outcome,
            };
            if let Err(err) = &outcome {
                tracing::warn!(command = %id, error = %format!("{err:#}"), "command failed");
            }
            let failed = outcome.is_err();
            if self.out.send(result(&id, outcome)).await.is_err() || failed {
                break;
            }
            if matches!(self.stage, Stage::Finished) {
                break;
            }
        }
        // Whatever is still held goes now.
        match std::mem::replace(&mut self.stage, Stage::Finished) {
            Stage::Prepared(prepared) => prepared.abort().await,
            Stage::Cut(cut) => cut.abort().await,
            Stage::Idle | Stage::Finished => {}
        }
    }

    async fn execute(&mut self, command: aitbc_backup_proto::Command) -> anyhow::Result<Done> {
        use command::Action;
        let action = command
            .action
            .ok_or_else(|| anyhow::anyhow!("a command without an action"))?;
        let stage = std::mem::replace(&mut self.stage, Stage::Finished);
        match (action, stage) {
            (Action::Prepare(_), Stage::Idle) => {
                self.repo = Some(component::open_repository(&self.config, &self.cancel).await?);
                self.stage = Stage::Prepared(self.component.prepare(Some(&command.set_id)).await?);
                Ok(Done::default())
            }
            (Action::Fence(_), Stage::Prepared(prepared)) => {
                self.stage = Stage::Prepared(prepared.fence().await?);
                Ok(Done {
                    at: Some(SystemTime::now()),
                    ..Done::default()
                })
            }
            (Action::Cut(request), Stage::Prepared(prepared)) => {
                let cut = prepared.cut(instant_of(request.at_unix_micros)).await?;
                let at = Some(wall_clock(cut.at()));
                if !request.release {
                    self.stage = Stage::Cut(cut);
                    return Ok(Done {
                        at,
                        ..Done::default()
                    });
                }
                let (cut, pause) = cut.release().await?;
                self.stage = Stage::Cut(cut);
                Ok(Done {
                    at,
                    released_at: pause.map(|_| SystemTime::now()),
                    pause,
                    ..Done::default()
                })
            }
            (Action::Upload(upload), Stage::Cut(cut)) => {
                let repo = self
                    .repo
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("no repository open"))?;
                let progress = Arc::new(Progress::default());
                let label = Label {
                    name: if upload.name.is_empty() {
                        self.config.backup_name()
                    } else {
                        upload.name
                    },
                    set_id: command.set_id.clone(),
                };
                let uploading = cut.upload(
                    &repo,
                    &label,
                    upload.full_scan,
                    progress.clone(),
                    &self.cancel,
                );
                let uploaded = with_progress(
                    &self.out,
                    &command.command_id,
                    "upload",
                    &progress,
                    uploading,
                )
                .await?;
                Ok(Done {
                    manifest_id: uploaded.manifest_id,
                    report: Some(uploaded.report),
                    bytes_read: progress.bytes_read.load(Relaxed)
                        + progress.bytes_reused.load(Relaxed),
                    bytes_stored: progress.bytes_stored.load(Relaxed),
                    ..Done::default()
                })
            }
            (Action::Restore(restore), Stage::Idle) => {
                let nonempty = |s: String| (!s.is_empty()).then_some(s);
                // A trial restores into scratch targets: the targets given are ignored.
                let target = if restore.trial {
                    RestoreTarget::Own
                } else {
                    RestoreTarget::from_parts(
                        nonempty(restore.target_dir).map(Into::into),
                        nonempty(restore.target_url),
                    )?
                };
                let request = RestoreRequest {
                    target,
                    force: restore.force,
                    trial: restore.trial,
                    ..RestoreRequest::default()
                };
                let key = RepoKey::from_proto("command.restore.key", restore.key)?;
                let repo = component::open_repository(&self.config, &self.cancel).await?;
                // The operator's key lives in this command only (memory, never logged): a
                // sealed repository's data opens with nothing the agent holds.
                let repo = match key {
                    Some(key) => repo
                        .with_key(&key_secret(key), &self.cancel)
                        .await
                        .context("open the repository with the operator's key")?,
                    None => repo,
                };
                let progress = Arc::new(Progress::default());
                let restoring = Box::pin(component::restore(
                    self.component.as_ref(),
                    &repo,
                    &restore.manifest_id,
                    request,
                    progress.clone(),
                    &self.cancel,
                ));
                let report = with_progress(
                    &self.out,
                    &command.command_id,
                    "restore",
                    &progress,
                    restoring,
                )
                .await?;
                Ok(Done {
                    report: Some(report),
                    ..Done::default()
                })
            }
            (action, stage) => {
                let wanted = action.name();
                let at = stage_name(&stage);
                self.stage = stage;
                Err(anyhow::anyhow!(
                    "`{wanted}` is not possible now: the set is {at}"
                ))
            }
        }
    }
}

/// Runs `work`, sending the progress counters up every [`PROGRESS_INTERVAL`].
async fn with_progress<T>(
    out: &mpsc::Sender<AgentMessage>,
    command_id: &str,
    phase: &str,
    progress: &Progress,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let mut work = std::pin::pin!(work);
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    ticker.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => {
                let message = AgentMessage {
                    body: Some(agent_message::Body::Progress(ProgressMessage {
                        command_id: command_id.to_owned(),
                        phase: phase.to_owned(),
                        bytes_read: progress.bytes_read.load(Relaxed)
                            + progress.bytes_reused.load(Relaxed),
                        bytes_stored: progress.bytes_stored.load(Relaxed),
                    })),
                };
                // Progress is advisory: never wait for a slow session.
                let _ = out.try_send(message);
            }
        }
    }
}

fn stage_name(stage: &Stage) -> &'static str {
    match stage {
        Stage::Idle => "not prepared",
        Stage::Prepared(_) => "prepared (not cut)",
        Stage::Cut(_) => "cut",
        Stage::Finished => "finished",
    }
}

/// The wall-clock time of a monotonic instant in the past.
fn wall_clock(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

/// The monotonic instant of a wall-clock time given in microseconds since the epoch; None for
/// 0, for the past, or for more than `MAX_CUT_DELAY` ahead (a clock far off cuts at once).
fn instant_of(unix_micros: i64) -> Option<Instant> {
    const MAX_CUT_DELAY: Duration = Duration::from_secs(1);
    let target = SystemTime::UNIX_EPOCH + Duration::from_micros(u64::try_from(unix_micros).ok()?);
    let ahead = target.duration_since(SystemTime::now()).ok()?;
    (ahead <= MAX_CUT_DELAY).then(|| Instant::now() + ahead)
}

fn micros(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn result(command_id: &str, outcome: anyhow::Result<Done>) -> AgentMessage {
    let result = match outcome {
        Ok(done) => CommandResult {
            command_id: command_id.to_owned(),
            error: String::new(),
            at_unix_micros: done.at.map(micros).unwrap_or(0),
            pause_micros: done.pause.map(|p| p.as_micros() as u64).unwrap_or(0),
            manifest_id: done.manifest_id,
            report_json: done.report.map(|r| r.to_string()).unwrap_or_default(),
            bytes_read: done.bytes_read,
            bytes_stored: done.bytes_stored,
            released_at_unix_micros: done.released_at.map(micros).unwrap_or(0),
        },
        Err(err) => CommandResult {
            command_id: command_id.to_owned(),
            error: format!("{err:#}"),
            ..CommandResult::default()
        },
    };
    AgentMessage {
        body: Some(agent_message::Body::Result(result)),
    }
}

#[cfg(test)]
mod tests;

/// The repository library's form of an operator's key.
fn key_secret(key: RepoKey) -> aitbc_backup_repository::KeySecret {
    match key {
        RepoKey::Passphrase(p) => aitbc_backup_repository::KeySecret::Passphrase(p),
        RepoKey::KeyFile(bytes) => aitbc_backup_repository::KeySecret::KeyFile(bytes),
    }
}
