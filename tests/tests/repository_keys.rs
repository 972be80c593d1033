//! Encryption and key management, on the local backend and s3s-fs.

use aitbc_backup_repository::keys::{self, KeySecret};
use aitbc_backup_repository::{ChunkerParams, RepoError, Repository, layout};
use aitbc_backup_tests::repository::{KINDS, TestBackend, backup_bytes, restore_bytes};
use tokio_util::sync::CancellationToken;

const MARKER: &[u8] = b"PLAINTEXT-LEDGER-MARKER ";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn passphrase(p: &str) -> KeySecret {
    KeySecret::Passphrase(p.to_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repositories_hide_content_and_refuse_wrong_keys() {
    for kind in KINDS {
        let backend = TestBackend::start(kind);
        let cancel = CancellationToken::new();
        let repo = Repository::init(
            backend.storage().await,
            ChunkerParams::default(),
            Some(&passphrase("correct horse")),
            &cancel,
        )
        .await
        .expect("init encrypted");
        // Highly compressible plaintext with a marker: compressed and sealed, neither shows.
        let data: Vec<u8> = MARKER.iter().copied().cycle().take(6 << 20).collect();
        let manifest = backup_bytes(&repo, data.clone(), "secret-ledger")
            .await
            .expect("backup");
        assert!(
            manifest.stats.new_stored_bytes < 1 << 20,
            "not compressed: {:?}",
            manifest.stats
        );

        let storage = repo.storage();
        for object in storage.list("", &cancel).await.expect("list") {
            let bytes = storage.get(&object.path, &cancel).await.expect("get");
            let key = object.path.as_str();
            assert!(!contains(&bytes, MARKER), "{kind:?}: plaintext in {key}");
            if key.starts_with(layout::CHUNKS) || key.starts_with("manifests/") {
                assert!(
                    !contains(&bytes, &ZSTD_MAGIC),
                    "{kind:?}: zstd magic in {key}"
                );
                assert!(
                    !contains(&bytes, b"secret-ledger"),
                    "{kind:?}: manifest name in {key}"
                );
            }
        }
        // Chunk ids are keyed: the plain BLAKE3 of the data is not an id.
        let plain_id = blake3::hash(&data[..manifest.chunks[0].raw_len as usize])
            .to_hex()
            .to_string();
        assert_ne!(manifest.chunks[0].id, plain_id);

        // Opening: right key, wrong key, no key.
        let reopened = Repository::open(
            backend.storage().await,
            Some(&passphrase("correct horse")),
            &cancel,
        )
        .await
        .expect("open with the passphrase");
        assert_eq!(
            restore_bytes(&reopened, &manifest).await.expect("restore"),
            data
        );
        let err = Repository::open(
            backend.storage().await,
            Some(&passphrase("wrong horse")),
            &cancel,
        )
        .await
        .err()
        .expect("wrong passphrase");
        assert!(matches!(err, RepoError::WrongKey { keys: 1 }), "{err}");
        assert!(
            err.to_string().contains("none of the repository's 1 keys"),
            "{err}"
        );
        let err = Repository::open(backend.storage().await, None, &cancel)
            .await
            .err()
            .expect("no key");
        assert!(matches!(err, RepoError::KeyRequired), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_added_rotated_and_revoked_without_rewriting_data() {
    let backend = TestBackend::start(aitbc_backup_tests::repository::Kind::Local);
    let cancel = CancellationToken::new();
    let first = passphrase("first passphrase");
    let repo = Repository::init(
        backend.storage().await,
        ChunkerParams::default(),
        Some(&first),
        &cancel,
    )
    .await
    .expect("init");
    let data = aitbc_backup_tests::data::generate(3 << 20, 70);
    let manifest = backup_bytes(&repo, data.clone(), "k")
        .await
        .expect("backup");
    let storage = backend.storage().await;
    let chunks_before = storage.list(layout::CHUNKS, &cancel).await.expect("list");

    // A key file as a second key.
    let key_file = KeySecret::KeyFile(b"a key file of thirty-two bytes!!".to_vec());
    let file_key_id = keys::add_key(&storage, &first, &key_file, &cancel)
        .await
        .expect("add key file");
    let via_file = Repository::open(backend.storage().await, Some(&key_file), &cancel)
        .await
        .expect("open by key file");
    assert_eq!(
        restore_bytes(&via_file, &manifest).await.expect("restore"),
        data
    );

    // Rotate the passphrase: the new one opens, the old one is reported revoked.
    let second = passphrase("second passphrase");
    let second_id = keys::rotate_key(&storage, &first, &second, &cancel)
        .await
        .expect("rotate");
    Repository::open(backend.storage().await, Some(&second), &cancel)
        .await
        .expect("open with rotated");
    let err = Repository::open(backend.storage().await, Some(&first), &cancel)
        .await
        .err()
        .expect("old passphrase");
    assert!(matches!(err, RepoError::RevokedKey { .. }), "{err}");
    assert!(err.to_string().contains("was revoked"), "{err}");

    // Revoke the key file; the last key cannot be revoked.
    keys::revoke_key(&storage, &second, &file_key_id, &cancel)
        .await
        .expect("revoke key file");
    let err = Repository::open(backend.storage().await, Some(&key_file), &cancel)
        .await
        .err()
        .expect("revoked file");
    assert!(err.to_string().contains(&file_key_id), "{err}");
    let err = keys::revoke_key(&storage, &second, &second_id, &cancel)
        .await
        .expect_err("last key");
    assert!(err.to_string().contains("only key"), "{err}");

    // Data was never rewritten.
    assert_eq!(
        storage.list(layout::CHUNKS, &cancel).await.expect("list"),
        chunks_before
    );

    // Every operation is in the audit log, without key material.
    let log = keys::audit_log(&storage, &cancel).await.expect("audit");
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["init", "add", "add", "rotate", "revoke"]);
    assert_eq!(log[4].key_id, file_key_id);
    let listed = keys::list_keys(&storage, &cancel).await.expect("list keys");
    assert_eq!(listed.iter().filter(|k| k.revoked_at.is_none()).count(), 1);
    assert_eq!(listed.len(), 3);
    let mut audit = storage.list(layout::AUDIT, &cancel).await.expect("list");
    audit.extend(
        storage
            .list(layout::SEALED_AUDIT, &cancel)
            .await
            .expect("list"),
    );
    assert_eq!(audit.len(), 5);
    for object in audit {
        let text = String::from_utf8(
            storage
                .get(&object.path, &cancel)
                .await
                .expect("get")
                .to_vec(),
        )
        .expect("utf-8");
        assert!(
            !text.contains("wrapped") && !text.contains("passphrase\""),
            "{text}"
        );
        assert!(
            !text.contains("first passphrase") && !text.contains("thirty-two"),
            "{text}"
        );
    }
}
