//! Redis under the contract: a few keys of every type, then one writer setting `w:0`, `w:1`,
//! ... in order; a cut's content is the first `keys - BASELINE` of them, exactly, with their
//! values, and the baseline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Content, Subject};
use crate::agent::{OneShot, init_local_repository};
use crate::node::tree_digest;
use crate::redis::Redis;

/// The baseline's keys, one of each type (the string with a time to live).
const BASELINE: &[&[&str]] = &[
    &["SET", "base:string", "a value", "PX", "3600000"],
    &["HSET", "base:hash", "a", "1", "b", "2"],
    &["RPUSH", "base:list", "a", "b", "c"],
    &["SADD", "base:set", "a", "b"],
    &["ZADD", "base:zset", "1.5", "a", "2", "b"],
    &["XADD", "base:stream", "*", "f", "v"],
];

/// Counts what a server holds: DBSIZE, the length of the prefix `w:0 .. w:n-1` whose values are
/// their indexes (-1 when one is wrong), and how many baseline keys exist.
const CONTENT_SCRIPT: &str = "local n = 0 \
     while redis.call('EXISTS', 'w:' .. n) == 1 do \
       if redis.call('GET', 'w:' .. n) ~= tostring(n) then return {-1, n, 0} end \
       n = n + 1 \
     end \
     local base = redis.call('EXISTS', 'base:string', 'base:hash', 'base:list', 'base:set', \
                             'base:zset', 'base:stream') \
     return {redis.call('DBSIZE'), n, base}";

fn content_of(dbsize: i64, prefix: u64, baseline: i64) -> Content {
    Content {
        amount: prefix,
        detail: format!("dbsize {dbsize}, prefix w:0..w:{prefix}, baseline keys {baseline}"),
    }
}

