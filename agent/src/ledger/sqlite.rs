//! SQLite at the cut: every database gets a read transaction opened at the cut, and the chain's
//! head is read in that same transaction. Its pages are then read inside that transaction.
//!
//! Why this is consistent in both journal modes: the first read of a transaction fixes its
//! snapshot (WAL mode: an end mark in the WAL; rollback-journal mode: a SHARED lock, which keeps
//! writers from committing until it is released). In WAL mode, where writers never wait for
//! readers, the pages are read straight from the snapshot while the stream is written (the
//! `sqlite_dbpage` table reads pages through the connection's transaction, as `sqlite3_rsync`
//! does). In rollback-journal mode the snapshot is first copied through the online backup API
//! (`sqlite3_backup_step` reuses the open transaction, so the copy is exactly that snapshot) and
//! the transaction ends: writers wait only for the copy, not for the upload.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::held::{self, Hold, LockWitness};

/// The newest block of a chain database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub height: u64,
    pub hash: String,
}

/// A database with its read transaction open: the cut has happened for it.
pub struct OpenSnapshot {
    pub rel: String,
    conn: Connection,
    /// The locks seen when the snapshot was taken, checked after its pages are read.
    witness: LockWitness,
    /// Declared after `conn`, so it is released only once the connection is closed.
    _hold: Hold,
}

/// A database connection opened ahead of the cut (so the cut itself is one short transaction
/// start per database). The database is registered as held (see `held.rs`) for as long as
/// the connection is open.
pub struct Opened {
    pub rel: String,
    path: PathBuf,
    conn: Connection,
    _hold: Hold,
}

/// Opens `path` for a later [`Opened::begin`].
pub fn open(path: &Path, rel: &str, busy_timeout: Duration) -> Result<Opened, String> {
    let fail = |what: &str, e: rusqlite::Error| format!("{rel}: {what}: {e}");
    let hold = held::hold(path).map_err(|e| format!("{rel}: {e}"))?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| fail("open", e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| fail("busy timeout", e))?;
    Ok(Opened {
        rel: rel.to_owned(),
        path: path.to_owned(),
        conn,
        _hold: hold,
    })
}

impl Opened {
    /// Opens a read transaction and reads from it, which fixes its snapshot.
    pub fn begin(self) -> Result<OpenSnapshot, String> {
        let rel = self.rel;
        let fail = |what: &str, e: rusqlite::Error| format!("{rel}: {what}: {e}");
        // No memory-mapped reads here: they halve the copy time but count the whole database
        // into the agent's resident memory (measured: 158 MiB peak for a 150 MB chain.db, 80
        // without).
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .map_err(|e| fail("begin", e))?;
        self.conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| fail("start the read transaction", e))?;
        let witness = LockWitness::take(&self.path, &rel);
        Ok(OpenSnapshot {
            rel: rel.clone(),
            conn: self.conn,
            witness,
            _hold: self._hold,
        })
    }
}

/// The pages of a database, read inside a snapshot: `sqlite_dbpage`, page 1 first.
const PAGES_QUERY: &str = "SELECT pgno, data FROM sqlite_dbpage";

impl OpenSnapshot {
    /// Runs the height query inside the snapshot.
    pub fn head(&self, query: &str) -> Result<Head, String> {
        read_head(&self.conn, query).map_err(|e| format!("{}: height query: {e}", self.rel))
    }

    /// True when the pages can be read from the snapshot while the node writes: WAL mode, and
    /// a SQLite with `sqlite_dbpage`.
    pub fn readable_in_place(&self) -> bool {
        let wal = self
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
            .is_ok_and(|mode| mode.eq_ignore_ascii_case("wal"));
        wal && self.conn.prepare(PAGES_QUERY).is_ok()
    }

    /// The chain check of [`check_chain`], inside the snapshot.
    pub fn check_chain(&self, height_query: &str) -> Result<Head, String> {
        chain_head(&self.conn, height_query)
    }

    /// Page size and number of pages of the snapshot.
    pub fn page_layout(&self) -> Result<(u32, u64), String> {
        let pragma = |name: &str| {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                .map_err(|e| format!("{}: {name}: {e}", self.rel))
        };
        let size = u32::try_from(pragma("page_size")?).map_err(|e| e.to_string())?;
        let count = u64::try_from(pragma("page_count")?).map_err(|e| e.to_string())?;
        Ok((size, count))
    }

    /// Hands every page of the snapshot to `each`, in order.
    pub fn for_each_page(
        &self,
        mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let fail = |e: rusqlite::Error| std::io::Error::other(format!("{}: pages: {e}", self.rel));
        let mut stmt = self.conn.prepare(PAGES_QUERY).map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        let mut expected = 1i64;
        while let Some(row) = rows.next().map_err(fail)? {
            let pgno: i64 = row.get(0).map_err(fail)?;
            if pgno != expected {
                return Err(std::io::Error::other(format!(
                    "{}: page {pgno} came where page {expected} was due",
                    self.rel
                )));
            }
            let data =
                row.get_ref(1).map_err(fail)?.as_blob().map_err(|e| {
                    std::io::Error::other(format!("{}: page {pgno}: {e}", self.rel))
                })?;
            each(data)?;
            expected += 1;
        }
        self.locks_kept().map_err(std::io::Error::other)
    }

    /// Err when the snapshot lost its locks since it was taken (see `held.rs`).
    pub fn locks_kept(&self) -> Result<(), String> {
        self.witness.check()
    }

