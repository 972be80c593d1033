use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::Origin;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("environment variable {0} does not name a config key")]
    BadEnvName(String),
    #[error("config key `{key}`{}: {message}", origin_suffix(.origin))]
    Invalid {
        key: String,
        origin: Option<Origin>,
        message: String,
    },
    #[error(
        "config key `{key}` is a secret and must not be in config file {path}; set {env} instead"
    )]
    SecretInFile {
        key: String,
        path: PathBuf,
        env: String,
    },
    #[error("cannot render config: {0}")]
    Render(String),
}

fn origin_suffix(origin: &Option<Origin>) -> String {
    match origin {
        Some(origin) => format!(" (from {origin})"),
        None => String::new(),
    }
}

impl ConfigError {
    /// A validation failure of one key, found after loading.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            origin: None,
            message: message.into(),
        }
    }
}

/// Turns a serde error into one naming the full key and where its value came from. (For an
/// unknown key the path may stop at the enclosing table; the key's name is then taken from the
/// message.)
pub(crate) fn from_serde(
    err: serde_path_to_error::Error<toml::de::Error>,
    origins: &BTreeMap<String, Origin>,
) -> ConfigError {
    let path = err.path().to_string();
    let parent = if path == "." { String::new() } else { path };
    let inner = err.into_inner();
    let message = inner.message().trim().to_owned();
    let key = match unknown_field_name(&message) {
        Some(field) if parent.is_empty() => field.to_owned(),
        Some(field) if parent != field && !parent.ends_with(&format!(".{field}")) => {
            format!("{parent}.{field}")
        }
        _ => parent,
    };
    let message = match unknown_field_name(&message) {
        Some(_) => message.replacen("unknown field", "unknown key", 1),
        None => message,
    };
    ConfigError::Invalid {
        origin: origins.get(&key).cloned(),
        key,
        message,
    }
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}
