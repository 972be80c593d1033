//! Least knowledge: the sealed scheme of encrypted repositories (config version 3).
//!
//! Objects are sealed to public keys, so whoever writes backups holds nothing that reads them:
//!
//! - Every **epoch** has two X25519 key pairs: *data* (chunks) and *meta* (manifests). New
//!   objects are sealed to the newest epoch's public keys (NaCl's crypto_box with XChaCha20-
//!   Poly1305 from an ephemeral X25519 key per object), behind a small header naming the epoch.
//! - The private halves reach key holders only through **grants**: one object per (epoch, key),
//!   sealed to that key's own X25519 public key. A *full* key (an operator's passphrase or key
//!   file) gets data, meta and the repository's root secret; a *metadata* key (the
//!   coordinator's) gets meta only: it lists, retains, collects and checks structure, and reads
//!   no data; the *legacy* key of an upgraded version 1 repository reads data, manages nothing.
//! - The **root secret** never changes. From it come the Ed25519 key that signs every keyring
//!   object (keys, revocations, epochs, grants, audit), whose public half is in the config and
//!   in every credential, and the components root, from which one **component secret** per
//!   component comes, and from that the component's chunk-id key, chunker seed and writer-state
//!   key (so equal content shows only within a component, and cut points say nothing about
//!   content). A revoked full key still knows the root secret: it reads nothing sealed after
//!   its revocation, but could sign keyring objects where it can still write (`docs/security.md`).
//! - An **agent** holds a writer credential: the repository id, the root public key, its
//!   component's name and secret. It chunks, hashes and seals; it reads back only its own
//!   writer state (a cache), never a backup.
//! - `keys rotate` and `keys revoke` start a new epoch whose grants go only to the keys still
//!   active: a revoked key opens nothing written afterwards, even with its object put back,
//!   and writers (who cannot sign) cannot add a key, an epoch or a grant.
//!
//! The objects are in [`keyring`]; credentials in [`credential`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{ChaChaBox, PublicKey, SecretKey};

use crate::crypto::CryptoError;

pub mod credential;
pub mod keyring;

/// In front of every sealed object: the magic and the epoch (u32, big endian); then the
/// ephemeral public key, the nonce and the ciphertext with its tag.
const MAGIC: &[u8; 8] = b"aitbcS1\n";
const HEADER_LEN: usize = MAGIC.len() + 4;
const NONCE_LEN: usize = 24;
const OVERHEAD: usize = crypto_box::KEY_SIZE + NONCE_LEN + 16;

/// Which of an epoch's two key pairs an object is sealed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Chunks: readable with a full key only.
    Data,
    /// Manifests: readable with a full or a metadata key.
    Meta,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Meta => "metadata",
        }
    }
}

/// An epoch's public keys: what a writer seals to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochKeys {
    pub epoch: u32,
    pub data: PublicKey,
    pub meta: PublicKey,
}

/// What one holder of a sealed repository knows: where to seal, what it can open, and how to
/// key chunk ids and cut points.
#[derive(Clone)]
pub struct Sealed {
    pub(crate) current: EpochKeys,
    pub(crate) data: BTreeMap<u32, SecretKey>,
    pub(crate) meta: BTreeMap<u32, SecretKey>,
    pub(crate) components: Components,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("epoch", &self.current.epoch)
            .field("data_epochs", &self.data.keys().collect::<Vec<_>>())
            .field("meta_epochs", &self.meta.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The component secrets a holder has: every one (derived from the root secret) or its own.
#[derive(Clone)]
pub(crate) enum Components {
    Root(Arc<[u8; 32]>),
    One(ComponentKey),
    /// A metadata key: chunk ids are not its business.
    None,
}

/// A component's chunk-id key and chunker seed.
#[derive(Clone)]
pub struct ComponentKey {
    pub name: String,
    id_key: [u8; 32],
    seed: u64,
    /// Seals what the component's writers keep between backups (their caches): readable with
    /// the writer credential, and by nothing that reads data only.
    state_key: [u8; 32],
}

impl ComponentKey {
    /// The component secret of `name` under the components root (see
    /// [`keyring::components_root`]).
    pub fn secret(components_root: &[u8; 32], name: &str) -> [u8; 32] {
        let mut material = components_root.to_vec();
        material.extend_from_slice(name.as_bytes());
        blake3::derive_key("aitbc-backup 2026 component secret", &material)
    }

    pub fn from_secret(name: &str, secret: &[u8; 32]) -> ComponentKey {
        let seed_bytes = blake3::derive_key("aitbc-backup 2026 chunker seed", secret);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&seed_bytes[..8]);
        ComponentKey {
            name: name.to_owned(),
            id_key: blake3::derive_key("aitbc-backup 2026 component chunk id", secret),
            // fastcdc leaves its gear table unkeyed for seed 0.
            seed: u64::from_le_bytes(seed) | 1,
            state_key: blake3::derive_key("aitbc-backup 2026 writer state", secret),
        }
    }

    pub fn chunk_id(&self, data: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.id_key, data)
    }

