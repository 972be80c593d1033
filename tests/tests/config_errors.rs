//! Bad configuration stops the binaries at start with a message naming the key or file.

use std::process::{Command, Output};

use aitbc_backup_tests::fleet::{Pki, binary};

fn run(program: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(binary(program))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run binary")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// TLS env of a coordinator with valid files, on ports nobody uses.
fn coordinator_env(pki: &Pki) -> Vec<(&'static str, String)> {
    let files = pki.coordinator();
    vec![
        ("AITBC_BACKUP_TLS__CERT", files.cert.display().to_string()),
        ("AITBC_BACKUP_TLS__KEY", files.key.display().to_string()),
        ("AITBC_BACKUP_TLS__CA", files.ca.display().to_string()),
        (
            "AITBC_BACKUP_SERVER__GRPC_LISTEN",
            format!("127.0.0.1:{}", aitbc_backup_tests::free_port()),
        ),
        (
            "AITBC_BACKUP_SERVER__HTTP_LISTEN",
            format!("127.0.0.1:{}", aitbc_backup_tests::free_port()),
        ),
    ]
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let dir = aitbc_backup_tests::temp_dir("config");
    let file = dir.path().join("coordinator.toml");
    std::fs::write(&file, "[fleet]\nheartbeat_intervall = \"5s\"\n").expect("write");
    let out = run(
        "aitbc-backup-coordinator",
        &["--config", file.to_str().expect("utf-8"), "--check-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("`fleet.heartbeat_intervall`") && err.contains("unknown key"),
        "{err}"
    );
    assert!(err.contains("coordinator.toml"), "{err}");

    let out = run(
        "aitbc-backup-coordinator",
        &["--check-config"],
        &[("AITBC_BACKUP_FLEET__HEARTBEAT_INTERVAL", "5 parsecs".into())],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("`fleet.heartbeat_interval`")
            && err.contains("AITBC_BACKUP_FLEET__HEARTBEAT_INTERVAL"),
        "{err}"
    );

    let out = run(
        "aitbc-backup-coordinator",
        &["--check-config"],
        &[("BACKUP_SCHEDULE", "daily".into())],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("BACKUP_SCHEDULE"), "{}", stderr(&out));

    let out = run("aitbc-backup-agent", &["--check-config"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("`component`"), "{}", stderr(&out));

    // The configured component's own settings are checked by --check-config too.
    for (component, key, value) in [
        ("ledger", "AITBC_BACKUP_LEDGER__DATA_DIR", "relative/dir"),
        (
            "redis",
            "AITBC_BACKUP_REDIS__ADDRESS",
            "redis://127.0.0.1:6379",
        ),
        (
            "postgres",
            "AITBC_BACKUP_POSTGRES__URL",
            "postgres://u:secret@127.0.0.1/db",
        ),
    ] {
        let out = run(
            "aitbc-backup-agent",
            &["--check-config"],
            &[
                ("AITBC_BACKUP_COMPONENT", component.into()),
                ("AITBC_BACKUP_REPOSITORY__URL", "file:///tmp/unused".into()),
                (key, value.into()),
            ],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{component}: {err}");
        assert!(
            err.contains(&format!("`{component}.")),
            "{component}: {err}"
        );
    }
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let out = run(
        "aitbc-backup-coordinator",
        &["--check-config"],
        &[
            ("BACKUP_RETENTION_DAYS", "12".into()),
            ("S3_BUCKET_PREFIX", "acme".into()),
            ("AITBC_BACKUP_REPOSITORY__PASSPHRASE", "hunter2".into()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("days = 12") && text.contains("bucket_prefix = \"acme\""),
        "{text}"
    );
    assert!(
        text.contains("[REDACTED]") && !text.contains("hunter2"),
        "{text}"
    );

    let dir = aitbc_backup_tests::temp_dir("config");
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "component = \"redis\"\n[repository]\npassphrase = \"hunter2\"\n",
    )
    .expect("write");
    let out = run(
        "aitbc-backup-agent",
        &["--config", file.to_str().expect("utf-8"), "--check-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("repository.passphrase") && !err.contains("hunter2"),
        "{err}"
    );
}

#[test]
fn missing_or_unreadable_tls_files_are_named() {
    let pki = Pki::new();
    let mut env = coordinator_env(&pki);
    env[0].1 = "/nonexistent/coordinator.pem".into();
    let out = run("aitbc-backup-coordinator", &[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/coordinator.pem"),
        "{}",
        stderr(&out)
    );

    // A key file that holds no key (as root, permissions cannot make a file unreadable).
    let bad_key = pki.dir.join("bad.key");
    std::fs::write(&bad_key, "not a key").expect("write");
    let mut env = coordinator_env(&pki);
    env[1].1 = bad_key.display().to_string();
    let out = run("aitbc-backup-coordinator", &[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.key"), "{}", stderr(&out));

    // A directory where the key should be.
    let mut env = coordinator_env(&pki);
    env[1].1 = pki.dir.display().to_string();
    let out = run("aitbc-backup-coordinator", &[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&pki.dir.display().to_string()),
        "{}",
        stderr(&out)
    );

    // The wrong role: an operator certificate as the coordinator's own.
    let mut env = coordinator_env(&pki);
    env[0].1 = pki.operator().cert.display().to_string();
    env[1].1 = pki.operator().key.display().to_string();
    let out = run("aitbc-backup-coordinator", &[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("role `operator`"), "{}", stderr(&out));

    // The agent names its missing files too.
    let out = run(
        "aitbc-backup-agent",
        &[],
        &[
            ("AITBC_BACKUP_COMPONENT", "ledger".into()),
            ("AITBC_BACKUP_LEDGER__DATA_DIR", "/var/lib/node".into()),
            ("AITBC_BACKUP_TLS__CERT", "/nonexistent/agent.pem".into()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/agent.pem"),
        "{}",
        stderr(&out)
    );
}
