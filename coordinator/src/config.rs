//! The coordinator's configuration (`aitbc-backup-coordinator.toml`), see
//! docs/configuration.md (kept in step with the defaults by tests/tests/config_docs.rs). Every
//! key can be set by `AITBC_BACKUP_<SECTION>__<KEY>`.

use std::net::SocketAddr;
use std::time::Duration;

use aitbc_backup_config::settings::{
    CronSchedule, REPOSITORY_LEGACY_VARS, REPOSITORY_SECRETS, RepositorySettings, RetentionSettings,
};
use aitbc_backup_config::{ConfigError, LegacyVar, Schema};
use aitbc_backup_proto::model::{Component, Mode};
use aitbc_backup_telemetry::LogSettings;
use aitbc_backup_tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// The policy of sets nobody named one for, and of the old scripts' schedule.
pub const DEFAULT_POLICY: &str = "default";
pub const DEFAULT_GRPC_LISTEN: &str = "0.0.0.0:7443";
pub const DEFAULT_HTTP_LISTEN: &str = "0.0.0.0:9443";
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;
pub const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CUT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CUT_LEAD: Duration = Duration::from_millis(50);
pub const DEFAULT_UPLOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The old scripts' variables this binary accepts.
const LEGACY_VARS: &[LegacyVar] = &[
    REPOSITORY_LEGACY_VARS[0],
    REPOSITORY_LEGACY_VARS[1],
    LegacyVar {
        env: "BACKUP_RETENTION_DAYS",
        key: "retention.days",
    },
    LegacyVar {
        env: "BACKUP_SCHEDULE",
        key: "schedule.default",
    },
];

pub const SCHEMA: Schema = Schema {
    legacy: LEGACY_VARS,
    secrets: REPOSITORY_SECRETS,
};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    pub server: ServerSettings,
    pub tls: TlsFiles,
    pub fleet: FleetSettings,
    pub schedule: ScheduleSettings,
    pub snapshot: SnapshotSettings,
    /// Named policies (`[[policies]]`); a `default` policy is made from `schedule.default`,
    /// `snapshot.mode` and `retention` unless one is configured.
    pub policies: Vec<PolicySettings>,
    pub gc: GcSettings,
    pub retention: RetentionSettings,
    pub repository: RepositorySettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// gRPC (mTLS) address: operator API, agent sessions, health, reflection.
    pub grpc_listen: SocketAddr,
    /// Plain HTTP address of `/metrics`, `/healthz`, `/readyz`.
    pub http_listen: SocketAddr,
    /// How long SIGTERM waits for open sessions and calls to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// How often agents send a heartbeat (told to them at registration).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// An agent is offline after this many intervals without a heartbeat.
    pub missed_heartbeats: u32,
    /// How long a new session may take to send its Register message.
    #[serde(with = "humantime_serde")]
    pub register_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSettings {
    /// Cron schedule (UTC) of the default policy; `BACKUP_SCHEDULE` of the old scripts.
    pub default: CronSchedule,
    /// Run policies on their schedules (false: only sets asked for by operators).
    pub enabled: bool,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            default: CronSchedule::default(),
            enabled: true,
        }
    }
}

/// A backup policy: when, what, how, and how long its sets are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub name: String,
    /// Cron (UTC): five fields, or six with seconds first.
    pub schedule: CronSchedule,
    /// Components to capture; empty: every component with an agent online.
    #[serde(default)]
    pub components: Vec<Component>,
    /// Only these agents (by name); empty: every online agent of the components.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Default: `snapshot.mode`.
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub retention: PolicyRetention,
    /// Verify each committed set of the policy: `none`, `structure` (every chunk present with
    /// its size), `read_data` (every chunk downloaded and re-hashed) or `restore` (a restore
    /// test: every component restored into its agent's scratch targets, verified, removed).
    #[serde(default)]
    pub verify: VerifyAfter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyAfter {
    #[default]
    None,
    Structure,
    ReadData,
    Restore,
}

/// Which of a policy's sets are kept. A committed set is kept if any rule keeps it; the newest
/// committed set and pinned sets are always kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyRetention {
    /// Keep sets younger than this many days; default `retention.days`
    /// (`BACKUP_RETENTION_DAYS`); 0 turns the age rule off.
    pub days: Option<u32>,
    /// Keep the newest N sets.
    pub keep_last: u32,
    /// Keep the newest set of each of the last N days / ISO weeks / months that have sets.
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

/// Garbage collection after retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcSettings {
    /// Run GC after retention deleted sets.
    pub after_retention: bool,
    /// Unreferenced chunks younger than this are never deleted (in-flight backups use them).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        GcSettings {
            after_retention: true,
            grace: aitbc_backup_repository::gc::DEFAULT_GRACE,
        }
    }
}

