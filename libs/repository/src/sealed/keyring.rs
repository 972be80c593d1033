//! The keyring of a sealed repository: signed objects only a holder of the root secret can
//! write.
//!
//! All under `keyring/`:
//!
//! - `keys/<id>.json`: a key: its scope (`full` or `metadata`), its X25519 public key and, for
//!   a passphrase or key file, the KEK derivation, a check value and the X25519 secret wrapped
//!   by the KEK.
//! - `revoked/<id>.json`: a revocation.
//! - `epochs/<epoch>.json`: an epoch: its data and metadata public keys, a nonce naming its
//!   grants, and every key revoked so far. Written after its grants: it is the commit point.
//! - `grants/<epoch>-<nonce>/<key id>.json`: an epoch's secrets sealed to one key (data,
//!   metadata and the root secret for a full key; metadata only for a metadata key).
//! - `audit/<time>-<rand>.json`: one entry per key operation, each naming the hash of the
//!   entry before it.
//!
//! Each is `{"signed": "<JSON body>", "signature": "<Ed25519, hex>"}`, signed by the key the
//! root secret derives over a domain string and the body, and checked against the root public
//! key in the config and in every credential. A writer, lacking the root secret, can delete
//! these objects but not forge, alter or revive one: a revoked key's object put back stays
//! revoked (its tombstone and every later epoch name it) and gets no grant of a later epoch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use crypto_box::{PublicKey, SecretKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::credential::Credential;
use super::{ComponentKey, Components, EpochKeys, Sealed};
use crate::clock::now_rfc3339;
use crate::crypto::{self, KekDerivation, KeySecret};
use crate::error::RepoError;
use crate::layout;
use crate::path::RemotePath;
use crate::storage::{PutMode, Storage, StorageError};

/// A key's reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Reads everything and manages keys (operators).
    Full,
    /// Reads manifests only (the coordinator).
    Metadata,
    /// Reads everything, manages nothing: the version 1 keys of an upgraded repository
    /// ([`LEGACY_KEY_ID`]), which never get the root secret.
    Legacy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    id: String,
    created: String,
    scope: Scope,
    /// X25519, hex.
    public: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    derivation: Option<KekDerivation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kek_check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped_secret: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedBody {
    id: String,
    revoked_at: String,
    by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochBody {
    epoch: u32,
    created: String,
    nonce: String,
    data_public: String,
    meta_public: String,
    /// Every key revoked before this epoch began.
    revoked: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    epoch: u32,
    nonce: String,
    key_id: String,
    /// [`GrantSecrets`] as JSON, sealed to the key's public key, hex.
    sealed: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSecrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    meta: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root: Option<String>,
    /// The root the component secrets derive from (chunk ids of every component), for keys
    /// that read data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    components: Option<String>,
    /// An upgraded version 1 repository's master key, which reads its version 1 objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    legacy: Option<String>,
}

/// `keyring/upgrade.json`: a version 1 repository upgraded to the sealed scheme (its config,
/// created once, cannot say so).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    created: String,
    root_public: String,
}

/// The key id under which holders of version 1 keys (the master key) open an upgraded
/// repository's epochs; revoking it ends their reach into new data.
pub const LEGACY_KEY_ID: &str = "legacy-v1";

/// The X25519 secret of [`LEGACY_KEY_ID`]: from the master key and the root it serves, so
/// grants to it under another root (a replaced upgrade record) cannot be made without `M`.
fn legacy_secret(master: &[u8; 32], root_public: &str) -> SecretKey {
    let mut material = master.to_vec();
    material.extend_from_slice(root_public.as_bytes());
    SecretKey::from(blake3::derive_key(
        "aitbc-backup 2026 version 1 keys",
        &material,
    ))
}

/// The root component secrets derive from: what readers of data get instead of the root
/// secret itself, which signs.
pub(crate) fn components_root(root: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("aitbc-backup 2026 component root", root)
}

/// The highest epoch this process has seen per repository (root public key): a writer never
/// goes back to an older one because newer epoch records vanished.
static EPOCHS_SEEN: std::sync::Mutex<BTreeMap<String, u32>> =
    std::sync::Mutex::new(BTreeMap::new());

/// One audit log entry of a sealed repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditBody {
    pub time: String,
    /// `init`, `add`, `rotate`, `revoke`, `issue-writer`, `issue-metadata`.
    pub action: String,
    pub key_id: String,
    pub by_key_id: Option<String>,
    pub host: String,
    /// What else the step did (`epoch 3`, `component redis`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// BLAKE3 of the previous entry's signed body (hex); empty for the first.
    pub previous: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedObject {
    signed: String,
    signature: String,
}

fn signing_key(root: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&blake3::derive_key("aitbc-backup 2026 root signing", root))
}

/// The root public key (hex) of a root secret, as the config and credentials carry it.
pub fn root_public(root: &[u8; 32]) -> String {
    hex::encode(signing_key(root).verifying_key().to_bytes())
}

pub(crate) fn parse_root_public(text: &str) -> Result<VerifyingKey, RepoError> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| RepoError::BadConfig(format!("`{text}` is not a root public key")))
}

