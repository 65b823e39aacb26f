//! The disk cache itself: a bounded directory of verified entries, least recently used evicted first, shared safely by several processes.

#[allow(unused_imports)]
use super::*;

/// A hit refreshes an entry's mtime only if it is older than this (saves a syscall per hit).
pub(super) const TOUCH_AFTER: Duration = Duration::from_secs(60);
/// A sweep brings the cache down to this fraction of its maximum.
pub(super) const LOW_WATER: f64 = 0.8;
/// A process rescans the directory after writing `max / RESCAN_FRACTION` bytes.
pub(super) const RESCAN_FRACTION: u64 = 10;
/// How often a process adds its counters to stats.json.
pub(super) const STATS_EVERY: Duration = Duration::from_secs(2);
/// Temp files older than this are leftovers of a crashed writer.
pub(super) const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Counters kept in stats.json (summed over every process that used the cache).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub chunk_hits: u64,
    pub chunk_misses: u64,
    pub meta_hits: u64,
    pub meta_misses: u64,
    /// Entries found corrupt, dropped and fetched again.
    pub corrupt: u64,
    pub evicted: u64,
    /// Bytes fetched from the store into the cache.
    pub fetched_bytes: u64,
}

impl Stats {
    pub(super) fn add(&mut self, o: &Stats) {
        self.chunk_hits += o.chunk_hits;
        self.chunk_misses += o.chunk_misses;
        self.meta_hits += o.meta_hits;
        self.meta_misses += o.meta_misses;
        self.corrupt += o.corrupt;
        self.evicted += o.evicted;
        self.fetched_bytes += o.fetched_bytes;
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) chunk_hits: AtomicU64,
    pub(super) chunk_misses: AtomicU64,
    pub(super) meta_hits: AtomicU64,
    pub(super) meta_misses: AtomicU64,
    pub(super) corrupt: AtomicU64,
    pub(super) evicted: AtomicU64,
    pub(super) fetched_bytes: AtomicU64,
}

impl Counters {
    /// Takes the counts so far, leaving zeros.
    pub(super) fn take(&self) -> Stats {
        let t = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        Stats {
            chunk_hits: t(&self.chunk_hits),
            chunk_misses: t(&self.chunk_misses),
            meta_hits: t(&self.meta_hits),
            meta_misses: t(&self.meta_misses),
            corrupt: t(&self.corrupt),
            evicted: t(&self.evicted),
            fetched_bytes: t(&self.fetched_bytes),
        }
    }
}

pub(super) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The cache directory, shared by every store wrapped in it.
pub struct DiskCache {
    pub(super) dir: PathBuf,
    pub(super) max: u64,
    /// This process's view of the bytes of all entries (exact after each sweep).
    pub(super) size: AtomicU64,
    /// Bytes this process wrote since it last rescanned the directory.
    pub(super) written: AtomicU64,
    pub(super) counters: Counters,
    pub(super) sweeping: AtomicBool,
    /// Held from a write's room check to its size update (and by every sweep): two writers
    /// that both found room for one entry would otherwise both write, and a sweep that
    /// counted the directory before a write landed would forget it.
    pub(super) writing: std::sync::Mutex<()>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("max", &self.max)
            .finish()
    }
}

pub(super) fn io_err(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let ctx = ctx.into();
    move |e| StoreError::io(ctx, e)
}

/// An exclusive `flock` on a file in the cache dir, released on drop.
pub(super) struct Lock(std::fs::File);

impl Lock {
    pub(super) fn take(path: &Path) -> Result<Lock> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // SAFETY: flock only uses the descriptor, which `f` keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(StoreError::io(
                format!("locking {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// What a cache directory holds, for `granary cache stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheReport {
    pub entries: u64,
    pub chunks: u64,
    pub directories: u64,
    pub blob_layouts: u64,
    pub bytes: u64,
    pub stats: Stats,
}

/// One entry as a sweep sees it.
pub(super) struct Entry {
    pub(super) path: PathBuf,
    pub(super) bytes: u64,
    pub(super) used: SystemTime,
}

/// Entries of the cache directory (all kinds).
pub(super) fn walk_entries(dir: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let top = dir.join(kind.dir());
        let Ok(fans) = std::fs::read_dir(&top) else {
            continue;
        };
        for fan in fans.flatten() {
            let Ok(files) = std::fs::read_dir(fan.path()) else {
                continue;
            };
            for f in files.flatten() {
                // An entry evicted by another process meanwhile is skipped.
                let Ok(m) = f.metadata() else { continue };
                if !m.is_file() {
                    continue;
                }
                out.push(Entry {
                    path: f.path(),
                    bytes: m.len(),
                    used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
    }
    out
}

impl DiskCache {
    /// Opens (creating) a cache directory bounded by `max` bytes.
    pub fn open(dir: &Path, max: u64) -> Result<Arc<DiskCache>> {
        for sub in ["chunks", "dirs", "blobs", "stores", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(format!(
                "cache dir {}: cannot create {sub}/",
                dir.display()
            )))?;
        }
        let size = walk_entries(dir).iter().map(|e| e.bytes).sum();
        let cache = Arc::new(DiskCache {
            dir: dir.to_path_buf(),
            max,
            size: AtomicU64::new(size),
            written: AtomicU64::new(0),
            counters: Counters::default(),
            sweeping: AtomicBool::new(false),
            writing: std::sync::Mutex::new(()),
        });
        cache.sweep_temp();
        if size > max {
            cache.sweep(0)?;
        }
        // Counters reach stats.json every few seconds while the process lives, and on drop.
        let weak = Arc::downgrade(&cache);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(STATS_EVERY).await;
                    let Some(c) = weak.upgrade() else { return };
                    let _ = tokio::task::spawn_blocking(move || c.flush_stats()).await;
                }
            });
        }
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub(super) fn entry_path(&self, kind: Kind, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join(kind.dir()).join(&hex[..2]).join(hex)
    }

