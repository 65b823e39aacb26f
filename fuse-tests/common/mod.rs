//! Shared helpers for tests that really mount: a guard that runs `granary mount` as a
//! subprocess, waits (bounded) until the kernel shows the mount, lazily unmounts from a
//! watchdog thread past a time limit, and on drop unmounts and reaps the process — even when
//! the test fails. The store helpers of `tests/common` are re-exported.
//!
//! Use:
//! ```ignore
//! require_fuse!();
//! let store = TestStore::new();
//! let m = Mount::start(&store.url(), &["--root", "name"]);
//! std::fs::read(m.path().join("file"));
//! ```
#![allow(dead_code)]

#[path = "../../tests/common/mod.rs"]
mod store_helpers;
pub use store_helpers::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a mount may live before the watchdog tears it down.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(240);
/// How long to wait for the mount to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(30);

/// Whether FUSE can be used here. Without it: panics if `GRANARY_REQUIRE_FUSE=1` (CI), else
/// prints why the test is skipped and returns false.
pub fn fuse_usable() -> bool {
    let why = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => return true,
        Err(e) => format!("/dev/fuse is not usable: {e}"),
    };
    if std::env::var("GRANARY_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("{why} (and GRANARY_REQUIRE_FUSE=1)");
    }
    eprintln!("skipping FUSE test: {why}");
    false
}

/// Returns early from a test when FUSE is unusable (and not required).
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !$crate::common::fuse_usable() {
            return;
        }
    };
}

/// The `major:minor` field of the mountinfo line for `path`, if mounted.
pub fn mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Lazily detaches a mount, whichever tool is present.
pub fn lazy_unmount(path: &Path) {
    let ok = Command::new("fusermount3")
        .arg("-uz")
        .arg(path)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(path)
            .stderr(Stdio::null())
            .status();
    }
}

/// A running `granary mount`. Dropping it unmounts and reaps the process.
pub struct Mount {
    child: Option<Child>,
    dir: tempfile::TempDir,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Mount {
    /// Mounts `store_url` (with `extra` arguments after the mount point) and waits until the
    /// mount is live. Panics with granary's stderr if it does not come up.
    pub fn start(store_url: &str, extra: &[&str]) -> Mount {
        Self::start_with_limit(store_url, extra, DEFAULT_LIMIT)
    }

    pub fn start_with_limit(store_url: &str, extra: &[&str], limit: Duration) -> Mount {
        match Self::try_start(store_url, extra, limit) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `start`, but returns granary's failure (exit status and stderr) as an error.
    pub fn try_start(store_url: &str, extra: &[&str], limit: Duration) -> Result<Mount, String> {
        Self::try_start_prepared(store_url, extra, limit, |_| {})
    }

    /// Like `try_start`, with `prepare` called on the mount point before mounting.
    pub fn try_start_prepared(
        store_url: &str,
        extra: &[&str],
        limit: Duration,
        prepare: impl FnOnce(&Path),
    ) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).map_err(|e| e.to_string())?;
        prepare(&path);
        let log = dir.path().join("stderr");
        let child = Command::new(granary_bin())
            .arg("--store")
            .arg(store_url)
            .arg("mount")
            .arg(&path)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("spawning granary: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (stop, fired, path) = (stop.clone(), fired.clone(), path.clone());
            let pid = child.id() as i32;
            std::thread::spawn(move || {
                let end = Instant::now() + limit;
                while Instant::now() < end {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                eprintln!(
                    "watchdog: mount at {} outlived {limit:?}; tearing down",
                    path.display()
                );
                fired.store(true, Ordering::SeqCst);
                lazy_unmount(&path);
                // SAFETY: plain syscall on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            })
        };
        let mut m = Mount {
            child: Some(child),
            dir,
            path,
            stop,
            fired,
            watchdog: Some(watchdog),
        };
        let end = Instant::now() + MOUNT_WAIT;
        loop {
            if mounted(&m.path) {
                return Ok(m);
            }
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!(
                    "granary mount exited with {status}: {}",
                    m.stderr()
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "mount did not appear within {MOUNT_WAIT:?}: {}",
                    m.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What granary printed on stderr so far.
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("stderr")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends `signal` and waits (bounded) for granary to exit; returns its status.
    pub fn signal_and_wait(&mut self, signal: i32, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the watchdog had to tear the mount down.
    pub fn watchdog_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.child.is_some()
            && self
                .signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
                .is_none()
        {
            lazy_unmount(&self.path);
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if mounted(&self.path) {
            lazy_unmount(&self.path);
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if self.watchdog_fired() && !std::thread::panicking() {
            panic!("watchdog tore down the mount at {}", self.path.display());
        }
    }
}
