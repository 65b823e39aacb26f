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
//! Once it can take `users.lock` exclusively while no one is joining, it stays warm for the
//! keep-warm time (so the next job finds its caches full) and then exits, removing the whole
//! directory under `state.lock`; a sandbox that waited on that lock finds its file unlinked
//! and starts over. If the server is killed outright, a helper (`granary __sandbox-reap`,
//! started beside it, holding the other end of a pipe only the server writes to) removes the
//! directory when the pipe closes.

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
/// How often a warm server looks whether a sandbox joined.
const IDLE_POLL: Duration = Duration::from_millis(100);
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
    record: Option<&Path>,
) -> PathBuf {
    let mut h = blake3::Hasher::new();
    h.update(store_url.as_bytes());
    h.update(b"\0");
    h.update(digest.as_bytes());
    if let Some(t) = times {
        h.update(t.digest.as_bytes());
    }
    // A recording server is nobody else's: what it records is its own sandbox's reads.
    if let Some(r) = record {
        h.update(b"\0record\0");
        h.update(r.as_os_str().as_encoded_bytes());
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

/// Whether `file` is still the file at `path` (not unlinked by an exiting server).
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Takes the state lock of `dir`, creating the directory if needed; retried while an exiting
/// server removes the directory under us.
fn lock_state(dir: &Path) -> Result<File, ShareError> {
    let start = Instant::now();
    let path = dir.join("state.lock");
    loop {
        let tree = dir.join("tree");
        let state = std::fs::create_dir_all(&tree)
            .map_err(io_at(&tree))
            .and_then(|()| open_lock(&path));
        match state {
            Ok(state) => {
                lock(
                    &state,
                    libc::LOCK_EX,
                    JOIN_WAIT,
                    "the shared mount's state lock",
                )?;
                if still_at(&state, &path) && tree.is_dir() {
                    return Ok(state);
                }
            }
            // Removed between creating and opening: go round.
            Err(ShareError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if start.elapsed() > JOIN_WAIT {
            return Err(ShareError::Timeout(
                JOIN_WAIT,
                "the shared mount's directory".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How a shared server is started.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long the server stays after its last sandbox exits (0: it exits with it).
    pub keep_warm: Duration,
    /// The server's file cache (see `granary mount --file-cache`), if any.
    pub file_cache: Option<PathBuf>,
    /// The trace of the tree's root the server replays, if any.
    pub trace: Option<crate::model::trace::TraceRef>,
    /// Where the server writes the trace it records (when it exits), if it records one.
    pub record: Option<PathBuf>,
}

/// Joins the shared mount of `digest`, starting its server if none runs. Returns the
/// server's pid, the mount's path inside the server's namespace, and the lease.
pub fn join(
    exe: &Path,
    runtime: &Path,
    store_url: &str,
    digest: &B3Digest,
    times: Option<TimesRef>,
    settings: ServerSettings,
) -> Result<(u32, PathBuf, Lease), ShareError> {
    let dir = share_dir(
        runtime,
        store_url,
        digest,
        times.as_ref(),
        settings.record.as_deref(),
    );
    let tree = dir.join("tree");
    let state = lock_state(&dir)?;
    let pid = match live_server(&dir) {
        Some(pid) => pid,
        None => start_server(exe, &dir, store_url, digest, times, settings)?,
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
    settings: ServerSettings,
) -> Result<u32, ShareError> {
    let log_path = dir.join("server.log");
    let log = File::create(&log_path).map_err(io_at(&log_path))?;
    // The reaper's pipe: the server holds the write end (as fd 3) and never writes; the
    // reaper reads until the kernel closes it, i.e. until the server is gone.
    let (pipe_r, pipe_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| ShareError::Start(format!("pipe: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--store")
        .arg(store_url)
        .arg(super::SERVE_SUBCOMMAND)
        .arg("--digest")
        .arg(digest.to_hex())
        .arg("--dir")
        .arg(dir)
        .args(times.map(|t| format!("--times={}:{}", t.digest.to_hex(), t.size)))
        .arg(format!("--keep-warm-ms={}", settings.keep_warm.as_millis()))
        .args(
            settings
                .trace
                .as_ref()
                .map(|t| format!("--trace={}:{}:{}", t.name, t.digest.to_hex(), t.size)),
        )
        .args(
            settings
                .record
                .iter()
                .flat_map(|p| [std::ffi::OsStr::new("--record-trace"), p.as_os_str()]),
        )
        .args(
            settings
                .file_cache
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--file-cache"), d.as_os_str()]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if std::env::var_os("RUST_LOG").is_none() {
        // fuser logs every unimplemented ioctl the overlay tries as a warning.
        cmd.env("RUST_LOG", "warn,fuser=error");
    }
    let root = c"/";
    let w_fd = std::os::fd::AsRawFd::as_raw_fd(&pipe_w);
    // SAFETY: only async-signal-safe syscalls between fork and exec. The server gets its own
    // session (a terminal's Ctrl-C is for the sandbox, not for it) and a private mount
    // namespace, so its FUSE mount is never on the host; fd 3 is the reaper's pipe (dup2
    // clears close-on-exec on the copy).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(w_fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
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
    drop(pipe_w);
    // The reaper runs on the host's side (not in the server's namespace), in its own session.
    let mut reap = Command::new(exe);
    reap.arg(REAP_SUBCOMMAND)
        .arg(dir)
        .current_dir("/")
        .stdin(Stdio::from(File::from(pipe_r)))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        reap.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = reap.spawn() {
        tracing::warn!("starting the shared server's reaper: {e}");
    }
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
/// reports ready, and serves until no sandbox has held the lease for `keep_warm`, or
/// SIGTERM/SIGINT; then removes `dir`.
pub async fn serve(
    store: &Store,
    digest: &str,
    times: Option<&str>,
    dir: &Path,
    settings: ServerSettings,
) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let ServerSettings {
        keep_warm,
        file_cache,
        trace,
        record,
    } = settings;
    // fd 3 is the reaper's pipe: kept open for our whole life, passed to no child.
    // SAFETY: fcntl on a descriptor number; harmless if it is not open.
    unsafe { libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC) };
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
        file_cache: file_cache.map(fs::FileCacheOptions::at),
        replay: trace,
        record_trace: record.clone(),
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
        tracer,
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
    let idle = tokio::task::spawn_blocking(move || {
        wait_idle_for(&users, &state, keep_warm).map(|()| (users, state))
    });
    let held = tokio::select! {
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
    let t = tree.clone();
    let _ = tokio::task::spawn_blocking(move || match unmounter.unmount() {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => fs::detach(&t),
        other => other,
    })
    .await;
    fs::finish_trace(tracer.as_ref(), record.as_deref())?;
    // Idle (not signalled): nobody uses the directory and nobody is joining; remove it.
    if let Some((_users, state)) = held {
        remove_share(dir, &state);
    }
    // Exiting closes the FUSE device, which ends the session whatever still holds it.
    Ok(ExitCode::SUCCESS)
}

/// Removes a share's directory. The caller holds its state lock (so nobody is joining) and
/// knows no sandbox uses it; a sandbox that waits on the lock finds the file unlinked and
/// starts over in a new directory.
fn remove_share(dir: &Path, _state: &File) {
    for f in ["server.pid", "server.log", "users.lock"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir(dir.join("tree"));
    let _ = std::fs::remove_file(dir.join("state.lock"));
    let _ = std::fs::remove_dir(dir);
}

/// The hidden subcommand that runs [`reap_main`].
pub const REAP_SUBCOMMAND: &str = "__sandbox-reap";

/// `granary __sandbox-reap DIR`, started beside a shared server with stdin the read end of a
/// pipe only the server holds open: waits for the server to be gone, then for its sandboxes
/// to leave, and removes the directory if no new server has taken it over. Single-threaded.
pub fn reap_main(args: &[std::ffi::OsString]) -> i32 {
    let Some(dir) = args.first().map(PathBuf::from) else {
        return 2;
    };
    fs::reaper::wait_for_eof();
    let state_path = dir.join("state.lock");
    // Gone already: the server removed it on its way out.
    let Ok(state) = std::fs::OpenOptions::new().read(true).open(&state_path) else {
        return 0;
    };
    let Ok(users) = std::fs::OpenOptions::new()
        .read(true)
        .open(dir.join("users.lock"))
    else {
        return 0;
    };
    // Sandboxes still inside a dead server's tree leave (their reads fail) before we go on.
    // The users lock is let go between tries, as the server does: a sandbox that was joining
    // when the server died holds the state lock while it waits for its shared users lock,
    // and holding the users lock while waiting for the state lock deadlocked the two until
    // the join timed out (60 s).
    if wait_idle(&users, &state).is_err() {
        return 1;
    }
    if still_at(&state, &state_path) && live_server(&dir).is_none() {
        remove_share(&dir, &state);
    }
    0
}

/// [`wait_idle`], then the keep-warm time with nobody joining; returns holding both locks.
fn wait_idle_for(users: &File, state: &File, keep_warm: Duration) -> Result<(), ShareError> {
    let try_lock = |f: &File| {
        // SAFETY: flock on a descriptor we own, non-blocking.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    };
    let unlock = |f: &File| {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    };
    'idle: loop {
        wait_idle(users, state)?;
        if keep_warm.is_zero() {
            return Ok(());
        }
        unlock(state);
        unlock(users);
        let since = Instant::now();
        while since.elapsed() < keep_warm {
            std::thread::sleep(IDLE_POLL.min(keep_warm - since.elapsed()));
            // A sandbox holds the users lock: back to waiting for it to leave.
            if !try_lock(users) {
                continue 'idle;
            }
            unlock(users);
        }
        if try_lock(state) {
            if try_lock(users) {
                return Ok(());
            }
            unlock(state);
        }
    }
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
