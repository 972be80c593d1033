//! Unpacking a tar stream into a directory, confined to it by construction.
//!
//! Every operation goes through a [`Dir`] handle on the root, so it resolves beneath the root
//! and cannot follow a link out of it. Entries are refused (the first one stops the whole unpack,
//! naming it; nothing is skipped silently) when they are absolute or hold `..`, when their parent
//! path goes through a symlink or a non-directory, when they are symlinks that do not resolve
//! inside the root (judged against the links already unpacked, not on their text alone), hard
//! links to anything but a regular file unpacked before them, or devices, FIFOs and sparse files.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, OpenOptionsMaybeDirExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Files are written in pieces of up to this size (`std::io::copy` writes 8 KiB at a time: a
/// write call per 8 KiB was a visible part of a restore's system time).
const WRITE_BYTES: usize = 1 << 20;

/// Links followed while resolving one symlink's target before it is refused (Linux's own limit).
const MAX_LINK_HOPS: usize = 40;

/// The path `text` names, relative and without `.`, when it stays inside the directory it is
/// relative to: no absolute path, no `..`, not empty.
pub fn safe_relative(text: &str) -> Option<PathBuf> {
    let path = Path::new(text);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

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

/// A directory's attributes, set once everything in it is unpacked.
struct DirAttrs {
    rel: PathBuf,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
}

/// The state of one unpack: the root's handle and the directories known to be real.
struct Unpacker<'a> {
    root: &'a Path,
    dir: Dir,
    /// Paths (relative to the root) checked to be directories, not links: entries are never
    /// replaced, so they stay directories.
    real_dirs: HashSet<PathBuf>,
    dirs: Vec<DirAttrs>,
}

/// Unpacks `reader` into `root` (an existing, empty directory), calling `on_file` with each
/// regular file (its path under `root`, whose every parent is a real directory) and its size
/// once it is complete. When `root` belongs to root, owners are restored too.
pub fn unpack(
    reader: impl Read,
    root: &Path,
    on_file: &mut dyn FnMut(&Path, u64),
) -> Result<Unpacked, String> {
    let dir = Dir::open_ambient_dir(root, ambient_authority())
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let as_root = dir
        .dir_metadata()
        .map(|m| cap_std::fs::MetadataExt::uid(&m) == 0)
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let mut unpacker = Unpacker {
        root,
        dir,
        real_dirs: HashSet::new(),
        dirs: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let mut unpacked = Unpacked::default();
    let mut buf = vec![0u8; WRITE_BYTES];
    let entries = archive
        .entries()
        .map_err(|e| format!("read the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("read the archive: {e}"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refused = |why: String| format!("refused archive entry `{raw}`: {why}");
        let rel = safe_relative(&raw)
            .ok_or_else(|| refused("not a relative path inside the target".to_owned()))?;
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let owner = match (as_root, header.uid(), header.gid()) {
            (true, Ok(uid), Ok(gid)) => Some((uid as u32, gid as u32)),
            _ => None,
        };
        let kind = header.entry_type();
        match kind {
            tar::EntryType::XGlobalHeader => continue,
            tar::EntryType::Directory
            | tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Symlink
            | tar::EntryType::Link => {}
            other => {
                return Err(refused(format!(
                    "{other:?} entries (devices, FIFOs, sparse files) are not restored"
                )));
            }
        }
        unpacker.make_parents(&rel).map_err(refused)?;
        let path = root.join(&rel);
        let io = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                refused("its name appears twice in the archive".to_owned())
            } else {
                format!("{}: {e}", path.display())
            }
        };
        match kind {
            tar::EntryType::Directory => {
                unpacker.make_dir(&rel).map_err(refused)?;
                unpacker.dirs.push(DirAttrs {
                    rel,
                    mode,
                    mtime,
                    owner,
                });
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("`{raw}`: {e}"))?
                    .ok_or_else(|| refused("a symlink without a target".to_owned()))?
                    .into_owned();
                unpacker
                    .check_link(&rel, &target)
                    .map_err(|why| refused(format!("symlink to `{}` {why}", target.display())))?;
                unpacker.dir.symlink(&target, &rel).map_err(io)?;
                if let Some((uid, gid)) = owner {
                    unpacker.chown_symlink(&rel, uid, gid).map_err(io)?;
                }
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| format!("`{raw}`: {e}"))?
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let outside =
                    || refused(format!("hard link to `{target}` points outside the target"));
                let source = safe_relative(&target).ok_or_else(outside)?;
                let is_file = unpacker.parents_are_real(&source)
                    && unpacker
                        .dir
                        .symlink_metadata(&source)
                        .is_ok_and(|m| m.is_file());
                if !is_file {
                    return Err(refused(format!(
                        "hard link to `{target}`, which is not a file unpacked before it"
                    )));
                }
                unpacker
                    .dir
                    .hard_link(&source, &unpacker.dir, &rel)
                    .map_err(io)?;
            }
            _ => {
                // A regular file: created here (`O_EXCL` never follows a link), written, and
                // its attributes set on the descriptor.
                let mut file = unpacker
                    .dir
                    .open_with(&rel, OpenOptions::new().write(true).create_new(true))
                    .map_err(io)?
                    .into_std();
                let size = copy_in_large_writes(&mut entry, &mut file, &mut buf).map_err(io)?;
                unpacked.bytes += size;
                unpacked.files += 1;
                set_attrs(&file, mode, mtime, owner).map_err(io)?;
                drop(file);
                on_file(&path, size);
            }
        }
    }
    unpacker.finish_dirs()?;
    Ok(unpacked)
}

