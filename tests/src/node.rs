//! The blockchain node simulator (`aitbc-node-sim`) as a service, and ledger helpers: the
//! agent's one-shot commands for the ledger component.

use std::path::{Path, PathBuf};
use std::process::Output;

use nix::sys::signal::Signal;

use crate::agent::OneShot;
use crate::fleet::{binary, http_get};
use crate::process::{Service, Spec};

/// A simulated node writing into `<dir>/node`.
pub struct NodeSim {
    pub data_dir: PathBuf,
    pub port: u16,
    pub service: Service,
}

impl NodeSim {
    /// Starts the simulator at `rate` blocks per second in journal mode `journal`.
    pub fn start(dir: &Path, journal: &str, rate: u32, extra: &[&str]) -> NodeSim {
        let port = crate::free_port();
        let data_dir = dir.join("node");
        let mut args: Vec<String> = [
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--rate",
            &rate.to_string(),
            "--journal",
            journal,
            "--http",
            &format!("127.0.0.1:{port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let service = Service::spawn(Spec {
            name: "aitbc-node-sim",
            program: &binary("aitbc-node-sim"),
            args,
            env: vec![],
            user: None,
            cwd: Some(dir),
            log: dir.join(format!("node-sim-{port}.log")),
            stop_signal: Signal::SIGTERM,
        });
        NodeSim {
            data_dir,
            port,
            service,
        }
    }

    /// Runs the simulator until it has written `blocks` more blocks (receipts of about
    /// `receipt_bytes`), as fast as it can.
    pub fn write_blocks(dir: &Path, journal: &str, blocks: u64, receipt_bytes: usize) {
        let out = std::process::Command::new(binary("aitbc-node-sim"))
            .args(["--data-dir", dir.join("node").to_str().expect("utf-8")])
            .args(["--journal", journal, "--rate", "100000"])
            .args(["--blocks", &blocks.to_string(), "--exit"])
            .args(["--receipt-log-bytes", &receipt_bytes.to_string()])
            .output()
            .expect("run aitbc-node-sim");
        assert!(
            out.status.success(),
            "aitbc-node-sim: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The node's head from its HTTP endpoint.
    pub fn head(&self) -> Option<(u64, String)> {
        let (status, body) = http_get(self.port, "/v1/blocks/head")?;
        let value: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200).then(|| {
            (
                value["height"].as_u64().unwrap_or(0),
                value["hash"].as_str().unwrap_or("").to_owned(),
            )
        })
    }
}

/// The agent's one-shot commands against a ledger data directory and a local repository.
pub struct LedgerAgent {
    pub data_dir: PathBuf,
    pub repository: String,
    pub scratch: PathBuf,
}

impl LedgerAgent {
    /// The agent with the ledger config in its environment.
    pub fn oneshot(&self) -> OneShot {
        OneShot::new("ledger", &self.repository)
            .with(
                "AITBC_BACKUP_LEDGER__DATA_DIR",
                self.data_dir.display().to_string(),
            )
            .with(
                "AITBC_BACKUP_LEDGER__SCRATCH_DIR",
                self.scratch.display().to_string(),
            )
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.oneshot().run(args)
    }

    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        self.oneshot().ok(args)
    }

    pub fn fails(&self, args: &[&str]) -> String {
        self.oneshot().fails(args)
    }

    /// Restores the backup a `backup` report names into `target`; the restore's report.
    pub fn restore_into(&self, backup: &serde_json::Value, target: &Path) -> serde_json::Value {
        let manifest = backup["manifest"]
            .as_str()
            .expect("the report names its manifest");
        self.ok(&[
            "restore",
            manifest,
            "--target",
            target.to_str().expect("utf-8"),
        ])
    }
}

/// BLAKE3 of every file under `dir` (relative path → digest), skipping `skip` names.
pub fn tree_digest(dir: &Path, skip: &[&str]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    skip: &[&str],
    out: &mut std::collections::BTreeMap<String, String>,
) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            out.insert(format!("{rel}/"), String::new());
            walk(root, &path, skip, out);
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("read link");
            out.insert(rel, format!("-> {}", target.display()));
        } else {
            let bytes = std::fs::read(&path).expect("read file");
            out.insert(rel, blake3::hash(&bytes).to_hex().to_string());
        }
    }
}
