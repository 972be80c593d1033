//! The databases this process holds open, and the tripwire that proves a snapshot kept its locks.
//!
//! **Invariant: while this process holds a database open, nothing in it opens that database's
//! files (the database, `-wal`, `-shm`, `-journal`) except SQLite.** POSIX locks belong to the
//! process, and closing *any* descriptor of a file drops every lock the process holds on it
//! (item 2.2 of SQLite's "How To Corrupt An SQLite Database File"): a snapshot's SHARED lock
//! and WAL read mark vanish, the node's next checkpoint overwrites pages the snapshot still
//! reads, and the backup stores a torn database. SQLite shares one descriptor per file within a
//! process and defers its closes, so more SQLite connections are safe; a plain `File::open`
//! is not. Files are known by device and inode, so another name of a held file is caught too.
//! The scan asks [`classify`] before it opens a file.
//!
//! The tripwire: [`LockWitness`] reads `/proc/locks` (reading it opens no database file) when
//! the snapshot is taken and again after its pages are read. A lock seen at the cut and gone
//! afterwards fails the backup instead of storing what was read.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

/// A file by device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    dev: u64,
    ino: u64,
}

impl FileKey {
    pub fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// Without opening the file.
    fn at(path: &Path) -> std::io::Result<FileKey> {
        Ok(FileKey::of(&std::fs::symlink_metadata(path)?))
    }
}

/// Held databases with the number of holds on each.
static HELD: Mutex<Option<HashMap<FileKey, usize>>> = Mutex::new(None);

fn with_held<T>(f: impl FnOnce(&mut HashMap<FileKey, usize>) -> T) -> T {
    // A panic while the lock was held leaves a map that is still consistent (every change is
    // one insert or remove), so a poisoned lock is taken over.
    let mut guard = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// A database registered as held; unregistered when dropped. Drop it only after the
/// connection that holds the database is closed.
#[derive(Debug)]
pub struct Hold(FileKey);

/// Registers the database at `path` as held by this process.
pub fn hold(path: &Path) -> std::io::Result<Hold> {
    let key = FileKey::at(path)?;
    with_held(|held| *held.entry(key).or_insert(0) += 1);
    Ok(Hold(key))
}

impl Drop for Hold {
    fn drop(&mut self) {
        with_held(|held| {
            if let Some(count) = held.get_mut(&self.0) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&self.0);
                }
            }
        });
    }
}

/// What a held file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A held database (under any of its names).
    Database,
    /// The `-wal`, `-shm` or `-journal` file of a held database.
    Companion,
}

/// Whether the file at `path` (with metadata `meta`) belongs to a held database. Never opens
/// the file.
pub fn classify(path: &Path, meta: &std::fs::Metadata) -> Option<Held> {
    if with_held(|held| held.contains_key(&FileKey::of(meta))) {
        return Some(Held::Database);
    }
    let name = path.file_name()?.to_str()?;
    let database = ["-wal", "-shm", "-journal"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))?;
    let key = FileKey::at(&path.with_file_name(database)).ok()?;
    with_held(|held| held.contains_key(&key)).then_some(Held::Companion)
}

/// The locks this process held on a database's files when its snapshot was taken.
#[derive(Debug, Clone)]
pub struct LockWitness {
    rel: String,
    /// The database file, when a lock on it was seen.
    database: Option<FileKey>,
    /// The `-shm` file, when a lock on a WAL read mark was seen.
    shm: Option<FileKey>,
}

/// Bytes of the `-shm` file whose locks are the WAL read marks (`WAL_READ_LOCK(0..5)` at
/// `WALINDEX_LOCK_OFFSET` 120 + 3).
const READ_MARK_BYTES: (u64, u64) = (123, 127);

impl LockWitness {
    /// Notes the locks this process holds on `path` and its `-shm` file now. Locks that
    /// `/proc/locks` does not show (another OS, a filesystem that reports other inodes) are not
    /// watched; the invariant above still holds.
    pub fn take(path: &Path, rel: &str) -> LockWitness {
        let locks = process_locks();
        let mut shm_path = path.as_os_str().to_owned();
        shm_path.push("-shm");
        let database = FileKey::at(path)
            .ok()
            .filter(|key| locks.iter().any(|l| l.file == *key));
        let shm = FileKey::at(Path::new(&shm_path)).ok().filter(|key| {
            locks.iter().any(|l| {
                l.file == *key && l.start <= READ_MARK_BYTES.1 && l.end >= READ_MARK_BYTES.0
            })
        });
        if database.is_none() {
            tracing::debug!(
                database = rel,
                "no lock of this process visible in /proc/locks; the lock tripwire is off for it"
            );
        }
        LockWitness {
            rel: rel.to_owned(),
            database,
            shm,
        }
    }

    /// Err when a lock seen at [`LockWitness::take`] is gone: the snapshot may have read pages
    /// the node rewrote, so what was read must not be stored.
    pub fn check(&self) -> Result<(), String> {
        // `/proc/locks` is produced a page at a time, and a line can be skipped when other
        // processes' locks come and go between two pages (a busy node takes thousands a
        // second). A lost lock stays lost (SQLite does not take it again inside the
        // transaction), so the check is repeated before it counts.
        let mut found = (false, false);
        for attempt in 0..PROC_LOCKS_READS {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            found = self.missing(&process_locks());
            if found == (false, false) {
                return Ok(());
            }
        }
        let which = match found {
            (true, true) => "its lock on the database and its WAL read mark",
            (true, false) => "its lock on the database",
            _ => "its WAL read mark",
        };
        Err(format!(
            "{}: the snapshot lost {which} while it was read, so the node may have rewritten \
             pages it still read; nothing was stored (a file of the database was opened and \
             closed outside SQLite)",
            self.rel
        ))
    }