/// Owner first (a `chown` clears set-user-ID bits), then mode, then modification time, all on
/// the open descriptor.
fn set_attrs(
    file: &std::fs::File,
    mode: u32,
    mtime: u64,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.set_modified(unix_time(mtime))
}

fn unix_time(secs: u64) -> SystemTime {
    // A hand-made archive can carry any number; one past what the clock holds becomes the
    // epoch instead of a panic.
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Unpacker<'_> {
    /// Every parent of `rel` must be a real directory (created if missing), never a symlink.
    fn make_parents(&mut self, rel: &Path) -> Result<(), String> {
        let mut prefix = PathBuf::new();
        let parts: Vec<_> = rel.components().collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            prefix.push(part);
            if self.real_dirs.contains(&prefix) {
                continue;
            }
            match self.dir.symlink_metadata(&prefix) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "it goes through the symlink `{}`",
                        prefix.display()
                    ));
                }
                Ok(m) if !m.is_dir() => {
                    return Err(format!("`{}` is not a directory", prefix.display()));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.dir
                        .create_dir(&prefix)
                        .map_err(|e| format!("{}: {e}", self.root.join(&prefix).display()))?;
                }
                Err(e) => return Err(format!("{}: {e}", self.root.join(&prefix).display())),
            }
            self.real_dirs.insert(prefix.clone());
        }
        Ok(())
    }

    /// Whether every parent of `rel` is a directory already known to be real.
    fn parents_are_real(&self, rel: &Path) -> bool {
        rel.ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .all(|a| self.real_dirs.contains(a))
    }

    /// Creates the directory `rel`, or accepts an existing real directory there.
    fn make_dir(&mut self, rel: &Path) -> Result<(), String> {
        match self.dir.create_dir(rel) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let is_dir = self
                    .dir
                    .symlink_metadata(rel)
                    .is_ok_and(|m| m.file_type().is_dir());
                if !is_dir {
                    return Err("it exists and is not a directory".to_owned());
                }
            }
            Err(e) => return Err(format!("{}: {e}", self.root.join(rel).display())),
        }
        self.real_dirs.insert(rel.to_owned());
        Ok(())
    }

    /// Whether a symlink at `link` with `target` resolves inside the root, following the links
    /// already unpacked as the kernel would. A part of the way that does not exist yet may
    /// become a link later, so no `..` may come after it. Returns why not.
    fn check_link(&self, link: &Path, target: &Path) -> Result<(), String> {
        let mut at: Vec<OsString> = link
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
            .map(|c| c.as_os_str().to_owned())
            .collect();
        let mut pending = steps(target)?;
        let mut missing: Option<PathBuf> = None;
        let mut hops = 0;
        while let Some(step) = pending.pop_front() {
            let Step::Name(name) = step else {
                if let Some(missing) = &missing {
                    return Err(format!(
                        "goes up with `..` after `{}`, which does not exist yet",
                        missing.display()
                    ));
                }
                if at.pop().is_none() {
                    return Err("points outside the target".to_owned());
                }
                continue;
            };
            at.push(name);
            if missing.is_some() {
                continue;
            }
            let here: PathBuf = at.iter().collect();
            match self.dir.symlink_metadata(&here) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err("goes through too many levels of links".to_owned());
                    }
                    let next = self
                        .dir
                        .read_link_contents(&here)
                        .map_err(|e| format!("{}: {e}", self.root.join(&here).display()))?;
                    // The link is replaced by its own target, resolved from its directory.
                    at.pop();
                    for step in steps(&next)?.into_iter().rev() {
                        pending.push_front(step);
                    }
                }
                Ok(_) => {}
                // Missing (or under a file, where the kernel would stop): unknown from here on.
                Err(_) => missing = Some(here),
            }
        }
        Ok(())
    }

    /// Sets the owner of the symlink `rel` itself (`fchownat` with `AT_SYMLINK_NOFOLLOW` on its
    /// directory's handle).
    fn chown_symlink(&self, rel: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        let name = rel
            .file_name()
            .ok_or_else(|| std::io::Error::other("a symlink without a name"))?;
        let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => self.dir.open_dir_nofollow(parent)?,
            None => self.dir.try_clone()?,
        };
        nix::unistd::fchownat(
            &parent,
            name,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(std::io::Error::from)
    }

    /// Directory attributes last, in reverse archive order (children before their parent), so
    /// a read-only directory did not block its content; each set on the directory opened
    /// without following a link.
    fn finish_dirs(&self) -> Result<(), String> {
        for attrs in self.dirs.iter().rev() {
            let io = |e: std::io::Error| format!("{}: {e}", self.root.join(&attrs.rel).display());
            // Opened for reading (a descriptor `fchmod` and `futimens` accept, unlike the
            // `O_PATH` one of a `Dir`), `O_NOFOLLOW`.
            let dir = self
                .dir
                .open_with(
                    &attrs.rel,
                    OpenOptions::new()
                        .read(true)
                        .follow(FollowSymlinks::No)
                        .maybe_dir(true),
                )
                .map_err(io)?
                .into_std();
            if !dir.metadata().map_err(io)?.is_dir() {
                return Err(format!(
                    "{}: no longer a directory",
                    self.root.join(&attrs.rel).display()
                ));
            }
            set_attrs(&dir, attrs.mode, attrs.mtime, attrs.owner).map_err(io)?;
        }
        Ok(())
    }
}

