//! Configuration loading shared by every aitbc-backup binary.
//!
//! A binary's configuration is one typed serde struct (unknown keys denied) built from, in
//! increasing precedence:
//! 1. the struct's defaults,
//! 2. the TOML file given by `--config`,
//! 3. the legacy variables of the old backup scripts ([`LegacyVar`], e.g. `BACKUP_RETENTION_DAYS`),
//! 4. `AITBC_BACKUP_<KEY>` environment variables, where `__` separates nesting levels:
//!    `AITBC_BACKUP_FLEET__HEARTBEAT_INTERVAL=10s` sets `fleet.heartbeat_interval`.
//!
//! Loading is a pure function of (file contents, environment map), so tests never touch the
//! process environment. Errors name the key and where it came from.

mod env;
mod error;
mod secret;
pub mod settings;

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;

pub use env::{ENV_PREFIX, LegacyVar};
pub use error::ConfigError;
pub use secret::{Secret, secret_or_file};

/// Where a key's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(std::path::PathBuf),
    Env(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// What a binary's config accepts beyond its serde struct.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schema {
    /// Old-script variables mapped to keys.
    pub legacy: &'static [LegacyVar],
    /// Dotted keys holding secrets: accepted from the environment only, refused in the file.
    pub secrets: &'static [&'static str],
}

/// Builds `T` from an optional TOML file and an environment map (see the module doc).
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: &BTreeMap<String, String>,
    schema: &Schema,
) -> Result<T, ConfigError> {
    let mut tree = match file {
        Some(path) => read_file(path)?,
        None => toml::Table::new(),
    };
    let mut origins = BTreeMap::new();
    if let Some(path) = file {
        env::record_origins(&tree, "", &Origin::File(path.to_owned()), &mut origins);
        if let Some(key) = schema
            .secrets
            .iter()
            .find(|key| origins.contains_key(**key))
        {
            return Err(ConfigError::SecretInFile {
                key: (*key).to_owned(),
                path: path.to_owned(),
                env: env::env_name(key),
            });
        }
    }
    env::overlay(&mut tree, env, schema.legacy, &mut origins)?;
    let value = toml::Value::Table(tree);
    serde_path_to_error::deserialize(value).map_err(|err| error::from_serde(err, &origins))
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|err| ConfigError::ParseFile {
            path: path.to_owned(),
            message: err.to_string(),
        })
}

/// The effective configuration as TOML, for `--check-config` (secrets print as `[REDACTED]`).
pub fn render<T: serde::Serialize>(config: &T) -> Result<String, ConfigError> {
    toml::to_string_pretty(config).map_err(|err| ConfigError::Render(err.to_string()))
}

/// What a daemon's `main` does with its config: load from the file and the process environment,
/// validate, and with `--check-config` print it (secrets redacted). `None` means it was printed
/// and the process should exit.
pub fn load_for_main<T: DeserializeOwned + serde::Serialize>(
    file: Option<&Path>,
    schema: &Schema,
    validate: impl FnOnce(&T) -> Result<(), ConfigError>,
    check_config: bool,
) -> Result<Option<T>, ConfigError> {
    let config: T = load(file, &process_env(), schema)?;
    validate(&config)?;
    if check_config {
        print!("{}", render(&config)?);
        return Ok(None);
    }
    Ok(Some(config))
}

/// The process environment as a map, for the binaries' `main`.
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests;
