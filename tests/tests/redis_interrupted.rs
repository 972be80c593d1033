//! Redis restores interrupted at every moment — the agent killed (SIGKILL), its connection to
//! Redis cut, the restore cancelled as a lost coordinator session cancels it — give the server
//! back: writable again (or a replica of its own master again), its own settings again. Each
//! test prints the measured time to give the server back.
//!
//! The replication link runs through a rate-limited proxy (`redis.restore_advertise`), so the
//! transfer has a middle; the agent is frozen (SIGSTOP) the moment the server shows the state
//! aimed at, the state is confirmed, then it is killed.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_tests::agent::{OneShot, init_local_repository};
use aitbc_backup_tests::fleet::{AgentProcess, Pki};
use aitbc_backup_tests::redis::Redis;
use aitbc_backup_tests::tcp_proxy::TcpProxy;
use aitbc_backup_tests::{free_port, temp_dir, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Bytes per second on the replication link: a few seconds for the test's RDB.
const LINK_RATE: u64 = 4 << 20;
/// A generous bound on giving a server back once an agent runs again (a correctness bound,
/// not a performance one).
const BOUND: Duration = Duration::from_secs(30);

/// INFO over one connection, fast enough to see short states (a load of a fraction of a second).
struct Probe(BufReader<TcpStream>);

impl Probe {
    fn new(port: u16) -> Probe {
        let socket = TcpStream::connect(("127.0.0.1", port)).expect("probe connects");
        socket.set_nodelay(true).expect("nodelay");
        Probe(BufReader::new(socket))
    }

    fn info(&mut self) -> String {
        self.0
            .get_mut()
            .write_all(b"*1\r\n$4\r\nINFO\r\n")
            .expect("INFO");
        let mut header = String::new();
        self.0.read_line(&mut header).expect("INFO reply");
        let len: usize = header
            .trim_end()
            .trim_start_matches('$')
            .parse()
            .unwrap_or_else(|_| panic!("INFO reply {header:?}"));
        let mut body = vec![0u8; len + 2];
        std::io::Read::read_exact(&mut self.0, &mut body).expect("INFO body");
        String::from_utf8_lossy(&body).into_owned()
    }
}

fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
}

/// Where a restore stands, as the server shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// A replica of the agent, nothing received yet.
    Handshake,
    /// Receiving the RDB.
    Transfer,
    /// Loading what it received.
    Loading,
    /// Loaded, link up, not yet given back.
    Loaded,
}

fn moment(info: &str, agent_port: u16) -> Option<Moment> {
    if field(info, "role") != Some("slave")
        || field(info, "master_port") != Some(&agent_port.to_string())
    {
        return None;
    }
    let read: u64 = field(info, "master_sync_read_bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(
        match (
            field(info, "loading"),
            field(info, "master_sync_in_progress"),
            field(info, "master_link_status"),
        ) {
            (Some("1"), _, _) => Moment::Loading,
            (_, Some("1"), _) if read > 0 => Moment::Transfer,
            (_, _, Some("up")) => Moment::Loaded,
            _ => Moment::Handshake,
        },
    )
}

/// The settings a restore changes, as the server has them.
fn settings(redis: &Redis) -> (String, String) {
    (
        redis.cli(&["CONFIG", "GET", "repl-diskless-load"]),
        redis.cli(&["CONFIG", "GET", "replica-lazy-flush"]),
    )
}

fn own_settings() -> (String, String) {
    (
        "repl-diskless-load\ndisabled".to_owned(),
        "replica-lazy-flush\nno".to_owned(),
    )
}

/// A source with `keys` keys backed up; returns the one-shot agent and the manifest id.
fn backed_up(dir: &Path, keys: usize) -> (Redis, OneShot, String) {
    let source = Redis::start();
    source.cli(&[
        "EVAL",
        "for i=1,tonumber(ARGV[1]) do redis.call('SET', 'k:'..i, string.rep('v', 100)..i) end",
        "0",
        &keys.to_string(),
    ]);
    let agent = OneShot::new("redis", &init_local_repository(dir))
        .with(
            "AITBC_BACKUP_REDIS__ADDRESS",
            format!("127.0.0.1:{}", source.port),
        )
        .with(
            "AITBC_BACKUP_REDIS__STATE_DIR",
            dir.join("state").display().to_string(),
        );
    let manifest = agent.ok(&["backup"])["manifest"]
        .as_str()
        .expect("manifest id")
        .to_owned();
    (source, agent, manifest)
}

