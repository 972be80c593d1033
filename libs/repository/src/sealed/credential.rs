//! Credentials of sealed repositories, as one line of text an operator hands to a daemon
//! (`repository.credential`, from the environment or a file, never the config file):
//!
//! - a **writer** credential (an agent's): the repository id, the root public key, its
//!   component's name and secret. It seals and keys chunks; it opens nothing.
//! - a **metadata** credential (the coordinator's): the repository id, the root public key, a
//!   key id and that key's X25519 secret, which opens the metadata grants: manifests, never
//!   data.
//!
//! Text form: `aitbc-backup-credential-1:` and the base64 (URL-safe, unpadded) of a JSON object.

use base64::Engine;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "aitbc-backup-credential-1:";

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    Writer {
        repository: String,
        root_public: String,
        component: String,
        secret: String,
        /// BLAKE3 keyed by the secret over the component's name (hex): an edited name or
        /// secret is refused instead of writing backups keyed by the wrong secret.
        check: String,
    },
    Metadata {
        repository: String,
        root_public: String,
        key_id: String,
        secret: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Writer { component, .. } => {
                write!(f, "Credential::Writer({component}, [REDACTED])")
            }
            Credential::Metadata { key_id, .. } => {
                write!(f, "Credential::Metadata({key_id}, [REDACTED])")
            }
        }
    }
}

fn writer_check(component: &str, secret: &[u8; 32]) -> String {
    blake3::keyed_hash(secret, component.as_bytes())
        .to_hex()
        .to_string()
}

impl Credential {
    /// A writer credential for `component` with its secret.
    pub fn writer(
        repository: &str,
        root_public: &str,
        component: &str,
        secret: &[u8; 32],
    ) -> Credential {
        Credential::Writer {
            repository: repository.to_owned(),
            root_public: root_public.to_owned(),
            component: component.to_owned(),
            secret: hex::encode(secret),
            check: writer_check(component, secret),
        }
    }

    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Parses the text form; the error says what is wrong without echoing the secret.
    pub fn parse(text: &str) -> Result<Credential, String> {
        let body = text.trim().strip_prefix(PREFIX).ok_or_else(|| {
            format!("not a credential of this program (it starts with `{PREFIX}`)")
        })?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "the credential is not valid base64 (copied in part?)".to_owned())?;
        let credential: Credential = serde_json::from_slice(&json)
            .map_err(|e| format!("the credential is malformed: {e}"))?;
        if let Credential::Writer {
            component, check, ..
        } = &credential
            && writer_check(component, &credential.secret_bytes()?) != *check
        {
            return Err(format!(
                "the writer credential for `{component}` was altered (its name and secret do not \
                 match); issue a new one"
            ));
        }
        Ok(credential)
    }

    pub fn repository(&self) -> &str {
        match self {
            Credential::Writer { repository, .. } | Credential::Metadata { repository, .. } => {
                repository
            }
        }
    }

    pub fn root_public(&self) -> &str {
        match self {
            Credential::Writer { root_public, .. } | Credential::Metadata { root_public, .. } => {
                root_public
            }
        }
    }

    /// A 32-byte secret in hex.
    pub(crate) fn secret_bytes(&self) -> Result<[u8; 32], String> {
        let secret = match self {
            Credential::Writer { secret, .. } | Credential::Metadata { secret, .. } => secret,
        };
        hex::decode(secret)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| "the credential's secret is not 32 bytes of hex".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let writer = Credential::writer("r1", &"ab".repeat(32), "redis", &[0xcd; 32]);
        let text = writer.encode();
        assert_eq!(Credential::parse(&text), Ok(writer.clone()));
        assert_eq!(
            Credential::parse(&format!("  {text}\n")),
            Ok(writer.clone())
        );
        assert!(!format!("{writer:?}").contains("cdcd"));
        assert!(Credential::parse("hunter2").is_err());
        let cut = &text[..text.len() - 5];
        let err = Credential::parse(cut).expect_err("cut");
        assert!(!err.contains("cdcd"), "{err}");
        assert_eq!(writer.secret_bytes().expect("bytes"), [0xcd; 32]);
        // A name edited in the text is refused.
        let Credential::Writer {
            repository,
            root_public,
            secret,
            check,
            ..
        } = writer.clone()
        else {
            unreachable!()
        };
        let edited = Credential::Writer {
            repository,
            root_public,
            component: "ledger".into(),
            secret,
            check,
        };
        let err = Credential::parse(&edited.encode()).expect_err("edited");
        assert!(err.contains("altered"), "{err}");
    }
}
