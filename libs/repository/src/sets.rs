//! Snapshot sets beyond their manifests: which sets are pinned, which were attempted, and
//! deleting a set. This is what a coordinator rebuilds its catalog from after a restart.
//!
//! - `pins/<set-id>`: an empty object; its existence pins the set (manifests are never
//!   rewritten, so pinning cannot be a manifest field change).
//! - `attempts/<set-id>.json`: written when a set starts (`running`) and rewritten when it
//!   aborts (`aborted` with the reason). A set is committed exactly when its set manifest
//!   exists; an attempt still `running` without a manifest after a coordinator restart was
//!   interrupted.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::damaged::Damaged;
use crate::error::RepoError;
use crate::layout;
use crate::repo::Repository;
use crate::storage::{PutMode, StorageError};

/// A set's attempt record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub id: String,
    pub policy: String,
    pub mode: String,
    /// RFC 3339, UTC.
    pub started: String,
    /// `running` or `aborted`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// How much the repository holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RepoStats {
    pub chunks: u64,
    /// Bytes of every chunk object.
    pub stored_bytes: u64,
    /// Readable component manifests.
    pub component_manifests: u64,
    /// Bytes of every readable component backup's stream.
    pub logical_bytes: u64,
    /// Component manifests that cannot be read (counted in nothing above).
    pub damaged_component_manifests: Vec<Damaged>,
}

impl Repository {
    /// Counts the chunks and the backups' streams; damaged component manifests are skipped
    /// and named.
    pub async fn stats(&self, cancel: &CancellationToken) -> Result<RepoStats, RepoError> {
        let chunks = self.storage.list(layout::CHUNKS, cancel).await?;
        let components = self.scan_components(cancel).await?;
        Ok(RepoStats {
            chunks: chunks.len() as u64,
            stored_bytes: chunks.iter().map(|c| c.size).sum(),
            component_manifests: components.good.len() as u64,
            logical_bytes: components.good.iter().map(|m| m.raw_size).sum(),
            damaged_component_manifests: components.damaged,
        })
    }

    /// Ids of every set manifest, oldest first.
    pub async fn set_ids(&self, cancel: &CancellationToken) -> Result<Vec<String>, RepoError> {
        let objects = self.storage.list(layout::SET_MANIFESTS, cancel).await?;
        let mut ids: Vec<String> = objects
            .iter()
            .filter_map(|o| layout::manifest_id_of(&o.path).map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Ids of the pinned sets.
    pub async fn pinned_sets(
        &self,
        cancel: &CancellationToken,
    ) -> Result<BTreeSet<String>, RepoError> {
        let objects = self.storage.list(layout::PINS, cancel).await?;
        Ok(objects
            .iter()
            .map(|o| o.path.file_name().to_owned())
            .collect())
    }

    /// Pins or unpins a set.
    pub async fn pin_set(
        &self,
        id: &str,
        pinned: bool,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        if !layout::is_manifest_id(id) {
            return Err(RepoError::NoSuchManifest(id.to_owned()));
        }
        let path = layout::pin(id);
        if pinned {
            self.storage
                .put(&path, Bytes::new(), PutMode::Overwrite, cancel)
                .await?;
        } else {
            self.storage.delete(&path, cancel).await?;
        }
        Ok(())
    }

    /// Writes (or rewrites) a set's attempt record.
    pub async fn record_attempt(
        &self,
        attempt: &Attempt,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        if !layout::is_manifest_id(&attempt.id) {
            return Err(RepoError::NoSuchManifest(attempt.id.clone()));
        }
        let body = serde_json::to_vec_pretty(attempt).unwrap_or_default();
        self.storage
            .put(
                &layout::attempt(&attempt.id),
                Bytes::from(body),
                PutMode::Overwrite,
                cancel,
            )
            .await?;
        Ok(())
    }

    /// Removes a set that never committed: the component manifests its agents committed for it
    /// (their `set_id`), then its attempt record. Returns the component manifests deleted; GC
    /// removes their chunks later. A damaged component manifest is left alone (whose it is
    /// cannot be read); `verify` names it.
    pub async fn delete_aborted_set(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, RepoError> {
        if !layout::is_manifest_id(id) {
            return Err(RepoError::NoSuchManifest(id.to_owned()));
        }
        let mut deleted = Vec::new();
        for manifest in self.scan_components(cancel).await?.good {
            if manifest.set_id == id {
                self.delete_component(&manifest.id, cancel).await?;
                deleted.push(manifest.id);
            }
        }
        self.storage.delete(&layout::attempt(id), cancel).await?;
        Ok(deleted)
    }

    /// Every attempt record, oldest first. An unreadable record is skipped with a warning
    /// (it only describes a set that has no manifest, or one that does).
    pub async fn attempts(&self, cancel: &CancellationToken) -> Result<Vec<Attempt>, RepoError> {
        let mut out = Vec::new();
        for meta in self.storage.list(layout::ATTEMPTS, cancel).await? {
            let bytes = match self.storage.get(&meta.path, cancel).await {
                Ok(bytes) => bytes,
                Err(StorageError::NotFound(_)) => continue,
                Err(err) => return Err(err.into()),
            };
            match serde_json::from_slice::<Attempt>(&bytes) {
                Ok(attempt) => out.push(attempt),
                Err(err) => {
                    tracing::warn!(object = %meta.path, error = %err, "unreadable attempt record")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Deletes a set: its manifest first (the set is gone from that instant), then the component
    /// manifests no other set names, then its attempt record and pin. Returns the component
    /// manifests deleted; GC removes their chunks later.
    ///
    /// While another set manifest is damaged, what it names is unknown: a component manifest
    /// is then deleted only when it was written for this set (its `set_id`), which no other
    /// set names; the rest are kept (a leak, never a dangling reference).
    pub async fn delete_set(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, RepoError> {
        let manifest = self.set(id, cancel).await?;
        self.storage
            .delete(&layout::set_manifest(id), cancel)
            .await?;
        let others = self.scan_sets(cancel).await?;
        let still_named: BTreeSet<String> = others
            .good
            .into_iter()
            .flat_map(|set| set.components.into_iter().map(|c| c.manifest_id))
            .collect();
        let mut deleted = Vec::new();
        for component in manifest.components {
            if still_named.contains(&component.manifest_id) {
                continue;
            }
            if !others.damaged.is_empty()
                && !self
                    .written_for_set(&component.manifest_id, id, cancel)
                    .await?
            {
                continue;
            }
            self.delete_component(&component.manifest_id, cancel)
                .await?;
            deleted.push(component.manifest_id);
        }
        self.storage.delete(&layout::attempt(id), cancel).await?;
        self.storage.delete(&layout::pin(id), cancel).await?;
        Ok(deleted)
    }

    /// Whether component manifest `component` was written for set `set_id` (false when it
    /// cannot be read or is gone).
    async fn written_for_set(
        &self,
        component: &str,
        set_id: &str,
        cancel: &CancellationToken,
    ) -> Result<bool, RepoError> {
        match self.component(component, cancel).await {
            Ok(manifest) => Ok(manifest.set_id == set_id),
            Err(err @ (RepoError::Storage(_) | RepoError::Cancelled | RepoError::Io(_))) => {
                Err(err)
            }
            Err(_) => Ok(false),
        }
    }
}
