//! One FUSE mount per (store, tree), shared by every sandbox of that tree and reference
//! counted with file locks, in `RUNTIME/sandbox/KEY/`:
//!
//! - `state.lock`: held (exclusive) while a sandbox joins, or while the server decides to
//!   quit, so the two never interleave.
//! - `users.lock`: every sandbox holds it shared for its whole life. The kernel drops a lock
//!   when its holder dies, so a SIGKILLed sandbox is counted out by itself.
//! - `server.pid`, `server.log`, and `tree/`, the mount point.
//!
//! The server (`granary __sandbox-serve`) is started in its own private mount namespace, so
//! its FUSE mount never appears on the host and dies with it; sandboxes clone it from there.
//! It exits once it can take `users.lock` exclusively while no one is joining.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::model::castore::{B3Digest, Node};
use crate::model::times::{TimesPos, TimesRef};
use crate::store::Store;
use crate::views::fs::{self, MountOptions, Top};

/// How long to wait for another sandbox's join, or for a server to come up.
const JOIN_WAIT: Duration = Duration::from_secs(60);
/// The line the server prints once its mount is served.
const READY: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("starting the shared FUSE server: {0}")]
    Start(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ShareError + '_ {
    move |source| ShareError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The state directory of the shared mount of `digest` (with the times of `times`) from
/// `store_url`.
pub fn share_dir(
    runtime: &Path,
    store_url: &str,
    digest: &B3Digest,
    times: Option<&TimesRef>,
) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(store_url.as_bytes());
    h.update(b"\0");
    h.update(digest.as_bytes());
    if let Some(t) = times {
        h.update(t.digest.as_bytes());
    }
    let key = h.finalize().to_hex();
    runtime.join("sandbox").join(&key.as_str()[..24])
}

/// Takes a flock (`op` is LOCK_SH or LOCK_EX), polling so the wait is bounded.
fn lock(file: &File, op: libc::c_int, limit: Duration, what: &str) -> Result<(), ShareError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(ShareError::Io {
                path: what.to_string(),
                source: e,
            });
        }
        if start.elapsed() > limit {
            return Err(ShareError::Timeout(limit, what.to_string()));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn open_lock(path: &Path) -> Result<File, ShareError> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_at(path))
}

/// A sandbox's hold on the shared mount; dropping it (or dying) lets the server go.
pub struct Lease {
    _users: File,
}

/// The running server of `dir`, if its process is alive and has the tree mounted.
fn live_server(dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(dir.join("server.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    let tree = dir.join("tree");
    let want = tree.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains(" - fuse"))
        .then_some(pid)
}

/// Joins the shared mount of `digest`, starting its server if none runs. Returns the
/// server's pid, the mount's path inside the server's namespace, and the lease.
pub fn join(
    exe: &Path,
    runtime: &Path,
    store_url: &str,
    digest: &B3Digest,
    times: Option<TimesRef>,
) -> Result<(u32, PathBuf, Lease), ShareError> {
    let dir = share_dir(runtime, store_url, digest, times.as_ref());
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).map_err(io_at(&tree))?;
    let state = open_lock(&dir.join("state.lock"))?;
    lock(
        &state,
        libc::LOCK_EX,
        JOIN_WAIT,
        "the shared mount's state lock",
    )?;
    let pid = match live_server(&dir) {
        Some(pid) => pid,
        None => start_server(exe, &dir, store_url, digest, times)?,
    };
    let users = open_lock(&dir.join("users.lock"))?;
    lock(
        &users,
        libc::LOCK_SH,
        JOIN_WAIT,
        "the shared mount's users lock",
    )?;
    drop(state);
    Ok((pid, tree, Lease { _users: users }))
}

