//! Backups and restores through an HTTP proxy that injects S3 faults (500, 503 SlowDown, 429,
//! answers lost after the server applied a request, bodies cut mid-way, slow answers). Each
//! command either succeeds with the right bytes or fails with a clear error; nothing committed
//! is ever broken, and everything committed restores byte for byte without the proxy.

use std::process::{Command, Output};

use aitbc_backup_tests::data::generate;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::process::output_with_stdin;
use aitbc_backup_tests::s3::S3Server;
use aitbc_backup_tests::s3_faults::FaultProxy;

fn repo(server: &S3Server, endpoint: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    output_with_stdin(
        Command::new(binary("aitbc-backup"))
            .arg("repo")
            .args(["--repository", &format!("s3://{}/faults", server.bucket)])
            .args(["--endpoint", endpoint, "--path-style"])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(server.client_env()),
        stdin,
    )
}

/// A failed command must say what failed, in one line a person can act on, and not panic.
fn assert_clear_failure(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{what} panicked: {stderr}");
    assert!(
        stderr.contains("Error") || stderr.contains("error"),
        "{what} failed without saying why: {stderr}"
    );
}

#[test]
fn faults_at_the_http_level_never_break_what_is_committed() {
    let server = S3Server::s3s_fs();
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    // One request in five faulted: the storage layer retries most of them away.
    let proxy = FaultProxy::start(&server.endpoint(), 200, seed);
    let direct = server.endpoint();
    let out = repo(&server, &direct, &["init"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pool: Vec<Vec<u8>> = (0..4).map(|i| generate(1 << 20, seed ^ i)).collect();
    let mut committed = Vec::new();
    let mut failed = 0;
    for i in 0..10usize {
        let mut data = Vec::new();
        data.extend_from_slice(&pool[i % 4]);
        data.extend_from_slice(&pool[(i + 1) % 4]);
        data.extend_from_slice(&generate(300 << 10, seed.wrapping_add(i as u64)));
        let out = repo(&server, &proxy.endpoint(), &["put", "ledger"], Some(&data));
        if out.status.success() {
            committed.push((String::from_utf8_lossy(&out.stdout).trim().to_owned(), data));
        } else {
            assert_clear_failure(&out, "put");
            eprintln!(
                "put failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            failed += 1;
        }
    }
    // Restores through the proxy: the right bytes, or a clear failure; never wrong bytes.
    for (id, data) in &committed {
        let out = repo(&server, &proxy.endpoint(), &["cat", id], None);
        if out.status.success() {
            assert!(
                out.stdout == *data,
                "cat {id} through the proxy gave other bytes"
            );
        } else {
            assert_clear_failure(&out, "cat");
        }
    }
    let (requests, injected) = proxy.counts();
    assert!(
        injected > 0,
        "{requests} requests and no fault: nothing was tested"
    );
    drop(proxy);

    let verify = repo(&server, &direct, &["verify", "--read-data"], None);
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    for (id, data) in &committed {
        let out = repo(&server, &direct, &["cat", id], None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *data, "backup {id} restores other bytes");
    }
    assert!(
        committed.len() >= 5,
        "only {} of 10 backups got through {injected} faults in {requests} requests ({failed} failed)",
        committed.len()
    );
    eprintln!(
        "{} committed, {failed} failed; {injected} faults in {requests} requests",
        committed.len()
    );
}
