//! `aitbc-backup snapshot create | list | show | pin | unpin | delete`, `restore SET` and
//! `verify SET`: snapshot sets through the coordinator.

use crate::output::{errln, outln};

use std::collections::HashMap;
use std::time::Duration;

use aitbc_backup_proto::model::{Component, Mode};
use aitbc_backup_proto::{
    ConsistencyMode, CreateSnapshotRequest, DeleteSnapshotRequest, GetSnapshotRequest,
    ListSnapshotsRequest, PinSnapshotRequest, RestoreSnapshotRequest, RestoreTarget, Snapshot,
    SnapshotState, VerifySnapshotRequest,
};
use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use crate::agents::rfc3339;
use crate::client::{ConnectionArgs, status_error};
use crate::output::{component_name, print_table};

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Start a snapshot set of every online agent (or some components).
    Create {
        /// The policy whose components and mode apply (default: `default`).
        #[arg(long)]
        policy: Option<String>,
        /// Only these components (postgres, redis, ledger), comma-separated.
        #[arg(long, value_delimiter = ',')]
        components: Vec<Component>,
        /// Only these agents (by name), comma-separated.
        #[arg(long, value_delimiter = ',')]
        agents: Vec<String>,
        /// independent, coordinated or fenced (default: the policy's).
        #[arg(long)]
        mode: Option<Mode>,
        /// Follow the set until it is committed or aborted (exit code 1 when aborted).
        #[arg(long)]
        wait: bool,
    },
    /// List every snapshot set, oldest first.
    List,
    /// Show one snapshot set with its components' consistency points.
    Show { set: String },
    /// Keep a set whatever the retention says.
    Pin { set: String },
    /// Let retention apply to a set again.
    Unpin { set: String },
    /// Delete a set (not pinned); GC removes its data later.
    Delete { set: String },
}

/// `restore SET`: restore a set in order, each component verified before the next.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot set.
    set: String,
    /// Only these components (default: all of the set), comma-separated.
    #[arg(long = "component", value_delimiter = ',')]
    components: Vec<Component>,
    /// Where a component goes instead of its agent's own server or directory:
    /// `postgres=postgresql://host:port/?user=u`, `redis=host:port` (live) or `redis=/dir`
    /// (offline dump.rdb), `ledger=/dir`. Repeatable.
    #[arg(long = "target", value_name = "COMPONENT=TARGET")]
    targets: Vec<String>,
    /// Replace non-empty directories, databases in use and existing dump.rdb files.
    #[arg(long)]
    force: bool,
    /// A restore test: every component into its agent's scratch targets (databases under
    /// temporary names, a scratch directory, an offline dump.rdb), verified, then removed.
    #[arg(long, conflicts_with_all = ["targets", "force"])]
    trial: bool,
    #[command(flatten)]
    key: OperatorKey,
}

/// The operator's key of an encrypted repository, handed to the coordinator and the agents
/// for this one request (a sealed repository's data opens with nothing they hold).
#[derive(clap::Args)]
pub struct OperatorKey {
    /// File holding the repository passphrase (or set AITBC_CLI_PASSPHRASE).
    #[arg(long)]
    passphrase_file: Option<std::path::PathBuf>,
    /// Key file opening the repository.
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

impl OperatorKey {
    fn to_proto(&self) -> anyhow::Result<Option<aitbc_backup_proto::RepositoryKey>> {
        use aitbc_backup_proto::model::RepoKey;
        use aitbc_backup_repository::KeySecret;
        let secret = crate::repo::secret_from(
            &self.passphrase_file,
            &self.key_file,
            "AITBC_CLI_PASSPHRASE",
        )?;
        Ok(secret.map(|secret| {
            match secret {
                KeySecret::Passphrase(p) => RepoKey::Passphrase(p),
                KeySecret::KeyFile(bytes) => RepoKey::KeyFile(bytes),
            }
            .into()
        }))
    }
}

/// `verify SET`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    set: String,
    /// Download, decrypt, decompress and re-hash every chunk.
    #[arg(long)]
    read_data: bool,
    #[command(flatten)]
    key: OperatorKey,
}

