//! Domain types in front of the generated ones. Messages are validated once, on receipt, by
//! `TryFrom`; handlers work with these types only. Every validation failure is a
//! [`ProtocolError`], which maps to `INVALID_ARGUMENT`.

use std::fmt;
use std::str::FromStr;

use crate::{ComponentKind, ConsistencyMode, Register};

mod command;

pub use command::{
    Command, Done, Order, Released, Reply, RestoreOrder, RestoreTarget, Step, Uploaded,
};

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProtocolError {
    pub field: &'static str,
    pub message: String,
}

impl ProtocolError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        ProtocolError {
            field,
            message: message.into(),
        }
    }
}

impl From<ProtocolError> for tonic::Status {
    fn from(err: ProtocolError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// An operator's repository key, as a restore or a data check hands it over. Prints
/// `[REDACTED]`.
#[derive(Clone, PartialEq, Eq)]
pub enum RepoKey {
    Passphrase(String),
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepoKey([REDACTED])")
    }
}

impl RepoKey {
    /// Reads an optional `RepositoryKey` field named `field`: absent is None, present but
    /// empty is an error.
    pub fn from_proto(
        field: &'static str,
        key: Option<crate::RepositoryKey>,
    ) -> Result<Option<RepoKey>, ProtocolError> {
        use crate::repository_key::Secret;
        let Some(key) = key else {
            return Ok(None);
        };
        match key.secret {
            Some(Secret::Passphrase(p)) if !p.is_empty() => Ok(Some(RepoKey::Passphrase(p))),
            Some(Secret::KeyFile(bytes)) if !bytes.is_empty() => Ok(Some(RepoKey::KeyFile(bytes))),
            _ => Err(ProtocolError::new(field, "is empty")),
        }
    }
}

impl std::fmt::Debug for crate::RepositoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RepositoryKey([REDACTED])")
    }
}

impl From<RepoKey> for crate::RepositoryKey {
    fn from(key: RepoKey) -> Self {
        use crate::repository_key::Secret;
        crate::RepositoryKey {
            secret: Some(match key {
                RepoKey::Passphrase(p) => Secret::Passphrase(p),
                RepoKey::KeyFile(bytes) => Secret::KeyFile(bytes),
            }),
        }
    }
}

/// What an agent backs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Postgres,
    Redis,
    Ledger,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Postgres, Component::Redis, Component::Ledger];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Postgres => "postgres",
            Component::Redis => "redis",
            Component::Ledger => "ledger",
        }
    }

    pub fn to_proto(self) -> ComponentKind {
        match self {
            Component::Postgres => ComponentKind::Postgres,
            Component::Redis => ComponentKind::Redis,
            Component::Ledger => ComponentKind::Ledger,
        }
    }

    /// Reads the wire value of a `ComponentKind` field named `field`.
    pub fn from_proto(field: &'static str, value: i32) -> Result<Self, ProtocolError> {
        match ComponentKind::try_from(value) {
            Ok(ComponentKind::Postgres) => Ok(Component::Postgres),
            Ok(ComponentKind::Redis) => Ok(Component::Redis),
            Ok(ComponentKind::Ledger) => Ok(Component::Ledger),
            Ok(ComponentKind::Unspecified) => Err(ProtocolError::new(field, "is unspecified")),
            Err(_) => Err(ProtocolError::new(
                field,
                format!("unknown component kind {value}"),
            )),
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Component {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Component::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| {
                format!("unknown component `{text}` (expected postgres, redis or ledger)")
            })
    }
}

impl serde::Serialize for Component {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Component {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How the components of a snapshot set are cut (see `ConsistencyMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Independent,
    #[default]
    Coordinated,
    Fenced,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Independent, Mode::Coordinated, Mode::Fenced];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Independent => "independent",
            Mode::Coordinated => "coordinated",
            Mode::Fenced => "fenced",
        }
    }

    pub fn to_proto(self) -> ConsistencyMode {
        match self {
            Mode::Independent => ConsistencyMode::Independent,
            Mode::Coordinated => ConsistencyMode::Coordinated,
            Mode::Fenced => ConsistencyMode::Fenced,
        }
    }

    /// Reads a `ConsistencyMode` field; `None` when unspecified (the policy's mode applies).
    pub fn from_proto(field: &'static str, value: i32) -> Result<Option<Self>, ProtocolError> {
        match ConsistencyMode::try_from(value) {
            Ok(ConsistencyMode::Unspecified) => Ok(None),
            Ok(ConsistencyMode::Independent) => Ok(Some(Mode::Independent)),
            Ok(ConsistencyMode::Coordinated) => Ok(Some(Mode::Coordinated)),
            Ok(ConsistencyMode::Fenced) => Ok(Some(Mode::Fenced)),
            Err(_) => Err(ProtocolError::new(
                field,
                format!("unknown consistency mode {value}"),
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.as_str() == text)
            .ok_or_else(|| {
                format!("unknown mode `{text}` (expected independent, coordinated or fenced)")
            })
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A validated `Register` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub name: String,
    pub component: Component,
    pub version: String,
    pub host: String,
}

/// Longest version or host string accepted, so a registry entry stays small.
const MAX_LABEL_LEN: usize = 253;

impl TryFrom<Register> for Registration {
    type Error = ProtocolError;

    fn try_from(msg: Register) -> Result<Self, ProtocolError> {
        if msg.name.is_empty() {
            return Err(ProtocolError::new("register.name", "is empty"));
        }
        let component = Component::from_proto("register.component", msg.component)?;
        for (field, value) in [
            ("register.version", &msg.version),
            ("register.host", &msg.host),
        ] {
            if value.len() > MAX_LABEL_LEN || value.chars().any(char::is_control) {
                return Err(ProtocolError::new(
                    field,
                    format!("must be at most {MAX_LABEL_LEN} printable characters"),
                ));
            }
        }
        Ok(Registration {
            name: msg.name,
            component,
            version: msg.version,
            host: msg.host,
        })
    }
}

impl From<Registration> for Register {
    fn from(reg: Registration) -> Self {
        Register {
            name: reg.name,
            component: reg.component.to_proto() as i32,
            version: reg.version,
            host: reg.host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_is_validated() {
        let good = Register {
            name: "pg-0".into(),
            component: ComponentKind::Postgres as i32,
            version: "0.1.0".into(),
            host: "postgres-0".into(),
        };
        let reg = Registration::try_from(good.clone()).expect("valid");
        assert_eq!(reg.component, Component::Postgres);
        assert_eq!(Register::from(reg), good);

        let err = Registration::try_from(Register {
            component: 0,
            ..good.clone()
        })
        .expect_err("unspecified");
        assert_eq!(err.field, "register.component");
        let err = Registration::try_from(Register {
            component: 42,
            ..good.clone()
        })
        .expect_err("unknown");
        assert!(err.message.contains("42"));
        let err = Registration::try_from(Register {
            host: "a\nb".into(),
            ..good
        })
        .expect_err("control char");
        assert_eq!(err.field, "register.host");
    }

    #[test]
    fn component_names_round_trip() {
        for c in Component::ALL {
            assert_eq!(c.as_str().parse::<Component>(), Ok(c));
        }
        assert!("mysql".parse::<Component>().is_err());
    }
}
