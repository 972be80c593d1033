//! The ledger's tar stream, laid out so that unchanged files need not be read again.
//!
//! Entries are cut into *groups* at file boundaries: a database or a large file is a group of
//! its own; small entries are grouped until a group holds at least [`GROUP_MIN_BYTES`] and a
//! path-hash boundary comes by (content-defined, so a new file disturbs only its own group), or
//! [`GROUP_MAX_BYTES`]. Every group starts and ends at a chunk boundary, so a group whose members
//! are all unchanged (same path, size, mtime, ctime, inode, mode, owner) is the same bytes and the
//! same chunks as last time: its chunks are reused without reading the files.

use std::io::{Read, Write};
use std::path::Path;

use super::scan::{Entry, Kind, Meta, annotate};

/// Files up to this size are read whole, and re-read if they change while being read.
pub const SMALL_FILE_MAX_BYTES: u64 = 1 << 20;
pub const GROUP_MIN_BYTES: u64 = 256 << 10;
pub const GROUP_MAX_BYTES: u64 = 4 << 20;
/// A small-entry group ends at a path whose hash is 0 modulo this (once past the minimum).
const GROUP_BOUNDARY_MODULUS: u64 = 4;

/// The relative path `text` when it names something inside a directory: no root, no `..`.
pub use crate::confined::safe_relative;

/// Splits entries (in archive order) into groups, as index ranges.
pub fn groups(entries: &[Entry]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, entry) in entries.iter().enumerate() {
        let alone = entry.kind == Kind::Sqlite
            || (entry.kind == Kind::File && entry.meta.size >= SMALL_FILE_MAX_BYTES);
        if alone {
            if start < i {
                groups.push(start..i);
            }
            groups.push(i..i + 1);
            start = i + 1;
            bytes = 0;
            continue;
        }
        bytes += 512 + padded(entry_data_len(entry));
        let boundary = u64::from(blake3::hash(entry.path.as_bytes()).as_bytes()[0])
            .is_multiple_of(GROUP_BOUNDARY_MODULUS);
        if (bytes >= GROUP_MIN_BYTES && boundary) || bytes >= GROUP_MAX_BYTES {
            groups.push(start..i + 1);
            start = i + 1;
            bytes = 0;
        }
    }
    if start < entries.len() {
        groups.push(start..entries.len());
    }
    groups
}

/// What identifies a group's bytes: every member's path, kind and metadata. None when a member
/// is a database (always captured anew).
pub fn group_key(members: &[Entry]) -> Option<String> {
    let mut hasher = blake3::Hasher::new();
    for entry in members {
        let kind = match &entry.kind {
            Kind::Sqlite => return None,
            Kind::Dir => "d".to_owned(),
            Kind::File => "f".to_owned(),
            Kind::Symlink(target) => format!("l{target}"),
        };
        let m = entry.meta;
        let line = format!(
            "{}\0{kind}\0{} {} {} {} {} {} {} {}\n",
            entry.path, m.mode, m.uid, m.gid, m.size, m.mtime_ns, m.ctime_ns, m.inode, m.dev
        );
        hasher.update(line.as_bytes());
    }
    Some(hasher.finalize().to_hex().to_string())
}

fn entry_data_len(entry: &Entry) -> u64 {
    match entry.kind {
        Kind::File | Kind::Sqlite => entry.meta.size,
        Kind::Dir | Kind::Symlink(_) => 0,
    }
}

pub fn padded(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// The header block(s) of an entry (GNU long-name blocks included when the path needs them).
pub fn header(entry: &Entry, size: u64) -> std::io::Result<Vec<u8>> {
    let m = entry.meta;
    let mut h = tar::Header::new_gnu();
    h.set_mode(m.mode);
    h.set_uid(u64::from(m.uid));
    h.set_gid(u64::from(m.gid));
    h.set_mtime(u64::try_from(m.mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0));
    h.set_size(size);
    let mut builder = tar::Builder::new(Vec::new());
    match &entry.kind {
        Kind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut h, format!("{}/", entry.path), std::io::empty())?;
        }
        Kind::File | Kind::Sqlite => {
            h.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut h, &entry.path, std::io::empty())?;
        }
        Kind::Symlink(target) => {
            h.set_entry_type(tar::EntryType::Symlink);
            builder.append_link(&mut h, &entry.path, target)?;
        }
    }
    Ok(std::mem::take(builder.get_mut()))
}

/// What writing an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Data bytes written; `unchanged` when the file matched its scan while it was read (only
    /// then may its group be reused later).
    Entry { size: u64, unchanged: bool },
    /// The file was removed after the scan; nothing was written.
    Vanished,
}

