//! The replication stream's framing, both directions: the master's answer to `PSYNC` (newline
//! keepalives while it defers the sync, then `+FULLRESYNC`), reading the RDB a master sends
//! after it (length-prefixed, or diskless with an EOF mark; newline keepalives before either),
//! and a reader that copies what it reads to a writer (the pipeline or a replica).
//!
//! What a master sends a replica that asked `PSYNC ? -1` (Redis 7, `replication.c`): the full
//! sync starts at once when no RDB child runs and the sync is on disk, or diskless with
//! `repl-diskless-sync-delay 0`. Otherwise it is deferred: diskless with a delay (replicas
//! arriving within it share one fork), an RDB child already streaming to other replicas
//! ("waiting for next BGSAVE"), a disk BGSAVE this replica cannot attach to, or another child
//! (AOF rewrite). While deferred the replica is in `WAIT_BGSAVE_START` and gets a `\n` every
//! second (`replicationCron`); `+FULLRESYNC <replid> <offset>` comes when the fork happens. A
//! replica attached to a disk BGSAVE already running gets `+FULLRESYNC` at once with that
//! fork's (older) offset, then `\n` every second until the file is written and `$<len>`
//! follows. `+CONTINUE` answers only a partial resync, never `PSYNC ? -1`; `-LOADING` and
//! `-NOMASTERLINK` mean "try later".

use std::io::{BufRead, Read, Write};

use anyhow::{Context, bail};

/// How the master frames the RDB payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    /// Diskless: the payload ends with these 40 bytes.
    EofMark(Vec<u8>),
}

/// The master's answer to `PSYNC ? -1`, one line at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsyncLine {
    /// A newline: the master defers the sync (it waits to fork).
    Keepalive,
    /// The fork happened (or an older one is shared): the master's replication id and its
    /// offset at that fork.
    FullResync { replid: String, offset: u64 },
    /// The server cannot serve a sync now (`-LOADING`, `-NOMASTERLINK`): ask again later.
    TryLater(String),
}

/// Reads one line of the master's answer to `PSYNC ? -1`. Refusals, a partial resync offer and
/// anything unknown are errors that quote the line.
pub fn read_psync_line(input: &mut impl BufRead) -> anyhow::Result<PsyncLine> {
    let mut line = Vec::new();
    if input
        .read_until(b'\n', &mut line)
        .context("wait for the answer to PSYNC")?
        == 0
    {
        bail!("the master closed the connection before answering PSYNC");
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.trim_end();
    if text.is_empty() {
        return Ok(PsyncLine::Keepalive);
    }
    if let Some(rest) = text.strip_prefix("+FULLRESYNC ") {
        let mut words = rest.split_whitespace();
        if let (Some(replid), Some(offset), None) = (words.next(), words.next(), words.next())
            && let Ok(offset) = offset.parse()
        {
            return Ok(PsyncLine::FullResync {
                replid: replid.to_owned(),
                offset,
            });
        }
        bail!("malformed FULLRESYNC `{text}`");
    }
    if text.starts_with("+CONTINUE") {
        bail!("the master offered a partial resync (`{text}`) to a full sync request");
    }
    if let Some(err) = text.strip_prefix('-') {
        if err.starts_with("LOADING") || err.starts_with("NOMASTERLINK") {
            return Ok(PsyncLine::TryLater(err.to_owned()));
        }
        bail!("the master refused the sync: {err}");
    }
    bail!("unexpected answer to PSYNC: `{text}`");
}

/// Reads the payload header, skipping keepalive newlines.
pub fn read_header(input: &mut impl BufRead) -> anyhow::Result<Framing> {
    loop {
        let mut line = Vec::new();
        if input
            .read_until(b'\n', &mut line)
            .context("wait for the RDB payload")?
            == 0
        {
            bail!("the master closed the connection before sending the RDB");
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue; // keepalive while the master forks
        }
        if let Some(mark) = text.strip_prefix("$EOF:") {
            if mark.len() != 40 {
                bail!("malformed diskless RDB header `{text}`");
            }
            return Ok(Framing::EofMark(mark.as_bytes().to_vec()));
        }
        if let Some(len) = text.strip_prefix('$') {
            return Ok(Framing::Length(
                len.parse()
                    .with_context(|| format!("malformed RDB header `{text}`"))?,
            ));
        }
        if let Some(err) = text.strip_prefix('-') {
            bail!("the master refused the sync: {err}");
        }
        bail!("unexpected line before the RDB payload: `{text}`");
    }
}

/// The payload: exactly its length, or everything up to the EOF mark (held back 40 bytes at a
/// time, so the mark itself is never passed on). An early end is an error.
pub struct Payload<R> {
    input: R,
    framing: Framing,
    remaining: u64,
    pending: Vec<u8>,
    done: bool,
}

impl<R: Read> Payload<R> {
    pub fn new(input: R, framing: Framing) -> Self {
        let remaining = match &framing {
            Framing::Length(n) => *n,
            Framing::EofMark(_) => 0,
        };
        Payload {
            input,
            framing,
            remaining,
            pending: Vec::new(),
            done: false,
        }
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the replication connection closed in the middle of the RDB",
    )
}

impl<R: Read> Read for Payload<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.framing {
            Framing::Length(_) => {
                if self.remaining == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let want = buf
                    .len()
                    .min(self.remaining.min(usize::MAX as u64) as usize);
                let n = self.input.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(truncated());
                }
                self.remaining -= n as u64;
                Ok(n)
            }
            Framing::EofMark(mark) => loop {
                let keep = if self.done { 0 } else { mark.len() };
                if self.pending.len() > keep {
                    let n = buf.len().min(self.pending.len() - keep);
                    buf[..n].copy_from_slice(&self.pending[..n]);
                    self.pending.drain(..n);
                    return Ok(n);
                }
                if self.done {
                    return Ok(0);
                }
                if buf.len() > 2 * mark.len() {
                    // Read straight into the caller's buffer, behind the bytes held back, and
                    // hold back the new last 40 bytes (they may be the mark).
                    let held = self.pending.len();
                    buf[..held].copy_from_slice(&self.pending);
                    let n = self.input.read(&mut buf[held..])?;
                    if n == 0 {
                        return Err(truncated());
                    }
                    let total = held + n;
                    let tail = total.saturating_sub(mark.len());
                    self.pending.clear();
                    self.pending.extend_from_slice(&buf[tail..total]);
                    if self.pending == *mark {
                        self.pending.clear();
                        self.done = true;
                    }
                    if tail > 0 {
                        return Ok(tail);
                    }
                    continue;
                }
                let mut chunk = [0u8; 4096];
                let n = self.input.read(&mut chunk)?;
                if n == 0 {
                    return Err(truncated());
                }
                self.pending.extend_from_slice(&chunk[..n]);
                if self.pending.ends_with(mark) {
                    let len = self.pending.len() - mark.len();
                    self.pending.truncate(len);
                    self.done = true;
                }
            },
        }
    }
}

