//! Polling for the kernel's next request while metadata requests come back to back (a walk),
//! instead of sleeping between them.
//!
//! Why: a sequential walker (`find`, `ls -R`, a compiler's header search) sends one request,
//! sleeps until the answer, and sends the next. When the FUSE thread sleeps between requests
//! too, every request wakes a sleeping thread on another CPU; on virtual machines whose idle
//! CPUs halt (halt-polling off, as on Firecracker), each such wake-up is an inter-processor
//! interrupt through the hypervisor. Measured on a 2-CPU VM: a cold walk of pystore (22,484
//! readdirplus) 2.1–2.8 s sleeping, 1.5–1.7 s polling, 1.3 s with walker and mount pinned to
//! one CPU. So while metadata requests arrive at a walk's rate the session's channel is put in
//! non-blocking mode, which makes fuser's read loop retry at once (it retries on EAGAIN), and
//! a watcher puts it back to blocking once no metadata request has come for [`IDLE`]. The
//! cost is one busy CPU for the length of the burst plus at most two [`IDLE`] periods.
//! Polling only starts, and only goes on, while the machine has a CPU to spare (no more tasks
//! runnable than CPUs, the poller and the walker included): next to other busy jobs a poller
//! would take their CPU, so it leaves the requests to wake-ups.
//! A read request, or any request that has to wait for the store (decompressing, loading),
//! stops polling and starts the count of a burst afresh: the store's work needs the CPU a
//! poller would take (a cold `tar` never polls; a warm one, all opens, does).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Polling stops after this long without a metadata request.
pub const IDLE: Duration = Duration::from_millis(2);
/// Polling starts after this many metadata requests ...
const BURST: u32 = 16;
/// ... within this long (a walk on the VM above sends ≈ 40 in 5 ms; `ls -l` of one
/// directory sends two).
const WINDOW: Duration = Duration::from_millis(5);

/// The polling state of one mount's session channel.
pub(crate) struct Spinner {
    enabled: bool,
    /// A duplicate of the session's channel (same open file, so the same non-blocking flag;
    /// its own descriptor, so it can never name another file once the session closes).
    fd: OnceLock<OwnedFd>,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last metadata request.
    last: AtomicU64,
    window_start: AtomicU64,
    window_count: AtomicU32,
    polling: AtomicBool,
    stopped: AtomicBool,
    /// Times polling was switched on.
    pub engaged: AtomicU64,
    /// Bursts left to wake-ups because every CPU was busy.
    pub crowded: AtomicU64,
    /// CPUs this process may run on.
    cpus: usize,
    /// Tasks runnable right now (`/proc/loadavg`; a stand-in in unit tests).
    running: fn() -> Option<usize>,
    watcher: Mutex<Option<Thread>>,
    /// Held while `polling` and the channel's flag change.
    switching: Mutex<()>,
}

impl Default for Spinner {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Spinner {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            fd: OnceLock::new(),
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            window_start: AtomicU64::new(0),
            window_count: AtomicU32::new(0),
            polling: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            engaged: AtomicU64::new(0),
            crowded: AtomicU64::new(0),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            running: running_tasks,
            watcher: Mutex::new(None),
            switching: Mutex::new(()),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn polling(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
    }

    /// Whether it holds the session's channel (else nothing ever polls, and no watcher is
    /// needed).
    pub(crate) fn attached(&self) -> bool {
        self.fd.get().is_some()
    }

    /// Takes a duplicate of the session's channel; without one, nothing ever polls.
    pub(crate) fn attach(&self, channel: BorrowedFd<'_>) {
        if !self.enabled {
            return;
        }
        match channel.try_clone_to_owned() {
            Ok(fd) => {
                let _ = self.fd.set(fd);
            }
            Err(e) => tracing::debug!("not polling the FUSE channel: {e}"),
        }
    }

    /// Called for every metadata request, on the session's thread: a few relaxed atomics,
    /// and a `fcntl` when polling starts.
    pub(crate) fn note(&self) {
        if !self.attached() {
            return;
        }
        let now = self.now();
        self.last.store(now, Ordering::Relaxed);
        if self.polling() {
            return;
        }
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) > WINDOW.as_nanos() as u64 {
            self.window_start.store(now, Ordering::Relaxed);
            self.window_count.store(1, Ordering::Relaxed);
            return;
        }
        if self.window_count.fetch_add(1, Ordering::Relaxed) + 1 >= BURST {
            if self.crowded(0) {
                self.crowded.fetch_add(1, Ordering::Relaxed);
                self.window_count.store(0, Ordering::Relaxed);
                return;
            }
            self.set_polling(true);
        }
    }

    /// A read came, or a request had to wait for the store: stop polling, and count a burst
    /// afresh.
    pub(crate) fn pause(&self) {
        self.window_count.store(0, Ordering::Relaxed);
        if self.polling() {
            self.set_polling(false);
        }
    }

