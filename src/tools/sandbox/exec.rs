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

/// The path that names an open descriptor's file (for `mount`, which takes paths).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens `inner`, a path inside the tree at `root`, creating what is missing (directories,
/// and the last component as a directory or an empty file) — every link resolved as if
/// `root` were `/` (`openat2` with `RESOLVE_IN_ROOT`), so a symlink in the tree can never
/// place a mount, or create a file, outside it.
fn target_in(root: &Path, inner: &Path, dir: bool) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let shown = inner.display().to_string();
    let ctx = |what: &str, e: rustix::io::Errno| {
        let kind = io::Error::from_raw_os_error(e.raw_os_error()).kind();
        io::Error::new(kind, format!("{shown}: {what}: {e}"))
    };
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ctx("opening the tree", e))?;
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let open = |p: &Path| {
        let p: &Path = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        rustix::fs::openat2(
            &root_fd,
            p,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        )
    };
    let comps: Vec<&OsStr> = inner
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut prefix = PathBuf::new();
    for (i, c) in comps.iter().enumerate() {
        let parent = prefix.clone();
        prefix.push(c);
        match open(&prefix) {
            Ok(_) => continue,
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(ctx("resolving inside the tree", e)),
        }
        let pfd = open(&parent).map_err(|e| match e {
            rustix::io::Errno::NOENT => ctx(
                "leads through a link to nothing inside the tree (links are resolved inside it)",
                e,
            ),
            e => ctx("resolving inside the tree", e),
        })?;
        let made = if i + 1 == comps.len() && !dir {
            rustix::fs::openat(
                &pfd,
                *c,
                OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .map(drop)
        } else {
            rustix::fs::mkdirat(&pfd, *c, Mode::from_raw_mode(0o755))
        };
        match made {
            Ok(()) => {}
            // Something by that name appeared, or it is a link to nothing: opened below.
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(ctx("creating it inside the tree", e)),
        }
    }
    open(&prefix).map_err(|e| match e {
        rustix::io::Errno::NOENT => ctx(
            "is a link to nothing inside the tree (links are resolved inside it)",
            e,
        ),
        e => ctx("resolving inside the tree", e),
    })
}

/// Brings up the loopback interface of a new network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket for the ioctl, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(os_err("socket for the loopback interface"));
    }
    // SAFETY: the fd was just opened and is owned here.
    let _owned = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: a zeroed ifreq is valid; the name is NUL-terminated within its 16 bytes.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq passed.
    unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(os_err("reading the loopback interface's flags"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(os_err("bringing the loopback interface up"));
        }
    }
    Ok(())
}

/// Drops every capability not in `keep` from the bounding set (so CMD, exec'd as root, gets
/// no others) and from the inheritable and ambient sets.
fn drop_capabilities(keep: u64) -> io::Result<()> {
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // Past the kernel's last capability.
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(os_err(format_args!("dropping capability {cap}")));
        }
    }
    let mut sets = rustix::thread::capabilities(None)
        .map_err(|e| io::Error::other(format!("reading capabilities: {e}")))?;
    let keep = rustix::thread::CapabilitySet::from_bits_retain(keep);
    sets.inheritable &= keep;
    sets.permitted &= keep;
    sets.effective &= keep;
    rustix::thread::set_capabilities(None, sets)
        .map_err(|e| io::Error::other(format!("dropping capabilities: {e}")))?;
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| io::Error::other(format!("clearing ambient capabilities: {e}")))?;
    Ok(())
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
        let target = target_in(merged, &b.dst, b.src.is_dir())?;
        mount(
            Some(&b.src),
            &fd_path(&target),
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        if b.ro {
            // Resolved again: the path now leads into the new mount.
            let bound = target_in(merged, &b.dst, b.src.is_dir())?;
            mount(
                None,
                &fd_path(&bound),
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )?;
        }
    }
    for t in &spec.tmpfs {
        let target = target_in(merged, t, true)?;
        mount(
            Some(Path::new("tmpfs")),
            &fd_path(&target),
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
        if let Some(keep) = spec.caps {
            if let Err(e) = drop_capabilities(keep) {
                eprintln!("granary: error: sandbox: {e}");
                // SAFETY: leaving the child.
                unsafe { libc::_exit(EXIT_SETUP) };
            }
        }
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
