//! The ledger under the contract: the node simulator writing 50 blocks/s into `chain.db` (in
//! the journal mode `J` names), a receipt file per block; a cut's content is the hash-chained
//! chain up to the manifest's height and hash, exactly.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{Content, Subject};
use crate::agent::{OneShot, init_local_repository};
use crate::chain::check_chain;
use crate::node::{LedgerAgent, NodeSim, tree_digest};

/// SQLite's journal mode for the node's database.
pub trait Journal {
    const MODE: &'static str;
}

/// `journal_mode = WAL`.
pub struct Wal;
/// The rollback journal (`journal_mode = DELETE`).
pub struct Rollback;

impl Journal for Wal {
    const MODE: &'static str = "wal";
}

impl Journal for Rollback {
    const MODE: &'static str = "delete";
}

pub struct LedgerSubject<J> {
    node: NodeSim,
    agent: LedgerAgent,
    _journal: PhantomData<J>,
}

fn head(height: u64, hash: &str) -> Content {
    Content {
        amount: height,
        detail: format!("head {hash}, {} blocks", height + 1),
    }
}

/// The restored (or source) chain, checked block by block: its head.
fn chain(dir: &Path) -> Content {
    let chain = check_chain(&dir.join("chain/chain.db"))
        .unwrap_or_else(|e| panic!("the chain in {}: {e}", dir.display()));
    assert_eq!(chain.blocks, chain.height + 1);
    head(chain.height, &chain.hash)
}

impl<J: Journal> Subject for LedgerSubject<J> {
    const NAME: &'static str = "ledger";
    // `backup --fenced` holds the node's writers with BEGIN IMMEDIATE for the cut.
    const ONE_SHOT_FENCE: bool = true;
    const REFUSAL: &'static [&'static str] = &["is not empty", "--force"];
    type Target = PathBuf;

    fn start(dir: &Path) -> Self {
        let agent = LedgerAgent {
            data_dir: dir.join("node"),
            repository: init_local_repository(dir),
            scratch: dir.join("scratch"),
        };
        let node = NodeSim::start(dir, J::MODE, 50, &[]);
        assert!(
            crate::wait_until(Duration::from_secs(15), || node
                .head()
                .is_some_and(|(h, _)| h >= 20)),
            "{}",
            node.service.log()
        );
        LedgerSubject {
            node,
            agent,
            _journal: PhantomData,
        }
    }

    fn agent(&self) -> OneShot {
        self.agent.oneshot()
    }

    fn stop_writer(&mut self) -> Option<Duration> {
        if self.node.service.try_exit().is_none() {
            let status = self.node.service.stop().expect("node exit");
            assert!(status.success(), "{}", self.node.service.log());
        }
        None
    }

    fn written(&self) -> u64 {
        chain(&self.agent.data_dir).amount
    }

    fn captured(&self, manifest: &str) -> Content {
        let shown = self.agent.oneshot().repo_json(&["show", manifest]);
        let point = &shown["consistency"];
        assert_eq!(point["kind"], "ledger", "{shown}");
        head(
            point["height"].as_u64().expect("height"),
            point["hash"].as_str().expect("hash"),
        )
    }

    fn reported(&self, report: &Value) -> Option<u64> {
        report["height"].as_u64()
    }

    fn fresh_target(&self, dir: &Path, n: usize) -> PathBuf {
        dir.join(format!("restored-{n}"))
    }

    fn separate_target(&self, dir: &Path) -> PathBuf {
        dir.join("restored-set")
    }

    fn occupy(&self, dir: &Path) -> PathBuf {
        let target = dir.join("occupied");
        std::fs::create_dir_all(target.join("chain")).expect("mkdir");
        std::fs::create_dir_all(target.join("wallets")).expect("mkdir");
        std::fs::write(target.join("chain/chain.db"), b"the old ledger").expect("write");
        std::fs::write(target.join("wallets/old.json"), b"{}").expect("write");
        target
    }

    fn target_args(&self, target: &PathBuf) -> Vec<String> {
        vec!["--target".into(), target.display().to_string()]
    }

    fn set_target(&self, target: &PathBuf) -> String {
        target.display().to_string()
    }

    fn content(&self, target: &PathBuf) -> Content {
        chain(target)
    }

    fn state(&self, target: &PathBuf) -> String {
        format!("{:?}", tree_digest(target, &[]))
    }

    fn restored_state(&self, target: &PathBuf) -> String {
        format!("{:?}", tree_digest(target, &["metadata.json"]))
    }

    fn source_state(&self) -> String {
        format!("{:?}", tree_digest(&self.agent.data_dir, &[]))
    }

    fn after_restore(&self, target: &PathBuf, manifest: &str) {
        let restored = chain(target);
        let height = restored.amount;
        for h in [0, height / 2, height] {
            let receipt = target.join(format!("receipts/{:06}/{h}.json", h / 1000));
            assert!(receipt.is_file(), "the receipt of block {h} is missing");
        }
        let old = target.join("wallets/old.json");
        assert!(!old.exists(), "the old data is still there");
        // The old tooling's metadata.
        let metadata: Value = serde_json::from_slice(
            &std::fs::read(target.join("metadata.json")).expect("metadata.json"),
        )
        .expect("metadata JSON");
        assert_eq!(metadata["latest_block_height"].as_u64(), Some(height));
        assert_eq!(
            head(height, metadata["latest_block_hash"].as_str().unwrap_or("")),
            restored
        );
        assert_eq!(metadata["backup_name"].as_str(), Some(manifest));
        let staging: Vec<_> = std::fs::read_dir(target)
            .expect("read target")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".aitbc-backup"))
            .collect();
        assert!(staging.is_empty(), "{staging:?}");
    }

    fn leftovers(&self) -> Vec<String> {
        super::trial_dirs(&self.agent.scratch)
    }
}
