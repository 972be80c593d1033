//! The storage conformance suite: the same cases against the local backend and s3s-fs; the SSE
//! cases against moto (which echoes server-side encryption on HEAD).

use std::time::{Duration, Instant};

use aitbc_backup_repository::path::RemotePath;
use aitbc_backup_repository::storage::{
    Backend, FaultConfig, PutMode, S3Storage, ServerSideEncryption,
};
use aitbc_backup_repository::{Storage, StorageError};
use aitbc_backup_tests::repository::{KINDS, TestBackend, test_limits};
use aitbc_backup_tests::s3::S3Server;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

fn p(key: &str) -> RemotePath {
    RemotePath::new(key).expect("valid key")
}

async fn conformance(storage: &Storage, what: &str) {
    let cancel = CancellationToken::new();
    // Missing objects.
    assert!(
        matches!(
            storage.get(&p("a/missing"), &cancel).await,
            Err(StorageError::NotFound(_))
        ),
        "{what}"
    );
    assert!(
        matches!(
            storage.head(&p("a/missing"), &cancel).await,
            Err(StorageError::NotFound(_))
        ),
        "{what}"
    );
    assert!(
        storage
            .list("a/", &cancel)
            .await
            .expect("list empty")
            .is_empty(),
        "{what}"
    );

    // Put, get, head, overwrite.
    storage
        .put(
            &p("a/one"),
            Bytes::from_static(b"first"),
            PutMode::Overwrite,
            &cancel,
        )
        .await
        .expect("put");
    assert_eq!(
        storage.get(&p("a/one"), &cancel).await.expect("get"),
        &b"first"[..],
        "{what}"
    );
    assert_eq!(
        storage.head(&p("a/one"), &cancel).await.expect("head").size,
        5,
        "{what}"
    );
    storage
        .put(
            &p("a/one"),
            Bytes::from_static(b"second"),
            PutMode::Overwrite,
            &cancel,
        )
        .await
        .expect("overwrite");
    assert_eq!(
        storage.get(&p("a/one"), &cancel).await.expect("get"),
        &b"second"[..],
        "{what}"
    );

    // Create-only: refused when present, content untouched.
    let err = storage
        .put(
            &p("a/one"),
            Bytes::from_static(b"third"),
            PutMode::Create,
            &cancel,
        )
        .await
        .expect_err("create over existing");
    assert!(
        matches!(err, StorageError::AlreadyExists(_)),
        "{what}: {err}"
    );
    assert_eq!(
        storage.get(&p("a/one"), &cancel).await.expect("get"),
        &b"second"[..],
        "{what}"
    );
    storage
        .put(&p("a/two"), Bytes::new(), PutMode::Create, &cancel)
        .await
        .expect("create empty");
    assert_eq!(
        storage
            .get(&p("a/two"), &cancel)
            .await
            .expect("get empty")
            .len(),
        0,
        "{what}"
    );

    // Listing by prefix, sorted, with sizes.
    storage
        .put(
            &p("b/x/deep"),
            Bytes::from_static(b"1234"),
            PutMode::Create,
            &cancel,
        )
        .await
        .expect("put deep");
    let listed: Vec<(String, u64)> = storage
        .list("a/", &cancel)
        .await
        .expect("list")
        .into_iter()
        .map(|o| (o.path.to_string(), o.size))
        .collect();
    assert_eq!(
        listed,
        vec![("a/one".into(), 6), ("a/two".into(), 0)],
        "{what}"
    );
    let all = storage.list("", &cancel).await.expect("list all");
    assert_eq!(all.len(), 3, "{what}: {all:?}");
    assert!(
        all.iter()
            .all(|o| o.modified > std::time::SystemTime::UNIX_EPOCH),
        "{what}"
    );

    // Delete (idempotent).
    storage.delete(&p("a/one"), &cancel).await.expect("delete");
    storage
        .delete(&p("a/one"), &cancel)
        .await
        .expect("delete again");
    assert!(
        matches!(
            storage.get(&p("a/one"), &cancel).await,
            Err(StorageError::NotFound(_))
        ),
        "{what}"
    );

    // A cancelled call returns promptly.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    assert!(
        matches!(
            storage.get(&p("b/x/deep"), &cancelled).await,
            Err(StorageError::Cancelled)
        ),
        "{what}"
    );

    // A large object round trips (multipart on S3 when over the threshold).
    let big = Bytes::from(aitbc_backup_tests::data::generate(13 << 20, 4));
    storage
        .put(&p("big/object"), big.clone(), PutMode::Create, &cancel)
        .await
        .expect("put big");
    assert_eq!(
        storage
            .get(&p("big/object"), &cancel)
            .await
            .expect("get big"),
        big,
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_every_backend() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        conformance(&backend.storage().await, &format!("{kind:?}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_uploads_and_conditional_create() {
    let backend = TestBackend::start(aitbc_backup_tests::repository::Kind::S3sFs);
    let server = backend.server.as_ref().expect("server");
    let mut settings = backend.s3_settings(server);
    settings.multipart_threshold = 6 << 20;
    settings.part_size = 5 << 20;
    let storage = Storage::new(Backend::S3(S3Storage::new(settings).await), test_limits());
    let cancel = CancellationToken::new();
    let body = Bytes::from(aitbc_backup_tests::data::generate(12 << 20, 5));
    storage
        .put(&p("mp/one"), body.clone(), PutMode::Create, &cancel)
        .await
        .expect("multipart put");
    assert_eq!(storage.get(&p("mp/one"), &cancel).await.expect("get"), body);
    let err = storage
        .put(&p("mp/one"), body, PutMode::Create, &cancel)
        .await
        .expect_err("multipart create over existing");
    assert!(matches!(err, StorageError::AlreadyExists(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_fail_fast_with_a_clear_message() {
    // Real: a bucket that does not exist, and wrong credentials.
    let server = S3Server::s3s_fs();
    let backend = TestBackend::start(aitbc_backup_tests::repository::Kind::Local);
    let cancel = CancellationToken::new();
    let mut settings = backend.s3_settings(&server);
    settings.bucket = "no-such-bucket".into();
    let storage = Storage::new(Backend::S3(S3Storage::new(settings).await), test_limits());
    let started = Instant::now();
    let err = storage.list("", &cancel).await.expect_err("missing bucket");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "retried a permanent error: {err}"
    );
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");

    let mut settings = backend.s3_settings(&server);
    settings.static_credentials = Some((server.access_key.clone(), "wrong".into()));
    let storage = Storage::new(Backend::S3(S3Storage::new(settings).await), test_limits());
    let started = Instant::now();
    let err = storage
        .put(
            &p("x"),
            Bytes::from_static(b"x"),
            PutMode::Overwrite,
            &cancel,
        )
        .await
        .expect_err("bad signature");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "retried a permanent error: {err}"
    );
    assert!(err.to_string().contains("403"), "{err}");

    // Injected: every request denied.
    let faulty = backend
        .faulty(FaultConfig {
            failure_rate: 0.0,
            hang: Duration::ZERO,
            permanent: Some("403 AccessDenied".into()),
            ..FaultConfig::default()
        })
        .await;
    let err = faulty.get(&p("x"), &cancel).await.expect_err("denied");
    assert!(
        err.is_permanent() && err.to_string().contains("AccessDenied"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_encryption_is_passed_through() {
    let moto = S3Server::moto();
    let backend = TestBackend::start(aitbc_backup_tests::repository::Kind::Local);
    let cancel = CancellationToken::new();
    for (sse, expected) in [
        (ServerSideEncryption::Aes256, "AES256"),
        (ServerSideEncryption::Kms { key_id: None }, "aws:kms"),
    ] {
        let mut settings = backend.s3_settings(&moto);
        settings.sse = Some(sse);
        let storage = Storage::new(Backend::S3(S3Storage::new(settings).await), test_limits());
        let key = p(&format!("sse/{expected}").replace(':', "-"));
        storage
            .put(
                &key,
                Bytes::from_static(b"secret"),
                PutMode::Create,
                &cancel,
            )
            .await
            .expect("put with SSE");
        let head = storage.head(&key, &cancel).await.expect("head");
        assert_eq!(head.server_side_encryption.as_deref(), Some(expected));
    }
    // Without SSE configured nothing is requested.
    let storage = Storage::new(
        Backend::S3(S3Storage::new(backend.s3_settings(&moto)).await),
        test_limits(),
    );
    storage
        .put(
            &p("plain"),
            Bytes::from_static(b"x"),
            PutMode::Create,
            &cancel,
        )
        .await
        .expect("put");
    let head = storage.head(&p("plain"), &cancel).await.expect("head");
    assert_ne!(head.server_side_encryption.as_deref(), Some("aws:kms"));
}
