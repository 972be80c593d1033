//! The test harness: real services on free loopback ports in temporary directories.
//!
//! - [`process`]: a child process that is always stopped (SIGTERM or the service's own stop
//!   signal, wait, then SIGKILL) when its guard drops, including when a test panics.
//! - [`postgres`], [`redis`], [`s3`]: PostgreSQL 15, Redis 7, s3s-fs, moto and Ceph radosgw.
//! - [`fleet`]: a dev PKI and the aitbc-backup binaries (coordinator, agents, CLI).
//! - [`chain`]: the simulated blockchain node's ledger and the checks made on a chain.db; the
//!   simulator itself is the `aitbc-node-sim` binary of this crate.
//! - [`data`], [`repository`]: test data and repositories on every backend.
//! - [`conformance`]: the component contract, one implementation per component, the same cases
//!   run against each.
//! - [`tcp_proxy`]: a TCP proxy with a byte rate and cuts, for faults on a connection.
//!
//! Services are started synchronously from the test's own thread (start functions block until
//! the service answers), which keeps the parent-death signal tied to the test's lifetime.

pub mod agent;
pub mod chain;
pub mod conformance;
pub mod data;
pub mod fleet;
pub mod mirror;
pub mod node;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod repository;
pub mod s3;
pub mod s3_faults;
pub mod stack;
pub mod tcp_proxy;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; the kernel does not hand it out again
/// right away).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Where `scripts/setup.sh` put the tools that are not Debian packages.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("AITBC_TOOLS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".local/share/aitbc-backup/tools")
        }
    }
}

/// A tool from [`tools_dir`], or a panic telling how to install it.
pub fn tool(relative: &str) -> PathBuf {
    let path = tools_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh first",
        path.display()
    );
    path
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A fresh temporary directory, removed on drop.
pub fn temp_dir(label: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("aitbc-{label}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Checks what a fence did to a writer: no progress while held (`before` → `during`, one write
/// in flight allowed), progress after it ended (`after`), and its longest write waited about
/// the pause (at least two thirds of it, at most 700 ms more).
pub fn assert_fence_held(
    (before, during, after): (u64, u64, u64),
    longest: Duration,
    pause: Duration,
) {
    assert!(
        during <= before + 1,
        "writers were not held: {before} -> {during}"
    );
    assert!(after > during, "writers did not resume after the pause");
    assert!(
        longest >= pause * 2 / 3 && longest <= pause + Duration::from_millis(700),
        "the longest write took {longest:?} for a {pause:?} fence"
    );
}
