//! The unpacker a restore uses cannot change anything outside its target: generated archives
//! (files, directories, symlinks, hard links named from a small alphabet with `.`, `..`,
//! absolute paths and earlier names) are unpacked into a target inside a sandbox full of
//! sentinels, and the whole sandbox outside the target must be exactly as it was (contents,
//! modes, owners, mtimes, no entry added or removed), whether the unpack succeeded or not.
//! Plus the link chains of issue 19 as fixed cases.
//!
//! `PROPTEST_CASES` sets the number of generated archives (256 here by default; the soak runs
//! many thousands: `PROPTEST_CASES=20000 cargo test -p aitbc-backup-agent --test confinement`).
//! These tests run as root in CI, so modes and owners really change: that is the point.

mod hostile;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aitbc_backup_agent::confined;
use hostile::{Sandbox, assert_same, raw_entry, simple};
use proptest::prelude::*;

fn unpack(archive: &[u8], root: &Path) -> Result<confined::Unpacked, String> {
    let mut archive = archive.to_vec();
    archive.extend([0u8; 1024]);
    confined::unpack(std::io::Cursor::new(archive), root, &mut |_, _| {})
}

#[test]
fn the_chain_of_issue_19_is_refused_at_its_first_escaping_link() {
    let sandbox = Sandbox::new();
    let before = sandbox.outside();
    let archive = [
        simple("a", tar::EntryType::Symlink, Some("."), b""),
        simple("b", tar::EntryType::Symlink, Some("a/.."), b""),
        simple("c", tar::EntryType::Symlink, Some("b/.."), b""),
        raw_entry(
            "c/x",
            tar::EntryType::Directory,
            None,
            b"",
            0o777,
            123_456,
            65534,
        ),
        simple("c/x/metadata.json", tar::EntryType::Regular, None, b"owned"),
    ]
    .concat();
    let err = unpack(&archive, &sandbox.target).expect_err("refused");
    assert!(
        err.contains("refused archive entry `b`") && err.contains("outside the target"),
        "{err}"
    );
    assert_same(&before, &sandbox.outside(), "a -> ., b -> a/..");
    // `a` itself (the root) was fine; nothing else was created.
    assert_eq!(
        std::fs::read_link(sandbox.target.join("a")).expect("a"),
        Path::new(".")
    );
    assert!(!sandbox.target.join("b").exists());
}

#[test]
fn no_entry_goes_through_a_link_even_one_that_stays_inside() {
    let sandbox = Sandbox::new();
    let before = sandbox.outside();
    // `a -> .` is the root itself; `a/x` would land inside, but goes through a link.
    let archive = [
        simple("a", tar::EntryType::Symlink, Some("."), b""),
        raw_entry("a/x", tar::EntryType::Directory, None, b"", 0o777, 5, 0),
    ]
    .concat();
    let err = unpack(&archive, &sandbox.target).expect_err("refused");
    assert!(err.contains("goes through the symlink `a`"), "{err}");
    assert_same(&before, &sandbox.outside(), "a/x");
}

#[test]
fn a_metadata_json_link_pointing_outside_is_refused() {
    let sandbox = Sandbox::new();
    let before = sandbox.outside();
    let archive = simple(
        "metadata.json",
        tar::EntryType::Symlink,
        Some("../../metadata.json"),
        b"",
    );
    let err = unpack(&archive, &sandbox.target).expect_err("refused");
    assert!(
        err.contains("refused archive entry `metadata.json`")
            && err.contains("points outside the target"),
        "{err}"
    );
    assert_same(&before, &sandbox.outside(), "metadata.json link");
}

#[test]
fn metadata_json_replaces_a_link_instead_of_writing_through_it() {
    let sandbox = Sandbox::new();
    let before = sandbox.outside();
    // As if a link had got past the unpacker: the write must still not follow it.
    std::os::unix::fs::symlink(
        sandbox.root.join("metadata.json"),
        sandbox.target.join("metadata.json"),
    )
    .expect("ln");
    confined::replace_file(
        &sandbox.target,
        "metadata.json",
        b"{\"latest_block_height\": 7}",
    )
    .expect("write");
    assert_same(&before, &sandbox.outside(), "metadata.json");
    let written = sandbox.target.join("metadata.json");
    assert!(
        std::fs::symlink_metadata(&written)
            .expect("lstat")
            .is_file()
    );
    assert_eq!(
        std::fs::read(&written).expect("read"),
        b"{\"latest_block_height\": 7}"
    );
}

#[test]
fn a_regular_archive_unpacks_with_its_modes_times_and_links() {
    let sandbox = Sandbox::new();
    let archive = [
        raw_entry("chain/", tar::EntryType::Directory, None, b"", 0o750, 77, 0),
        raw_entry(
            "chain/db",
            tar::EntryType::Regular,
            None,
            b"blocks",
            0o600,
            88,
            0,
        ),
        simple("chain/current", tar::EntryType::Symlink, Some("db"), b""),
        simple("wallets/same", tar::EntryType::Link, Some("chain/db"), b""),
        simple("up", tar::EntryType::Symlink, Some("chain/../wallets"), b""),
    ]
    .concat();
    let unpacked = unpack(&archive, &sandbox.target).expect("unpack");
    assert_eq!((unpacked.files, unpacked.bytes), (1, 6));
    let t = &sandbox.target;
    let meta = std::fs::metadata(t.join("chain")).expect("chain");
    assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o750, 77));
    let meta = std::fs::metadata(t.join("chain/db")).expect("db");
    assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o600, 88));
    assert_eq!(
        std::fs::read(t.join("chain/current")).expect("link"),
        b"blocks"
    );
    assert_eq!(
        std::fs::read(t.join("wallets/same")).expect("hard link"),
        b"blocks"
    );
    assert!(t.join("up").is_dir());
}

proptest! {
    #![proptest_config(ProptestConfig {
        // 256 unless PROPTEST_CASES says otherwise.
        cases: hostile::cases(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn nothing_outside_the_target_changes(specs in prop::collection::vec(hostile::spec(), 1..8)) {
        let sandbox = Sandbox::new();
        let before = sandbox.outside();
        let archive = hostile::build(&specs, &sandbox.root);
        let outcome = unpack(&archive, &sandbox.target);
        let after = sandbox.outside();
        assert_same(&before, &after, &format!("{outcome:?}"));
        let escaping = hostile::escaping_links(&sandbox.target);
        assert!(escaping.is_empty(), "links leading outside the target: {escaping:?} ({outcome:?})");
    }
}
