//! The `redis` component: snapshots of a running Redis over its replication protocol (the
//! agent is a replica for a backup, a master for a restore), so there is no shared volume, no
//! BGSAVE file and no restart.
//!
//! - [`config`]: the `[redis]` section.
//! - [`resp`]: a small blocking RESP client.
//! - [`sync`]: the framing of the replication stream.
//! - [`rdb`]: walking an RDB stream (counts, samples, completeness).
//! - [`backup`], [`restore`]: the two directions.

pub mod backup;
pub mod component;
pub mod config;
pub mod rdb;
pub mod resp;
pub mod restore;
pub mod sync;

pub use config::RedisSettings;
