//! The `postgres` component: logical backups of a PostgreSQL server at a cut (exported
//! snapshots, `pg_dump`), restored with `pg_restore --jobs` under a temporary name and swapped in.
//!
//! - [`config`]: the `[postgres]` section.
//! - [`archive`]: data offsets for dumps written to a pipe.
//! - [`server`]: connections and client tools.
//! - [`cut`]: prepare, fence, export the snapshots.
//! - [`backup`], [`restore`]: the two directions.

pub mod archive;
pub mod backup;
pub mod config;
pub mod cut;
pub mod restore;
pub mod server;

pub use config::PostgresSettings;
