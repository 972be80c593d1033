//! Storing one WAL file: chunked, deduplicated, its manifest written create-only.

use std::collections::HashMap;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::clock::now_rfc3339;
use crate::error::RepoError;
use crate::layout;
use crate::locks::WriterLock;
use crate::manifest::{BackupStats, ChunkRef, ComponentManifest};
use crate::repo::Repository;
use crate::storage::{PutMode, StorageError};

use super::{STREAM, WalFile};

/// How many chunk ids a [`WalWriter`] remembers (a few hundred segments' worth).
const MAX_KNOWN_CHUNKS: usize = 4096;

/// Stores WAL files, remembering the chunks it stored so that the next upload of a growing
/// partial segment sends only what changed.
pub struct WalWriter {
    repo: Repository,
    /// Chunk id → stored length, of the chunks this writer stored or found.
    known: HashMap<String, u32>,
}

impl WalWriter {
    pub fn new(repo: Repository) -> Self {
        WalWriter {
            repo,
            known: HashMap::new(),
        }
    }

    /// Stores `data` as `file` and commits its manifest. Storing a completed segment or history
    /// file again with the same content succeeds (a rerun after a crash); other content is
    /// refused, since archived WAL is never replaced.
    pub async fn store(
        &mut self,
        file: &WalFile,
        data: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        self.repo.check_writes()?;
        // Held from before the chunk checks to after the commit (`locks.rs`).
        let lock = WriterLock::acquire(&self.repo.storage, &file.file_name(), cancel).await?;
        let result = self.store_locked(file, data, &lock, cancel).await;
        lock.release(cancel).await;
        result
    }

    async fn store_locked(
        &mut self,
        file: &WalFile,
        data: Vec<u8>,
        lock: &WriterLock,
        cancel: &CancellationToken,
    ) -> Result<ComponentManifest, RepoError> {
        let raw_size = data.len() as u64;
        let repo = self.repo.clone();
        let known = self.known.clone();
        let encoded = tokio::task::spawn_blocking(move || encode(&repo, &known, &data))
            .await
            .map_err(|e| RepoError::Io(std::io::Error::other(e)))?;
        let mut stats = BackupStats::default();
        let mut chunks = Vec::with_capacity(encoded.len());
        for (chunk, body) in encoded {
            stats.chunks += 1;
            let object = layout::chunk(&chunk.id);
            match body {
                Some(body) => {
                    stats.new_chunks += 1;
                    stats.new_stored_bytes += body.len() as u64;
                    match self
                        .repo
                        .storage
                        .put(&object, body, PutMode::Create, cancel)
                        .await
                    {
                        Ok(()) | Err(StorageError::AlreadyExists(_)) => {}
                        Err(err) => return Err(err.into()),
                    }
                    self.known.insert(chunk.id.clone(), chunk.stored_len);
                }
                // Stored by an earlier upload; GC may have taken it since (between two
                // uploads), so check it under this upload's lock before referencing it.
                None => match self.repo.storage.head(&object, cancel).await {
                    Ok(_) => {}
                    Err(StorageError::NotFound(_)) => {
                        self.known.remove(&chunk.id);
                        return Err(RepoError::ChunkVanished(object.to_string()));
                    }
                    Err(err) => return Err(err.into()),
                },
            }
            chunks.push(chunk);
        }
        let manifest = ComponentManifest {
            id: file.file_name().replace('.', "-"),
            name: file.file_name(),
            set_id: String::new(),
            stream: STREAM.to_owned(),
            created: now_rfc3339(),
            raw_size,
            chunks,
            files: Vec::new(),
            consistency: None,
            stats,
            keyed_by: self.repo.keyed_by(),
        };
        lock.confirm(cancel).await?;
        self.repo
            .commit_wal(&file.path(), &manifest, cancel)
            .await?;
        if self.known.len() > MAX_KNOWN_CHUNKS {
            // Bounded memory for an agent that archives for months; forgetting costs one
            // create-only put that finds the chunk there.
            self.known.clear();
        }
        Ok(manifest)
    }

    /// Removes an archived file's manifest (superseded partial uploads).
    pub async fn delete(
        &self,
        file: &WalFile,
        cancel: &CancellationToken,
    ) -> Result<(), RepoError> {
        Ok(self.repo.storage.delete(&file.path(), cancel).await?)
    }
}

/// Cuts, hashes and (for chunks not in `known`) encodes `data`.
fn encode(
    repo: &Repository,
    known: &HashMap<String, u32>,
    data: &[u8],
) -> Vec<(ChunkRef, Option<Bytes>)> {
    let mut pieces = Vec::new();
    let mut cutter = repo.cutter();
    let mut emit = |chunk: &[u8]| {
        let id = repo.chunk_id(chunk).to_hex().to_string();
        let (stored_len, body) = match known.get(&id) {
            Some(&stored_len) => (stored_len, None),
            None => {
                let body = Bytes::from(repo.encode_chunk(chunk));
                (body.len() as u32, Some(body))
            }
        };
        pieces.push((ChunkRef::whole(id, chunk.len() as u32, stored_len), body));
        Ok::<(), std::io::Error>(())
    };
    // Writing into memory cannot fail.
    let _ = cutter.push(data, &mut emit);
    let _ = cutter.finish(&mut emit);
    pieces
}
