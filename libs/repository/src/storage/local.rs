//! The local-directory backend (`file:///path`), the embedded default.
//!
//! Writes go to a temporary file in the target directory, are fsynced, then renamed into place
//! (overwrite) or hard-linked (create-only: `link` fails if the name exists, atomically), and
//! the directory is fsynced. Readers never see a partial object.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ObjectMeta, PutMode, StorageError};
use crate::path::RemotePath;

/// Prefix of temporary files; never listed.
const TMP_PREFIX: &str = ".tmp-";

pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Uses `root`, which the first write creates: reading a path that holds nothing (a
    /// mistyped URL) leaves no directory behind.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        match std::fs::metadata(&root) {
            Ok(meta) if !meta.is_dir() => Err(StorageError::Permanent {
                op: "open",
                path: root.display().to_string(),
                message: "is not a directory (a local repository is a directory)".into(),
            }),
            _ => Ok(LocalStorage { root }),
        }
    }

    pub fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn full(&self, path: &RemotePath) -> PathBuf {
        self.root.join(path.as_str())
    }

    pub async fn put(
        &self,
        path: &RemotePath,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        let target = self.full(path);
        let key = path.clone();
        blocking("put", path, move || {
            write_atomically(&target, &body, mode, &key)
        })
        .await
    }

    pub async fn get(&self, path: &RemotePath) -> Result<Bytes, StorageError> {
        let target = self.full(path);
        blocking("get", path, move || std::fs::read(&target).map(Bytes::from)).await
    }

    pub async fn head(&self, path: &RemotePath) -> Result<ObjectMeta, StorageError> {
        let target = self.full(path);
        let key = path.clone();
        blocking("head", path, move || {
            let meta = std::fs::metadata(&target)?;
            Ok(ObjectMeta {
                path: key,
                size: meta.len(),
                modified: meta.modified()?,
                server_side_encryption: None,
            })
        })
        .await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Walk only the directory that can hold matches.
            let start = match prefix.rfind('/') {
                Some(i) => root.join(&prefix[..i]),
                None => root.clone(),
            };
            walk(&root, &start, &prefix, &mut out).map_err(|err| StorageError::Transient {
                op: "list",
                path: prefix.clone(),
                message: err.to_string(),
            })?;
            Ok(out)
        })
        .await
        .map_err(|err| StorageError::Transient {
            op: "list",
            path: String::new(),
            message: err.to_string(),
        })?
    }

    pub async fn delete(&self, path: &RemotePath) -> Result<(), StorageError> {
        let target = self.full(path);
        blocking("delete", path, move || std::fs::remove_file(&target)).await
    }
}

fn write_atomically(
    target: &Path,
    body: &[u8],
    mode: PutMode,
    key: &RemotePath,
) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(body)?;
        file.sync_all()?;
        match mode {
            PutMode::Overwrite => std::fs::rename(&tmp, target),
            PutMode::Create => {
                let linked = std::fs::hard_link(&tmp, target);
                std::fs::remove_file(&tmp)?;
                linked
            }
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|err| {
        if err.kind() == std::io::ErrorKind::AlreadyExists {
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, key.to_string())
        } else {
            err
        }
    })?;
    std::fs::File::open(dir)?.sync_all()
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            walk(root, &path, prefix, out)?;
        } else if file_type.is_file() {
            let Ok(relative) = path.strip_prefix(root) else {
                continue;
            };
            let key = relative.to_string_lossy();
            if !key.starts_with(prefix) {
                continue;
            }
            // Files that are not valid keys were not written by us; ignore them.
            let Ok(remote) = RemotePath::new(key.into_owned()) else {
                continue;
            };
            let meta = entry.metadata()?;
            out.push(ObjectMeta {
                path: remote,
                size: meta.len(),
                modified: meta.modified()?,
                server_side_encryption: None,
            });
        }
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    path: &RemotePath,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StorageError> {
    let key = path.clone();
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| StorageError::Transient {
            op,
            path: key.to_string(),
            message: err.to_string(),
        })?;
    result.map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => StorageError::NotFound(key.clone()),
        std::io::ErrorKind::AlreadyExists => StorageError::AlreadyExists(key.clone()),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            StorageError::Permanent {
                op,
                path: key.to_string(),
                message: err.to_string(),
            }
        }
        _ => StorageError::Transient {
            op,
            path: key.to_string(),
            message: err.to_string(),
        },
    })
}
