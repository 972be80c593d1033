//! The executor against a small test component: it drives any component through the contract,
//! in order, lets fenced writers go when a set ends early, and refuses commands out of order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aitbc_backup_proto::{AgentMessage, Command, agent_message, command};
use aitbc_backup_repository::backup::Label;
use aitbc_backup_repository::manifest::ComponentManifest;
use aitbc_backup_repository::{Progress, Repository};
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Executor;
use crate::AgentConfig;
use crate::component::{self, RestoreRequest, Uploaded};

/// What the test component was asked to do, in order.
type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, what: &str) {
    log.lock().expect("log").push(what.to_owned());
}

struct TestComponent(Log);
struct TestPrepared(Log);
struct TestCut(Log, Instant);

impl component::Component for TestComponent {
    fn prepare<'a>(
        &'a self,
        set_id: Option<&'a str>,
    ) -> BoxFuture<'a, anyhow::Result<Box<dyn component::Prepared>>> {
        Box::pin(async move {
            note(&self.0, &format!("prepare {}", set_id.unwrap_or("-")));
            Ok(Box::new(TestPrepared(self.0.clone())) as Box<dyn component::Prepared>)
        })
    }

    fn restore<'a>(
        &'a self,
        _repo: &'a Repository,
        _manifest: &'a ComponentManifest,
        _request: RestoreRequest,
        _progress: Arc<Progress>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<serde_json::Value>> {
        Box::pin(async { anyhow::bail!("the test component does not restore") })
    }
}

impl component::Prepared for TestPrepared {
    fn fence(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Prepared>>> {
        Box::pin(async move {
            note(&self.0, "fence");
            Ok(self as Box<dyn component::Prepared>)
        })
    }

    fn cut(
        self: Box<Self>,
        _when: Option<Instant>,
    ) -> BoxFuture<'static, anyhow::Result<Box<dyn component::Cut>>> {
        Box::pin(async move {
            note(&self.0, "cut");
            Ok(Box::new(TestCut(self.0.clone(), Instant::now())) as Box<dyn component::Cut>)
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { note(&self.0, "abort prepared") })
    }
}

impl component::Cut for TestCut {
    fn at(&self) -> Instant {
        self.1
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, anyhow::Result<component::Released>> {
        Box::pin(async move {
            note(&self.0, "release");
            Ok((
                self as Box<dyn component::Cut>,
                Some(Duration::from_millis(7)),
            ))
        })
    }

    fn upload<'a>(
        self: Box<Self>,
        _repo: &'a Repository,
        label: &'a Label,
        full_scan: bool,
        _progress: Arc<Progress>,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Uploaded>> {
        Box::pin(async move {
            note(&self.0, &format!("upload {} {full_scan}", label.name));
            Ok(Uploaded {
                manifest_id: "manifest-1".into(),
                report: serde_json::json!({"manifest": "manifest-1"}),
            })
        })
    }
}

/// An executor over the test component, its config's repository a new local one in `dir`;
/// the receiver of its messages.
async fn start_executor(
    dir: &std::path::Path,
    log: &Log,
) -> (Executor, mpsc::Receiver<AgentMessage>) {
    let (url, _) = crate::testing::local_repository(dir).await;
    let mut config = AgentConfig::default();
    config.repository.url = url;
    let (tx, out) = mpsc::channel(16);
    let executor = Executor::new(
        Arc::new(config),
        Arc::new(TestComponent(log.clone())),
        tx,
        CancellationToken::new(),
    );
    (executor, out)
}

fn send(executor: &mut Executor, id: &str, action: command::Action) {
    executor.dispatch(Command {
        command_id: id.into(),
        set_id: "set-1".into(),
        action: Some(action),
    });
}

/// The next command result: (command id, error).
async fn next(out: &mut mpsc::Receiver<AgentMessage>) -> (String, String, u64) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), out.recv())
            .await
            .expect("a result in time")
            .expect("the executor is alive");
        if let Some(agent_message::Body::Result(result)) = message.body {
            return (result.command_id, result.error, result.pause_micros);
        }
    }
}

#[tokio::test]
async fn the_executor_drives_a_component_through_the_contract_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let log = Log::default();
    let (mut executor, mut out) = start_executor(dir.path(), &log).await;
    use aitbc_backup_proto::{Cut, Fence, Prepare, Upload};
    send(&mut executor, "1", command::Action::Prepare(Prepare {}));
    assert_eq!(next(&mut out).await.1, "");
    send(&mut executor, "2", command::Action::Fence(Fence {}));
    assert_eq!(next(&mut out).await.1, "");
    send(
        &mut executor,
        "3",
        command::Action::Cut(Cut {
            release: true,
            at_unix_micros: 0,
        }),
    );
    let (id, error, pause) = next(&mut out).await;
    assert_eq!((id.as_str(), error.as_str(), pause), ("3", "", 7000));
    send(
        &mut executor,
        "4",
        command::Action::Upload(Upload {
            name: "daily".into(),
            full_scan: true,
        }),
    );
    assert_eq!(next(&mut out).await.1, "");
    executor.shutdown().await;
    assert_eq!(
        *log.lock().expect("log"),
        [
            "prepare set-1",
            "fence",
            "cut",
            "release",
            "upload daily true"
        ]
    );
}

#[tokio::test]
async fn a_set_ended_early_lets_fenced_writers_go_and_commands_out_of_order_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let log = Log::default();
    let (mut executor, mut out) = start_executor(dir.path(), &log).await;
    use aitbc_backup_proto::{Fence, Prepare, Upload};
    // Upload before anything is cut: refused, naming where the set stands.
    send(
        &mut executor,
        "1",
        command::Action::Upload(Upload {
            name: String::new(),
            full_scan: false,
        }),
    );
    let (_, error, _) = next(&mut out).await;
    assert!(error.contains("`upload` is not possible now"), "{error}");

    // A fenced set whose session ends before the cut: the fence is given up.
    let (mut executor, mut out) = start_executor(&dir.path().join("second"), &log).await;
    send(&mut executor, "2", command::Action::Prepare(Prepare {}));
    assert_eq!(next(&mut out).await.1, "");
    send(&mut executor, "3", command::Action::Fence(Fence {}));
    assert_eq!(next(&mut out).await.1, "");
    executor.shutdown().await;
    assert_eq!(
        *log.lock().expect("log"),
        ["prepare set-1", "fence", "abort prepared"]
    );
}
