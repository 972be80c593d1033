//! Repository keys: the master key wrapped once per key-encryption key, and the audit log.
//!
//! - `keys/<id>.json`: an active key: its KEK derivation, the wrapped master key, and a check
//!   value of the KEK.
//! - `keys-revoked/<id>.json`: a revoked key's tombstone: derivation and check value only (the
//!   wrapped master key is gone), so using a revoked secret is reported as such.
//! - `audit/<time>-<rand>.json`: one object per key operation (when, what, which key, by which
//!   key, from which host), never key material.
//!
//! Keys are added, rotated and revoked without touching data: only the wrapping changes.
//!
//! That is version 1's scheme. Sealed repositories (version 3) keep their keys in a signed
//! keyring with epochs ([`crate::sealed::keyring`]); the functions here serve both.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::now_rfc3339;
pub use crate::crypto::KeySecret;
use crate::crypto::{self, KekDerivation};
use crate::error::RepoError;
use crate::layout;
use crate::sealed::keyring;
use crate::storage::{PutMode, Storage, StorageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyObject {
    id: String,
    created: String,
    derivation: KekDerivation,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    wrapped: Option<String>,
    kek_check: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    revoked_at: Option<String>,
}

/// A key as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub kind: &'static str,
    pub created: String,
    pub revoked_at: Option<String>,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time: String,
    /// `init`, `add`, `rotate`, `revoke`.
    pub action: String,
    pub key_id: String,
    pub by_key_id: Option<String>,
    pub host: String,
    /// What else the step did (sealed repositories: `epoch 3`, `component redis`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

fn kind_of(derivation: &KekDerivation) -> &'static str {
    match derivation {
        KekDerivation::Passphrase { .. } => "passphrase",
        KekDerivation::KeyFile { .. } => "key-file",
    }
}

async fn read_keys(
    storage: &Storage,
    prefix: &str,
    cancel: &CancellationToken,
) -> Result<Vec<KeyObject>, RepoError> {
    if storage.lock().is_some() {
        return read_locked_keys(storage, prefix, cancel).await;
    }
    let mut out = Vec::new();
    for meta in storage.list(prefix, cancel).await? {
        let bytes = storage.get(&meta.path, cancel).await?;
        out.push(parse_key(&meta.path, &bytes)?);
    }
    Ok(out)
}

fn parse_key(path: &crate::path::RemotePath, bytes: &[u8]) -> Result<KeyObject, RepoError> {
    serde_json::from_slice(bytes).map_err(|e| RepoError::Corrupt {
        object: path.to_string(),
        reason: e.to_string(),
    })
}

/// [`read_keys`] in a repository with an Object Lock: a key object is created once, so its
/// first version is the key and later versions were put by someone else; and a key deleted
/// without its revocation tombstone was deleted by someone else, and still counts.
async fn read_locked_keys(
    storage: &Storage,
    prefix: &str,
    cancel: &CancellationToken,
) -> Result<Vec<KeyObject>, RepoError> {
    let revoked: Vec<String> = if prefix == layout::KEYS {
        storage
            .versions(layout::REVOKED_KEYS, cancel)
            .await?
            .into_iter()
            .filter(|v| !v.delete_marker)
            .map(|v| v.path.file_name().to_owned())
            .collect()
    } else {
        Vec::new()
    };
    let versions = storage.versions(prefix, cancel).await?;
    let mut out = Vec::new();
    for (path, group) in crate::immutable::by_key(&versions) {
        let deleted = group.iter().any(|v| v.latest && v.delete_marker);
        if deleted && (prefix != layout::KEYS || revoked.iter().any(|r| r == path.file_name())) {
            continue;
        }
        let Some(first) = group.iter().rev().find(|v| !v.delete_marker) else {
            continue;
        };
        if group.len() > 1 {
            tracing::warn!(object = %path, versions = group.len(), "a key object was replaced or deleted; its first version is used");
        }
        let bytes = storage.get_version(path, &first.version_id, cancel).await?;
        out.push(parse_key(path, &bytes)?);
    }
    Ok(out)
}

/// Finds the master key `secret` opens, and that key's id.
pub(crate) async fn open_master(
    storage: &Storage,
    secret: &KeySecret,
    cancel: &CancellationToken,
) -> Result<([u8; 32], String), RepoError> {
    let active = read_keys(storage, layout::KEYS, cancel).await?;
    for key in &active {
        let Some(kek) = secret.derive(&key.derivation)? else {
            continue;
        };
        let Some(wrapped) = key.wrapped.as_deref().and_then(|w| hex::decode(w).ok()) else {
            continue;
        };
        if let Some(master) = crypto::unwrap(&kek, &wrapped) {
            return Ok((master, key.id.clone()));
        }
    }
    for key in read_keys(storage, layout::REVOKED_KEYS, cancel).await? {
        let Some(kek) = secret.derive(&key.derivation)? else {
            continue;
        };
        if crypto::kek_check(&kek) == key.kek_check {
            return Err(RepoError::RevokedKey {
                id: key.id,
                revoked_at: key.revoked_at.unwrap_or_default(),
            });
        }
    }
    Err(RepoError::WrongKey { keys: active.len() })
}

