//! Garbage collection racing backups: `repo gc --grace 0s` in a loop beside backups that
//! share chunks, some of them with chunks a forgotten backup left unreferenced. Whatever the
//! interleaving, every committed manifest must verify and restore byte for byte. Counts come
//! from `AITBC_GC_RACE_BACKUPS` (default 24; `scripts/soak.sh` runs hundreds).

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aitbc_backup_tests::data::generate;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::process::output_with_stdin;
use rand::{Rng, SeedableRng};

fn repo(url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    output_with_stdin(
        Command::new(binary("aitbc-backup"))
            .args(["repo", "--repository", url])
            .args(args),
        stdin,
    )
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

/// Writes a lock object by hand, aged `age` by the file's mtime (the local storage's clock).
fn plant_lock(repo_dir: &std::path::Path, kind: &str, age: Duration) -> std::path::PathBuf {
    let dir = repo_dir.join("locks").join(kind);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(format!("planted-{:08x}.json", rand::random::<u32>()));
    std::fs::write(&path, br#"{"what":"planted","host":"test","pid":1}"#).expect("write");
    let file = std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_modified(std::time::SystemTime::now() - age)
        .expect("age the lock");
    path
}

fn gc_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&ok(url, &["--json", "gc", "--grace", "0s"], None)).expect("gc json")
}

#[test]
fn dead_locks_expire_live_ones_hold_and_a_copied_manifest_is_damage() {
    let dir = aitbc_backup_tests::temp_dir("gc-locks");
    let root = dir.path().join("repo");
    let url = format!("file://{}", root.display());
    ok(&url, &["init"], None);
    let a = generate(2 << 20, 1);
    let b = generate(2 << 20, 2);
    let id_a = ok(&url, &["put", "a"], Some(&a)).trim().to_owned();
    let id_b = ok(&url, &["put", "b"], Some(&b)).trim().to_owned();

    // A killed GC's lock, older than a sweep lock lives: writers go on, the next GC removes it.
    let dead_sweep = plant_lock(&root, "sweeps", Duration::from_secs(60));
    let id_c = ok(&url, &["put", "c"], Some(&generate(1 << 20, 3)))
        .trim()
        .to_owned();
    // A backup in flight (a fresh writer lock): GC deletes nothing and says so.
    ok(&url, &["forget", &id_c], None);
    let live_writer = plant_lock(&root, "writers", Duration::ZERO);
    let report = gc_json(&url);
    assert_eq!(report["writers_in_flight"], 1, "{report}");
    assert_eq!(report["deleted_chunks"], 0, "{report}");
    assert!(!dead_sweep.exists(), "the dead GC's lock was not removed");
    // The same writer lock, dead for 11 minutes: GC goes ahead and removes it.
    std::fs::File::options()
        .write(true)
        .open(&live_writer)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - Duration::from_secs(660)))
        .expect("age the writer lock");
    let report = gc_json(&url);
    assert_eq!(report["writers_in_flight"], 0, "{report}");
    assert!(report["deleted_chunks"].as_u64() > Some(0), "{report}");
    assert!(
        !live_writer.exists(),
        "the dead writer's lock was not removed"
    );

    // A sound manifest copied over another: damage, never the other backup under A's name.
    let components = root.join("manifests/components");
    std::fs::copy(
        components.join(format!("{id_b}.json")),
        components.join(format!("{id_a}.json")),
    )
    .expect("copy");
    let out = repo(&url, &["cat", &id_a], None);
    assert!(!out.status.success(), "A restored as B");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a copy of another manifest"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify = repo(&url, &["verify"], None);
    assert!(!verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stdout).contains(&id_a));
    let gc = repo(&url, &["gc", "--grace", "0s"], None);
    assert!(!gc.status.success(), "GC went on with a damaged manifest");
    let cat_b = repo(&url, &["cat", &id_b], None);
    assert!(
        cat_b.status.success() && cat_b.stdout == b,
        "B no longer restores"
    );
}
