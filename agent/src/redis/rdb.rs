//! Walks an RDB stream as it passes (backup and restore): checks it is whole, counts the keys
//! of every database and samples a few keys with a digest of their serialized value, which is
//! exactly what `DUMP` returns for them (minus its version and CRC footer). Values are skipped,
//! never decoded. A type this agent does not know (a module's, or a newer Redis's) ends the
//! walk without failing it: the stream is still stored whole, the counts are marked unknown.

use std::collections::BTreeMap;
use std::io::Read;

use aitbc_backup_repository::manifest::{RedisDb as DbCount, RedisSample as Sample};

/// Keys sampled per stream.
const SAMPLES: usize = 64;
/// The first keys are always sampled, then about one in 256 by the hash of the name.
const FIRST_SAMPLES: usize = 16;
/// Values larger than this are not sampled (their bytes would be held in memory).
const SAMPLE_MAX_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub version: u32,
    pub databases: BTreeMap<u32, DbCount>,
    pub samples: Vec<Sample>,
    /// Expiry times of keys expiring before `expiring_before` (restore: which keys may be gone
    /// by the time the counts are checked).
    pub expiring: Vec<i64>,
    /// Why the walk stopped before the end, if it did.
    pub incomplete: Option<String>,
    /// Strings stored LZF-compressed (none when the server saved with `rdbcompression no`).
    pub lzf_strings: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RdbError {
    #[error("not an RDB stream (header {0:?})")]
    Header(String),
    #[error("the RDB stream ended early, at byte {0} (a truncated transfer)")]
    Truncated(u64),
    #[error("reading the RDB stream: {0}")]
    Io(#[from] std::io::Error),
}

struct Walker<'a> {
    input: &'a mut dyn Read,
    offset: u64,
    capture: Option<Vec<u8>>,
    lzf_strings: u64,
    scratch: Vec<u8>,
}

enum Length {
    Plain(u64),
    Encoded(u8),
}

/// Walks `input` to the RDB's end marker. `expiring_before`: collect expiry times earlier
/// than this (Unix ms).
pub fn walk(input: &mut dyn Read, expiring_before: Option<i64>) -> Result<Summary, RdbError> {
    let mut w = Walker {
        input,
        offset: 0,
        capture: None,
        lzf_strings: 0,
        scratch: vec![0; 64 * 1024],
    };
    let header = w.bytes(9)?;
    let text = String::from_utf8_lossy(&header).into_owned();
    let version = text
        .strip_prefix("REDIS")
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or(RdbError::Header(text))?;
    let mut summary = Summary {
        version,
        ..Default::default()
    };
    let mut db = 0u32;
    let mut expire: Option<i64> = None;
    loop {
        let opcode = w.byte()?;
        match opcode {
            0xFF => {
                if version >= 5 {
                    w.skip(8)?;
                }
                summary.lzf_strings = w.lzf_strings;
                return Ok(summary);
            }
            0xFE => {
                db = w.plain_length()? as u32;
                summary.databases.entry(db).or_insert_with(|| DbCount {
                    db,
                    ..Default::default()
                });
            }
            0xFD => expire = Some(i64::from(u32::from_le_bytes(w.array()?)) * 1000),
            0xFC => expire = Some(i64::from_le_bytes(w.array()?)),
            0xFB => {
                w.plain_length()?;
                w.plain_length()?;
            }
            0xFA => {
                w.skip_string()?;
                w.skip_string()?;
            }
            0xF9 => w.skip(1)?,
            0xF8 => {
                w.plain_length()?;
            }
            0xF7 => {
                w.plain_length()?; // module id
                w.plain_length()?; // when opcode
                w.plain_length()?; // when
                w.module_values()?;
            }
            0xF5 => w.skip_string()?,
            kind => {
                let key = w.string()?;
                let count = summary.databases.entry(db).or_insert_with(|| DbCount {
                    db,
                    ..Default::default()
                });
                count.keys += 1;
                if let Some(at) = expire {
                    count.expires += 1;
                    if expiring_before.is_some_and(|limit| at < limit) {
                        summary.expiring.push(at);
                    }
                }
                let sampled = order_stable(kind)
                    && summary.samples.len() < SAMPLES
                    && (summary.samples.len() < FIRST_SAMPLES
                        || blake3::hash(&key).as_bytes()[0] == 0);
                if sampled {
                    w.capture = Some(vec![kind]);
                }
                if !w.value(kind)? {
                    summary.incomplete = Some(format!(
                        "RDB value type {kind} is unknown to this agent (a module's or a newer Redis's); key counts are not checked"
                    ));
                    summary.lzf_strings = w.lzf_strings;
                    return Ok(summary);
                }
                if let Some(bytes) = w.capture.take()
                    && bytes.len() <= SAMPLE_MAX_BYTES
                {
                    summary.samples.push(Sample {
                        db,
                        key_hex: hex::encode(&key),
                        value_blake3: blake3::hash(&bytes).to_hex().to_string(),
                        expire_ms: expire,
                    });
                }
                expire = None;
            }
        }
    }
}