/// Snapshot sets and restores: deadlines per phase, the default mode, the restore order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSettings {
    /// Mode of sets that do not name one: independent, coordinated or fenced.
    pub mode: Mode,
    /// Every agent must be prepared within this.
    #[serde(with = "humantime_serde")]
    pub prepare_timeout: Duration,
    /// Each of fence and cut (with its release) must be done by every agent within this.
    #[serde(with = "humantime_serde")]
    pub cut_timeout: Duration,
    /// Coordinated sets: how far ahead the cut instant is set, so that every agent cuts on its
    /// own timer (0: cut on arrival).
    #[serde(with = "humantime_serde")]
    pub cut_lead: Duration,
    /// Every agent's upload must be committed within this.
    #[serde(with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// Each component's restore (and its verification) must be done within this.
    #[serde(with = "humantime_serde")]
    pub restore_timeout: Duration,
    /// The order components are restored in (the disaster-recovery runbook's).
    pub restore_order: Vec<Component>,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            mode: Mode::Coordinated,
            prepare_timeout: DEFAULT_PREPARE_TIMEOUT,
            cut_timeout: DEFAULT_CUT_TIMEOUT,
            cut_lead: DEFAULT_CUT_LEAD,
            upload_timeout: DEFAULT_UPLOAD_TIMEOUT,
            restore_timeout: DEFAULT_RESTORE_TIMEOUT,
            restore_order: Component::ALL.to_vec(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            grpc_listen: parse_addr(DEFAULT_GRPC_LISTEN),
            http_listen: parse_addr(DEFAULT_HTTP_LISTEN),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: DEFAULT_MISSED_HEARTBEATS,
            register_timeout: DEFAULT_REGISTER_TIMEOUT,
        }
    }
}

impl FleetSettings {
    /// Silence after which an agent counts as offline.
    pub fn offline_after(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }
}

fn parse_addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|err| panic!("default address {text}: {err}"))
}

impl CoordinatorConfig {
    /// The configured policies, plus the `default` policy made from the old scripts' settings
    /// when none is named so.
    pub fn effective_policies(&self) -> Vec<PolicySettings> {
        let mut policies = self.policies.clone();
        if !policies.iter().any(|p| p.name == DEFAULT_POLICY) {
            policies.insert(
                0,
                PolicySettings {
                    name: DEFAULT_POLICY.to_owned(),
                    schedule: self.schedule.default.clone(),
                    components: Vec::new(),
                    agents: Vec::new(),
                    mode: None,
                    retention: PolicyRetention::default(),
                    verify: VerifyAfter::None,
                },
            );
        }
        policies
    }

    /// Checks what serde cannot: ranges and cross-key rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fleet.heartbeat_interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "fleet.heartbeat_interval",
                "must be at least 100ms",
            ));
        }
        if self.fleet.missed_heartbeats == 0 {
            return Err(ConfigError::invalid(
                "fleet.missed_heartbeats",
                "must be at least 1",
            ));
        }
        let order = &self.snapshot.restore_order;
        for component in Component::ALL {
            if order.iter().filter(|c| **c == component).count() != 1 {
                return Err(ConfigError::invalid(
                    "snapshot.restore_order",
                    format!(
                        "must name each of postgres, redis and ledger once ({component} is missing or repeated)"
                    ),
                ));
            }
        }
        if self.snapshot.cut_lead > Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "snapshot.cut_lead",
                "must be at most 1s (agents cut at once beyond that)",
            ));
        }
        for (key, value) in [
            ("snapshot.prepare_timeout", self.snapshot.prepare_timeout),
            ("snapshot.cut_timeout", self.snapshot.cut_timeout),
            ("snapshot.upload_timeout", self.snapshot.upload_timeout),
            ("snapshot.restore_timeout", self.snapshot.restore_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be more than 0s"));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for policy in &self.policies {
            let valid = !policy.name.is_empty()
                && policy.name.len() <= 63
                && policy
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(ConfigError::invalid(
                    "policies.name",
                    format!("`{}`: 1 to 63 letters, digits, `-` or `_`", policy.name),
                ));
            }
            if !names.insert(policy.name.as_str()) {
                return Err(ConfigError::invalid(
                    "policies.name",
                    format!("`{}` is configured twice", policy.name),
                ));
            }
        }
        self.retention.validate()?;
        self.repository.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn old_variables_keep_their_meaning() {
        let vars = env(&[
            ("BACKUP_RETENTION_DAYS", "7"),
            ("BACKUP_SCHEDULE", "15 4 * * *"),
            ("S3_BUCKET_PREFIX", "acme"),
            ("COMPRESSION_LEVEL", "9"),
        ]);
        let config: CoordinatorConfig =
            aitbc_backup_config::load(None, &vars, &SCHEMA).expect("load");
        config.validate().expect("valid");
        assert_eq!(config.retention.days, 7);
        assert_eq!(config.schedule.default.as_str(), "15 4 * * *");
        assert_eq!(config.repository.bucket_prefix, "acme");
        assert_eq!(config.repository.compression_level, 9);
        assert_eq!(config.fleet.offline_after(), Duration::from_secs(15));
    }

    #[test]
    fn zero_missed_heartbeats_is_refused() {
        let vars = env(&[("AITBC_BACKUP_FLEET__MISSED_HEARTBEATS", "0")]);
        let config: CoordinatorConfig =
            aitbc_backup_config::load(None, &vars, &SCHEMA).expect("load");
        let err = config.validate().expect_err("zero").to_string();
        assert!(err.contains("fleet.missed_heartbeats"), "{err}");
    }
}
