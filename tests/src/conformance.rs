//! The component contract, checked the same way for every component: one [`Subject`] per
//! component (PostgreSQL, Redis, the ledger) and one function per case, which
//! `tests/tests/conformance.rs` runs against each.
//!
//! The cases, all through the real binaries:
//! - [`backup_at_a_cut`]: two one-shot backups while a writer writes; each restores into a fresh
//!   target with exactly the content its manifest's cut names, and nothing written after it.
//! - [`fenced_cut`]: a fenced one-shot backup (where the component has one) and a fenced
//!   snapshot set of the component alone through a coordinator and its sidecar agent: writers
//!   paused for a bounded time, each restored (the set through `aitbc-backup restore`) to
//!   exactly its cut, and the set's trial restore leaving nothing behind.
//! - [`refused_restore`]: a restore into an occupied target without `--force` fails naming the
//!   cause and leaves the target byte for byte (row for row) as it was; with `--force` it
//!   restores the cut.
//! - [`trial_restore`]: `restore --trial` verifies the cut's content, leaves the live source as
//!   it was and removes its scratch targets.

pub mod ledger;
pub mod postgres;
pub mod redis;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::agent::OneShot;
use crate::fleet::{AgentProcess, CoordinatorProcess, Pki, agent_state, cli};

/// What a restore holds (or a cut names), as a user checks it: an amount (rows, keys, height)
/// and a fingerprint of exactly which ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Rows written, keys written, block height: grows with every write.
    pub amount: u64,
    /// Which ones, exactly (digests, the head's hash, key counts).
    pub detail: String,
}

/// A component under test: its source with a writer, the agent configured for it, and its
/// restore targets.
pub trait Subject: Sized {
    /// The component's name (`AITBC_BACKUP_COMPONENT`, `--components`, `--target NAME=`).
    const NAME: &'static str;
    /// Whether the one-shot `backup --fenced` holds writers (otherwise only a fenced set does).
    const ONE_SHOT_FENCE: bool;
    /// What stderr names when a restore into [`Subject::occupy`]'s target is refused.
    const REFUSAL: &'static [&'static str];
    /// A place a restore goes.
    type Target;

    /// Starts the source with some data and a writer that is writing, and an initialized
    /// local repository under `dir`.
    fn start(dir: &Path) -> Self;
    /// The one-shot agent for the source (its environment also configures a sidecar agent).
    fn agent(&self) -> OneShot;
    /// Stops the writer; the longest single write it saw, where it measures one.
    fn stop_writer(&mut self) -> Option<Duration>;
    /// How much the source holds now (rows, keys, height).
    fn written(&self) -> u64;
    /// The content the cut of backup `manifest` names: its consistency point (`repo show`)
    /// applied to the source, whose writer has stopped.
    fn captured(&self, manifest: &str) -> Content;
    /// The amount a restore (or trial) report says it restored and checked.
    fn reported(&self, report: &Value) -> Option<u64>;
    /// A fresh, empty target for a one-shot restore; `n` makes it unique within the test.
    fn fresh_target(&self, dir: &Path, n: usize) -> Self::Target;
    /// A fresh, empty target on its own server or directory, for a set's restore.
    fn separate_target(&self, dir: &Path) -> Self::Target;
    /// A target holding other data that a restore without `--force` must refuse.
    fn occupy(&self, dir: &Path) -> Self::Target;
    /// The one-shot `restore` arguments naming `target`.
    fn target_args(&self, target: &Self::Target) -> Vec<String>;
    /// The CLI's `--target NAME=...` value for `target` (a separate one).
    fn set_target(&self, target: &Self::Target) -> String;
    /// What `target` holds.
    fn content(&self, target: &Self::Target) -> Content;
    /// Everything `target` holds, byte for byte or row for row.
    fn state(&self, target: &Self::Target) -> String;
    /// [`Subject::state`] without what a restore stamps with its own time (the ledger's
    /// `metadata.json`): two restores of one backup give the same.
    fn restored_state(&self, target: &Self::Target) -> String {
        self.state(target)
    }
    /// Everything the live source holds, byte for byte or row for row.
    fn source_state(&self) -> String;
    /// The component's own checks of a completed restore of backup `manifest`.
    fn after_restore(&self, _target: &Self::Target, _manifest: &str) {}
    /// Scratch targets left behind (trial directories, trial databases).
    fn leftovers(&self) -> Vec<String>;
}

/// The manifest id a backup report names.
pub fn manifest_of(report: &Value) -> String {
    report["manifest"]
        .as_str()
        .unwrap_or_else(|| panic!("the report names no manifest: {report}"))
        .to_owned()
}