    pub fn chunker_seed(&self) -> u64 {
        self.seed
    }

    /// The AEAD of the component's writer state.
    pub(crate) fn state_keys(&self) -> crate::crypto::DataKeys {
        crate::crypto::DataKeys::from_master(&self.state_key)
    }
}

impl Sealed {
    /// The key of component `name`: its own for a writer (which refuses any other), derived
    /// from the root secret for a full key. A metadata key (the coordinator's) has none: it
    /// neither writes nor reads chunks.
    pub(crate) fn component(&self, name: &str) -> Result<Option<ComponentKey>, CryptoError> {
        match &self.components {
            Components::Root(root) => Ok(Some(ComponentKey::from_secret(
                name,
                &ComponentKey::secret(root, name),
            ))),
            Components::One(own) if own.name == name => Ok(Some(own.clone())),
            Components::One(own) => Err(CryptoError::NoKey(format!(
                "backups of component `{name}` are keyed with that component's secret; this \
                 credential holds only `{}`'s",
                own.name
            ))),
            Components::None => Err(CryptoError::NoKey(format!(
                "component `{name}`: the coordinator's metadata credential neither writes nor \
                 reads backups (an agent needs a writer credential: `aitbc-backup repo keys \
                 issue --writer {name}`)"
            ))),
        }
    }

    /// The component a holder writes as until told otherwise: a writer's own, `fallback`
    /// for a full key, none for a metadata key.
    pub(crate) fn default_component(&self, fallback: &str) -> Option<ComponentKey> {
        match &self.components {
            Components::One(own) => Some(own.clone()),
            Components::Root(root) => Some(ComponentKey::from_secret(
                fallback,
                &ComponentKey::secret(root, fallback),
            )),
            Components::None => None,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.current.epoch
    }

    /// Whether this holder reads data (holds some epoch's data key).
    pub fn reads_data(&self) -> bool {
        !self.data.is_empty()
    }

    /// Seals `plain` to the current epoch's `kind` key.
    pub fn seal(&self, kind: Kind, plain: &[u8]) -> Vec<u8> {
        let recipient = match kind {
            Kind::Data => &self.current.data,
            Kind::Meta => &self.current.meta,
        };
        seal_to(recipient, self.current.epoch, plain)
    }

    /// Opens an object sealed by [`Sealed::seal`].
    pub fn open(&self, kind: Kind, what: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (epoch, body) = split_header(what, sealed)?;
        let keys = match kind {
            Kind::Data => &self.data,
            Kind::Meta => &self.meta,
        };
        let Some(secret) = keys.get(&epoch) else {
            return Err(CryptoError::NoKey(format!(
                "{what} is sealed to epoch {epoch}'s {} key, which this key does not hold{}",
                kind.name(),
                if keys.is_empty() {
                    " (a writer's or the coordinator's credential reads no data: restores and \
                     verify --read-data need an operator's key)"
                } else {
                    " (a key revoked before that epoch began, or a metadata key)"
                }
            )));
        };
        let (ephemeral, rest) = body.split_at(crypto_box::KEY_SIZE);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let ephemeral: [u8; crypto_box::KEY_SIZE] = ephemeral
            .try_into()
            .map_err(|_| CryptoError::Truncated(what.to_owned()))?;
        ChaChaBox::new(&PublicKey::from(ephemeral), secret)
            .decrypt(nonce.into(), ciphertext)
            .map_err(|_| CryptoError::Authentication(what.to_owned()))
    }
}

/// Whether `stored` begins like a sealed object (version 1 objects start with a random nonce:
/// the chance that one begins with the magic is 2^-64).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(MAGIC)
}

