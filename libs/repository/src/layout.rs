//! Where each kind of object lives. `docs/repository-format.md` documents the same layout.

use crate::path::RemotePath;

pub const CONFIG: &str = "config";
pub const KEYS: &str = "keys/";
pub const REVOKED_KEYS: &str = "keys-revoked/";
pub const AUDIT: &str = "audit/";
/// The keyring of sealed repositories (see [`crate::sealed::keyring`]): keys, revocations,
/// epochs, grants, the audit log and, in an upgraded version 1 repository, the upgrade record.
pub const KEYRING: &str = "keyring/";
pub const SEALED_KEYS: &str = "keyring/keys/";
pub const SEALED_REVOKED: &str = "keyring/revoked/";
pub const EPOCHS: &str = "keyring/epochs/";
pub const GRANTS: &str = "keyring/grants/";
pub const SEALED_AUDIT: &str = "keyring/audit/";
pub const CHUNKS: &str = "chunks/";
pub const COMPONENT_MANIFESTS: &str = "manifests/components/";
pub const SET_MANIFESTS: &str = "manifests/sets/";
pub const GC_CONDEMNED: &str = "gc/";
/// Writers in flight and sweeps in progress (see [`crate::locks`]).
pub const WRITER_LOCKS: &str = "locks/writers/";
pub const SWEEP_LOCKS: &str = "locks/sweeps/";
pub const PINS: &str = "pins/";
/// What a writer keeps between backups (its file cache and page maps), readable by the
/// writers of its component only (see [`crate::Repository::put_writer_state`]).
pub const WRITER_STATE: &str = "state/";
pub const ATTEMPTS: &str = "attempts/";
/// Archived PostgreSQL WAL (see [`crate::wal`]).
pub const WAL_SEGMENTS: &str = "wal/segments/";
pub const WAL_PARTIAL: &str = "wal/partial/";
pub const WAL_HISTORY: &str = "wal/history/";

pub(crate) fn path(text: String) -> RemotePath {
    // Every caller passes hex ids or fixed names, which are always valid keys.
    RemotePath::new(text).unwrap_or_else(|err| panic!("layout produced {err}"))
}

pub fn config() -> RemotePath {
    path(CONFIG.to_owned())
}

pub fn chunk(id_hex: &str) -> RemotePath {
    path(format!("{CHUNKS}{}/{id_hex}", &id_hex[..2]))
}

pub fn component_manifest(id: &str) -> RemotePath {
    path(format!("{COMPONENT_MANIFESTS}{id}.json"))
}

pub fn set_manifest(id: &str) -> RemotePath {
    path(format!("{SET_MANIFESTS}{id}.json"))
}

pub fn writer_state(component: &str, name: &str) -> RemotePath {
    path(format!("{WRITER_STATE}{component}/{name}"))
}

pub fn pin(set_id: &str) -> RemotePath {
    path(format!("{PINS}{set_id}"))
}

pub fn attempt(set_id: &str) -> RemotePath {
    path(format!("{ATTEMPTS}{set_id}.json"))
}

pub fn key(id: &str) -> RemotePath {
    path(format!("{KEYS}{id}.json"))
}

pub fn revoked_key(id: &str) -> RemotePath {
    path(format!("{REVOKED_KEYS}{id}.json"))
}

pub fn sealed_key(id: &str) -> RemotePath {
    path(format!("{SEALED_KEYS}{id}.json"))
}

pub fn sealed_revoked(id: &str) -> RemotePath {
    path(format!("{SEALED_REVOKED}{id}.json"))
}

/// An upgraded version 1 repository's record of its root public key.
pub fn upgrade() -> RemotePath {
    path(format!("{KEYRING}upgrade.json"))
}

pub fn epoch(epoch: u32) -> RemotePath {
    path(format!("{EPOCHS}{epoch:010}.json"))
}

pub fn grant(epoch: u32, nonce: &str, key_id: &str) -> RemotePath {
    path(format!("{GRANTS}{epoch:010}-{nonce}/{key_id}.json"))
}

/// A new, time-ordered name under `dir` (`audit/`, `gc/`): `<UTC timestamp>-<random>.json`.
pub fn timestamped(dir: &str) -> RemotePath {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    path(format!("{dir}{now}-{:08x}.json", rand::random::<u32>()))
}

/// A new manifest id: sortable by creation time, unique without coordination.
pub fn new_manifest_id() -> String {
    let now = chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ");
    format!("{now}-{:08x}", rand::random::<u32>())
}

/// Whether `id` has the shape of a manifest id (so it can be put in a key safely).
pub fn is_manifest_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The id of a component or set manifest from its key.
pub fn manifest_id_of(path: &RemotePath) -> Option<&str> {
    path.file_name().strip_suffix(".json")
}

/// Whether objects at `path` are written under the repository's Object Lock: the data and
/// everything that describes it (config, keys, audit, chunks, manifests, archived WAL). Locks,
/// GC lists, pins and attempt records change by design and are never locked.
pub fn is_lockable(path: &RemotePath) -> bool {
    let key = path.as_str();
    key == CONFIG
        || [
            KEYS,
            REVOKED_KEYS,
            AUDIT,
            KEYRING,
            CHUNKS,
            "manifests/",
            "wal/",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}