/// A restore into `target_port` whose replication link runs through a rate-limited proxy;
/// returns the running agent, the proxy and the agent's listening port.
fn start_restore(agent: &OneShot, manifest: &str, target_port: u16) -> (Child, TcpProxy) {
    let listen = free_port();
    let link = TcpProxy::start(listen, LINK_RATE);
    let child = agent
        .clone()
        .with(
            "AITBC_BACKUP_REDIS__RESTORE_LISTEN",
            format!("127.0.0.1:{listen}"),
        )
        .with(
            "AITBC_BACKUP_REDIS__RESTORE_ADVERTISE",
            format!("127.0.0.1:{}", link.port),
        )
        .command(&[
            "restore",
            manifest,
            "--target-url",
            &format!("127.0.0.1:{target_port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the restore");
    (child, link)
}

/// Waits for `wanted`, freezes the agent, confirms the server is still there, kills the agent.
/// False when the restore went past `wanted` before the agent froze.
fn kill_at(child: &mut Child, target: &Redis, link_port: u16, wanted: Moment) -> bool {
    let pid = Pid::from_raw(child.id() as i32);
    let mut probe = Probe::new(target.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "{wanted:?} never seen");
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the restore ended ({status}) before {wanted:?} was seen");
        }
        if moment(&probe.info(), link_port) == Some(wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let now = moment(&probe.info(), link_port);
    kill(pid, Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait();
    // A server loading keeps loading; a transfer stops with its master.
    now.is_some_and(|m| m == wanted || (wanted == Moment::Transfer && m == Moment::Loading))
}

/// The server refuses writes: a replica of a dead agent (what an interrupted restore left).
fn assert_read_only(target: &Redis) {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &target.port.to_string(), "SET", "probe", "1"])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("READONLY"), "writes were accepted: {text}");
}

/// Writable, a master, its own settings.
fn given_back(target: &Redis) -> bool {
    let info = target.cli(&["INFO", "replication"]);
    info.contains("role:master")
        && settings(target) == own_settings()
        && target.cli(&["SET", "probe", "written"]) == "OK"
}

#[test]
fn a_killed_restore_is_given_back_by_the_restarted_sidecar_at_every_moment() {
    let dir = temp_dir("redis-killed");
    let (_source, agent, manifest) = backed_up(dir.path(), 150_000);
    let pki = Pki::new();
    let mut measured = Vec::new();
    for wanted in [
        Moment::Handshake,
        Moment::Transfer,
        Moment::Loading,
        Moment::Loaded,
    ] {
        let mut caught = false;
        for _attempt in 0..5 {
            let target = Redis::start();
            target.cli(&["SET", "precious", "still here"]);
            let (mut child, link) = start_restore(&agent, &manifest, target.port);
            if !kill_at(&mut child, &target, link.port, wanted) {
                // Past the moment before the agent froze: try again on a new server.
                let _ = std::fs::remove_dir_all(dir.path().join("state"));
                continue;
            }
            let killed = Instant::now();
            assert_read_only(&target);
            assert_ne!(settings(&target), own_settings(), "{wanted:?}");
            // The sidecar starts again (no coordinator needed to give the server back).
            let restarted = Instant::now();
            let mut sidecar = AgentProcess::start(
                &pki,
                "redis-a",
                "redis",
                "https://127.0.0.1:1",
                &sidecar_env(&agent),
            );
            assert!(
                wait_until(BOUND, || given_back(&target)),
                "{wanted:?}: not given back within {BOUND:?}: {}\n{}",
                target.cli(&["INFO", "replication"]),
                sidecar.log()
            );
            let back = restarted.elapsed();
            measured.push((wanted, back, killed.elapsed()));
            sidecar.service().stop();
            // The data is the server's own, or all of the backup's: never a part.
            let size: u64 = target.cli(&["DBSIZE"]).parse().expect("dbsize");
            match wanted {
                Moment::Handshake | Moment::Transfer => {
                    assert_eq!(target.cli(&["GET", "precious"]), "still here", "{wanted:?}");
                    assert_eq!(size, 2, "{wanted:?}");
                }
                Moment::Loading | Moment::Loaded => {
                    assert_eq!(size, 150_001, "{wanted:?}");
                }
            }
            let journals: Vec<_> = std::fs::read_dir(dir.path().join("state"))
                .expect("state dir")
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .collect();
            assert!(journals.is_empty(), "journal left: {journals:?}");
            caught = true;
            break;
        }
        assert!(caught, "{wanted:?} was never caught");
    }
    for (wanted, back, since_kill) in &measured {
        println!(
            "killed at {wanted:?}: given back {back:?} after the sidecar's start ({since_kill:?} after the kill, the restart included)"
        );
    }
}

