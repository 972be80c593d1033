//! Scratch space: a directory of its own for one backup, restore or restore test, removed when
//! dropped; and the directories a restore's target must stay apart from.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::AgentConfig;
use crate::confined::Protected;

/// A new directory `<parent>/<prefix>-<random>`, removed with its contents when dropped.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn create(parent: &Path, prefix: &str) -> anyhow::Result<ScratchDir> {
        let path = parent.join(format!("{prefix}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What [`Protected`] calls the repository.
pub const REPOSITORY: &str = "repository";

/// What a restore's target may neither hold nor lie inside: a `file://` repository and the
/// agent's own scratch, spool and state directories.
pub fn protected_dirs(config: &AgentConfig) -> Vec<Protected> {
    let mut dirs = Vec::new();
    if let Some(path) = config.repository.effective_url().strip_prefix("file://") {
        dirs.push(Protected::new(REPOSITORY, path));
    }
    dirs.push(Protected::new(
        "ledger scratch directory",
        &config.ledger.scratch_dir,
    ));
    dirs.push(Protected::new(
        "postgres scratch directory",
        &config.postgres.scratch_dir,
    ));
    dirs.push(Protected::new(
        "WAL spool directory",
        config.postgres.wal_spool_dir(),
    ));
    dirs.push(Protected::new(
        "redis state directory",
        &config.redis.state_dir,
    ));
    dirs
}
