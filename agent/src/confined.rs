//! Where a restore may write, and how it writes there.
//!
//! Files from a backup are untrusted input. Everything a restore creates or changes is done
//! through a [`cap_std::fs::Dir`] handle on its staging directory: every path is resolved beneath
//! that directory by the kernel (`openat2` with `RESOLVE_BENEATH` where the kernel has it, cap-std's
//! own component-by-component resolution elsewhere), so no name or link can lead the write out of
//! it, whatever checks above it missed. On top of that:
//!
//! - [`unpack`] never goes through a symlink: an entry whose parent path holds a symlink is
//!   refused, modes, owners and times are set on an opened descriptor (`fchmod`, `fchown`,
//!   `futimens`) or with `AT_SYMLINK_NOFOLLOW`, files are created with `O_EXCL`;
//! - a symlink is restored only when it resolves inside the root, following the links already
//!   unpacked (a chain `a -> .`, `b -> a/..` is refused at `b`);
//! - [`replace_file`] writes a file (`metadata.json`, PostgreSQL's recovery settings) under a
//!   fresh name and renames it into place, so a link of that name is replaced, never followed;
//! - [`check_apart`] refuses a target that holds, or lies inside, the repository or the agent's
//!   own directories.

mod apart;
mod unpack;

pub use apart::{Protected, check_apart};
pub use unpack::{Unpacked, replace_file, safe_relative, unpack};
