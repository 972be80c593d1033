//! Databases page by page: a captured SQLite database goes into the stream as references to
//! its pages, so a backup stores only the pages that changed since the last one.
//!
//! A node's day of blocks rewrites thousands of index pages scattered over the whole file, so
//! content-defined chunks of megabytes would almost all change. Instead each page is hashed
//! and compared with the page at the same position in the previous backup (the page map, a
//! file in the scratch directory). An unchanged page becomes a slice of the chunk that already
//! holds it; changed pages are collected into packs of [`PACK_BYTES`] (ordinary chunks, stored
//! once) and referenced slice by slice. Runs of neighbouring pages merge into one reference.
//! The stream — and so the restore — is byte for byte the captured database: its pages as the
//! snapshot holds them.
//!
//! The page map holds one record per page: a 128-bit keyed hash of the page (the chunk id
//! function, truncated), the index of its chunk in the map's chunk table, and its offset in
//! that chunk. It is read and written sequentially, so memory does not grow with the database.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use aitbc_backup_repository::ChunkSink;
use aitbc_backup_repository::digest;
use aitbc_backup_repository::manifest::{ChunkRef, FileDigest, Slice};
use serde::{Deserialize, Serialize};

use super::archive;
use super::scan::Entry;
use super::sqlite::OpenSnapshot;

/// Changed pages are stored in chunks of this size.
pub const PACK_BYTES: usize = 1 << 20;
const RECORD_BYTES: usize = 24;

/// Where a database's pages are stored, for the next backup (kept in the file cache).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageMap {
    pub page_size: u32,
    pub pages: u64,
    /// The page records, in the scratch directory.
    pub file: PathBuf,
    /// The chunks the records point into.
    pub chunks: Vec<ChunkRef>,
    /// BLAKE3 of the records file as written: a map whose file changed since (a damaged
    /// scratch directory) is not used, so it cannot point a page at the wrong bytes.
    #[serde(default)]
    pub records_blake3: String,
}

/// One page: its hash, its chunk (an index into [`PageMap::chunks`]) and its offset there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    hash: [u8; 16],
    chunk: u32,
    offset: u32,
}

impl Record {
    fn read(from: &mut impl Read) -> std::io::Result<Record> {
        let mut b = [0u8; RECORD_BYTES];
        from.read_exact(&mut b)?;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&b[..16]);
        Ok(Record {
            hash,
            chunk: word(16),
            offset: word(20),
        })
    }

    fn write(&self, to: &mut impl Write) -> std::io::Result<()> {
        to.write_all(&self.hash)?;
        to.write_all(&self.chunk.to_le_bytes())?;
        to.write_all(&self.offset.to_le_bytes())
    }
}

/// The previous backup's map of a database, read page by page alongside the new capture.
struct Previous {
    map: PageMap,
    records: BufReader<File>,
    /// Per chunk of the map: still stored (checked once, on first use).
    stored: Vec<Option<bool>>,
}

impl Previous {
    fn open(map: &PageMap, page_size: u32) -> Option<Previous> {
        if map.page_size != page_size {
            return None;
        }
        match file_blake3(&map.file) {
            Ok(found) if found == map.records_blake3 => {}
            _ => {
                tracing::warn!(map = %map.file.display(), "a page map does not match its checksum; its database is read in full");
                return None;
            }
        }
        let records = BufReader::with_capacity(64 << 10, File::open(&map.file).ok()?);
        Some(Previous {
            stored: vec![None; map.chunks.len()],
            map: map.clone(),
            records,
        })
    }

    /// The chunk and offset holding page `index` if it is `hash` and its chunk is still
    /// stored. Must be called for every page in order.
    fn find(&mut self, sink: &ChunkSink, index: u64, hash: &[u8; 16]) -> Option<(usize, u32)> {
        if index >= self.map.pages {
            return None;
        }
        let record = Record::read(&mut self.records).ok()?;
        let chunk = record.chunk as usize;
        if &record.hash != hash || chunk >= self.map.chunks.len() {
            return None;
        }
        let stored =
            *self.stored[chunk].get_or_insert_with(|| sink.is_stored(&self.map.chunks[chunk]));
        stored.then_some((chunk, record.offset))
    }
}

/// Where a run of pages comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A chunk of the previous backup's map.
    Previous(usize),
    /// The pack being filled.
    Pack,
}

/// Neighbouring pages from neighbouring bytes of one source.
#[derive(Debug, Clone, Copy)]
struct Run {
    source: Origin,
    offset: u32,
    len: u32,
}