    fn set_polling(&self, on: bool) {
        let Some(fd) = self.fd.get() else { return };
        // The flag and the descriptor change together: were the session's thread switching
        // on while the watcher switched off, the two could end up apart, and a channel left
        // non-blocking with the flag off would spin until the next burst.
        let _switching = super::lock(&self.switching);
        if self.polling() == on {
            return;
        }
        if let Err(e) = set_nonblocking(fd.as_raw_fd(), on) {
            tracing::debug!("cannot switch FUSE channel polling: {e}");
            return;
        }
        self.polling.store(on, Ordering::Relaxed);
        if on {
            self.engaged.fetch_add(1, Ordering::Relaxed);
            self.window_count.store(0, Ordering::Relaxed);
            if let Some(t) = super::lock(&self.watcher).as_ref() {
                t.unpark();
            }
        }
    }

    /// The watcher: sleeps until polling starts, then switches it off once metadata requests
    /// stop. Runs on its own thread until [`Spinner::stop`].
    pub(crate) fn watch(&self) {
        if !self.attached() {
            return;
        }
        *super::lock(&self.watcher) = Some(std::thread::current());
        while !self.stopped.load(Ordering::Relaxed) {
            if !self.polling() {
                std::thread::park();
                continue;
            }
            std::thread::sleep(IDLE);
            let idle = self.now().saturating_sub(self.last.load(Ordering::Relaxed));
            // Here the watcher itself is runnable too, beside the poller and the walker.
            if idle >= IDLE.as_nanos() as u64 || self.crowded(1) {
                self.set_polling(false);
            }
        }
        self.set_polling(false);
    }

    /// Ends the watcher (leaving the channel blocking).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(t) = super::lock(&self.watcher).as_ref() {
            t.unpark();
        }
    }

    /// More tasks runnable right now than CPUs and `ours` (`/proc/loadavg`'s fourth field
    /// counts the caller, and a polling thread). Unreadable: taken as crowded.
    fn crowded(&self, ours: usize) -> bool {
        (self.running)().is_none_or(|n| n > self.cpus + ours)
    }
}

/// `/proc/loadavg`'s count of runnable tasks.
fn running_tasks() -> Option<usize> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    l.split_whitespace().nth(3)?.split('/').next()?.parse().ok()
}

fn set_nonblocking(fd: i32, on: bool) -> std::io::Result<()> {
    // SAFETY: `fd` is an open descriptor owned by the spinner; F_GETFL/F_SETFL touch only
    // its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn nonblocking(fd: &impl AsRawFd) -> bool {
        // SAFETY: a descriptor the test owns.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK != 0 }
    }

    /// A spinner that sees an idle machine, whatever else the tests run.
    fn idle_machine() -> Spinner {
        Spinner {
            running: || Some(1),
            ..Spinner::new(true)
        }
    }

    #[test]
    fn a_burst_switches_polling_on_and_quiet_switches_it_off() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = std::sync::Arc::new(idle_machine());
        s.attach(a.as_fd());
        let w = {
            let s = s.clone();
            std::thread::spawn(move || s.watch())
        };
        // A few requests, however fast, are not a walk.
        for _ in 0..BURST - 2 {
            s.note();
        }
        assert!(!s.polling() && !nonblocking(&a));
        s.note();
        s.note();
        assert!(s.polling(), "a burst of {BURST} requests starts polling");
        assert!(nonblocking(&a), "the shared open file is non-blocking");
        assert_eq!(s.engaged.load(Ordering::Relaxed), 1);
        // Requests keep it on; silence ends it within a few idle periods.
        let t = Instant::now();
        while t.elapsed() < IDLE * 3 {
            s.note();
            std::thread::sleep(Duration::from_micros(200));
        }
        assert!(s.polling());
        let t = Instant::now();
        while s.polling() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!s.polling() && !nonblocking(&a), "quiet switches it off");
        // A request that waits for the store stops polling at once.
        for _ in 0..BURST {
            s.note();
        }
        assert!(s.polling());
        s.pause();
        assert!(!s.polling() && !nonblocking(&a));
        assert_eq!(s.engaged.load(Ordering::Relaxed), 2);
        s.stop();
        w.join().unwrap();
        assert!(!nonblocking(&a));
    }

    #[test]
    fn slow_requests_a_busy_machine_and_a_disabled_spinner_never_poll() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = idle_machine();
        s.attach(a.as_fd());
        for _ in 0..BURST * 2 {
            s.note();
            std::thread::sleep(WINDOW / 4);
        }
        assert!(!s.polling(), "{} requests spread out", BURST * 2);
        // Every CPU busy: a burst is left to wake-ups, and counted as such.
        let busy = Spinner {
            running: || Some(usize::MAX),
            ..Spinner::new(true)
        };
        busy.attach(a.as_fd());
        for _ in 0..BURST * 4 {
            busy.note();
        }
        assert!(!busy.polling() && !nonblocking(&a));
        assert_eq!(busy.crowded.load(Ordering::Relaxed), 4);
        assert_eq!(busy.engaged.load(Ordering::Relaxed), 0);
        let unknown = Spinner {
            running: || None,
            ..Spinner::new(true)
        };
        unknown.attach(a.as_fd());
        for _ in 0..BURST {
            unknown.note();
        }
        assert!(!unknown.polling(), "an unreadable load counts as busy");
        let off = Spinner::new(false);
        off.attach(a.as_fd());
        for _ in 0..BURST * 4 {
            off.note();
        }
        assert!(!off.polling() && !nonblocking(&a));
    }
}
