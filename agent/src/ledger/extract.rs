//! Unpacking a ledger tar stream into a directory, refusing anything that could write outside
//! it: absolute paths, `..`, symlinks whose target leaves the directory, hard links to anything
//! but a file already unpacked, writes through a symlink, device files and FIFOs. The first such
//! entry stops the whole restore (nothing is skipped silently).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::archive::safe_relative;

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

struct DirAttrs {
    path: PathBuf,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
}

/// Files are written in pieces of up to this size (`std::io::copy` writes 8 KiB at a time: a
/// write call per 8 KiB was a visible part of a restore's system time).
const WRITE_BYTES: usize = 1 << 20;

/// Copies `from` into `to`, filling `buf` before each write. Returns the bytes copied.
fn copy_in_large_writes(
    from: &mut impl Read,
    to: &mut impl std::io::Write,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match from.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..filled])?;
        total += filled as u64;
    }
}

/// Unpacks `reader` into `root` (an existing, empty directory), calling `on_file` with each
/// regular file and its size once it is complete.
pub fn unpack(
    reader: impl Read,
    root: &Path,
    on_file: &mut dyn FnMut(&Path, u64),
) -> Result<Unpacked, String> {
    let as_root = std::fs::metadata(root)
        .map(|m| m.uid() == 0)
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let mut archive = tar::Archive::new(reader);
    let mut unpacked = Unpacked::default();
    let mut buf = vec![0u8; WRITE_BYTES];
    let mut dirs = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("read the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("read the archive: {e}"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = safe_relative(&raw).ok_or_else(|| {
            format!("refused archive entry `{raw}`: not a relative path inside the target")
        })?;
        let path = root.join(&rel);
        no_symlink_on_the_way(root, &rel)
            .map_err(|e| format!("refused archive entry `{raw}`: {e}"))?;
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let owner = match (as_root, header.uid(), header.gid()) {
            (true, Ok(uid), Ok(gid)) => Some((uid as u32, gid as u32)),
            _ => None,
        };
        let io = |e: std::io::Error| format!("{}: {e}", path.display());
        match header.entry_type() {
            tar::EntryType::Directory => {
                match std::fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                    Err(e) => return Err(io(e)),
                }
                dirs.push(DirAttrs {
                    path,
                    mode,
                    mtime,
                    owner,
                });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io)?;
                let size = copy_in_large_writes(&mut entry, &mut file, &mut buf).map_err(io)?;
                unpacked.bytes += size;
                unpacked.files += 1;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io)?;
                file.set_modified(unix_time(mtime)).map_err(io)?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io)?;
                }
                drop(file);
                on_file(&path, size);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("`{raw}`: {e}"))?
                    .ok_or_else(|| {
                        format!("refused archive entry `{raw}`: a symlink without a target")
                    })?
                    .into_owned();
                if !stays_inside(&rel, &target) {
                    return Err(format!(
                        "refused archive entry `{raw}`: symlink to `{}` points outside the target",
                        target.display()
                    ));
                }
                std::os::unix::fs::symlink(&target, &path).map_err(io)?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(io)?;
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("`{raw}`: {e}"))?
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let inside = safe_relative(&target).ok_or_else(|| {
                    format!("refused archive entry `{raw}`: hard link to `{target}` points outside the target")
                })?;
                no_symlink_on_the_way(root, &inside)
                    .map_err(|e| format!("refused archive entry `{raw}`: {e}"))?;
                let source = root.join(&inside);
                let is_file = std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file());
                if !is_file {
                    return Err(format!(
                        "refused archive entry `{raw}`: hard link to `{target}`, which is not a file unpacked before it"
                    ));
                }
                std::fs::hard_link(&source, &path).map_err(io)?;
            }
            tar::EntryType::XGlobalHeader => {}
            other => {
                return Err(format!(
                    "refused archive entry `{raw}`: {other:?} entries (devices, FIFOs, sparse files) are not restored"
                ));
            }
        }
    }
    // Directory modes last, deepest first, so a read-only directory did not block its content.
    for dir in dirs.iter().rev() {
        let io = |e: std::io::Error| format!("{}: {e}", dir.path.display());
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(dir.mode))
            .map_err(io)?;
        if let Some((uid, gid)) = dir.owner {
            std::os::unix::fs::lchown(&dir.path, Some(uid), Some(gid)).map_err(io)?;
        }
        std::fs::File::open(&dir.path)
            .and_then(|f| f.set_modified(unix_time(dir.mtime)))
            .map_err(io)?;
    }
    Ok(unpacked)
}

fn unix_time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Every existing ancestor of `rel` under `root` must be a real directory, never a symlink.
fn no_symlink_on_the_way(root: &Path, rel: &Path) -> Result<(), String> {
    let mut path = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        path.push(part);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("it goes through the symlink {}", path.display()));
            }
            Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", path.display())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Whether a symlink at `link` (relative to the root) with `target` resolves inside the root,
/// judged on the text alone (every other symlink is held to the same rule).
fn stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most 1,000 bytes per read, like a stream of small pieces.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Counts write calls.
    #[derive(Default)]
    struct Writes(Vec<u8>, usize);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.extend_from_slice(buf);
            self.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn large_writes_copy_every_byte_in_few_writes() {
        let data: Vec<u8> = (0..25_000u32).map(|i| (i % 251) as u8).collect();
        for size in [0, 1, 999, 10_000, 25_000] {
            let mut out = Writes::default();
            let mut buf = vec![0u8; 10_000];
            let copied = copy_in_large_writes(&mut Trickle(&data[..size]), &mut out, &mut buf)
                .expect("copy");
            assert_eq!((copied, &out.0[..]), (size as u64, &data[..size]));
            assert_eq!(out.1, size.div_ceil(10_000), "writes for {size} bytes");
        }
    }

    #[test]
    fn symlink_targets() {
        assert!(stays_inside(
            Path::new("chain/current"),
            Path::new("chain.db")
        ));
        assert!(stays_inside(
            Path::new("chain/current"),
            Path::new("../wallets/a.json")
        ));
        assert!(!stays_inside(
            Path::new("chain/current"),
            Path::new("../../etc")
        ));
        assert!(!stays_inside(Path::new("link"), Path::new("/")));
        assert!(!stays_inside(Path::new("link"), Path::new("..")));
        assert!(stays_inside(Path::new("a/b/c"), Path::new("../../x")));
    }
}