/// Writes one entry (header, data, padding), reading the file at `source`.
pub fn write_entry(out: &mut impl Write, entry: &Entry, source: &Path) -> std::io::Result<Written> {
    let result = match entry.kind {
        Kind::Dir | Kind::Symlink(_) => {
            out.write_all(&header(entry, 0)?)?;
            Ok((0, true))
        }
        Kind::File if entry.meta.size < SMALL_FILE_MAX_BYTES => write_small(out, entry, source),
        Kind::File | Kind::Sqlite => write_large(out, entry, source),
    };
    match result {
        Ok((size, unchanged)) => Ok(Written::Entry { size, unchanged }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Written::Vanished),
        Err(err) => Err(err),
    }
}

/// Reads a small file whole, again if it changed meanwhile (up to three times).
fn write_small(out: &mut impl Write, entry: &Entry, source: &Path) -> std::io::Result<(u64, bool)> {
    let mut last = None;
    for _ in 0..3 {
        let mut file = std::fs::File::open(source).map_err(|e| annotate(e, source))?;
        let before = Meta::of(&file.metadata()?);
        let mut data = Vec::with_capacity(before.size as usize);
        file.read_to_end(&mut data)
            .map_err(|e| annotate(e, source))?;
        let after = Meta::of(&file.metadata()?);
        let stable = before == after && data.len() as u64 == after.size;
        last = Some((data, after));
        if stable {
            break;
        }
    }
    let (data, meta) = last.unwrap_or_default();
    let current = Entry {
        meta,
        ..entry.clone()
    };
    out.write_all(&header(&current, data.len() as u64)?)?;
    out.write_all(&data)?;
    pad(out, data.len() as u64)?;
    Ok((data.len() as u64, meta == entry.meta))
}

/// Streams a large file (or a database copy): exactly the size in its header, zero-filled if
/// it shrank while being read.
fn write_large(out: &mut impl Write, entry: &Entry, source: &Path) -> std::io::Result<(u64, bool)> {
    let file = std::fs::File::open(source).map_err(|e| annotate(e, source))?;
    let size = file.metadata()?.len();
    out.write_all(&header(entry, size)?)?;
    let copied = std::io::copy(&mut (&file).take(size), out).map_err(|e| annotate(e, source))?;
    if copied < size {
        std::io::copy(&mut std::io::repeat(0).take(size - copied), out)?;
    }
    pad(out, size)?;
    let unchanged = entry.kind == Kind::File && Meta::of(&file.metadata()?) == entry.meta;
    Ok((size, unchanged))
}

fn pad(out: &mut impl Write, len: u64) -> std::io::Result<()> {
    let padding = (padded(len) - len) as usize;
    out.write_all(&[0u8; 512][..padding])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: Kind::File,
            meta: Meta {
                size,
                mode: 0o644,
                ..Meta::default()
            },
        }
    }

    #[test]
    fn safe_relative_paths() {
        assert_eq!(
            safe_relative("chain/chain.db"),
            Some("chain/chain.db".into())
        );
        assert_eq!(safe_relative("./wallets"), Some("wallets".into()));
        for bad in ["", ".", "/etc", "../x", "a/../../b", "a/.."] {
            assert_eq!(safe_relative(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_new_file_disturbs_only_its_own_group() {
        let entries: Vec<Entry> = (0..400)
            .map(|i| file(&format!("receipts/{i:05}.json"), 90_000))
            .collect();
        let before = groups(&entries);
        assert!(before.len() > 20, "{} groups", before.len());
        let mut more = entries.clone();
        more.insert(200, file("receipts/00199a.json", 90_000));
        let after = groups(&more);
        let keys = |entries: &[Entry], groups: &[std::ops::Range<usize>]| -> Vec<String> {
            groups
                .iter()
                .filter_map(|g| group_key(&entries[g.clone()]))
                .collect()
        };
        let old = keys(&entries, &before);
        let new = keys(&more, &after);
        let changed = new.iter().filter(|k| !old.contains(k)).count();
        assert!(changed <= 2, "{changed} of {} groups changed", new.len());
    }

    #[test]
    fn headers_round_trip_through_a_tar_reader() {
        let long = format!("receipts/{}/1.json", "d".repeat(150));
        let entries = [
            file("chain/x.json", 3),
            file(&long, 5),
            Entry {
                path: "link".into(),
                kind: Kind::Symlink("chain/x.json".into()),
                meta: Meta::default(),
            },
        ];
        let mut tar = Vec::new();
        for entry in &entries {
            tar.extend(header(entry, entry.meta.size).expect("header"));
            tar.extend(vec![7u8; entry.meta.size as usize]);
            pad(&mut tar, entry.meta.size).expect("pad");
        }
        tar.extend([0u8; 1024]);
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(paths, ["chain/x.json", long.as_str(), "link"]);
    }
}
