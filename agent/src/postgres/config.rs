//! The `[postgres]` config section.

use std::path::PathBuf;
use std::time::Duration;

use aitbc_backup_config::{ConfigError, Secret, secret_or_file};
use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_JOBS: u32 = 1;
pub const DEFAULT_SCRATCH_DIR: &str = "/tmp/aitbc-backup";
pub const DEFAULT_FENCE_MAX_PAUSE: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// libpq URL or key-value string of the server (its database is where the agent connects to
    /// list databases and create restored ones). A Unix socket: `host=/var/run/postgresql`.
    /// Never a password: use `password` (environment only) or `password_file`.
    pub url: String,
    /// A secret, environment only: `AITBC_BACKUP_POSTGRES__PASSWORD` (or `PGPASSWORD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A file holding the password (a mounted Kubernetes secret).
    pub password_file: Option<PathBuf>,
    /// Databases to back up; empty means every database that accepts connections.
    pub databases: Vec<String>,
    /// Where `pg_dump`, `pg_dumpall`, `pg_restore` and `psql` are; empty means
    /// `/usr/lib/postgresql/<server major>/bin` when it exists, else `PATH`.
    pub bin_dir: PathBuf,
    /// `pg_restore --jobs`. With 1 (the default) the dump streams from the repository into
    /// `pg_restore`'s standard input: nothing on disk, the download overlapping the restore.
    /// Above 1 each dump is first spooled to `scratch_dir` (parallel restore needs a file).
    pub jobs: u32,
    /// Where dumps are spooled for `jobs` > 1, and the globals for `--globals`.
    pub scratch_dir: PathBuf,
    /// Tables locked `IN SHARE ROW EXCLUSIVE MODE` around a fenced cut: `schema.table` (in the
    /// URL's database) or `database.schema.table`.
    pub fence_tables: Vec<String>,
    /// The longest a fence may hold writers; the agent (and the server, through
    /// `idle_in_transaction_session_timeout`) ends it then even if nobody releases it.
    #[serde(with = "humantime_serde")]
    pub fence_max_pause: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Continuous WAL archiving and point-in-time recovery.
    pub wal: WalSettings,
}

pub const DEFAULT_SLOT: &str = "aitbc_backup";
pub const DEFAULT_PARTIAL_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);
pub const DEFAULT_BASE_BACKUP_EVERY: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_KEEP_BASE_BACKUPS: usize = 2;

/// The `[postgres.wal]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSettings {
    /// Stream the server's WAL into the repository (`pg_receivewal`) while the agent runs, and
    /// mark every snapshot set's cut with a restore point `aitbc-set-<id>`.
    pub archive: bool,
    /// Physical replication slot the stream uses, created if missing, so the server keeps WAL
    /// the agent has not archived yet (mind `max_slot_wal_keep_size`); empty: no slot.
    pub slot: String,
    /// Where `pg_receivewal` writes before upload; empty: `<scratch_dir>/wal`.
    pub spool_dir: PathBuf,
    /// How often the segment being written is uploaded: at most this much committed work is
    /// lost with the server.
    #[serde(with = "humantime_serde")]
    pub partial_interval: Duration,
    /// The OS user a point-in-time restore runs the recovering server as, when the agent runs
    /// as root (PostgreSQL refuses root).
    pub os_user: String,
    /// The longest a point-in-time restore's recovery may take.
    #[serde(with = "humantime_serde")]
    pub recovery_timeout: Duration,
    /// While archiving: take a base backup when the newest is older than this (and at once
    /// when there is none); 0 turns this off.
    #[serde(with = "humantime_serde")]
    pub base_backup_every: Duration,
    /// Base backups kept after each new one; the WAL older than the oldest kept one is removed.
    /// This is the point-in-time recovery window.
    pub keep_base_backups: usize,
}

impl Default for WalSettings {
    fn default() -> Self {
        WalSettings {
            archive: false,
            slot: DEFAULT_SLOT.to_owned(),
            spool_dir: PathBuf::new(),
            partial_interval: DEFAULT_PARTIAL_INTERVAL,
            os_user: "postgres".to_owned(),
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT,
            base_backup_every: DEFAULT_BASE_BACKUP_EVERY,
            keep_base_backups: DEFAULT_KEEP_BASE_BACKUPS,
        }
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            url: DEFAULT_URL.to_owned(),
            password: None,
            password_file: None,
            databases: Vec::new(),
            bin_dir: PathBuf::new(),
            jobs: DEFAULT_JOBS,
            scratch_dir: DEFAULT_SCRATCH_DIR.into(),
            fence_tables: Vec::new(),
            fence_max_pause: DEFAULT_FENCE_MAX_PAUSE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            wal: WalSettings::default(),
        }
    }
}

/// A fenced table: its database (None: the URL's) and its `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceTable {
    pub database: Option<String>,
    pub schema: String,
    pub table: String,
}

