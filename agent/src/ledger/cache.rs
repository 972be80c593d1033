//! The file cache: for each group of unchanged entries, the chunks that hold its bytes, from the
//! previous backup. It lives in the scratch directory; losing it only costs one full read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aitbc_backup_repository::manifest::{ChunkRef, ComponentManifest};
use serde::{Deserialize, Serialize};

use super::pages::PageMap;

/// 2: databases are kept page by page ([`PageMap`]).
const CACHE_VERSION: u32 = 2;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FileCache {
    version: u32,
    /// The repository the chunks are in.
    repository: String,
    /// The backup the chunks come from.
    pub manifest: String,
    /// Group key → the group's chunks, in order.
    groups: HashMap<String, Vec<ChunkRef>>,
    /// Database path → where its pages are.
    #[serde(default)]
    databases: HashMap<String, PageMap>,
}

/// Where one group landed in the stream.
#[derive(Debug, Clone)]
pub struct GroupSpan {
    /// None when the group must not be reused (a database, or a file that changed while read).
    pub key: Option<String>,
    pub start: u64,
    pub end: u64,
}

/// The cache's name in an exported bundle.
const STATE_CACHE: &str = "ledger-cache.json";

/// The name of one data directory's cache in the repository's writer state, per backup label
/// (the agent's name): nodes sharing a name and a path share it, and then only read more (a
/// group is reused only where inode, device and change time match too).
pub fn state_name(label: &str, data_dir: &Path) -> String {
    let mut id = blake3::Hasher::new();
    id.update(label.as_bytes());
    id.update(b"\0");
    id.update(data_dir.as_os_str().as_encoded_bytes());
    format!("ledger-cache-{}", &id.finalize().to_hex()[..16])
}

/// The cache file of one data directory.
pub fn path_for(scratch: &Path, data_dir: &Path) -> PathBuf {
    scratch.join(format!("ledger-cache-{}.json", dir_id(data_dir)))
}

/// A new page map file for a database of `data_dir` (the cache says which are current).
pub fn new_page_map_path(scratch: &Path, data_dir: &Path) -> PathBuf {
    scratch.join(format!(
        "{}{:016x}.bin",
        page_map_prefix(data_dir),
        rand::random::<u64>()
    ))
}

fn page_map_prefix(data_dir: &Path) -> String {
    format!("ledger-pages-{}-", dir_id(data_dir))
}

fn dir_id(data_dir: &Path) -> String {
    blake3::hash(data_dir.as_os_str().as_encoded_bytes()).to_hex()[..16].to_owned()
}

