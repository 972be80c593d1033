use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{CronSchedule, REPOSITORY_SECRETS, RepositorySettings, RetentionSettings};
use crate::{ConfigError, LegacyVar, Schema, load, render};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Example {
    name: String,
    #[serde(with = "humantime_serde")]
    interval: Duration,
    fleet: Fleet,
    retention: RetentionSettings,
    schedule: CronSchedule,
    repository: RepositorySettings,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
struct Fleet {
    missed: u32,
}

impl Default for Example {
    fn default() -> Self {
        Example {
            name: "x".into(),
            interval: Duration::from_secs(5),
            fleet: Fleet::default(),
            retention: RetentionSettings::default(),
            schedule: CronSchedule::default(),
            repository: RepositorySettings::default(),
        }
    }
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet { missed: 3 }
    }
}

const LEGACY: &[LegacyVar] = &[
    LegacyVar {
        env: "BACKUP_RETENTION_DAYS",
        key: "retention.days",
    },
    LegacyVar {
        env: "BACKUP_SCHEDULE",
        key: "schedule",
    },
    LegacyVar {
        env: "S3_BUCKET_PREFIX",
        key: "repository.bucket_prefix",
    },
];
const SCHEMA: Schema = Schema {
    legacy: LEGACY,
    secrets: REPOSITORY_SECRETS,
};

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(contents: &str) -> tempfile_path::TempFile {
    tempfile_path::TempFile::new(contents)
}

