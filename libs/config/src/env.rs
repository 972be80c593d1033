//! The environment overlay: `AITBC_BACKUP_*` variables and the old scripts' variables.

use std::collections::BTreeMap;

use crate::{ConfigError, Origin};

/// Prefix of every environment variable that sets a config key.
pub const ENV_PREFIX: &str = "AITBC_BACKUP_";

/// Variables with a prefix but no config key: the config file path itself.
const NOT_KEYS: &[&str] = &["AITBC_BACKUP_CONFIG"];

/// A variable of the old backup scripts that keeps working, mapped to a config key.
#[derive(Debug, Clone, Copy)]
pub struct LegacyVar {
    /// e.g. `BACKUP_RETENTION_DAYS`
    pub env: &'static str,
    /// dotted key path, e.g. `retention.days`
    pub key: &'static str,
}

pub(crate) fn overlay(
    tree: &mut toml::Table,
    env: &BTreeMap<String, String>,
    legacy: &[LegacyVar],
    origins: &mut BTreeMap<String, Origin>,
) -> Result<(), ConfigError> {
    let legacy_pairs = legacy.iter().filter_map(|var| {
        env.get(var.env)
            .map(|raw| (var.env.to_owned(), var.key.to_owned(), raw))
    });
    let prefixed = env.iter().filter_map(|(name, raw)| {
        let rest = name.strip_prefix(ENV_PREFIX)?;
        if NOT_KEYS.contains(&name.as_str()) {
            return None;
        }
        let key = rest.to_ascii_lowercase().replace("__", ".");
        Some((name.clone(), key, raw))
    });
    // Legacy first, so an explicit AITBC_BACKUP_ variable wins over an old one.
    for (var, key, raw) in legacy_pairs.chain(prefixed) {
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ConfigError::BadEnvName(var));
        }
        set_path(tree, &key, parse_env_value(raw)).map_err(|message| ConfigError::Invalid {
            key: key.clone(),
            origin: Some(Origin::Env(var.clone())),
            message,
        })?;
        origins.insert(key, Origin::Env(var));
    }
    Ok(())
}

/// An environment value is read as a TOML literal when it is one (`30`, `true`, `"x"`,
/// `["a","b"]`), otherwise as a plain string (`5s`, `0 2 * * *`, `/etc/certs/ca.pem`).
fn parse_env_value(raw: &str) -> toml::Value {
    let literal = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"));
    match literal {
        Some(toml::Value::Table(_) | toml::Value::Datetime(_)) | None => {
            toml::Value::String(raw.to_owned())
        }
        Some(value) => value,
    }
}

fn set_path(tree: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts = key.split('.').peekable();
    let mut table = tree;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            table.insert(part.to_owned(), value);
            return Ok(());
        }
        let entry = table
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("`{part}` is a value, not a section")),
        };
    }
    Ok(())
}

/// The environment variable that sets a dotted key.
pub(crate) fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

pub(crate) fn record_origins(
    table: &toml::Table,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if let toml::Value::Table(inner) = value {
            record_origins(inner, &key, origin, origins);
        }
        origins.insert(key, origin.clone());
    }
}