fn sidecar_env(agent: &OneShot) -> Vec<(&str, &str)> {
    [
        "AITBC_BACKUP_REPOSITORY__URL",
        "AITBC_BACKUP_REDIS__ADDRESS",
        "AITBC_BACKUP_REDIS__STATE_DIR",
    ]
    .into_iter()
    .filter_map(|key| agent.var(key).map(|value| (key, value)))
    .collect()
}

#[test]
fn a_replica_killed_mid_restore_is_a_replica_of_its_master_again_after_a_one_shot_run() {
    let dir = temp_dir("redis-killed-replica");
    let (_source, agent, manifest) = backed_up(dir.path(), 150_000);
    let origin = Redis::start();
    origin.cli(&["SET", "origin-key", "from the master"]);
    let target = Redis::start();
    target.cli(&["REPLICAOF", "127.0.0.1", &origin.port.to_string()]);
    assert!(wait_until(BOUND, || target.cli(&["GET", "origin-key"])
        == "from the master"));
    let (mut child, link) = start_restore(&agent, &manifest, target.port);
    assert!(kill_at(&mut child, &target, link.port, Moment::Transfer));
    let info = target.cli(&["INFO", "replication"]);
    assert!(
        info.contains(&format!("master_port:{}", link.port)),
        "{info}"
    );

    // Any one-shot command gives it back first: here a backup of the source.
    let started = Instant::now();
    let mut backup = agent
        .command(&["backup"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup");
    let origin_port = format!("master_port:{}", origin.port);
    assert!(
        wait_until(BOUND, || {
            let info = target.cli(&["INFO", "replication"]);
            info.contains(&origin_port)
                && info.contains("master_link_status:up")
                && settings(&target) == own_settings()
        }),
        "{}",
        target.cli(&["INFO", "replication"])
    );
    let back = started.elapsed();
    assert!(backup.wait().expect("backup").success());
    // It follows its master again: a write there reaches it.
    origin.cli(&["SET", "after", "the restore"]);
    assert!(wait_until(BOUND, || target.cli(&["GET", "after"]) == "the restore"));
    assert_eq!(target.cli(&["GET", "origin-key"]), "from the master");
    println!(
        "killed at Transfer (a replica): back to its master {back:?} after the next one-shot's start"
    );
}

#[test]
fn a_restore_whose_redis_connection_is_cut_gives_the_server_back_while_the_agent_lives() {
    let dir = temp_dir("redis-cut");
    let (_source, agent, manifest) = backed_up(dir.path(), 150_000);
    let target = Redis::start();
    target.cli(&["SET", "precious", "still here"]);
    // The agent reaches Redis only through this proxy.
    let control = TcpProxy::start(target.port, 0);
    let via_proxy = format!("127.0.0.1:{}", control.port);
    let (child, link) = start_restore(&agent, &manifest, control.port);
    let mut probe = Probe::new(target.port);
    assert!(wait_until(BOUND, || moment(&probe.info(), link.port)
        == Some(Moment::Transfer)));
    control.cut();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    control.heal();
    assert!(
        wait_until(BOUND, || given_back(&target)),
        "{}",
        target.cli(&["INFO", "replication"])
    );
    let back = cut.elapsed();
    let out = child.wait_with_output().expect("restore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("released"), "{stderr}");
    assert!(stderr.contains(&via_proxy), "{stderr}");
    let journal = dir.path().join("state");
    assert!(
        !std::fs::read_dir(&journal)
            .expect("state dir")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json")),
        "journal left"
    );
    println!("connection cut mid-transfer for 3 s: given back {back:?} after the cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_as_on_a_lost_session_gives_the_server_back_at_once() {
    use aitbc_backup_agent::redis::RedisSettings;
    use aitbc_backup_agent::redis::restore::{RestoreOptions, restore};
    use tokio_util::sync::CancellationToken;

    let dir = temp_dir("redis-cancel");
    let (_source, agent, manifest_id) =
        tokio::task::block_in_place(|| backed_up(dir.path(), 150_000));
    let url = aitbc_backup_repository::RepoUrl::parse(
        agent.var("AITBC_BACKUP_REPOSITORY__URL").expect("url"),
    )
    .expect("url");
    let storage =
        aitbc_backup_repository::open_storage(&url, &Default::default(), Default::default())
            .await
            .expect("storage");
    let repo = aitbc_backup_repository::Repository::open(storage, None, &CancellationToken::new())
        .await
        .expect("open");
    let manifest = repo
        .component(&manifest_id, &CancellationToken::new())
        .await
        .expect("manifest");
    let target = tokio::task::block_in_place(Redis::start);
    tokio::task::block_in_place(|| target.cli(&["SET", "precious", "still here"]));
    let listen = free_port();
    let link = TcpProxy::start(listen, LINK_RATE);
    let settings = RedisSettings {
        address: format!("127.0.0.1:{}", target.port),
        restore_listen: format!("127.0.0.1:{listen}").parse().expect("addr"),
        restore_advertise: format!("127.0.0.1:{}", link.port),
        state_dir: dir.path().join("state"),
        ..Default::default()
    };
    // As the agent runs a coordinator's restore: a task whose token the session's end cancels
    // and whose future is dropped.
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let options = RestoreOptions::default();
            tokio::select! {
                _ = cancel.cancelled() => None,
                done = restore(&repo, &manifest, &settings, &options, Arc::default(), &cancel) => Some(done),
            }
        }
    });
    let link_port = link.port;
    let target_port = target.port;
    let seen = tokio::task::spawn_blocking(move || {
        let mut probe = Probe::new(target_port);
        wait_until(BOUND, || {
            moment(&probe.info(), link_port) == Some(Moment::Transfer)
        })
    })
    .await
    .expect("probe");
    assert!(seen, "the transfer never started");
    cancel.cancel();
    let cancelled = Instant::now();
    assert!(
        task.await.expect("join").is_none(),
        "the restore ended first"
    );
    let back = tokio::task::block_in_place(|| {
        assert!(
            wait_until(BOUND, || given_back(&target)),
            "{}",
            target.cli(&["INFO", "replication"])
        );
        assert_eq!(target.cli(&["GET", "precious"]), "still here");
        cancelled.elapsed()
    });
    println!("restore cancelled mid-transfer (session lost): given back {back:?} after the cancel");
}

#[test]
fn a_second_restore_is_refused_while_one_runs_and_a_replica_of_an_unreachable_master_needs_force() {
    let dir = temp_dir("redis-second");
    let (_source, agent, manifest) = backed_up(dir.path(), 150_000);
    let target = Redis::start();
    let (mut first, link) = start_restore(&agent, &manifest, target.port);
    let mut probe = Probe::new(target.port);
    // An empty server loads the RDB as it arrives: transfer or loading, the restore runs.
    if !wait_until(BOUND, || {
        matches!(
            moment(&probe.info(), link.port),
            Some(Moment::Transfer | Moment::Loading)
        )
    }) {
        let _ = first.kill();
        let out = first.wait_with_output().expect("first restore");
        panic!("no transfer seen: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The same server under another spelling, from an agent with a state directory of its
    // own: refused, naming the restore that runs; the running one goes on.
    let other = agent.clone().with(
        "AITBC_BACKUP_REDIS__STATE_DIR",
        dir.path().join("other-state").display().to_string(),
    );
    let out = other
        .command(&[
            "restore",
            &manifest,
            "--target-url",
            &format!("localhost:{}", target.port),
        ])
        .output()
        .expect("second restore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another restore into Redis") && stderr.contains("is running"),
        "{stderr}"
    );
    let status = first.wait().expect("first restore");
    assert!(status.success(), "the first restore failed");
    assert!(given_back(&target));
    assert_eq!(target.cli(&["DBSIZE"]), "150001");

    // A replica of a master it cannot reach (as an interrupted restore from elsewhere leaves
    // it): refused without --force, naming the master; with --force restored and left a master.
    let dead = free_port();
    target.cli(&["REPLICAOF", "127.0.0.1", &dead.to_string()]);
    let restore = |force: bool| {
        let mut args = vec![
            "restore".to_owned(),
            manifest.clone(),
            "--target-url".to_owned(),
            format!("127.0.0.1:{}", target.port),
        ];
        if force {
            args.push("--force".to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agent.command(&args).output().expect("restore")
    };
    let out = restore(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{dead}")) && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(target.cli(&["INFO", "replication"]).contains("role:slave"));
    let out = restore(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert!(
        report["warnings"].to_string().contains("left a master"),
        "{report}"
    );
    assert!(given_back(&target));
}
