//! Component and set manifests: the only truth about what a repository holds.
//!
//! A manifest is stored as an envelope `{"format", "version", "blake3", "body"}` where `blake3`
//! is the hash of the body's exact bytes, so any change to a stored manifest is detected. In an
//! encrypted repository the whole envelope is sealed. Manifests are created once
//! (create-only put) and never overwritten.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The newest format version this reader understands. Version 2 adds chunk slices
/// ([`ChunkRef::slice`]); a manifest is written as version 1 unless it uses them, so readers of
/// version 1 keep reading everything else.
pub const MANIFEST_VERSION: u32 = 2;
/// The version of manifests without slices, and of set manifests.
pub const BASE_VERSION: u32 = 1;
pub const COMPONENT_FORMAT: &str = "aitbc-backup/component-manifest";
pub const SET_FORMAT: &str = "aitbc-backup/set-manifest";

/// One chunk of a stream, in stream order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Hex chunk id (BLAKE3 of the raw bytes; keyed in encrypted repositories).
    pub id: String,
    /// Length of the chunk's raw bytes.
    pub raw_len: u32,
    /// Length of the stored object (after compression and encryption).
    pub stored_len: u32,
    /// Only part of the chunk belongs to the stream here (format version 2): page-granular
    /// databases reference single pages of chunks stored by earlier backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<Slice>,
}

/// `len` bytes of a chunk's raw bytes, from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slice {
    pub offset: u32,
    pub len: u32,
}

impl ChunkRef {
    /// The whole chunk.
    pub fn whole(id: String, raw_len: u32, stored_len: u32) -> Self {
        ChunkRef {
            id,
            raw_len,
            stored_len,
            slice: None,
        }
    }

    /// How many bytes of the stream this reference stands for.
    pub fn stream_len(&self) -> u32 {
        self.slice.map_or(self.raw_len, |s| s.len)
    }

    /// The range of the chunk's raw bytes that belongs to the stream.
    pub fn range(&self) -> std::ops::Range<usize> {
        match self.slice {
            Some(s) => s.offset as usize..s.offset as usize + s.len as usize,
            None => 0..self.raw_len as usize,
        }
    }

    /// False when a slice reaches past the chunk's end (a damaged or hand-made manifest).
    pub fn slice_in_bounds(&self) -> bool {
        self.slice
            .is_none_or(|s| u64::from(s.offset) + u64::from(s.len) <= u64::from(self.raw_len))
    }
}

/// A file inside a tar stream: where its header starts and its data length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub offset: u64,
    pub size: u64,
    /// The file's content as read from the source at backup time (see [`crate::digest`]);
    /// absent for files whose bytes the backup reused without reading them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<FileDigest>,
}

/// A digest of a file's data: `size` bytes from `data_offset` in the stream (after the tar
/// header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub data_offset: u64,
    /// BLAKE3, hex.
    pub blake3: String,
}

/// Where a component was captured, per component kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConsistencyPoint {
    Postgres {
        /// WAL position at the cut (`pg_current_wal_lsn()`, or the replay position on a standby).
        lsn: String,
        /// The exported snapshot of the first database (each database's is in `databases`).
        snapshot: String,
        system_identifier: String,
        timeline: u32,
        server_version: String,
        /// `pg_current_snapshot()` of the cut: xmin:xmax:xip-list.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        txid_snapshot: String,
        /// Every database in the backup, with what restore needs and checks.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        databases: Vec<PgDatabase>,
        /// With WAL archiving: the restore point written at the cut (`aitbc-set-<set id>`) and
        /// its LSN, which a point-in-time restore can stop at.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        restore_point: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        restore_point_lsn: String,
    },
    /// A physical base backup (`pg_basebackup` tar stream): restorable with the archived WAL
    /// from `start_lsn` to at least `end_lsn`.
    PostgresBase {
        start_lsn: String,
        end_lsn: String,
        timeline: u32,
        wal_segment_size: u64,
        system_identifier: String,
        server_version: String,
        /// RFC 3339, UTC: when the backup ended (the earliest time it can be recovered to).
        finished: String,
    },
    Redis {
        /// The master's replication id and offset at the fork.
        replid: String,
        offset: u64,
        version: String,
        #[serde(default)]
        rdb_version: u32,
        #[serde(default)]
        used_memory: u64,
        /// Keys per database, counted in the stream itself.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        databases: Vec<RedisDb>,
        /// Keys whose values restore compares (`DUMP`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        samples: Vec<RedisSample>,
        /// False when the stream held a value type the agent could not walk (counts unknown).
        #[serde(default)]
        counted: bool,
        /// True when the RDB holds no LZF-compressed string (the server saved it with
        /// `rdbcompression no`): samples are then compared with uncompressed `DUMP` output.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        uncompressed: bool,
    },
    Ledger {
        height: u64,
        hash: String,
    },
}

