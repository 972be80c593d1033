//! The catalog of snapshot sets.
//!
//! Durable state is the repository's alone: set manifests (committed sets), `pins/` and
//! `attempts/` records (see the repository crate's `sets` module). At start the catalog is
//! rebuilt from them; an attempt still `running` without a set manifest was interrupted by a
//! coordinator stop and is recorded as aborted (its data is left to GC). While the coordinator
//! runs, sets in progress live here in memory.
//!
//! A set manifest that cannot be read (damaged) is named in a warning and skipped: the catalog
//! goes on with the good sets, and the damaged ones are kept aside ([`Catalog::damaged_set`])
//! for the metric and for operators asking about them. They are not in [`Catalog::list`], so
//! retention never deletes one and never counts one as the newest good set; their attempt
//! records are not taken for interrupted sets.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use aitbc_backup_config::settings::RepositorySettings;
use aitbc_backup_proto::model::{Component, Mode};
use aitbc_backup_repository::manifest::{ConsistencyPoint, SetManifest};
use aitbc_backup_repository::sets::Attempt;
use aitbc_backup_repository::{Damaged, DamagedKind, RepoError, Repository};
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
    damage: Mutex<Damage>,
}

/// The damaged objects the catalog knows, by id.
#[derive(Default)]
struct Damage {
    /// Set manifests found damaged by the last load.
    sets: BTreeMap<String, Damaged>,
    /// Component manifests found damaged by the last repository scan.
    components: BTreeMap<String, Damaged>,
}

impl Catalog {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SetRecord>> {
        self.sets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn damage(&self) -> MutexGuard<'_, Damage> {
        self.damage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The damaged set manifest of set `id`, if the last load found it damaged.
    pub fn damaged_set(&self, id: &str) -> Option<Damaged> {
        self.damage().sets.get(id).cloned()
    }

    /// How many damaged objects of `kind` the catalog knows.
    pub fn damaged_count(&self, kind: DamagedKind) -> usize {
        let damage = self.damage();
        match kind {
            DamagedKind::SetManifest => damage.sets.len(),
            DamagedKind::ComponentManifest => damage.components.len(),
        }
    }

    /// Records the damaged component manifests of a repository scan; returns those not known
    /// before (to be named in the log once).
    pub fn note_damaged_components(&self, found: Vec<Damaged>) -> Vec<Damaged> {
        let mut damage = self.damage();
        let new = found
            .iter()
            .filter(|d| !damage.components.contains_key(&d.id))
            .cloned()
            .collect();
        damage.components = found.into_iter().map(|d| (d.id.clone(), d)).collect();
        new
    }