impl PostgresSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let config = self.url.parse::<tokio_postgres::Config>().map_err(|err| {
            ConfigError::invalid("postgres.url", format!("`{}`: {err}", self.url))
        })?;
        if config.get_password().is_some() {
            return Err(ConfigError::invalid(
                "postgres.url",
                "holds a password; set AITBC_BACKUP_POSTGRES__PASSWORD or postgres.password_file instead",
            ));
        }
        if self.jobs == 0 {
            return Err(ConfigError::invalid("postgres.jobs", "must be at least 1"));
        }
        if !self.scratch_dir.is_absolute() {
            return Err(ConfigError::invalid(
                "postgres.scratch_dir",
                format!("`{}` is not an absolute path", self.scratch_dir.display()),
            ));
        }
        if self.fence_max_pause.is_zero() {
            return Err(ConfigError::invalid(
                "postgres.fence_max_pause",
                "must be positive",
            ));
        }
        self.fence_tables()?;
        if self.wal.partial_interval.is_zero() {
            return Err(ConfigError::invalid(
                "postgres.wal.partial_interval",
                "must be positive",
            ));
        }
        if self.wal.keep_base_backups == 0 {
            return Err(ConfigError::invalid(
                "postgres.wal.keep_base_backups",
                "must be at least 1",
            ));
        }
        let valid_slot = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        if !self.wal.slot.chars().all(valid_slot) || self.wal.slot.len() > 63 {
            return Err(ConfigError::invalid(
                "postgres.wal.slot",
                format!(
                    "`{}` is not a slot name (lower-case letters, digits, `_`)",
                    self.wal.slot
                ),
            ));
        }
        Ok(())
    }

    /// Where `pg_receivewal` writes.
    pub fn wal_spool_dir(&self) -> PathBuf {
        if self.wal.spool_dir.as_os_str().is_empty() {
            self.scratch_dir.join("wal")
        } else {
            self.wal.spool_dir.clone()
        }
    }

    pub fn fence_tables(&self) -> Result<Vec<FenceTable>, ConfigError> {
        self.fence_tables
            .iter()
            .map(|name| {
                let parts: Vec<&str> = name.split('.').collect();
                let valid = parts.iter().all(|p| !p.is_empty());
                match parts.as_slice() {
                    [schema, table] if valid => Ok(FenceTable {
                        database: None,
                        schema: (*schema).to_owned(),
                        table: (*table).to_owned(),
                    }),
                    [database, schema, table] if valid => Ok(FenceTable {
                        database: Some((*database).to_owned()),
                        schema: (*schema).to_owned(),
                        table: (*table).to_owned(),
                    }),
                    _ => Err(ConfigError::invalid(
                        "postgres.fence_tables",
                        format!("`{name}` is not schema.table or database.schema.table"),
                    )),
                }
            })
            .collect()
    }

    /// The password: the environment's, else `password_file`'s first line, else `PGPASSWORD`.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        let found = secret_or_file(
            self.password.as_ref(),
            self.password_file.as_deref(),
            "postgres.password_file",
        )
        .map_err(anyhow::Error::msg)?;
        Ok(found.or_else(|| std::env::var("PGPASSWORD").ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_refused() {
        let settings = PostgresSettings {
            url: "postgres://app:hunter2@db:5432/app".into(),
            ..Default::default()
        };
        let err = settings
            .validate()
            .expect_err("password in url")
            .to_string();
        assert!(
            err.contains("postgres.url") && err.contains("password"),
            "{err}"
        );
        assert!(
            !err.contains("hunter2"),
            "the error must not echo the password: {err}"
        );
    }

    #[test]
    fn fence_tables_are_qualified() {
        let mut settings = PostgresSettings {
            fence_tables: vec!["public.jobs".into(), "app.public.offers".into()],
            ..Default::default()
        };
        let tables = settings.fence_tables().expect("valid");
        assert_eq!(tables[0].database, None);
        assert_eq!(tables[1].database.as_deref(), Some("app"));
        assert_eq!(tables[1].table, "offers");
        settings.fence_tables = vec!["jobs".into()];
        let err = settings.validate().expect_err("unqualified").to_string();
        assert!(err.contains("`jobs`"), "{err}");
    }

    #[test]
    fn wal_settings_are_checked_and_the_spool_defaults_under_scratch() {
        let settings = PostgresSettings::default();
        assert_eq!(
            settings.wal_spool_dir(),
            PathBuf::from("/tmp/aitbc-backup/wal")
        );
        let invalid = [
            (
                WalSettings {
                    slot: "Backup-Slot".into(),
                    ..Default::default()
                },
                "postgres.wal.slot",
            ),
            (
                WalSettings {
                    partial_interval: Duration::ZERO,
                    ..Default::default()
                },
                "postgres.wal.partial_interval",
            ),
            (
                WalSettings {
                    keep_base_backups: 0,
                    ..Default::default()
                },
                "postgres.wal.keep_base_backups",
            ),
        ];
        for (wal, key) in invalid {
            let settings = PostgresSettings {
                wal,
                ..Default::default()
            };
            let err = settings.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