/// `epoch`'s header and `plain` boxed to `recipient` from a fresh ephemeral key.
fn seal_to(recipient: &PublicKey, epoch: u32, plain: &[u8]) -> Vec<u8> {
    let ephemeral = SecretKey::generate(&mut OsRng);
    let nonce = ChaChaBox::generate_nonce(&mut OsRng);
    let mut out = Vec::with_capacity(HEADER_LEN + OVERHEAD + plain.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(ephemeral.public_key().as_bytes());
    out.extend_from_slice(&nonce);
    // Encryption in memory with a valid key and nonce does not fail.
    out.extend_from_slice(
        &ChaChaBox::new(recipient, &ephemeral)
            .encrypt(&nonce, plain)
            .unwrap_or_default(),
    );
    out
}

fn split_header<'a>(what: &str, sealed: &'a [u8]) -> Result<(u32, &'a [u8]), CryptoError> {
    if sealed.len() < HEADER_LEN + OVERHEAD || &sealed[..MAGIC.len()] != MAGIC {
        return Err(CryptoError::Truncated(what.to_owned()));
    }
    let mut epoch = [0u8; 4];
    epoch.copy_from_slice(&sealed[MAGIC.len()..HEADER_LEN]);
    Ok((u32::from_be_bytes(epoch), &sealed[HEADER_LEN..]))
}

/// A fresh X25519 secret.
pub(crate) fn new_secret() -> SecretKey {
    SecretKey::generate(&mut OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(epochs: &[(u32, &SecretKey, &SecretKey)], current: u32) -> Sealed {
        let (_, d, m) = epochs
            .iter()
            .find(|(e, ..)| *e == current)
            .expect("current");
        Sealed {
            current: EpochKeys {
                epoch: current,
                data: d.public_key(),
                meta: m.public_key(),
            },
            data: epochs.iter().map(|(e, d, _)| (*e, (*d).clone())).collect(),
            meta: epochs.iter().map(|(e, _, m)| (*e, (*m).clone())).collect(),
            components: Components::None,
        }
    }

    #[test]
    fn sealed_objects_open_only_with_their_epochs_key() {
        let (d1, m1, d2, m2) = (new_secret(), new_secret(), new_secret(), new_secret());
        let writer1 = Sealed {
            data: BTreeMap::new(),
            meta: BTreeMap::new(),
            ..holder(&[(1, &d1, &m1)], 1)
        };
        let sealed = writer1.seal(Kind::Data, b"ledger page");
        assert!(!sealed.windows(6).any(|w| w == b"ledger"));
        // The writer itself cannot open what it sealed.
        assert!(matches!(
            writer1.open(Kind::Data, "c", &sealed),
            Err(CryptoError::NoKey(_))
        ));
        let old = holder(&[(1, &d1, &m1)], 1);
        assert_eq!(
            old.open(Kind::Data, "c", &sealed).expect("open"),
            b"ledger page"
        );
        // Data and meta keys are distinct.
        assert!(old.open(Kind::Meta, "c", &sealed).is_err());
        // A holder of epoch 1 only cannot open epoch 2's objects.
        let both = holder(&[(1, &d1, &m1), (2, &d2, &m2)], 2);
        let newer = both.seal(Kind::Data, b"after the rotation");
        assert!(matches!(
            old.open(Kind::Data, "c", &newer),
            Err(CryptoError::NoKey(_))
        ));
        assert_eq!(
            both.open(Kind::Data, "c", &newer).expect("open"),
            b"after the rotation"
        );
        let mut tampered = newer.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            both.open(Kind::Data, "c", &tampered),
            Err(CryptoError::Authentication(_))
        ));
    }

    #[test]
    fn component_keys_differ_by_component_and_root() {
        let root = [3u8; 32];
        let ledger = ComponentKey::from_secret("ledger", &ComponentKey::secret(&root, "ledger"));
        let redis = ComponentKey::from_secret("redis", &ComponentKey::secret(&root, "redis"));
        let other =
            ComponentKey::from_secret("ledger", &ComponentKey::secret(&[4u8; 32], "ledger"));
        assert_ne!(ledger.chunk_id(b"x"), redis.chunk_id(b"x"));
        assert_ne!(ledger.chunk_id(b"x"), other.chunk_id(b"x"));
        assert_ne!(ledger.chunker_seed(), redis.chunker_seed());
        assert_ne!(ledger.chunker_seed(), 0);
    }
}
