//! A restore's target must be apart from what the agent keeps: a target that holds the
//! repository (a `file://` one) would have it moved aside and deleted by the swap, one inside it
//! would write into it; likewise the scratch and spool directories.

use std::path::{Component, Path, PathBuf};

/// A directory a restore may neither hold nor write into, and what it is (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub what: String,
    pub path: PathBuf,
}

impl Protected {
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> Protected {
        Protected {
            what: what.into(),
            path: path.into(),
        }
    }
}

/// Refuses `target` when it is, holds or lies inside one of `protected`, naming it. Both sides
/// are canonicalized first (links and `..` resolved; a part that does not exist yet is taken as
/// written), so another spelling of the same place is caught too.
pub fn check_apart(target: &Path, protected: &[Protected]) -> Result<(), String> {
    let canonical_target =
        canonical(target).map_err(|e| format!("resolve the target {}: {e}", target.display()))?;
    for keep in protected {
        let Ok(kept) = canonical(&keep.path) else {
            continue;
        };
        let relation = if canonical_target.starts_with(&kept) {
            "lies inside"
        } else if kept.starts_with(&canonical_target) {
            "holds"
        } else {
            continue;
        };
        return Err(format!(
            "refused to restore into {}: it {relation} the {} {}, which a restore must not replace or write into (with or without --force); choose another target",
            target.display(),
            keep.what,
            keep.path.display()
        ));
    }
    Ok(())
}

/// `path` absolute, with the links and `..` of its longest existing part resolved and the
/// rest appended (`..` there taken lexically).
fn canonical(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    let base = loop {
        match existing.canonicalize() {
            Ok(base) => break base,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                // `..` as the last part, or the root itself unreadable: resolve lexically.
                _ => break lexical(existing),
            },
        }
    };
    let mut out = base;
    for part in rest.iter().rev() {
        out.push(part);
    }
    Ok(lexical(&out))
}

/// `.` and `..` removed without touching the filesystem.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_holding_or_inside_a_protected_directory_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        std::fs::create_dir_all(base.join("data/repo/chunks")).expect("mkdir");
        std::fs::create_dir_all(base.join("elsewhere")).expect("mkdir");
        std::os::unix::fs::symlink(base.join("data"), base.join("alias")).expect("symlink");
        let protected = [Protected::new("repository", base.join("data/repo"))];
        for (target, relation) in [
            (base.join("data"), "holds"),
            (base.join("alias"), "holds"),
            (base.join("elsewhere/../data/."), "holds"),
            (base.join("data/repo"), "lies inside"),
            (base.join("alias/repo/chunks/new/deeper"), "lies inside"),
            (base.to_owned(), "holds"),
        ] {
            let err = check_apart(&target, &protected).expect_err("refused");
            assert!(
                err.contains(relation) && err.contains("repository") && err.contains("data/repo"),
                "{}: {err}",
                target.display()
            );
        }
        for target in [
            base.join("elsewhere"),
            base.join("data/repo2"),
            base.join("data/other/new"),
        ] {
            check_apart(&target, &protected).expect("apart");
        }
    }
}