/// Copies everything read through it to `out`.
pub struct Tee<R, W> {
    pub input: R,
    pub out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out at most `.1` bytes per read.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn psync_answers_are_read_as_a_replica_reads_them() {
        let mut input: &[u8] = b"\n\n\n+FULLRESYNC 8de1787ba490483314a4d30f1c628bc5025eb761 2\r\n";
        for _ in 0..3 {
            assert_eq!(
                read_psync_line(&mut input).expect("line"),
                PsyncLine::Keepalive
            );
        }
        assert_eq!(
            read_psync_line(&mut input).expect("line"),
            PsyncLine::FullResync {
                replid: "8de1787ba490483314a4d30f1c628bc5025eb761".to_owned(),
                offset: 2
            }
        );
        let mut input: &[u8] = b"-LOADING Redis is loading the dataset in memory\r\n";
        assert!(matches!(
            read_psync_line(&mut input).expect("line"),
            PsyncLine::TryLater(e) if e.starts_with("LOADING")
        ));
        for (answer, says) in [
            (
                &b"+CONTINUE 8de1787ba490483314a4d30f1c628bc5025eb761\r\n"[..],
                "partial resync",
            ),
            (
                b"-NOPERM this user has no permissions\r\n",
                "refused the sync: NOPERM",
            ),
            (b"+FULLRESYNC x\r\n", "malformed FULLRESYNC"),
            (b"$5\r\n", "unexpected answer to PSYNC: `$5`"),
            (b"", "closed the connection"),
        ] {
            let mut input = answer;
            let err = read_psync_line(&mut input).expect_err("not a full sync");
            assert!(format!("{err:#}").contains(says), "{err:#}");
        }
    }

    #[test]
    fn both_framings_yield_exactly_the_payload() {
        let mut input: &[u8] = b"\n\n$5\r\nhelloEXTRA";
        let framing = read_header(&mut input).expect("header");
        assert_eq!(framing, Framing::Length(5));
        let mut out = Vec::new();
        Payload::new(&mut input, framing)
            .read_to_end(&mut out)
            .expect("payload");
        assert_eq!(out, b"hello");

        let mark = "a".repeat(40);
        let body = format!("\n$EOF:{mark}\r\n{}{mark}", "x".repeat(100_000));
        let mut input = body.as_bytes();
        let framing = read_header(&mut input).expect("header");
        let mut out = Vec::new();
        Payload::new(&mut input, framing)
            .read_to_end(&mut out)
            .expect("payload");
        assert_eq!(out.len(), 100_000);
        assert!(out.iter().all(|b| *b == b'x'));

        // Any split of the input and any size of read yield the payload without the mark.
        for (piece, read_size) in [(1, 7), (13, 100), (97, 4096), (100_000, 81), (40, 1)] {
            let mut input = Trickle(body.as_bytes(), piece);
            let framing =
                read_header(&mut std::io::BufReader::with_capacity(1, &mut input)).expect("header");
            let mut payload = Payload::new(&mut input, framing);
            let mut out = Vec::new();
            let mut buf = vec![0u8; read_size];
            loop {
                let n = payload.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            assert_eq!(
                out.len(),
                100_000,
                "pieces of {piece}, reads of {read_size}"
            );
            assert!(out.iter().all(|b| *b == b'x'));
        }

        let mut cut_short: &[u8] = b"$10\r\nhello";
        let framing = read_header(&mut cut_short).expect("header");
        let err = Payload::new(&mut cut_short, framing)
            .read_to_end(&mut Vec::new())
            .expect_err("truncated");
        assert!(err.to_string().contains("closed in the middle"), "{err}");
    }
}
