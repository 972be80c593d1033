//! Client-side encryption.
//!
//! A repository's random 256-bit master key never leaves memory unwrapped. From it, BLAKE3's key
//! derivation gives two independent keys: one keys the chunk-id hash (so ids say nothing about
//! content to anyone without the key), one is the AEAD key (XChaCha20-Poly1305, a random 192-bit
//! nonce per object, stored in front of the ciphertext). The master key is stored only wrapped,
//! once per key-encryption key (KEK): a passphrase through argon2id, or a key file through
//! BLAKE3's key derivation with a per-key salt.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "object {0} failed authentication (corrupt, or not written with this repository's key)"
    )]
    Authentication(String),
    #[error("object {0} is too short to be encrypted data")]
    Truncated(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// A sealed object whose key the holder lacks (the message says which and why).
    #[error("{0}")]
    NoKey(String),
}

/// The keys of an encrypted repository.
#[derive(Clone)]
pub struct DataKeys {
    id_key: [u8; 32],
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for DataKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKeys([REDACTED])")
    }
}

impl DataKeys {
    pub fn from_master(master: &[u8; 32]) -> Self {
        let id_key = blake3::derive_key("aitbc-backup 2026 chunk id", master);
        let aead_key = blake3::derive_key("aitbc-backup 2026 data aead", master);
        DataKeys {
            id_key,
            aead: XChaCha20Poly1305::new(&aead_key.into()),
        }
    }

    pub fn chunk_id(&self, data: &[u8]) -> blake3::Hash {
        blake3::keyed_hash(&self.id_key, data)
    }

    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.aead, plaintext)
    }

    pub fn open(&self, what: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.aead, what, sealed)
    }
}

fn seal_with(aead: &XChaCha20Poly1305, plaintext: &[u8]) -> Vec<u8> {
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let nonce = XNonce::from(nonce_bytes);
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce_bytes);
    // Encryption with a valid key and nonce cannot fail for in-memory buffers.
    let ciphertext = aead.encrypt(&nonce, plaintext).unwrap_or_default();
    out.extend_from_slice(&ciphertext);
    out
}

fn open_with(aead: &XChaCha20Poly1305, what: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Truncated(what.to_owned()));
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce = XNonce::from_slice(nonce);
    aead.decrypt(nonce, ciphertext)
        .map_err(|_| CryptoError::Authentication(what.to_owned()))
}

/// How a key-encryption key is derived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KekDerivation {
    /// argon2id over a passphrase.
    Passphrase {
        #[serde(with = "hex_bytes")]
        salt: Vec<u8>,
        m_cost_kib: u32,
        t_cost: u32,
        p_cost: u32,
    },
    /// BLAKE3 key derivation over a key file's bytes.
    KeyFile {
        #[serde(with = "hex_bytes")]
        salt: Vec<u8>,
    },
}

/// Argon2id defaults: 64 MiB, 3 passes (OWASP's recommendation for argon2id).
pub const ARGON2_M_COST_KIB: u32 = 64 * 1024;
pub const ARGON2_T_COST: u32 = 3;

/// A secret from which a KEK is derived.
pub enum KeySecret {
    Passphrase(String),
    KeyFile(Vec<u8>),
}

impl KeySecret {
    /// A fresh derivation (new salt) for this kind of secret.
    pub fn new_derivation(&self) -> KekDerivation {
        let salt = rand::random::<[u8; 16]>().to_vec();
        match self {
            KeySecret::Passphrase(_) => KekDerivation::Passphrase {
                salt,
                m_cost_kib: ARGON2_M_COST_KIB,
                t_cost: ARGON2_T_COST,
                p_cost: 1,
            },
            KeySecret::KeyFile(_) => KekDerivation::KeyFile { salt },
        }
    }

