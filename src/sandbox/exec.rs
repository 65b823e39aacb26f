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

fn os_err(what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: contains a NUL byte", p.to_string_lossy()),
        )
    })
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src_c = src.map(|s| cstr(s.as_os_str())).transpose()?;
    let target_c = cstr(target.as_os_str())?;
    let fstype_c = fstype.map(|f| cstr(OsStr::new(f))).transpose()?;
    let data_c = data.map(|d| cstr(OsStr::new(d))).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src_c),
            target_c.as_ptr(),
            ptr(&fstype_c),
            flags,
            ptr(&data_c).cast(),
        )
    };
    if rc != 0 {
        let what = fstype.unwrap_or(if flags & libc::MS_BIND != 0 {
            "bind"
        } else {
            "mount"
        });
        return Err(os_err(format_args!(
            "mounting {what} at {}",
            target.display()
        )));
    }
    Ok(())
}

fn mkdir_p(p: &Path) -> io::Result<()> {
    std::fs::create_dir_all(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// `base` joined with `inner` taken as relative (a path inside the tree).
fn inside(base: &Path, inner: &Path) -> PathBuf {
    let rel: PathBuf = inner
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    base.join(rel)
}

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
    // SAFETY: unshare with flags only; this process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) } != 0 {
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

enum Tree {
    Path(PathBuf),
    Detached(OwnedFd),
}

/// Clones the FUSE mount at `path` of process `pid`'s mount namespace into a detached mount
/// (`open_tree`), then returns to our own namespace, so the sandbox sees the shared mount —
/// one FUSE connection, one page cache — while the host never does.
fn clone_from_namespace(pid: u32, path: &Path) -> io::Result<OwnedFd> {
    let open = |p: &str| -> io::Result<OwnedFd> {
        let c = cstr(OsStr::new(p))?;
        // SAFETY: a valid path; the fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(os_err(p));
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let home = open("/proc/self/ns/mnt")?;
    let theirs = open(&format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| io::Error::new(e.kind(), format!("the shared FUSE server is gone: {e}")))?;
    let setns = |fd: &OwnedFd| -> io::Result<()> {
        // SAFETY: a valid namespace fd; single-threaded.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_SYS_ADMIN and CAP_SYS_CHROOT; run as root)"
            } else {
                ""
            };
            return Err(io::Error::new(
                e.kind(),
                format!("entering a mount namespace: {e}{hint}"),
            ));
        }
        Ok(())
    };
    setns(&theirs)?;
    let c = cstr(path.as_os_str())?;
    // SAFETY: open_tree(dirfd, path, flags) with a valid path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    let cloned = if fd < 0 {
        Err(os_err(format_args!(
            "cloning the shared mount {}",
            path.display()
        )))
    } else {
        // SAFETY: the syscall returned a new fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    setns(&home)?;
    cloned
}

/// Attaches a detached mount at `target` (`move_mount`).
fn attach(fd: &OwnedFd, target: &Path) -> io::Result<()> {
    let empty = c"";
    let t = cstr(target.as_os_str())?;
    // SAFETY: move_mount(from_dirfd, "", to_dirfd, to_path, flags) with valid arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(os_err(format_args!(
            "attaching the shared mount at {}",
            target.display()
        )));
    }
    Ok(())
}

/// Waits for `pid`, reaping any other child on the way; its exit status as a shell shows it.
fn wait_for(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return EXIT_SETUP;
        }
        if got != pid {
            continue;
        }
        if libc::WIFEXITED(status) {
            return libc::WEXITSTATUS(status);
        }
        if libc::WIFSIGNALED(status) {
            return 128 + libc::WTERMSIG(status);
        }
    }
}

