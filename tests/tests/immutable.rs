//! Immutable repositories on a real S3 implementation with versioning and Object Lock (moto):
//! the init check, locks that follow retention under random backups, forgets and GC runs, and
//! an attacker with write (and delete) access against committed snapshot sets.

use std::collections::{HashMap, HashSet};
use std::process::Output;
use std::time::{Duration, SystemTime};

use aitbc_backup_repository::manifest::{ComponentManifest, SetComponent, SetManifest};
use aitbc_backup_repository::storage::{
    Backend, LockMode, ObjectVersion, PutMode, S3Settings, S3Storage,
};
use aitbc_backup_repository::{
    ChunkerParams, ObjectLock, Repository, Storage, gc, immutable, layout, verify,
};
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::repository::{backup_bytes, test_limits};
use aitbc_backup_tests::s3::{REGION, S3Server};
use aitbc_backup_tests::stack::Stack;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const LOCKED: &str = "locked";

/// `aitbc-backup repo --repository s3://BUCKET/PREFIX ... ARGS` against `server`.
fn repo_cli(server: &S3Server, url: &str, args: &[&str]) -> Output {
    std::process::Command::new(binary("aitbc-backup"))
        .args([
            "repo",
            "--repository",
            url,
            "--endpoint",
            &server.endpoint(),
        ])
        .arg("--path-style")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(server.client_env())
        .output()
        .expect("run aitbc-backup")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn storage(server: &S3Server, bucket: &str, prefix: &str) -> Storage {
    let mut settings = S3Settings::new(bucket, prefix);
    settings.endpoint = Some(server.endpoint());
    settings.path_style = true;
    settings.region = Some(REGION.to_owned());
    settings.static_credentials = Some((server.access_key.clone(), server.secret_key.clone()));
    let backend = futures::executor::block_on(S3Storage::new(settings));
    Storage::new(Backend::S3(backend), test_limits())
}

#[test]
fn init_refuses_storage_that_cannot_lock() {
    let server = S3Server::moto();
    // A bucket without Object Lock (moto's default bucket).
    let url = format!("s3://{}/plain", server.bucket);
    let out = repo_cli(
        &server,
        &url,
        &["init", "--object-lock", "governance", "--lock-days", "3"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not have Object Lock enabled"),
        "{}",
        stderr(&out)
    );
    let listed = server.aws(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        &server.bucket,
        "--prefix",
        "plain/",
    ]);
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("plain/config"),
        "a refused init wrote the repository config"
    );
    // A local directory keeps no versions at all.
    let dir = aitbc_backup_tests::temp_dir("local");
    let local = format!("file://{}", dir.path().join("repo").display());
    let out = repo_cli(
        &server,
        &local,
        &["init", "--object-lock", "compliance", "--lock-days", "3"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs an S3 bucket with Object Lock"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("repo/config").exists());
    // A lock needs its period; a margin as long as the period is refused.
    server.create_locked_bucket(LOCKED);
    let url = format!("s3://{LOCKED}/r");
    let out = repo_cli(&server, &url, &["init", "--object-lock", "governance"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--lock-days"), "{}", stderr(&out));
    let out = repo_cli(
        &server,
        &url,
        &[
            "init",
            "--object-lock",
            "governance",
            "--lock-days",
            "1",
            "--lock-margin",
            "1d",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("margin"), "{}", stderr(&out));
    // And a locked bucket is accepted, its config locked.
    let out = repo_cli(
        &server,
        &url,
        &["init", "--object-lock", "compliance", "--lock-days", "2"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let head = server.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        LOCKED,
        "--key",
        "r/config",
    ]);
    let head: serde_json::Value = serde_json::from_slice(&head.stdout).expect("head JSON");
    assert_eq!(head["ObjectLockMode"], "COMPLIANCE", "{head:#}");
    // Version 2: a program that predates locks refuses the repository instead of writing
    // unlocked objects into it.
    let config = get_json(&server, "r/config");
    assert_eq!(config["version"], 2, "{config:#}");
    assert_eq!(config["object_lock"]["mode"], "compliance", "{config:#}");
    assert_eq!(config["object_lock"]["days"], 2, "{config:#}");
}

/// The JSON object at `key` of the locked bucket.
fn get_json(server: &S3Server, key: &str) -> serde_json::Value {
    serde_json::from_slice(&get_bytes(server, key)).expect("JSON object")
}

/// The object at `key` of the locked bucket.
fn get_bytes(server: &S3Server, key: &str) -> Vec<u8> {
    let dir = aitbc_backup_tests::temp_dir("get");
    let path = dir.path().join("object");
    let out = server.aws(&[
        "s3api",
        "get-object",
        "--bucket",
        LOCKED,
        "--key",
        key,
        &path.display().to_string(),
    ]);
    assert!(out.status.success(), "get {key}: {}", stderr(&out));
    std::fs::read(&path).expect("read object")
}

/// Each version's lock date, read from the bucket.
async fn lock_dates(
    storage: &Storage,
    versions: &[ObjectVersion],
    cancel: &CancellationToken,
) -> Vec<(String, SystemTime)> {
    let mut out = Vec::new();
    for v in versions.iter().filter(|v| !v.delete_marker) {
        let retention = storage
            .retention(&v.path, &v.version_id, cancel)
            .await
            .expect("read retention")
            .unwrap_or_else(|| panic!("{} version {} has no lock", v.path, v.version_id));
        out.push((v.path.to_string(), retention.until));
    }
    out
}

/// Random backups that share content, forgets, GC runs and lock extensions against one locked
/// repository; after every extension, every version of everything a kept manifest needs is
/// locked past the margin, GC never fails on a lock, and every kept backup restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_follow_retention() {
    let steps: usize = std::env::var("AITBC_LOCK_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let server = S3Server::moto();
    server.create_locked_bucket(LOCKED);
    let cancel = CancellationToken::new();
    // A margin 6 s short of the one-day period: a version locked (or extended) more than 6 s
    // ago is due for extension, a newer one is not, so runs do both.
    let lock = ObjectLock {
        mode: LockMode::Governance,
        days: 1,
        margin_secs: 24 * 3600 - 6,
    };
    let small = ChunkerParams {
        min_size: 16 << 10,
        avg_size: 32 << 10,
        max_size: 64 << 10,
    };
    let repo = Repository::init_locked(
        storage(&server, LOCKED, "prop"),
        small,
        None,
        Some(lock),
        &cancel,
    )
    .await
    .expect("init");
    // Backups are drawn from a pool of blocks, so they share chunks.
    let pool: Vec<Vec<u8>> = (0..12)
        .map(|_| (0..96 << 10).map(|_| rng.random()).collect())
        .collect();
    let mut kept: HashMap<String, Vec<u8>> = HashMap::new();
    let (mut forgets, mut locked_seen, mut extended) = (0, 0, 0);
    for step in 0..steps {
        match rng.random_range(0..10) {
            0..=4 => {
                let data: Vec<u8> = (0..rng.random_range(1..5))
                    .flat_map(|_| pool[rng.random_range(0..pool.len())].clone())
                    .collect();
                let manifest: ComponentManifest = backup_bytes(&repo, data.clone(), "prop")
                    .await
                    .expect("backup");
                kept.insert(manifest.id, data);
            }
            5 | 6 if !kept.is_empty() => {
                let id = kept.keys().next().cloned().expect("a kept backup");
                repo.delete_component(&id, &cancel).await.expect("forget");
                kept.remove(&id);
                forgets += 1;
            }
            _ => {
                let started = SystemTime::now();
                let report = gc::gc(&repo, Duration::ZERO, false, &cancel)
                    .await
                    .unwrap_or_else(|err| panic!("step {step}: gc failed: {err}"));
                locked_seen += report.locked;
                let locks = report
                    .locks
                    .expect("a locked repository's GC extends locks");
                extended += locks.extended;
                check_kept_locked(&repo, lock, started, &cancel).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2500))).await;
    }
    let started = SystemTime::now();
    let marked = gc::mark(&repo, false, &cancel).await.expect("mark");
    immutable::extend_locks(&repo, &marked, &cancel)
        .await
        .expect("extend");
    check_kept_locked(&repo, lock, started, &cancel).await;

    // A set names a kept backup; a writer puts a delete marker in front of that backup's
    // manifest (the set still needs it and its chunks locked) and plants a garbage manifest
    // (which must not stop the extension of the rest).
    let victim = kept.keys().next().cloned().expect("a kept backup");
    let set = SetManifest {
        id: layout::new_manifest_id(),
        created: chrono::Utc::now().to_rfc3339(),
        policy: String::new(),
        mode: "independent".into(),
        components: vec![SetComponent {
            name: "prop".into(),
            manifest_id: victim.clone(),
            consistency: None,
        }],
        cut_skew_ms: 0.0,
        write_pause_ms: 0.0,
        pinned: false,
    };
    repo.commit_set(&set, &cancel).await.expect("commit set");
    repo.storage()
        .delete(&layout::component_manifest(&victim), &cancel)
        .await
        .expect("delete marker");
    repo.storage()
        .put(
            &layout::component_manifest("20261207T000000000Z-deadbeef"),
            "garbage".into(),
            PutMode::Create,
            &cancel,
        )
        .await
        .expect("plant a manifest");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let started = SystemTime::now();
    let marked = gc::mark(&repo, false, &cancel).await.expect("lenient mark");
    assert!(
        marked.components.contains(&victim),
        "the set's manifest was not marked"
    );
    assert_eq!(marked.skipped, 1, "the planted manifest");
    let report = immutable::extend_locks(&repo, &marked, &cancel)
        .await
        .expect("extend");
    assert_eq!(report.manifests_skipped, 1);
    check_kept_locked(&repo, lock, started, &cancel).await;
    // GC stops at the planted manifest (deleting on partial knowledge loses data).
    let stopped = gc::gc(&repo, Duration::ZERO, false, &cancel).await;
    assert!(stopped.is_err(), "GC went on past a damaged manifest");
    repo.delete_component("20261207T000000000Z-deadbeef", &cancel)
        .await
        .expect("forget the planted manifest");
    for (id, data) in &kept {
        let manifest = repo.component(id, &cancel).await.expect("kept manifest");
        let mut restored = Vec::new();
        aitbc_backup_repository::restore(
            &repo,
            &manifest,
            &mut restored,
            Default::default(),
            &cancel,
        )
        .await
        .expect("restore");
        assert!(restored == *data, "backup {id} restored different bytes");
    }
    eprintln!(
        "{steps} steps: {} kept, {forgets} forgotten, {locked_seen} locked chunks skipped by GC, {extended} locks extended",
        kept.len()
    );
    let report = verify::verify(&repo, true, &cancel).await.expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
}

/// The first version of every chunk a kept manifest references, of every component manifest
/// the mark reads (a set may name one behind a delete marker) and of every set manifest not
/// deleted is locked at least until `started` + the margin.
async fn check_kept_locked(
    repo: &Repository,
    lock: ObjectLock,
    started: SystemTime,
    cancel: &CancellationToken,
) {
    let marked = gc::mark(repo, false, cancel).await.expect("mark");
    let storage = repo.storage();
    let mut needed = Vec::new();
    for prefix in [
        layout::CHUNKS,
        layout::COMPONENT_MANIFESTS,
        layout::SET_MANIFESTS,
    ] {
        let versions = storage.versions(prefix, cancel).await.expect("versions");
        let mut keys: Vec<_> = versions.iter().map(|v| v.path.clone()).collect();
        keys.dedup();
        for key in keys {
            let of_key: Vec<&ObjectVersion> = versions.iter().filter(|v| v.path == key).collect();
            let deleted = of_key.iter().any(|v| v.latest && v.delete_marker);
            let name = key.file_name();
            let id = name.strip_suffix(".json").unwrap_or(name);
            let kept = match prefix {
                layout::CHUNKS => marked.chunks.contains(name),
                layout::COMPONENT_MANIFESTS => marked.components.contains(id),
                _ => !deleted,
            };
            if let Some(first) = of_key.iter().rev().find(|v| !v.delete_marker)
                && kept
            {
                needed.push((*first).clone());
            }
        }
    }
    let floor = started + lock.margin();
    for (object, until) in lock_dates(storage, &needed, cancel).await {
        assert!(
            until >= floor,
            "{object} is locked only until {until:?}, less than the margin from {started:?}"
        );
    }
}

/// The set's recorded height of `component`.
fn recorded_height(set: &serde_json::Value, component: &str) -> Option<u64> {
    set["components"]
        .as_array()?
        .iter()
        .find(|c| c["component"] == component)?["consistency"]["height"]
        .as_u64()
}

/// Keys under `prefix` of the locked bucket.
fn keys(server: &S3Server, prefix: &str) -> Vec<String> {
    let out = server.aws(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        LOCKED,
        "--prefix",
        prefix,
        "--query",
        "Contents[].Key",
        "--output",
        "json",
    ]);
    serde_json::from_slice::<Option<Vec<String>>>(&out.stdout)
        .expect("key list")
        .unwrap_or_default()
}

#[test]
fn an_attacker_with_write_access_cannot_destroy_committed_sets() {
    let server = S3Server::moto();
    server.create_locked_bucket(LOCKED);
    let url = format!("s3://{LOCKED}/platform");
    let init = repo_cli(
        &server,
        &url,
        &["init", "--object-lock", "governance", "--lock-days", "2"],
    );
    assert!(init.status.success(), "{}", stderr(&init));
    let mut env = server.repository_env();
    env.push((
        "AITBC_BACKUP_REPOSITORY__OBJECT_LOCK__MODE".into(),
        "governance".into(),
    ));
    env.push((
        "AITBC_BACKUP_REPOSITORY__OBJECT_LOCK__DAYS".into(),
        "2".into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut stack = Stack::start_on(&url, &env, 20);
    let first = stack.snapshot("fenced");
    assert_eq!(first["state"], "committed", "{first:#}");
    let second = stack.snapshot("fenced");
    assert_eq!(second["state"], "committed", "{second:#}");
    let before_attack = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::thread::sleep(Duration::from_millis(1100));

    // The agents' credentials may put: every manifest and every other chunk is overwritten,
    // some with garbage, a component manifest with another's body.
    let garbage = stack.path("garbage");
    std::fs::write(&garbage, b"not what was stored").expect("write garbage");
    let put = |key: &str, body: &std::path::Path| {
        let out = server.aws(&[
            "s3api",
            "put-object",
            "--bucket",
            LOCKED,
            "--key",
            key,
            "--body",
            &body.display().to_string(),
        ]);
        assert!(out.status.success(), "attacker put {key}: {}", stderr(&out));
    };
    let chunks = keys(&server, "platform/chunks/");
    let components = keys(&server, "platform/manifests/components/");
    let sets = keys(&server, "platform/manifests/sets/");
    assert!(chunks.len() >= 3 && components.len() >= 6 && sets.len() == 2);
    for key in chunks.iter().step_by(2) {
        put(key, &garbage);
    }
    let other_body = stack.path("other");
    let got = server.aws(&[
        "s3api",
        "get-object",
        "--bucket",
        LOCKED,
        "--key",
        &components[0],
        &other_body.display().to_string(),
    ]);
    assert!(got.status.success());
    for key in components.iter().skip(1) {
        put(key, &other_body);
    }
    for key in &sets {
        put(key, &garbage);
    }
    // The coordinator's credentials may also delete: markers on other chunks and on one
    // component manifest; the set manifest of the second set is deleted outright.
    let delete = |key: &str| {
        let out = server.aws(&["s3api", "delete-object", "--bucket", LOCKED, "--key", key]);
        assert!(
            out.status.success(),
            "attacker delete {key}: {}",
            stderr(&out)
        );
    };
    for key in chunks.iter().skip(1).step_by(2) {
        delete(key);
    }
    delete(&components[0]);
    let second_id = second["id"].as_str().expect("id");
    delete(&format!("platform/manifests/sets/{second_id}.json"));
    // ...but no locked version can be removed, by either.
    let versions = server.aws(&[
        "s3api",
        "list-object-versions",
        "--bucket",
        LOCKED,
        "--prefix",
        &chunks[0],
    ]);
    let versions: serde_json::Value = serde_json::from_slice(&versions.stdout).expect("versions");
    let original = versions["Versions"]
        .as_array()
        .expect("versions")
        .iter()
        .min_by_key(|v| v["LastModified"].as_str().map(str::to_owned))
        .expect("the original version")["VersionId"]
        .as_str()
        .expect("version id")
        .to_owned();
    let out = server.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        LOCKED,
        "--key",
        &chunks[0],
        &format!("--version-id={}", original),
    ]);
    assert!(!out.status.success(), "a locked version was deleted");
    assert!(stderr(&out).contains("AccessDenied"), "{}", stderr(&out));

    // Every committed set still verifies and restores, read from the versions that verify.
    let verified = repo_cli(&server, &url, &["verify", "--read-data"]);
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        stderr(&verified)
    );
    let warnings = stderr(&verified);
    assert!(
        warnings.contains(components[1].trim_start_matches("platform/"))
            && warnings.contains(chunks[0].trim_start_matches("platform/")),
        "verify did not report the overwritten objects: {warnings}"
    );
    stack.coordinator.restart();
    stack.wait_agents_online();
    let first_id = first["id"].as_str().expect("id");
    let committed: Vec<String> = stack
        .snapshots()
        .iter()
        .filter(|s| s["state"] == "committed")
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    assert!(committed.iter().any(|id| id == first_id), "{committed:?}");
    let ((ledger, postgres, redis), _) = stack.restore_fresh(first_id);
    assert_eq!(Some(ledger), recorded_height(&first, "ledger"), "{first:#}");
    assert!(ledger >= postgres && postgres >= redis && redis + 1 >= ledger);
    // The deleted set is no longer a committed one, but the repository as it was before the
    // attack still holds it whole.
    assert!(!committed.iter().any(|id| id == second_id), "{committed:?}");
    let as_of = repo_cli(&server, &url, &["--as-of", &before_attack, "--json", "ls"]);
    assert!(as_of.status.success(), "{}", stderr(&as_of));
    let old: serde_json::Value = serde_json::from_slice(&as_of.stdout).expect("ls JSON");
    let old_ids: HashSet<&str> = old
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for component in second["components"].as_array().expect("components") {
        let id = component["manifest"].as_str().expect("manifest id");
        assert!(
            old_ids.contains(id),
            "{id} not in the repository as of {before_attack}"
        );
    }
    let as_of = repo_cli(
        &server,
        &url,
        &["--as-of", &before_attack, "verify", "--read-data"],
    );
    assert!(as_of.status.success(), "{}", stderr(&as_of));
}

/// Someone with write access replaces and deletes the config and the key objects of an
/// encrypted locked repository: it still opens with its keys, still writes locked objects,
/// and cannot be initialized over.
#[test]
fn replacing_config_and_keys_changes_nothing() {
    let server = S3Server::moto();
    server.create_locked_bucket(LOCKED);
    let dir = aitbc_backup_tests::temp_dir("keys");
    let (old, new) = (dir.path().join("old"), dir.path().join("new"));
    std::fs::write(&old, "first passphrase").expect("write");
    std::fs::write(&new, "second passphrase").expect("write");
    let url = format!("s3://{LOCKED}/enc");
    let with = |pass: &std::path::Path, args: &[&str]| {
        let mut all = vec!["--passphrase-file", pass.to_str().expect("utf-8")];
        all.extend_from_slice(args);
        repo_cli(&server, &url, &all)
    };
    let ok = |out: Output| {
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(with(
        &old,
        &[
            "init",
            "--encrypt",
            "--object-lock",
            "governance",
            "--lock-days",
            "1",
        ],
    ));
    let rotated = ok(with(
        &old,
        &[
            "--json",
            "keys",
            "rotate",
            "--new-passphrase-file",
            new.to_str().expect("utf-8"),
        ],
    ));
    // Every key, tombstone and audit record is locked.
    for prefix in [
        "enc/keyring/keys/",
        "enc/keyring/revoked/",
        "enc/keyring/audit/",
        "enc/keyring/epochs/",
        "enc/keyring/grants/",
    ] {
        let found = keys(&server, prefix);
        assert!(!found.is_empty(), "nothing under {prefix}: {rotated}");
        for key in found {
            let head = server.aws(&["s3api", "head-object", "--bucket", LOCKED, "--key", &key]);
            let head: serde_json::Value = serde_json::from_slice(&head.stdout).expect("head");
            assert_eq!(
                head["ObjectLockMode"], "GOVERNANCE",
                "{key} is not locked: {head:#}"
            );
        }
    }
    // The attacker replaces the active key with junk, then deletes it, and replaces the config
    // with an unlocked, unencrypted one.
    let new_id = rotated
        .split_whitespace()
        .find(|w| w.starts_with('k') && w.trim_end_matches(';').len() == 13)
        .expect("the new key's id")
        .trim_end_matches(';');
    let active = format!("enc/keyring/keys/{new_id}.json");
    assert!(keys(&server, "enc/keyring/keys/").contains(&active));
    let junk = dir.path().join("junk");
    std::fs::write(&junk, "{}").expect("write");
    let unlocked = dir.path().join("unlocked");
    std::fs::write(
        &unlocked,
        r#"{"format": "aitbc-backup/repository", "version": 1, "id": "00", "created": "x",
            "chunker": {"min_size": 524288, "avg_size": 1048576, "max_size": 4194304},
            "encrypted": false}"#,
    )
    .expect("write");
    for (key, body) in [(active.as_str(), &junk), ("enc/config", &unlocked)] {
        let out = server.aws(&[
            "s3api",
            "put-object",
            "--bucket",
            LOCKED,
            "--key",
            key,
            "--body",
            body.to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = server.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        LOCKED,
        "--key",
        &active,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The new key still opens it, and a backup written now is locked and encrypted.
    let data = dir.path().join("data");
    std::fs::write(&data, vec![7u8; 300_000]).expect("write");
    let put = std::process::Command::new(binary("aitbc-backup"))
        .args([
            "repo",
            "--repository",
            &url,
            "--endpoint",
            &server.endpoint(),
            "--path-style",
        ])
        .args([
            "--passphrase-file",
            new.to_str().expect("utf-8"),
            "put",
            "after",
        ])
        .stdin(std::fs::File::open(&data).expect("open"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(server.client_env())
        .output()
        .expect("put");
    let id = String::from_utf8_lossy(&put.stdout).trim().to_owned();
    assert!(put.status.success(), "{}", stderr(&put));
    let manifest = format!("enc/manifests/components/{id}.json");
    let head = server.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        LOCKED,
        "--key",
        &manifest,
    ]);
    let head: serde_json::Value = serde_json::from_slice(&head.stdout).expect("head");
    assert_eq!(head["ObjectLockMode"], "GOVERNANCE", "{head:#}");
    let body = get_bytes(&server, &manifest);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&body).is_err(),
        "the manifest was written unencrypted"
    );
    let verify = with(&new, &["verify", "--read-data"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    // The old key stays revoked; the config deleted outright is not an empty bucket.
    let out = with(&old, &["ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    let out = server.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        LOCKED,
        "--key",
        "enc/config",
    ]);
    assert!(out.status.success());
    let out = with(
        &new,
        &["init", "--object-lock", "governance", "--lock-days", "1"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already holds a repository"),
        "{}",
        stderr(&out)
    );
    ok(with(&new, &["ls"]));
}