/// RESP for one command.
pub fn resp(out: &mut Vec<u8>, args: &[&str]) {
    out.extend(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
}

/// Writes `w:<n>` = n for n = 0, 1, 2, ... until stopped; returns how many were written and
/// the longest single write.
pub fn spawn_writer(port: u16, stop: Arc<AtomicBool>) -> JoinHandle<(u64, Duration)> {
    std::thread::spawn(move || {
        let mut socket = TcpStream::connect(("127.0.0.1", port)).expect("writer connects");
        let mut reply = [0u8; 5];
        let (mut n, mut longest) = (0u64, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let mut command = Vec::new();
            resp(&mut command, &["SET", &format!("w:{n}"), &n.to_string()]);
            let began = Instant::now();
            socket.write_all(&command).expect("write");
            socket.read_exact(&mut reply).expect("+OK");
            longest = longest.max(began.elapsed());
            n += 1;
        }
        (n, longest)
    })
}

fn start_server() -> Redis {
    Redis::start_with(&["--enable-debug-command", "yes"])
}

pub struct RedisSubject {
    redis: Redis,
    agent: OneShot,
    scratch: PathBuf,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<(u64, Duration)>>,
}

/// A running server (restored through replication) or a directory for an offline `dump.rdb`.
pub enum RedisTarget {
    Live(Redis),
    Offline(PathBuf),
}

fn count(redis: &Redis) -> Content {
    let out = redis.cli(&["EVAL", CONTENT_SCRIPT, "0"]);
    let numbers: Vec<i64> = out
        .lines()
        .map(|l| l.trim().parse().expect("an integer"))
        .collect();
    let [dbsize, prefix, baseline] = numbers[..] else {
        panic!("the content script answered `{out}`");
    };
    assert!(dbsize >= 0, "w:{prefix} holds a wrong value");
    content_of(dbsize, prefix as u64, baseline)
}

impl Subject for RedisSubject {
    const NAME: &'static str = "redis";
    const ONE_SHOT_FENCE: bool = true;
    const REFUSAL: &'static [&'static str] = &["dump.rdb exists", "--force"];
    type Target = RedisTarget;

    fn start(dir: &Path) -> Self {
        let redis = start_server();
        for command in BASELINE {
            redis.cli(command);
        }
        let scratch = dir.join("scratch");
        let agent = OneShot::new("redis", &init_local_repository(dir))
            .with(
                "AITBC_BACKUP_REDIS__ADDRESS",
                format!("127.0.0.1:{}", redis.port),
            )
            // Restore tests write their dump.rdb under the state directory.
            .with(
                "AITBC_BACKUP_REDIS__STATE_DIR",
                scratch.display().to_string(),
            );
        let stop = Arc::new(AtomicBool::new(false));
        let writer = spawn_writer(redis.port, stop.clone());
        assert!(crate::wait_until(Duration::from_secs(10), || {
            redis.cli(&["EXISTS", "w:10"]) == "1"
        }));
        RedisSubject {
            redis,
            agent,
            scratch,
            stop,
            writer: Some(writer),
        }
    }

    fn agent(&self) -> OneShot {
        self.agent.clone()
    }

    fn stop_writer(&mut self) -> Option<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.writer
            .take()
            .and_then(|w| w.join().ok())
            .map(|(_, longest)| longest)
    }

    fn written(&self) -> u64 {
        count(&self.redis).amount
    }

    fn captured(&self, manifest: &str) -> Content {
        let shown = self.agent.repo_json(&["show", manifest]);
        let point = &shown["consistency"];
        assert_eq!(point["kind"], "redis", "{shown}");
        assert_eq!(point["counted"], true, "{shown}");
        let databases = point["databases"].as_array().expect("databases");
        assert_eq!(databases.len(), 1, "{shown}");
        assert_eq!(databases[0]["db"], 0, "{shown}");
        // The baseline's one key with a time to live.
        assert_eq!(databases[0]["expires"], 1, "{shown}");
        let keys = databases[0]["keys"].as_i64().expect("keys");
        let base = BASELINE.len() as i64;
        content_of(keys, (keys - base) as u64, base)
    }

    fn reported(&self, report: &Value) -> Option<u64> {
        Some(report["keys"].as_u64()? - BASELINE.len() as u64)
    }

    fn fresh_target(&self, _dir: &Path, _n: usize) -> RedisTarget {
        RedisTarget::Live(start_server())
    }

    fn separate_target(&self, _dir: &Path) -> RedisTarget {
        RedisTarget::Live(start_server())
    }

    fn occupy(&self, dir: &Path) -> RedisTarget {
        let offline = dir.join("offline");
        std::fs::create_dir_all(&offline).expect("mkdir");
        std::fs::write(offline.join("dump.rdb"), b"an older dump").expect("write dump.rdb");
        std::fs::write(offline.join("redis.conf"), b"dir .\n").expect("write redis.conf");
        RedisTarget::Offline(offline)
    }

    fn target_args(&self, target: &RedisTarget) -> Vec<String> {
        match target {
            RedisTarget::Live(redis) => {
                vec!["--target-url".into(), format!("127.0.0.1:{}", redis.port)]
            }
            RedisTarget::Offline(dir) => vec!["--target".into(), dir.display().to_string()],
        }
    }

    fn set_target(&self, target: &RedisTarget) -> String {
        match target {
            RedisTarget::Live(redis) => format!("127.0.0.1:{}", redis.port),
            RedisTarget::Offline(dir) => dir.display().to_string(),
        }
    }

    fn content(&self, target: &RedisTarget) -> Content {
        match target {
            RedisTarget::Live(redis) => count(redis),
            RedisTarget::Offline(dir) => {
                let started = Redis::start_with(&[
                    "--dir",
                    dir.to_str().expect("utf-8"),
                    "--dbfilename",
                    "dump.rdb",
                ]);
                count(&started)
            }
        }
    }

    fn state(&self, target: &RedisTarget) -> String {
        match target {
            RedisTarget::Live(redis) => redis.cli(&["DEBUG", "DIGEST"]),
            RedisTarget::Offline(dir) => format!("{:?}", tree_digest(dir, &[])),
        }
    }

    fn source_state(&self) -> String {
        let role = self
            .redis
            .cli(&["INFO", "replication"])
            .lines()
            .find(|l| l.starts_with("role:"))
            .unwrap_or_default()
            .to_owned();
        format!("{role} {}", self.redis.cli(&["DEBUG", "DIGEST"]))
    }

    fn after_restore(&self, target: &RedisTarget, _manifest: &str) {
        match target {
            RedisTarget::Live(redis) => {
                assert!(redis.cli(&["INFO", "replication"]).contains("role:master"));
                // The settings the restore borrowed are the server's own again.
                assert_eq!(
                    redis.cli(&["CONFIG", "GET", "repl-diskless-load"]),
                    "repl-diskless-load\ndisabled"
                );
                assert_eq!(
                    redis.cli(&["CONFIG", "GET", "replica-lazy-flush"]),
                    "replica-lazy-flush\nno"
                );
            }
            RedisTarget::Offline(dir) => {
                let names: Vec<String> = tree_digest(dir, &[]).into_keys().collect();
                assert_eq!(names, ["dump.rdb", "redis.conf"], "{}", dir.display());
            }
        }
    }

    fn leftovers(&self) -> Vec<String> {
        super::trial_dirs(&self.scratch)
    }
}

impl Drop for RedisSubject {
    fn drop(&mut self) {
        self.stop_writer();
    }
}