/// Builds the stream's references and the next page map for one database.
struct Writer<'a> {
    sink: &'a mut ChunkSink,
    previous: Option<Previous>,
    /// The new map's chunk table, and where each previous chunk is in it.
    chunks: Vec<ChunkRef>,
    renumbered: Vec<Option<u32>>,
    records: BufWriter<File>,
    pack: Vec<u8>,
    /// Index of the pack being filled in `chunks` (once it holds a page).
    pack_index: Option<u32>,
    /// Runs not yet appended: from the first run of the pack being filled on.
    runs: Vec<Run>,
}

/// Where a captured database's pages are read from.
pub enum Source<'a> {
    /// A copy of the snapshot (rollback-journal mode).
    Copy(&'a Path),
    /// The snapshot itself (WAL mode).
    Snapshot(&'a OpenSnapshot),
}

/// What a [`Source`]'s pages are read from.
enum Pages<'a> {
    Snapshot(&'a OpenSnapshot),
    File(File),
}

/// What [`write_database`] wrote.
pub struct WrittenDatabase {
    pub size: u64,
    /// None when a copy is not a whole number of pages (then it was written as plain bytes).
    pub map: Option<PageMap>,
    /// Of the pages as read from the snapshot (None for plain bytes).
    pub digest: Option<FileDigest>,
}

/// Writes the captured database as entry `entry` (tar header, then its pages) and its page map
/// to `map_file`. `previous` is the last backup's map of the same database.
pub fn write_database(
    sink: &mut ChunkSink,
    entry: &Entry,
    source: Source<'_>,
    previous: Option<&PageMap>,
    map_file: &Path,
) -> std::io::Result<WrittenDatabase> {
    // A copy is opened once: its header gives the layout, then its pages are read.
    let (page_size, pages, reader) = match source {
        Source::Snapshot(snapshot) => {
            let (page_size, pages) = snapshot.page_layout().map_err(std::io::Error::other)?;
            (page_size, pages, Pages::Snapshot(snapshot))
        }
        Source::Copy(copy) => {
            let mut file = File::open(copy).map_err(|e| super::scan::annotate(e, copy))?;
            let size = file.metadata()?.len();
            match page_size(&mut file)? {
                Some(page_size) if size.is_multiple_of(u64::from(page_size)) => {
                    (page_size, size / u64::from(page_size), Pages::File(file))
                }
                _ => {
                    archive::write_entry(sink, entry, copy)?;
                    return Ok(WrittenDatabase {
                        size,
                        map: None,
                        digest: None,
                    });
                }
            }
        }
    };
    let size = pages * u64::from(page_size);
    sink.write_all(&archive::header(entry, size)?)?;
    let mut digest = digest::Hasher::new(sink.offset());
    let previous = previous.and_then(|map| Previous::open(map, page_size));
    let renumbered = vec![None; previous.as_ref().map_or(0, |p| p.map.chunks.len())];
    let mut writer = Writer {
        sink,
        previous,
        chunks: Vec::new(),
        renumbered,
        records: BufWriter::with_capacity(64 << 10, File::create(map_file)?),
        pack: Vec::with_capacity(PACK_BYTES + page_size as usize),
        pack_index: None,
        runs: Vec::new(),
    };
    let mut index = 0u64;
    let mut each = |page: &[u8]| {
        if index == pages || page.len() != page_size as usize {
            return Err(std::io::Error::other(format!(
                "{}: the snapshot has more pages than its {pages}, or one of another size",
                entry.path
            )));
        }
        digest.update(page);
        writer.page(page, index)?;
        index += 1;
        Ok(())
    };
    match reader {
        Pages::Snapshot(snapshot) => snapshot.for_each_page(&mut each)?,
        Pages::File(mut file) => {
            let mut buf = vec![0u8; PACK_BYTES];
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                file.read_exact(&mut buf[..n])?;
                buf[..n]
                    .chunks(page_size as usize)
                    .try_for_each(&mut each)?;
                left -= n as u64;
            }
        }
    }
    if index != pages {
        return Err(std::io::Error::other(format!(
            "{}: {index} pages read of {pages}",
            entry.path
        )));
    }
    writer.flush_pack()?;
    let Writer {
        chunks,
        mut records,
        sink,
        ..
    } = writer;
    records.flush()?;
    records.get_ref().sync_all()?;
    // Pages are multiples of 512 bytes: the entry needs no padding.
    sink.boundary()?;
    let map = PageMap {
        page_size,
        pages,
        file: map_file.to_owned(),
        chunks,
        records_blake3: file_blake3(map_file)?,
    };
    Ok(WrittenDatabase {
        size,
        map: Some(map),
        digest: Some(digest.finish()),
    })
}

