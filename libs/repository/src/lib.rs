//! The repository: content-addressed, deduplicated, compressed, optionally encrypted storage on
//! S3 or a local directory. The on-storage format is documented in `docs/repository-format.md`.
//!
//! - [`storage`]: object storage backends behind one retrying, time-limited, cancellable layer.
//! - [`repo`]: opening and creating repositories; chunk encoding; manifest commits.
//! - [`backup`] / [`restore`]: the bounded stream pipelines.
//! - [`sets`]: pins, attempt records and deletion of snapshot sets.
//! - [`verify`], [`gc`], [`locks`]: integrity checks, garbage collection and the locks that
//!   keep it from deleting what a backup in flight relies on.
//! - [`damaged`]: manifests that cannot be read, named and skipped by listings.
//! - [`immutable`]: S3 Object Lock: the bucket check, lock extension, reads that fall back to
//!   the version that verifies.
//! - [`keys`], [`crypto`], [`sealed`]: key management and encryption (the sealed scheme:
//!   least knowledge, writers that cannot read).
//! - [`manifest`], [`layout`], [`chunker`], [`path`]: the format's pieces.

pub mod backup;
pub mod chunker;
mod clock;
pub mod crypto;
pub mod damaged;
pub mod digest;
mod error;
pub mod gc;
pub mod immutable;
pub mod keys;
pub mod layout;
pub mod locks;
pub mod manifest;
pub mod open;
pub mod path;
pub mod repo;
pub mod restore;
pub mod sealed;
pub mod sets;
pub mod storage;
pub mod verify;
pub mod wal;

pub use backup::{
    BackupRequest, ChunkSink, Progress, backup, backup_async, backup_with, widen_pipe,
};
pub use chunker::ChunkerParams;
pub use damaged::{Damaged, DamagedKind, Scanned};
pub use error::RepoError;
pub use keys::KeySecret;
pub use open::{RepoUrl, S3Options, open_storage};
pub use repo::{ObjectLock, RepoSettings, Repository};
pub use restore::{part, restore, restore_to_file, restore_to_new_file, restore_with};
pub use storage::{Storage, StorageError, StorageLimits};
