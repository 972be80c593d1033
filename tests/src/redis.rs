//! Redis 7 on a free loopback port, no persistence, diskless replication without delay.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{Service, Spec};

pub struct Redis {
    pub port: u16,
    /// `--requirepass`, used by [`Redis::cli`].
    pub password: Option<String>,
    pub dir: PathBuf,
    service: Service,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// Starts Redis with extra `--option value` arguments (e.g. `--requirepass`).
    pub fn start_with(extra: &[&str]) -> Redis {
        let dir = crate::temp_dir("redis");
        let port = crate::free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.path().display().to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync-delay",
            "0",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let service = Service::spawn(Spec {
            name: "redis-server",
            program: &PathBuf::from("redis-server"),
            args,
            env: vec![],
            user: None,
            cwd: Some(dir.path()),
            log: dir.path().join("redis.log"),
            stop_signal: Signal::SIGTERM,
        });
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|p| (*p).to_owned());
        let redis = Redis {
            port,
            password,
            dir: dir.path().to_owned(),
            service,
            _dir: dir,
        };
        let ready = crate::wait_until(Duration::from_secs(20), || {
            redis
                .try_cli(&["PING"])
                .map(|r| r == "PONG")
                .unwrap_or(false)
        });
        redis.service.expect_ready(ready, "answering PING");
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["-a", p.as_str(), "--no-auth-warning"]),
            )
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Runs one redis-cli command and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// Loads `script` (RESP commands) with `redis-cli --pipe`, which must report no errors.
    pub fn pipe(&self, script: &[u8]) {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--pipe"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-cli --pipe");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script)
            .expect("feed redis-cli");
        let out = child.wait_with_output().expect("redis-cli --pipe");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("errors: 0"), "{text}");
    }

    pub fn pid(&self) -> u32 {
        self.service.pid()
    }
}
