//! The `postgres` component: logical backups of a PostgreSQL server at a cut (exported
//! snapshots, `pg_dump`), restored with `pg_restore --jobs` under a temporary name and swapped in.
//!
//! - [`config`]: the `[postgres]` section.
//! - [`archive`]: data offsets for dumps written to a pipe.
//! - [`server`]: connections and client tools.
//! - [`cut`]: prepare, fence, export the snapshots.
//! - [`backup`], [`restore`]: the two directions.
//! - [`wal_archive`]: continuous WAL archiving (`pg_receivewal` into the repository).
//! - [`base_backup`], [`pitr`]: physical base backups and point-in-time recovery.

pub mod archive;
pub mod backup;
pub mod base_backup;
pub mod component;
pub mod config;
pub mod cut;
pub mod pitr;
pub mod restore;
pub mod server;
pub mod wal_archive;

pub use config::PostgresSettings;