    /// Rebuilds the catalog from the repository; interrupted attempts are recorded as aborted
    /// there too. Returns how many sets it knows.
    pub async fn load(
        &self,
        repo: &Repository,
        cancel: &CancellationToken,
    ) -> Result<usize, RepoError> {
        let pinned = repo.pinned_sets(cancel).await?;
        let scanned = repo.scan_sets(cancel).await?;
        let mut loaded = BTreeMap::new();
        for manifest in scanned.good {
            let pinned = pinned.contains(&manifest.id);
            loaded.insert(manifest.id.clone(), SetRecord::committed(manifest, pinned));
        }
        for damaged in &scanned.damaged {
            tracing::warn!(
                set = %damaged.id,
                object = %damaged.object,
                reason = %damaged.reason,
                "damaged set manifest skipped: the set cannot be listed or restored and retention \
                 leaves it alone; restore the object from a copy or remove it deliberately"
            );
        }
        let damaged: BTreeMap<String, Damaged> = scanned
            .damaged
            .into_iter()
            .map(|d| (d.id.clone(), d))
            .collect();
        let running: Vec<String> = self
            .lock()
            .values()
            .filter(|r| r.state == SetState::Running)
            .map(|r| r.id.clone())
            .collect();
        for mut attempt in repo.attempts(cancel).await? {
            // A damaged set committed (its manifest exists): its attempt record is no
            // interrupted set, and deleting it as aborted would delete its data.
            if loaded.contains_key(&attempt.id)
                || running.contains(&attempt.id)
                || damaged.contains_key(&attempt.id)
            {
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
        self.damage().sets = damaged;
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use aitbc_backup_repository::manifest::SetManifest;
    use aitbc_backup_repository::storage::{Backend, LocalStorage};
    use aitbc_backup_repository::{ChunkerParams, Storage, StorageLimits};

    use super::*;

    const GOOD: &str = "20300101T000000000Z-00000001";
    const DAMAGED: &str = "20300102T000000000Z-00000002";

    async fn repository(dir: &Path) -> Repository {
        let local = LocalStorage::new(dir.to_path_buf()).expect("local storage");
        let storage = Storage::new(Backend::Local(local), StorageLimits::default());
        Repository::init(
            storage,
            ChunkerParams::default(),
            None,
            &CancellationToken::new(),
        )
        .await
        .expect("init")
    }

    /// A committed set as the coordinator leaves it: its attempt record still `running`.
    async fn committed_set(repo: &Repository, id: &str, created: &str) {
        let cancel = CancellationToken::new();
        let attempt = Attempt {
            id: id.to_owned(),
            policy: "default".to_owned(),
            mode: "coordinated".to_owned(),
            started: created.to_owned(),
            state: "running".to_owned(),
            reason: String::new(),
        };
        repo.record_attempt(&attempt, &cancel)
            .await
            .expect("attempt");
        let manifest = SetManifest {
            id: id.to_owned(),
            created: created.to_owned(),
            policy: "default".to_owned(),
            mode: "coordinated".to_owned(),
            components: Vec::new(),
            cut_skew_ms: 0.0,
            write_pause_ms: 0.0,
            pinned: false,
        };
        repo.commit_set(&manifest, &cancel).await.expect("commit");
    }

    #[tokio::test]
    async fn a_damaged_set_manifest_is_set_aside_and_its_set_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repository(dir.path()).await;
        let cancel = CancellationToken::new();
        committed_set(&repo, GOOD, "2030-01-01T00:00:00.000Z").await;
        committed_set(&repo, DAMAGED, "2030-01-02T00:00:00.000Z").await;
        let path = dir.path().join(format!("manifests/sets/{DAMAGED}.json"));
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x20;
        std::fs::write(&path, bytes).expect("write");

        let catalog = Catalog::default();
        assert_eq!(catalog.load(&repo, &cancel).await.expect("load"), 1);
        let listed: Vec<String> = catalog.list().into_iter().map(|r| r.id).collect();
        assert_eq!(listed, [GOOD]);
        let damaged = catalog.damaged_set(DAMAGED).expect("named as damaged");
        assert_eq!(damaged.object, format!("manifests/sets/{DAMAGED}.json"));
        assert_eq!(catalog.damaged_count(DamagedKind::SetManifest), 1);
        assert_eq!(catalog.damaged_count(DamagedKind::ComponentManifest), 0);
        // Its attempt is not taken for an interrupted set (which retention would delete).
        let attempts = repo.attempts(&cancel).await.expect("attempts");
        let attempt = attempts.iter().find(|a| a.id == DAMAGED).expect("attempt");
        assert_eq!(attempt.state, "running");

        // Retention keeps the newest good set, whatever the rules; the damaged (newer) set is
        // not one and is never a candidate.
        let rules = crate::retention::Rules {
            days: 0,
            keep_last: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        let expired = crate::retention::expired(&catalog.list(), rules, chrono::Utc::now());
        assert!(expired.is_empty(), "{expired:?}");

        // Component damage is named once per object.
        let found = vec![damaged.clone()];
        assert_eq!(catalog.note_damaged_components(found.clone()).len(), 1);
        assert!(catalog.note_damaged_components(found).is_empty());
        assert_eq!(catalog.damaged_count(DamagedKind::ComponentManifest), 1);
    }
}
