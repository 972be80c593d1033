use crate::crypto::CryptoError;
use crate::manifest::ManifestError;
use crate::storage::StorageError;

/// Everything that can go wrong with a repository, with the object or key it is about.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0} holds no repository (no `config` object); run `aitbc-backup repo init` first")]
    NotInitialized(String),
    #[error("{0} already holds a repository")]
    AlreadyInitialized(String),
    #[error("repository config: {0}")]
    BadConfig(String),
    /// Storage that cannot keep an Object Lock (the message names what is missing).
    #[error("{0}")]
    CannotLock(String),
    #[error(
        "the repository is encrypted: a passphrase or key file is needed (daemons: \
         repository.passphrase, or a sealed repository's repository.credential)"
    )]
    KeyRequired,
    #[error("none of the repository's {keys} keys opens with the given passphrase or key file")]
    WrongKey { keys: usize },
    #[error("key {id} was revoked at {revoked_at}; use another key")]
    RevokedKey { id: String, revoked_at: String },
    #[error("{0}")]
    KeyManagement(String),
    /// A sealed object this key or credential cannot open.
    #[error("{0}")]
    NoKey(String),
    #[error("object {object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("object {0} is missing")]
    Missing(String),
    #[error("manifest {object}: {source}")]
    Manifest {
        object: String,
        source: ManifestError,
    },
    #[error("manifest {0} already exists; manifests are never overwritten")]
    ManifestExists(String),
    #[error("no manifest with id `{0}`")]
    NoSuchManifest(String),
    /// The message carries the cause (not `source`, so chains do not print it twice).
    #[error("stream I/O: {0}")]
    Io(std::io::Error),
    #[error(
        "chunk {0} is missing although this backup relied on it (removed by hand, or by a \
         garbage collection that ignored the backup's lock); nothing was committed, run the \
         backup again"
    )]
    ChunkVanished(String),
    #[error(
        "this writer's lock {0} may have been taken for stale, so garbage collection may have \
         removed chunks it relies on; nothing was committed, run it again"
    )]
    LockLost(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<CryptoError> for RepoError {
    fn from(err: CryptoError) -> Self {
        match err {
            CryptoError::Authentication(object) | CryptoError::Truncated(object) => {
                RepoError::Corrupt {
                    object,
                    reason: "failed authentication".into(),
                }
            }
            CryptoError::Kdf(message) => RepoError::KeyManagement(message),
            CryptoError::NoKey(message) => RepoError::NoKey(message),
        }
    }
}

impl From<std::io::Error> for RepoError {
    fn from(err: std::io::Error) -> Self {
        RepoError::Io(err)
    }
}