/// One step of a link target's way.
enum Step {
    Up,
    Name(OsString),
}

/// The steps of a relative link target; an absolute one is refused.
fn steps(target: &Path) -> Result<VecDeque<Step>, String> {
    target
        .components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::ParentDir => Ok(Step::Up),
            Component::Normal(name) => Ok(Step::Name(name.to_owned())),
            _ => Err("is absolute: it would point outside the target".to_owned()),
        })
        .collect()
}

/// Writes `contents` as the file `name` in `root` without following a link: into a new file
/// of a fresh name (`O_EXCL`), synced, then renamed over `name` (a link there is replaced, not
/// followed). A regular file it replaces passes on its mode and owner.
pub fn replace_file(root: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let dir = Dir::open_ambient_dir(root, ambient_authority())?;
    let old = dir
        .symlink_metadata(name)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| {
            use cap_std::fs::MetadataExt as CapMetadataExt;
            (m.mode() & 0o7777, m.uid(), m.gid())
        });
    let temp = format!(".{name}.aitbc-new-{:016x}", rand::random::<u64>());
    let written = dir
        .open_with(&temp, OpenOptions::new().write(true).create_new(true))
        .and_then(|file| {
            let mut file = file.into_std();
            file.write_all(contents)?;
            if let Some((mode, uid, gid)) = old {
                // Only when it differs: an agent that is not root may not give a file away.
                let new = file.metadata()?;
                if (MetadataExt::uid(&new), MetadataExt::gid(&new)) != (uid, gid) {
                    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            file.sync_all()
        })
        .and_then(|()| dir.rename(&temp, &dir, name));
    if written.is_err() {
        let _ = dir.remove_file(&temp);
    }
    written
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

    /// Whether a link `link -> target` would be accepted in `root` as it is now.
    fn accepted(root: &Path, link: &str, target: &str) -> Result<(), String> {
        let unpacker = Unpacker {
            root,
            dir: Dir::open_ambient_dir(root, ambient_authority()).expect("open"),
            real_dirs: HashSet::new(),
            dirs: Vec::new(),
        };
        unpacker.check_link(Path::new(link), Path::new(target))
    }

    #[test]
    fn symlinks_are_judged_by_where_they_lead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("chain/sub")).expect("mkdir");
        std::fs::create_dir_all(root.join("wallets")).expect("mkdir");
        for (link, target) in [
            ("chain/current", "chain.db"),
            ("chain/current", "../wallets/a.json"),
            ("chain/sub/up", "../../wallets"),
            ("dot", "."),
            ("chain/later", "not-yet/deeper"),
        ] {
            accepted(root, link, target).unwrap_or_else(|e| panic!("{link} -> {target}: {e}"));
        }
        for (link, target, why) in [
            ("chain/current", "../../etc", "outside"),
            ("link", "/", "absolute"),
            ("link", "..", "outside"),
            ("link", "not-yet/..", "does not exist yet"),
        ] {
            let err = accepted(root, link, target).expect_err(target);
            assert!(err.contains(why), "{link} -> {target}: {err}");
        }
        // Through links already there: `a -> .` is the root, so `a/..` is above it.
        std::os::unix::fs::symlink(".", root.join("a")).expect("symlink");
        accepted(root, "b", "a/chain").expect("a/chain is inside");
        let err = accepted(root, "b", "a/..").expect_err("a/.. is outside");
        assert!(err.contains("outside"), "{err}");
        std::os::unix::fs::symlink("chain/sub", root.join("deep")).expect("symlink");
        accepted(root, "c", "deep/../..").expect("deep/../.. is the root");
        let err = accepted(root, "chain/c", "../deep/../../..").expect_err("above the root");
        assert!(err.contains("outside"), "{err}");
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        let err = accepted(root, "d", "loop/x").expect_err("a loop");
        assert!(err.contains("too many levels"), "{err}");
    }
}