/// One database of a PostgreSQL backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgDatabase {
    pub name: String,
    /// The snapshot its dump was taken at.
    pub snapshot: String,
    /// `pg_current_snapshot()` in that snapshot: which transactions the dump contains.
    pub txid_snapshot: String,
    pub owner: String,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// Rows per table (`schema.table`, quoted where needed) at the cut; restore checks them.
    pub row_counts: std::collections::BTreeMap<String, u64>,
}

/// One Redis database of an RDB stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisDb {
    pub db: u32,
    pub keys: u64,
    /// Keys with a time to live.
    pub expires: u64,
}

/// A key whose value a restore checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisSample {
    pub db: u32,
    /// The key name, hex (names are binary-safe).
    pub key_hex: String,
    /// BLAKE3 of the value as `DUMP` serializes it (type byte and value, without its footer).
    pub value_blake3: String,
    /// Absolute expiry, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_ms: Option<i64>,
}

/// What a backup wrote (informational; not needed to restore).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentManifest {
    pub id: String,
    /// A label: the component's or the stream's name.
    pub name: String,
    /// The snapshot set this backup was made for; empty for a backup on its own. Lets the
    /// manifests of an aborted set be found and removed with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub set_id: String,
    /// What the stream is: `raw`, `tar`, `pg_dump`, `rdb`, ...
    pub stream: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub raw_size: u64,
    pub chunks: Vec<ChunkRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<ConsistencyPoint>,
    pub stats: BackupStats,
    /// Sealed repositories: the component whose secret keyed this backup's chunk ids and cut
    /// points (see [`crate::sealed`]); empty elsewhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keyed_by: String,
}

/// A manifest that names itself (its id must match the key it is stored under).
pub trait Identified {
    fn id(&self) -> &str;
}

impl Identified for ComponentManifest {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Identified for SetManifest {
    fn id(&self) -> &str {
        &self.id
    }
}

impl ComponentManifest {
    /// The format version this manifest needs: 2 when it references chunk slices.
    pub fn format_version(&self) -> u32 {
        if self.chunks.iter().any(|c| c.slice.is_some()) {
            MANIFEST_VERSION
        } else {
            BASE_VERSION
        }
    }
}

/// One component of a snapshot set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetComponent {
    pub name: String,
    pub manifest_id: String,
    pub consistency: Option<ConsistencyPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetManifest {
    pub id: String,
    pub created: String,
    /// The policy that made the set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy: String,
    /// `independent`, `coordinated` or `fenced`.
    pub mode: String,
    pub components: Vec<SetComponent>,
    /// Spread of the cut instants, milliseconds.
    pub cut_skew_ms: f64,
    /// How long writers were blocked (fenced mode), milliseconds.
    pub write_pause_ms: f64,
    /// Always false when written; pins are `pins/<set-id>` objects (manifests are immutable).
    #[serde(default)]
    pub pinned: bool,
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    format: String,
    version: u32,
    blake3: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a manifest: {0}")]
    NotAManifest(String),
    #[error("manifest is a `{found}`, expected `{expected}`")]
    WrongFormat {
        expected: &'static str,
        found: String,
    },
    #[error("manifest format version {0} is newer than this reader (supports {MANIFEST_VERSION})")]
    UnsupportedVersion(u32),
    #[error("manifest checksum mismatch: the stored manifest was modified or damaged")]
    Checksum,
    #[error("manifest body: {0}")]
    Body(String),
}

/// Serializes a manifest body into its envelope, marked as format `version`.
pub fn encode<T: Serialize>(format: &'static str, version: u32, body: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    let body = serde_json::to_string(body).unwrap_or_default();
    let raw = RawValue::from_string(body).unwrap_or_else(|_| {
        RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!())
    });
    let envelope = Envelope {
        format: format.to_owned(),
        version,
        blake3: blake3::hash(raw.get().as_bytes()).to_hex().to_string(),
        body: &raw,
    };
    serde_json::to_vec_pretty(&envelope).unwrap_or_default()
}

