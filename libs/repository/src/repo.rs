//! Opening and creating repositories, and reading and writing their objects: chunks (compressed,
//! optionally encrypted, addressed by hash) and manifests (enveloped, create-only).

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::chunker::ChunkerParams;
use crate::clock::now_rfc3339;
use crate::crypto::DataKeys;
use crate::error::RepoError;
use crate::keys::{self, KeySecret};
use crate::layout;
use crate::manifest::{self, COMPONENT_FORMAT, ComponentManifest, SET_FORMAT, SetManifest};
use crate::path::RemotePath;
use crate::sealed::credential::Credential;
use crate::sealed::{self, ComponentKey, Kind, Sealed, keyring};
use crate::storage::{PutMode, Storage, StorageError};

mod config;

pub use config::{ObjectLock, RepoConfig, with_recorded_lock};
pub(crate) use config::{config_versions, read_config};

pub const REPOSITORY_FORMAT: &str = "aitbc-backup/repository";
/// The newest config version this program reads: 3 is a sealed repository (see
/// [`crate::sealed`]), 2 a repository with an Object Lock (so that programs that predate locks
/// refuse to write unlocked objects into it), 1 neither. Each is refused by the programs
/// that predate it.
pub const REPOSITORY_VERSION: u32 = 3;

/// The root public key of a sealed repository: recorded in its config, or (a version 1
/// repository upgraded in place) in its upgrade record. None for version 1.
pub(crate) async fn root_public_of(
    storage: &Storage,
    config: &RepoConfig,
    cancel: &CancellationToken,
) -> Result<Option<String>, RepoError> {
    match &config.root_public {
        Some(root) => Ok(Some(root.clone())),
        None if config.encrypted => Box::pin(keyring::upgraded_root(storage, cancel)).await,
        None => Ok(None),
    }
}

/// The component name chunks written with an operator's key are keyed under until a
/// component is named (`repo put`, tools).
pub const OPERATOR_COMPONENT: &str = "operator";

/// Which scheme a stored object is read with.
enum Opening<'a> {
    Sealed(&'a Sealed),
    Version1(&'a DataKeys),
    Plain,
}

/// The largest writer state read back (stored bytes; it may expand to four times this): a
/// ledger's page maps take 24 bytes per database page, 64 MiB for a 10 GiB database.
const MAX_WRITER_STATE: u64 = 256 << 20;

/// What opens an encrypted repository.
#[derive(Clone, Copy)]
pub enum Opener<'a> {
    /// An operator's passphrase or key file: reads everything.
    Key(&'a KeySecret),
    /// A writer's or the coordinator's credential (sealed repositories only).
    Credential(&'a Credential),
}

/// Tuning of backups and restores.
#[derive(Debug, Clone)]
pub struct RepoSettings {
    /// zstd level, 1..=19.
    pub compression_level: i32,
    /// Chunks uploaded at once.
    pub upload_concurrency: usize,
    /// Chunks downloaded at once; 0: the backend's own number (4 for a local directory, 16
    /// for S3). Every chunk in flight holds its stored and decoded bytes (about 2.5 MiB).
    pub download_concurrency: usize,
    /// Upload throughput limit in bytes per second (stored bytes); None = unlimited.
    pub limit_upload_bytes_per_sec: Option<u64>,
}

impl Default for RepoSettings {
    fn default() -> Self {
        RepoSettings {
            compression_level: 3,
            upload_concurrency: 8,
            download_concurrency: 0,
            limit_upload_bytes_per_sec: None,
        }
    }
}

/// Tag byte in front of every stored chunk's (plaintext) payload.
/// Runs `f` with this thread's zstd compressor at `level`: a compression context holds
/// megabytes of tables, which are set up once per thread instead of once per chunk.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let (_, compressor) = match slot.take() {
            Some(kept) if kept.0 == level => slot.insert(kept),
            _ => slot.insert((level, zstd::bulk::Compressor::new(level)?)),
        };
        f(compressor)
    })
}

/// Runs `f` with this thread's zstd decompression context (made once per thread, like the
/// compressor: setting one up per chunk showed in restore profiles).
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = match slot.take() {
            Some(kept) => slot.insert(kept),
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        f(decompressor)
    })
}

const TAG_RAW: u8 = 0;
const TAG_ZSTD: u8 = 1;

