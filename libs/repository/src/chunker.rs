//! Content-defined chunking (FastCDC 2020): cut points depend on content, so an insertion or
//! change moves only the chunks around it and everything else deduplicates.

use serde::{Deserialize, Serialize};

/// Chunk size bounds, fixed per repository at `init` (changing them would stop dedup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

/// 512 KiB / 1 MiB / 4 MiB: large enough that per-object request overhead is small against
/// S3 latency, small enough that a change costs about a megabyte (see the benchmark notes in
/// docs/repository-format.md).
impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min_size: 512 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min_size)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg_size)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max_size)
            && self.min_size <= self.avg_size
            && self.avg_size <= self.max_size;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "chunker sizes {}/{}/{} out of range (min {MINIMUM_MIN}..={MINIMUM_MAX}, avg \
                 {AVERAGE_MIN}..={AVERAGE_MAX}, max {MAXIMUM_MIN}..={MAXIMUM_MAX}, min <= avg <= max)",
                self.min_size, self.avg_size, self.max_size
            ))
        }
    }

    /// A cutter fed by writes (see [`Cutter`]).
    pub fn cutter(&self) -> Cutter {
        Cutter::new(*self)
    }
}

/// Cuts a stream fed in pieces of any size into content-defined chunks.
///
/// Cut points are decided over a buffer of twice the maximum chunk size: a chunk is cut only
/// once the buffer holds a whole maximum chunk after its start (or the stream ends), so the cut
/// points are exactly those of a cutter with unlimited lookahead. The buffer is compacted only
/// when it runs full, so each byte is copied about twice, not once per chunk.
pub struct Cutter {
    params: ChunkerParams,
    /// XORed into fastcdc's gear table (0: unkeyed); see [`crate::sealed`].
    seed: u64,
    buf: Vec<u8>,
    start: usize,
}

impl Cutter {
    pub fn new(params: ChunkerParams) -> Self {
        Cutter::seeded(params, 0)
    }

    /// A cutter whose gear table is keyed by `seed`: its cut points differ from every other
    /// seed's for the same input.
    pub fn seeded(params: ChunkerParams, seed: u64) -> Self {
        Cutter {
            params,
            seed,
            buf: Vec::with_capacity(2 * params.max_size as usize),
            start: 0,
        }
    }

    /// Bytes received but not yet cut.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends `data`, handing every chunk whose end is certain to `emit`.
    pub fn push<E>(&mut self, mut data: &[u8], emit: &mut E) -> std::io::Result<()>
    where
        E: FnMut(&[u8]) -> std::io::Result<()>,
    {
        let max = self.params.max_size as usize;
        let capacity = 2 * max;
        while !data.is_empty() {
            if self.buf.len() == capacity {
                self.buf.copy_within(self.start.., 0);
                self.buf.truncate(self.buf.len() - self.start);
                self.start = 0;
            }
            let take = data.len().min(capacity - self.buf.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            while self.pending() >= max {
                let len = self.cut(&self.buf[self.start..]);
                emit(&self.buf[self.start..self.start + len])?;
                self.start += len;
            }
        }
        Ok(())
    }

    /// Cuts everything pending: the next byte pushed starts a new chunk.
    pub fn finish<E>(&mut self, emit: &mut E) -> std::io::Result<()>
    where
        E: FnMut(&[u8]) -> std::io::Result<()>,
    {
        while self.pending() > 0 {
            let len = self.cut(&self.buf[self.start..]);
            emit(&self.buf[self.start..self.start + len])?;
            self.start += len;
        }
        self.buf.clear();
        self.start = 0;
        Ok(())
    }

    /// Length of the first chunk of `data` (which holds a maximum chunk or the stream's end).
    fn cut(&self, data: &[u8]) -> usize {
        let p = self.params;
        fastcdc::v2020::FastCDC::with_level_and_seed(
            data,
            p.min_size,
            p.avg_size,
            p.max_size,
            fastcdc::v2020::Normalization::Level1,
            self.seed,
        )
        .next()
        .map(|chunk| chunk.length)
        .unwrap_or(data.len())
        .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(params: ChunkerParams, data: &[u8], piece: usize) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        let mut cutter = params.cutter();
        let mut emit = |c: &[u8]| {
            chunks.push(c.to_vec());
            Ok(())
        };
        for part in data.chunks(piece) {
            cutter.push(part, &mut emit).expect("push");
        }
        cutter.finish(&mut emit).expect("finish");
        chunks
    }

    #[test]
    fn cut_points_do_not_depend_on_how_the_stream_arrives() {
        let params = ChunkerParams {
            min_size: 64 << 10,
            avg_size: 256 << 10,
            max_size: 1 << 20,
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..6_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let reference: Vec<usize> =
            fastcdc::v2020::FastCDC::new(&data, params.min_size, params.avg_size, params.max_size)
                .map(|c| c.length)
                .collect();
        for piece in [1000, 65_536, 3_000_000, data.len()] {
            let chunks = cut_all(params, &data, piece);
            let lengths: Vec<usize> = chunks.iter().map(Vec::len).collect();
            assert_eq!(lengths, reference, "pieces of {piece}");
            assert_eq!(chunks.concat(), data);
        }
        assert!(cut_all(params, &[], 10).is_empty());
    }

    #[test]
    fn seeds_move_cut_points_and_keep_them_stable() {
        let params = ChunkerParams {
            min_size: 16 << 10,
            avg_size: 64 << 10,
            max_size: 256 << 10,
        };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..3_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let cuts = |seed: u64| {
            let mut lengths = Vec::new();
            let mut cutter = Cutter::seeded(params, seed);
            let mut emit = |c: &[u8]| {
                lengths.push(c.len());
                Ok(())
            };
            for part in data.chunks(77_777) {
                cutter.push(part, &mut emit).expect("push");
            }
            cutter.finish(&mut emit).expect("finish");
            lengths
        };
        let (a, b, plain) = (cuts(0x1234_5679), cuts(0xdead_beef_0000_0001), cuts(0));
        assert_eq!(a, cuts(0x1234_5679), "the same seed cuts the same");
        assert_ne!(a, b);
        assert_ne!(a, plain);
        assert_eq!(a.iter().sum::<usize>(), data.len());
    }
}
