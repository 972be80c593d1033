//! The catalog of snapshot sets.
//!
//! Durable state is the repository's alone: set manifests (committed sets), `pins/` and
//! `attempts/` records (see the repository crate's `sets` module). At start the catalog is
//! rebuilt from them; an attempt still `running` without a set manifest was interrupted by a
//! coordinator stop and is recorded as aborted (its data is left to GC). While the coordinator
//! runs, sets in progress live here in memory.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use aitbc_backup_config::settings::RepositorySettings;
use aitbc_backup_proto::model::{Component, Mode};
use aitbc_backup_proto::{Snapshot, SnapshotComponent, SnapshotState};
use aitbc_backup_repository::manifest::{ConsistencyPoint, SetManifest};
use aitbc_backup_repository::sets::Attempt;
use aitbc_backup_repository::{RepoError, Repository};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub const INTERRUPTED: &str = "interrupted: the coordinator stopped during the set";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetState {
    Running,
    Committed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ComponentRecord {
    pub agent: String,
    pub component: Component,
    pub manifest_id: String,
    pub consistency: Option<ConsistencyPoint>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetRecord {
    pub id: String,
    pub policy: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub mode: Mode,
    pub state: SetState,
    pub components: Vec<ComponentRecord>,
    pub cut_skew_ms: f64,
    pub write_pause_ms: f64,
    pub pinned: bool,
    pub abort_reason: String,
}

/// The component a consistency point belongs to.
pub fn component_of(point: &ConsistencyPoint) -> Component {
    match point {
        ConsistencyPoint::Postgres { .. } | ConsistencyPoint::PostgresBase { .. } => {
            Component::Postgres
        }
        ConsistencyPoint::Redis { .. } => Component::Redis,
        ConsistencyPoint::Ledger { .. } => Component::Ledger,
    }
}

impl SetRecord {
    pub fn committed(manifest: SetManifest, pinned: bool) -> SetRecord {
        SetRecord {
            mode: manifest.mode.parse().unwrap_or_default(),
            components: manifest
                .components
                .into_iter()
                .filter_map(|c| {
                    Some(ComponentRecord {
                        component: component_of(c.consistency.as_ref()?),
                        agent: c.name,
                        manifest_id: c.manifest_id,
                        consistency: c.consistency,
                        bytes_read: 0,
                        bytes_stored: 0,
                    })
                })
                .collect(),
            id: manifest.id,
            policy: manifest.policy,
            created: manifest.created,
            state: SetState::Committed,
            cut_skew_ms: manifest.cut_skew_ms,
            write_pause_ms: manifest.write_pause_ms,
            pinned,
            abort_reason: String::new(),
        }
    }

    fn aborted(attempt: Attempt) -> SetRecord {
        SetRecord {
            mode: attempt.mode.parse().unwrap_or_default(),
            id: attempt.id,
            policy: attempt.policy,
            created: attempt.started,
            state: SetState::Aborted,
            components: Vec::new(),
            cut_skew_ms: 0.0,
            write_pause_ms: 0.0,
            pinned: false,
            abort_reason: attempt.reason,
        }
    }

    pub fn to_proto(&self) -> Snapshot {
        Snapshot {
            id: self.id.clone(),
            policy: self.policy.clone(),
            created: chrono::DateTime::parse_from_rfc3339(&self.created)
                .ok()
                .map(|t| prost_types::Timestamp::from(SystemTime::from(t))),
            mode: self.mode.to_proto() as i32,
            state: match self.state {
                SetState::Running => SnapshotState::Running,
                SetState::Committed => SnapshotState::Committed,
                SetState::Aborted => SnapshotState::Aborted,
            } as i32,
            components: self
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
            cut_skew_ms: self.cut_skew_ms,
            write_pause_ms: self.write_pause_ms,
            pinned: self.pinned,
            abort_reason: self.abort_reason.clone(),
        }
    }
}

/// The repository, opened on first use (a coordinator starts even while storage is down).
pub struct RepoHandle {
    settings: RepositorySettings,
    repo: OnceCell<Repository>,
}

impl RepoHandle {
    pub fn new(settings: RepositorySettings) -> RepoHandle {
        RepoHandle {
            settings,
            repo: OnceCell::new(),
        }
    }

    pub async fn get(&self, cancel: &CancellationToken) -> anyhow::Result<&Repository> {
        self.repo
            .get_or_try_init(|| async {
                // Boxed: opening (S3 client and all) is deep enough to overflow the compiler's
                // layout queries in every caller.
                Box::pin(aitbc_backup_repository::open::open_configured(
                    &self.settings,
                    cancel,
                ))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("open repository {}: {e}", self.settings.effective_url())
                })
            })
            .await
    }
}

#[derive(Default)]
pub struct Catalog {
    sets: Mutex<BTreeMap<String, SetRecord>>,
}

impl Catalog {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SetRecord>> {
        self.sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Rebuilds the catalog from the repository; interrupted attempts are recorded as aborted
    /// there too. Returns how many sets it knows.
    pub async fn load(
        &self,
        repo: &Repository,
        cancel: &CancellationToken,
    ) -> Result<usize, RepoError> {
        let pinned = repo.pinned_sets(cancel).await?;
        let mut loaded = BTreeMap::new();
        for id in repo.set_ids(cancel).await? {
            let manifest = repo.set(&id, cancel).await?;
            loaded.insert(
                id.clone(),
                SetRecord::committed(manifest, pinned.contains(&id)),
            );
        }
        let running: Vec<String> = self
            .lock()
            .values()
            .filter(|r| r.state == SetState::Running)
            .map(|r| r.id.clone())
            .collect();
        for mut attempt in repo.attempts(cancel).await? {
            if loaded.contains_key(&attempt.id) || running.contains(&attempt.id) {
                continue;
            }
            if attempt.state == "running" {
                attempt.state = "aborted".to_owned();
                attempt.reason = INTERRUPTED.to_owned();
                repo.record_attempt(&attempt, cancel).await?;
                tracing::warn!(set = %attempt.id, "set was interrupted by a coordinator stop; recorded as aborted");
            }
            loaded.insert(attempt.id.clone(), SetRecord::aborted(attempt));
        }
        let mut sets = self.lock();
        sets.retain(|_, r| r.state == SetState::Running);
        sets.extend(loaded);
        Ok(sets.len())
    }

    pub fn put(&self, record: SetRecord) {
        self.lock().insert(record.id.clone(), record);
    }

    pub fn get(&self, id: &str) -> Option<SetRecord> {
        self.lock().get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Every set, oldest first.
    pub fn list(&self) -> Vec<SetRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn update(&self, id: &str, change: impl FnOnce(&mut SetRecord)) {
        if let Some(record) = self.lock().get_mut(id) {
            change(record);
        }
    }
}