/// A minimal temp file helper (the crate has no tempfile dependency).
mod tempfile_path {
    pub struct TempFile(pub std::path::PathBuf);
    impl TempFile {
        pub fn new(contents: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("aitbc-config-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, contents).expect("write temp config");
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn defaults_when_nothing_is_given() {
    let config: Example = load(None, &env(&[]), &SCHEMA).expect("load");
    assert_eq!(config, Example::default());
    assert_eq!(config.retention.days, 30);
    assert_eq!(config.schedule.as_str(), "0 2 * * *");
    assert_eq!(config.repository.bucket_prefix, "aitbc-backups");
    assert_eq!(config.repository.compression_level, 3);
}

#[test]
fn file_then_legacy_then_prefixed_env() {
    let f = file("name = \"from-file\"\ninterval = \"10s\"\n[retention]\ndays = 7\n");
    let config: Example = load(Some(&f.0), &env(&[]), &SCHEMA).expect("load");
    assert_eq!(config.name, "from-file");
    assert_eq!(config.interval, Duration::from_secs(10));
    assert_eq!(config.retention.days, 7);

    let vars = env(&[
        ("BACKUP_RETENTION_DAYS", "14"),
        ("BACKUP_SCHEDULE", "30 3 * * 1"),
        ("S3_BUCKET_PREFIX", "acme-backups"),
        ("AITBC_BACKUP_FLEET__MISSED", "5"),
        ("AITBC_BACKUP_INTERVAL", "1m 30s"),
        ("AITBC_BACKUP_CONFIG", "/ignored/by/the/overlay.toml"),
        ("UNRELATED", "x"),
    ]);
    let config: Example = load(Some(&f.0), &vars, &SCHEMA).expect("load");
    assert_eq!(config.retention.days, 14);
    assert_eq!(config.schedule.as_str(), "30 3 * * 1");
    assert_eq!(config.repository.bucket_prefix, "acme-backups");
    assert_eq!(config.fleet.missed, 5);
    assert_eq!(config.interval, Duration::from_secs(90));

    // The explicit new variable wins over the old one.
    let vars = env(&[
        ("BACKUP_RETENTION_DAYS", "14"),
        ("AITBC_BACKUP_RETENTION__DAYS", "60"),
    ]);
    let config: Example = load(None, &vars, &SCHEMA).expect("load");
    assert_eq!(config.retention.days, 60);
}

#[test]
fn unknown_keys_are_named_with_their_origin() {
    let f = file("[fleet]\nmissed = 3\nmised = 4\n");
    let err = load::<Example>(Some(&f.0), &env(&[]), &SCHEMA).expect_err("unknown key");
    let text = err.to_string();
    assert!(
        text.contains("`fleet.mised`") && text.contains("unknown key"),
        "{text}"
    );
    assert!(text.contains(&f.0.display().to_string()), "{text}");

    let err = load::<Example>(None, &env(&[("AITBC_BACKUP_NAEM", "x")]), &SCHEMA)
        .expect_err("unknown env key");
    let text = err.to_string();
    assert!(
        text.contains("`naem`") && text.contains("AITBC_BACKUP_NAEM"),
        "{text}"
    );
}

#[test]
fn bad_values_name_the_key() {
    let err = load::<Example>(
        None,
        &env(&[("AITBC_BACKUP_INTERVAL", "5 parsecs")]),
        &SCHEMA,
    )
    .expect_err("bad duration");
    let text = err.to_string();
    assert!(
        text.contains("`interval`") && text.contains("AITBC_BACKUP_INTERVAL"),
        "{text}"
    );

    let err = load::<Example>(None, &env(&[("BACKUP_SCHEDULE", "every day")]), &SCHEMA)
        .expect_err("bad cron");
    let text = err.to_string();
    assert!(
        text.contains("`schedule`") && text.contains("BACKUP_SCHEDULE"),
        "{text}"
    );

    let err = load::<Example>(None, &env(&[("BACKUP_RETENTION_DAYS", "-3")]), &SCHEMA)
        .expect_err("negative days");
    assert!(err.to_string().contains("`retention.days`"), "{err}");

    let f = file("name = \n");
    let err = load::<Example>(Some(&f.0), &env(&[]), &SCHEMA).expect_err("bad toml");
    assert!(matches!(err, ConfigError::ParseFile { .. }), "{err}");
}

#[test]
fn legacy_values_are_validated() {
    let config: Example = load(
        None,
        &env(&[("COMPRESSION_LEVEL", "99")]),
        &Schema {
            legacy: crate::settings::REPOSITORY_LEGACY_VARS,
            secrets: &[],
        },
    )
    .expect("load");
    let err = config.repository.validate().expect_err("level 99");
    assert!(
        err.to_string().contains("repository.compression_level"),
        "{err}"
    );

    let mut repo = RepositorySettings {
        url: "s3://".into(),
        ..Default::default()
    };
    assert_eq!(repo.effective_url(), "s3://aitbc-backups-default");
    repo.namespace = "prod".into();
    assert_eq!(repo.effective_url(), "s3://aitbc-backups-prod");
    repo.url = "ftp://x".into();
    assert!(
        repo.validate()
            .expect_err("bad scheme")
            .to_string()
            .contains("repository.url")
    );
    assert!(RetentionSettings { days: 0 }.validate().is_err());
}

#[test]
fn secrets_come_from_env_only_and_never_print() {
    let vars = env(&[("AITBC_BACKUP_REPOSITORY__PASSPHRASE", "hunter2")]);
    let config: Example = load(None, &vars, &SCHEMA).expect("load");
    assert_eq!(
        config.repository.passphrase.as_ref().map(|s| s.expose()),
        Some("hunter2")
    );
    let rendered = render(&config).expect("render");
    assert!(
        !rendered.contains("hunter2") && rendered.contains("[REDACTED]"),
        "{rendered}"
    );
    assert!(!format!("{config:?}").contains("hunter2"));

    let f = file("[repository]\npassphrase = \"hunter2\"\n");
    let err = load::<Example>(Some(&f.0), &env(&[]), &SCHEMA).expect_err("secret in file");
    let text = err.to_string();
    assert!(
        text.contains("repository.passphrase")
            && text.contains("AITBC_BACKUP_REPOSITORY__PASSPHRASE"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
