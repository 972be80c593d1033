//! The client side of mTLS: how the CLI and the agents dial the coordinator.
//!
//! **The coordinator's role is checked in the handshake.** The coordinator accepts a client
//! only for the role its certificate grants; the clients hold the coordinator to the same rule:
//! its certificate must chain to our CA, name the host dialled, and grant role `coordinator`
//! (SAN URI `spiffe://aitbc-backup/coordinator/<name>`). [`RoleVerifier`] is a rustls
//! `ServerCertVerifier` that runs the standard WebPKI verification and then reads the role.
//! Checking inside the verifier rather than after the handshake because:
//! - the handshake fails before the client sends its own certificate or any request, so a
//!   server with a misissued certificate (an agent's, or one with no role) never learns who
//!   dialled it and never receives a restore or delete;
//! - tonic's channel reconnects by itself and gives the caller no handle on the peer's
//!   certificate; a verifier runs on every connection the channel makes, with no code path that
//!   could forget the check;
//! - the WebPKI verifier still does everything it did (chain, validity, host name, `server auth`
//!   usage): the role is one more condition, never a replacement.
//!
//! **A refused client certificate is explained.** With TLS 1.3 the server checks the client's
//! certificate after the client has finished its half of the handshake, so a refusal (a TLS
//! alert) reaches the client only on its first read, which tonic reports as `Cancelled:
//! operation was canceled`. [`CoordinatorTls::diagnose`] repeats the handshake on a fresh
//! connection and reads the first record, so a failed call can say which alert the
//! coordinator sent and what it means.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{ClientTlsConfig, Endpoint, Identity};

use crate::files::LoadedTls;
use crate::identity::SPIFFE_PREFIX;
use crate::{IdentityError, PeerIdentity, Role};

/// How long [`CoordinatorTls::diagnose`] waits for the coordinator's verdict.
pub const DIAGNOSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("CA certificate file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate file {path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("TLS client configuration: {0}")]
    Config(String),
}

/// The role check on the server's certificate, on top of WebPKI verification.
#[derive(Debug)]
pub struct RoleVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expected: Role,
}

/// Why [`RoleVerifier`] refused a server: the role it found (or why none), and what WebPKI
/// said when it refused the certificate as well.
#[derive(Debug, thiserror::Error)]
pub struct WrongRole {
    pub expected: Role,
    pub found: Result<PeerIdentity, IdentityError>,
    pub also: Option<rustls::Error>,
}

impl std::fmt::Display for WrongRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let expected = self.expected;
        match &self.found {
            Ok(identity) => write!(
                f,
                "the server's certificate grants role `{}` ({}), not `{expected}`",
                identity.role,
                identity.uri()
            )?,
            Err(IdentityError::NoRole) => write!(
                f,
                "the server's certificate grants no role (no SAN URI {SPIFFE_PREFIX}<role>/<name>), \
                 not `{expected}`"
            )?,
            Err(err) => write!(
                f,
                "the server's certificate: {err}; expected role `{expected}`"
            )?,
        }
        write!(
            f,
            ": refusing to talk to it (a {expected}'s certificate carries the SAN URI \
             {SPIFFE_PREFIX}{expected}/<name>; check the address, or the certificate the server \
             was issued)"
        )?;
        if let Some(also) = &self.also {
            write!(f, "; the certificate is also invalid: {also}")?;
        }
        Ok(())
    }
}

impl RoleVerifier {
    /// Trusts the CA certificates in `ca_pem` and requires `expected` in the server's
    /// certificate.
    pub fn new(ca_pem: &[u8], expected: Role) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
            roots.add(cert).map_err(|e| e.to_string())?;
        }
        if roots.is_empty() {
            return Err("holds no CA certificate".to_owned());
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        Ok(RoleVerifier { webpki, expected })
    }
}

impl ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let found = PeerIdentity::from_certificate_der(end_entity.as_ref());
        let right_role = matches!(&found, Ok(id) if id.role == self.expected);
        match verified {
            Ok(verified) if right_role => Ok(verified),
            // A certificate WebPKI refuses but that carries the right role: WebPKI's reason.
            Err(err) if right_role => Err(err),
            verified => Err(rustls::Error::Other(rustls::OtherError(Arc::new(
                WrongRole {
                    expected: self.expected,
                    found,
                    also: verified.err(),
                },
            )))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.webpki.root_hint_subjects()
    }
}

/// Everything a client needs to dial the coordinator: our identity, the role-checking
/// verifier, the name expected in the coordinator's certificate.
#[derive(Clone)]
pub struct CoordinatorTls {
    tls: LoadedTls,
    verifier: Arc<RoleVerifier>,
    server_name: String,
}

