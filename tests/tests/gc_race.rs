//! Garbage collection racing backups: `repo gc --grace 0s` in a loop beside backups that
//! share chunks, some of them with chunks a forgotten backup left unreferenced. Whatever the
//! interleaving, every committed manifest must verify and restore byte for byte. Counts come
//! from `AITBC_GC_RACE_BACKUPS` (default 24; `scripts/soak.sh` runs hundreds).

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aitbc_backup_tests::data::generate;
use aitbc_backup_tests::fleet::binary;
use rand::{Rng, SeedableRng};

fn repo(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child = Command::new(binary("aitbc-backup"))
        .args(["repo", "--repository", url])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run aitbc-backup");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait")
}

fn ok(url: &str, args: &[&str], stdin: Option<&[u8]>) -> String {
    let out = repo(url, args, stdin);
    assert!(
        out.status.success(),
        "repo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stream of pieces drawn from a small pool, so backups share chunks with each other.
fn stream(pool: &[Vec<u8>], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.random_range(2..6) {
        out.extend_from_slice(&pool[rng.random_range(0..pool.len())]);
    }
    // A unique tail: every backup also stores something new.
    out.extend_from_slice(&generate(64 << 10, rng.random()));
    out
}

#[test]
fn gc_at_zero_grace_beside_backups_never_breaks_a_committed_backup() {
    let backups: usize = std::env::var("AITBC_GC_RACE_BACKUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = aitbc_backup_tests::temp_dir("gc-race");
    let dir = dir.path().to_owned();
    let url = format!("file://{}", dir.join("repo").display());
    ok(&url, &["init"], None);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pool: Vec<Vec<u8>> = (0..8).map(|i| generate(1 << 20, seed ^ i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(AtomicU64::new(0));
    let collector = {
        let (url, stop, deleted) = (url.clone(), stop.clone(), deleted.clone());
        std::thread::spawn(move || {
            let mut runs = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let report: serde_json::Value =
                    serde_json::from_str(&ok(&url, &["--json", "gc", "--grace", "0s"], None))
                        .expect("gc json");
                deleted.fetch_add(
                    report["deleted_chunks"].as_u64().unwrap_or(0),
                    Ordering::Relaxed,
                );
                runs += 1;
                std::thread::sleep(Duration::from_millis(runs as u64 % 7 * 10));
            }
            runs
        })
    };

    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..backups {
        let data = stream(&pool, &mut rng);
        let out = repo(&url, &["put", "ledger", "--stream", "raw"], Some(&data));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            kept.push((String::from_utf8_lossy(&out.stdout).trim().to_owned(), data));
        } else {
            // A backup may fail (and say why); it must never commit something broken.
            assert!(
                stderr.contains("run the backup again") || stderr.contains("run it again"),
                "{stderr}"
            );
        }
        // Forget a backup now and then: its chunks become garbage that later backups reuse.
        if i % 3 == 2 && kept.len() > 1 {
            let (id, _) = kept.remove(rng.random_range(0..kept.len()));
            ok(&url, &["forget", &id], None);
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
    }
    stop.store(true, Ordering::Relaxed);
    let runs = collector.join().expect("gc thread");
    assert!(
        deleted.load(Ordering::Relaxed) > 0,
        "{runs} gc runs deleted nothing: the race was not exercised"
    );

    let verify = repo(&url, &["verify", "--read-data"], None);
    assert!(
        verify.status.success(),
        "verify after the race: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    for (id, data) in &kept {
        let out = repo(&url, &["cat", id], None);
        assert!(
            out.status.success(),
            "cat {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *data, "backup {id} restores other bytes");
    }
    eprintln!(
        "{backups} backups, {} kept, {runs} gc runs, {} chunks deleted",
        kept.len(),
        deleted.load(Ordering::Relaxed)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