/// Wraps `master` with a KEK derived from `secret` and stores it as a new key.
pub(crate) async fn store_new_key(
    storage: &Storage,
    master: &[u8; 32],
    secret: &KeySecret,
    by: Option<&str>,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    let derivation = secret.new_derivation();
    let kek = secret
        .derive(&derivation)?
        .ok_or_else(|| RepoError::KeyManagement("derivation kind mismatch".into()))?;
    let key = KeyObject {
        id: format!("k{}", hex::encode(rand::random::<[u8; 6]>())),
        created: now_rfc3339(),
        derivation,
        wrapped: Some(hex::encode(crypto::wrap(&kek, master))),
        kek_check: crypto::kek_check(&kek),
        revoked_at: None,
    };
    let body =
        serde_json::to_vec_pretty(&key).map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    storage
        .put(
            &layout::key(&key.id),
            Bytes::from(body),
            PutMode::Create,
            cancel,
        )
        .await?;
    audit(
        storage,
        if by.is_some() { "add" } else { "init" },
        &key.id,
        by,
        cancel,
    )
    .await?;
    Ok(key.id)
}

async fn audit(
    storage: &Storage,
    action: &str,
    key_id: &str,
    by_key_id: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let entry = AuditEntry {
        time: now_rfc3339(),
        action: action.to_owned(),
        key_id: key_id.to_owned(),
        by_key_id: by_key_id.map(str::to_owned),
        host: hostname(),
        detail: String::new(),
    };
    let body = serde_json::to_vec(&entry).map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    storage
        .put(
            &layout::timestamped(layout::AUDIT),
            Bytes::from(body),
            PutMode::Create,
            cancel,
        )
        .await?;
    Ok(())
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Active and revoked keys (none in an unencrypted repository); [`RepoError::NotInitialized`]
/// where no repository is.
pub async fn list_keys(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<Vec<KeyInfo>, RepoError> {
    // Where no repository is, there are no keys to list: say so rather than list nothing.
    if let Some(root_public) = sealed_root(storage, cancel).await? {
        let (keys, _) = Box::pin(keyring::list(storage, &root_public, cancel)).await?;
        return Ok(keys
            .into_iter()
            .map(|k| KeyInfo {
                id: k.id,
                kind: k.kind,
                created: k.created,
                revoked_at: k.revoked_at,
            })
            .collect());
    }
    let mut out: Vec<KeyInfo> = Vec::new();
    for prefix in [layout::KEYS, layout::REVOKED_KEYS] {
        for key in read_keys(storage, prefix, cancel).await? {
            out.push(KeyInfo {
                id: key.id,
                kind: kind_of(&key.derivation),
                created: key.created,
                revoked_at: key.revoked_at,
            });
        }
    }
    out.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(out)
}

/// The audit log, oldest first; [`RepoError::NotInitialized`] where no repository is.
pub async fn audit_log(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<Vec<AuditEntry>, RepoError> {
    if let Some(root_public) = sealed_root(storage, cancel).await? {
        let (entries, problems) =
            Box::pin(keyring::audit_log(storage, &root_public, cancel)).await?;
        if !problems.is_empty() {
            return Err(RepoError::Corrupt {
                object: layout::AUDIT.to_owned(),
                reason: format!("the audit log was tampered with: {}", problems.join("; ")),
            });
        }
        return Ok(entries
            .into_iter()
            .map(|e| AuditEntry {
                time: e.time,
                action: e.action,
                key_id: e.key_id,
                by_key_id: e.by_key_id,
                host: e.host,
                detail: e.detail,
            })
            .collect());
    }
    let mut out = Vec::new();
    for meta in storage.list(layout::AUDIT, cancel).await? {
        let bytes = storage.get(&meta.path, cancel).await?;
        out.push(
            serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt {
                object: meta.path.to_string(),
                reason: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// Adds a key for `new`, authorised by `current`; returns the new key's id.
pub async fn add_key(
    storage: &Storage,
    current: &KeySecret,
    new: &KeySecret,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    if let Some(root_public) = sealed_root(storage, cancel).await? {
        return Box::pin(keyring::add_key(
            storage,
            &root_public,
            current,
            new,
            cancel,
        ))
        .await;
    }
    let (master, by) = open_master(storage, current, cancel).await?;
    store_new_key(storage, &master, new, Some(&by), cancel).await
}

/// The root public key of a sealed repository; None for version 1.
async fn sealed_root(
    storage: &Storage,
    cancel: &CancellationToken,
) -> Result<Option<String>, RepoError> {
    let config = crate::repo::read_config(storage, cancel).await?;
    crate::repo::root_public_of(storage, &config, cancel).await
}

/// Upgrades a version 1 encrypted repository in place to the sealed scheme (see
/// [`keyring::upgrade`]), authorised by one of its keys; returns the sealed key made for it.
pub async fn upgrade(
    storage: &Storage,
    current: &KeySecret,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    let config = crate::repo::read_config(storage, cancel).await?;
    if !config.encrypted || config.root_public.is_some() {
        return Err(RepoError::KeyManagement(format!(
            "{} is {}: only version 1 encrypted repositories are upgraded",
            storage.describe(),
            if config.encrypted {
                "sealed already"
            } else {
                "not encrypted"
            }
        )));
    }
    Box::pin(keyring::upgrade(storage, current, cancel)).await
}

/// What a new credential is for.
pub enum Issue<'a> {
    /// An agent writing component `.0`'s backups.
    Writer(&'a str),
    /// The coordinator: reads manifests, not data.
    Coordinator,
}

/// Issues a credential (sealed repositories only), authorised by `current`; returns it and,
/// for the coordinator's, its key id.
pub async fn issue(
    storage: &Storage,
    current: &KeySecret,
    what: Issue<'_>,
    cancel: &CancellationToken,
) -> Result<(crate::sealed::credential::Credential, Option<String>), RepoError> {
    let config = crate::repo::read_config(storage, cancel).await?;
    let Some(root_public) = &sealed_root(storage, cancel).await? else {
        return Err(RepoError::KeyManagement(format!(
            "{} is not a sealed repository (version {}, {}): credentials are issued by \
             encrypted repositories created by this version",
            storage.describe(),
            config.version,
            if config.encrypted {
                "one master key"
            } else {
                "unencrypted"
            }
        )));
    };
    match what {
        Issue::Writer(component) => {
            if component.is_empty()
                || !component
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(RepoError::KeyManagement(format!(
                    "`{component}` is not a component name (letters, digits, - and _)"
                )));
            }
            let credential = Box::pin(keyring::issue_writer(
                storage,
                &config.id,
                root_public,
                current,
                component,
                cancel,
            ))
            .await?;
            Ok((credential, None))
        }
        Issue::Coordinator => {
            let (id, credential) = Box::pin(keyring::issue_metadata(
                storage,
                &config.id,
                root_public,
                current,
                cancel,
            ))
            .await?;
            Ok((credential, Some(id)))
        }
    }
}

/// Revokes key `id`, authorised by `current`. The last active key cannot be revoked.
pub async fn revoke_key(
    storage: &Storage,
    current: &KeySecret,
    id: &str,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    if let Some(root_public) = sealed_root(storage, cancel).await? {
        Box::pin(keyring::revoke(
            storage,
            &root_public,
            current,
            id,
            "revoke",
            cancel,
        ))
        .await?;
        return Ok(());
    }
    let (_, by) = open_master(storage, current, cancel).await?;
    revoke(storage, id, &by, "revoke", cancel).await
}

/// Replaces the key `current` opens with a new one for `new`; returns the new key's id.
pub async fn rotate_key(
    storage: &Storage,
    current: &KeySecret,
    new: &KeySecret,
    cancel: &CancellationToken,
) -> Result<String, RepoError> {
    if let Some(root_public) = sealed_root(storage, cancel).await? {
        // The new key first (it opens every epoch the old one did), then the old one's
        // revocation, which starts the epoch only the new key opens.
        let new_id = Box::pin(keyring::add_key(
            storage,
            &root_public,
            current,
            new,
            cancel,
        ))
        .await?;
        let old = Box::pin(keyring::open_full(storage, &root_public, current, cancel))
            .await?
            .key_id;
        Box::pin(keyring::revoke(
            storage,
            &root_public,
            new,
            &old,
            "rotate",
            cancel,
        ))
        .await?;
        return Ok(new_id);
    }
    let (master, old) = open_master(storage, current, cancel).await?;
    let new_id = store_new_key(storage, &master, new, Some(&old), cancel).await?;
    revoke(storage, &old, &new_id, "rotate", cancel).await?;
    Ok(new_id)
}

async fn revoke(
    storage: &Storage,
    id: &str,
    by: &str,
    action: &str,
    cancel: &CancellationToken,
) -> Result<(), RepoError> {
    let active = read_keys(storage, layout::KEYS, cancel).await?;
    let Some(key) = active.iter().find(|k| k.id == id) else {
        return Err(RepoError::KeyManagement(format!(
            "no active key with id `{id}`"
        )));
    };
    if active.len() == 1 {
        return Err(RepoError::KeyManagement(format!(
            "key {id} is the repository's only key; add another before revoking it"
        )));
    }
    // Tombstone first, then remove the wrapped master key: a crash in between leaves the key
    // usable and its tombstone present, never neither.
    let tombstone = KeyObject {
        wrapped: None,
        revoked_at: Some(now_rfc3339()),
        ..key.clone()
    };
    let body = serde_json::to_vec_pretty(&tombstone)
        .map_err(|e| RepoError::KeyManagement(e.to_string()))?;
    match storage
        .put(
            &layout::revoked_key(id),
            Bytes::from(body),
            PutMode::Create,
            cancel,
        )
        .await
    {
        Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
        Err(err) => return Err(err.into()),
    }
    storage.delete(&layout::key(id), cancel).await?;
    audit(storage, action, id, Some(by), cancel).await
}
