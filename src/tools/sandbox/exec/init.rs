//! The sandbox's PID 1: places /proc, /dev, /tmp and the binds, enters the tree, runs CMD, forwards signals to it and reaps orphans.

#[allow(unused_imports)]
use super::*;

/// Waits for `pid`, reaping any other child on the way; its exit status as a shell shows it.
pub(super) fn wait_for(pid: libc::pid_t) -> i32 {
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
pub(super) fn init_main(spec: &ExecSpec, merged: &Path) -> io::Result<i32> {
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
pub(super) fn enter_root(merged: &Path) -> io::Result<()> {
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
pub(super) fn run_cmd(spec: &ExecSpec) -> io::Result<i32> {
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