/// PID 1 of the sandbox: places the mounts, enters the tree, runs CMD.
fn init_main(spec: &ExecSpec, merged: &Path) -> io::Result<i32> {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV;
    match &spec.placement {
        Placement::AsRoot => {
            let proc_dir = merged.join("proc");
            mkdir_p(&proc_dir)?;
            mount(
                Some(Path::new("proc")),
                &proc_dir,
                Some("proc"),
                nosuid | libc::MS_NOEXEC,
                None,
            )?;
            let dev = merged.join("dev");
            mkdir_p(&dev)?;
            mount(
                Some(Path::new("granary-dev")),
                &dev,
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some("mode=0755"),
            )?;
            for name in DEVICES {
                let node = dev.join(name);
                std::fs::File::create(&node)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", node.display())))?;
                mount(
                    Some(&Path::new("/dev").join(name)),
                    &node,
                    None,
                    libc::MS_BIND,
                    None,
                )?;
            }
            for (link, to) in [
                ("fd", "/proc/self/fd"),
                ("stdin", "/proc/self/fd/0"),
                ("stdout", "/proc/self/fd/1"),
                ("stderr", "/proc/self/fd/2"),
            ] {
                std::os::unix::fs::symlink(to, dev.join(link))?;
            }
            let shm = dev.join("shm");
            mkdir_p(&shm)?;
            mount(
                Some(Path::new("shm")),
                &shm,
                Some("tmpfs"),
                nosuid,
                Some("mode=1777"),
            )?;
            let tmp = merged.join("tmp");
            mkdir_p(&tmp)?;
            mount(
                Some(Path::new("tmp")),
                &tmp,
                Some("tmpfs"),
                nosuid,
                Some("mode=1777"),
            )?;
        }
        Placement::At(_) => {
            // A /proc that shows the sandbox's own PID namespace.
            mount(
                Some(Path::new("proc")),
                Path::new("/proc"),
                Some("proc"),
                nosuid | libc::MS_NOEXEC,
                None,
            )?;
        }
    }
    for b in &spec.binds {
        let target = inside(merged, &b.dst);
        if b.src.is_dir() {
            mkdir_p(&target)?;
        } else if target.symlink_metadata().is_err() {
            if let Some(parent) = target.parent() {
                mkdir_p(parent)?;
            }
            std::fs::File::create(&target)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.display())))?;
        }
        mount(
            Some(&b.src),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if b.ro {
            mount(
                None,
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    for t in &spec.tmpfs {
        let target = inside(merged, t);
        mkdir_p(&target)?;
        mount(
            Some(Path::new("tmpfs")),
            &target,
            Some("tmpfs"),
            nosuid,
            None,
        )?;
    }
    match &spec.placement {
        Placement::AsRoot => enter_root(merged)?,
        Placement::At(_) => {
            // Re-resolve the working directory so it sees the tree if it lies under it.
            if std::env::set_current_dir(&spec.cwd).is_err() {
                std::env::set_current_dir("/")?;
            }
        }
    }
    run_cmd(spec)
}

/// Makes `merged` the root: pivot_root with the old root stacked beneath, then detached.
fn enter_root(merged: &Path) -> io::Result<()> {
    std::env::set_current_dir(merged)?;
    let dot = c".";
    // SAFETY: pivot_root(".", ".") with valid strings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(os_err("pivot_root into the tree"));
    }
    // SAFETY: umount2 with a valid string.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os_err("detaching the host's root"));
    }
    std::env::set_current_dir("/")
}

/// Forks CMD, forwards signals to it, reaps orphans; CMD's status.
fn run_cmd(spec: &ExecSpec) -> io::Result<i32> {
    let argv: Vec<CString> = spec
        .cmd
        .iter()
        .map(|a| cstr(OsStr::new(a)))
        .collect::<io::Result<_>>()?;
    let Some(prog) = argv.first() else {
        return Err(io::Error::other("no command given"));
    };
    let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    for (k, v) in &spec.env {
        // SAFETY (of set_var): this process is single-threaded.
        std::env::set_var(k, v);
    }
    // An exec failure is reported through a close-on-exec pipe: EOF means CMD is running.
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe"));
    }
    // SAFETY: both fds are new and owned here.
    let (mut rd, mut wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: single-threaded; the child only execs or writes and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(os_err("fork"));
    }
    if child == 0 {
        drop(rd);
        // SAFETY: argv is NUL-terminated and its strings outlive the call.
        unsafe { libc::execvp(prog.as_ptr(), ptrs.as_ptr()) };
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let _ = wr.write_all(&errno.to_ne_bytes());
        // SAFETY: leaving the child.
        unsafe { libc::_exit(EXIT_NOT_FOUND) };
    }
    forward_to(child);
    drop(wr);
    let mut buf = [0u8; 4];
    let failed = matches!(rd.read(&mut buf), Ok(4));
    let status = wait_for(child);
    if failed {
        let errno = i32::from_ne_bytes(buf);
        let shown = &spec.cmd[0];
        return Ok(if errno == libc::ENOENT {
            eprintln!("granary: error: {shown}: not found inside the tree");
            EXIT_NOT_FOUND
        } else {
            eprintln!(
                "granary: error: {shown}: cannot execute inside the tree: {}",
                io::Error::from_raw_os_error(errno)
            );
            EXIT_CANNOT_EXEC
        });
    }
    Ok(status)
}
