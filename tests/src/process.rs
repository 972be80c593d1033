//! Child processes that never outlive their test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a stopped service may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running child process. Dropping it stops the process: `stop_signal`, wait up to 10 s,
/// then SIGKILL. The child also gets `stop_signal` if the test process itself dies
/// (`setpriv --pdeathsig`), so nothing survives a crashed test run.
pub struct Service {
    name: String,
    child: Option<Child>,
    stop_signal: Signal,
    log: PathBuf,
}

/// How to start a [`Service`].
pub struct Spec<'a> {
    pub name: &'a str,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run as this OS user (PostgreSQL refuses to run as root).
    pub user: Option<&'a str>,
    pub cwd: Option<&'a Path>,
    /// stdout and stderr go here.
    pub log: PathBuf,
    pub stop_signal: Signal,
}

impl Service {
    pub fn spawn(spec: Spec<'_>) -> Service {
        let log = File::create(&spec.log).expect("create service log");
        let mut command = Command::new("setpriv");
        if let Some(user) = spec.user {
            command.args(["--reuid", user, "--regid", user, "--init-groups"]);
        }
        command
            .arg(format!("--pdeathsig={}", signal_name(spec.stop_signal)))
            .arg("--")
            .arg(spec.program)
            .args(&spec.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/".into()))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(cwd) = spec.cwd {
            command.current_dir(cwd);
        }
        let child = command.spawn().unwrap_or_else(|err| {
            panic!("start {} ({}): {err}", spec.name, spec.program.display())
        });
        Service {
            name: spec.name.to_owned(),
            child: Some(child),
            stop_signal: spec.stop_signal,
            log: spec.log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The service's output so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has ended.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` and waits for the exit, SIGKILL after the timeout.
    pub fn stop_with(&mut self, signal: Signal) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "{} did not stop within {STOP_TIMEOUT:?}; killing it and its children",
                    self.name
                );
                // A SIGKILLed PostgreSQL postmaster leaves its backends behind.
                let children = children_of(child.id());
                let _ = child.kill();
                for pid in children {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop with the service's stop signal.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.stop_with(self.stop_signal)
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.stop_with(Signal::SIGKILL);
    }

    /// Fails the test with the service's log when `ok` is false.
    pub fn expect_ready(&self, ok: bool, what: &str) {
        assert!(ok, "{} is not {what}; its log:\n{}", self.name, self.log());
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal_name(signal: Signal) -> &'static str {
    match signal {
        Signal::SIGINT => "INT",
        Signal::SIGKILL => "KILL",
        _ => "TERM",
    }
}

/// Runs `command` to its end with `stdin` written to it (nothing: an empty, closed stdin).
/// A command that fails early closes its stdin; that is its answer, so a refused write is
/// not an error here.
pub fn output_with_stdin(command: &mut Command, stdin: Option<&[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", command.get_program()));
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        let _ = input.write_all(bytes);
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

/// True while a process with this pid exists (and is not a zombie).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The processes whose parent is `pid` (a PostgreSQL postmaster's backends and workers).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
                    let rest = stat.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}