fn start_server(
    exe: &Path,
    dir: &Path,
    store_url: &str,
    digest: &B3Digest,
    times: Option<TimesRef>,
) -> Result<u32, ShareError> {
    let log_path = dir.join("server.log");
    let log = File::create(&log_path).map_err(io_at(&log_path))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store_url)
        .arg(super::SERVE_SUBCOMMAND)
        .arg("--digest")
        .arg(digest.to_hex())
        .arg("--dir")
        .arg(dir)
        .args(times.map(|t| format!("--times={}:{}", t.digest.to_hex(), t.size)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if std::env::var_os("RUST_LOG").is_none() {
        // fuser logs every unimplemented ioctl the overlay tries as a warning.
        cmd.env("RUST_LOG", "warn,fuser=error");
    }
    let root = c"/";
    // SAFETY: only async-signal-safe syscalls between fork and exec. The server gets its own
    // session (a terminal's Ctrl-C is for the sandbox, not for it) and a private mount
    // namespace, so its FUSE mount is never on the host.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (needs CAP_SYS_ADMIN; run as root)"
        } else {
            ""
        };
        ShareError::Start(format!("{e}{hint}"))
    })?;
    let Some(out) = child.stdout.take() else {
        return Err(ShareError::Start("no pipe to the server".into()));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(JOIN_WAIT);
    if ready.as_deref().map(str::trim) == Ok(READY) {
        return Ok(child.id());
    }
    let _ = child.kill();
    let _ = child.wait();
    let why = std::fs::read_to_string(&log_path).unwrap_or_default();
    let why = why.trim().lines().last().unwrap_or("it exited").to_string();
    Err(match ready {
        Err(_) => ShareError::Timeout(JOIN_WAIT, "the shared FUSE server".into()),
        Ok(_) => ShareError::Start(why),
    })
}

/// The server: mounts `digest` at `dir/tree` (in the private namespace it was started in),
/// reports ready, and serves until no sandbox holds the lease, or SIGTERM/SIGINT.
pub async fn serve(
    store: &Store,
    digest: &str,
    times: Option<&str>,
    dir: &Path,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let digest: B3Digest = digest.parse().context("--digest")?;
    let times = match times {
        None => None,
        Some(t) => {
            let (d, size) = t.split_once(':').context("--times: want DIGEST:SIZE")?;
            Some(TimesRef {
                digest: d.parse().context("--times")?,
                size: size.parse().context("--times")?,
            })
        }
    };
    let dirnode = store
        .dirs
        .get(&digest)
        .await?
        .with_context(|| format!("no directory {digest} in the store"))?;
    let node = Node::Directory {
        digest,
        size: dirnode.size()?,
    };
    let at = times.filter(|t| t.fits(&node)).map(|t| (t, TimesPos::TOP));
    let opts = MountOptions {
        top: Top::Tree(node, at),
        // Sandboxes may switch users; root's mount must not refuse them.
        allow_other: true,
        ..MountOptions::default()
    };
    let tree = dir.join("tree");
    // Handlers before mounting, so a signal during start-up still ends in an unmount.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let fs::Served {
        mut serving,
        mut unmounter,
    } = fs::mount_and_serve(store, &opts, &tree).await?;
    let pid_path = dir.join("server.pid");
    let tmp = dir.join(format!("server.pid.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, &pid_path)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "{READY}")?;
        out.flush()?;
    }
    // Nobody reads stdout any more: point it at /dev/null rather than a closed pipe.
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        // SAFETY: dup2 onto stdout of fds we hold.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    let users = open_lock(&dir.join("users.lock"))?;
    let state = open_lock(&dir.join("state.lock"))?;
    let idle = tokio::task::spawn_blocking(move || wait_idle(&users, &state).map(|()| state));
    let _state = tokio::select! {
        res = &mut serving => {
            res.context("mount task")?.context("serving the mount")?;
            None
        }
        held = idle => Some(held.context("idle wait")??),
        _ = int.recv() => None,
        _ = term.recv() => None,
    };
    // Only remove the pid file if it is still ours.
    if std::fs::read_to_string(&pid_path).is_ok_and(|p| p.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(&pid_path);
    }
    let _ = tokio::task::spawn_blocking(move || match unmounter.unmount() {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => fs::detach(&tree),
        other => other,
    })
    .await;
    // Exiting closes the FUSE device, which ends the session whatever still holds it.
    Ok(ExitCode::SUCCESS)
}

/// Blocks until no sandbox holds `users` and none is joining; returns holding `state`.
fn wait_idle(users: &File, state: &File) -> Result<(), ShareError> {
    loop {
        // SAFETY: flock on fds we own; blocking here is the point (this is its own thread).
        if unsafe { libc::flock(users.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(ShareError::Io {
                path: "users.lock".into(),
                source: e,
            });
        }
        // SAFETY: as above, non-blocking.
        if unsafe { libc::flock(state.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        // Someone is joining: let them take their shared lock, then look again.
        // SAFETY: as above.
        unsafe { libc::flock(users.as_raw_fd(), libc::LOCK_UN) };
        std::thread::sleep(Duration::from_millis(5));
    }
}
