//! In-process fixtures for the coordinator's unit tests: a [`Sets`] with no repository behind
//! it and agents played by tasks that answer commands as a test says.

use std::sync::Arc;
use std::time::Duration;

use aitbc_backup_config::settings::RepositorySettings;
use aitbc_backup_proto::coordinator_message::Body;
use aitbc_backup_proto::model::{self, Component, Registration, Reply};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::calls::Calls;
use crate::catalog::{Catalog, RepoHandle};
use crate::config::SnapshotSettings;
use crate::fleet::Fleet;
use crate::snapshot::Sets;

/// Sets with an empty fleet and catalog; the repository is never opened.
pub fn sets() -> Arc<Sets> {
    let metrics = crate::metrics::Metrics::register(&mut Registry::default());
    Arc::new(Sets {
        fleet: Arc::new(Fleet::new(Duration::from_secs(60), metrics.clone())),
        calls: Arc::new(Calls::default()),
        catalog: Arc::new(Catalog::default()),
        repo: Arc::new(RepoHandle::new(RepositorySettings::default())),
        settings: SnapshotSettings::default(),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        loaded: tokio::sync::OnceCell::new(),
        metrics,
        queue: Default::default(),
    })
}

/// Connects agent `name` and answers every command it gets with `answer`; the commands it got
/// arrive on the returned receiver (read as the agent reads them: validated on receipt).
pub fn agent(
    sets: &Sets,
    name: &str,
    component: Component,
    answer: impl Fn(&model::Command) -> Reply + Send + 'static,
) -> mpsc::UnboundedReceiver<model::Command> {
    let (tx, mut rx) = mpsc::channel(16);
    let ticket = sets.fleet.connect(
        Registration {
            name: name.to_owned(),
            component,
            version: "test".to_owned(),
            host: "localhost".to_owned(),
        },
        None,
        &sets.shutdown,
        tx,
    );
    let (seen, commands) = mpsc::unbounded_channel();
    let calls = sets.calls.clone();
    tokio::spawn(async move {
        while let Some(Ok(message)) = rx.recv().await {
            let Some(Body::Command(wire)) = message.body else {
                continue;
            };
            let command = model::Command::try_from(wire).expect("a valid command");
            let result = answer(&command).into_proto(command.id.clone());
            let _ = seen.send(command);
            calls.complete(&ticket.session_id, result);
        }
    });
    commands
}
