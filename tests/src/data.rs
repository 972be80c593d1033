//! Test data: deterministic, fast to generate, a mix of incompressible and compressible blocks
//! (like a ledger directory: compressed blobs beside JSON and SQLite pages).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const BLOCK: usize = 16 << 10;

/// Fills `out` with the bytes of the stream `seed` starting at byte `offset` (block aligned).
fn fill_block(seed: u64, index: u64, out: &mut [u8]) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    let mut xof = hasher.finalize_xof();
    // Two blocks in three are random, one is text-like (compresses about 5x).
    if index % 3 == 2 {
        const LINE: &[u8] = b"{\"height\":000000,\"tx\":\"transfer\",\"from\":\"wallet-a\",\"to\":\"wallet-b\",\"amount\":42}\n";
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = LINE[i % LINE.len()];
        }
        // Make every text block unique so the stream does not dedup against itself.
        for (k, chunk) in out.chunks_mut(1024).enumerate() {
            let mut stamp = [0u8; 16];
            xof.fill(&mut stamp);
            stamp[0] = k as u8;
            let n = stamp.len().min(chunk.len());
            chunk[..n].copy_from_slice(&stamp[..n]);
        }
    } else {
        xof.fill(out);
    }
}

/// `len` bytes of stream `seed`.
pub fn generate(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (index, block) in out.chunks_mut(BLOCK).enumerate() {
        fill_block(seed, index as u64, block);
    }
    out
}

/// The same bytes as [`generate`] as an AsyncRead, for streams too large to hold in memory.
pub struct GeneratedReader {
    seed: u64,
    len: u64,
    pos: u64,
    block: Vec<u8>,
    hasher: blake3::Hasher,
}

impl GeneratedReader {
    pub fn new(len: u64, seed: u64) -> Self {
        GeneratedReader {
            seed,
            len,
            pos: 0,
            block: vec![0u8; BLOCK],
            hasher: blake3::Hasher::new(),
        }
    }

    /// BLAKE3 of the stream, computed without reading it.
    pub fn digest(len: u64, seed: u64) -> blake3::Hash {
        let mut reader = GeneratedReader::new(len, seed);
        let mut buf = vec![0u8; BLOCK];
        while reader.pos < reader.len {
            let n = reader.next_into(&mut buf);
            reader.hasher.update(&buf[..n]);
        }
        reader.hasher.finalize()
    }

    fn next_into(&mut self, out: &mut [u8]) -> usize {
        let index = self.pos / BLOCK as u64;
        let within = (self.pos % BLOCK as u64) as usize;
        fill_block(self.seed, index, &mut self.block);
        let left_in_stream = (self.len - self.pos) as usize;
        let n = (BLOCK - within).min(out.len()).min(left_in_stream);
        out[..n].copy_from_slice(&self.block[within..within + n]);
        self.pos += n as u64;
        n
    }
}

impl AsyncRead for GeneratedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.len {
            let n = self.next_into(buf.initialize_unfilled());
            buf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

/// An AsyncWrite that only hashes and counts.
#[derive(Default)]
pub struct HashingWriter {
    pub hasher: blake3::Hasher,
    pub len: u64,
}

impl AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn reader_matches_generate() {
        let len = 3 * BLOCK + 123;
        let mut reader = GeneratedReader::new(len as u64, 9);
        let mut streamed = Vec::new();
        reader.read_to_end(&mut streamed).await.expect("read");
        assert_eq!(streamed, generate(len, 9));
        assert_eq!(
            GeneratedReader::digest(len as u64, 9),
            blake3::hash(&streamed)
        );
        assert_ne!(generate(BLOCK, 1), generate(BLOCK, 2));
    }
}
