//! Mount sessions: mounting, serving on a blocking thread, unmounting, and reading the kernel's mount table.

#[allow(unused_imports)]
use super::*;

/// A mounted filesystem, not yet serving.
pub struct Mounted {
    session: fuser::Session<GranaryFs>,
    stats: Arc<Stats>,
    unmounter: fuser::SessionUnmounter,
    pub mountpoint: PathBuf,
}

/// A handle that unmounts from another thread (e.g. a signal handler task).
pub struct Unmounter(fuser::SessionUnmounter);

/// A mount being served on a blocking thread.
pub struct Served {
    /// Ends when the mount ends, whether unmounted from here or from outside.
    pub serving: tokio::task::JoinHandle<io::Result<()>>,
    pub unmounter: Unmounter,
    /// The mount's tracer, if it records or replays a trace (see [`finish_trace`]).
    pub tracer: Option<Arc<super::trace::Tracer>>,
}

/// Ends a mount's tracing: stops its replay and writes what it recorded to `record` (through
/// a temporary file, so a reader never sees half a trace).
pub fn finish_trace(
    tracer: Option<&Arc<super::trace::Tracer>>,
    record: Option<&Path>,
) -> Result<(), MountError> {
    let Some(t) = tracer else {
        return Ok(());
    };
    t.stop();
    let Some(path) = record.filter(|_| t.recording()) else {
        return Ok(());
    };
    let failed = |source: io::Error| MountError::Trace {
        path: path.display().to_string(),
        source,
    };
    let trace = t.recorded();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, trace.encode()).map_err(failed)?;
    std::fs::rename(&tmp, path).map_err(failed)?;
    tracing::info!(
        "recorded a trace of {} entries ({} chunk bytes) to {}",
        trace.entries.len(),
        trace.chunk_bytes(),
        path.display()
    );
    Ok(())
}

/// Prepares the filesystem for `store`, mounts it at `mountpoint` and serves it on a blocking
/// thread; returns once the kernel is being served.
pub async fn mount_and_serve(
    store: &Store,
    opts: &MountOptions,
    mountpoint: &Path,
) -> Result<Served, MountError> {
    let filesystem = GranaryFs::new(store.clone(), opts, tokio::runtime::Handle::current()).await?;
    let tracer = filesystem.tracer();
    let (mp, o) = (mountpoint.to_path_buf(), opts.clone());
    let task_failed = |e: tokio::task::JoinError| MountError::Mount {
        path: mountpoint.display().to_string(),
        source: io::Error::other(e.to_string()),
    };
    let mounted = tokio::task::spawn_blocking(move || mount(filesystem, &mp, &o))
        .await
        .map_err(task_failed)??;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let serving = tokio::task::spawn_blocking(move || {
        mounted.serve(|u| {
            let _ = tx.send(u);
        })
    });
    let unmounter = rx.await.map_err(|_| MountError::Mount {
        path: mountpoint.display().to_string(),
        source: io::Error::other("mount ended before serving"),
    })?;
    Ok(Served {
        serving,
        unmounter,
        tracer,
    })
}

/// A whole mount session: mounts `store` at `mountpoint`, arranges for a helper to detach it
/// should this process be killed outright (`reaper`, if given the binary to run), calls
/// `on_mounted` once the kernel is served, and serves until unmounted from outside (a normal
/// end) or until `shutdown` completes, which unmounts (detaching if files are still open).
pub async fn mount_session(
    store: &Store,
    opts: &MountOptions,
    mountpoint: &Path,
    reaper: Option<&Path>,
    on_mounted: impl FnOnce(),
    shutdown: impl Future<Output = ()>,
) -> Result<(), MountError> {
    let failed = |what: &str, e: String| MountError::Mount {
        path: mountpoint.display().to_string(),
        source: io::Error::other(format!("{what}: {e}")),
    };
    // Should this process be killed outright, a helper detaches the mount (best effort). It is
    // started while the store is opened and armed once the mount is made: starting it after
    // took the CPU from the mount's first requests.
    let warn = |e: io::Error| tracing::warn!("a SIGKILL would leave the mount dead: {e}");
    let mut reaper =
        reaper.and_then(|exe| super::reaper::start(exe, mountpoint).map_err(warn).ok());
    let Served {
        mut serving,
        mut unmounter,
        tracer,
    } = mount_and_serve(store, opts, mountpoint).await?;
    let finish = || finish_trace(tracer.as_ref(), opts.record_trace.as_deref());
    // (A helper left unarmed finds no mount ID when the pipe closes, and does nothing.)
    if let Some(Err(e)) = reaper.as_mut().map(|r| r.arm(mountpoint)) {
        warn(e);
    }
    on_mounted();
    tokio::select! {
        res = &mut serving => {
            // Unmounted from outside (umount, fusermount3 -u): a normal end.
            res.map_err(|e| failed("mount task", e.to_string()))?
                .map_err(|e| failed("serving the mount", e.to_string()))?;
            return finish();
        }
        _ = shutdown => {}
    }
    let mp = mountpoint.to_path_buf();
    tokio::task::spawn_blocking(move || match unmounter.unmount() {
        // Files still open keep the mount busy: detach it now; it ends when we exit.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => detach(&mp),
        other => other,
    })
    .await
    .map_err(|e| failed("unmount task", e.to_string()))?
    .map_err(|e| failed("unmounting", e.to_string()))?;
    // Open files can keep a lazily detached mount's session alive; the caller's exit closes
    // the FUSE device, which ends it.
    if let Ok(res) = tokio::time::timeout(Duration::from_secs(5), serving).await {
        res.map_err(|e| failed("mount task", e.to_string()))?
            .map_err(|e| failed("serving the mount", e.to_string()))?;
    }
    finish()
}

