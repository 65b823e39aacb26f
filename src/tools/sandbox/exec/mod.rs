//! The sandbox's own process tree, run by `granary __sandbox-exec SPEC` — a fresh,
//! single-threaded process (no async runtime), because `setns` into a mount namespace and the
//! forks below are only sound without other threads.
//!
//! This process enters new mount and PID namespaces, lays the overlay over the tree and
//! forks the namespace's init, which places the mounts, enters the tree (`--as-root`) and
//! forks CMD. Init forwards signals to CMD, reaps orphans and exits with CMD's status; when it
//! exits the kernel kills everything left in the PID namespace, and when the last process
//! leaves the mount namespace every mount in it (overlay, tmpfs, the FUSE clone) goes with it.
//! Both this process and init die with their parent (`PR_SET_PDEATHSIG`), so nothing outlives
//! a SIGKILLed `granary sandbox`.

use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use super::{ExecSpec, Lower, Placement, EXIT_SETUP};

/// Exit status when CMD is not found inside the tree (as shells do).
const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when CMD exists but cannot be executed.
const EXIT_CANNOT_EXEC: i32 = 126;
/// Signals passed on to CMD.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];
/// Device nodes bind-mounted into a minimal /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

// The new mount API (Linux 5.2); libc has the syscall numbers but not these flags.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The process signals are forwarded to (0: none yet).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // A terminal's Ctrl-C (sent by the kernel to the whole foreground process group) reaches
    // CMD by itself; passing it on as well would deliver it twice.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    if !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent by other processes to
/// `pid` (set later with [`forward_to`]); used by `granary sandbox`, the sandbox and its init.
pub fn install_forwarding() {
    for sig in FORWARDED {
        // SAFETY: a zeroed sigaction is valid; `forward` only reads memory and calls kill,
        // both async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Where forwarded signals go from now on.
pub fn forward_to(pid: libc::pid_t) {
    FORWARD_TO.store(pid, Ordering::Relaxed);
}

mod init;
mod mounts;

#[allow(unused_imports)]
pub use init::*;
#[allow(unused_imports)]
pub use mounts::*;
/// Runs the sandbox described by `spec`; returns the exit status for `granary sandbox`.
pub fn exec_main(spec: &str) -> i32 {
    let spec: ExecSpec = match serde_json::from_str(spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("granary: error: bad sandbox spec: {e}");
            return EXIT_SETUP;
        }
    };
    match run(&spec) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("granary: error: sandbox: {e}");
            EXIT_SETUP
        }
    }
}

fn run(spec: &ExecSpec) -> io::Result<i32> {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } as u32 != spec.parent {
        return Err(io::Error::other(
            "granary sandbox exited before the sandbox started",
        ));
    }
    let tree = match &spec.lower {
        Lower::Path(p) => Tree::Path(p.clone()),
        Lower::Server { pid, path } => Tree::Detached(clone_from_namespace(*pid, path)?),
    };
    // Mounts, processes and System V IPC of its own; a network of its own if asked.
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC;
    if spec.private_net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare with flags only; this process is single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(io::Error::new(
                e.kind(),
                "creating mount and PID namespaces: permission denied (needs CAP_SYS_ADMIN; run as root)",
            ));
        }
        return Err(io::Error::new(
            e.kind(),
            format!("creating namespaces: {e}"),
        ));
    }
    if spec.private_net {
        loopback_up()?;
    }
    // Nothing mounted from here on may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    let work = &spec.work_dir;
    mkdir_p(work)?;
    mount(
        Some(Path::new("granary-sandbox")),
        work,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0700"),
    )?;
    let lower = work.join("lower");
    mkdir_p(&lower)?;
    match tree {
        Tree::Path(p) => mount(Some(&p), &lower, None, libc::MS_BIND, None)?,
        Tree::Detached(fd) => attach(&fd, &lower)?,
    }
    // A kept upper layer is bound into the work dir, so overlay options only ever name
    // paths we chose (no ',' or ':' to escape).
    let layers = match &spec.keep_upper {
        Some(dir) => {
            let kept = work.join("kept");
            mkdir_p(&kept)?;
            mount(Some(dir), &kept, None, libc::MS_BIND, None)?;
            kept
        }
        None => work.clone(),
    };
    let (upper, workdir) = (layers.join("upper"), layers.join("work"));
    mkdir_p(&upper)?;
    mkdir_p(&workdir)?;
    let merged = match &spec.placement {
        Placement::AsRoot => work.join("merged"),
        Placement::At(p) => p.clone(),
    };
    mkdir_p(&merged)?;
    mount(
        Some(Path::new("granary-overlay")),
        &merged,
        Some("overlay"),
        0,
        Some(&format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            workdir.display()
        )),
    )?;

    install_forwarding();
    // SAFETY: single-threaded; the child only continues with plain code and exits.
    let init = unsafe { libc::fork() };
    if init < 0 {
        return Err(os_err("fork"));
    }
    if init == 0 {
        let code = match init_main(spec, &merged) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("granary: error: sandbox: {e}");
                EXIT_SETUP
            }
        };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    forward_to(init);
    Ok(wait_for(init))
}
