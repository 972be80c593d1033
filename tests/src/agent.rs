//! One-shot runs of the real `aitbc-backup-agent` binary (`backup`, `restore`), configured
//! entirely through its environment.

use std::process::Output;

use crate::fleet::binary;

/// An agent command line with its environment.
#[derive(Debug, Clone, Default)]
pub struct OneShot {
    pub env: Vec<(String, String)>,
}

impl OneShot {
    /// An agent for `component` storing into `repository`.
    pub fn new(component: &str, repository: &str) -> OneShot {
        OneShot::default()
            .with("AITBC_BACKUP_COMPONENT", component)
            .with("AITBC_BACKUP_REPOSITORY__URL", repository)
            .with("AITBC_BACKUP_LOG__FORMAT", "json")
    }

    /// The same with one more variable.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> OneShot {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// The value of a variable (the last one set).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `aitbc-backup --json repo --repository <this agent's repository> ARGS`, which must
    /// succeed; returns its JSON.
    pub fn repo_json(&self, args: &[&str]) -> serde_json::Value {
        let repository = self
            .var("AITBC_BACKUP_REPOSITORY__URL")
            .expect("the agent has a repository");
        let out = std::process::Command::new(binary("aitbc-backup"))
            .args(["--json", "repo", "--repository", repository])
            .args(args)
            .output()
            .expect("run aitbc-backup repo");
        assert!(
            out.status.success(),
            "aitbc-backup repo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON from aitbc-backup repo")
    }

    /// Runs `aitbc-backup-agent ARGS`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run aitbc-backup-agent")
    }

    /// The command, for tests that start it and stop it midway.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(binary("aitbc-backup-agent"));
        command.args(args).env_remove("AITBC_BACKUP_CONFIG");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    /// Runs a command that must succeed; returns its JSON report.
    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "aitbc-backup-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON report")
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "aitbc-backup-agent {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Initializes a local repository under `dir` with the real CLI; returns its `file://` URL.
pub fn init_local_repository(dir: &std::path::Path) -> String {
    let repository = format!("file://{}", dir.join("repo").display());
    let out = std::process::Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", &repository, "init"])
        .output()
        .expect("aitbc-backup repo init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    repository
}
