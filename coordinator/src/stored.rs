//! What the coordinator does with stored sets: rebuild the catalog from the repository,
//! verify a set's data, delete a set, apply a policy's retention (then GC). Damaged set
//! manifests are not in the catalog (see [`crate::catalog`]), so retention never touches them;
//! GC stops at a damaged component manifest and says which.

use aitbc_backup_repository::damaged::gc_stopped_at;
use aitbc_backup_repository::verify::{VerifyReport, verify_set};

use aitbc_backup_proto::model::RepoKey;
use aitbc_backup_repository::RepoError;

use crate::catalog::{SetRecord, SetState};
use crate::snapshot::Sets;

/// Why the catalog could not be rebuilt (storage unreachable, most likely; retried).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The repository could not be opened (the message names it).
    #[error("{0:#}")]
    Open(anyhow::Error),
    #[error("read the catalog: {0}")]
    Load(RepoError),
}

impl Sets {
    /// Rebuilds the catalog from the repository once (retried on the next call if storage was
    /// unreachable).
    pub async fn catalog_ready(&self) -> Result<(), CatalogError> {
        self.loaded
            .get_or_try_init(|| {
                Box::pin(async {
                    let cancel = self.shutdown.child_token();
                    let repo = Box::pin(self.repo.get(&cancel))
                        .await
                        .map_err(CatalogError::Open)?;
                    let count = Box::pin(self.catalog.load(repo, &cancel))
                        .await
                        .map_err(CatalogError::Load)?;
                    tracing::info!(sets = count, "catalog rebuilt from the repository");
                    self.seed_metrics();
                    Ok(())
                })
            })
            .await
            .map(|_| ())
    }

    /// Verifies a committed set's data; every problem in the report names its object.
    /// Verifies a set; with `key` (an operator's, kept for this call only) where the
    /// coordinator's own credential reads no data.
    pub async fn verify(
        &self,
        set_id: &str,
        read_data: bool,
        key: Option<RepoKey>,
    ) -> anyhow::Result<VerifyReport> {
        let cancel = self.shutdown.child_token();
        let repo = self.repo.get(&cancel).await?;
        let report = match key {
            Some(key) => {
                let repo = repo.with_key(&key_secret(key), &cancel).await?;
                Box::pin(verify_set(&repo, set_id, read_data, &cancel)).await?
            }
            None => Box::pin(verify_set(repo, set_id, read_data, &cancel)).await?,
        };
        Ok(report)
    }

    /// Whether the coordinator reads data by itself (false where a sealed repository gave it
    /// a metadata credential only).
    pub async fn reads_data(&self) -> anyhow::Result<bool> {
        let cancel = self.shutdown.child_token();
        Ok(self.repo.get(&cancel).await?.reads_data())
    }

    /// Deletes a set (committed or aborted) from the repository and the catalog.
    pub async fn delete(&self, record: &SetRecord) -> anyhow::Result<Vec<String>> {
        let cancel = self.shutdown.child_token();
        let repo = self.repo.get(&cancel).await?;
        let deleted = if record.state == SetState::Committed {
            repo.delete_set(&record.id, &cancel).await?
        } else {
            repo.delete_aborted_set(&record.id, &cancel).await?
        };
        self.catalog.remove(&record.id);
        tracing::info!(set = %record.id, manifests = deleted.len(), "snapshot set deleted");
        Ok(deleted)
    }