/// `restore MANIFEST <target args> EXTRA` with the subject's agent.
fn restore_command<S: Subject>(
    subject: &S,
    manifest: &str,
    target: &S::Target,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec!["restore".to_owned(), manifest.to_owned()];
    args.extend(subject.target_args(target));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_ok(agent: &OneShot, args: &[String]) -> Value {
    agent.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Restores `manifest` into `target` and checks it holds exactly `captured`.
fn restore_exactly<S: Subject>(
    subject: &S,
    manifest: &str,
    target: &S::Target,
    captured: &Content,
    extra: &[&str],
) {
    let report = run_ok(
        &subject.agent(),
        &restore_command(subject, manifest, target, extra),
    );
    assert_eq!(
        subject.reported(&report),
        Some(captured.amount),
        "{}: the restore reports another amount: {report}",
        S::NAME
    );
    assert_eq!(
        subject.content(target),
        *captured,
        "{}: the restore of {manifest} does not hold its cut",
        S::NAME
    );
    subject.after_restore(target, manifest);
}

/// Two backups while the writer writes: each restores to exactly its own cut, the second later
/// than the first, and writes after a cut are absent from its restore.
pub fn backup_at_a_cut<S: Subject>() {
    let dir = crate::temp_dir(&format!("conform-{}-cut", S::NAME));
    let mut subject = S::start(dir.path());
    let agent = subject.agent();
    let first = manifest_of(&agent.ok(&["backup"]));
    std::thread::sleep(Duration::from_millis(300));
    let second = manifest_of(&agent.ok(&["backup"]));
    // Writes after the second cut.
    std::thread::sleep(Duration::from_millis(300));
    subject.stop_writer();
    let written = subject.written();
    let (at_first, at_second) = (subject.captured(&first), subject.captured(&second));
    assert!(
        0 < at_first.amount && at_first.amount < at_second.amount && at_second.amount < written,
        "{}: cuts at {} and {} of {written} written",
        S::NAME,
        at_first.amount,
        at_second.amount
    );
    restore_exactly(
        &subject,
        &second,
        &subject.fresh_target(dir.path(), 2),
        &at_second,
        &[],
    );
    restore_exactly(
        &subject,
        &first,
        &subject.fresh_target(dir.path(), 1),
        &at_first,
        &[],
    );
}

/// A fenced one-shot backup (where there is one) and a fenced set of this component alone:
/// writers paused briefly, both restored to exactly their cuts, the set through the CLI; then
/// the set's trial restore verifies and leaves no scratch target.
pub fn fenced_cut<S: Subject>() {
    let dir = crate::temp_dir(&format!("conform-{}-fenced", S::NAME));
    let mut subject = S::start(dir.path());
    let agent = subject.agent();
    let one_shot = S::ONE_SHOT_FENCE.then(|| {
        let report = agent.ok(&["backup", "--fenced"]);
        let pause = report["write_pause_ms"].as_f64().expect("a write pause");
        assert!(pause > 0.0 && pause < 1000.0, "{}: {report}", S::NAME);
        manifest_of(&report)
    });

    let fleet = SetFleet::start(&agent, S::NAME);
    let set = fleet.snapshot("fenced", S::NAME);
    assert_eq!(set["state"], "committed", "{set:#}");
    assert_eq!(set["mode"], "fenced", "{set:#}");
    let components = set["components"].as_array().expect("components");
    assert_eq!(components.len(), 1, "{set:#}");
    assert_eq!(components[0]["component"], S::NAME, "{set:#}");
    let pause = set["write_pause_ms"].as_f64().expect("a write pause");
    assert!(pause > 0.0 && pause < 5000.0, "write pause {pause} ms");
    let set_id = set["id"].as_str().expect("set id").to_owned();
    let in_set = components[0]["manifest"]
        .as_str()
        .expect("component manifest")
        .to_owned();
    // The set records the component manifest's own consistency point.
    let shown = agent.repo_json(&["show", &in_set]);
    assert_eq!(
        components[0]["consistency"], shown["consistency"],
        "{set:#}"
    );

    std::thread::sleep(Duration::from_millis(200));
    if let Some(longest) = subject.stop_writer() {
        assert!(longest < Duration::from_secs(2), "a write took {longest:?}");
    }
    let written = subject.written();

    if let Some(manifest) = &one_shot {
        let captured = subject.captured(manifest);
        assert!(captured.amount > 0, "{}: {captured:?}", S::NAME);
        restore_exactly(
            &subject,
            manifest,
            &subject.fresh_target(dir.path(), 1),
            &captured,
            &[],
        );
    }

    let captured = subject.captured(&in_set);
    assert!(
        0 < captured.amount && captured.amount < written,
        "{}: the set's cut at {} of {written}",
        S::NAME,
        captured.amount
    );
    let target = subject.separate_target(dir.path());
    let events = fleet.cli_events(&[
        "restore",
        &set_id,
        "--json",
        "--target",
        &format!("{}={}", S::NAME, subject.set_target(&target)),
    ]);
    assert_eq!(verified(&events), [S::NAME], "{events:#?}");
    assert_eq!(
        events.last().map(|e| &e["phase"]),
        Some(&Value::from("done"))
    );
    assert_eq!(subject.content(&target), captured, "{}: {set_id}", S::NAME);
    subject.after_restore(&target, &in_set);

    // A trial of the set: verified, the live source untouched, no scratch target left.
    let live = subject.source_state();
    let events = fleet.cli_events(&["restore", &set_id, "--trial", "--json"]);
    assert_eq!(verified(&events), [S::NAME], "{events:#?}");
    assert_eq!(
        subject.source_state(),
        live,
        "{}: a trial changed the source",
        S::NAME
    );
    assert_eq!(subject.leftovers(), Vec::<String>::new(), "{}", S::NAME);
}

/// A restore into an occupied target without `--force` is refused, naming the cause, and
/// changes nothing there; with `--force` it restores the cut.
pub fn refused_restore<S: Subject>() {
    let dir = crate::temp_dir(&format!("conform-{}-refused", S::NAME));
    let mut subject = S::start(dir.path());
    let agent = subject.agent();
    let manifest = manifest_of(&agent.ok(&["backup"]));
    subject.stop_writer();
    let captured = subject.captured(&manifest);

    let target = subject.occupy(dir.path());
    let before = subject.state(&target);
    let args = restore_command(&subject, &manifest, &target, &[]);
    let out = agent.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {args:?}: {err}", S::NAME);
    for expected in S::REFUSAL {
        assert!(
            err.contains(expected),
            "{}: expected `{expected}` in: {err}",
            S::NAME
        );
    }
    assert_eq!(
        subject.state(&target),
        before,
        "{}: a refused restore changed its target",
        S::NAME
    );

    restore_exactly(&subject, &manifest, &target, &captured, &["--force"]);
    // Restored again over itself, the target holds the same, byte for byte or row for row.
    let restored = subject.restored_state(&target);
    restore_exactly(&subject, &manifest, &target, &captured, &["--force"]);
    assert_eq!(
        subject.restored_state(&target),
        restored,
        "{}: a second restore of the same backup gave another target",
        S::NAME
    );
}

/// `restore --trial`: the cut verified in scratch targets, the live source as it was, the
/// scratch targets removed.
pub fn trial_restore<S: Subject>() {
    let dir = crate::temp_dir(&format!("conform-{}-trial", S::NAME));
    let mut subject = S::start(dir.path());
    let agent = subject.agent();
    let manifest = manifest_of(&agent.ok(&["backup"]));
    subject.stop_writer();
    let captured = subject.captured(&manifest);
    assert!(captured.amount > 0, "{}: {captured:?}", S::NAME);

    let live = subject.source_state();
    let report = agent.ok(&["restore", &manifest, "--trial"]);
    assert_eq!(
        subject.reported(&report),
        Some(captured.amount),
        "{}: {report}",
        S::NAME
    );
    assert_eq!(
        subject.source_state(),
        live,
        "{}: a trial changed the source",
        S::NAME
    );
    assert_eq!(subject.leftovers(), Vec::<String>::new(), "{}", S::NAME);
}

/// The `trial-*` directories left in a scratch directory.
fn trial_dirs(scratch: &Path) -> Vec<String> {
    std::fs::read_dir(scratch)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("trial-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The components the CLI's restore events report verified, in order.
fn verified(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["phase"] == "verified")
        .filter_map(|e| e["component"].as_str().map(str::to_owned))
        .collect()
}

/// A coordinator and one sidecar agent for one component, on the subject's repository.
pub struct SetFleet {
    pki: Pki,
    coordinator: CoordinatorProcess,
    _agent: AgentProcess,
}

impl SetFleet {
    /// Starts them with `agent`'s environment and waits until the agent is online.
    pub fn start(agent: &OneShot, component: &str) -> SetFleet {
        let pki = Pki::new();
        let repository = agent
            .var("AITBC_BACKUP_REPOSITORY__URL")
            .expect("a repository");
        let coordinator =
            CoordinatorProcess::start(&pki, &[("AITBC_BACKUP_REPOSITORY__URL", repository)]);
        let env: Vec<(&str, &str)> = agent
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sidecar = AgentProcess::start(&pki, component, component, &coordinator.url(), &env);
        let (operator, url) = (pki.operator(), coordinator.url());
        assert!(
            crate::wait_until(Duration::from_secs(20), || agent_state(
                &operator, &url, component
            )
            .as_deref()
                == Some("online")),
            "agent {component} did not come online: {}",
            sidecar.log()
        );
        SetFleet {
            pki,
            coordinator,
            _agent: sidecar,
        }
    }

    /// `snapshot create --wait --json --mode MODE --components COMPONENT`: the final snapshot.
    pub fn snapshot(&self, mode: &str, component: &str) -> Value {
        let events = self.cli_events(&[
            "snapshot",
            "create",
            "--wait",
            "--json",
            "--mode",
            mode,
            "--components",
            component,
        ]);
        events
            .iter()
            .rev()
            .find(|e| !e["snapshot"].is_null())
            .map(|e| e["snapshot"].clone())
            .unwrap_or_else(|| panic!("no final snapshot event in {events:#?}"))
    }

    /// The CLI, which must succeed; its JSON lines.
    pub fn cli_events(&self, args: &[&str]) -> Vec<Value> {
        let out = cli(&self.pki.operator(), &self.coordinator.url(), args);
        assert!(
            out.status.success(),
            "aitbc-backup {args:?}: {}{}\ncoordinator log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.coordinator.log()
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("`{l}`: {e}")))
            .collect()
    }
}
