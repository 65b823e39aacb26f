//! The system calls the sandbox is made of: mounts placed inside the tree without following links out of it, the shared FUSE mount cloned from the server's namespace, loopback, capabilities.

#[allow(unused_imports)]
use super::*;

pub(super) fn os_err(what: impl std::fmt::Display) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

pub(super) fn cstr(p: &OsStr) -> io::Result<CString> {
    CString::new(p.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: contains a NUL byte", p.to_string_lossy()),
        )
    })
}

pub(super) fn mount(
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

pub(super) fn mkdir_p(p: &Path) -> io::Result<()> {
    std::fs::create_dir_all(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// The path that names an open descriptor's file (for `mount`, which takes paths).
pub(super) fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens `inner`, a path inside the tree at `root`, creating what is missing (directories,
/// and the last component as a directory or an empty file) — every link resolved as if
/// `root` were `/` (`openat2` with `RESOLVE_IN_ROOT`), so a symlink in the tree can never
/// place a mount, or create a file, outside it.
pub(super) fn target_in(root: &Path, inner: &Path, dir: bool) -> io::Result<OwnedFd> {
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
pub(super) fn loopback_up() -> io::Result<()> {
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
pub(super) fn drop_capabilities(keep: u64) -> io::Result<()> {
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

pub(super) enum Tree {
    Path(PathBuf),
    Detached(OwnedFd),
}

/// Clones the FUSE mount at `path` of process `pid`'s mount namespace into a detached mount
/// (`open_tree`), then returns to our own namespace, so the sandbox sees the shared mount —
/// one FUSE connection, one page cache — while the host never does.
pub(super) fn clone_from_namespace(pid: u32, path: &Path) -> io::Result<OwnedFd> {
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
pub(super) fn attach(fd: &OwnedFd, target: &Path) -> io::Result<()> {
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
