//! Hostile archives and the sandbox they are unpacked in, shared by the agent's confinement
//! tests and the ledger restore's (`tests/tests/ledger.rs` includes this file by path).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

/// A tar entry with a raw (unchecked) name and link name, as a hostile archive has them.
pub fn raw_entry(
    name: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
    mode: u32,
    mtime: u64,
    uid: u64,
) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_uid(uid);
    header.set_gid(uid);
    header.set_size(data.len() as u64);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

pub fn simple(name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]) -> Vec<u8> {
    raw_entry(name, kind, link, data, 0o644, 1_000_000, 0)
}

/// What `lstat` and a read say about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    /// A file's bytes or a link's target.
    pub content: Vec<u8>,
}

/// Every path under `dir` but those under `skip`, by `lstat` (links not followed).
pub fn snapshot(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(path) = todo.pop() {
        if path == skip {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let kind = meta.file_type();
        let (kind, content) = if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("readlink");
            ("symlink", target.into_os_string().into_encoded_bytes())
        } else if kind.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read dir") {
                todo.push(entry.expect("entry").path());
            }
            ("dir", Vec::new())
        } else if kind.is_file() {
            ("file", std::fs::read(&path).expect("read"))
        } else {
            ("other", Vec::new())
        };
        out.insert(
            path.strip_prefix(dir).expect("inside").to_owned(),
            Node {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                content,
            },
        );
    }
    out
}

/// A sandbox of sentinels with the target two levels down: `..` and `../..` from the target,
/// and absolute paths into the sandbox, all land on something whose change would show.
pub struct Sandbox {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonicalize");
        let target = root.join("level1/target");
        std::fs::create_dir_all(&target).expect("mkdir");
        let files = [
            ("sentinel.txt", 0o640),
            ("level1/sibling.txt", 0o600),
            ("secret_dir/inner.txt", 0o400),
            ("a/x", 0o644),
            ("metadata.json", 0o644),
        ];
        for (i, (name, mode)) in files.iter().enumerate() {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, format!("sentinel {i}")).expect("write");
            set(&path, *mode, 1_000 + i as i64);
        }
        std::os::unix::fs::symlink("sentinel.txt", root.join("link_to_sentinel")).expect("ln");
        for (i, (name, mode)) in [
            ("secret_dir", 0o711),
            ("a", 0o755),
            ("b", 0o700),
            ("level1", 0o750),
            (".", 0o755),
        ]
        .iter()
        .enumerate()
        {
            let path = root.join(name);
            std::fs::create_dir_all(&path).expect("mkdir");
            set(&path, *mode, 2_000 + i as i64);
        }
        Sandbox {
            _dir: dir,
            root,
            target,
        }
    }

    pub fn outside(&self) -> BTreeMap<PathBuf, Node> {
        snapshot(&self.root, &self.target)
    }
}

pub fn set(path: &Path, mode: u32, mtime: i64) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    let file = std::fs::File::open(path).expect("open");
    file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime as u64))
        .expect("utime");
}

/// Asserts the sandbox outside the target is as it was, naming the first difference.
pub fn assert_same(before: &BTreeMap<PathBuf, Node>, after: &BTreeMap<PathBuf, Node>, what: &str) {
    for (path, node) in before {
        assert_eq!(
            after.get(path),
            Some(node),
            "{what}: {} changed outside the target",
            path.display()
        );
    }
    for path in after.keys() {
        assert!(
            before.contains_key(path),
            "{what}: {} appeared outside the target",
            path.display()
        );
    }
}

/// A name or link target: from the alphabet, or one used earlier in the archive.
#[derive(Debug, Clone)]
pub enum Name {
    Path(String),
    Earlier(usize),
    /// An earlier name with more after it (`a/..`): links built on links.
    EarlierThen(usize, &'static str),
}

#[derive(Debug, Clone)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(Name),
    HardLink(Name),
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub name: Name,
    pub kind: Kind,
    pub mode: u32,
    pub mtime: u64,
    pub uid: u64,
}

/// A path from the alphabet; `@` stands for the sandbox's absolute path. `hostile` in 0..=12
/// weighs `.`, `..` and absolute paths against plain names: entry names get a little of them
/// (so an archive goes on long enough to build links on links), link targets more.
pub fn path_text(hostile: u32) -> impl Strategy<Value = String> {
    // `a`, `b` and `c` often, so that names meet: an entry over a link, a link through a link.
    let plain = prop::sample::select(vec![
        "a",
        "b",
        "c",
        "a",
        "b",
        "c",
        "a",
        "b",
        "c",
        "x",
        "level1",
        "target",
        "sentinel.txt",
        "secret_dir",
        "metadata.json",
        "link_to_sentinel",
    ]);
    let part = prop_oneof![
        40 - 3 * hostile => plain,
        1 + hostile / 2 => Just("."),
        1 + 2 * hostile => Just(".."),
    ];
    let prefix = prop_oneof![
        80 - 6 * hostile => Just(""),
        1 + hostile / 2 => Just("/"),
        1 + hostile / 2 => Just("@/"),
    ];
    (
        prefix,
        prop::collection::vec(part, 1..3),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(prefix, parts, slash)| {
            format!(
                "{prefix}{}{}",
                parts.join("/"),
                if slash { "/" } else { "" }
            )
        })
}

