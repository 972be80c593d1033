//! WAL file names: segments (timeline and number), LSNs, and the repository's WAL objects.

use crate::layout::{self, WAL_HISTORY, WAL_PARTIAL, WAL_SEGMENTS};
use crate::path::RemotePath;

/// A WAL segment: timeline and position, as in its 24-hex-digit file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    /// The segment number: its start LSN divided by the segment size.
    pub number: u64,
}

impl Segment {
    /// Parses `TTTTTTTTLLLLLLLLSSSSSSSS` for segments of `seg_size` bytes.
    pub fn parse(name: &str, seg_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let part = |i: usize| u32::from_str_radix(&name[i * 8..i * 8 + 8], 16).ok();
        let (timeline, log, seg) = (part(0)?, part(1)?, part(2)?);
        let per_log = segments_per_log(seg_size);
        (u64::from(seg) < per_log).then_some(Segment {
            timeline,
            number: u64::from(log) * per_log + u64::from(seg),
        })
    }

    /// The segment holding `lsn`.
    pub fn of_lsn(timeline: u32, lsn: u64, seg_size: u64) -> Segment {
        Segment {
            timeline,
            number: lsn / seg_size,
        }
    }

    pub fn name(&self, seg_size: u64) -> String {
        let per_log = segments_per_log(seg_size);
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.number / per_log,
            self.number % per_log
        )
    }
}

fn segments_per_log(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size.max(1)
}

/// `X/Y` as PostgreSQL prints an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// One archived WAL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    /// A completed segment, by its 24-hex-digit name.
    Segment(String),
    /// The segment being written, as uploaded at `micros` (Unix microseconds).
    Partial { segment: String, micros: u64 },
    /// `<timeline>.history`.
    History(u32),
}

impl WalFile {
    /// The manifest's object.
    pub fn path(&self) -> RemotePath {
        // Hex names and digits only: always a valid key.
        layout::path(match self {
            WalFile::Segment(name) => format!("{WAL_SEGMENTS}{name}.json"),
            WalFile::Partial { segment, micros } => {
                format!("{WAL_PARTIAL}{segment}-{micros:016}.json")
            }
            WalFile::History(timeline) => format!("{WAL_HISTORY}{timeline:08X}.json"),
        })
    }

    /// The file name PostgreSQL gives it (a partial segment is restored under its full name).
    pub fn file_name(&self) -> String {
        match self {
            WalFile::Segment(name) | WalFile::Partial { segment: name, .. } => name.clone(),
            WalFile::History(timeline) => format!("{timeline:08X}.history"),
        }
    }

    pub(super) fn of_object(path: &RemotePath) -> Option<WalFile> {
        let stem = path.file_name().strip_suffix(".json")?;
        let key = path.as_str();
        if key.starts_with(WAL_SEGMENTS) {
            Some(WalFile::Segment(stem.to_owned()))
        } else if key.starts_with(WAL_PARTIAL) {
            let (segment, micros) = stem.split_once('-')?;
            Some(WalFile::Partial {
                segment: segment.to_owned(),
                micros: micros.parse().ok()?,
            })
        } else if key.starts_with(WAL_HISTORY) {
            Some(WalFile::History(u32::from_str_radix(stem, 16).ok()?))
        } else {
            None
        }
    }
}
