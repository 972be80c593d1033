//! Roles carried by certificates.
//!
//! A certificate grants exactly one role through one SAN URI of the form
//! `spiffe://aitbc-backup/<role>/<name>`, where role is `agent`, `operator` or `coordinator`
//! and name is `[A-Za-z0-9._-]{1,63}`. A certificate with no such URI, or with more than one,
//! grants nothing.

use std::fmt;

/// The URI prefix of every role SAN.
pub const SPIFFE_PREFIX: &str = "spiffe://aitbc-backup/";

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A sidecar agent: may open an agent session, nothing else.
    Agent,
    /// A human or automation: may call the operator API.
    Operator,
    /// The coordinator's own (server) certificate.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "agent" => Some(Role::Agent),
            "operator" => Some(Role::Operator),
            "coordinator" => Some(Role::Coordinator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is on the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl PeerIdentity {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        if !is_valid_name(&name) {
            return Err(IdentityError::BadName(name));
        }
        Ok(PeerIdentity { role, name })
    }

    /// The SAN URI that grants this identity.
    pub fn uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }

    /// Parses a role URI; `None` for URIs that are not aitbc-backup role URIs.
    pub fn from_uri(uri: &str) -> Option<Result<Self, IdentityError>> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
        let parsed = match rest.split_once('/') {
            Some((role, name)) => match Role::parse(role) {
                Some(role) => PeerIdentity::new(role, name),
                None => Err(IdentityError::UnknownRole(role.to_owned())),
            },
            None => Err(IdentityError::Malformed(uri.to_owned())),
        };
        Some(parsed)
    }

    /// Reads the identity from a DER certificate.
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let mut found = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && let Some(identity) = PeerIdentity::from_uri(uri)
                {
                    found.push(identity?);
                }
            }
        }
        match found.len() {
            0 => Err(IdentityError::NoRole),
            1 => Ok(found.remove(0)),
            _ => Err(IdentityError::SeveralRoles),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Names of agents, operators and coordinators: short, and safe in paths, URIs and labels.
pub fn is_valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.')
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate carries no aitbc-backup role (SAN URI {SPIFFE_PREFIX}<role>/<name>)")]
    NoRole,
    #[error("certificate carries more than one aitbc-backup role")]
    SeveralRoles,
    #[error("unknown role `{0}` (expected agent, operator or coordinator)")]
    UnknownRole(String),
    #[error("malformed role URI `{0}`")]
    Malformed(String),
    #[error("invalid name `{0}`: 1-63 characters of A-Z a-z 0-9 . _ -, not starting with a dot")]
    BadName(String),
    #[error("certificate cannot be parsed: {0}")]
    Unparsable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let id = PeerIdentity::new(Role::Agent, "pg-0").expect("valid");
        assert_eq!(id.uri(), "spiffe://aitbc-backup/agent/pg-0");
        assert_eq!(PeerIdentity::from_uri(&id.uri()), Some(Ok(id)));
    }

    #[test]
    fn rejects_bad_uris_and_names() {
        assert_eq!(PeerIdentity::from_uri("spiffe://other/agent/x"), None);
        assert_eq!(
            PeerIdentity::from_uri("spiffe://aitbc-backup/root/x"),
            Some(Err(IdentityError::UnknownRole("root".into())))
        );
        assert!(matches!(
            PeerIdentity::from_uri("spiffe://aitbc-backup/agent/../x"),
            Some(Err(IdentityError::BadName(_)))
        ));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name(&"a".repeat(64)));
        assert!(is_valid_name("redis_1.prod-a"));
    }
}