pub async fn run(
    command: SnapshotCommand,
    connection: &ConnectionArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connection.operator().await?;
    let (snapshot, call) = match command {
        SnapshotCommand::Create {
            policy,
            components,
            agents,
            mode,
            wait,
        } => {
            let request = CreateSnapshotRequest {
                policy: policy.unwrap_or_default(),
                components: components.iter().map(|c| c.to_proto() as i32).collect(),
                mode: mode.map_or(ConsistencyMode::Unspecified, Mode::to_proto) as i32,
                agents,
            };
            let events = client
                .create_snapshot(request)
                .await
                .map_err(|s| status_error("CreateSnapshot", s))?
                .into_inner();
            return follow_create(events, wait, json).await;
        }
        SnapshotCommand::List => {
            let snapshots = client
                .list_snapshots(ListSnapshotsRequest {})
                .await
                .map_err(|s| status_error("ListSnapshots", s))?
                .into_inner()
                .snapshots;
            if json {
                let all: Vec<_> = snapshots.iter().map(to_json).collect();
                outln!("{}", serde_json::to_string_pretty(&all)?)?;
            } else {
                print_list(&snapshots)?;
            }
            return Ok(());
        }
        SnapshotCommand::Show { set } => (
            client
                .get_snapshot(GetSnapshotRequest { set_id: set })
                .await,
            "GetSnapshot",
        ),
        SnapshotCommand::Pin { set } => (
            client
                .pin_snapshot(PinSnapshotRequest {
                    set_id: set,
                    pinned: true,
                })
                .await,
            "PinSnapshot",
        ),
        SnapshotCommand::Unpin { set } => (
            client
                .pin_snapshot(PinSnapshotRequest {
                    set_id: set,
                    pinned: false,
                })
                .await,
            "PinSnapshot",
        ),
        SnapshotCommand::Delete { set } => {
            let deleted = client
                .delete_snapshot(DeleteSnapshotRequest {
                    set_id: set.clone(),
                })
                .await
                .map_err(|s| status_error("DeleteSnapshot", s))?
                .into_inner()
                .deleted_manifests;
            if json {
                outln!("{:#}", json!({"set": set, "deleted_manifests": deleted}))?;
            } else {
                outln!(
                    "deleted snapshot set {set} and {} component manifests (their data goes at the next GC)",
                    deleted.len()
                )?;
            }
            return Ok(());
        }
    };
    let snapshot = snapshot.map_err(|s| status_error(call, s))?.into_inner();
    if json {
        outln!("{:#}", to_json(&snapshot))?;
    } else {
        print_show(&snapshot)?;
    }
    Ok(())
}

/// Prints the set id (no --wait), or follows the set with one progress line per agent.
async fn follow_create(
    mut events: tonic::Streaming<aitbc_backup_proto::SnapshotEvent>,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {prefix:<24} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut per_agent: HashMap<String, ProgressBar> = HashMap::new();
    while let Some(event) = events
        .message()
        .await
        .map_err(|s| status_error("CreateSnapshot", s))?
    {
        if json {
            outln!(
                "{}",
                json!({"set": event.set_id, "agent": event.agent, "phase": event.phase,
                       "bytes_read": event.bytes_read, "bytes_stored": event.bytes_stored,
                       "message": event.message,
                       "snapshot": event.snapshot.as_ref().map(to_json)})
            )?;
        }
        // A set queued behind a running one says so (stderr: stdout stays the set id or JSON).
        if !json && !event.message.is_empty() && event.phase == "started" {
            eprintln!("snapshot set {} {}", event.set_id, event.message);
        }
        if !wait {
            if !json {
                outln!("{}", event.set_id)?;
            }
            return Ok(());
        }
        if !event.agent.is_empty() && !json {
            let bar = per_agent.entry(event.agent.clone()).or_insert_with(|| {
                let bar = bars.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(event.agent.clone());
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            });
            bar.set_message(format!(
                "{} {} read, {} stored",
                event.phase,
                human_bytes(event.bytes_read),
                human_bytes(event.bytes_stored)
            ));
        }
        if let Some(snapshot) = event.snapshot {
            for bar in per_agent.values() {
                bar.finish_and_clear();
            }
            if !json {
                print_show(&snapshot)?;
            }
            if snapshot.state == SnapshotState::Aborted as i32 {
                bail!(
                    "snapshot set {} aborted: {}",
                    snapshot.id,
                    snapshot.abort_reason
                );
            }
            return Ok(());
        }
    }
    bail!("the coordinator ended the event stream before the set finished")
}

pub async fn restore(
    args: RestoreArgs,
    connection: &ConnectionArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for text in &args.targets {
        let (component, target) = text
            .split_once('=')
            .with_context(|| format!("--target `{text}`: expected COMPONENT=TARGET"))?;
        let component: Component = component.parse().map_err(anyhow::Error::msg)?;
        let is_dir = target.starts_with('/');
        if component == Component::Ledger && !is_dir {
            bail!("--target `{text}`: the ledger target is an absolute directory");
        }
        if component == Component::Postgres && is_dir {
            bail!("--target `{text}`: the PostgreSQL target is a libpq URL");
        }
        targets.push(RestoreTarget {
            component: component.to_proto() as i32,
            target_dir: if is_dir {
                target.to_owned()
            } else {
                String::new()
            },
            target_url: if is_dir {
                String::new()
            } else {
                target.to_owned()
            },
        });
    }
    let mut client = connection.operator().await?;
    let mut events = client
        .restore_snapshot(RestoreSnapshotRequest {
            set_id: args.set.clone(),
            components: args
                .components
                .iter()
                .map(|c| c.to_proto() as i32)
                .collect(),
            targets,
            force: args.force,
            trial: args.trial,
            key: args.key.to_proto()?,
        })
        .await
        .map_err(|s| status_error("RestoreSnapshot", s))?
        .into_inner();
    let mut failed = None;
    while let Some(event) = events
        .message()
        .await
        .map_err(|s| status_error("RestoreSnapshot", s))?
    {
        let component = component_name(event.component);
        if json {
            let report: serde_json::Value =
                serde_json::from_str(&event.report_json).unwrap_or(serde_json::Value::Null);
            outln!(
                "{}",
                json!({"set": event.set_id, "component": component, "agent": event.agent,
                       "phase": event.phase, "seconds": event.seconds, "error": event.error,
                       "report": report})
            )?;
        } else {
            match event.phase.as_str() {
                "restore" => errln!("{component}: restoring with agent {}", event.agent),
                "verified" => outln!(
                    "{component}: restored and verified in {:.1}s",
                    event.seconds
                )?,
                "failed" => outln!("{component}: FAILED: {}", event.error)?,
                "done" => outln!("snapshot set {} restored", event.set_id)?,
                _ => {}
            }
        }
        if event.phase == "failed" {
            failed = Some(format!("{component}: {}", event.error));
        }
        if matches!(event.phase.as_str(), "failed" | "done") {
            break;
        }
    }
    match failed {
        Some(error) => bail!("restore of {} failed at {error}", args.set),
        None => Ok(()),
    }
}