/// Parses and checks an envelope, then its body.
pub fn decode<T: for<'de> Deserialize<'de>>(
    format: &'static str,
    bytes: &[u8],
) -> Result<T, ManifestError> {
    let envelope: Envelope<'_> =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::NotAManifest(e.to_string()))?;
    if envelope.format != format {
        return Err(ManifestError::WrongFormat {
            expected: format,
            found: envelope.format,
        });
    }
    if envelope.version > MANIFEST_VERSION || envelope.version == 0 {
        return Err(ManifestError::UnsupportedVersion(envelope.version));
    }
    if blake3::hash(envelope.body.get().as_bytes())
        .to_hex()
        .as_str()
        != envelope.blake3
    {
        return Err(ManifestError::Checksum);
    }
    serde_json::from_str(envelope.body.get()).map_err(|e| ManifestError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 manifest exactly as written by this release; it must parse forever.
    const GOLDEN_V1: &str = include_str!("../testdata/component-manifest-v1.json");

    #[test]
    fn golden_v1_parses() {
        let manifest: ComponentManifest =
            decode(COMPONENT_FORMAT, GOLDEN_V1.as_bytes()).expect("golden v1");
        assert_eq!(manifest.id, "20261126T120000Z-0a1b2c3d");
        assert_eq!(manifest.raw_size, 3_145_728);
        assert_eq!(manifest.chunks.len(), 2);
        assert_eq!(manifest.chunks[1].raw_len, 2_097_152);
        assert_eq!(manifest.files[0].path, "chain/chain.db");
        assert_eq!(
            manifest.consistency,
            Some(ConsistencyPoint::Ledger {
                height: 1234,
                hash: "ab".repeat(32)
            })
        );
    }

    #[test]
    fn round_trip_and_tamper() {
        let manifest: ComponentManifest =
            decode(COMPONENT_FORMAT, GOLDEN_V1.as_bytes()).expect("golden");
        let bytes = encode(COMPONENT_FORMAT, manifest.format_version(), &manifest);
        assert!(String::from_utf8_lossy(&bytes).contains("\"version\": 1"));
        let back: ComponentManifest = decode(COMPONENT_FORMAT, &bytes).expect("decode");
        assert_eq!(back, manifest);
        let tampered = String::from_utf8(bytes)
            .expect("utf-8")
            .replace("3145728", "3145729");
        assert_eq!(
            decode::<ComponentManifest>(COMPONENT_FORMAT, tampered.as_bytes()),
            Err(ManifestError::Checksum)
        );
        let future = GOLDEN_V1.replace("\"version\": 1", "\"version\": 7");
        assert_eq!(
            decode::<ComponentManifest>(COMPONENT_FORMAT, future.as_bytes()),
            Err(ManifestError::UnsupportedVersion(7))
        );
        assert!(matches!(
            decode::<SetManifest>(SET_FORMAT, GOLDEN_V1.as_bytes()),
            Err(ManifestError::WrongFormat { .. })
        ));
    }

    #[test]
    fn slices_make_a_version_2_manifest() {
        let mut manifest: ComponentManifest =
            decode(COMPONENT_FORMAT, GOLDEN_V1.as_bytes()).expect("golden");
        let mut sliced = manifest.chunks[1].clone();
        sliced.slice = Some(Slice {
            offset: 4096,
            len: 8192,
        });
        assert_eq!((sliced.stream_len(), sliced.range()), (8192, 4096..12288));
        assert!(sliced.slice_in_bounds());
        manifest.chunks.push(sliced.clone());
        manifest.raw_size += 8192;
        let bytes = encode(COMPONENT_FORMAT, manifest.format_version(), &manifest);
        assert!(String::from_utf8_lossy(&bytes).contains("\"version\": 2"));
        let back: ComponentManifest = decode(COMPONENT_FORMAT, &bytes).expect("decode");
        assert_eq!(back.chunks[2], sliced);
        sliced.slice = Some(Slice {
            offset: 2_097_152 - 4096,
            len: 8192,
        });
        assert!(!sliced.slice_in_bounds());
    }
}