impl Unmounter {
    pub fn unmount(&mut self) -> io::Result<()> {
        self.0.unmount()
    }
}

/// Mounts `fs` at `mountpoint` (read-only, nosuid, nodev). Blocks for the kernel handshake.
pub fn mount(fs: GranaryFs, mountpoint: &Path, opts: &MountOptions) -> Result<Mounted, MountError> {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("granary".into()),
        MountOption::Subtype("granary".into()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let stats = fs.inner.stats.clone();
    let mut session =
        fuser::Session::new(fs, mountpoint, &config).map_err(|source| MountError::Mount {
            path: mountpoint.display().to_string(),
            source,
        })?;
    let unmounter = session.unmount_callable();
    // The session's own channel; with more threads, the others' clones are made in `run`
    // and keep blocking (one poller is enough for a sequential walker).
    stats.spin.attach(std::os::fd::AsFd::as_fd(&session));
    Ok(Mounted {
        session,
        stats,
        unmounter,
        mountpoint: mountpoint.to_path_buf(),
    })
}

impl Mounted {
    /// Serves requests on the calling thread until unmounted. Returns the unmounter first
    /// through `on_ready`, so the caller can stop the mount from elsewhere.
    pub fn serve(self, on_ready: impl FnOnce(Unmounter)) -> io::Result<()> {
        on_ready(Unmounter(self.unmounter));
        let mp = self.mountpoint.clone();
        // Large kernel read-ahead makes buffered reads arrive as large requests. The bdi is
        // only known once mounted; writing it needs root and is best effort.
        std::thread::spawn(move || {
            if let Some(dev) = mount_device(&mp) {
                let p = format!("/sys/class/bdi/{dev}/read_ahead_kb");
                if let Err(e) = std::fs::write(&p, "1024") {
                    tracing::debug!("cannot raise read-ahead at {p}: {e}");
                }
            }
        });
        // A watcher only where polling can start (not with `--no-poll`): no thread to start
        // on the way to the first request otherwise.
        let watcher = self.stats.spin.attached().then(|| {
            let stats = self.stats.clone();
            std::thread::Builder::new()
                .name("granary-poll".into())
                .spawn(move || stats.spin.watch())
        });
        let res = self.session.run();
        self.stats.spin.stop();
        if let Some(Ok(w)) = watcher {
            let _ = w.join();
        }
        res
    }
}

/// Decodes the octal escapes `/proc/self/mountinfo` uses in paths.
pub(super) fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Field `idx` of the topmost mountinfo line whose mount point is `path`.
pub(super) fn mountinfo_field(path: &Path, idx: usize) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && unescape_mountinfo(f[4]) == path).then(|| f[idx].to_string())
    })
}

/// The `major:minor` of the mount at `path`, if `path` is a mount point.
pub fn mount_device(path: &Path) -> Option<String> {
    mountinfo_field(path, 2)
}

/// The kernel's ID of the topmost mount at `path` (unique while it is mounted).
pub fn mount_id(path: &Path) -> Option<u64> {
    mountinfo_field(path, 0)?.parse().ok()
}

/// Whether `path` (absolute, canonical) is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    mount_device(path).is_some()
}

/// Lazily detaches the mount at `path` (`umount -l`); unprivileged, through `fusermount3 -uz`.
pub fn detach(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads nothing else.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        return Err(err);
    }
    let st = std::process::Command::new("fusermount3")
        .arg("-uz")
        .arg(path)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("fusermount3 -uz failed: {st}")))
    }
}
