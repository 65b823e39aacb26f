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

/// A running helper. Dropping it (at the end of a clean exit, after unmounting) lets the
/// helper see the pipe close, find no mount and exit.
pub struct Reaper {
    _pipe: ChildStdin,
    _child: Child,
}

/// Starts the helper for the mount now at `mountpoint`, from the binary `exe`.
pub fn spawn(exe: &Path, mountpoint: &Path) -> io::Result<Reaper> {
    let id = super::mount_id(mountpoint)
        .ok_or_else(|| io::Error::other(format!("{} is not mounted", mountpoint.display())))?;
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg(mountpoint)
        .arg(id.to_string())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    // Its own process group keeps the helper out of the server's, so a signal sent to that
    // group (Ctrl-C) does not take both. (Not `setsid` in a `pre_exec`: that forces a
    // `fork`, which copies this process's whole address space while the mount's first
    // requests are being answered; this way std spawns with `posix_spawn`.)
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn()?;
    let pipe = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no pipe to the helper"))?;
    Ok(Reaper {
        _pipe: pipe,
        _child: child,
    })
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

/// The helper: `granary __reap-mount MOUNTPOINT MOUNT_ID`. Single-threaded, no runtime.
pub fn reap_main(args: &[OsString]) -> i32 {
    let (Some(path), Some(id)) = (args.first(), args.get(1)) else {
        eprintln!("granary: error: {SUBCOMMAND} MOUNTPOINT MOUNT_ID");
        return 2;
    };
    let path = PathBuf::from(path);
    let Some(id) = id.to_str().and_then(|s| s.parse::<u64>().ok()) else {
        eprintln!("granary: error: {SUBCOMMAND}: bad mount ID {id:?}");
        return 2;
    };
    wait_for_eof();
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
