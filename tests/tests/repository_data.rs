//! Backup and restore pipelines on the local backend and s3s-fs: round trips, dedup,
//! corruption, faults, interruption, garbage collection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aitbc_backup_repository::layout;
use aitbc_backup_repository::storage::{Backend, FaultConfig, FaultyStorage, PutMode};
use aitbc_backup_repository::verify::verify;
use aitbc_backup_repository::{
    BackupRequest, ChunkerParams, Progress, RepoError, RepoSettings, Repository, Storage,
    StorageLimits, gc,
};
use aitbc_backup_tests::data::{GeneratedReader, HashingWriter, generate};
use aitbc_backup_tests::repository::{
    KINDS, Kind, TestBackend, backup_bytes, chunk_count, init_repo, restore_bytes,
};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_are_byte_identical() {
    let params = ChunkerParams::default();
    let (min, avg, max) = (
        params.min_size as usize,
        params.avg_size as usize,
        params.max_size as usize,
    );
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let repo = init_repo(backend.storage().await).await;
        for (i, size) in [0, 1, min - 1, min, avg, max, max + 1, 3 * max + 17]
            .into_iter()
            .enumerate()
        {
            let data = generate(size, i as u64);
            let manifest = backup_bytes(&repo, data.clone(), "sizes")
                .await
                .expect("backup");
            assert_eq!(manifest.raw_size, size as u64);
            assert_eq!(
                restore_bytes(&repo, &manifest).await.expect("restore"),
                data,
                "{kind:?} size {size}"
            );
        }

        // 300 MB of mixed random and compressible data, streamed both ways.
        let len = 300_000_000u64;
        let cancel = CancellationToken::new();
        let manifest = aitbc_backup_repository::backup_async(
            &repo,
            GeneratedReader::new(len, 300),
            BackupRequest {
                name: "big".into(),
                stream: "raw".into(),
                ..Default::default()
            },
            Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .expect("backup 300 MB");
        assert!(
            manifest.stats.new_stored_bytes < len * 9 / 10,
            "the compressible third was not compressed: {}",
            manifest.stats.new_stored_bytes
        );
        let mut sink = HashingWriter::default();
        aitbc_backup_repository::restore(
            &repo,
            &manifest,
            &mut sink,
            Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .expect("restore 300 MB");
        assert_eq!(sink.len, len);
        assert_eq!(
            sink.hasher.finalize(),
            GeneratedReader::digest(len, 300),
            "{kind:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_data_costs_nothing_and_changes_cost_about_a_chunk_each() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let repo = init_repo(backend.storage().await).await;
        let data = generate(64 * MIB, 7);
        let first = backup_bytes(&repo, data.clone(), "d").await.expect("first");
        let objects = chunk_count(&repo).await;

        let again = backup_bytes(&repo, data.clone(), "d").await.expect("again");
        assert_eq!(again.stats.new_chunks, 0, "{kind:?}");
        assert_eq!(again.stats.new_stored_bytes, 0, "{kind:?}");
        assert_eq!(chunk_count(&repo).await, objects, "{kind:?}");

        // 1 % of the bytes changed in place, at 8 sites spread over the stream.
        let sites = 8;
        let site_len = data.len() / 100 / sites;
        let mut changed = data.clone();
        for s in 0..sites {
            let at = s * data.len() / sites + 12_345;
            for byte in &mut changed[at..at + site_len] {
                *byte = !*byte;
            }
        }
        let edited = backup_bytes(&repo, changed.clone(), "d")
            .await
            .expect("edited");
        let change = (site_len * sites) as u64;
        eprintln!(
            "{kind:?}: in-place change of {change} bytes at {sites} sites: {} new chunks, {} bytes stored",
            edited.stats.new_chunks, edited.stats.new_stored_bytes
        );
        assert!(
            edited.stats.new_chunks as usize <= 2 * sites,
            "{kind:?}: {:?}",
            edited.stats
        );
        assert!(
            edited.stats.new_stored_bytes <= change + (sites * 2 * MIB) as u64,
            "{kind:?}: {:?}",
            edited.stats
        );
        assert_eq!(
            restore_bytes(&repo, &edited).await.expect("restore edited"),
            changed
        );

        // 1 % appended.
        let mut appended = data.clone();
        appended.extend_from_slice(&generate(data.len() / 100, 8));
        let grown = backup_bytes(&repo, appended.clone(), "d")
            .await
            .expect("appended");
        eprintln!(
            "{kind:?}: {} bytes appended: {} new chunks, {} bytes stored",
            data.len() / 100,
            grown.stats.new_chunks,
            grown.stats.new_stored_bytes
        );
        assert!(grown.stats.new_chunks <= 3, "{kind:?}: {:?}", grown.stats);
        assert!(
            grown.stats.new_stored_bytes <= (data.len() / 100 + 4 * MIB) as u64,
            "{kind:?}: {:?}",
            grown.stats
        );
        assert_eq!(
            restore_bytes(&repo, &grown)
                .await
                .expect("restore appended"),
            appended
        );
        assert_eq!(
            restore_bytes(&repo, &first).await.expect("restore first"),
            data
        );
    }
}

/// Rewrites a stored object through the storage API (works on every backend).
async fn tamper(storage: &Storage, key: &str, f: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let cancel = CancellationToken::new();
    let path = aitbc_backup_repository::path::RemotePath::new(key).expect("key");
    let bytes = storage.get(&path, &cancel).await.expect("get").to_vec();
    storage
        .put(&path, Bytes::from(f(bytes)), PutMode::Overwrite, &cancel)
        .await
        .expect("put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_named_and_never_restored() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let repo = init_repo(backend.storage().await).await;
        let manifest = backup_bytes(&repo, generate(12 * MIB, 11), "c")
            .await
            .expect("backup");
        assert!(manifest.chunks.len() >= 4);
        let cancel = CancellationToken::new();
        let object = |i: usize| layout::chunk(&manifest.chunks[i].id).to_string();
        let (flipped, truncated, deleted) = (object(1), object(2), object(3));

        tamper(repo.storage(), &flipped, |mut b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        })
        .await;
        tamper(repo.storage(), &truncated, |b| b[..b.len() / 2].to_vec()).await;
        repo.storage()
            .delete(
                &aitbc_backup_repository::path::RemotePath::new(deleted.clone()).expect("key"),
                &cancel,
            )
            .await
            .expect("delete");

        let structure = verify(&repo, false, &cancel).await.expect("verify");
        let named: Vec<&str> = structure
            .problems
            .iter()
            .map(|p| p.object.as_str())
            .collect();
        assert!(
            named.contains(&truncated.as_str()) && named.contains(&deleted.as_str()),
            "{kind:?}: {named:?}"
        );
        assert!(
            structure
                .problems
                .iter()
                .all(|p| p.manifests == vec![manifest.id.clone()])
        );

        let full = verify(&repo, true, &cancel)
            .await
            .expect("verify --read-data");
        let named: Vec<&str> = full.problems.iter().map(|p| p.object.as_str()).collect();
        for bad in [&flipped, &truncated, &deleted] {
            assert!(
                named.contains(&bad.as_str()),
                "{kind:?}: {bad} not named in {named:?}"
            );
        }
        assert_eq!(full.problems.len(), 3, "{kind:?}: {:?}", full.problems);

        // Restore fails naming the first bad object, and leaves no file behind.
        let err = restore_bytes(&repo, &manifest)
            .await
            .expect_err("restore of corrupt data");
        assert!(err.to_string().contains(&flipped), "{kind:?}: {err}");
        let out_dir = aitbc_backup_tests::temp_dir("restore");
        let target = out_dir.path().join("restored.bin");
        let err = aitbc_backup_repository::restore_to_file(
            &repo,
            &manifest,
            &target,
            Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .expect_err("restore to file");
        assert!(err.to_string().contains(&flipped), "{err}");
        assert_eq!(
            std::fs::read_dir(out_dir.path()).expect("read dir").count(),
            0,
            "partial file left"
        );

        // A modified manifest is detected too.
        let manifest_key = layout::component_manifest(&manifest.id).to_string();
        tamper(repo.storage(), &manifest_key, |b| {
            String::from_utf8(b)
                .expect("utf-8")
                .replace("\"name\":\"c\"", "\"name\":\"x\"")
                .into_bytes()
        })
        .await;
        let err = repo
            .component(&manifest.id, &cancel)
            .await
            .expect_err("tampered manifest");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        let report = verify(&repo, false, &cancel).await.expect("verify");
        assert!(
            report.problems.iter().any(|p| p.object == manifest_key),
            "{:?}",
            report.problems
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_survive_30_percent_failures() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        init_repo(backend.storage().await).await;
        let limits = StorageLimits {
            request_timeout: Duration::from_secs(1),
            max_attempts: 12,
            backoff: aitbc_backup_backoff::Backoff::new(
                Duration::from_millis(5),
                Duration::from_millis(100),
            ),
            ..StorageLimits::default()
        };
        let faulty = Storage::new(
            Backend::Faulty(Box::new(FaultyStorage::new(
                backend.backend().await,
                FaultConfig {
                    failure_rate: 0.3,
                    hang: Duration::from_secs(2),
                    permanent: None,
                    ..FaultConfig::default()
                },
            ))),
            limits,
        );
        let cancel = CancellationToken::new();
        let repo = Repository::open(faulty, None, &cancel)
            .await
            .expect("open through faults");
        let data = generate(24 * MIB, 21);
        let manifest = backup_bytes(&repo, data.clone(), "f")
            .await
            .expect("backup through faults");
        assert_eq!(
            restore_bytes(&repo, &manifest)
                .await
                .expect("restore through faults"),
            data,
            "{kind:?}"
        );
        // The repository is clean when read without faults.
        let clean = Repository::open(backend.storage().await, None, &cancel)
            .await
            .expect("open");
        assert!(
            verify(&clean, true, &cancel).await.expect("verify").ok(),
            "{kind:?}"
        );
        assert_eq!(clean.component_ids(&cancel).await.expect("ids").len(), 1);
    }
}

/// A reader that yields `good` bytes of a stream, then fails like a dying pg_dump.
fn failing_reader(
    data: Vec<u8>,
    good: usize,
) -> impl tokio::io::AsyncRead + Unpin + Send + 'static {
    use tokio::io::AsyncReadExt;
    std::io::Cursor::new(data[..good].to_vec()).chain(FailingTail)
}

struct FailingTail;

impl tokio::io::AsyncRead for FailingTail {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "source died",
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_backups_leave_no_manifest_and_reruns_resume() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let repo = init_repo(backend.storage().await).await;
        let cancel = CancellationToken::new();
        let data = generate(32 * MIB, 31);
        let request = BackupRequest {
            name: "i".into(),
            stream: "raw".into(),
            ..Default::default()
        };
        let err = aitbc_backup_repository::backup_async(
            &repo,
            failing_reader(data.clone(), 20 * MIB),
            request.clone(),
            Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .expect_err("interrupted backup");
        assert!(err.to_string().contains("source died"), "{err}");
        assert!(
            repo.component_ids(&cancel).await.expect("ids").is_empty(),
            "{kind:?}: a manifest was written"
        );
        let orphans = chunk_count(&repo).await;
        assert!(orphans > 0);

        // The rerun uploads only what the first attempt had not stored.
        let rerun = backup_bytes(&repo, data.clone(), "i").await.expect("rerun");
        assert!(
            rerun.stats.new_chunks as usize <= rerun.chunks.len() - (orphans - 2),
            "{kind:?}: rerun uploaded {} of {} chunks though {orphans} were stored",
            rerun.stats.new_chunks,
            rerun.chunks.len()
        );
        assert_eq!(restore_bytes(&repo, &rerun).await.expect("restore"), data);

        // Orphans of another interrupted backup: GC keeps them within the grace period and
        // removes them, and nothing else, after it.
        let other = generate(12 * MIB, 32);
        aitbc_backup_repository::backup_async(
            &repo,
            failing_reader(other, 10 * MIB),
            request,
            Arc::new(Progress::default()),
            &cancel,
        )
        .await
        .expect_err("second interrupted backup");
        let before = chunk_count(&repo).await;
        let grace = Duration::from_secs(2);
        let dry = gc::gc(&repo, grace, true, &cancel)
            .await
            .expect("gc dry run");
        assert!(
            dry.unreferenced > 0 && dry.deleted_chunks == 0,
            "{kind:?}: {dry:?}"
        );
        let first = gc::gc(&repo, grace, false, &cancel).await.expect("gc");
        assert_eq!(
            first.deleted_chunks, 0,
            "{kind:?}: deleted within the grace period: {first:?}"
        );
        assert_eq!(chunk_count(&repo).await, before);
        tokio::time::sleep(grace + Duration::from_millis(1200)).await;
        let second = gc::gc(&repo, grace, false, &cancel)
            .await
            .expect("gc after grace");
        assert_eq!(
            second.deleted_chunks, first.unreferenced,
            "{kind:?}: {second:?}"
        );
        assert_eq!(chunk_count(&repo).await, second.referenced, "{kind:?}");
        assert!(
            verify(&repo, true, &cancel).await.expect("verify").ok(),
            "{kind:?}"
        );
        assert_eq!(
            restore_bytes(&repo, &rerun)
                .await
                .expect("restore after gc"),
            data
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_during_a_backup_never_breaks_it() {
    let backend = TestBackend::start(Kind::Local);
    let repo = init_repo(backend.storage().await)
        .await
        .with_settings(RepoSettings {
            limit_upload_bytes_per_sec: Some(8 * MIB as u64),
            ..RepoSettings::default()
        });
    let cancel = CancellationToken::new();
    let data = generate(24 * MIB, 41);

    // A realistic grace period: concurrent GC runs delete nothing the backup uses.
    let backup = tokio::spawn({
        let repo = repo.clone();
        let data = data.clone();
        async move { backup_bytes(&repo, data, "g").await }
    });
    let mut runs = 0;
    while !backup.is_finished() {
        let report = gc::gc(&repo, Duration::from_secs(3600), false, &cancel)
            .await
            .expect("gc");
        assert_eq!(report.deleted_chunks, 0);
        runs += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        runs >= 3,
        "the backup finished before GC could overlap it ({runs} runs)"
    );
    let manifest = backup.await.expect("join").expect("backup");
    assert!(verify(&repo, true, &cancel).await.expect("verify").ok());
    assert_eq!(
        restore_bytes(&repo, &manifest).await.expect("restore"),
        data
    );

    // A zero grace period collects in-flight chunks: the backup must then fail, not commit a
    // manifest with dangling references.
    let other = generate(24 * MIB, 42);
    let backup = tokio::spawn({
        let repo = repo.clone();
        async move { backup_bytes(&repo, other, "g0").await }
    });
    while !backup.is_finished() {
        gc::gc(&repo, Duration::ZERO, false, &cancel)
            .await
            .expect("gc");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match backup.await.expect("join") {
        Ok(_) => {}
        Err(RepoError::ChunkVanished(object)) => {
            eprintln!("backup refused to commit: {object} vanished")
        }
        Err(other) => panic!("unexpected error: {other}"),
    }
    let report = verify(&repo, true, &cancel).await.expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_created_once() {
    let backend = TestBackend::start(Kind::Local);
    let repo = init_repo(backend.storage().await).await;
    let cancel = CancellationToken::new();
    let manifest = backup_bytes(&repo, generate(MIB, 51), "m")
        .await
        .expect("backup");
    // The same bytes again (a retried commit) are accepted; different content is refused.
    repo.commit_component(&manifest, &cancel)
        .await
        .expect("idempotent recommit");
    let mut other = manifest.clone();
    other.name = "other".into();
    let err = repo
        .commit_component(&other, &cancel)
        .await
        .expect_err("second commit");
    assert!(
        matches!(err, RepoError::ManifestExists(ref id) if *id == manifest.id),
        "{err}"
    );
    assert_eq!(
        repo.component(&manifest.id, &cancel)
            .await
            .expect("read")
            .name,
        "m"
    );
    let err = Repository::init(
        backend.storage().await,
        ChunkerParams::default(),
        None,
        &cancel,
    )
    .await
    .err()
    .expect("second init");
    assert!(
        err.to_string().contains("already holds a repository"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_limit_holds_the_rate() {
    let backend = TestBackend::start(Kind::Local);
    let limit = 4 * MIB as u64;
    let repo = init_repo(backend.storage().await)
        .await
        .with_settings(RepoSettings {
            limit_upload_bytes_per_sec: Some(limit),
            ..RepoSettings::default()
        });
    // Random data: stored bytes equal raw bytes.
    let data = (0..12)
        .flat_map(|i| generate(MIB, 60 + i).into_iter().take(MIB))
        .collect::<Vec<u8>>();
    let started = Instant::now();
    let manifest = backup_bytes(&repo, data, "rate").await.expect("backup");
    let elapsed = started.elapsed().as_secs_f64();
    let rate = manifest.stats.new_stored_bytes as f64 / elapsed;
    eprintln!(
        "limited upload: {:.2} MiB/s for a {:.0} MiB/s limit",
        rate / MIB as f64,
        limit as f64 / MIB as f64
    );
    // The limiter lets the first chunk start at once; everything after waits for its slot.
    let first = manifest.chunks[0].stored_len as f64;
    assert!(
        elapsed >= (manifest.stats.new_stored_bytes as f64 - first) / limit as f64 * 0.95,
        "uploaded {} bytes in {elapsed:.2}s under a {limit} B/s limit",
        manifest.stats.new_stored_bytes
    );
}