    /// (database lock missing, read-mark lock missing) in `locks`, for the locks watched.
    fn missing(&self, locks: &[Lock]) -> (bool, bool) {
        let lost = |key: &Option<FileKey>, in_range: &dyn Fn(&Lock) -> bool| {
            key.is_some_and(|key| !locks.iter().any(|l| l.file == key && in_range(l)))
        };
        (
            lost(&self.database, &|_| true),
            lost(&self.shm, &|l: &Lock| {
                l.start <= READ_MARK_BYTES.1 && l.end >= READ_MARK_BYTES.0
            }),
        )
    }
}

/// How many reads of `/proc/locks` must all miss a lock before it counts as lost.
const PROC_LOCKS_READS: usize = 5;

/// One POSIX lock of this process.
#[derive(Debug)]
struct Lock {
    file: FileKey,
    start: u64,
    end: u64,
}

/// This process's POSIX (and open file description) locks, from `/proc/locks`; empty when it
/// cannot be read.
fn process_locks() -> Vec<Lock> {
    let pid = std::process::id();
    proc_locks()
        .into_iter()
        .filter(|(owner, _, _)| *owner == pid)
        .map(|(_, _, lock)| lock)
        .collect()
}

/// Other processes holding write locks on these files (a database and its `-shm`, where
/// SQLite's writer lock lives in WAL mode): pid and command name, for an error message that
/// says who is in the way.
pub fn writers_of(paths: &[std::path::PathBuf]) -> Vec<(u32, String)> {
    let files: Vec<FileKey> = paths.iter().filter_map(|p| FileKey::at(p).ok()).collect();
    let me = std::process::id();
    let mut pids: Vec<u32> = proc_locks()
        .into_iter()
        .filter(|(pid, write, lock)| *pid != me && *write && files.contains(&lock.file))
        .map(|(pid, _, _)| pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
        .collect()
}

/// Every POSIX (and open file description) lock in `/proc/locks`: owner pid, whether it is a
/// write lock, and the lock. Lines look like `1: POSIX  ADVISORY  READ 1234 fd:01:131073 128
/// 128` (`major:minor:inode`, major and minor in hex; the end may be `EOF`); waiters (`->`)
/// are skipped.
fn proc_locks() -> Vec<(u32, bool, Lock)> {
    let Ok(text) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    text.lines()
        .filter(|line| !line.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // id: class mode access pid dev:ino start end
            let [_, class, _, access, owner, file, start, end] = fields.as_slice() else {
                return None;
            };
            if !matches!(*class, "POSIX" | "OFDLCK") {
                return None;
            }
            let mut parts = file.split(':');
            let major = u64::from_str_radix(parts.next()?, 16).ok()?;
            let minor = u64::from_str_radix(parts.next()?, 16).ok()?;
            let ino = parts.next()?.parse().ok()?;
            let lock = Lock {
                file: FileKey {
                    dev: makedev(major, minor),
                    ino,
                },
                start: start.parse().ok()?,
                end: if *end == "EOF" {
                    u64::MAX
                } else {
                    end.parse().ok()?
                },
            };
            Some((owner.parse().ok()?, *access == "WRITE", lock))
        })
        .collect()
}

/// glibc's `makedev`: the `st_dev` of a device number.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("aitbc-held-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn a_held_database_and_its_companions_are_known_by_inode_until_released() {
        let dir = scratch();
        let db = dir.join("chain.db");
        std::fs::write(&db, b"x").expect("write");
        std::fs::write(dir.join("chain.db-wal"), b"x").expect("write");
        std::fs::hard_link(&db, dir.join("alias.db")).expect("link");
        let meta = |name: &str| std::fs::symlink_metadata(dir.join(name)).expect("stat");
        assert_eq!(classify(&db, &meta("chain.db")), None);
        let hold = hold(&db).expect("hold");
        let second = super::hold(&db).expect("hold again");
        assert_eq!(classify(&db, &meta("chain.db")), Some(Held::Database));
        let alias = dir.join("alias.db");
        assert_eq!(classify(&alias, &meta("alias.db")), Some(Held::Database));
        let wal = dir.join("chain.db-wal");
        assert_eq!(classify(&wal, &meta("chain.db-wal")), Some(Held::Companion));
        drop(hold);
        assert_eq!(classify(&db, &meta("chain.db")), Some(Held::Database));
        drop(second);
        assert_eq!(classify(&db, &meta("chain.db")), None);
        assert_eq!(classify(&wal, &meta("chain.db-wal")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_witness_sees_a_lock_dropped_by_a_stray_close() {
        let dir = scratch();
        let db = dir.join("chain.db");
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1); BEGIN; SELECT * FROM t;",
        )
        .expect("set up");
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .expect("read");
        let witness = LockWitness::take(&db, "chain.db");
        assert!(
            witness.database.is_some() && witness.shm.is_some(),
            "{witness:?}"
        );
        witness.check().expect("locks still held");
        // What the scan used to do: open the database's shared-memory file and close it.
        drop(std::fs::File::open(dir.join("chain.db-shm")).expect("open -shm"));
        let err = witness.check().expect_err("the read mark's lock is gone");
        assert!(err.contains("WAL read mark"), "{err}");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