fn message(domain: &str, body: &str) -> Vec<u8> {
    let mut out = format!("aitbc-backup keyring {domain}\0").into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn sign<T: Serialize>(root: &[u8; 32], domain: &str, body: &T) -> Result<Bytes, RepoError> {
    let signed =
        serde_json::to_string(body).map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    let signature = signing_key(root).sign(&message(domain, &signed));
    let object = SignedObject {
        signed,
        signature: hex::encode(signature.to_bytes()),
    };
    Ok(Bytes::from(
        serde_json::to_vec_pretty(&object).map_err(|e| RepoError::KeyManagement(e.to_string()))?,
    ))
}

/// The body of a signed object, if its signature verifies; its signed text for the audit
/// chain.
fn verify<T: DeserializeOwned>(
    root: &VerifyingKey,
    domain: &str,
    object: &RemotePath,
    bytes: &[u8],
) -> Result<(T, String), RepoError> {
    let forged = |reason: &str| RepoError::Corrupt {
        object: object.to_string(),
        reason: format!("{reason} (a keyring object not written with this repository's root key)"),
    };
    let signed: SignedObject =
        serde_json::from_slice(bytes).map_err(|_| forged("not a signed object"))?;
    let signature = hex::decode(&signed.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| ed25519_dalek::Signature::from_bytes(&b))
        .ok_or_else(|| forged("malformed signature"))?;
    root.verify_strict(&message(domain, &signed.signed), &signature)
        .map_err(|_| forged("its signature does not verify"))?;
    let body = serde_json::from_str(&signed.signed).map_err(|e| RepoError::Corrupt {
        object: object.to_string(),
        reason: e.to_string(),
    })?;
    Ok((body, signed.signed))
}

/// Keyring objects are a few KiB; a planted larger one is not read (a writer could otherwise
/// make every open download it).
const MAX_KEYRING_OBJECT: u64 = 64 << 10;

/// Every object under `prefix`, newest name last. Where the bucket keeps versions, each
/// object's first version (keyring objects are created once; a later version or a delete
/// marker was someone else's).
async fn read_all(
    storage: &Storage,
    prefix: &str,
    cancel: &CancellationToken,
) -> Result<Vec<(RemotePath, Bytes)>, RepoError> {
    let mut out = Vec::new();
    let oversized = |path: &RemotePath, size: u64| {
        let big = size > MAX_KEYRING_OBJECT;
        if big {
            tracing::warn!(object = %path, size, "a keyring object larger than any this program writes; it is ignored");
        }
        big
    };
    if storage.lock().is_some() {
        let versions = storage.versions(prefix, cancel).await?;
        for (path, group) in crate::immutable::by_key(&versions) {
            let Some(first) = group.iter().rev().find(|v| !v.delete_marker) else {
                continue;
            };
            if oversized(path, first.size) {
                continue;
            }
            let bytes = storage.get_version(path, &first.version_id, cancel).await?;
            out.push((path.clone(), bytes));
        }
    } else {
        for meta in storage.list(prefix, cancel).await? {
            if oversized(&meta.path, meta.size) {
                continue;
            }
            match storage.get(&meta.path, cancel).await {
                Ok(bytes) => out.push((meta.path, bytes)),
                Err(StorageError::NotFound(_)) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }
    out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(out)
}

/// Signed objects under `prefix` that verify; the others are named in a warning and skipped
/// (a writer may plant objects; it cannot make them count).
async fn read_signed<T: DeserializeOwned>(
    storage: &Storage,
    root: &VerifyingKey,
    prefix: &str,
    domain: &str,
    cancel: &CancellationToken,
) -> Result<Vec<(RemotePath, T, String)>, RepoError> {
    let mut out = Vec::new();
    for (path, bytes) in read_all(storage, prefix, cancel).await? {
        match verify(root, domain, &path, &bytes) {
            Ok((body, signed)) => out.push((path, body, signed)),
            Err(err) => {
                tracing::warn!(object = %path, error = %err, "a keyring object does not verify; it is ignored")
            }
        }
    }
    Ok(out)
}

fn x25519_public(text: &str, object: &str) -> Result<PublicKey, RepoError> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(PublicKey::from)
        .ok_or_else(|| RepoError::Corrupt {
            object: object.to_owned(),
            reason: "malformed public key".into(),
        })
}

fn secret_of(text: &str) -> Option<SecretKey> {
    hex::decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(SecretKey::from)
}

/// The keyring as read and verified.
struct Keyring {
    keys: Vec<KeyBody>,
    revoked: BTreeMap<String, String>,
    epochs: Vec<EpochBody>,
}

impl Keyring {
    async fn read(
        storage: &Storage,
        root: &VerifyingKey,
        cancel: &CancellationToken,
    ) -> Result<Keyring, RepoError> {
        let keys = read_signed::<KeyBody>(storage, root, layout::SEALED_KEYS, "key", cancel)
            .await?
            .into_iter()
            .filter(|(path, body, _)| path.file_name() == format!("{}.json", body.id))
            .map(|(_, body, _)| body)
            .collect();
        let mut revoked: BTreeMap<String, String> =
            read_signed::<RevokedBody>(storage, root, layout::SEALED_REVOKED, "revoked", cancel)
                .await?
                .into_iter()
                .map(|(_, body, _)| (body.id, body.revoked_at))
                .collect();
        let mut epochs: Vec<EpochBody> =
            read_signed::<EpochBody>(storage, root, layout::EPOCHS, "epoch", cancel)
                .await?
                .into_iter()
                .filter(|(path, body, _)| *path == layout::epoch(body.epoch))
                .map(|(_, body, _)| body)
                .collect();
        epochs.sort_by_key(|e| e.epoch);
        // A tombstone deleted by someone else: every later epoch still names the key.
        for epoch in &epochs {
            for id in &epoch.revoked {
                revoked
                    .entry(id.clone())
                    .or_insert_with(|| epoch.created.clone());
            }
        }
        Ok(Keyring {
            keys,
            revoked,
            epochs,
        })
    }

    /// The newest epoch: what writers seal to. Refused when this process saw a newer one of
    /// the same repository (its record went missing since: deleted by someone).
    fn current(&self, root_public: &str) -> Result<EpochKeys, RepoError> {
        let newest = self.epochs.last().map_or(0, |e| e.epoch);
        {
            let mut seen = EPOCHS_SEEN.lock().unwrap_or_else(|e| e.into_inner());
            let highest = seen.entry(root_public.to_owned()).or_insert(newest);
            if *highest > newest {
                return Err(RepoError::KeyManagement(format!(
                    "key epoch {highest} was in use and its record is gone now (deleted?): \
                     refusing to seal to epoch {newest}, which keys revoked since can read"
                )));
            }
            *highest = newest;
        }
        let epoch = self.epochs.last().ok_or_else(|| {
            RepoError::KeyManagement(
                "the repository has no key epoch that verifies (epochs/ was emptied, or the \
                 credential belongs to another repository)"
                    .into(),
            )
        })?;
        let object = layout::epoch(epoch.epoch).to_string();
        Ok(EpochKeys {
            epoch: epoch.epoch,
            data: x25519_public(&epoch.data_public, &object)?,
            meta: x25519_public(&epoch.meta_public, &object)?,
        })
    }

    fn active(&self) -> impl Iterator<Item = &KeyBody> {
        self.keys
            .iter()
            .filter(|k| !self.revoked.contains_key(&k.id))
    }
}

/// What a key opens: the secrets of every epoch granted to it.
struct Opened {
    data: BTreeMap<u32, SecretKey>,
    meta: BTreeMap<u32, SecretKey>,
    root: Option<[u8; 32]>,
    components: Option<[u8; 32]>,
    legacy: Option<[u8; 32]>,
}

fn bytes32(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok().and_then(|b| b.try_into().ok())
}

async fn open_grants(
    storage: &Storage,
    root_key: &VerifyingKey,
    ring: &Keyring,
    key_id: &str,
    secret: &SecretKey,
    cancel: &CancellationToken,
) -> Result<Opened, RepoError> {
    let epochs: HashMap<(u32, &str), &EpochBody> = ring
        .epochs
        .iter()
        .map(|e| ((e.epoch, e.nonce.as_str()), e))
        .collect();
    let mut opened = Opened {
        data: BTreeMap::new(),
        meta: BTreeMap::new(),
        root: None,
        components: None,
        legacy: None,
    };
    for (path, grant, _) in
        read_signed::<GrantBody>(storage, root_key, layout::GRANTS, "grant", cancel).await?
    {
        if grant.key_id != key_id || path != layout::grant(grant.epoch, &grant.nonce, key_id) {
            continue;
        }
        let Some(epoch) = epochs.get(&(grant.epoch, grant.nonce.as_str())) else {
            continue; // a grant of an epoch that was never committed
        };
        let Some(plain) = hex::decode(&grant.sealed)
            .ok()
            .and_then(|sealed| secret.unseal(&sealed).ok())
        else {
            tracing::warn!(object = %path, "a grant does not open with its key; it is ignored");
            continue;
        };
        let secrets: GrantSecrets =
            serde_json::from_slice(&plain).map_err(|e| RepoError::Corrupt {
                object: path.to_string(),
                reason: e.to_string(),
            })?;
        let check = |text: &str, public: &str| {
            secret_of(text).filter(|s| hex::encode(s.public_key().as_bytes()) == public)
        };
        let meta = check(&secrets.meta, &epoch.meta_public).ok_or_else(|| RepoError::Corrupt {
            object: path.to_string(),
            reason: "its metadata secret is not the epoch's".into(),
        })?;
        opened.meta.insert(grant.epoch, meta);
        if let Some(data) = &secrets.data {
            let data = check(data, &epoch.data_public).ok_or_else(|| RepoError::Corrupt {
                object: path.to_string(),
                reason: "its data secret is not the epoch's".into(),
            })?;
            opened.data.insert(grant.epoch, data);
        }
        if let Some(root) = secrets.root.as_deref().and_then(bytes32) {
            opened.root = Some(root);
        }
        if let Some(components) = secrets.components.as_deref().and_then(bytes32) {
            opened.components = Some(components);
        }
        if let Some(legacy) = secrets.legacy.as_deref().and_then(bytes32) {
            opened.legacy = Some(legacy);
        }
    }
    Ok(opened)
}

/// The X25519 secret `secret` unwraps from one of the keys, and that key; the revoked error
/// when the key it opens was revoked.
fn unlock(
    ring: &Keyring,
    binding: &str,
    secret: &KeySecret,
) -> Result<(KeyBody, SecretKey), RepoError> {
    for key in &ring.keys {
        let (Some(derivation), Some(wrapped)) = (&key.derivation, &key.wrapped_secret) else {
            continue;
        };
        let Some(kek) = secret.derive(derivation)? else {
            continue;
        };
        if key.kek_check.as_deref() != Some(crypto::kek_check(&kek).as_str()) {
            continue;
        }
        if let Some(at) = ring.revoked.get(&key.id) {
            return Err(RepoError::RevokedKey {
                id: key.id.clone(),
                revoked_at: at.clone(),
            });
        }
        let unwrapped = hex::decode(wrapped)
            .ok()
            .and_then(|w| crypto::unwrap_bound(&kek, &w, binding.as_bytes()))
            .ok_or_else(|| RepoError::Corrupt {
                object: layout::sealed_key(&key.id).to_string(),
                reason: "its wrapped secret does not open with its own KEK under this \
                         repository's root (a key object copied from another keyring)"
                    .into(),
            })?;
        let x = SecretKey::from(unwrapped);
        if hex::encode(x.public_key().as_bytes()) != key.public {
            return Err(RepoError::Corrupt {
                object: layout::sealed_key(&key.id).to_string(),
                reason: "its secret does not belong to its public key".into(),
            });
        }
        return Ok((key.clone(), x));
    }
    // Revoked keys whose objects are gone: tell by the revocation rather than "wrong key".
    Err(RepoError::WrongKey {
        keys: ring.active().count(),
    })
}

/// What a sealed key's wrapped secret is bound to: the root public key and the repository's
/// id, so that a key object copied to another keyring, or to another repository sharing a
/// passphrase, does not open.
async fn binding_of(
    storage: &Storage,
    root_public: &str,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    let config = Box::pin(crate::repo::read_config(storage, cancel)).await?;
    Ok(format!("{root_public}/{}", config.id))
}

/// A full holder: the root secret (none for the version 1 keys of an upgraded repository),
/// the key id, and what it opens.
pub(crate) struct FullKey {
    pub root: Option<[u8; 32]>,
    pub key_id: String,
    pub sealed: Sealed,
    /// An upgraded version 1 repository's master key.
    pub legacy: Option<[u8; 32]>,
}

impl FullKey {
    /// The root secret, which signs: only operators' sealed keys hold it.
    fn signing(&self) -> Result<&[u8; 32], RepoError> {
        self.root.as_ref().ok_or_else(|| {
            RepoError::KeyManagement(format!(
                "key {} reads but does not manage keys (a version 1 key of an upgraded \
                 repository): use a sealed key (`keys add` one with a version 1 key's help \
                 before the upgrade, or the key the upgrade made)",
                self.key_id
            ))
        })
    }
}

/// Opens a sealed repository with an operator's passphrase or key file.
pub(crate) async fn open_full(
    storage: &Storage,
    root_public: &str,
    secret: &KeySecret,
    cancel: &CancellationToken,
) -> Result<FullKey, RepoError> {
    let root_key = parse_root_public(root_public)?;
    let ring = Keyring::read(storage, &root_key, cancel).await?;
    let binding = binding_of(storage, root_public, cancel).await?;
    let (key_id, x) = match unlock(&ring, &binding, secret) {
        Ok((key, x)) => (key.id, x),
        // A version 1 key of an upgraded repository: through the master key.
        Err(RepoError::WrongKey { .. }) if read_upgrade(storage, cancel).await?.is_some() => {
            let (master, _) = crate::keys::open_master(storage, secret, cancel).await?;
            if let Some(at) = ring.revoked.get(LEGACY_KEY_ID) {
                return Err(RepoError::RevokedKey {
                    id: format!("{LEGACY_KEY_ID} (every version 1 key)"),
                    revoked_at: at.clone(),
                });
            }
            (
                LEGACY_KEY_ID.to_owned(),
                legacy_secret(&master, root_public),
            )
        }
        Err(err) => return Err(err),
    };
    let opened = open_grants(storage, &root_key, &ring, &key_id, &x, cancel).await?;
    let root = opened.root.filter(|r| self::root_public(r) == root_public);
    let components = opened
        .components
        .or(root.as_ref().map(components_root))
        .ok_or_else(|| {
            RepoError::KeyManagement(format!(
                "key {key_id} opens no grant that reads data (a metadata key, or its grants \
                 were removed)"
            ))
        })?;
    Ok(FullKey {
        root,
        legacy: opened.legacy,
        key_id,
        sealed: Sealed {
            current: ring.current(root_public)?,
            data: opened.data,
            meta: opened.meta,
            components: Components::Root(Arc::new(components)),
        },
    })
}

/// Opens a sealed repository with a writer's or the coordinator's credential; also the
/// version 1 master key of an upgraded repository where the coordinator's grants hold it
/// (it reads version 1 manifests, as it did before the upgrade).
pub(crate) async fn open_credential(
    storage: &Storage,
    repository_id: &str,
    root_public: &str,
    credential: &Credential,
    cancel: &CancellationToken,
) -> Result<(Sealed, Option<[u8; 32]>), RepoError> {
    if credential.repository() != repository_id {
        return Err(RepoError::BadConfig(format!(
            "repository.credential was issued for repository {}, not for {} (id {repository_id})",
            credential.repository(),
            storage.describe()
        )));
    }
    if credential.root_public() != root_public {
        return Err(RepoError::BadConfig(format!(
            "repository.credential names root key {}, but {} records {root_public}: its config \
             or upgrade record was replaced, or the credential is from before a re-init",
            credential.root_public(),
            storage.describe()
        )));
    }
    let root_key = parse_root_public(root_public)?;
    let ring = Keyring::read(storage, &root_key, cancel).await?;
    let secret = credential
        .secret_bytes()
        .map_err(|e| RepoError::BadConfig(format!("repository.credential: {e}")))?;
    let (components, meta, legacy) = match credential {
        Credential::Writer { component, .. } => (
            Components::One(ComponentKey::from_secret(component, &secret)),
            BTreeMap::new(),
            None,
        ),
        Credential::Metadata { key_id, .. } => {
            if let Some(at) = ring.revoked.get(key_id) {
                return Err(RepoError::RevokedKey {
                    id: key_id.clone(),
                    revoked_at: at.clone(),
                });
            }
            let x = SecretKey::from(secret);
            let opened = open_grants(storage, &root_key, &ring, key_id, &x, cancel).await?;
            (Components::None, opened.meta, opened.legacy)
        }
    };
    let sealed = Sealed {
        current: ring.current(root_public)?,
        data: BTreeMap::new(),
        meta,
        components,
    };
    Ok((sealed, legacy))
}

/// Creates the keyring of a new repository: the first key (full, for `secret`), epoch 1 and
/// its grant. Returns what the key opens.
pub(crate) async fn init(
    storage: &Storage,
    root: [u8; 32],
    secret: &KeySecret,
    cancel: &CancellationToken,
) -> Result<FullKey, RepoError> {
    let binding = binding_of(storage, &root_public(&root), cancel).await?;
    let (key, _) = new_key(storage, &root, &binding, Scope::Full, Some(secret), cancel).await?;
    let ring = Keyring {
        keys: vec![key.clone()],
        revoked: BTreeMap::new(),
        epochs: Vec::new(),
    };
    let epoch = new_epoch(storage, &root, None, &ring, cancel).await?;
    audit(
        storage,
        &root,
        "init",
        &key.id,
        None,
        &format!("epoch {epoch}"),
        cancel,
    )
    .await?;
    open_full(storage, &root_public(&root), secret, cancel).await
}

/// The upgrade record of an upgraded version 1 repository (its first version where the bucket
/// keeps versions), if there is one.
async fn read_upgrade(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<Option<UpgradeBody>, RepoError> {
    let found = read_all(storage, layout::KEYRING, cancel)
        .await?
        .into_iter()
        .find(|(path, _)| *path == layout::upgrade());
    let Some((path, bytes)) = found else {
        return Ok(None);
    };
    let body = serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
        object: path.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Some(body))
}

/// The root public key of an upgraded version 1 repository. A keyring without its upgrade
/// record is refused: treated as version 1, the repository would take version 1 writes that
/// every revoked version 1 key reads.
pub(crate) async fn upgraded_root(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<Option<String>, RepoError> {
    if let Some(upgrade) = read_upgrade(storage, cancel).await? {
        return Ok(Some(upgrade.root_public));
    }
    if storage.list(layout::EPOCHS, cancel).await?.is_empty() {
        return Ok(None);
    }
    Err(RepoError::Corrupt {
        object: layout::upgrade().to_string(),
        reason: "missing, although keyring/ holds key epochs: the repository was upgraded \
                 and its upgrade record deleted (restore it from a copy or the bucket's older \
                 versions), or an upgrade was interrupted after its first epoch (then remove \
                 keyring/ if no sealed backup was written, and upgrade again)"
            .into(),
    })
}

/// Upgrades a version 1 encrypted repository to the sealed scheme, authorised by one of its
/// keys: a root secret, a sealed key for `secret`, the key every version 1 key reaches
/// through the master key ([`LEGACY_KEY_ID`]), epoch 1 granted to both (with the master key,
/// so version 1 objects stay readable), then the upgrade record. Data is not rewritten: new
/// backups are sealed, old ones stay as they are until retention removes them.
pub(crate) async fn upgrade(
    storage: &Storage,
    secret: &KeySecret,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    if read_upgrade(storage, cancel).await?.is_some() {
        return Err(RepoError::KeyManagement(format!(
            "{} was upgraded already",
            storage.describe()
        )));
    }
    let (master, by) = crate::keys::open_master(storage, secret, cancel).await?;
    let root: [u8; 32] = rand::random();
    let binding = binding_of(storage, &root_public(&root), cancel).await?;
    let (key, _) = new_key(storage, &root, &binding, Scope::Full, Some(secret), cancel).await?;
    let legacy = KeyBody {
        id: LEGACY_KEY_ID.to_owned(),
        created: now_rfc3339(),
        scope: Scope::Legacy,
        public: hex::encode(
            legacy_secret(&master, &root_public(&root))
                .public_key()
                .as_bytes(),
        ),
        derivation: None,
        kek_check: None,
        wrapped_secret: None,
    };
    match put_signed(
        storage,
        &root,
        &layout::sealed_key(LEGACY_KEY_ID),
        "key",
        &legacy,
        cancel,
    )
    .await
    {
        Ok(()) => {}
        Err(RepoError::Storage(StorageError::AlreadyExists(_))) => {
            return Err(RepoError::KeyManagement(format!(
                "{} already holds a keyring but no upgrade record (keyring/upgrade.json): an \
                 earlier upgrade was interrupted, or the record was deleted. If sealed backups \
                 were written since the upgrade, restore the record from a copy or the \
                 bucket's older versions; only if none was, remove keyring/ and run the \
                 upgrade again",
                storage.describe()
            )));
        }
        Err(err) => return Err(err),
    }
    let ring = Keyring {
        keys: vec![key.clone(), legacy],
        revoked: BTreeMap::new(),
        epochs: Vec::new(),
    };
    let epoch = new_epoch(storage, &root, Some(&master), &ring, cancel).await?;
    let record = UpgradeBody {
        created: now_rfc3339(),
        root_public: root_public(&root),
    };
    let body =
        serde_json::to_vec_pretty(&record).map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    match storage
        .put(
            &layout::upgrade(),
            Bytes::from(body),
            PutMode::Create,
            cancel,
        )
        .await
    {
        Ok(()) => {}
        Err(StorageError::AlreadyExists(_)) => {
            return Err(RepoError::KeyManagement(
                "another upgrade of this repository finished first; use its keys".into(),
            ));
        }
        Err(err) => return Err(err.into()),
    }
    audit(
        storage,
        &root,
        "upgrade",
        &key.id,
        Some(&by),
        &format!("epoch {epoch}; version 1 keys open it as {LEGACY_KEY_ID}"),
        cancel,
    )
    .await?;
    Ok(key.id)
}

async fn put_signed<T: Serialize>(
    storage: &Storage,
    root: &[u8; 32],
    path: &RemotePath,
    domain: &str,
    body: &T,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    storage
        .put(path, sign(root, domain, body)?, PutMode::Create, cancel)
        .await?;
    Ok(())
}

/// Stores a new key of `scope`: wrapped by `secret`'s KEK, or (no secret) for a credential,
/// whose X25519 secret is returned.
async fn new_key(
    storage: &Storage,
    root: &[u8; 32],
    binding: &str,
    scope: Scope,
    secret: Option<&KeySecret>,
    cancel: &CancellationToken,
) -> Result<(KeyBody, SecretKey), RepoError> {
    let x = super::new_secret();
    let (derivation, kek_check, wrapped_secret) = match secret {
        Some(secret) => {
            let derivation = secret.new_derivation();
            let kek = secret
                .derive(&derivation)?
                .ok_or_else(|| RepoError::KeyManagement("derivation kind mismatch".into()))?;
            (
                Some(derivation),
                Some(crypto::kek_check(&kek)),
                Some(hex::encode(crypto::wrap_bound(
                    &kek,
                    &x.to_bytes(),
                    binding.as_bytes(),
                ))),
            )
        }
        None => (None, None, None),
    };
    let key = KeyBody {
        id: format!("k{}", hex::encode(rand::random::<[u8; 6]>())),
        created: now_rfc3339(),
        scope,
        public: hex::encode(x.public_key().as_bytes()),
        derivation,
        kek_check,
        wrapped_secret,
    };
    storage
        .put(
            &layout::sealed_key(&key.id),
            sign(root, "key", &key)?,
            PutMode::Create,
            cancel,
        )
        .await?;
    Ok((key, x))
}

fn seal_grant(
    key: &KeyBody,
    secrets: &EpochSecrets<'_>,
    root: &[u8; 32],
) -> Result<String, RepoError> {
    let (reads_data, manages) = match key.scope {
        Scope::Full => (true, true),
        Scope::Legacy => (true, false),
        Scope::Metadata => (false, false),
    };
    let secrets = GrantSecrets {
        data: reads_data.then(|| hex::encode(secrets.data.to_bytes())),
        meta: hex::encode(secrets.meta.to_bytes()),
        root: manages.then(|| hex::encode(root)),
        components: reads_data.then(|| hex::encode(components_root(root))),
        // Version 1 objects: for readers of data only (not the coordinator's metadata key).
        legacy: secrets.legacy.filter(|_| reads_data).map(hex::encode),
    };
    let plain =
        serde_json::to_vec(&secrets).map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    let public = x25519_public(&key.public, &layout::sealed_key(&key.id).to_string())?;
    let sealed = public
        .seal(&mut crypto_box::aead::OsRng, &plain)
        .map_err(|_| RepoError::KeyManagement("sealing a grant failed".into()))?;
    Ok(hex::encode(sealed))
}

/// An epoch's secrets, as a grant hands them over.
struct EpochSecrets<'a> {
    epoch: u32,
    nonce: &'a str,
    data: &'a SecretKey,
    meta: &'a SecretKey,
    legacy: Option<&'a [u8; 32]>,
}

async fn put_grant(
    storage: &Storage,
    root: &[u8; 32],
    secrets: &EpochSecrets<'_>,
    key: &KeyBody,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let grant = GrantBody {
        epoch: secrets.epoch,
        nonce: secrets.nonce.to_owned(),
        key_id: key.id.clone(),
        sealed: seal_grant(key, secrets, root)?,
    };
    storage
        .put(
            &layout::grant(secrets.epoch, secrets.nonce, &key.id),
            sign(root, "grant", &grant)?,
            PutMode::Create,
            cancel,
        )
        .await?;
    Ok(())
}

/// Starts the next epoch: new key pairs, a grant to every active key, then the epoch record
/// (the commit point: writers seal to it from then on). Returns its number.
async fn new_epoch(
    storage: &Storage,
    root: &[u8; 32],
    legacy: Option<&[u8; 32]>,
    ring: &Keyring,
    cancel: &CancellationToken,
) -> Result<u32, RepoError> {
    let number = ring.epochs.last().map_or(1, |e| e.epoch + 1);
    let nonce = hex::encode(rand::random::<[u8; 8]>());
    let (data, meta) = (super::new_secret(), super::new_secret());
    let secrets = EpochSecrets {
        epoch: number,
        nonce: &nonce,
        data: &data,
        meta: &meta,
        legacy,
    };
    for key in ring.active() {
        put_grant(storage, root, &secrets, key, cancel).await?;
    }
    let epoch = EpochBody {
        epoch: number,
        created: now_rfc3339(),
        nonce,
        data_public: hex::encode(data.public_key().as_bytes()),
        meta_public: hex::encode(meta.public_key().as_bytes()),
        revoked: ring.revoked.keys().cloned().collect(),
    };
    match storage
        .put(
            &layout::epoch(number),
            sign(root, "epoch", &epoch)?,
            PutMode::Create,
            cancel,
        )
        .await
    {
        Ok(()) => Ok(number),
        Err(StorageError::AlreadyExists(_)) => Err(RepoError::KeyManagement(format!(
            "epoch {number} was started by another key operation at the same time; run this one \
             again"
        ))),
        Err(err) => Err(err.into()),
    }
}

/// Grants every epoch `current` opens to every active key that lacks its grant. Run after
/// each key operation: a key added while another operation started an epoch is granted it by
/// whichever of the two finishes second (each writes before it reads the other's objects).
async fn fill_grants(
    storage: &Storage,
    root_public: &str,
    current: &KeySecret,
    cancel: &CancellationToken,
) -> Result<FullKey, RepoError> {
    let by = Box::pin(open_full(storage, root_public, current, cancel)).await?;
    let root = *by.signing()?;
    let root_key = parse_root_public(root_public)?;
    let ring = Keyring::read(storage, &root_key, cancel).await?;
    let granted: HashSet<(u32, String, String)> =
        read_signed::<GrantBody>(storage, &root_key, layout::GRANTS, "grant", cancel)
            .await?
            .into_iter()
            .map(|(_, g, _)| (g.epoch, g.nonce, g.key_id))
            .collect();
    for epoch in &ring.epochs {
        let (Some(data), Some(meta)) = (
            by.sealed.data.get(&epoch.epoch),
            by.sealed.meta.get(&epoch.epoch),
        ) else {
            continue;
        };
        let secrets = EpochSecrets {
            epoch: epoch.epoch,
            nonce: &epoch.nonce,
            data,
            meta,
            legacy: by.legacy.as_ref(),
        };
        for key in ring.active() {
            if granted.contains(&(epoch.epoch, epoch.nonce.clone(), key.id.clone())) {
                continue;
            }
            match put_grant(storage, &root, &secrets, key, cancel).await {
                Ok(()) | Err(RepoError::Storage(StorageError::AlreadyExists(_))) => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(by)
}

/// Adds a full key for `new`, authorised by `current`; it opens every epoch `current` opens.
pub(crate) async fn add_key(
    storage: &Storage,
    root_public: &str,
    current: &KeySecret,
    new: &KeySecret,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    let by = Box::pin(open_full(storage, root_public, current, cancel)).await?;
    let binding = binding_of(storage, root_public, cancel).await?;
    let (key, _) = new_key(
        storage,
        by.signing()?,
        &binding,
        Scope::Full,
        Some(new),
        cancel,
    )
    .await?;
    let by = Box::pin(fill_grants(storage, root_public, current, cancel)).await?;
    audit(
        storage,
        by.signing()?,
        "add",
        &key.id,
        Some(&by.key_id),
        "",
        cancel,
    )
    .await?;
    Ok(key.id)
}

/// Issues the coordinator's metadata credential: a new metadata key granted every epoch.
pub(crate) async fn issue_metadata(
    storage: &Storage,
    repository_id: &str,
    root_public: &str,
    current: &KeySecret,
    cancel: &CancellationToken,
) -> Result<(String, Credential), RepoError> {
    let by = Box::pin(open_full(storage, root_public, current, cancel)).await?;
    let (key, x) = new_key(storage, by.signing()?, "", Scope::Metadata, None, cancel).await?;
    let by = Box::pin(fill_grants(storage, root_public, current, cancel)).await?;
    audit(
        storage,
        by.signing()?,
        "issue-metadata",
        &key.id,
        Some(&by.key_id),
        "",
        cancel,
    )
    .await?;
    let credential = Credential::Metadata {
        repository: repository_id.to_owned(),
        root_public: root_public.to_owned(),
        key_id: key.id.clone(),
        secret: hex::encode(x.to_bytes()),
    };
    Ok((key.id, credential))
}

/// Issues a writer credential for `component`.
pub(crate) async fn issue_writer(
    storage: &Storage,
    repository_id: &str,
    root_public: &str,
    current: &KeySecret,
    component: &str,
    cancel: &CancellationToken,
) -> Result<Credential, RepoError> {
    let by = Box::pin(open_full(storage, root_public, current, cancel)).await?;
    let root = by.signing()?;
    audit(
        storage,
        root,
        "issue-writer",
        "",
        Some(&by.key_id),
        &format!("component {component}"),
        cancel,
    )
    .await?;
    Ok(Credential::writer(
        repository_id,
        root_public,
        component,
        &ComponentKey::secret(&components_root(root), component),
    ))
}

/// Revokes key `id` (authorised by `current`): a new epoch granted to every key but it and
/// naming it revoked (the commit point), then its revocation record. A revocation whose epoch
/// never came (a crash, a lost race) is completed by running it again.
pub(crate) async fn revoke(
    storage: &Storage,
    root_public: &str,
    current: &KeySecret,
    id: &str,
    action: &str,
    cancel: &CancellationToken,
) -> Result<u32, RepoError> {
    let by = Box::pin(open_full(storage, root_public, current, cancel)).await?;
    let root = *by.signing()?;
    let root_key = parse_root_public(root_public)?;
    let mut ring = Keyring::read(storage, &root_key, cancel).await?;
    let in_newest_epoch = ring
        .epochs
        .last()
        .is_some_and(|e| e.revoked.iter().any(|r| r == id));
    if in_newest_epoch || !ring.keys.iter().any(|k| k.id == id) {
        return Err(RepoError::KeyManagement(format!(
            "no active key with id `{id}`"
        )));
    }
    let full_left = ring
        .active()
        .filter(|k| k.id != id && k.scope == Scope::Full)
        .count();
    if full_left == 0 {
        return Err(RepoError::KeyManagement(format!(
            "key {id} is the repository's only key with full access (an operator's); add \
             another before revoking it"
        )));
    }
    let revoked_at = now_rfc3339();
    ring.revoked.insert(id.to_owned(), revoked_at.clone());
    let epoch = new_epoch(storage, &root, by.legacy.as_ref(), &ring, cancel).await?;
    let tombstone = RevokedBody {
        id: id.to_owned(),
        revoked_at,
        by: by.key_id.clone(),
    };
    match storage
        .put(
            &layout::sealed_revoked(id),
            sign(&root, "revoked", &tombstone)?,
            PutMode::Create,
            cancel,
        )
        .await
    {
        Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
        Err(err) => return Err(err.into()),
    }
    audit(
        storage,
        &root,
        action,
        id,
        Some(&by.key_id),
        &format!("epoch {epoch}"),
        cancel,
    )
    .await?;
    // Keys added meanwhile get the new epoch too (not where the revoker revoked itself: the
    // next key operation fills them in).
    match Box::pin(fill_grants(storage, root_public, current, cancel)).await {
        Ok(_) | Err(RepoError::RevokedKey { .. }) => {}
        Err(err) => return Err(err),
    }
    Ok(epoch)
}

/// A key as `keys list` shows it.
pub(crate) struct Listed {
    pub id: String,
    pub kind: &'static str,
    pub created: String,
    pub revoked_at: Option<String>,
}

pub(crate) async fn list(
    storage: &Storage,
    root_public: &str,
    cancel: &CancellationToken,
) -> Result<(Vec<Listed>, u32), RepoError> {
    let ring = Keyring::read(storage, &parse_root_public(root_public)?, cancel).await?;
    let epoch = ring.epochs.last().map_or(0, |e| e.epoch);
    let keys = ring
        .keys
        .iter()
        .map(|k| Listed {
            id: k.id.clone(),
            kind: match (k.scope, &k.derivation) {
                (Scope::Metadata, _) => "coordinator",
                (Scope::Legacy, _) => "version-1-keys",
                (Scope::Full, Some(KekDerivation::Passphrase { .. })) => "passphrase",
                (Scope::Full, _) => "key-file",
            },
            created: k.created.clone(),
            revoked_at: ring.revoked.get(&k.id).cloned(),
        })
        .collect();
    Ok((keys, epoch))
}

/// The audit log, oldest first, and what is wrong with it: entries that do not verify (not
/// written by a key holder) and breaks in the chain (an entry removed or reordered).
pub(crate) async fn audit_log(
    storage: &Storage,
    root_public: &str,
    cancel: &CancellationToken,
) -> Result<(Vec<AuditBody>, Vec<String>), RepoError> {
    let root_key = parse_root_public(root_public)?;
    let mut problems = Vec::new();
    let mut entries = Vec::new();
    let mut previous = String::new();
    let mut seen = HashSet::new();
    for (path, bytes) in read_all(storage, layout::SEALED_AUDIT, cancel).await? {
        match verify::<AuditBody>(&root_key, "audit", &path, &bytes) {
            Ok((body, signed)) => {
                if body.previous != previous {
                    problems.push(format!(
                        "{path}: the entry before it is missing or out of order (the chain \
                         breaks here)"
                    ));
                }
                previous = blake3::hash(signed.as_bytes()).to_hex().to_string();
                if seen.insert(previous.clone()) {
                    entries.push(body);
                }
            }
            Err(err) => problems.push(err.to_string()),
        }
    }
    Ok((entries, problems))
}

async fn audit(
    storage: &Storage,
    root: &[u8; 32],
    action: &str,
    key_id: &str,
    by: Option<&str>,
    detail: &str,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let root_key = parse_root_public(&root_public(root))?;
    let previous = read_all(storage, layout::SEALED_AUDIT, cancel)
        .await?
        .into_iter()
        .rev()
        .find_map(|(path, bytes)| verify::<AuditBody>(&root_key, "audit", &path, &bytes).ok())
        .map(|(_, signed)| blake3::hash(signed.as_bytes()).to_hex().to_string())
        .unwrap_or_default();
    let entry = AuditBody {
        time: now_rfc3339(),
        action: action.to_owned(),
        key_id: key_id.to_owned(),
        by_key_id: by.map(str::to_owned),
        host: crate::keys::hostname(),
        detail: detail.to_owned(),
        previous,
    };
    storage
        .put(
            &layout::timestamped(layout::SEALED_AUDIT),
            sign(root, "audit", &entry)?,
            PutMode::Create,
            cancel,
        )
        .await?;
    Ok(())
}
