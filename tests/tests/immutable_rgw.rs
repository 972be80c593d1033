//! Immutable repositories on Ceph radosgw, which enforces Object Lock as AWS does (moto lets
//! anyone shorten a COMPLIANCE lock): the product's lock extension and GC work against it, and
//! an attacker holding the coordinator's credentials can neither shorten, weaken nor delete a
//! locked version. Needs Ceph (`scripts/setup.sh`); see `scripts/rgw.sh`.

use std::process::Output;
use std::time::{Duration, SystemTime};

use aitbc_backup_repository::layout;
use aitbc_backup_tests::fleet::binary;
use aitbc_backup_tests::process::output_with_stdin;
use aitbc_backup_tests::s3::S3Server;
use rand::Rng;

/// `aitbc-backup repo --repository URL ... ARGS` against `server`, `stdin` fed to it.
fn repo_cli(server: &S3Server, url: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut command = std::process::Command::new(binary("aitbc-backup"));
    command
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
        .envs(server.client_env());
    output_with_stdin(&mut command, stdin)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI and returns its JSON output, failing the test if it fails.
fn repo_json(server: &S3Server, url: &str, args: &[&str]) -> serde_json::Value {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    let out = repo_cli(server, url, &with_json, None);
    assert!(out.status.success(), "repo {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("repo {args:?} JSON: {e}"))
}

/// Backs up `data` as a stream named `name`; returns the manifest id.
fn put(server: &S3Server, url: &str, name: &str, data: &[u8]) -> String {
    let out = repo_cli(server, url, &["put", name], Some(data));
    assert!(out.status.success(), "put {name}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    (0..len).map(|_| rng.random()).collect()
}

/// awscli `s3api ARGS`, which the server must refuse with S3 error `code`.
#[track_caller]
fn assert_refused(server: &S3Server, args: &[&str], code: &str) {
    let out = server.aws(&[&["s3api"], args].concat());
    // awscli (v1, from pip) exits with 255 on an error answer from the server.
    assert_eq!(
        out.status.code(),
        Some(255),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    // awscli: "An error occurred (AccessDenied) when calling the ... operation: ..."
    assert!(
        stderr(&out).contains(&format!("({code})")),
        "{args:?}: expected {code}, got: {}",
        stderr(&out)
    );
}

/// The key and version id of the first version listed under `prefix`.
fn a_version(server: &S3Server, prefix: &str) -> (String, String) {
    let out = server.aws(&[
        "s3api",
        "list-object-versions",
        "--bucket",
        &server.bucket,
        "--prefix",
        prefix,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).expect("versions JSON");
    let version = &listing["Versions"][0];
    (
        version["Key"].as_str().expect("key").to_owned(),
        version["VersionId"]
            .as_str()
            .expect("version id")
            .to_owned(),
    )
}

/// The first version listed under `prefix` and its lock: (key, version id, mode,
/// retain-until).
fn a_locked_version(server: &S3Server, prefix: &str) -> (String, String, String, String) {
    let (key, id) = a_version(server, prefix);
    let (mode, until) = retention(server, &key, &id);
    (key, id, mode, until)
}

/// A version's lock as the bucket reports it: (mode, retain-until).
fn retention(server: &S3Server, key: &str, version: &str) -> (String, String) {
    let out = server.aws(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        &server.bucket,
        "--key",
        key,
        &format!("--version-id={}", version),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("retention JSON");
    let retention = &value["Retention"];
    (
        retention["Mode"].as_str().expect("mode").to_owned(),
        retention["RetainUntilDate"]
            .as_str()
            .expect("date")
            .to_owned(),
    )
}

/// An RFC 3339 date `ahead` from now.
fn from_now(ahead: Duration) -> String {
    chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + ahead)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[test]
fn compliance_locks_hold_against_the_coordinators_credentials() {
    let started = std::time::Instant::now();
    let server = S3Server::rgw();
    eprintln!("radosgw ready in {:.1?}", started.elapsed());
    let url = format!("s3://{}/c", server.bucket);
    // A margin 2 s short of the period: a version locked more than 2 s ago is extended, so
    // the extension below really sends PutObjectRetention.
    let init_args = [
        "init",
        "--object-lock",
        "compliance",
        "--lock-days",
        "1",
        "--lock-margin",
        "86398s",
    ];
    let init = repo_cli(&server, &url, &init_args, None);
    assert!(init.status.success(), "{}", stderr(&init));
    // radosgw ignores If-None-Match on a versioned bucket: a second init must still be refused,
    // not write a new config over the first.
    let again = repo_cli(&server, &url, &init_args, None);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("already"), "{}", stderr(&again));
    let kept_data = random_bytes(3 << 20);
    let kept = put(&server, &url, "kept", &kept_data);
    let gone = put(&server, &url, "gone", &random_bytes(2 << 20));
    std::thread::sleep(Duration::from_secs(3));
    let locks = repo_json(&server, &url, &["extend-locks"]);
    assert!(
        locks["extended"].as_u64() > Some(0) && locks["kept_versions"] == locks["extended"],
        "{locks:#}"
    );

    // The forgotten backup's chunks are unreferenced but locked: GC skips and reports them.
    let forget = repo_cli(&server, &url, &["forget", &gone], None);
    assert!(forget.status.success(), "{}", stderr(&forget));
    let gc = repo_json(&server, &url, &["gc", "--grace", "0s"]);
    assert!(gc["unreferenced"].as_u64() > Some(0), "{gc:#}");
    assert_eq!(gc["locked"], gc["unreferenced"], "{gc:#}");
    assert_eq!(gc["deleted_chunks"], 0, "{gc:#}");
    assert!(gc["locks"]["kept_versions"].as_u64() > Some(0), "{gc:#}");

    // The attacker holds the S3 user's keys, the bucket owner's: more than the coordinator's
    // (put, delete, extend locks), including s3:BypassGovernanceRetention. The target is a
    // chunk the kept backup needs.
    let show = repo_json(&server, &url, &["show", &kept]);
    let chunk = show["chunks"][0]["id"].as_str().expect("a chunk id");
    let (key, version, mode, until) =
        a_locked_version(&server, &format!("c/{}", layout::chunk(chunk)));
    assert_eq!(mode, "COMPLIANCE");
    let bucket = server.bucket.as_str();
    let target = [
        "--bucket",
        bucket,
        "--key",
        &key,
        &format!("--version-id={version}"),
    ];
    let shorter = format!(
        "Mode=COMPLIANCE,RetainUntilDate={}",
        from_now(Duration::from_secs(60))
    );
    let weaker = format!(
        "Mode=GOVERNANCE,RetainUntilDate={}",
        from_now(Duration::from_secs(3 * 86400))
    );
    for retention in [&shorter, &weaker] {
        for bypass in [false, true] {
            let mut args = vec!["put-object-retention"];
            args.extend(target);
            args.extend(["--retention", retention.as_str()]);
            if bypass {
                args.push("--bypass-governance-retention");
            }
            assert_refused(&server, &args, "AccessDenied");
        }
    }
    for bypass in [false, true] {
        let mut args = vec!["delete-object"];
        args.extend(target);
        if bypass {
            args.push("--bypass-governance-retention");
        }
        assert_refused(&server, &args, "AccessDenied");
    }
    assert_eq!(
        retention(&server, &key, &version),
        (mode, until),
        "the lock changed"
    );

    let verified = repo_cli(&server, &url, &["verify", "--read-data"], None);
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        stderr(&verified)
    );
    let cat = repo_cli(&server, &url, &["cat", &kept], None);
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert!(
        cat.stdout == kept_data,
        "the kept backup came back different"
    );
}

#[test]
fn governance_locks_are_not_shortened_without_bypass() {
    let server = S3Server::rgw();
    let url = format!("s3://{}/g", server.bucket);
    let init = repo_cli(
        &server,
        &url,
        &["init", "--object-lock", "governance", "--lock-days", "1"],
        None,
    );
    assert!(init.status.success(), "{}", stderr(&init));
    put(&server, &url, "data", &random_bytes(1 << 20));
    let (key, version, mode, until) = a_locked_version(&server, "g/chunks/");
    assert_eq!(mode, "GOVERNANCE");
    let shorter = format!(
        "Mode=GOVERNANCE,RetainUntilDate={}",
        from_now(Duration::from_secs(60))
    );
    assert_refused(
        &server,
        &[
            "put-object-retention",
            "--bucket",
            &server.bucket,
            "--key",
            &key,
            &format!("--version-id={}", version),
            "--retention",
            &shorter,
        ],
        "AccessDenied",
    );
    assert_refused(
        &server,
        &[
            "delete-object",
            "--bucket",
            &server.bucket,
            "--key",
            &key,
            &format!("--version-id={}", version),
        ],
        "AccessDenied",
    );
    assert_eq!(retention(&server, &key, &version), (mode, until));
    // With the bypass the bucket owner may shorten it: GOVERNANCE guards against mistakes and
    // credentials without s3:BypassGovernanceRetention, COMPLIANCE against everyone.
    let out = server.aws(&[
        "s3api",
        "put-object-retention",
        "--bucket",
        &server.bucket,
        "--key",
        &key,
        &format!("--version-id={}", version),
        "--retention",
        &shorter,
        "--bypass-governance-retention",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// radosgw ignores the lock headers of CreateMultipartUpload: a large locked object must still
/// be stored locked (the S3 backend sends it as one PutObject).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_locked_objects_are_stored_locked() {
    use aitbc_backup_repository::path::RemotePath;
    use aitbc_backup_repository::storage::{LockMode, PutMode, Retention, S3Settings, S3Storage};
    let server = S3Server::rgw();
    let mut settings = S3Settings::new(&server.bucket, "large");
    settings.endpoint = Some(server.endpoint());
    settings.path_style = true;
    settings.region = Some(aitbc_backup_tests::s3::REGION.to_owned());
    settings.static_credentials = Some((server.access_key.clone(), server.secret_key.clone()));
    // Small enough that a 12 MiB object would go up in three parts.
    settings.multipart_threshold = 5 << 20;
    settings.part_size = 5 << 20;
    let storage = S3Storage::new(settings).await;
    let path = RemotePath::new("manifests/components/large.json").expect("path");
    let retention = Retention {
        mode: LockMode::Compliance,
        until: SystemTime::now() + Duration::from_secs(3600),
    };
    let body = bytes::Bytes::from(random_bytes(12 << 20));
    storage
        .put(&path, body.clone(), PutMode::Create, Some(retention))
        .await
        .expect("put");
    assert!(storage.get(&path).await.expect("get") == body);
    let (key, version) = a_version(&server, "large/");
    let out = server.aws(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        &server.bucket,
        "--key",
        &key,
        &format!("--version-id={}", version),
    ]);
    assert!(out.status.success(), "stored unlocked: {}", stderr(&out));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("retention JSON");
    assert_eq!(value["Retention"]["Mode"], "COMPLIANCE", "{value:#}");
}
