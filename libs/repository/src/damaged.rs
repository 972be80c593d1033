//! Damaged objects: a manifest that exists but cannot be read — its checksum does not match
//! (a changed byte), it is not JSON, it fails authentication (encrypted repositories), or its
//! format version is newer than this program. A damaged object is named and skipped, never
//! fatal for the rest: listings, the coordinator's catalog and retention go on with the good
//! objects and report the damaged ones beside them; `verify` fails naming them.
//!
//! The one exception is GC: it must know every reference before it deletes anything, so it
//! stops at a damaged component manifest (see [`gc_stopped_at`] for what to tell the operator).
//!
//! Storage errors (an unreachable server, a timeout) are not damage: they stay errors, so a
//! listing never silently omits objects it merely could not fetch.

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::RepoError;
use crate::layout;
use crate::manifest::{ComponentManifest, SetManifest};
use crate::repo::Repository;

/// What kind of object is damaged (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DamagedKind {
    SetManifest,
    ComponentManifest,
}

impl DamagedKind {
    pub const ALL: [DamagedKind; 2] = [DamagedKind::SetManifest, DamagedKind::ComponentManifest];

    pub fn as_str(self) -> &'static str {
        match self {
            DamagedKind::SetManifest => "set_manifest",
            DamagedKind::ComponentManifest => "component_manifest",
        }
    }
}

/// One damaged object: what it is, its key and why it cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Damaged {
    pub kind: DamagedKind,
    /// The manifest id.
    pub id: String,
    /// The object key, e.g. `manifests/sets/<id>.json`.
    pub object: String,
    pub reason: String,
}

impl Damaged {
    /// The damage `err` describes, if it is damage (not a storage error or a missing object).
    pub fn from_error(kind: DamagedKind, id: &str, err: &RepoError) -> Option<Damaged> {
        let reason = match err {
            RepoError::Manifest { source, .. } => source.to_string(),
            RepoError::Corrupt { reason, .. } => reason.clone(),
            _ => return None,
        };
        let object = match kind {
            DamagedKind::SetManifest => layout::set_manifest(id),
            DamagedKind::ComponentManifest => layout::component_manifest(id),
        };
        Some(Damaged {
            kind,
            id: id.to_owned(),
            object: object.to_string(),
            reason,
        })
    }
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is damaged: {}", self.object, self.reason)
    }
}

/// The readable manifests of one kind and the damaged ones, each oldest first.
#[derive(Debug, Clone)]
pub struct Scanned<T> {
    pub good: Vec<T>,
    pub damaged: Vec<Damaged>,
}

