//! mTLS for every aitbc-backup connection.
//!
//! - [`identity`]: the role a certificate grants, read from a SAN URI
//!   `spiffe://aitbc-backup/<role>/<name>`.
//! - [`client`]: how clients dial the coordinator: its certificate must grant role
//!   `coordinator`; a refused client certificate is explained.
//! - [`files`]: loading PEM files into tonic's server and client TLS configs, with errors that
//!   name the file.
//! - [`authority`]: a small certificate authority (rcgen) for `aitbc-backup certs init`, tests and
//!   benchmarks.

pub mod authority;
pub mod client;
pub mod files;
pub mod identity;

pub use authority::{CertificateAuthority, IssuedCertificate};
pub use client::{ClientTlsError, CoordinatorTls};
pub use files::{TlsFiles, TlsFilesError};
pub use identity::{IdentityError, PeerIdentity, Role};

/// Selects rustls' process-wide crypto provider (ring, as tonic uses). Both ring and aws-lc-rs
/// are compiled into the workspace (the AWS SDK brings aws-lc-rs), and rustls refuses to guess
/// between them, so every binary calls this first. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
