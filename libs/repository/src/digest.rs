//! Content digests of the files a stream holds: recorded at backup time from the bytes the
//! source gave (a database's pages as read from its snapshot), checked by every restore and
//! by `verify --read-data` against the bytes the manifest's references reassemble. A wrong
//! reference (a stale page map, a damaged cache) is caught by verify, never first by a
//! restore after a disaster.

use crate::manifest::{ComponentManifest, FileEntry};

use crate::manifest::FileDigest;

/// Computes a [`FileDigest`] from the bytes read at backup time.
pub struct Hasher {
    data_offset: u64,
    hasher: blake3::Hasher,
}

impl Hasher {
    /// A file whose data starts at `data_offset` in the stream.
    pub fn new(data_offset: u64) -> Hasher {
        Hasher {
            data_offset,
            hasher: blake3::Hasher::new(),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    pub fn finish(&self) -> FileDigest {
        FileDigest {
            data_offset: self.data_offset,
            blake3: self.hasher.finalize().to_hex().to_string(),
        }
    }
}

/// A file whose digest is still being computed.
struct Pending {
    path: String,
    start: u64,
    end: u64,
    digest: String,
    hasher: blake3::Hasher,
}

/// Checks the digests of a manifest's files while its stream passes by, in order.
pub struct Checker {
    manifest: String,
    /// Files with a digest, by data start; the next one first.
    pending: std::collections::VecDeque<Pending>,
    position: u64,
}

impl Checker {
    /// A checker for `manifest`'s files that carry a digest (none: it checks nothing).
    pub fn new(manifest: &ComponentManifest) -> Checker {
        let mut files: Vec<&FileEntry> = manifest
            .files
            .iter()
            .filter(|f| f.digest.is_some())
            .collect();
        files.sort_by_key(|f| f.digest.as_ref().map(|d| d.data_offset));
        Checker {
            manifest: manifest.id.clone(),
            pending: files
                .into_iter()
                .filter_map(|f| {
                    let digest = f.digest.as_ref()?;
                    Some(Pending {
                        path: f.path.clone(),
                        start: digest.data_offset,
                        end: digest.data_offset + f.size,
                        digest: digest.blake3.clone(),
                        hasher: blake3::Hasher::new(),
                    })
                })
                .collect(),
            position: 0,
        }
    }

    /// True when there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Feeds the stream's next bytes; Err names the first file whose bytes differ.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), String> {
        let from = self.position;
        let to = from + bytes.len() as u64;
        self.position = to;
        while let Some(file) = self.pending.front_mut() {
            if file.start >= to {
                break;
            }
            let lo = file.start.max(from);
            let hi = file.end.min(to);
            if lo < hi {
                file.hasher
                    .update(&bytes[(lo - from) as usize..(hi - from) as usize]);
            }
            if file.end > to {
                break;
            }
            let Some(done) = self.pending.pop_front() else {
                break;
            };
            let found = done.hasher.finalize().to_hex().to_string();
            if found != done.digest {
                return Err(format!(
                    "manifest {}: the stored bytes of {} are not the bytes read at backup time \
                     (content digest {found}, recorded {})",
                    self.manifest, done.path, done.digest
                ));
            }
        }
        Ok(())
    }

    /// Err when the stream ended before a file with a digest did.
    pub fn finish(&self) -> Result<(), String> {
        match self.pending.front() {
            Some(file) => Err(format!(
                "manifest {}: the stream ends before the end of {}",
                self.manifest, file.path
            )),
            None => Ok(()),
        }
    }
}
