//! Leaves no dead mount behind a `granary mount` that is killed outright (SIGKILL, OOM
//! killer). Signals it can catch unmount cleanly; for the rest, a small helper process
//! (`granary __reap-mount`) waits on a pipe that only the server holds open. When the server
//! dies the kernel closes the pipe, and the helper lazily detaches the mount it was started
//! for — if that very mount (by its kernel mount ID) is still there.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// The hidden subcommand that runs [`reap_main`].
pub const SUBCOMMAND: &str = "__reap-mount";

/// A running helper. [`Reaper::arm`] tells it which mount to watch; dropping it (at the end
/// of a clean exit, after unmounting, or when the mount failed) lets the helper see the pipe
/// close, find no mount of its own and exit.
pub struct Reaper {
    pipe: ChildStdin,
    _child: Child,
}

/// Starts the helper for a mount about to be made at `mountpoint`, from the binary `exe`.
/// Started before the mount (and armed once it is made) so that starting a process is not in
/// the way of the mount's first requests.
pub fn start(exe: &Path, mountpoint: &Path) -> io::Result<Reaper> {
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg(mountpoint)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    // Its own process group keeps the helper out of the server's, so a signal sent to that
    // group (Ctrl-C) does not take both. (Not `setsid` in a `pre_exec`: that forces a
    // `fork`, which copies this process's whole address space; this way std spawns with
    // `posix_spawn`.)
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn()?;
    let pipe = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no pipe to the helper"))?;
    Ok(Reaper {
        pipe,
        _child: child,
    })
}

impl Reaper {
    /// Tells the helper the kernel mount ID of the mount now at `mountpoint`: from here on,
    /// its server's death detaches it.
    pub fn arm(&mut self, mountpoint: &Path) -> io::Result<()> {
        use std::io::Write;
        let id = super::mount_id(mountpoint)
            .ok_or_else(|| io::Error::other(format!("{} is not mounted", mountpoint.display())))?;
        writeln!(self.pipe, "{id}")
    }
}

/// The mount ID the server writes on stdin (one line); `None` if the pipe closed before a
/// whole line came (nothing was mounted).
fn read_id() -> Option<u64> {
    use std::io::BufRead;
    let mut line = String::new();
    io::stdin().lock().take(32).read_line(&mut line).ok()?;
    line.strip_suffix('\n')?.parse().ok()
}

/// Blocks until stdin (a pipe whose write end only the watched process holds, and never
/// writes to) reaches EOF: the kernel closes it when that process is gone, however it died.
pub fn wait_for_eof() {
    let mut buf = [0u8; 64];
    loop {
        match io::stdin().lock().read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The helper: `granary __reap-mount MOUNTPOINT`, the mount ID on stdin. Single-threaded, no
/// runtime.
pub fn reap_main(args: &[OsString]) -> i32 {
    let Some(path) = args.first() else {
        eprintln!("granary: error: {SUBCOMMAND} MOUNTPOINT (mount ID on stdin)");
        return 2;
    };
    let path = PathBuf::from(path);
    let id = read_id();
    wait_for_eof();
    let Some(id) = id else {
        return 0;
    };
    if super::mount_id(&path) != Some(id) {
        return 0;
    }
    match super::detach(&path) {
        Ok(()) => {
            eprintln!(
                "granary: the server of {} died; its mount was detached",
                path.display()
            );
            0
        }
        Err(e) => {
            eprintln!(
                "granary: error: the server of {} died and its mount could not be detached: {e}",
                path.display()
            );
            1
        }
    }
}
