//! Just enough of pg_dump's custom archive format to give a dump written to a pipe the data
//! offsets it lacks. `pg_dump` can record where each table's data starts only when its output
//! is seekable; streamed into the repository it is not, and `pg_restore --jobs` then makes every
//! worker scan the file for its blocks (about 10 % slower here). After a dump is spooled back to
//! a file, [`fill_offsets`] walks the header, the table of contents and the data blocks, and
//! writes each entry's offset in place: same size, same meaning as if pg_dump had done it.
//! Anything unexpected leaves the file untouched (it restores as it is).

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, bail};

const MAGIC: &[u8] = b"PGDMP";
const FORMAT_CUSTOM: u8 = 1;
const OFFSET_NOT_SET: u8 = 1;
const OFFSET_SET: u8 = 2;
const BLOCK_DATA: u8 = 1;
const BLOCK_BLOBS: u8 = 3;

/// Archive versions as pg_dump numbers them (major, minor, revision).
const fn version(major: u8, minor: u8) -> (u8, u8) {
    (major, minor)
}

struct Reader<R> {
    input: BufReader<R>,
    position: u64,
    int_size: usize,
    offset_size: usize,
}

impl<R: Read> Reader<R> {
    fn byte(&mut self) -> std::io::Result<u8> {
        let mut b = [0u8; 1];
        self.input.read_exact(&mut b)?;
        self.position += 1;
        Ok(b[0])
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let copied = std::io::copy(&mut (&mut self.input).take(n), &mut std::io::sink())?;
        self.position += copied;
        if copied < n {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// pg_dump's integer: a sign byte, then `int_size` bytes, least significant first.
    fn int(&mut self) -> std::io::Result<i64> {
        let negative = self.byte()? != 0;
        let mut value: i64 = 0;
        for i in 0..self.int_size {
            value |= i64::from(self.byte()?) << (8 * i);
        }
        Ok(if negative { -value } else { value })
    }

    /// A string: its length (negative for NULL), then the bytes.
    fn string(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let len = self.int()?;
        if len < 0 {
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.input.read_exact(&mut data)?;
        self.position += len as u64;
        Ok(Some(data))
    }

    fn skip_strings(&mut self, n: usize) -> std::io::Result<()> {
        (0..n).try_for_each(|_| self.string().map(drop))
    }
}

/// Writes the data offsets into a custom-format dump that lacks them; returns how many
/// entries were filled in.
pub fn fill_offsets(path: &Path) -> anyhow::Result<usize> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut r = Reader {
        input: BufReader::with_capacity(1 << 20, file.try_clone()?),
        position: 0,
        int_size: 4,
        offset_size: 8,
    };
    let mut magic = [0u8; 5];
    r.input.read_exact(&mut magic)?;
    r.position = 5;
    if magic != MAGIC {
        bail!("not a pg_dump custom archive");
    }
    let (major, minor) = (r.byte()?, r.byte()?);
    let _revision = r.byte()?;
    let v = version(major, minor);
    if v < version(1, 14) || v > version(1, 16) {
        bail!("archive version {major}.{minor} is not one this agent knows (1.14-1.16)");
    }
    r.int_size = usize::from(r.byte()?);
    r.offset_size = usize::from(r.byte()?);
    if r.byte()? != FORMAT_CUSTOM || r.int_size > 8 || r.offset_size > 8 {
        bail!("not a custom-format archive");
    }
    if v >= version(1, 15) {
        r.byte()?; // compression algorithm
    } else {
        r.int()?; // compression level
    }
    for _ in 0..7 {
        r.int()?; // creation time
    }
    r.skip_strings(3)?; // database name, server version, pg_dump version

    // Table of contents: remember where each entry's offset field is.
    let entries = r.int()?;
    let mut unset: Vec<(i64, u64)> = Vec::new();
    for _ in 0..entries {
        let dump_id = r.int()?;
        r.int()?; // had a dumper
        r.skip_strings(2)?; // table oid, oid
        r.skip_strings(2)?; // tag, description
        r.int()?; // section
        r.skip_strings(3)?; // definition, drop statement, copy statement
        r.skip_strings(3)?; // namespace, tablespace, table access method
        if v >= version(1, 16) {
            r.int()?; // relkind
        }
        r.skip_strings(2)?; // owner, "false" (with oids)
        while r.string()?.is_some() {} // dependencies, up to a NULL
        let field = r.position;
        let flag = r.byte()?;
        r.skip(r.offset_size as u64)?;
        if flag == OFFSET_NOT_SET {
            unset.push((dump_id, field));
        }
    }
    if unset.is_empty() {
        return Ok(0);
    }

    // Data blocks: where each one starts.
    let mut starts: HashMap<i64, u64> = HashMap::new();
    loop {
        let start = r.position;
        let block = match r.byte() {
            Ok(b) => b,
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(err) => return Err(err.into()),
        };
        let dump_id = r.int()?;
        starts.insert(dump_id, start);
        match block {
            BLOCK_DATA => skip_chunks(&mut r)?,
            BLOCK_BLOBS => {
                while r.int()? != 0 {
                    skip_chunks(&mut r)?;
                }
            }
            other => bail!("unknown block type {other} at byte {start}"),
        }
    }

    let mut file = file;
    let mut filled = 0;
    for (dump_id, field) in unset {
        let Some(start) = starts.get(&dump_id) else {
            continue;
        };
        let mut bytes = vec![OFFSET_SET];
        bytes.extend((0..r.offset_size).map(|i| (start >> (8 * i)) as u8));
        file.seek(SeekFrom::Start(field))?;
        file.write_all(&bytes)?;
        filled += 1;
    }
    Ok(filled)
}

/// Data chunks of one block: a length, the bytes, ... up to a zero length.
fn skip_chunks<R: Read>(r: &mut Reader<R>) -> anyhow::Result<()> {
    loop {
        let len = r.int()?;
        if len == 0 {
            return Ok(());
        }
        if len < 0 {
            bail!("negative chunk length at byte {}", r.position);
        }
        r.skip(len as u64)?;
    }
}
