//! The `[redis]` config section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use aitbc_backup_config::settings::check_component_level;
use aitbc_backup_config::{ConfigError, Secret, secret_or_file};
use serde::{Deserialize, Serialize};

pub const DEFAULT_ADDRESS: &str = "127.0.0.1:6379";
pub const DEFAULT_RESTORE_LISTEN: &str = "127.0.0.1:0";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_FENCE_MAX_PAUSE: Duration = Duration::from_secs(5);
pub const DEFAULT_SYNC_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
pub const DEFAULT_STATE_DIR: &str = "/tmp/aitbc-backup/redis";
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `host:port` of the Redis server.
    pub address: String,
    /// ACL user (Redis 6+); empty means `default` (or `requirepass` alone).
    pub username: String,
    /// A secret, environment only: `AITBC_BACKUP_REDIS__PASSWORD`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// A file holding the password (a mounted secret).
    pub password_file: Option<PathBuf>,
    /// Where a restore serves the RDB to the server (which connects here as a replica).
    pub restore_listen: SocketAddr,
    /// The address Redis reaches `restore_listen` on; empty means its IP and bound port.
    pub restore_advertise: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest any read or write may stall (the RDB transfer included).
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// How long a restore waits for the server to load the data.
    #[serde(with = "humantime_serde")]
    pub load_timeout: Duration,
    /// The longest a fence (`CLIENT PAUSE ... WRITE`) holds writers; Redis itself ends the
    /// pause then, whoever is gone.
    #[serde(with = "humantime_serde")]
    pub fence_max_pause: Duration,
    /// The longest the cut waits for the fork when the server defers the full sync (another
    /// replica's sync is streaming, a diskless delay without `CONFIG`, a BGSAVE or AOF rewrite
    /// running). In a snapshot set the coordinator's `snapshot.cut_timeout` bounds it too.
    #[serde(with = "humantime_serde")]
    pub sync_wait: Duration,
    /// zstd level of RDB streams; 0 uses the repository's (`COMPRESSION_LEVEL`). Level 1: the
    /// CPU it leaves is the fork child's (measured on ~1 GB in Redis: level 3 stored no less,
    /// 289 MB against 274 MB, for twice the agent's CPU).
    pub compression_level: i32,
    /// Ask for the agent's own fork to save without LZF (`rdbcompression no` from just before
    /// `PSYNC` until the fork has happened, then the server's setting again): the child saves
    /// faster and zstd compresses the plain values better than LZF did (~1 GB in Redis: 274 MB
    /// stored instead of 343 MB). Needs `CONFIG` (`+config|get +config|set`); without it the
    /// fork saves as the server is configured.
    pub plain_rdb: bool,
    /// Where a restore into a running server keeps its journal (what it changed on the server,
    /// written before the change), so that an agent killed mid-restore gives the server back
    /// when it starts again. Must survive the agent's restarts: the pod's `emptyDir`.
    pub state_dir: PathBuf,
    /// How long the agent keeps trying to give a server back (its role and settings) after an
    /// interrupted restore: while it lives, and in the background at a sidecar's start.
    #[serde(with = "humantime_serde")]
    pub release_timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            address: DEFAULT_ADDRESS.to_owned(),
            username: String::new(),
            password: None,
            password_file: None,
            restore_listen: DEFAULT_RESTORE_LISTEN
                .parse()
                .unwrap_or_else(|err| panic!("default address: {err}")),
            restore_advertise: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io_timeout: DEFAULT_IO_TIMEOUT,
            load_timeout: DEFAULT_LOAD_TIMEOUT,
            fence_max_pause: DEFAULT_FENCE_MAX_PAUSE,
            sync_wait: DEFAULT_SYNC_WAIT,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            plain_rdb: true,
            state_dir: DEFAULT_STATE_DIR.into(),
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
        }
    }
}

impl RedisSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_component_level("redis.compression_level", self.compression_level)?;
        if self.address.contains('@') || self.address.contains("://") {
            return Err(ConfigError::invalid(
                "redis.address",
                "is host:port only; credentials go in redis.username and AITBC_BACKUP_REDIS__PASSWORD",
            ));
        }
        if self
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(ConfigError::invalid(
                "redis.address",
                format!("`{}` is not host:port", self.address),
            ));
        }
        for (key, value) in [
            ("redis.connect_timeout", self.connect_timeout),
            ("redis.io_timeout", self.io_timeout),
            ("redis.load_timeout", self.load_timeout),
            ("redis.fence_max_pause", self.fence_max_pause),
            ("redis.release_timeout", self.release_timeout),
            ("redis.sync_wait", self.sync_wait),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be positive"));
            }
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::invalid(
                "redis.state_dir",
                format!("`{}` is not an absolute path", self.state_dir.display()),
            ));
        }
        Ok(())
    }

    /// The password: the environment's, else `password_file`'s first line.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        secret_or_file(
            self.password.as_ref(),
            self.password_file.as_deref(),
            "redis.password_file",
        )
        .map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rdb_compression_level_is_checked() {
        assert_eq!(RedisSettings::default().compression_level, 1);
        for (level, ok) in [(0, true), (1, true), (19, true), (20, false), (-1, false)] {
            let settings = RedisSettings {
                compression_level: level,
                ..Default::default()
            };
            match settings.validate() {
                Ok(()) => assert!(ok, "{level} accepted"),
                Err(err) => {
                    assert!(!ok, "{level} refused: {err}");
                    assert!(err.to_string().contains("redis.compression_level"), "{err}");
                }
            }
        }
    }
}
