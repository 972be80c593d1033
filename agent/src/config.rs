//! The agent's configuration (`aitbc-backup-agent.toml`), see
//! docs/configuration.md (kept in step with the defaults by tests/tests/config_docs.rs). Every
//! key can be set by `AITBC_BACKUP_<SECTION>__<KEY>`.

use std::net::SocketAddr;
use std::time::Duration;

use aitbc_backup_backoff::Backoff;
use aitbc_backup_config::settings::{REPOSITORY_LEGACY_VARS, RepositorySettings};
use aitbc_backup_config::{ConfigError, Schema};
use aitbc_backup_proto::model::Component;
use aitbc_backup_telemetry::LogSettings;
use aitbc_backup_tls::TlsFiles;
use serde::{Deserialize, Serialize};

pub const DEFAULT_COORDINATOR_URL: &str = "https://aitbc-backup-coordinator:7443";
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9444";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Kept short so a restarted coordinator sees its fleet back within seconds; jitter spreads
/// thousands of agents over half of it.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Secrets the agent accepts (environment only).
pub const SECRETS: &[&str] = &[
    "repository.passphrase",
    "repository.credential",
    "postgres.password",
    "redis.password",
];

pub const SCHEMA: Schema = Schema {
    legacy: REPOSITORY_LEGACY_VARS,
    secrets: SECRETS,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The agent's name; empty means the name in its certificate (they must match).
    pub name: String,
    /// What this agent backs up: `postgres`, `redis` or `ledger`. Required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<Component>,
    pub coordinator: CoordinatorSettings,
    pub reconnect: ReconnectSettings,
    pub http: HttpSettings,
    pub tls: TlsFiles,
    pub repository: RepositorySettings,
    /// The `ledger` component's settings.
    pub ledger: crate::ledger::LedgerSettings,
    /// The `postgres` component's settings.
    pub postgres: crate::postgres::PostgresSettings,
    /// The `redis` component's settings.
    pub redis: crate::redis::RedisSettings,
    pub log: LogSettings,
    /// How long SIGTERM waits for running work to stop.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSettings {
    /// `https://host:port` of the coordinator's gRPC port.
    pub url: String,
    /// The name expected in the coordinator's certificate; empty means the URL's host.
    pub server_name: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectSettings {
    /// First delay after a lost session; doubles per failed attempt.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: String::new(),
            component: None,
            coordinator: CoordinatorSettings::default(),
            reconnect: ReconnectSettings::default(),
            http: HttpSettings::default(),
            tls: TlsFiles::default(),
            repository: RepositorySettings::default(),
            ledger: crate::ledger::LedgerSettings::default(),
            postgres: crate::postgres::PostgresSettings::default(),
            redis: crate::redis::RedisSettings::default(),
            log: LogSettings::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            url: DEFAULT_COORDINATOR_URL.to_owned(),
            server_name: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl Default for ReconnectSettings {
    fn default() -> Self {
        ReconnectSettings {
            initial: DEFAULT_RECONNECT_INITIAL,
            max: DEFAULT_RECONNECT_MAX,
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: DEFAULT_HTTP_LISTEN
                .parse()
                .unwrap_or_else(|err| panic!("default address: {err}")),
        }
    }
}

impl ReconnectSettings {
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial, self.max)
    }
}

impl CoordinatorSettings {
    /// The name to verify in the coordinator's certificate.
    pub fn effective_server_name(&self) -> String {
        if !self.server_name.is_empty() {
            return self.server_name.clone();
        }
        url_host(&self.url).unwrap_or_default().to_owned()
    }
}

/// The host part of `https://host:port/...` (brackets of an IPv6 literal removed).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next().filter(|h| !h.is_empty())
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.component.is_none() {
            return Err(ConfigError::invalid(
                "component",
                "is required: postgres, redis or ledger (AITBC_BACKUP_COMPONENT)",
            ));
        }
        if !self.name.is_empty() && !aitbc_backup_tls::identity::is_valid_name(&self.name) {
            return Err(ConfigError::invalid(
                "name",
                format!(
                    "`{}` is not a valid agent name (1-63 of A-Z a-z 0-9 . _ -)",
                    self.name
                ),
            ));
        }
        if url_host(&self.coordinator.url).is_none() {
            return Err(ConfigError::invalid(
                "coordinator.url",
                format!(
                    "`{}` is not https://host:port (plaintext is not supported)",
                    self.coordinator.url
                ),
            ));
        }
        if self.reconnect.initial.is_zero() || self.reconnect.max < self.reconnect.initial {
            return Err(ConfigError::invalid(
                "reconnect.max",
                "reconnect.initial must be positive and at most reconnect.max",
            ));
        }
        // The configured component checks its own settings where it is built.
        if self.component.is_some() {
            crate::component::of(&std::sync::Arc::new(self.clone()))?;
        }
        self.repository.validate()
    }

    /// The name backups are recorded under: the configured name, else the component's.
    pub fn backup_name(&self) -> String {
        match (&self.name, self.component) {
            (name, _) if !name.is_empty() => name.clone(),
            (_, Some(component)) => component.to_string(),
            (_, None) => "agent".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn load(pairs: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let env: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: AgentConfig = aitbc_backup_config::load(None, &env, &SCHEMA)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn component_is_required() {
        let err = load(&[]).expect_err("no component").to_string();
        assert!(err.contains("`component`"), "{err}");
        let err = load(&[("AITBC_BACKUP_COMPONENT", "mysql")])
            .expect_err("bad component")
            .to_string();
        assert!(
            err.contains("`component`") && err.contains("mysql"),
            "{err}"
        );
        let config = load(&[("AITBC_BACKUP_COMPONENT", "redis")]).expect("valid");
        assert_eq!(config.component, Some(Component::Redis));
    }

    #[test]
    fn server_name_defaults_to_the_url_host() {
        let mut settings = CoordinatorSettings {
            url: "https://127.0.0.1:7443".into(),
            ..Default::default()
        };
        assert_eq!(settings.effective_server_name(), "127.0.0.1");
        settings.url = "https://[::1]:7443".into();
        assert_eq!(settings.effective_server_name(), "::1");
        settings.server_name = "coord.internal".into();
        assert_eq!(settings.effective_server_name(), "coord.internal");
        let err = load(&[
            ("AITBC_BACKUP_COMPONENT", "redis"),
            ("AITBC_BACKUP_COORDINATOR__URL", "http://x:1"),
        ])
        .expect_err("plaintext")
        .to_string();
        assert!(err.contains("coordinator.url"), "{err}");
    }
}
