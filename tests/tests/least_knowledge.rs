//! Sealed repositories: writers and the coordinator read no data, a revoked key opens nothing
//! written after its revocation, chunk boundaries are keyed per repository, and version 1
//! repositories (the checked-in fixture) stay readable.

use std::path::Path;

use aitbc_backup_repository::keys::{self, Issue, KeySecret};
use aitbc_backup_repository::repo::Opener;
use aitbc_backup_repository::sealed::credential::Credential;
use aitbc_backup_repository::{ChunkerParams, RepoError, Repository, Storage, layout, verify};
use aitbc_backup_tests::repository::{KINDS, Kind, TestBackend, backup_bytes, restore_bytes};
use tokio_util::sync::CancellationToken;

fn passphrase(p: &str) -> KeySecret {
    KeySecret::Passphrase(p.to_owned())
}

fn small_chunks() -> ChunkerParams {
    ChunkerParams {
        min_size: 16 << 10,
        avg_size: 64 << 10,
        max_size: 256 << 10,
    }
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

async fn open_with(storage: Storage, credential: &Credential) -> Result<Repository, RepoError> {
    Repository::open_as(
        storage,
        Some(Opener::Credential(credential)),
        &CancellationToken::new(),
    )
    .await
}

fn is_no_key<T: std::fmt::Debug>(result: Result<T, RepoError>) -> String {
    match result {
        Err(RepoError::NoKey(message)) => message,
        other => panic!("expected a missing-key refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_and_the_coordinator_read_no_data() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let cancel = CancellationToken::new();
        let operator = passphrase("operator secret");
        let repo = Repository::init(
            backend.storage().await,
            small_chunks(),
            Some(&operator),
            &cancel,
        )
        .await
        .expect("init");
        let storage = repo.storage().clone();
        let issue = |what| keys::issue(&storage, &operator, what, &cancel);
        let (ledger_cred, _) = issue(Issue::Writer("ledger")).await.expect("ledger writer");
        let (redis_cred, _) = issue(Issue::Writer("redis")).await.expect("redis writer");
        let (coord_cred, coord_id) = issue(Issue::Coordinator).await.expect("coordinator");
        assert!(coord_id.is_some());
        // Credentials travel as text.
        let ledger_cred = Credential::parse(&ledger_cred.encode()).expect("parse");

        let ledger_data = noise(900_000, 1);
        let redis_data = noise(300_000, 2);
        let ledger_writer = open_with(storage.clone(), &ledger_cred)
            .await
            .expect("open as ledger writer")
            .for_component("ledger")
            .expect("its own component");
        let redis_writer = open_with(storage.clone(), &redis_cred)
            .await
            .expect("open as redis writer")
            .for_component("redis")
            .expect("its own component");
        let ledger = backup_bytes(&ledger_writer, ledger_data.clone(), "ledger")
            .await
            .expect("ledger backup");
        let redis = backup_bytes(&redis_writer, redis_data.clone(), "redis")
            .await
            .expect("redis backup");
        assert_eq!(ledger.keyed_by, "ledger");

        // The Redis agent's credential: no manifest, no chunk, neither the ledger's nor its own.
        assert!(!redis_writer.reads_data());
        for id in [&ledger.id, &redis.id] {
            is_no_key(redis_writer.component(id, &cancel).await);
        }
        let message = is_no_key(restore_bytes(&redis_writer, &ledger).await);
        assert!(message.contains("ledger"), "{message}");
        is_no_key(restore_bytes(&redis_writer, &redis).await);
        // ... and it cannot pose as the ledger's writer.
        let err = redis_writer
            .clone()
            .for_component("ledger")
            .err()
            .expect("another component refused");
        assert!(err.to_string().contains("`redis`"), "{err}");

        // The coordinator's credential: manifests yes, data no, and it writes nothing.
        let coordinator = open_with(storage.clone(), &coord_cred).await.expect("open");
        let listed = coordinator.components(&cancel).await.expect("manifests");
        assert_eq!(listed.len(), 2);
        is_no_key(restore_bytes(&coordinator, &ledger).await);
        let structure = verify::verify(&coordinator, false, &cancel)
            .await
            .expect("verify");
        assert!(structure.ok(), "{:?}", structure.problems);
        let message = is_no_key(verify::verify(&coordinator, true, &cancel).await);
        assert!(message.contains("operator's key"), "{message}");
        assert!(coordinator.clone().for_component("postgres").is_err());
        is_no_key(backup_bytes(&coordinator, noise(1000, 9), "forged").await);

        // The operator's key reads everything, also through a writer's handle (a restore).
        let restoring = redis_writer
            .with_key(&operator, &cancel)
            .await
            .expect("key");
        assert_eq!(
            restore_bytes(&restoring, &ledger).await.expect("ledger"),
            ledger_data
        );
        assert_eq!(
            restore_bytes(&restoring, &redis).await.expect("redis"),
            redis_data
        );
        let full = Repository::open(storage.clone(), Some(&operator), &cancel)
            .await
            .expect("open as operator");
        let report = verify::verify(&full, true, &cancel).await.expect("verify");
        assert!(
            report.ok() && report.chunks_read > 0,
            "{:?}",
            report.problems
        );

        // A config replaced by one that says "unencrypted" does not make writers write
        // plaintext.
        if kind == Kind::Local {
            let config = storage
                .get(&layout::config(), &cancel)
                .await
                .expect("config");
            let mut plain: serde_json::Value = serde_json::from_slice(&config).expect("json");
            plain["encrypted"] = false.into();
            plain["version"] = 1.into();
            plain.as_object_mut().expect("object").remove("root_public");
            let replace = |body: Vec<u8>| {
                let storage = storage.clone();
                async move {
                    storage
                        .put(
                            &layout::config(),
                            bytes::Bytes::from(body),
                            aitbc_backup_repository::storage::PutMode::Overwrite,
                            &CancellationToken::new(),
                        )
                        .await
                        .expect("replace config")
                }
            };
            replace(serde_json::to_vec(&plain).expect("json")).await;
            let err = open_with(storage.clone(), &ledger_cred)
                .await
                .err()
                .expect("refused");
            assert!(err.to_string().contains("not encrypted"), "{err}");
            // ... nor the operator's key, nor no key at all.
            for opener in [Some(&operator), None] {
                let err = Repository::open(storage.clone(), opener, &cancel)
                    .await
                    .err()
                    .expect("refused");
                assert!(err.to_string().contains("holds keys"), "{err}");
            }
            replace(config.to_vec()).await;
        }
        // A credential of another repository is refused by name.
        if kind == Kind::Local {
            let other = TestBackend::start(kind);
            Repository::init(
                other.storage().await,
                small_chunks(),
                Some(&operator),
                &cancel,
            )
            .await
            .expect("init other");
            let err = open_with(other.storage().await, &ledger_cred)
                .await
                .err()
                .expect("foreign credential");
            assert!(err.to_string().contains("issued for repository"), "{err}");
        }
    }
}

/// The epoch objects' numbers, read from sealed chunk headers (`aitbcS1\n` + epoch).
async fn chunk_epochs(storage: &Storage) -> std::collections::BTreeSet<u32> {
    let cancel = CancellationToken::new();
    let mut epochs = std::collections::BTreeSet::new();
    for object in storage.list(layout::CHUNKS, &cancel).await.expect("list") {
        let bytes = storage.get(&object.path, &cancel).await.expect("get");
        assert_eq!(&bytes[..8], b"aitbcS1\n", "{}", object.path);
        epochs.insert(u32::from_be_bytes(bytes[8..12].try_into().expect("4")));
    }
    epochs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_opens_nothing_written_after_it() {
    let backend = TestBackend::start(Kind::Local);
    let cancel = CancellationToken::new();
    let (old, new) = (
        passphrase("leaving operator"),
        passphrase("staying operator"),
    );
    let repo = Repository::init(backend.storage().await, small_chunks(), Some(&old), &cancel)
        .await
        .expect("init");
    let storage = repo.storage().clone();
    let new_id = keys::add_key(&storage, &old, &new, &cancel)
        .await
        .expect("add");
    let (writer_cred, _) = keys::issue(&storage, &new, Issue::Writer("ledger"), &cancel)
        .await
        .expect("writer");
    let writer = || async {
        open_with(storage.clone(), &writer_cred)
            .await
            .expect("writer opens")
            .for_component("ledger")
            .expect("ledger")
    };
    let before = noise(200_000, 3);
    let first = backup_bytes(&writer().await, before.clone(), "ledger")
        .await
        .expect("backup 1");
    assert_eq!(chunk_epochs(&storage).await, [1].into());

    Repository::open(storage.clone(), Some(&old), &cancel)
        .await
        .expect("the old key opens before its revocation");
    let listed = keys::list_keys(&storage, &cancel).await.expect("list");
    let old_key = listed
        .iter()
        .find(|k| k.id != new_id)
        .expect("old key")
        .id
        .clone();
    keys::revoke_key(&storage, &new, &old_key, &cancel)
        .await
        .expect("revoke");

    // Data written after the revocation is sealed to epoch 2, which the old key never got.
    let after = noise(200_000, 4);
    let second = backup_bytes(&writer().await, after.clone(), "ledger")
        .await
        .expect("backup 2");
    assert_eq!(chunk_epochs(&storage).await, [1, 2].into());
    // The newest epoch's record deleted (no Object Lock): a writer in this process, which saw
    // epoch 2, refuses to fall back to epoch 1.
    let epoch2 = storage
        .get(&layout::epoch(2), &cancel)
        .await
        .expect("epoch 2");
    storage
        .delete(&layout::epoch(2), &cancel)
        .await
        .expect("delete");
    let err = open_with(storage.clone(), &writer_cred)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("record is gone"), "{err}");
    storage
        .put(
            &layout::epoch(2),
            epoch2,
            aitbc_backup_repository::storage::PutMode::Create,
            &cancel,
        )
        .await
        .expect("put back");
    match Repository::open(storage.clone(), Some(&old), &cancel).await {
        Err(RepoError::RevokedKey { id, .. }) => assert_eq!(id, old_key),
        other => panic!("revoked key opened: {:?}", other.map(|_| ())),
    }
    // Someone with write access deletes the tombstone and puts the key's object back: the
    // key stays revoked (every later epoch names it).
    storage
        .delete(&layout::sealed_revoked(&old_key), &cancel)
        .await
        .expect("delete tombstone");
    let key_object = storage
        .get(&layout::sealed_key(&old_key), &cancel)
        .await
        .expect("key");
    storage
        .delete(&layout::sealed_key(&old_key), &cancel)
        .await
        .expect("delete");
    storage
        .put(
            &layout::sealed_key(&old_key),
            key_object,
            aitbc_backup_repository::storage::PutMode::Overwrite,
            &cancel,
        )
        .await
        .expect("put back");
    assert!(matches!(
        Repository::open(storage.clone(), Some(&old), &cancel).await,
        Err(RepoError::RevokedKey { .. })
    ));
    let listed = keys::list_keys(&storage, &cancel).await.expect("list");
    let state = listed.iter().find(|k| k.id == old_key).expect("listed");
    assert!(state.revoked_at.is_some(), "shown active again: {listed:?}");

    // A planted epoch (not signed with the root key) is ignored: writers stay on epoch 2.
    storage
        .put(
            &layout::epoch(3),
            bytes::Bytes::from_static(b"{\"signed\":\"{}\",\"signature\":\"00\"}"),
            aitbc_backup_repository::storage::PutMode::Create,
            &cancel,
        )
        .await
        .expect("plant");
    // ... and so is a huge object planted to slow every open down.
    storage
        .put(
            &layout::epoch(4),
            bytes::Bytes::from(vec![b'x'; 10 << 20]),
            aitbc_backup_repository::storage::PutMode::Create,
            &cancel,
        )
        .await
        .expect("plant big");
    backup_bytes(&writer().await, noise(100_000, 5), "ledger")
        .await
        .expect("backup 3");
    assert_eq!(chunk_epochs(&storage).await, [1, 2].into());

    // The staying key reads both epochs.
    let full = Repository::open(storage.clone(), Some(&new), &cancel)
        .await
        .expect("open");
    assert_eq!(restore_bytes(&full, &first).await.expect("1"), before);
    assert_eq!(restore_bytes(&full, &second).await.expect("2"), after);

    // The audit log names every step, and a removed entry is detected.
    let log = keys::audit_log(&storage, &cancel).await.expect("audit");
    let actions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.action.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("init", "epoch 1"),
            ("add", ""),
            ("issue-writer", "component ledger"),
            ("revoke", "epoch 2")
        ]
    );
    let entries = storage
        .list(layout::SEALED_AUDIT, &cancel)
        .await
        .expect("list");
    storage
        .delete(&entries[1].path, &cancel)
        .await
        .expect("delete");
    let err = keys::audit_log(&storage, &cancel)
        .await
        .expect_err("tampered");
    assert!(err.to_string().contains("tampered"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_points_are_keyed_per_repository_and_dedup_within_one() {
    let cancel = CancellationToken::new();
    let operator = passphrase("p");
    let data = noise(3_000_000, 7);
    let mut cuts = Vec::new();
    let mut repos = Vec::new();
    let mut backends = Vec::new();
    for _ in 0..2 {
        let backend = TestBackend::start(Kind::Local);
        let repo = Repository::init(
            backend.storage().await,
            small_chunks(),
            Some(&operator),
            &cancel,
        )
        .await
        .expect("init")
        .for_component("ledger")
        .expect("ledger");
        let manifest = backup_bytes(&repo, data.clone(), "ledger")
            .await
            .expect("backup");
        cuts.push(
            manifest
                .chunks
                .iter()
                .map(|c| c.raw_len)
                .collect::<Vec<_>>(),
        );
        repos.push(repo);
        backends.push(backend);
    }
    assert_ne!(cuts[0], cuts[1], "the same cut points in two repositories");
    assert!(cuts[0].len() > 10, "{}", cuts[0].len());
    // Within one repository: the same stream stores nothing new; a small change a chunk or so.
    let again = backup_bytes(&repos[0], data.clone(), "ledger")
        .await
        .expect("again");
    assert_eq!(again.stats.new_chunks, 0, "{:?}", again.stats);
    let mut changed = data.clone();
    changed[1_500_000] ^= 0xff;
    let edited = backup_bytes(&repos[0], changed.clone(), "ledger")
        .await
        .expect("edit");
    assert!(edited.stats.new_chunks <= 2, "{:?}", edited.stats);
    assert_eq!(
        restore_bytes(&repos[0], &edited).await.expect("restore"),
        changed
    );
    // Another component of the same repository keys its chunks apart: nothing shared.
    let redis = repos[0].clone().for_component("redis").expect("redis");
    let other = backup_bytes(&redis, data.clone(), "redis")
        .await
        .expect("redis");
    assert_eq!(other.stats.new_chunks as usize, other.chunks.len());
}

/// The fixture's repository `name` copied into a temporary directory, and its storage.
async fn fixture_copy(name: &str) -> (tempfile::TempDir, Storage, serde_json::Value) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/repository-v1");
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let dir = aitbc_backup_tests::temp_dir("fixture");
    copy_dir(&fixture.join(name), &dir.path().join(name));
    let url = format!("file://{}", dir.path().join(name).display());
    let storage = aitbc_backup_repository::open_storage(
        &aitbc_backup_repository::RepoUrl::parse(&url).expect("url"),
        &Default::default(),
        Default::default(),
    )
    .await
    .expect("storage");
    let want = expected["repositories"][name].clone();
    (dir, storage, want)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_repositories_from_the_fixture_stay_readable_and_writable() {
    let cancel = CancellationToken::new();
    for name in ["plain", "encrypted"] {
        let (_dir, storage, want) = fixture_copy(name).await;
        let want = &want;
        let secret = want["passphrase"].as_str().map(passphrase);
        let repo = Repository::open(storage.clone(), secret.as_ref(), &cancel)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(repo.config().version, 1);
        let manifests = repo.components(&cancel).await.expect("components");
        let components = want["components"].as_array().expect("components");
        assert_eq!(manifests.len(), components.len());
        for (manifest, want) in manifests.iter().zip(components) {
            assert_eq!(manifest.id, want["id"].as_str().expect("id"));
            let data = restore_bytes(&repo, manifest).await.expect("restore");
            assert_eq!(data.len() as u64, want["raw_size"].as_u64().expect("size"));
            assert_eq!(
                blake3::hash(&data).to_hex().as_str(),
                want["blake3"].as_str().expect("blake3"),
                "{name}/{}",
                manifest.id
            );
        }
        let report = verify::verify(&repo, true, &cancel).await.expect("verify");
        assert!(report.ok(), "{name}: {:?}", report.problems);
        // New backups in a version 1 repository keep its format, deduplicating against it.
        let first = restore_bytes(&repo, &manifests[0]).await.expect("restore");
        let again = backup_bytes(&repo, first.clone(), "postgres")
            .await
            .expect("backup");
        assert_eq!(again.stats.new_chunks, 0, "{name}: {:?}", again.stats);
        assert!(again.keyed_by.is_empty());
        if name == "encrypted" {
            // The wrong passphrase is refused; credentials are for sealed repositories.
            assert!(matches!(
                Repository::open(storage.clone(), Some(&passphrase("wrong")), &cancel).await,
                Err(RepoError::WrongKey { .. })
            ));
            let err = keys::issue(
                &storage,
                secret.as_ref().expect("s"),
                Issue::Coordinator,
                &cancel,
            )
            .await
            .expect_err("not sealed");
            assert!(err.to_string().contains("not a sealed repository"), "{err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_repository_upgrades_in_place() {
    let cancel = CancellationToken::new();
    let (_dir, storage, want) = fixture_copy("encrypted").await;
    let first = passphrase(want["passphrase"].as_str().expect("passphrase"));
    // A second version 1 key, added before the upgrade.
    let second = passphrase("second version 1 key");
    keys::add_key(&storage, &first, &second, &cancel)
        .await
        .expect("add v1 key");
    let sealed_id = keys::upgrade(&storage, &first, &cancel)
        .await
        .expect("upgrade");
    let err = keys::upgrade(&storage, &first, &cancel)
        .await
        .expect_err("twice");
    assert!(
        err.to_string().contains("sealed already") || err.to_string().contains("upgraded already"),
        "{err}"
    );

    // The upgrade record deleted: the repository is not taken for version 1 again.
    let record = storage
        .get(&layout::upgrade(), &cancel)
        .await
        .expect("record");
    storage
        .delete(&layout::upgrade(), &cancel)
        .await
        .expect("delete");
    let err = Repository::open(storage.clone(), Some(&first), &cancel)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("upgrade record"), "{err}");
    storage
        .put(
            &layout::upgrade(),
            record,
            aitbc_backup_repository::storage::PutMode::Create,
            &cancel,
        )
        .await
        .expect("put back");
    // Old backups read as before, with either key.
    let full = Repository::open(storage.clone(), Some(&first), &cancel)
        .await
        .expect("open");
    let old = full.components(&cancel).await.expect("components");
    assert_eq!(old.len(), 3);
    for (manifest, want) in old.iter().zip(want["components"].as_array().expect("list")) {
        let data = restore_bytes(&full, manifest).await.expect("restore v1");
        assert_eq!(
            blake3::hash(&data).to_hex().as_str(),
            want["blake3"].as_str().expect("b3")
        );
    }
    // New backups are sealed, written by an agent's credential.
    let (writer, _) = keys::issue(&storage, &first, Issue::Writer("ledger"), &cancel)
        .await
        .expect("writer");
    let (coordinator, _) = keys::issue(&storage, &first, Issue::Coordinator, &cancel)
        .await
        .expect("coordinator");
    // Version 1 keys read, but never manage keys (they never get the root secret).
    let err = keys::issue(&storage, &second, Issue::Coordinator, &cancel)
        .await
        .expect_err("a version 1 key issuing");
    assert!(err.to_string().contains("does not manage keys"), "{err}");
    let data = noise(150_000, 11);
    let writer_repo = open_with(storage.clone(), &writer)
        .await
        .expect("writer")
        .for_component("ledger")
        .expect("ledger");
    let new = backup_bytes(&writer_repo, data.clone(), "ledger")
        .await
        .expect("backup");
    assert_eq!(new.keyed_by, "ledger");
    // A writer reads neither the new backup nor the version 1 ones.
    is_no_key(restore_bytes(&writer_repo, &new).await);
    assert!(restore_bytes(&writer_repo, &old[0]).await.is_err());
    // The coordinator's credential reads the new manifest, and nothing of version 1 (no
    // master key): it keeps the version 1 passphrase until those backups are gone.
    let coord = open_with(storage.clone(), &coordinator)
        .await
        .expect("coordinator");
    assert_eq!(
        coord.component(&new.id, &cancel).await.expect("new").id,
        new.id
    );
    assert!(coord.component(&old[0].id, &cancel).await.is_err());
    assert!(restore_bytes(&coord, &old[0]).await.is_err());
    // The second version 1 key reads the new backup too (as legacy-v1)...
    let by_second = Repository::open(storage.clone(), Some(&second), &cancel)
        .await
        .expect("v1 key");
    assert_eq!(restore_bytes(&by_second, &new).await.expect("new"), data);
    let report = verify::verify(&by_second, true, &cancel)
        .await
        .expect("verify");
    assert!(report.ok(), "{:?}", report.problems);
    // ... until legacy-v1 is revoked: then it opens nothing, and the sealed key goes on.
    keys::revoke_key(&storage, &first, "legacy-v1", &cancel)
        .await
        .expect("revoke legacy");
    assert!(matches!(
        Repository::open(storage.clone(), Some(&second), &cancel).await,
        Err(RepoError::RevokedKey { .. })
    ));
    let after = backup_bytes(
        &open_with(storage.clone(), &writer).await.expect("w"),
        noise(50_000, 12),
        "ledger",
    )
    .await
    .expect("backup after");
    let full = Repository::open(storage.clone(), Some(&first), &cancel)
        .await
        .expect("open");
    assert_eq!(
        restore_bytes(&full, &after).await.expect("after").len(),
        50_000
    );
    assert_eq!(
        restore_bytes(&full, &old[2]).await.expect("old").len() as u64,
        old[2].raw_size
    );
    let listed = keys::list_keys(&storage, &cancel).await.expect("list");
    assert!(
        listed
            .iter()
            .any(|k| k.id == sealed_id && k.revoked_at.is_none())
    );
    assert!(
        listed
            .iter()
            .any(|k| k.id == "legacy-v1" && k.revoked_at.is_some())
    );
}

/// One operator key of the random run.
struct Holder {
    secret: KeySecret,
    id: String,
    /// The epoch that began with its revocation.
    revoked_from: Option<u32>,
}

/// Grants present in the bucket, as (epoch, key id), read from their names.
async fn grants(storage: &Storage) -> Vec<(u32, String)> {
    let cancel = CancellationToken::new();
    storage
        .list(layout::GRANTS, &cancel)
        .await
        .expect("list grants")
        .into_iter()
        .filter_map(|o| {
            let rest = o.path.as_str().strip_prefix(layout::GRANTS)?;
            let (dir, file) = rest.split_once('/')?;
            let epoch = dir.split_once('-')?.0.parse().ok()?;
            Some((epoch, file.strip_suffix(".json")?.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_operations_in_any_order_keep_every_key_to_its_epochs() {
    use rand::{Rng, SeedableRng};
    let steps: usize = std::env::var("AITBC_KEY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let backend = TestBackend::start(Kind::Local);
    let cancel = CancellationToken::new();
    let key_file = |n: u64| KeySecret::KeyFile(format!("key file number {n:016}").into_bytes());
    let first = key_file(0);
    let repo = Repository::init(
        backend.storage().await,
        small_chunks(),
        Some(&first),
        &cancel,
    )
    .await
    .expect("init");
    let storage = repo.storage().clone();
    let first_id = keys::list_keys(&storage, &cancel).await.expect("list")[0]
        .id
        .clone();
    let mut holders = vec![Holder {
        secret: first,
        id: first_id,
        revoked_from: None,
    }];
    let (writer, _) = keys::issue(
        &storage,
        &holders[0].secret,
        Issue::Writer("ledger"),
        &cancel,
    )
    .await
    .expect("writer");
    let mut epoch = 1u32;
    let mut backups = Vec::new();
    let mut next_key = 1u64;
    for step in 0..steps {
        let active: Vec<usize> = (0..holders.len())
            .filter(|&i| holders[i].revoked_from.is_none())
            .collect();
        let by = active[rng.random_range(0..active.len())];
        match rng.random_range(0..4) {
            // Add a key.
            0 => {
                let secret = key_file(next_key);
                next_key += 1;
                let id = keys::add_key(&storage, &holders[by].secret, &secret, &cancel)
                    .await
                    .expect("add");
                holders.push(Holder {
                    secret,
                    id,
                    revoked_from: None,
                });
            }
            // Revoke a key (never the last).
            1 if active.len() > 1 => {
                let victim = *active.iter().find(|&&i| i != by).expect("another");
                keys::revoke_key(&storage, &holders[by].secret, &holders[victim].id, &cancel)
                    .await
                    .expect("revoke");
                epoch += 1;
                holders[victim].revoked_from = Some(epoch);
            }
            // A key added while another key is revoked: both finish, the new key gets the new
            // epoch.
            2 if active.len() > 1 => {
                let victim = *active.iter().find(|&&i| i != by).expect("another");
                let secret = key_file(next_key);
                next_key += 1;
                let (added, revoked) = tokio::join!(
                    keys::add_key(&storage, &holders[by].secret, &secret, &cancel),
                    keys::revoke_key(&storage, &holders[by].secret, &holders[victim].id, &cancel),
                );
                revoked.expect("revoke");
                epoch += 1;
                holders[victim].revoked_from = Some(epoch);
                holders.push(Holder {
                    secret,
                    id: added.expect("add"),
                    revoked_from: None,
                });
            }
            // A backup by the writer.
            _ => {
                let data = noise(40_000 + step * 1000, rng.random());
                let writer_repo = open_with(storage.clone(), &writer).await.expect("writer");
                let manifest = backup_bytes(&writer_repo, data.clone(), "ledger")
                    .await
                    .expect("backup");
                backups.push((manifest, data));
            }
        }
        // Every active key reads every backup; every revoked key is refused, and no grant of
        // an epoch from its revocation on exists for it.
        let granted = grants(&storage).await;
        for holder in &holders {
            let opened = Repository::open(storage.clone(), Some(&holder.secret), &cancel).await;
            match holder.revoked_from {
                None => {
                    let repo = opened.unwrap_or_else(|e| panic!("seed {seed}: {}: {e}", holder.id));
                    for (manifest, data) in &backups {
                        let restored = restore_bytes(&repo, manifest).await.unwrap_or_else(|e| {
                            panic!("seed {seed}: {} on {}: {e}", holder.id, manifest.id)
                        });
                        assert_eq!(&restored, data, "seed {seed}");
                    }
                    assert!(
                        granted.contains(&(epoch, holder.id.clone())),
                        "seed {seed}: active key {} lacks epoch {epoch}",
                        holder.id
                    );
                }
                Some(from) => {
                    assert!(
                        matches!(opened, Err(RepoError::RevokedKey { .. })),
                        "seed {seed}: revoked key {} opened",
                        holder.id
                    );
                    assert!(
                        !granted.iter().any(|(e, k)| *k == holder.id && *e >= from),
                        "seed {seed}: revoked key {} was granted epoch {from} or later",
                        holder.id
                    );
                }
            }
        }
    }
}
