//! Loading certificate files into tonic TLS configs. Every error names the file it is about, so a
//! misconfigured deployment says which mount is wrong.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Where a cert-manager Secret (`tls.crt`, `tls.key`, `ca.crt`) is mounted by default.
pub const DEFAULT_TLS_DIR: &str = "/etc/aitbc-backup/tls";

/// The three files of an mTLS endpoint: its own certificate and key, and the CA that signs peers.
/// Each defaults to the cert-manager Secret layout under [`DEFAULT_TLS_DIR`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// PEM certificate (chain) presented to peers.
    pub cert: PathBuf,
    /// PEM private key of `cert`. The path is configuration; the content is a secret.
    pub key: PathBuf,
    /// PEM CA certificate(s) that peers' certificates must chain to.
    pub ca: PathBuf,
}

impl Default for TlsFiles {
    fn default() -> Self {
        let dir = Path::new(DEFAULT_TLS_DIR);
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    // The cause is in the message, so it is not also a `source` (printed twice in a chain).
    #[error("cannot read {what} file {path}: {cause}")]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what} file {path} holds no PEM {expected}")]
    NotPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate file {path}: {cause}")]
    Identity {
        path: PathBuf,
        cause: crate::IdentityError,
    },
    #[error("{what} file {path}: {reason}")]
    Unparsable {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "private key file {key} does not belong to certificate file {cert} (their public keys \
         differ): give the key that was generated with this certificate"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// PEM contents of [`TlsFiles`], read and checked.
#[derive(Clone)]
pub struct LoadedTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub ca_pem: Vec<u8>,
    /// Where they came from, for messages.
    pub files: TlsFiles,
}

impl std::fmt::Debug for LoadedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTls")
            .field("key_pem", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// Reads and sanity-checks all three files: each parses, and the key belongs to the
    /// certificate (rustls would otherwise refuse the pair later with `keys may not be
    /// consistent: KeyMismatch`, naming neither file).
    pub fn load(&self) -> Result<LoadedTls, TlsFilesError> {
        let cert_pem = read_pem(&self.cert, "certificate", "CERTIFICATE")?;
        let key_pem = read_pem(&self.key, "private key", "PRIVATE KEY")?;
        let ca_pem = read_pem(&self.ca, "CA certificate", "CERTIFICATE")?;
        self.check_pair(&cert_pem, &key_pem)?;
        Ok(LoadedTls {
            cert_pem,
            key_pem,
            ca_pem,
            files: self.clone(),
        })
    }

    fn check_pair(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsFilesError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let unparsable = |what, path: &Path, reason: String| TlsFilesError::Unparsable {
            what,
            path: path.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unparsable("certificate", &self.cert, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| unparsable("private key", &self.key, e.to_string()))?;
        let provider = rustls::crypto::ring::default_provider();
        match rustls::sign::CertifiedKey::from_der(chain, key, &provider) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InconsistentKeys(_)) => Err(TlsFilesError::KeyMismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
            Err(err) => Err(unparsable(
                "certificate and private key",
                &self.key,
                format!("{err} (certificate file {})", self.cert.display()),
            )),
        }
    }

    /// The role identity in our own certificate.
    pub fn own_identity(&self) -> Result<crate::PeerIdentity, TlsFilesError> {
        let pem = read_pem(&self.cert, "certificate", "CERTIFICATE")?;
        let der = first_pem_block(&pem).ok_or_else(|| TlsFilesError::NotPem {
            what: "certificate",
            path: self.cert.clone(),
            expected: "CERTIFICATE",
        })?;
        crate::PeerIdentity::from_certificate_der(&der).map_err(|cause| TlsFilesError::Identity {
            path: self.cert.clone(),
            cause,
        })
    }
}

impl LoadedTls {
    /// Server side: present our certificate, require a client certificate signed by the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side, towards the coordinator: see [`crate::client`].
    pub fn coordinator_client(
        &self,
        server_name: &str,
    ) -> Result<crate::client::CoordinatorTls, crate::client::ClientTlsError> {
        crate::client::CoordinatorTls::new(self, server_name)
    }
}

/// Why the first certificate in `cert_pem` is not valid now (expired, or not yet valid), as a
/// sentence; `None` when it is valid or cannot be read.
pub fn validity_problem(cert_pem: &[u8]) -> Option<String> {
    let der = first_pem_block(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        Some(format!("the certificate expired on {}", validity.not_after))
    } else if now < validity.not_before {
        Some(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ))
    } else {
        None
    }
}

fn read_pem(
    path: &Path,
    what: &'static str,
    label: &'static str,
) -> Result<Vec<u8>, TlsFilesError> {
    let bytes = std::fs::read(path).map_err(|cause| TlsFilesError::Read {
        what,
        path: path.to_owned(),
        cause,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    // "PRIVATE KEY" also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY".
    if !text.contains(&format!("{label}-----")) || !text.contains("-----BEGIN ") {
        return Err(TlsFilesError::NotPem {
            what,
            path: path.to_owned(),
            expected: label,
        });
    }
    Ok(bytes)
}

/// The DER body of the first PEM block (our own certificate comes first in a chain file).
fn first_pem_block(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem)
        .ok()
        .map(|(_, block)| block.contents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, PeerIdentity, Role};

    #[test]
    fn errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tls-files-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ca = CertificateAuthority::generate("test").expect("ca");
        let agent = ca
            .issue(&PeerIdentity::new(Role::Agent, "a1").expect("name"), &[])
            .expect("issue");
        agent.write(&dir, "agent").expect("write");
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write ca");
        std::fs::write(dir.join("garbage.key"), "not a key").expect("write");

        let files = TlsFiles {
            cert: dir.join("agent.pem"),
            key: dir.join("agent.key"),
            ca: dir.join("ca.pem"),
        };
        files.load().expect("good files load");
        assert_eq!(files.own_identity().expect("identity").name, "a1");

        let missing = TlsFiles {
            cert: dir.join("nope.pem"),
            ..files.clone()
        };
        let err = missing.load().expect_err("missing cert").to_string();
        assert!(err.contains("nope.pem"), "{err}");

        let garbage = TlsFiles {
            key: dir.join("garbage.key"),
            ..files
        };
        let err = garbage.load().expect_err("bad key").to_string();
        assert!(
            err.contains("garbage.key") && err.contains("PRIVATE KEY"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_key_of_another_certificate_is_named_with_both_files() {
        let dir = std::env::temp_dir().join(format!("tls-pair-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ca = CertificateAuthority::generate("test").expect("ca");
        for name in ["a1", "a2"] {
            ca.issue(&PeerIdentity::new(Role::Agent, name).expect("name"), &[])
                .expect("issue")
                .write(&dir, name)
                .expect("write");
        }
        std::fs::write(dir.join("ca.pem"), ca.cert_pem()).expect("write ca");
        let files = TlsFiles {
            cert: dir.join("a1.pem"),
            key: dir.join("a2.key"),
            ca: dir.join("ca.pem"),
        };
        let err = files
            .load()
            .expect_err("a mismatched pair loads")
            .to_string();
        assert!(
            err.contains("a1.pem") && err.contains("a2.key") && err.contains("does not belong"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