    /// Derives the KEK, or None when the secret is of the other kind.
    pub fn derive(&self, derivation: &KekDerivation) -> Result<Option<[u8; 32]>, CryptoError> {
        match (self, derivation) {
            (
                KeySecret::Passphrase(passphrase),
                KekDerivation::Passphrase {
                    salt,
                    m_cost_kib,
                    t_cost,
                    p_cost,
                },
            ) => {
                let params = argon2::Params::new(*m_cost_kib, *t_cost, *p_cost, Some(32))
                    .map_err(|e| CryptoError::Kdf(e.to_string()))?;
                let argon = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = [0u8; 32];
                argon
                    .hash_password_into(passphrase.as_bytes(), salt, &mut out)
                    .map_err(|e| CryptoError::Kdf(e.to_string()))?;
                Ok(Some(out))
            }
            (KeySecret::KeyFile(bytes), KekDerivation::KeyFile { salt }) => {
                let mut material = salt.clone();
                material.extend_from_slice(bytes);
                Ok(Some(blake3::derive_key(
                    "aitbc-backup 2026 key file kek",
                    &material,
                )))
            }
            _ => Ok(None),
        }
    }
}

/// Wraps the master key with a KEK.
pub fn wrap(kek: &[u8; 32], master: &[u8; 32]) -> Vec<u8> {
    seal_with(&XChaCha20Poly1305::new(kek.into()), master)
}

/// Unwraps the master key; None when the KEK is not the one it was wrapped with.
pub fn unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Option<[u8; 32]> {
    let plain = open_with(&XChaCha20Poly1305::new(kek.into()), "key", wrapped).ok()?;
    plain.try_into().ok()
}

/// Wraps a secret with a KEK, bound to `context` (associated data): it unwraps only where the
/// same context is given (a sealed key object under its own repository's root).
pub fn wrap_bound(kek: &[u8; 32], secret: &[u8; 32], context: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::Payload;
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let aead = XChaCha20Poly1305::new(kek.into());
    let payload = Payload {
        msg: secret,
        aad: context,
    };
    let mut out = nonce_bytes.to_vec();
    // Encryption with a valid key and nonce cannot fail for in-memory buffers.
    out.extend_from_slice(
        &aead
            .encrypt(&XNonce::from(nonce_bytes), payload)
            .unwrap_or_default(),
    );
    out
}

/// Unwraps what [`wrap_bound`] wrapped; None for another KEK or another context.
pub fn unwrap_bound(kek: &[u8; 32], wrapped: &[u8], context: &[u8]) -> Option<[u8; 32]> {
    use chacha20poly1305::aead::Payload;
    if wrapped.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, ciphertext) = wrapped.split_at(NONCE_LEN);
    let payload = Payload {
        msg: ciphertext,
        aad: context,
    };
    XChaCha20Poly1305::new(kek.into())
        .decrypt(XNonce::from_slice(nonce), payload)
        .ok()?
        .try_into()
        .ok()
}

/// A check value that tells whether a KEK is the one a (possibly revoked) key used, without
/// revealing anything about it: BLAKE3 key derivation is one-way.
pub fn kek_check(kek: &[u8; 32]) -> String {
    hex::encode(blake3::derive_key("aitbc-backup 2026 kek check", kek))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let keys = DataKeys::from_master(&[7u8; 32]);
        let sealed = keys.seal(b"hello world");
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(keys.open("x", &sealed).expect("open"), b"hello world");
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(matches!(
            keys.open("x", &bad),
            Err(CryptoError::Authentication(_))
        ));
        let other = DataKeys::from_master(&[8u8; 32]);
        assert!(other.open("x", &sealed).is_err());
        assert_ne!(keys.chunk_id(b"a"), blake3::hash(b"a"));
    }

    #[test]
    fn wrap_unwrap_with_key_file() {
        let secret = KeySecret::KeyFile(b"0123456789abcdef".to_vec());
        let derivation = secret.new_derivation();
        let kek = secret
            .derive(&derivation)
            .expect("derive")
            .expect("same kind");
        let master = [9u8; 32];
        let wrapped = wrap(&kek, &master);
        assert_eq!(unwrap(&kek, &wrapped), Some(master));
        let bound = wrap_bound(&kek, &master, b"root a");
        assert_eq!(unwrap_bound(&kek, &bound, b"root a"), Some(master));
        assert_eq!(unwrap_bound(&kek, &bound, b"root b"), None);
        let wrong = KeySecret::KeyFile(b"other".to_vec())
            .derive(&derivation)
            .expect("derive")
            .expect("kind");
        assert_eq!(unwrap(&wrong, &wrapped), None);
        assert_eq!(
            KeySecret::Passphrase("x".into())
                .derive(&derivation)
                .expect("derive"),
            None
        );
    }
}
