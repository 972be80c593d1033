//! Helpers for the agent's unit tests.

use std::path::Path;

use aitbc_backup_repository::Repository;
use aitbc_backup_repository::chunker::ChunkerParams;
use aitbc_backup_repository::open::{RepoUrl, S3Options, open_storage};
use aitbc_backup_repository::storage::StorageLimits;
use tokio_util::sync::CancellationToken;

/// A new unencrypted local repository in `dir`, and its URL.
pub async fn local_repository(dir: &Path) -> (String, Repository) {
    let url = format!("file://{}", dir.display());
    let storage = open_storage(
        &RepoUrl::parse(&url).expect("url"),
        &S3Options::default(),
        StorageLimits::default(),
    )
    .await
    .expect("storage");
    let repo = Repository::init(
        storage,
        ChunkerParams::default(),
        None,
        &CancellationToken::new(),
    )
    .await
    .expect("init");
    (url, repo)
}
