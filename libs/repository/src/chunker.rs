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

    /// Cuts a blocking reader into chunks.
    pub fn stream<R: std::io::Read>(&self, reader: R) -> fastcdc::v2020::StreamCDC<R> {
        fastcdc::v2020::StreamCDC::new(reader, self.min_size, self.avg_size, self.max_size)
    }
}