impl FileCache {
    /// The cache for `repository`, or an empty one (with the reason) when there is none.
    pub fn load(path: &Path, repository: &str) -> (FileCache, Option<String>) {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return (FileCache::default(), Some("no file cache yet".to_owned()));
            }
            Err(err) => {
                return (
                    FileCache::default(),
                    Some(format!("{}: {err}", path.display())),
                );
            }
        };
        match serde_json::from_slice::<FileCache>(&bytes) {
            Ok(cache) if cache.version == CACHE_VERSION && cache.repository == repository => {
                (cache, None)
            }
            Ok(_) => (
                FileCache::default(),
                Some("the file cache belongs to another repository or version".to_owned()),
            ),
            Err(err) => (
                FileCache::default(),
                Some(format!("{} is damaged ({err})", path.display())),
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<&[ChunkRef]> {
        self.groups.get(key).map(Vec::as_slice)
    }

    /// The page map of the database at `path`.
    pub fn pages(&self, path: &str) -> Option<&PageMap> {
        self.databases.get(path)
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The cache a finished backup leaves for the next one.
    pub fn from_backup(
        repository: &str,
        manifest: &ComponentManifest,
        spans: &[GroupSpan],
        mut databases: HashMap<String, PageMap>,
    ) -> Self {
        let mut starts = Vec::with_capacity(manifest.chunks.len() + 1);
        let mut offset = 0u64;
        for chunk in &manifest.chunks {
            starts.push(offset);
            offset += u64::from(chunk.stream_len());
        }
        // The packs' stored sizes are known now, from the committed references.
        let stored: HashMap<&str, u32> = manifest
            .chunks
            .iter()
            .map(|c| (c.id.as_str(), c.stored_len))
            .collect();
        for map in databases.values_mut() {
            for chunk in &mut map.chunks {
                if let Some(&len) = stored.get(chunk.id.as_str()) {
                    chunk.stored_len = len;
                }
            }
        }
        starts.push(offset);
        let mut groups = HashMap::new();
        for span in spans {
            let Some(key) = &span.key else { continue };
            // Groups start and end on chunk boundaries; anything else is not reusable.
            let (Ok(first), Ok(end)) = (
                starts.binary_search(&span.start),
                starts.binary_search(&span.end),
            ) else {
                continue;
            };
            if first < end {
                groups.insert(key.clone(), manifest.chunks[first..end].to_vec());
            }
        }
        FileCache {
            version: CACHE_VERSION,
            repository: repository.to_owned(),
            manifest: manifest.id.clone(),
            groups,
            databases,
        }
    }

    /// The cache and its page maps as one tar stream, for the repository (see
    /// [`FileCache::import`]): what saves the next backup's reading when the scratch directory
    /// is lost.
    pub fn export(&self) -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            header.set_cksum();
            tar.append_data(&mut header, name, bytes)
        };
        add(
            STATE_CACHE,
            &serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        for map in self.databases.values() {
            let name = map
                .file
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| std::io::Error::other("a page map without a file name"))?;
            add(name, &std::fs::read(&map.file)?)?;
        }
        tar.into_inner()
    }

    /// Writes a cache [`FileCache::export`] made into the scratch directory as `path` and its
    /// page maps beside it, without its file groups. Only plain files named like this data
    /// directory's page maps are written; each map is checked against its recorded digest
    /// when used.
    pub fn import(bundle: &[u8], path: &Path, data_dir: &Path) -> std::io::Result<()> {
        let scratch = path
            .parent()
            .ok_or_else(|| std::io::Error::other("a cache path without a directory"))?;
        let prefix = page_map_prefix(data_dir);
        let mut cache: Option<FileCache> = None;
        let mut archive = tar::Archive::new(bundle);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry.path()?.to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes)?;
            if name == STATE_CACHE {
                cache = Some(serde_json::from_slice(&bytes).map_err(std::io::Error::other)?);
            } else if name.starts_with(&prefix)
                && name.ends_with(".bin")
                && !name.contains('/')
                && entry.header().entry_type().is_file()
            {
                std::fs::write(scratch.join(&name), bytes)?;
            }
        }
        let mut cache = cache.ok_or_else(|| std::io::Error::other("no cache in the bundle"))?;
        // File groups are reused without reading their files, on metadata alone: a group from
        // the repository (which whoever holds this component's writer credential can forge)
        // could make later backups store someone else's bytes for an unchanged file. Page maps
        // are safe: every page is read and compared with the map's hash, and the databases'
        // digests are checked. So the files are read once; the pages are not stored again.
        cache.groups.clear();
        for map in cache.databases.values_mut() {
            let name = map.file.file_name().map(PathBuf::from).unwrap_or_default();
            map.file = scratch.join(name);
        }
        cache.save(path, data_dir)
    }

    /// Writes the cache atomically, then removes the data directory's page maps it does not
    /// name (the previous backup's, or those of a backup that failed).
    pub fn save(&self, path: &Path, data_dir: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        let Some(scratch) = path.parent() else {
            return Ok(());
        };
        let prefix = page_map_prefix(data_dir);
        for found in std::fs::read_dir(scratch)?.flatten() {
            let name = found.file_name();
            let current = self.databases.values().any(|m| m.file == found.path());
            if name.to_string_lossy().starts_with(&prefix) && !current {
                let _ = std::fs::remove_file(found.path());
            }
        }
        Ok(())
    }
}