    /// Applies a policy's retention to its sets, then GC (when configured); returns how many
    /// sets were deleted.
    pub async fn apply_retention(
        &self,
        policy: &str,
        rules: crate::retention::Rules,
        gc: &crate::config::GcSettings,
    ) -> anyhow::Result<usize> {
        let sets: Vec<SetRecord> = self
            .catalog
            .list()
            .into_iter()
            .filter(|s| s.policy == policy)
            .collect();
        let expired = crate::retention::expired(&sets, rules, chrono::Utc::now());
        let mut deleted = 0;
        for id in &expired {
            if let Some(record) = self.catalog.get(id) {
                Box::pin(self.delete(&record)).await?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            tracing::info!(policy, deleted, "retention deleted sets");
            if gc.after_retention {
                let cancel = self.shutdown.child_token();
                let repo = self.repo.get(&cancel).await?;
                let report = Box::pin(aitbc_backup_repository::gc::gc(
                    repo, gc.grace, false, &cancel,
                ))
                .await
                .map_err(|err| match gc_stopped_at(&err) {
                    Some(message) => anyhow::anyhow!(message),
                    None => err.into(),
                })?;
                tracing::info!(
                    deleted_chunks = report.deleted_chunks,
                    deleted_bytes = report.deleted_bytes,
                    in_grace = report.in_grace,
                    writers_in_flight = report.writers_in_flight,
                    "GC after retention"
                );
            }
            self.refresh_repository_metrics().await;
        }
        Ok(deleted)
    }

    /// Extends the Object Locks of everything the kept sets need (see
    /// `aitbc_backup_repository::immutable`); None when the repository has no lock.
    pub async fn extend_locks(
        &self,
    ) -> anyhow::Result<Option<aitbc_backup_repository::immutable::LockReport>> {
        let cancel = self.shutdown.child_token();
        let repo = self.repo.get(&cancel).await?;
        if repo.config().object_lock.is_none() {
            return Ok(None);
        }
        // Lenient: a manifest that cannot be read stops deletions, never the extension of
        // what is known.
        let marked = Box::pin(aitbc_backup_repository::gc::mark(repo, false, &cancel)).await?;
        let report = Box::pin(aitbc_backup_repository::immutable::extend_locks(
            repo, &marked, &cancel,
        ))
        .await?;
        tracing::info!(
            kept_versions = report.kept_versions,
            extended = report.extended,
            requests = report.requests,
            manifests_skipped = report.manifests_skipped,
            "object locks extended"
        );
        Ok(Some(report))
    }

    /// How often [`Sets::extend_locks`] runs on its own: four times within the lock's margin
    /// (so a missed run or two still leaves every kept object locked), between a minute and
    /// six hours. None when the repository has no lock.
    pub async fn lock_upkeep_interval(&self) -> anyhow::Result<Option<std::time::Duration>> {
        let cancel = self.shutdown.child_token();
        let repo = self.repo.get(&cancel).await?;
        Ok(repo.config().object_lock.map(|lock| {
            (lock.margin() / 4).clamp(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(6 * 3600),
            )
        }))
    }
}

/// Keeps what the kept sets need under Object Lock, on a timer, whether or not schedules run
/// (repositories without a lock: returns at once).
pub async fn lock_upkeep(sets: std::sync::Arc<Sets>, cancel: tokio_util::sync::CancellationToken) {
    const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
    let interval = loop {
        match sets.lock_upkeep_interval().await {
            Ok(Some(interval)) => break interval,
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "lock upkeep waits for the repository");
                if !aitbc_backup_backoff::sleep_or_cancel(RETRY, &cancel).await {
                    return;
                }
            }
        }
    };
    loop {
        if let Err(err) = Box::pin(sets.extend_locks()).await {
            tracing::error!(error = %format!("{err:#}"), "extending object locks failed; retried in {interval:?}");
        }
        if !aitbc_backup_backoff::sleep_or_cancel(interval, &cancel).await {
            return;
        }
    }
}

/// The repository library's form of an operator's key.
pub(crate) fn key_secret(key: RepoKey) -> aitbc_backup_repository::KeySecret {
    match key {
        RepoKey::Passphrase(p) => aitbc_backup_repository::KeySecret::Passphrase(p),
        RepoKey::KeyFile(bytes) => aitbc_backup_repository::KeySecret::KeyFile(bytes),
    }
}
