//! Walking the included paths: what is there, with the metadata that decides whether a file
//! changed since the last backup.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::held::{self, Held};

/// The first 16 bytes of every SQLite 3 database file.
pub const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// A SQLite database: captured inside a read transaction (see `sqlite.rs`), never read as a file.
    Sqlite,
    Symlink(String),
}

/// One thing to back up, with a path relative to the data directory (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub meta: Meta,
}

/// The metadata a tar header carries, plus what tells a changed file from an unchanged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub inode: u64,
    pub dev: u64,
}

impl Meta {
    pub fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            inode: m.ino(),
            dev: m.dev(),
        }
    }
}

/// What a scan found: entries in archive order (sorted, parents first) and what it skipped.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

impl Scan {
    /// Paths of the SQLite databases found.
    pub fn databases(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Sqlite)
            .map(|e| e.path.clone())
            .collect()
    }
}

/// Keeps one name per database. SQLite finds a database's `-wal` and `-shm` files by the name
/// it is opened under, so a database opened under a second name (a hard link) reads without
/// the node's WAL and its snapshot does not hold the node's checkpoints back: a torn capture.
/// Among the names of one file, the one with a `-wal` or `-shm` beside it is the one in use;
/// then `prefer` (the chain database); then the first. The others are left out with a warning.
pub fn one_name_per_database(scan: &mut Scan, root: &Path, prefer: &str) {
    let mut names: std::collections::HashMap<(u64, u64), Vec<String>> = Default::default();
    for entry in scan.entries.iter().filter(|e| e.kind == Kind::Sqlite) {
        names
            .entry((entry.meta.dev, entry.meta.inode))
            .or_default()
            .push(entry.path.clone());
    }
    let in_use = |rel: &str| {
        ["-wal", "-shm"]
            .iter()
            .any(|suffix| std::fs::symlink_metadata(root.join(format!("{rel}{suffix}"))).is_ok())
    };
    let mut left_out = Vec::new();
    for mut group in names.into_values().filter(|g| g.len() > 1) {
        group.sort();
        let keep = group
            .iter()
            .find(|rel| in_use(rel))
            .or_else(|| group.iter().find(|rel| *rel == prefer))
            .unwrap_or(&group[0])
            .clone();
        for rel in group.into_iter().filter(|rel| *rel != keep) {
            scan.warnings.push(format!(
                "{rel} is another name (hard link) of the database {keep}; backed up once, as {keep}"
            ));
            left_out.push(rel);
        }
    }
    scan.entries.retain(|e| !left_out.contains(&e.path));
}

/// Walks `include` under `root`. Sockets, FIFOs and device files are skipped with a warning;
/// the `-wal`, `-shm` and `-journal` files of a database are skipped (the capture includes them).
pub fn scan(root: &Path, include: &[String]) -> std::io::Result<Scan> {
    let mut scan = Scan::default();
    let mut include: Vec<&String> = include.iter().collect();
    include.sort();
    include.dedup();
    for top in include {
        let path = root.join(top);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => walk(top.clone(), &path, &meta, &mut scan)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => scan
                .warnings
                .push(format!("included path {top} does not exist; skipped")),
            Err(err) => return Err(annotate(err, &path)),
        }
    }
    let databases = scan.databases();
    scan.entries.retain(|e| {
        !databases.iter().any(|db| {
            ["-wal", "-shm", "-journal"]
                .iter()
                .any(|suffix| e.path.strip_prefix(db.as_str()) == Some(suffix))
        })
    });
    Ok(scan)
}

fn walk(
    rel: String,
    path: &Path,
    meta: &std::fs::Metadata,
    scan: &mut Scan,
) -> std::io::Result<()> {
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_symlink() {
        let target = std::fs::read_link(path).map_err(|e| annotate(e, path))?;
        Kind::Symlink(target.to_string_lossy().into_owned())
    } else if file_type.is_file() {
        // A held database's files are never opened here (see `held.rs`).
        match held::classify(path, meta) {
            Some(Held::Database) => Kind::Sqlite,
            Some(Held::Companion) => return Ok(()),
            None if is_sqlite(path, meta.len())? => Kind::Sqlite,
            None => Kind::File,
        }
    } else {
        let what = if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_socket() {
            "a socket"
        } else {
            "a device file"
        };
        scan.warnings.push(format!("{rel} is {what}; skipped"));
        return Ok(());
    };
    let is_dir = kind == Kind::Dir;
    scan.entries.push(Entry {
        path: rel.clone(),
        kind,
        meta: Meta::of(meta),
    });
    if is_dir {
        let mut children: Vec<(String, PathBuf)> = std::fs::read_dir(path)
            .map_err(|e| annotate(e, path))?
            .map(|entry| entry.map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())))
            .collect::<Result<_, _>>()
            .map_err(|e| annotate(e, path))?;
        children.sort();
        for (name, child) in children {
            // A file removed between listing and stat is simply no longer part of the backup.
            match std::fs::symlink_metadata(&child) {
                Ok(meta) => walk(format!("{rel}/{name}"), &child, &meta, scan)?,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(annotate(err, &child)),
            }
        }
    }
    Ok(())
}

/// True when the file, `len` bytes long, starts with the SQLite header. A database is a whole
/// number of pages of 512 bytes or more, so a file of another size is not even opened (a data
/// directory holds thousands of small files, looked at by every backup and restore).
pub fn is_sqlite(path: &Path, len: u64) -> std::io::Result<bool> {
    use std::io::Read;
    if len < 512 || !len.is_multiple_of(512) {
        return Ok(false);
    }
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(err) => return Err(annotate(err, path)),
    };
    let mut magic = [0u8; 16];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == SQLITE_MAGIC),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(annotate(err, path)),
    }
}

/// Adds the path to an I/O error's message.
pub fn annotate(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_told_by_its_header_and_a_whole_number_of_pages() {
        let dir = std::env::temp_dir().join(format!("aitbc-scan-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let check = |name: &str, len: usize, header: bool| {
            let mut bytes = vec![0u8; len];
            if header {
                bytes[..16].copy_from_slice(SQLITE_MAGIC);
            }
            let path = dir.join(name);
            std::fs::write(&path, &bytes).expect("write");
            is_sqlite(&path, len as u64).expect("is_sqlite")
        };
        assert!(check("db", 4096, true));
        assert!(!check("plain", 4096, false));
        // The header alone does not make a database of a file no page size divides.
        assert!(!check("odd", 4100, true));
        assert!(!check("short", 100, true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
