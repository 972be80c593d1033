//! Archived PostgreSQL write-ahead log: one small manifest per WAL file, its data chunked,
//! compressed, encrypted and deduplicated like every other stream.
//!
//! ```text
//! wal/segments/<24-hex segment name>.json         a completed segment (never overwritten)
//! wal/partial/<segment name>-<unix micros>.json    the segment being written, as of that time
//! wal/history/<8-hex timeline>.json               a timeline history file
//! ```
//! A partial upload is superseded by a newer one of the same segment and by the completed
//! segment; restore to "latest" uses the newest partial of the last segment, which is what
//! bounds the data lost with the server to the upload interval.
//!
//! Which segments a recovery needs ([`plan`]) follows the timeline history: segment `n` is read
//! from the newest timeline of the target's history that had begun by it, the rule PostgreSQL
//! itself applies. Any such segment not stored is a gap, and a gap refuses the restore.

mod catalog;
mod names;
mod retention;
mod timeline;
mod writer;

pub use catalog::{Catalog, End, fetch, manifests};
pub use names::{Segment, WalFile, format_lsn, parse_lsn};
pub use retention::{BaseBackup, Pruned, Retained, base_backups, prune, retain};
pub use timeline::{ChainError, ChainReport, History, Plan, histories, plan, verify_chains};
pub use writer::WalWriter;

/// The `stream` of a WAL file's manifest.
pub const STREAM: &str = "wal";

#[cfg(test)]
mod tests;
