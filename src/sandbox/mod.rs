//! `granary sandbox`: run a command inside a stored tree, with a private writable layer on
//! top, gone afterwards.
//!
//! Three processes share the work:
//! - `granary sandbox` (the CLI, multi-threaded) resolves the root, finds or starts the FUSE
//!   view ([`share`]), starts the sandbox process, forwards SIGINT/SIGTERM to it and exits
//!   with its status.
//! - The FUSE view is either a running `granary mount` of the same store (found in
//!   [`registry`]), or a shared server per (store, tree) that mounts the tree inside its own
//!   private mount namespace — never on the host — and exits when its last sandbox has gone
//!   (reference-counted with file locks). Every sandbox of a tree uses that one mount, so one
//!   FUSE connection and one page cache.
//! - `granary __sandbox-exec` ([`exec`]) is a fresh single-threaded process: it clones the
//!   FUSE mount into new mount and PID namespaces, lays overlayfs over it and runs CMD under
//!   a minimal init.

pub mod exec;
pub mod registry;
pub mod share;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Exit status of `granary sandbox` when the sandbox itself could not be set up.
pub const EXIT_SETUP: i32 = 125;
/// The hidden subcommand that runs [`exec::exec_main`].
pub const EXEC_SUBCOMMAND: &str = "__sandbox-exec";

/// Where the tree to lay the overlay over comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Lower {
    /// A directory of the host's view (a running `granary mount`).
    Path(PathBuf),
    /// A FUSE mount in the private mount namespace of the shared server `pid`.
    Server { pid: u32, path: PathBuf },
}

/// Where CMD sees the tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Placement {
    /// As its root filesystem.
    AsRoot,
    /// At this path of the host's view.
    At(PathBuf),
}

/// `--bind SRC:DST[:ro]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Bind {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub ro: bool,
}

impl std::str::FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (src, dst, false),
            [src, dst, "ro"] => (src, dst, true),
            [src, dst, "rw"] => (src, dst, false),
            _ => return Err(format!("{s:?}: expected SRC:DST or SRC:DST:ro")),
        };
        if src.is_empty() || !dst.starts_with('/') {
            return Err(format!(
                "{s:?}: SRC must be a path and DST an absolute path inside the tree"
            ));
        }
        Ok(Bind {
            src: PathBuf::from(src),
            dst: PathBuf::from(dst),
            ro,
        })
    }
}

/// Everything the sandbox process needs, passed to it as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The `granary sandbox` process; the sandbox refuses to start if it is already gone.
    pub parent: u32,
    pub lower: Lower,
    pub placement: Placement,
    pub binds: Vec<Bind>,
    pub tmpfs: Vec<PathBuf>,
    pub keep_upper: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub cmd: Vec<String>,
    /// The caller's working directory (kept with `--at`).
    pub cwd: PathBuf,
    /// An empty directory to mount the sandbox's scratch tmpfs on (inside its namespace).
    pub work_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("granary sandbox needs CAP_SYS_ADMIN to create mount and PID namespaces and mount overlayfs and FUSE; run it as root (e.g. with sudo)")]
    NoPrivilege,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The directory for runtime state (mount registry, shared servers): `$GRANARY_RUNTIME_DIR`,
/// else `/run/granary` for root, else `$XDG_RUNTIME_DIR/granary`, else `/tmp/granary-UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRANARY_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/granary");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => Path::new(&d).join("granary"),
        None => PathBuf::from(format!("/tmp/granary-{uid}")),
    }
}

/// Fails unless this process has CAP_SYS_ADMIN (read from /proc/self/status).
pub fn check_privilege() -> Result<(), SandboxError> {
    const CAP_SYS_ADMIN: u32 = 21;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if eff & (1 << CAP_SYS_ADMIN) == 0 {
        return Err(SandboxError::NoPrivilege);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_syntax() {
        let b: Bind = "/a:/b:ro".parse().unwrap();
        assert_eq!(
            b,
            Bind {
                src: "/a".into(),
                dst: "/b".into(),
                ro: true
            }
        );
        assert!(!"/a:/b".parse::<Bind>().unwrap().ro);
        assert!("/a".parse::<Bind>().is_err());
        assert!("/a:b".parse::<Bind>().is_err());
        assert!("/a:/b:x".parse::<Bind>().is_err());
    }
}