/// An open repository. Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    pub(crate) storage: Storage,
    pub(crate) config: RepoConfig,
    /// Version 1 encryption: one master key for everything.
    pub(crate) keys: Option<DataKeys>,
    /// The sealed scheme: what this holder knows (see [`crate::sealed`]).
    pub(crate) sealed: Option<std::sync::Arc<Sealed>>,
    /// The component whose key ids and cuts new chunks (sealed repositories).
    pub(crate) component: Option<ComponentKey>,
    pub(crate) settings: RepoSettings,
    /// Objects read from an older version because the current one did not verify.
    pub(crate) overwritten: crate::immutable::Overwritten,
    /// Lock dates read or set by this process (see [`crate::immutable::extend_locks`]).
    pub(crate) lock_dates: crate::immutable::LockDates,
}

impl Repository {
    /// Creates a repository; encrypted when `secret` is given (it becomes the first key).
    pub async fn init(
        storage: Storage,
        chunker: ChunkerParams,
        secret: Option<&KeySecret>,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        Repository::init_locked(storage, chunker, secret, None, cancel).await
    }

    /// [`Repository::init`] with an Object Lock on every object written from the first: the
    /// bucket must have versioning and Object Lock enabled.
    pub async fn init_locked(
        storage: Storage,
        chunker: ChunkerParams,
        secret: Option<&KeySecret>,
        object_lock: Option<ObjectLock>,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        if let Some(lock) = &object_lock {
            lock.validate()
                .map_err(|e| RepoError::BadConfig(format!("object lock: {e}")))?;
            crate::immutable::check_bucket(&storage, cancel).await?;
        }
        let storage = storage.with_lock(object_lock.map(|l| l.policy()));
        // Encrypted repositories are sealed (version 3): one root secret, kept only in the
        // grants of operators' keys.
        let root: Option<[u8; 32]> = secret.map(|_| rand::random());
        let config = RepoConfig {
            format: REPOSITORY_FORMAT.to_owned(),
            version: match (root.is_some(), object_lock.is_some()) {
                (true, _) => 3,
                (false, true) => 2,
                (false, false) => 1,
            },
            id: hex::encode(rand::random::<[u8; 16]>()),
            created: now_rfc3339(),
            chunker,
            encrypted: secret.is_some(),
            object_lock,
            root_public: root.as_ref().map(keyring::root_public),
        };
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        // The create-only put below is the guarantee, but Ceph radosgw (16.2) ignores
        // If-None-Match on a versioned bucket (every locked one) and would store a second
        // config over the first; so look first. Two inits racing there are not caught.
        match storage.head(&layout::config(), cancel).await {
            Ok(_) => return Err(RepoError::AlreadyInitialized(storage.describe())),
            Err(StorageError::NotFound(_)) => {}
            Err(err) => return Err(err.into()),
        }
        // A config behind a delete marker is still a repository: init over it would put an
        // unlocked one in front of locked data.
        if config_versions(&storage, cancel)
            .await
            .iter()
            .any(|v| !v.delete_marker)
        {
            return Err(RepoError::AlreadyInitialized(format!(
                "{} (its config object was deleted; its old versions remain: open it with \
                 --as-of, do not init over it)",
                storage.describe()
            )));
        }
        match storage
            .put(
                &layout::config(),
                Bytes::from(body),
                PutMode::Create,
                cancel,
            )
            .await
        {
            Ok(()) => {}
            Err(StorageError::AlreadyExists(_)) => {
                return Err(RepoError::AlreadyInitialized(storage.describe()));
            }
            Err(err) => return Err(err.into()),
        }
        let sealed = match (root, secret) {
            (Some(root), Some(secret)) => Some(
                Box::pin(keyring::init(&storage, root, secret, cancel))
                    .await?
                    .sealed,
            ),
            _ => None,
        };
        Ok(Repository::new(storage, config, None, sealed))
    }

    fn new(
        storage: Storage,
        config: RepoConfig,
        keys: Option<DataKeys>,
        sealed: Option<Sealed>,
    ) -> Repository {
        // A writer keys chunks as its component; an operator's key as `operator` until a
        // component is named (`repo put`); the coordinator's writes no chunks.
        let component = sealed
            .as_ref()
            .and_then(|s| s.default_component(OPERATOR_COMPONENT));
        Repository {
            storage,
            config,
            keys,
            sealed: sealed.map(std::sync::Arc::new),
            component,
            settings: RepoSettings::default(),
            overwritten: Default::default(),
            lock_dates: Default::default(),
        }
    }