pub async fn verify(
    args: VerifyArgs,
    connection: &ConnectionArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = connection.operator().await?;
    let report = client
        .verify_snapshot(VerifySnapshotRequest {
            set_id: args.set.clone(),
            read_data: args.read_data,
            key: args.key.to_proto()?,
        })
        .await
        .map_err(|s| status_error("VerifySnapshot", s))?
        .into_inner();
    if json {
        outln!(
            "{:#}",
            json!({"set": args.set, "ok": report.ok, "problems": report.problems,
                   "manifests": report.manifests, "chunks": report.chunks,
                   "chunks_read": report.chunks_read})
        )?;
    } else {
        for problem in &report.problems {
            outln!("{problem}")?;
        }
        outln!(
            "{}: {} manifests, {} chunks, {} read",
            if report.ok { "ok" } else { "FAILED" },
            report.manifests,
            report.chunks,
            report.chunks_read
        )?;
    }
    if !report.ok {
        bail!("snapshot set {} failed verification", args.set);
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match SnapshotState::try_from(state) {
        Ok(SnapshotState::Running) => "running",
        Ok(SnapshotState::Committed) => "committed",
        Ok(SnapshotState::Aborted) => "aborted",
        _ => "unknown",
    }
}

fn mode_name(mode: i32) -> &'static str {
    Mode::from_proto("mode", mode)
        .ok()
        .flatten()
        .map_or("", Mode::as_str)
}

fn to_json(snapshot: &Snapshot) -> serde_json::Value {
    let components: Vec<_> = snapshot
        .components
        .iter()
        .map(|c| {
            json!({
                "agent": c.agent,
                "component": component_name(c.component),
                "manifest": c.manifest_id,
                "consistency": serde_json::from_str::<serde_json::Value>(&c.consistency_json).unwrap_or(serde_json::Value::Null),
                "bytes_read": c.bytes_read,
                "bytes_stored": c.bytes_stored,
            })
        })
        .collect();
    json!({
        "id": snapshot.id,
        "policy": snapshot.policy,
        "created": snapshot.created.map(rfc3339),
        "mode": mode_name(snapshot.mode),
        "state": state_name(snapshot.state),
        "components": components,
        "cut_skew_ms": snapshot.cut_skew_ms,
        "write_pause_ms": snapshot.write_pause_ms,
        "pinned": snapshot.pinned,
        "abort_reason": snapshot.abort_reason,
    })
}

fn print_list(snapshots: &[Snapshot]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let components: Vec<&str> = s
                .components
                .iter()
                .map(|c| component_name(c.component))
                .collect();
            vec![
                s.id.clone(),
                state_name(s.state).to_owned(),
                mode_name(s.mode).to_owned(),
                s.policy.clone(),
                components.join(","),
                format!("{:.1}", s.cut_skew_ms),
                if s.pinned {
                    "yes".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "STATE",
            "MODE",
            "POLICY",
            "COMPONENTS",
            "SKEW_MS",
            "PINNED",
        ],
        &rows,
    )
}

fn print_show(snapshot: &Snapshot) -> anyhow::Result<()> {
    outln!(
        "snapshot set {}  {}  mode {}  policy {}{}",
        snapshot.id,
        state_name(snapshot.state),
        mode_name(snapshot.mode),
        snapshot.policy,
        if snapshot.pinned { "  pinned" } else { "" }
    )?;
    outln!(
        "cut skew {:.2} ms, write pause {:.2} ms",
        snapshot.cut_skew_ms,
        snapshot.write_pause_ms
    )?;
    if !snapshot.abort_reason.is_empty() {
        outln!("aborted: {}", snapshot.abort_reason)?;
    }
    let rows: Vec<Vec<String>> = snapshot
        .components
        .iter()
        .map(|c| {
            vec![
                c.agent.clone(),
                component_name(c.component).to_owned(),
                c.manifest_id.clone(),
                c.consistency_json.clone(),
            ]
        })
        .collect();
    print_table(&["AGENT", "COMPONENT", "MANIFEST", "CONSISTENCY"], &rows)
}

fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", bytes as f64 / MIB)
}