/// BLAKE3 (hex) of a file, read in one pass.
fn file_blake3(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The page size a SQLite header records (1 stands for 65536); None when it is not one.
fn page_size(file: &mut File) -> std::io::Result<Option<u32>> {
    let mut header = [0u8; 18];
    let read = file.read(&mut header)?;
    std::io::Seek::rewind(file)?;
    if read < header.len() || &header[..16] != super::scan::SQLITE_MAGIC {
        return Ok(None);
    }
    let size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u32::from(n),
    };
    Ok((size.is_power_of_two() && (512..=65_536).contains(&size)).then_some(size))
}

impl Writer<'_> {
    fn page(&mut self, page: &[u8], index: u64) -> std::io::Result<()> {
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&self.sink.chunk_id(page).as_bytes()[..16]);
        let found = self
            .previous
            .as_mut()
            .and_then(|p| p.find(self.sink, index, &hash));
        let (source, chunk, offset) = match found {
            Some((chunk, offset)) => (Origin::Previous(chunk), self.renumber(chunk), offset),
            None => {
                let at = self.pack.len() as u32;
                self.pack.extend_from_slice(page);
                (Origin::Pack, self.pack_index(), at)
            }
        };
        Record {
            hash,
            chunk,
            offset,
        }
        .write(&mut self.records)?;
        self.push_run(Run {
            source,
            offset,
            len: page.len() as u32,
        })?;
        if self.pack.len() >= PACK_BYTES {
            self.flush_pack()?;
        }
        Ok(())
    }

    /// The new table's index of a previous chunk (added on first use).
    fn renumber(&mut self, chunk: usize) -> u32 {
        if let Some(index) = self.renumbered[chunk] {
            return index;
        }
        let index = self.chunks.len() as u32;
        let previous = self.previous.as_ref().map(|p| p.map.chunks[chunk].clone());
        self.chunks.extend(previous);
        self.renumbered[chunk] = Some(index);
        index
    }

    /// The pack's index in the new table; its entry is filled in when the pack is stored.
    fn pack_index(&mut self) -> u32 {
        *self.pack_index.get_or_insert_with(|| {
            self.chunks
                .push(ChunkRef::whole(String::new(), 0, ChunkSink::PACK));
            self.chunks.len() as u32 - 1
        })
    }

    fn push_run(&mut self, run: Run) -> std::io::Result<()> {
        if let Some(last) = self.runs.last_mut()
            && last.source == run.source
            && last.offset + last.len == run.offset
        {
            last.len += run.len;
            return Ok(());
        }
        // Runs before the pack's first are final: append them now.
        if !self.runs.iter().any(|r| r.source == Origin::Pack) {
            let ready = std::mem::take(&mut self.runs);
            for run in ready {
                self.append(run, None)?;
            }
        }
        self.runs.push(run);
        Ok(())
    }

    /// Stores the pack (if it holds pages) and appends every waiting run.
    fn flush_pack(&mut self) -> std::io::Result<()> {
        let mut pack = None;
        if let Some(index) = self.pack_index.take() {
            let capacity = self.pack.capacity();
            let data = std::mem::replace(&mut self.pack, Vec::with_capacity(capacity));
            let raw_len = data.len() as u32;
            let id = self.sink.store_pack(data)?;
            let entry = &mut self.chunks[index as usize];
            entry.id = id;
            entry.raw_len = raw_len;
            pack = Some(entry.clone());
        }
        for run in std::mem::take(&mut self.runs) {
            self.append(run, pack.as_ref())?;
        }
        Ok(())
    }

    fn append(&mut self, run: Run, pack: Option<&ChunkRef>) -> std::io::Result<()> {
        let chunk = match run.source {
            Origin::Pack => pack.cloned(),
            Origin::Previous(chunk) => self.previous.as_ref().map(|p| p.map.chunks[chunk].clone()),
        }
        .ok_or_else(|| std::io::Error::other("a page run without its chunk"))?;
        let whole = run.offset == 0 && run.len == chunk.raw_len;
        self.sink.append(ChunkRef {
            slice: (!whole).then_some(Slice {
                offset: run.offset,
                len: run.len,
            }),
            ..chunk
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let record = Record {
            hash: [7; 16],
            chunk: 3,
            offset: 4096,
        };
        let mut bytes = Vec::new();
        record.write(&mut bytes).expect("write");
        assert_eq!(bytes.len(), RECORD_BYTES);
        assert_eq!(Record::read(&mut &bytes[..]).expect("read"), record);
    }
}
