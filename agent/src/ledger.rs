//! The `ledger` component: a blockchain node's data directory (SQLite databases plus plain
//! files), backed up at a cut anchored to a block height and restored through a staging
//! directory.
//!
//! - [`config`]: the `[ledger]` section.
//! - [`scan`]: what is in the data directory.
//! - [`sqlite`]: consistent capture, integrity and hash-chain checks.
//! - [`held`]: the databases this process holds open, which nothing else may open (read it
//!   before touching the data directory while a backup runs).
//! - [`archive`]: the tar stream's layout (groups that make unchanged files free).
//! - [`cache`]: the file cache between backups.
//! - [`backup`], [`restore`]: the two directions (restores unpack through
//!   [`crate::confined`]).

pub mod archive;
pub mod backup;
pub mod cache;
pub mod component;
pub mod config;
pub mod held;
pub mod pages;
pub mod restore;
pub mod scan;
pub mod sqlite;

pub use config::LedgerSettings;
