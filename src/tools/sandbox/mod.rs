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
/// The hidden subcommand that runs the shared FUSE server ([`share::serve`]).
pub const SERVE_SUBCOMMAND: &str = "__sandbox-serve";

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
    /// Capabilities CMD keeps (a bit mask by capability number); `None`: all of the caller's.
    pub caps: Option<u64>,
    /// Give CMD a network namespace of its own (loopback only).
    pub private_net: bool,
}

/// Capability numbers and names (capabilities(7)) that `--cap` accepts.
pub const CAPABILITIES: [(u32, &str); 41] = [
    (0, "chown"),
    (1, "dac_override"),
    (2, "dac_read_search"),
    (3, "fowner"),
    (4, "fsetid"),
    (5, "kill"),
    (6, "setgid"),
    (7, "setuid"),
    (8, "setpcap"),
    (9, "linux_immutable"),
    (10, "net_bind_service"),
    (11, "net_broadcast"),
    (12, "net_admin"),
    (13, "net_raw"),
    (14, "ipc_lock"),
    (15, "ipc_owner"),
    (16, "sys_module"),
    (17, "sys_rawio"),
    (18, "sys_chroot"),
    (19, "sys_ptrace"),
    (20, "sys_pacct"),
    (21, "sys_admin"),
    (22, "sys_boot"),
    (23, "sys_nice"),
    (24, "sys_resource"),
    (25, "sys_time"),
    (26, "sys_tty_config"),
    (27, "mknod"),
    (28, "lease"),
    (29, "audit_write"),
    (30, "audit_control"),
    (31, "setfcap"),
    (32, "mac_override"),
    (33, "mac_admin"),
    (34, "syslog"),
    (35, "wake_alarm"),
    (36, "block_suspend"),
    (37, "audit_read"),
    (38, "perfmon"),
    (39, "bpf"),
    (40, "checkpoint_restore"),
];

/// What a CI job run as root needs (the set container runtimes grant by default): file
/// ownership and permissions, set*id, kill, chroot, mknod, binding low ports, raw sockets.
/// Not: mounting, namespaces, ptrace, modules, raw I/O, the clock, network admin (which would
/// let CMD leave the sandbox or change the host).
pub const DEFAULT_CAPS: &[&str] = &[
    "chown",
    "dac_override",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "net_bind_service",
    "net_raw",
    "sys_chroot",
    "mknod",
    "audit_write",
    "setfcap",
];

/// The mask of capability names (with or without `cap_`, any case).
pub fn cap_mask(names: &[String]) -> Result<u64, String> {
    let mut mask = 0u64;
    for n in names {
        let want = n.to_ascii_lowercase();
        let want = want.strip_prefix("cap_").unwrap_or(&want);
        let (num, _) = CAPABILITIES
            .iter()
            .find(|(_, name)| *name == want)
            .ok_or_else(|| format!("--cap {n}: no such capability (see capabilities(7))"))?;
        mask |= 1 << num;
    }
    Ok(mask)
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

    #[test]
    fn capability_names() {
        let d: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
        let m = cap_mask(&d).unwrap();
        assert_eq!(m & (1 << 21), 0, "no sys_admin by default");
        assert_ne!(m & (1 << 0), 0);
        assert_eq!(cap_mask(&["CAP_SYS_ADMIN".into()]).unwrap(), 1 << 21);
        assert!(cap_mask(&["sys_everything".into()]).is_err());
    }
}