/// Whether a value's serialization is the same on every server holding it: not for sets and
/// hashes stored as hash tables, whose order depends on each process's hash seed.
fn order_stable(kind: u8) -> bool {
    !matches!(kind, 2 | 4 | 6 | 7)
}

/// Reads `input` to its end (what follows a partial walk).
pub fn drain(input: &mut dyn Read) -> std::io::Result<u64> {
    std::io::copy(input, &mut std::io::sink())
}

impl Walker<'_> {
    fn fill(&mut self, n: usize) -> Result<(), RdbError> {
        if self.scratch.len() < n {
            self.scratch.resize(n, 0);
        }
        let buf = &mut self.scratch[..n];
        self.input.read_exact(buf).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                RdbError::Truncated(self.offset)
            } else {
                RdbError::Io(err)
            }
        })?;
        self.offset += n as u64;
        if let Some(capture) = &mut self.capture {
            if capture.len() + n <= SAMPLE_MAX_BYTES + 1 {
                capture.extend_from_slice(buf);
            } else {
                capture.resize(SAMPLE_MAX_BYTES + 1, 0);
            }
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, RdbError> {
        self.fill(1)?;
        Ok(self.scratch[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RdbError> {
        self.fill(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.scratch[..N]);
        Ok(out)
    }

    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, RdbError> {
        self.fill(n)?;
        Ok(self.scratch[..n].to_vec())
    }

    fn skip(&mut self, mut n: u64) -> Result<(), RdbError> {
        while n > 0 {
            let step = n.min(64 * 1024) as usize;
            self.fill(step)?;
            n -= step as u64;
        }
        Ok(())
    }

    fn length(&mut self) -> Result<Length, RdbError> {
        let first = self.byte()?;
        Ok(match first >> 6 {
            0 => Length::Plain(u64::from(first & 0x3F)),
            1 => Length::Plain((u64::from(first & 0x3F) << 8) | u64::from(self.byte()?)),
            2 if first == 0x80 => Length::Plain(u64::from(u32::from_be_bytes(self.array()?))),
            2 if first == 0x81 => Length::Plain(u64::from_be_bytes(self.array()?)),
            2 => return Err(RdbError::Header(format!("bad length byte {first:#x}"))),
            _ => Length::Encoded(first & 0x3F),
        })
    }

    fn plain_length(&mut self) -> Result<u64, RdbError> {
        match self.length()? {
            Length::Plain(n) => Ok(n),
            Length::Encoded(e) => Err(RdbError::Header(format!("unexpected encoded length {e}"))),
        }
    }

    /// A string's bytes (for key names; integers come back as their decimal text).
    fn string(&mut self) -> Result<Vec<u8>, RdbError> {
        match self.length()? {
            Length::Plain(n) => self.bytes(n as usize),
            Length::Encoded(0) => Ok(i64::from(self.byte()? as i8).to_string().into_bytes()),
            Length::Encoded(1) => Ok(i64::from(i16::from_le_bytes(self.array()?))
                .to_string()
                .into_bytes()),
            Length::Encoded(2) => Ok(i64::from(i32::from_le_bytes(self.array()?))
                .to_string()
                .into_bytes()),
            Length::Encoded(3) => {
                self.lzf_strings += 1;
                let compressed = self.plain_length()?;
                let raw = self.plain_length()?;
                let data = self.bytes(compressed as usize)?;
                lzf_decompress(&data, raw as usize)
                    .ok_or(RdbError::Header("corrupt LZF string".into()))
            }
            Length::Encoded(e) => Err(RdbError::Header(format!("unknown string encoding {e}"))),
        }
    }

    fn skip_string(&mut self) -> Result<(), RdbError> {
        match self.length()? {
            Length::Plain(n) => self.skip(n),
            Length::Encoded(0) => self.skip(1),
            Length::Encoded(1) => self.skip(2),
            Length::Encoded(2) => self.skip(4),
            Length::Encoded(3) => {
                self.lzf_strings += 1;
                let compressed = self.plain_length()?;
                self.plain_length()?;
                self.skip(compressed)
            }
            Length::Encoded(e) => Err(RdbError::Header(format!("unknown string encoding {e}"))),
        }
    }

    fn skip_strings(&mut self, n: u64) -> Result<(), RdbError> {
        (0..n).try_for_each(|_| self.skip_string())
    }

    /// Skips one value of `kind`; false if the kind is unknown.
    fn value(&mut self, kind: u8) -> Result<bool, RdbError> {
        match kind {
            // string; ziplist, intset, listpack encodings: one string each
            0 | 9..=13 | 16 | 17 | 20 => self.skip_string()?,
            // list, set
            1 | 2 => {
                let n = self.plain_length()?;
                self.skip_strings(n)?;
            }
            // zset: member, score as a length-prefixed ASCII double
            3 => {
                for _ in 0..self.plain_length()? {
                    self.skip_string()?;
                    let len = self.byte()?;
                    if len < 253 {
                        self.skip(u64::from(len))?;
                    }
                }
            }
            4 => {
                let n = self.plain_length()?;
                self.skip_strings(2 * n)?;
            }
            // zset2: member, binary double
            5 => {
                for _ in 0..self.plain_length()? {
                    self.skip_string()?;
                    self.skip(8)?;
                }
            }
            7 => {
                self.plain_length()?;
                self.module_values()?;
            }
            // quicklist of ziplists
            14 => {
                let n = self.plain_length()?;
                self.skip_strings(n)?;
            }
            // quicklist 2: container kind and node
            18 => {
                for _ in 0..self.plain_length()? {
                    self.plain_length()?;
                    self.skip_string()?;
                }
            }
            15 | 19 | 21 => self.stream(kind)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn stream(&mut self, kind: u8) -> Result<(), RdbError> {
        let nodes = self.plain_length()?;
        self.skip_strings(2 * nodes)?;
        // length, last id; v2+: first id, max deleted id, entries added
        let lengths = if kind >= 19 { 8 } else { 3 };
        for _ in 0..lengths {
            self.plain_length()?;
        }
        for _ in 0..self.plain_length()? {
            self.skip_string()?; // group name
            self.plain_length()?;
            self.plain_length()?; // last id
            if kind >= 19 {
                self.plain_length()?; // entries read
            }
            for _ in 0..self.plain_length()? {
                self.skip(16 + 8)?; // id, delivery time
                self.plain_length()?; // delivery count
            }
            for _ in 0..self.plain_length()? {
                self.skip_string()?; // consumer name
                self.skip(8)?; // seen time
                if kind >= 21 {
                    self.skip(8)?; // active time
                }
                let pending = self.plain_length()?;
                self.skip(16 * pending)?;
            }
        }
        Ok(())
    }

    /// A module value's self-describing opcodes, up to their end marker.
    fn module_values(&mut self) -> Result<(), RdbError> {
        loop {
            match self.plain_length()? {
                0 => return Ok(()),
                1 | 2 => {
                    self.plain_length()?;
                }
                3 => self.skip(4)?,
                4 => self.skip(8)?,
                5 => self.skip_string()?,
                other => return Err(RdbError::Header(format!("unknown module opcode {other}"))),
            }
        }
    }
}

/// LZF decompression (key names only; values are skipped compressed).
fn lzf_decompress(input: &[u8], expected: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(expected);
    let mut i = 0;
    while i < input.len() {
        let ctrl = usize::from(input[i]);
        i += 1;
        if ctrl < 32 {
            let run = ctrl + 1;
            out.extend_from_slice(input.get(i..i + run)?);
            i += run;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += usize::from(*input.get(i)?);
                i += 1;
            }
            let back = ((ctrl & 0x1F) << 8) + usize::from(*input.get(i)?) + 1;
            i += 1;
            let start = out.len().checked_sub(back)?;
            for k in 0..len + 2 {
                let b = out[start + k];
                out.push(b);
            }
        }
    }
    (out.len() == expected).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(n: usize) -> Vec<u8> {
        assert!(n < 64);
        vec![n as u8]
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = len(s.len());
        out.extend_from_slice(s);
        out
    }

    #[test]
    fn counts_keys_per_database_and_samples_values() {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend([0xFA]);
        rdb.extend(string(b"redis-ver"));
        rdb.extend(string(b"7.0.15"));
        rdb.extend([0xFE, 0, 0xFB, 2, 1]);
        rdb.extend([0]); // string
        rdb.extend(string(b"a"));
        rdb.extend(string(b"hello"));
        rdb.extend([0xFC]);
        rdb.extend(1_900_000_000_000i64.to_le_bytes());
        rdb.extend([1]); // list
        rdb.extend(string(b"l"));
        rdb.extend(len(2));
        rdb.extend(string(b"x"));
        rdb.extend([0xC0, 7]); // int8-encoded member
        rdb.extend([0xFE, 3, 0]); // db 3
        rdb.extend(string(b"b"));
        rdb.extend([0xC1, 0x39, 0x30]); // int16 12345
        rdb.extend([2]); // a set: its order is per process, so it is not sampled
        rdb.extend(string(b"s"));
        rdb.extend(len(1));
        rdb.extend(string(b"x"));
        rdb.extend([0xFF]);
        rdb.extend([0u8; 8]);
        let summary = walk(&mut rdb.as_slice(), Some(2_000_000_000_000)).expect("walk");
        assert_eq!(summary.version, 10);
        assert_eq!(
            summary.databases[&0],
            DbCount {
                db: 0,
                keys: 2,
                expires: 1
            }
        );
        assert_eq!(
            summary.databases[&3],
            DbCount {
                db: 3,
                keys: 2,
                expires: 0
            }
        );
        assert_eq!(summary.expiring, vec![1_900_000_000_000]);
        assert_eq!(summary.samples.len(), 3);
        assert_eq!(summary.samples[0].key_hex, hex::encode("a"));
        let mut dump = vec![0u8];
        dump.extend(string(b"hello"));
        assert_eq!(
            summary.samples[0].value_blake3,
            blake3::hash(&dump).to_hex().to_string()
        );
        assert_eq!(summary.samples[1].expire_ms, Some(1_900_000_000_000));
        assert!(summary.incomplete.is_none());

        let err = walk(&mut &rdb[..rdb.len() - 12], None).expect_err("truncated");
        assert!(err.to_string().contains("ended early"), "{err}");
        let err = walk(&mut &b"GARBAGE00xxxx"[..], None).expect_err("not rdb");
        assert!(err.to_string().contains("not an RDB"), "{err}");
    }

    #[test]
    fn lzf_round_trip_of_a_repeated_run() {
        // literal "ab" then a back reference of length 4 at distance 2: "ababab"
        let compressed = [1, b'a', b'b', (2 << 5), 1];
        assert_eq!(
            lzf_decompress(&compressed, 6).as_deref(),
            Some(&b"ababab"[..])
        );
    }
}
