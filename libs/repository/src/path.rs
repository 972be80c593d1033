//! Object keys inside a repository.

use std::fmt;

/// A key relative to the repository root: `/`-separated segments of `[A-Za-z0-9._-]`, none empty,
/// `.` or `..`, no leading `/`. Everything the repository stores is named by one, so neither a
/// manifest nor a listing can make a backend touch anything outside the repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemotePath(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid object key `{0}`: expected segments of A-Z a-z 0-9 . _ - separated by /")]
pub struct BadPath(pub String);

impl RemotePath {
    pub fn new(key: impl Into<String>) -> Result<Self, BadPath> {
        let key = key.into();
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if key.split('/').all(segment_ok) {
            Ok(RemotePath(key))
        } else {
            Err(BadPath(key))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes() {
        for bad in [
            "", "/abs", "a//b", "a/../b", "..", "a/./b", "a/b/", "a b", "a\\b",
        ] {
            assert!(RemotePath::new(bad).is_err(), "{bad:?} accepted");
        }
        let ok = RemotePath::new("chunks/ab/abcdef").expect("valid");
        assert_eq!(ok.file_name(), "abcdef");
    }
}
