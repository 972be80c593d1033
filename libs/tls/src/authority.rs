//! A small certificate authority: generates the CA and issues role certificates.
//!
//! Used by `aitbc-backup certs init` (a development PKI; production uses cert-manager, see
//! docs/operations.md, "Certificates and roles"), by the test harness (including expired and
//! foreign-CA certificates) and by the session load benchmark. Keys are ECDSA P-256.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::{PeerIdentity, Role};

/// Default lifetime of certificates issued by [`CertificateAuthority::issue`].
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid SAN `{0}`")]
    BadSan(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A CA certificate and its signing key.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM encoded.
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// A new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, AuthorityError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "aitbc-backup");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA (certificate and key PEM), e.g. to issue more agent certificates.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, AuthorityError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for `identity`, valid from an hour ago for [`DEFAULT_VALIDITY`].
    /// `hosts` become DNS or IP SANs (needed on the coordinator's server certificate).
    pub fn issue(
        &self,
        identity: &PeerIdentity,
        hosts: &[String],
    ) -> Result<IssuedCertificate, AuthorityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            identity,
            hosts,
            now - time::Duration::hours(1),
            now + DEFAULT_VALIDITY,
        )
    }

    /// Issues a certificate with an explicit validity window (tests use one in the past).
    pub fn issue_with_validity(
        &self,
        identity: &PeerIdentity,
        hosts: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, AuthorityError> {
        let usages = match identity.role {
            Role::Coordinator => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        self.sign(Some(identity), hosts, usages, not_before, not_after)
    }

    /// A certificate usable by a TLS server (`server auth` and `client auth` usages) for
    /// `hosts`, granting `identity`'s role or no role at all. The coordinator's certificate
    /// comes from [`issue`](Self::issue); this one stands in for a misissued certificate
    /// (cert-manager will put `server auth` on any certificate asked for it), for tests of the
    /// clients' check of the coordinator's role.
    pub fn issue_server_certificate(
        &self,
        identity: Option<&PeerIdentity>,
        hosts: &[String],
    ) -> Result<IssuedCertificate, AuthorityError> {
        let now = OffsetDateTime::now_utc();
        self.sign(
            identity,
            hosts,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            now - time::Duration::hours(1),
            now + DEFAULT_VALIDITY,
        )
    }

    fn sign(
        &self,
        identity: Option<&PeerIdentity>,
        hosts: &[String],
        usages: Vec<ExtendedKeyUsagePurpose>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, AuthorityError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let common_name = identity.map_or_else(|| "no role".to_owned(), ToString::to_string);
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "aitbc-backup");
        params.distinguished_name = dn;
        params.not_before = not_before;
        params.not_after = not_after;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        if let Some(identity) = identity {
            let uri = identity.uri();
            params.subject_alt_names.push(SanType::URI(
                uri.as_str()
                    .try_into()
                    .map_err(|_| AuthorityError::BadSan(uri.clone()))?,
            ));
        }
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    host.as_str()
                        .try_into()
                        .map_err(|_| AuthorityError::BadSan(host.clone()))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl IssuedCertificate {
    /// Writes `<stem>.pem` and `<stem>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), AuthorityError> {
        write_file(&dir.join(format!("{stem}.pem")), &self.cert_pem, 0o644)?;
        write_file(&dir.join(format!("{stem}.key")), &self.key_pem, 0o600)
    }
}

/// Writes a file with the given mode, created with that mode so a key is never world-readable.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), AuthorityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|source| AuthorityError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_role() {
        let ca = CertificateAuthority::generate("test").expect("ca");
        let id = PeerIdentity::new(Role::Operator, "alice").expect("name");
        let issued = ca
            .issue(&id, &["localhost".into(), "127.0.0.1".into()])
            .expect("issue");
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).expect("pem");
        assert_eq!(PeerIdentity::from_certificate_der(&pem.contents), Ok(id));

        let reloaded =
            CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("reload");
        let agent = PeerIdentity::new(Role::Agent, "x").expect("name");
        reloaded.issue(&agent, &[]).expect("reloaded CA issues");
    }
}