/// An entry's name: mostly plain, else an earlier name or something under it (`c/x`).
pub fn entry_name() -> impl Strategy<Value = Name> {
    prop_oneof![
        4 => path_text(0).prop_map(Name::Path),
        1 => any::<usize>().prop_map(Name::Earlier),
        1 => any::<usize>().prop_map(|i| Name::EarlierThen(i, "x")),
    ]
}

/// A symlink's target: hostile paths, `.`, earlier names and ways up from them (`a/..`).
pub fn link_target() -> impl Strategy<Value = Name> {
    prop_oneof![
        2 => path_text(8).prop_map(Name::Path),
        3 => Just(Name::Path(".".to_owned())),
        1 => any::<usize>().prop_map(Name::Earlier),
        3 => (any::<usize>(), prop::sample::select(vec!["..", "..", "../..", ".", "x", "../x"]))
            .prop_map(|(i, then)| Name::EarlierThen(i, then)),
    ]
}

pub fn spec() -> impl Strategy<Value = Spec> {
    let kind = prop_oneof![
        3 => Just(Kind::Dir),
        3 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Kind::File),
        6 => link_target().prop_map(Kind::Symlink),
        1 => prop_oneof![
            3 => any::<usize>().prop_map(Name::Earlier),
            1 => path_text(4).prop_map(Name::Path),
        ]
        .prop_map(Kind::HardLink),
    ];
    (
        entry_name(),
        kind,
        0u32..0o10000,
        0u64..4_000_000_000,
        prop::sample::select(vec![0u64, 1000, 65534]),
    )
        .prop_map(|(name, kind, mode, mtime, uid)| Spec {
            name,
            kind,
            mode,
            mtime,
            uid,
        })
}

/// The archive of `specs`, `@` replaced by `sandbox`; names too long for a header dropped.
pub fn build(specs: &[Spec], sandbox: &Path) -> Vec<u8> {
    let mut used: Vec<String> = Vec::new();
    let mut archive = Vec::new();
    let resolve = |name: &Name, used: &[String]| -> String {
        let text = match name {
            Name::Path(text) => text.clone(),
            Name::Earlier(i) if !used.is_empty() => used[i % used.len()].clone(),
            Name::Earlier(_) => "a".to_owned(),
            Name::EarlierThen(i, then) if !used.is_empty() => {
                format!("{}/{then}", used[i % used.len()].trim_end_matches('/'))
            }
            Name::EarlierThen(_, then) => format!("a/{then}"),
        };
        text.replacen('@', &sandbox.display().to_string(), 1)
    };
    for spec in specs {
        let name = resolve(&spec.name, &used);
        let (kind, link, data) = match &spec.kind {
            Kind::Dir => (tar::EntryType::Directory, None, Vec::new()),
            Kind::File(data) => (tar::EntryType::Regular, None, data.clone()),
            Kind::Symlink(to) => (
                tar::EntryType::Symlink,
                Some(resolve(to, &used)),
                Vec::new(),
            ),
            Kind::HardLink(to) => (tar::EntryType::Link, Some(resolve(to, &used)), Vec::new()),
        };
        if name.len() > 99 || link.as_ref().is_some_and(|l| l.len() > 99) {
            continue;
        }
        archive.extend(raw_entry(
            &name,
            kind,
            link.as_deref(),
            &data,
            spec.mode,
            spec.mtime,
            spec.uid,
        ));
        used.push(name);
    }
    archive
}

/// Cases per property: `PROPTEST_CASES`, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// Every symlink under `root` whose resolution (followed as the kernel would, from where it
/// stands) leaves `root`: an absolute target, or `..` above the root. A part of the way that
/// does not exist is taken as written.
pub fn escaping_links(root: &Path) -> Vec<PathBuf> {
    let mut escaping = Vec::new();
    for (rel, node) in snapshot(root, &root.join("\0none")) {
        if node.kind == "symlink" && !resolves_inside(root, &root.join(&rel)) {
            escaping.push(rel);
        }
    }
    escaping
}

fn resolves_inside(root: &Path, link: &Path) -> bool {
    use std::collections::VecDeque;
    use std::path::Component;
    let mut at = link.parent().expect("a parent").to_owned();
    let mut pending: VecDeque<PathBuf> =
        VecDeque::from([std::fs::read_link(link).expect("readlink")]);
    let mut hops = 0;
    while let Some(next) = pending.pop_front() {
        if next.is_absolute() {
            return false;
        }
        let mut parts: VecDeque<Component<'_>> = next.components().collect();
        while let Some(part) = parts.pop_front() {
            match part {
                Component::ParentDir => {
                    if at == root {
                        return false;
                    }
                    at.pop();
                }
                Component::Normal(name) => {
                    at.push(name);
                    if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                        hops += 1;
                        if hops > 40 {
                            return true; // a loop: the kernel gives ELOOP, nothing outside
                        }
                        let target = std::fs::read_link(&at).expect("readlink");
                        at.pop();
                        let rest: PathBuf = parts.iter().collect();
                        pending.push_front(rest);
                        pending.push_front(target);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    at.starts_with(root)
}