impl std::fmt::Debug for CoordinatorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorTls")
            .field("cert", &self.tls.files.cert)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl CoordinatorTls {
    /// Our certificate and key towards a server that must grant role `coordinator` and name
    /// `server_name`.
    pub fn new(tls: &LoadedTls, server_name: &str) -> Result<Self, ClientTlsError> {
        let verifier = RoleVerifier::new(&tls.ca_pem, Role::Coordinator).map_err(|reason| {
            ClientTlsError::BadCa {
                path: tls.files.ca.clone(),
                reason,
            }
        })?;
        ServerName::try_from(server_name.to_owned()).map_err(|_| {
            ClientTlsError::Config(format!("`{server_name}` is not a valid server name"))
        })?;
        Ok(CoordinatorTls {
            tls: tls.clone(),
            verifier: Arc::new(verifier),
            server_name: server_name.to_owned(),
        })
    }

    /// `endpoint` with this TLS configuration.
    pub fn endpoint(&self, endpoint: Endpoint) -> Result<Endpoint, tonic::transport::Error> {
        let config = ClientTlsConfig::new()
            .identity(Identity::from_pem(&self.tls.cert_pem, &self.tls.key_pem))
            .domain_name(self.server_name.clone());
        endpoint.tls_config_with_verifier(config, self.verifier.clone())
    }

    /// The certificate file this client presents.
    pub fn cert_path(&self) -> &std::path::Path {
        &self.tls.files.cert
    }

    /// Dials `url` (`https://host:port`) again and reads the coordinator's first record, to
    /// learn whether it refuses this client and why. `None` when it accepts us (or cannot be
    /// reached, which the failed call already said).
    pub async fn diagnose(&self, url: &str) -> Option<String> {
        match tokio::time::timeout(DIAGNOSE_TIMEOUT, self.probe(url)).await {
            Ok(Ok(())) | Err(_) => None,
            Ok(Err(reason)) => Some(reason),
        }
    }

    async fn probe(&self, url: &str) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let uri: tonic::codegen::http::Uri = url.parse().map_err(|_| String::new())?;
        let host = uri.host().ok_or_else(String::new)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let tcp = match tokio::net::TcpStream::connect((host, port)).await {
            Ok(tcp) => tcp,
            Err(_) => return Ok(()),
        };
        let config = self.rustls_config().map_err(|e| e.to_string())?;
        let name = ServerName::try_from(self.server_name.clone()).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|err| self.explain(&err).unwrap_or_else(|| err.to_string()))?;
        // The server sends its HTTP/2 settings once it has accepted us, an alert otherwise.
        let mut first = [0u8; 1];
        match stream.read(&mut first).await {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err(format!(
                "the coordinator closed the connection right after the TLS handshake, \
                 without saying why (check its log for certificate {})",
                self.cert_path().display()
            )),
            Err(err) => Err(self.explain(&err).unwrap_or_else(|| err.to_string())),
        }
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, rustls::Error> {
        let chain = CertificateDer::pem_slice_iter(&self.tls.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&self.tls.key_pem)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(self.verifier.clone())
        .with_client_auth_cert(chain, key)?;
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(config)
    }

    /// A TLS failure somewhere in `err`'s chain, explained; `None` if there is none.
    pub fn explain(&self, err: &(dyn std::error::Error + 'static)) -> Option<String> {
        let rustls_error = find_rustls_error(err)?;
        Some(match rustls_error {
            rustls::Error::Other(other) => match other.0.downcast_ref::<WrongRole>() {
                Some(wrong) => wrong.to_string(),
                None => format!("TLS: {other}"),
            },
            rustls::Error::InvalidCertificate(reason) => {
                let ca = self.tls.files.ca.display();
                let reason = match reason {
                    rustls::CertificateError::UnknownIssuer
                    | rustls::CertificateError::BadSignature => {
                        format!("it was not issued by the CA in {ca}")
                    }
                    other => format!("{other}"),
                };
                format!(
                    "the coordinator's certificate is not valid: {reason} (it must be issued by \
                     the CA in {ca} for the name `{}`)",
                    self.server_name
                )
            }
            rustls::Error::AlertReceived(alert) => format!(
                "the coordinator refused this client's certificate {} (TLS alert `{}`): {}",
                self.cert_path().display(),
                alert_name(*alert),
                self.alert_meaning(*alert)
            ),
            other => format!("TLS: {other}"),
        })
    }

    fn alert_meaning(&self, alert: AlertDescription) -> String {
        let cert = self.cert_path().display();
        match alert {
            AlertDescription::UnknownCA => {
                "the coordinator does not trust the CA that issued it; use a certificate issued by \
                 the coordinator's CA (`aitbc-backup certs issue`, or cert-manager's issuer)"
                    .to_owned()
            }
            AlertDescription::CertificateExpired => {
                match crate::files::validity_problem(&self.tls.cert_pem) {
                    Some(problem) => format!("{problem}; issue a new certificate"),
                    None => {
                        "it has expired or is not yet valid as the coordinator's clock sees it; \
                         issue a new certificate or check the clocks"
                            .to_owned()
                    }
                }
            }
            AlertDescription::CertificateRevoked => "it has been revoked".to_owned(),
            AlertDescription::UnsupportedCertificate => format!(
                "it is not allowed for client authentication; {cert} needs the extended key \
                 usage `client auth`"
            ),
            AlertDescription::BadCertificate => "it is malformed or not valid".to_owned(),
            AlertDescription::CertificateRequired => {
                "no client certificate was sent; pass --cert and --key".to_owned()
            }
            // The key was checked against the certificate when it was loaded, so the signature
            // that failed is the CA's: another CA, with the same name as the coordinator's.
            AlertDescription::DecryptError => {
                "its signature does not verify against the coordinator's CA: it was issued by \
                 another CA (one with the same name); use a certificate issued by the \
                 coordinator's CA"
                    .to_owned()
            }
            AlertDescription::AccessDenied => "access denied".to_owned(),
            _ => "see the coordinator's log".to_owned(),
        }
    }
}

fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // io::Error does not list the error it wraps as its source.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(found) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// The RFC 8446 name of an alert (`unknown_ca`, `certificate_expired`, ...).
fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut name = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            // `UnknownCA` → `unknown_ca`: a new word starts at a capital after a lower case.
            let previous = debug.chars().nth(i.wrapping_sub(1));
            if i > 0 && previous.is_some_and(|p| p.is_ascii_lowercase()) {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        } else {
            name.push(c);
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CertificateAuthority;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
    }

    /// What the verifier says about a server certificate for `localhost`.
    fn verify(ca: &CertificateAuthority, cert_pem: &str) -> Result<(), String> {
        let verifier =
            RoleVerifier::new(ca.cert_pem().as_bytes(), Role::Coordinator).expect("verifier");
        let name = ServerName::try_from("localhost").expect("name");
        verifier
            .verify_server_cert(&der(cert_pem), &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn only_a_coordinator_certificate_is_accepted() {
        let ca = CertificateAuthority::generate("test").expect("ca");
        let hosts = ["localhost".to_owned()];
        let id = |role, name| PeerIdentity::new(role, name).expect("name");

        let coordinator = ca
            .issue(&id(Role::Coordinator, "c"), &hosts)
            .expect("issue");
        assert_eq!(verify(&ca, &coordinator.cert_pem), Ok(()));

        // Misissued: server auth, a good chain and the right host, but the wrong role or none.
        let agent = ca
            .issue_server_certificate(Some(&id(Role::Agent, "pg-0")), &hosts)
            .expect("issue");
        let err = verify(&ca, &agent.cert_pem).expect_err("agent certificate accepted");
        assert!(
            err.contains("grants role `agent`") && err.contains("not `coordinator`"),
            "{err}"
        );
        assert!(!err.contains("also invalid"), "{err}");
        let none = ca.issue_server_certificate(None, &hosts).expect("issue");
        let err = verify(&ca, &none.cert_pem).expect_err("role-less certificate accepted");
        assert!(err.contains("grants no role"), "{err}");

        // An ordinary agent certificate (client auth only): refused for both reasons.
        let client_only = ca.issue(&id(Role::Operator, "o"), &hosts).expect("issue");
        let err = verify(&ca, &client_only.cert_pem).expect_err("operator certificate accepted");
        assert!(
            err.contains("grants role `operator`") && err.contains("also invalid"),
            "{err}"
        );

        // The right role from another CA: WebPKI's refusal, unchanged.
        let foreign = CertificateAuthority::generate("other").expect("ca");
        let impostor = foreign
            .issue(&id(Role::Coordinator, "c"), &hosts)
            .expect("issue");
        let err = verify(&ca, &impostor.cert_pem).expect_err("foreign CA accepted");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn alert_names_follow_the_rfc() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::CertificateExpired),
            "certificate_expired"
        );
        assert_eq!(
            alert_name(AlertDescription::BadCertificate),
            "bad_certificate"
        );
    }
}