    /// Creates a version 1 encrypted repository (one master key): what programs before the
    /// sealed scheme wrote. For tests of the upgrade path only.
    #[doc(hidden)]
    pub async fn init_version1_encrypted(
        storage: Storage,
        chunker: ChunkerParams,
        secret: &KeySecret,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        let config = RepoConfig {
            format: REPOSITORY_FORMAT.to_owned(),
            version: 1,
            id: hex::encode(rand::random::<[u8; 16]>()),
            created: now_rfc3339(),
            chunker,
            encrypted: true,
            object_lock: None,
            root_public: None,
        };
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| RepoError::BadConfig(e.to_string()))?;
        storage
            .put(
                &layout::config(),
                Bytes::from(body),
                PutMode::Create,
                cancel,
            )
            .await?;
        let master: [u8; 32] = rand::random();
        keys::store_new_key(&storage, &master, secret, None, cancel).await?;
        Ok(Repository::new(
            storage,
            config,
            Some(DataKeys::from_master(&master)),
            None,
        ))
    }

    /// Opens an existing repository with an operator's passphrase or key file (needed where
    /// it is encrypted).
    pub async fn open(
        storage: Storage,
        secret: Option<&KeySecret>,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        Box::pin(Repository::open_as(
            storage,
            secret.map(Opener::Key),
            cancel,
        ))
        .await
    }

    /// Opens an existing repository with a key, a credential or (unencrypted) nothing.
    pub async fn open_as(
        storage: Storage,
        opener: Option<Opener<'_>>,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        let config = read_config(&storage, cancel).await?;
        let storage = storage.with_lock(config.object_lock.map(|l| l.policy()));
        if !config.encrypted {
            // A credential belongs to a sealed repository: a config that says otherwise was
            // replaced, and writing plaintext into it would defeat the credential.
            if let Some(Opener::Credential(_)) = opener {
                return Err(RepoError::BadConfig(format!(
                    "{} says it is not encrypted, but repository.credential is for a sealed \
                     repository: refusing to write unencrypted backups (was its config \
                     replaced, or is this another repository?)",
                    storage.describe()
                )));
            }
            // Keys mean an encrypted repository whatever the config says now: writing
            // plaintext into it would defeat them.
            for prefix in [layout::KEYS, layout::KEYRING] {
                if !Box::pin(storage.list(prefix, cancel)).await?.is_empty() {
                    return Err(RepoError::BadConfig(format!(
                        "{} says it is not encrypted but holds keys under {prefix}: its config \
                         was replaced; refusing to read or write it as unencrypted (restore \
                         the config from a copy, or use S3 Object Lock, which keeps the first)",
                        storage.describe()
                    )));
                }
            }
            return Ok(Repository::new(storage, config, None, None));
        }
        let opener = opener.ok_or(RepoError::KeyRequired)?;
        let Some(root_public) = Box::pin(root_public_of(&storage, &config, cancel)).await? else {
            // Version 1: one master key.
            let Opener::Key(secret) = opener else {
                return Err(RepoError::BadConfig(format!(
                    "{} is a version 1 encrypted repository: it opens with a passphrase or \
                     key file only (credentials are for sealed repositories; `aitbc-backup \
                     repo keys upgrade` makes it one)",
                    storage.describe()
                )));
            };
            let (master, _) = Box::pin(keys::open_master(&storage, secret, cancel)).await?;
            return Ok(Repository::new(
                storage,
                config,
                Some(DataKeys::from_master(&master)),
                None,
            ));
        };
        let (sealed, legacy) = match opener {
            Opener::Key(secret) => {
                let full =
                    Box::pin(keyring::open_full(&storage, &root_public, secret, cancel)).await?;
                (full.sealed, full.legacy)
            }
            Opener::Credential(credential) => {
                Box::pin(keyring::open_credential(
                    &storage,
                    &config.id,
                    &root_public,
                    credential,
                    cancel,
                ))
                .await?
            }
        };
        let keys = legacy.map(|m| DataKeys::from_master(&m));
        Ok(Repository::new(storage, config, keys, Some(sealed)))
    }

    /// This repository keying and cutting new chunks as component `name` (sealed
    /// repositories; elsewhere unchanged). A writer's credential names its component: any
    /// other is refused.
    pub fn for_component(mut self, name: &str) -> Result<Repository, RepoError> {
        if let Some(sealed) = &self.sealed {
            self.component = sealed.component(name)?;
        }
        Ok(self)
    }

    /// This repository read with an operator's key as well: what a restore or a data check
    /// handed `secret` (in memory only) can read. The component keeps its name.
    pub async fn with_key(
        &self,
        secret: &KeySecret,
        cancel: &CancellationToken,
    ) -> Result<Repository, RepoError> {
        let mut repo = self.clone();
        if !self.config.encrypted {
            return Ok(repo);
        }
        match Box::pin(root_public_of(&self.storage, &self.config, cancel)).await? {
            Some(root_public) => {
                let full = Box::pin(keyring::open_full(
                    &self.storage,
                    &root_public,
                    secret,
                    cancel,
                ))
                .await?;
                repo.sealed = Some(std::sync::Arc::new(full.sealed));
                repo.keys = full.legacy.map(|m| DataKeys::from_master(&m));
                if let Some(component) = &self.component {
                    return repo.for_component(&component.name.clone());
                }
            }
            None => {
                let (master, _) =
                    Box::pin(keys::open_master(&self.storage, secret, cancel)).await?;
                repo.keys = Some(DataKeys::from_master(&master));
            }
        }
        Ok(repo)
    }

    /// Stores what a writer keeps between backups (a cache that saves reading, never needed
    /// to restore) as `name`: in a sealed repository sealed with the component's state key,
    /// which its writer credential holds; in a version 1 one with the master key; plain
    /// otherwise. Replaced by each call.
    pub async fn put_writer_state(
        &self,
        name: &str,
        plain: &[u8],
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        let (component, body) = self.state_codec()?;
        let compressed = zstd::bulk::compress(plain, 3)?;
        let sealed = match body {
            Some(keys) => keys.seal(&compressed),
            None => compressed,
        };
        Ok(self
            .storage
            .put(
                &layout::writer_state(&component, name),
                Bytes::from(sealed),
                PutMode::Overwrite,
                cancel,
            )
            .await?)
    }

    /// What [`Repository::put_writer_state`] stored as `name`; None where there is none or it
    /// does not open (another component's, damaged): the writer then starts afresh.
    pub async fn writer_state(
        &self,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let (component, keys) = self.state_codec()?;
        let path = layout::writer_state(&component, name);
        match self.storage.head(&path, cancel).await {
            Ok(meta) if meta.size > MAX_WRITER_STATE => {
                tracing::warn!(object = %path, size = meta.size, "the writer state is larger than any this program writes; it is ignored");
                return Ok(None);
            }
            Ok(_) => {}
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(err) => return Err(err.into()),
        }
        let stored = match self.storage.get(&path, cancel).await {
            Ok(stored) => stored,
            Err(StorageError::NotFound(_)) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let compressed = match keys {
            Some(keys) => match keys.open(path.as_str(), &stored) {
                Ok(plain) => plain,
                Err(_) => {
                    tracing::warn!(object = %path, "the writer state does not open with this component's key; it is ignored");
                    return Ok(None);
                }
            },
            None => stored.to_vec(),
        };
        match zstd::bulk::decompress(&compressed, MAX_WRITER_STATE as usize * 4) {
            Ok(plain) => Ok(Some(plain)),
            Err(err) => {
                tracing::warn!(object = %path, error = %err, "the writer state does not decompress (or expands past its bound); it is ignored");
                Ok(None)
            }
        }
    }

    /// The component a writer state belongs to and the keys that seal it.
    fn state_codec(&self) -> Result<(String, Option<DataKeys>), RepoError> {
        match (&self.sealed, &self.component, &self.keys) {
            (Some(_), Some(component), _) => {
                Ok((component.name.clone(), Some(component.state_keys())))
            }
            (Some(_), None, _) => Err(RepoError::NoKey(
                "no component key: this credential keeps no writer state".into(),
            )),
            (None, _, keys) => Ok(("any".to_owned(), keys.clone())),
        }
    }

    /// Refuses writing chunks where this holder has no component key (the coordinator's
    /// metadata credential in a sealed repository): they would be keyed by nothing.
    pub(crate) fn check_writes(&self) -> Result<(), RepoError> {
        if self.sealed.is_some() && self.component.is_none() {
            return Err(RepoError::NoKey(
                "the coordinator's metadata credential writes no backups (agents write with \
                 writer credentials: `aitbc-backup repo keys issue --writer COMPONENT`)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The sealed scheme's view of this holder, if the repository is sealed.
    pub fn sealed(&self) -> Option<&Sealed> {
        self.sealed.as_deref()
    }

    /// Whether this holder can read chunk data (false for writers and the coordinator's
    /// metadata credential in sealed repositories).
    pub fn reads_data(&self) -> bool {
        self.sealed.as_ref().is_none_or(|s| s.reads_data())
    }

    /// Whether this holder reads manifests (false for a writer credential of a sealed
    /// repository).
    pub fn reads_manifests(&self) -> bool {
        self.sealed.as_ref().is_none_or(|s| !s.meta.is_empty())
    }

    /// The component this holder keys new chunks as (sealed repositories), if any.
    pub fn component_name(&self) -> Option<&str> {
        self.component.as_ref().map(|c| c.name.as_str())
    }

    /// The name new chunks are keyed under (recorded in manifests as `keyed_by`).
    pub(crate) fn keyed_by(&self) -> String {
        self.component
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }

    /// This repository reading chunks keyed as `keyed_by` says (a manifest's).
    pub(crate) fn reading(&self, keyed_by: &str) -> Result<Repository, RepoError> {
        if self.keyed_by() == keyed_by {
            return Ok(self.clone());
        }
        let mut repo = self.clone();
        repo.component = match (&self.sealed, keyed_by) {
            // A sealed repository's own backups are all keyed; unkeyed ones are version 1
            // objects of an upgraded repository, read with the master key.
            (Some(_), "") if self.keys.is_none() => {
                return Err(RepoError::NoKey(
                    "a backup that names no component key in a sealed repository: not written \
                     by one of its writers"
                        .into(),
                ));
            }
            (_, "") => None,
            (Some(sealed), name) => sealed.component(name)?,
            (None, name) => {
                return Err(RepoError::NoKey(format!(
                    "chunks keyed as component `{name}` are in a sealed repository's format, \
                     but this repository is not sealed"
                )));
            }
        };
        Ok(repo)
    }

    /// A chunker for new chunks: keyed by the component's secret in sealed repositories.
    pub(crate) fn cutter(&self) -> crate::chunker::Cutter {
        let seed = self.component.as_ref().map_or(0, |c| c.chunker_seed());
        crate::chunker::Cutter::seeded(self.config.chunker, seed)
    }

    pub fn with_settings(mut self, settings: RepoSettings) -> Self {
        self.settings = settings;
        self
    }

    /// This repository writing chunks at zstd `level` (a component's own level); 0 keeps the
    /// configured one.
    pub fn with_compression_level(&self, level: i32) -> Self {
        let mut repo = self.clone();
        if level != 0 {
            repo.settings.compression_level = level;
        }
        repo
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn settings(&self) -> &RepoSettings {
        &self.settings
    }

    /// Chunks downloaded at once: the setting, else the backend's own number.
    pub(crate) fn download_concurrency(&self) -> usize {
        match self.settings.download_concurrency {
            0 => self.storage.download_concurrency(),
            n => n,
        }
    }

    /// The id of a chunk's raw bytes.
    pub(crate) fn chunk_id(&self, data: &[u8]) -> blake3::Hash {
        match (&self.component, &self.keys) {
            (Some(component), _) => component.chunk_id(data),
            (None, Some(keys)) => keys.chunk_id(data),
            (None, None) => blake3::hash(data),
        }
    }

    /// Compresses (unless that does not shrink it) and seals a chunk for storage. The
    /// payload is built in one buffer: the tag byte, then zstd output written in place (into
    /// spare capacity: nothing is zeroed first), by the calling thread's reused compressor.
    pub(crate) fn encode_chunk(&self, data: &[u8]) -> Vec<u8> {
        let mut payload = std::io::Cursor::new(Vec::with_capacity(data.len() + 1));
        payload.get_mut().push(TAG_ZSTD);
        payload.set_position(1);
        let compressed = with_compressor(self.settings.compression_level, |compressor| {
            compressor.compress_to_buffer(data, &mut payload)
        })
        .ok()
        .filter(|&n| n < data.len());
        let mut payload = payload.into_inner();
        if compressed.is_none() {
            payload.clear();
            payload.push(TAG_RAW);
            payload.extend_from_slice(data);
        }
        match (&self.sealed, &self.keys) {
            (Some(sealed), _) => sealed.seal(Kind::Data, &payload),
            (None, Some(keys)) => keys.seal(&payload),
            (None, None) => payload,
        }
    }

    /// Reverses [`Repository::encode_chunk`] and checks the result against its id and length.
    /// Stored raw chunks of unencrypted repositories are returned without a copy.
    pub(crate) fn decode_chunk(
        &self,
        id_hex: &str,
        raw_len: u32,
        stored: Bytes,
    ) -> Result<Bytes, RepoError> {
        let object = layout::chunk(id_hex).to_string();
        let corrupt = |reason: String| RepoError::Corrupt {
            object: object.clone(),
            reason,
        };
        let payload = match self.opening(&stored) {
            Opening::Sealed(sealed) => Bytes::from(sealed.open(Kind::Data, &object, &stored)?),
            Opening::Version1(keys) => Bytes::from(keys.open(&object, &stored)?),
            Opening::Plain => stored,
        };
        let tag = *payload
            .first()
            .ok_or_else(|| corrupt("empty object".into()))?;
        let data = match tag {
            TAG_RAW => payload.slice(1..),
            TAG_ZSTD => Bytes::from(
                with_decompressor(|d| d.decompress(&payload[1..], raw_len as usize))
                    .map_err(|e| corrupt(format!("zstd: {e}")))?,
            ),
            other => return Err(corrupt(format!("unknown encoding tag {other}"))),
        };
        if data.len() != raw_len as usize {
            return Err(corrupt(format!(
                "{} bytes, the manifest says {raw_len}",
                data.len()
            )));
        }
        if self.chunk_id(&data).to_hex().as_str() != id_hex {
            return Err(corrupt("content does not match its id".into()));
        }
        Ok(data)
    }

    fn seal_manifest(&self, bytes: Vec<u8>) -> Bytes {
        match (&self.sealed, &self.keys) {
            (Some(sealed), _) => Bytes::from(sealed.seal(Kind::Meta, &bytes)),
            (None, Some(keys)) => Bytes::from(keys.seal(&bytes)),
            (None, None) => Bytes::from(bytes),
        }
    }

    fn open_manifest(&self, object: &RemotePath, stored: &[u8]) -> Result<Vec<u8>, RepoError> {
        match self.opening(stored) {
            Opening::Sealed(sealed) => Ok(sealed.open(Kind::Meta, object.as_str(), stored)?),
            Opening::Version1(keys) => Ok(keys.open(object.as_str(), stored)?),
            Opening::Plain => Ok(stored.to_vec()),
        }
    }

    /// How a stored object opens: sealed objects carry their header; in a repository upgraded
    /// from version 1 the others were written under the master key.
    fn opening(&self, stored: &[u8]) -> Opening<'_> {
        match (&self.sealed, &self.keys) {
            (Some(sealed), Some(keys)) if !sealed::is_sealed(stored) => Opening::Version1(keys),
            (Some(sealed), _) => Opening::Sealed(sealed),
            (None, Some(keys)) => Opening::Version1(keys),
            (None, None) => Opening::Plain,
        }
    }

    /// Commits a manifest: create-only. A retry that finds its own earlier write counts as
    /// success; any other existing object is refused.
    async fn commit(
        &self,
        path: &RemotePath,
        id: &str,
        plain: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        let sealed = self.seal_manifest(plain.clone());
        match self
            .storage
            .put(path, sealed.clone(), PutMode::Create, cancel)
            .await
        {
            Ok(()) => Ok(()),
            Err(StorageError::AlreadyExists(_)) => {
                let existing = self.storage.get(path, cancel).await?;
                // A retried put whose first attempt landed stored these very bytes (a writer
                // of a sealed repository cannot open them to compare).
                if existing == sealed {
                    return Ok(());
                }
                match self.open_manifest(path, &existing) {
                    Ok(bytes) if bytes == plain => Ok(()),
                    _ => Err(RepoError::ManifestExists(id.to_owned())),
                }
            }
            Err(err) => Err(err.into()),
        }
    }

    pub async fn commit_component(
        &self,
        manifest: &ComponentManifest,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        let path = layout::component_manifest(&manifest.id);
        self.commit(
            &path,
            &manifest.id,
            manifest::encode(COMPONENT_FORMAT, manifest.format_version(), manifest),
            cancel,
        )
        .await
    }

    pub async fn commit_set(
        &self,
        manifest: &SetManifest,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        let path = layout::set_manifest(&manifest.id);
        self.commit(
            &path,
            &manifest.id,
            manifest::encode(SET_FORMAT, manifest::BASE_VERSION, manifest),
            cancel,
        )
        .await
    }

    pub async fn component(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        self.read_manifest(id, layout::component_manifest, COMPONENT_FORMAT, cancel)
            .await
    }

    pub async fn set(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<SetManifest, RepoError> {
        self.read_manifest(id, layout::set_manifest, SET_FORMAT, cancel)
            .await
    }

    async fn read_manifest<T: for<'de> serde::Deserialize<'de> + manifest::Identified>(
        &self,
        id: &str,
        path_of: fn(&str) -> RemotePath,
        format: &'static str,
        cancel: &CancellationToken,
    ) -> Result<T, RepoError> {
        if !layout::is_manifest_id(id) {
            return Err(RepoError::NoSuchManifest(id.to_owned()));
        }
        let path = path_of(id);
        let missing = || RepoError::NoSuchManifest(id.to_owned());
        let decode = |stored: Bytes| {
            let plain = self.open_manifest(&path, &stored)?;
            let manifest: T =
                manifest::decode(format, &plain).map_err(|source| RepoError::Manifest {
                    object: path.to_string(),
                    source,
                })?;
            // A sound manifest under another's name (a copy, a replay) would make one backup
            // read as another and hide the first from GC's mark: it is damage.
            if manifest.id() != id {
                return Err(RepoError::Corrupt {
                    object: path.to_string(),
                    reason: format!(
                        "it holds manifest {}, not {id} (a copy of another manifest)",
                        manifest.id()
                    ),
                });
            }
            Ok(manifest)
        };
        self.read_verified(&path, true, missing, cancel, |stored| {
            std::future::ready(decode(stored))
        })
        .await
    }

    /// Ids of every component manifest, oldest first.
    pub async fn component_ids(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, RepoError> {
        let objects = self
            .storage
            .list(layout::COMPONENT_MANIFESTS, cancel)
            .await?;
        Ok(objects
            .iter()
            .filter_map(|o| layout::manifest_id_of(&o.path).map(str::to_owned))
            .collect())
    }

    /// Every component manifest, oldest first.
    pub async fn components(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Vec<ComponentManifest>, RepoError> {
        let mut out = Vec::new();
        for id in self.component_ids(cancel).await? {
            out.push(self.component(&id, cancel).await?);
        }
        out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(out)
    }

    /// Commits the manifest of an archived WAL file at `path` (see [`crate::wal`]).
    pub(crate) async fn commit_wal(
        &self,
        path: &RemotePath,
        manifest: &ComponentManifest,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        self.commit(
            path,
            &manifest.id,
            manifest::encode(COMPONENT_FORMAT, manifest.format_version(), manifest),
            cancel,
        )
        .await
    }

    /// Reads the manifest of an archived WAL file.
    pub(crate) async fn wal_manifest(
        &self,
        path: &RemotePath,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        let missing = || RepoError::Missing(path.to_string());
        let decode = |stored: Bytes| {
            let plain = self.open_manifest(path, &stored)?;
            manifest::decode(COMPONENT_FORMAT, &plain).map_err(|source| RepoError::Manifest {
                object: path.to_string(),
                source,
            })
        };
        self.read_verified(path, true, missing, cancel, |stored| {
            std::future::ready(decode(stored))
        })
        .await
    }

    /// Deletes a component manifest (its chunks become garbage for GC).
    pub async fn delete_component(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        if !layout::is_manifest_id(id) {
            return Err(RepoError::NoSuchManifest(id.to_owned()));
        }
        Ok(self
            .storage
            .delete(&layout::component_manifest(id), cancel)
            .await?)
    }
}