impl Repository {
    /// Every component manifest that can be read (oldest first) and every damaged one.
    /// Storage errors still fail the whole listing.
    pub async fn scan_components(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Scanned<ComponentManifest>, RepoError> {
        let mut out = Scanned {
            good: Vec::new(),
            damaged: Vec::new(),
        };
        for id in self.component_ids(cancel).await? {
            match self.component(&id, cancel).await {
                Ok(manifest) => out.good.push(manifest),
                // Removed since the listing (retention, forget): not damage, just gone.
                Err(RepoError::NoSuchManifest(_)) => {}
                Err(err) => match Damaged::from_error(DamagedKind::ComponentManifest, &id, &err) {
                    Some(damaged) => out.damaged.push(damaged),
                    None => return Err(err),
                },
            }
        }
        out.good
            .sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        out.damaged.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Every set manifest that can be read (oldest first) and every damaged one. Storage
    /// errors still fail the whole listing.
    pub async fn scan_sets(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Scanned<SetManifest>, RepoError> {
        let mut out = Scanned {
            good: Vec::new(),
            damaged: Vec::new(),
        };
        for id in self.set_ids(cancel).await? {
            match self.set(&id, cancel).await {
                Ok(manifest) => out.good.push(manifest),
                Err(RepoError::NoSuchManifest(_)) => {}
                Err(err) => match Damaged::from_error(DamagedKind::SetManifest, &id, &err) {
                    Some(damaged) => out.damaged.push(damaged),
                    None => return Err(err),
                },
            }
        }
        Ok(out)
    }
}

/// When GC stopped at a damaged manifest: the message an operator needs (which object, that
/// nothing was deleted, what to do). None for any other error.
pub fn gc_stopped_at(err: &RepoError) -> Option<String> {
    let (object, reason) = match err {
        RepoError::Manifest { object, source } => (object.as_str(), source.to_string()),
        RepoError::Corrupt { object, reason } if !object.starts_with(layout::CHUNKS) => {
            (object.as_str(), reason.clone())
        }
        _ => return None,
    };
    let remove = match object
        .strip_prefix(layout::COMPONENT_MANIFESTS)
        .and_then(|name| name.strip_suffix(".json"))
    {
        Some(id) => format!("`aitbc-backup repo forget {id}`"),
        None => "deleting the object".to_owned(),
    };
    Some(format!(
        "GC stopped: manifest {object} is damaged ({reason}). Nothing was deleted: GC deletes \
         only with every reference known, and this manifest's chunks are unknown. Restore the \
         object from a copy of the repository, or remove it deliberately with {remove} \
         (its backup is lost), then run GC again"
    ))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::manifest::{ManifestError, SetComponent};
    use crate::storage::{Backend, LocalStorage, Storage, StorageLimits};
    use crate::{BackupRequest, ChunkerParams, Progress};

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

    async fn put(repo: &Repository, name: &str, set_id: &str) -> String {
        let request = BackupRequest {
            name: name.to_owned(),
            set_id: set_id.to_owned(),
            stream: "raw".to_owned(),
            ..BackupRequest::default()
        };
        let data = std::io::Cursor::new(format!("the stream of {name}").into_bytes());
        let progress = Arc::new(Progress::default());
        crate::backup(repo, data, request, progress, &CancellationToken::new())
            .await
            .expect("backup")
            .id
    }

    async fn commit_set(repo: &Repository, id: &str, components: &[&str]) {
        let manifest = SetManifest {
            id: id.to_owned(),
            created: "2030-01-01T00:00:00.000Z".to_owned(),
            policy: "default".to_owned(),
            mode: "coordinated".to_owned(),
            components: components
                .iter()
                .map(|c| SetComponent {
                    name: "agent".to_owned(),
                    manifest_id: (*c).to_owned(),
                    consistency: None,
                })
                .collect(),
            cut_skew_ms: 0.0,
            write_pause_ms: 0.0,
            pinned: false,
        };
        repo.commit_set(&manifest, &CancellationToken::new())
            .await
            .expect("commit set");
    }

    /// Changes one byte inside a stored manifest's body (its checksum no longer matches).
    fn damage(path: &Path) {
        let mut bytes = std::fs::read(path).expect("read manifest");
        let needle = b"\"created\":\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("a created field")
            + needle.len();
        bytes[at] ^= 1;
        std::fs::write(path, bytes).expect("write manifest");
    }

    #[tokio::test]
    async fn scans_name_damaged_manifests_and_return_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repository(dir.path()).await;
        let cancel = CancellationToken::new();
        let good = put(&repo, "good", "").await;
        let bad = put(&repo, "bad", "").await;
        damage(&dir.path().join(format!("manifests/components/{bad}.json")));
        commit_set(&repo, "20300101T000000000Z-00000001", &[&good]).await;
        commit_set(&repo, "20300101T000000000Z-00000002", &[&bad]).await;
        damage(
            &dir.path()
                .join("manifests/sets/20300101T000000000Z-00000002.json"),
        );

        let components = repo.scan_components(&cancel).await.expect("scan");
        assert_eq!(
            components.good.iter().map(|m| &m.id).collect::<Vec<_>>(),
            [&good]
        );
        assert_eq!(components.damaged.len(), 1);
        assert_eq!(components.damaged[0].kind, DamagedKind::ComponentManifest);
        assert_eq!(
            components.damaged[0].object,
            format!("manifests/components/{bad}.json")
        );
        assert!(components.damaged[0].reason.contains("checksum"));

        let stats = repo.stats(&cancel).await.expect("stats");
        assert_eq!(stats.component_manifests, 1);
        assert_eq!(stats.damaged_component_manifests, components.damaged);

        let sets = repo.scan_sets(&cancel).await.expect("scan");
        assert_eq!(sets.good.len(), 1);
        assert_eq!(sets.damaged.len(), 1);
        assert_eq!(sets.damaged[0].id, "20300101T000000000Z-00000002");
        assert_eq!(sets.damaged[0].kind.as_str(), "set_manifest");
    }

    #[tokio::test]
    async fn deleting_a_set_keeps_what_a_damaged_set_may_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repository(dir.path()).await;
        let cancel = CancellationToken::new();
        let (kept_set, damaged_set) = (
            "20300101T000000000Z-00000001",
            "20300101T000000000Z-00000002",
        );
        // `own` was written for the set being deleted; `foreign` for the damaged one, which may
        // name it.
        let own = put(&repo, "own", kept_set).await;
        let foreign = put(&repo, "foreign", damaged_set).await;
        commit_set(&repo, kept_set, &[&own, &foreign]).await;
        commit_set(&repo, damaged_set, &[&foreign]).await;
        damage(
            &dir.path()
                .join(format!("manifests/sets/{damaged_set}.json")),
        );

        let deleted = repo.delete_set(kept_set, &cancel).await.expect("delete");
        assert_eq!(deleted, [own]);
        let left = repo.component_ids(&cancel).await.expect("ids");
        assert_eq!(left, [foreign]);
    }

    #[test]
    fn damage_is_a_manifest_or_corruption_error_and_nothing_else() {
        let id = "20990101T000000000Z-00000000";
        let damaged = Damaged::from_error(
            DamagedKind::SetManifest,
            id,
            &RepoError::Manifest {
                object: layout::set_manifest(id).to_string(),
                source: ManifestError::Checksum,
            },
        )
        .expect("damage");
        assert_eq!(damaged.object, format!("manifests/sets/{id}.json"));
        assert!(damaged.reason.contains("checksum"), "{}", damaged.reason);
        assert!(
            Damaged::from_error(
                DamagedKind::ComponentManifest,
                id,
                &RepoError::Storage(crate::storage::StorageError::Cancelled),
            )
            .is_none()
        );
        assert!(
            Damaged::from_error(DamagedKind::ComponentManifest, id, &RepoError::Cancelled)
                .is_none()
        );
    }

    #[test]
    fn gc_stopped_at_names_the_manifest_and_the_way_out() {
        let id = "20990101T000000000Z-00000000";
        let message = gc_stopped_at(&RepoError::Manifest {
            object: layout::component_manifest(id).to_string(),
            source: ManifestError::Checksum,
        })
        .expect("a damaged manifest");
        assert!(message.contains(&format!("manifests/components/{id}.json")));
        assert!(message.contains("Nothing was deleted"));
        assert!(message.contains(&format!("aitbc-backup repo forget {id}")));
        assert!(gc_stopped_at(&RepoError::Cancelled).is_none());
    }
}