    /// Copies the snapshot into a new database file at `dest` and ends the transaction.
    pub fn copy_to(self, dest: &Path) -> Result<PathBuf, String> {
        let fail = |what: &str, e: rusqlite::Error| format!("{}: {what}: {e}", self.rel);
        let _ = std::fs::remove_file(dest);
        let mut target = Connection::open(dest).map_err(|e| fail("create the copy", e))?;
        // A scratch file: no journal and no fsyncs (the copy is streamed, then deleted).
        target
            .execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
            .map_err(|e| fail("set up the copy", e))?;
        {
            let backup = rusqlite::backup::Backup::new(&self.conn, &mut target)
                .map_err(|e| fail("start the copy", e))?;
            match backup.step(-1).map_err(|e| fail("copy", e))? {
                rusqlite::backup::StepResult::Done => {}
                other => return Err(format!("{}: copy stopped early: {other:?}", self.rel)),
            }
        }
        target.close().map_err(|(_, e)| fail("close the copy", e))?;
        self.locks_kept()?;
        self.conn
            .execute_batch("COMMIT")
            .map_err(|e| fail("end the read transaction", e))?;
        Ok(dest.to_owned())
    }
}

/// Writers held off one database: `BEGIN IMMEDIATE` on a connection of its own thread, rolled
/// back at [`WriteFence::release`], when dropped, or at the deadline, whichever is first. The
/// deadline counts from the moment the fence asked for the lock, and the wait for it (busy
/// timeout) comes out of the same budget.
pub struct WriteFence {
    release: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
    since: Instant,
    deadline: Instant,
}

impl WriteFence {
    pub fn raise(
        path: &Path,
        rel: &str,
        busy_timeout: Duration,
        max_pause: Duration,
    ) -> Result<WriteFence, String> {
        let fail = |what: &str, e: rusqlite::Error| format!("{rel}: fence: {what}: {e}");
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| fail("open", e))?;
        conn.busy_timeout(busy_timeout.min(max_pause))
            .map_err(|e| fail("busy timeout", e))?;
        let since = Instant::now();
        let deadline = since + max_pause;
        if let Err(err) = conn.execute_batch("BEGIN IMMEDIATE") {
            return Err(not_granted(path, rel, max_pause, err));
        }
        let (release, released) = mpsc::channel::<()>();
        let rel = rel.to_owned();
        let thread = std::thread::spawn(move || {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(mpsc::RecvTimeoutError::Timeout) = released.recv_timeout(left) {
                tracing::warn!(database = %rel, pause = ?max_pause, "fence deadline passed before release; letting writers go");
            }
            let _ = conn.execute_batch("ROLLBACK");
        });
        Ok(WriteFence {
            release,
            thread,
            since,
            deadline,
        })
    }

    /// Whether the fence still holds writers (its deadline has not passed).
    pub fn holding(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Lets writers go; how long they could have waited (from the request for the lock).
    pub fn release(self) -> Duration {
        drop(self.release);
        let _ = self.thread.join();
        self.since.elapsed()
    }
}

/// Why `BEGIN IMMEDIATE` failed, naming the processes holding the write lock when it was busy.
fn not_granted(path: &Path, rel: &str, max_pause: Duration, err: rusqlite::Error) -> String {
    if err.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) {
        return format!("{rel}: fence: BEGIN IMMEDIATE: {err}");
    }
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    let holders = held::writers_of(&[path.to_owned(), shm.into()]);
    let who = if holders.is_empty() {
        "another connection held its write lock".to_owned()
    } else {
        let names: Vec<String> = holders
            .iter()
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect();
        format!("its write lock is held by {}", names.join(", "))
    };
    format!(
        "could not fence {rel} within ledger.fence_max_pause ({max_pause:?}): {who}; end that \
         write transaction or raise the pause"
    )
}

fn read_head(conn: &Connection, query: &str) -> Result<Head, String> {
    let (height, hash): (i64, String) = conn
        .query_row(query, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => "the chain has no blocks".to_owned(),
        other => other.to_string(),
    })?;
    let height = u64::try_from(height).map_err(|_| format!("negative height {height}"))?;
    Ok(Head { height, hash })
}

/// `PRAGMA integrity_check` of a database file; Err names the first problems.
pub fn integrity_check(path: &Path) -> Result<(), String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| e.to_string())?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| e.to_string())?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.take(5).collect())
        .map_err(|e| e.to_string())?;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(rows.join("; "))
    }
}

/// Checks that the blocks form one unbroken chain up to its head (every block's `parent_hash` is
/// the previous block's `hash`, heights without gaps) and returns the head.
pub fn check_chain(path: &Path, height_query: &str) -> Result<Head, String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| e.to_string())?;
    chain_head(&conn, height_query)
}

fn chain_head(conn: &Connection, height_query: &str) -> Result<Head, String> {
    let head = read_head(conn, height_query)?;
    let mut stmt = conn
        .prepare("SELECT height, hash, parent_hash FROM block ORDER BY height")
        .map_err(|e| e.to_string())?;
    let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
    let mut previous: Option<(i64, String)> = None;
    let mut last: Option<(i64, String)> = None;
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        let (height, hash, parent): (i64, String, String) = (
            row.get(0).map_err(|e| e.to_string())?,
            row.get(1).map_err(|e| e.to_string())?,
            row.get(2).map_err(|e| e.to_string())?,
        );
        if let Some((prev_height, prev_hash)) = &previous {
            if height != prev_height + 1 {
                return Err(format!("block {prev_height} is followed by block {height}"));
            }
            if &parent != prev_hash {
                return Err(format!(
                    "block {height} names parent {parent}, but block {prev_height} is {prev_hash}"
                ));
            }
        }
        previous = Some((height, hash.clone()));
        last = Some((height, hash));
    }
    match last {
        Some((height, hash)) if height as u64 == head.height && hash == head.hash => Ok(head),
        Some((height, hash)) => Err(format!(
            "the last block is {height} {hash}, the height query says {} {}",
            head.height, head.hash
        )),
        None => Err("the chain has no blocks".to_owned()),
    }
}