    pub(super) fn store_dir(&self, url: &str) -> PathBuf {
        let key = B3Digest::of(url.as_bytes()).to_hex();
        self.dir.join("stores").join(&key[..32])
    }

    /// Reads an entry, refreshing its LRU time; `None` if absent.
    pub(super) fn read_entry(&self, path: &Path) -> Option<Vec<u8>> {
        let mut f = std::fs::File::open(path).ok()?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).ok()?;
        if let Ok(m) = f.metadata() {
            let old = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > TOUCH_AFTER);
            if old {
                let _ = f.set_modified(SystemTime::now());
            }
        }
        Some(buf)
    }

    /// Drops a corrupt entry (it will be fetched again).
    pub(super) fn drop_corrupt(&self, path: &Path, reason: &str) {
        tracing::warn!(
            "cache entry {} is corrupt ({reason}); refetching",
            path.display()
        );
        bump(&self.counters.corrupt, 1);
        if let Ok(m) = std::fs::metadata(path) {
            self.size.fetch_sub(
                m.len().min(self.size.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        let _ = std::fs::remove_file(path);
    }

    /// Writes an entry atomically (temp file + rename), sweeping first if it would take the
    /// cache past its maximum. Failures only cost a later miss, so they are logged, not returned.
    pub(super) fn write_entry(&self, path: &Path, data: &[u8]) {
        let n = data.len() as u64;
        if n > self.max {
            return;
        }
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        if self.size.load(Ordering::Relaxed) + n > self.max {
            if let Err(e) = self.sweep_locked(n) {
                tracing::warn!("cache sweep failed: {e}");
                return;
            }
            if self.size.load(Ordering::Relaxed) + n > self.max {
                return;
            }
        }
        if let Err(e) = self.write_file(path, data) {
            tracing::warn!("cache write failed: {e}");
            return;
        }
        bump(&self.size, n);
        // Other processes write too: rescan after every tenth of `max` written here, so the
        // writes this process has not seen stay bounded.
        if self.written.fetch_add(n, Ordering::Relaxed) + n > self.max / RESCAN_FRACTION {
            if let Err(e) = self.sweep_locked(0) {
                tracing::warn!("cache sweep failed: {e}");
            }
        }
    }

    pub(super) fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
        let tmpdir = self.dir.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&tmpdir)
            .map_err(io_err(format!("temp file in {}", tmpdir.display())))?;
        tmp.write_all(data)
            .map_err(io_err(format!("writing {}", path.display())))?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        tmp.persist(path)
            .map_err(|e| StoreError::io(format!("renaming into {}", path.display()), e.error))?;
        Ok(())
    }

    /// Deletes least recently used entries until the cache holds at most
    /// `LOW_WATER * max - room` bytes. One process sweeps at a time (lock file).
    pub fn sweep(&self, room: u64) -> Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.sweep_locked(room)
    }

    /// [`Self::sweep`], the caller holding `writing`.
    fn sweep_locked(&self, room: u64) -> Result<()> {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return Ok(()); // another thread of this process is at it
        }
        let res = (|| {
            let _lock = Lock::take(&self.dir.join(".sweep.lock"))?;
            let mut entries = walk_entries(&self.dir);
            let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
            let target = ((self.max as f64 * LOW_WATER) as u64).min(self.max.saturating_sub(room));
            if total > target {
                entries.sort_by_key(|e| e.used);
                let mut evicted = 0;
                for e in entries {
                    if total <= target {
                        break;
                    }
                    match std::fs::remove_file(&e.path) {
                        Ok(()) => {
                            total -= e.bytes;
                            evicted += 1;
                        }
                        // Evicted by someone else meanwhile: gone all the same.
                        Err(err) if err.kind() == ErrorKind::NotFound => total -= e.bytes,
                        Err(err) => {
                            return Err(StoreError::io(
                                format!("evicting {}", e.path.display()),
                                err,
                            ))
                        }
                    }
                }
                bump(&self.counters.evicted, evicted);
            }
            self.size.store(total, Ordering::Relaxed);
            self.written.store(0, Ordering::Relaxed);
            Ok(())
        })();
        self.sweeping.store(false, Ordering::Release);
        res
    }

    pub(super) fn sweep_temp(&self) {
        let Ok(rd) = std::fs::read_dir(self.dir.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP);
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Adds this process's counters since the last call to stats.json.
    pub fn flush_stats(&self) -> Result<()> {
        let delta = self.counters.take();
        if delta == Stats::default() {
            return Ok(());
        }
        let _lock = Lock::take(&self.dir.join(".stats.lock"))?;
        let mut s = read_stats(&self.dir);
        s.add(&delta);
        let text = serde_json::to_string_pretty(&s).unwrap_or_default();
        self.write_file(&self.dir.join("stats.json"), text.as_bytes())
    }

    /// A verified chunk from the cache; a corrupt entry is dropped and reported as a miss.
    pub(super) fn get_chunk(&self, digest: &B3Digest) -> Option<Bytes> {
        let path = self.entry_path(Kind::Chunk, digest);
        let raw = self.read_entry(&path)?;
        let actual = B3Digest::of(&raw);
        if actual != *digest {
            self.drop_corrupt(&path, &format!("content hashes to {actual}"));
            return None;
        }
        Some(Bytes::from(raw))
    }

    pub(super) fn get_dir(&self, digest: &B3Digest) -> Option<Directory> {
        let path = self.entry_path(Kind::Directory, digest);
        let raw = self.read_entry(&path)?;
        let actual = B3Digest::of(&raw);
        if actual != *digest {
            self.drop_corrupt(&path, &format!("content hashes to {actual}"));
            return None;
        }
        match Directory::decode_valid(&raw) {
            Ok(d) => Some(d),
            Err(e) => {
                self.drop_corrupt(&path, &e.to_string());
                None
            }
        }
    }

    /// A blob's layout. It cannot be hashed to its name, so it is checked structurally (and
    /// every chunk it lists is verified when read, its size against the layout).
    pub(super) fn get_meta(&self, blob: &B3Digest) -> Option<BlobMeta> {
        let path = self.entry_path(Kind::BlobIndex, blob);
        let raw = self.read_entry(&path)?;
        match BlobIndex::decode_valid(&raw).and_then(|i| {
            BlobMeta::from_index(&i)
                .map_err(|e| crate::model::castore::ModelError::BlobIndex(e.to_string()))
        }) {
            Ok(m) if !m.chunks.is_empty() => Some(m),
            Ok(_) => {
                self.drop_corrupt(&path, "no chunks");
                None
            }
            Err(e) => {
                self.drop_corrupt(&path, &e.to_string());
                None
            }
        }
    }

    pub(super) fn has_entry(&self, kind: Kind, digest: &B3Digest) -> bool {
        self.entry_path(kind, digest).exists()
    }

    /// What the directory holds and the counters so far (this process's included).
    pub fn report(&self) -> Result<CacheReport> {
        let _ = self.flush_stats();
        Ok(report(&self.dir))
    }

    /// Deletes every entry (and the counters).
    pub fn clear(&self) -> Result<u64> {
        let _lock = Lock::take(&self.dir.join(".sweep.lock"))?;
        let mut n = 0;
        for e in walk_entries(&self.dir) {
            if std::fs::remove_file(&e.path).is_ok() {
                n += 1;
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join("stores"));
        let _ = std::fs::remove_file(self.dir.join("stats.json"));
        let _ = self.counters.take();
        self.size.store(0, Ordering::Relaxed);
        Ok(n)
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        if let Err(e) = self.flush_stats() {
            tracing::warn!("cache stats: {e}");
        }
    }
}

pub(super) fn read_stats(dir: &Path) -> Stats {
    std::fs::read(dir.join("stats.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Counts a cache directory's entries without opening it for use.
pub fn report(dir: &Path) -> CacheReport {
    let mut r = CacheReport {
        stats: read_stats(dir),
        ..CacheReport::default()
    };
    for kind in Kind::ALL {
        let entries = walk_entries_of(dir, kind);
        let n = entries.len() as u64;
        r.bytes += entries.iter().map(|e| e.bytes).sum::<u64>();
        r.entries += n;
        match kind {
            Kind::Chunk => r.chunks = n,
            Kind::Directory => r.directories = n,
            Kind::BlobIndex => r.blob_layouts = n,
        }
    }
    r
}

pub(super) fn walk_entries_of(dir: &Path, kind: Kind) -> Vec<Entry> {
    let mut out = Vec::new();
    let top = dir.join(kind.dir());
    let Ok(fans) = std::fs::read_dir(&top) else {
        return out;
    };
    for fan in fans.flatten() {
        let Ok(files) = std::fs::read_dir(fan.path()) else {
            continue;
        };
        for f in files.flatten() {
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    out.push(Entry {
                        path: f.path(),
                        bytes: m.len(),
                        used: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
    }
    out
}
