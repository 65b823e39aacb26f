//! A persistent local disk cache of chunks, directories and blob layouts in front of a remote
//! store (`s3://`, `grpc+...`), so that only the first read of an object crosses the network.
//!
//! ```text
//! DIR/chunks/ab/<hex>          chunk bytes (uncompressed), named by their blake3
//! DIR/dirs/ab/<hex>            directory protobuf (canonical encoding)
//! DIR/blobs/ab/<hex>           blob layout (a BlobIndex, single-chunk blobs included)
//! DIR/stores/<key>/config.toml parameters of each store seen (key: blake3 of its URL)
//! DIR/stores/<key>/roots/<n>   last root records read, used only when the store is unreachable
//! DIR/stats.json               hit/miss counters of every process that used the cache
//! DIR/tmp/                     temp files, renamed into place when complete
//! ```
//!
//! - Bounded by `max` bytes of entries, evicting least recently used first: a hit refreshes the
//!   entry's mtime (at most once a minute), and a sweep deletes the oldest entries until the
//!   cache is back under 80% of `max`. A process sweeps before a write would take its view of
//!   the size past `max`, so one process never exceeds it. Several processes sharing a
//!   directory each keep their own view of the size, reconciled by a rescan after every tenth
//!   of `max` they write: together they can overshoot `max` by about a tenth of it per
//!   process, until the next rescan.
//! - Safe for several processes: entries are written to a temp file and renamed into place;
//!   sweeps are serialised by a lock file; a reader whose entry is evicted under it sees a miss.
//! - Never serves unverified data: a chunk is re-hashed and a directory re-hashed and validated
//!   on every read from disk; a corrupt entry is deleted, counted and fetched again.
//! - Negative results are never cached: an absent object or root is asked of the store again
//!   next time. Root records are kept only as a fallback for when the store is unreachable.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    BlobMeta, BlobService, DirectoryService, Maintenance, ObjectInfo, ObjectKind as Kind, Result,
    RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};

/// A hit refreshes an entry's mtime only if it is older than this (saves a syscall per hit).
const TOUCH_AFTER: Duration = Duration::from_secs(60);
/// A sweep brings the cache down to this fraction of its maximum.
const LOW_WATER: f64 = 0.8;
/// A process rescans the directory after writing `max / RESCAN_FRACTION` bytes.
const RESCAN_FRACTION: u64 = 10;
/// How often a process adds its counters to stats.json.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// Temp files older than this are leftovers of a crashed writer.
const STALE_TEMP: Duration = Duration::from_secs(3600);

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
    fn add(&mut self, o: &Stats) {
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
struct Counters {
    chunk_hits: AtomicU64,
    chunk_misses: AtomicU64,
    meta_hits: AtomicU64,
    meta_misses: AtomicU64,
    corrupt: AtomicU64,
    evicted: AtomicU64,
    fetched_bytes: AtomicU64,
}

impl Counters {
    /// Takes the counts so far, leaving zeros.
    fn take(&self) -> Stats {
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

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// The cache directory, shared by every store wrapped in it.
pub struct DiskCache {
    dir: PathBuf,
    max: u64,
    /// This process's view of the bytes of all entries (exact after each sweep).
    size: AtomicU64,
    /// Bytes this process wrote since it last rescanned the directory.
    written: AtomicU64,
    counters: Counters,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("max", &self.max)
            .finish()
    }
}

fn io_err(ctx: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let ctx = ctx.into();
    move |e| StoreError::io(ctx, e)
}

/// An exclusive `flock` on a file in the cache dir, released on drop.
struct Lock(std::fs::File);

impl Lock {
    fn take(path: &Path) -> Result<Lock> {
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
struct Entry {
    path: PathBuf,
    bytes: u64,
    used: SystemTime,
}

/// Entries of the cache directory (all kinds).
fn walk_entries(dir: &Path) -> Vec<Entry> {
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

    fn entry_path(&self, kind: Kind, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join(kind.dir()).join(&hex[..2]).join(hex)
    }

    fn store_dir(&self, url: &str) -> PathBuf {
        let key = B3Digest::of(url.as_bytes()).to_hex();
        self.dir.join("stores").join(&key[..32])
    }

    /// Reads an entry, refreshing its LRU time; `None` if absent.
    fn read_entry(&self, path: &Path) -> Option<Vec<u8>> {
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
    fn drop_corrupt(&self, path: &Path, reason: &str) {
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
    fn write_entry(&self, path: &Path, data: &[u8]) {
        let n = data.len() as u64;
        if n > self.max {
            return;
        }
        if self.size.load(Ordering::Relaxed) + n > self.max {
            if let Err(e) = self.sweep(n) {
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
            if let Err(e) = self.sweep(0) {
                tracing::warn!("cache sweep failed: {e}");
            }
        }
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
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

    fn sweep_temp(&self) {
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
    fn get_chunk(&self, digest: &B3Digest) -> Option<Bytes> {
        let path = self.entry_path(Kind::Chunk, digest);
        let raw = self.read_entry(&path)?;
        let actual = B3Digest::of(&raw);
        if actual != *digest {
            self.drop_corrupt(&path, &format!("content hashes to {actual}"));
            return None;
        }
        Some(Bytes::from(raw))
    }

    fn get_dir(&self, digest: &B3Digest) -> Option<Directory> {
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
    fn get_meta(&self, blob: &B3Digest) -> Option<BlobMeta> {
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

    fn has_entry(&self, kind: Kind, digest: &B3Digest) -> bool {
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

fn read_stats(dir: &Path) -> Stats {
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

fn walk_entries_of(dir: &Path, kind: Kind) -> Vec<Entry> {
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("cache task failed: {e}")))
}

/// A store's services with the disk cache in front.
pub struct Cached {
    inner: Store,
    cache: Arc<DiskCache>,
    /// Where this store's config and fallback roots live in the cache.
    store_dir: PathBuf,
}

/// Opens the store `url` with the disk cache at `dir` in front of it. If the store is an
/// `s3://` one and cannot be reached, the parameters remembered from an earlier open are used,
/// so everything cached stays readable.
pub async fn open(url: &str, dir: &Path, max: u64) -> Result<Store> {
    let (d, u) = (dir.to_path_buf(), url.to_string());
    let cache = blocking(move || DiskCache::open(&d, max)).await??;
    let store_dir = cache.store_dir(&u);
    let cfg_path = store_dir.join("config.toml");
    let remembered = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| StoreConfig::from_toml(&t).ok());
    let inner = if url.starts_with("s3://") {
        super::s3::S3Store::open_with(url, StoreConfig::default(), remembered).await?
    } else {
        super::open(url).await?
    };
    if remembered != Some(inner.config) {
        std::fs::create_dir_all(&store_dir)
            .map_err(io_err(format!("creating {}", store_dir.display())))?;
        cache.write_file(&cfg_path, inner.config.to_toml().as_bytes())?;
    }
    Ok(wrap(inner, cache, store_dir))
}

/// Puts the cache in front of an opened store.
pub fn wrap(inner: Store, cache: Arc<DiskCache>, store_dir: PathBuf) -> Store {
    let c = Arc::new(Cached {
        inner: inner.clone(),
        cache,
        store_dir,
    });
    Store {
        url: inner.url.clone(),
        config: inner.config,
        blobs: c.clone(),
        dirs: c.clone(),
        roots: c.clone(),
        maintenance: inner
            .maintenance
            .as_ref()
            .map(|_| c as Arc<dyn Maintenance>),
        ingest: inner.ingest.clone(),
    }
}

impl Cached {
    fn root_path(&self, name: &str) -> Result<PathBuf> {
        validate_root_name(name)?;
        Ok(self.store_dir.join("roots").join(name))
    }

    fn remember_root(&self, root: &RootRecord) {
        if let Ok(p) = self.root_path(&root.name) {
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Err(e) = self.cache.write_file(&p, &root.encode()) {
                tracing::warn!("cache: {e}");
            }
        }
    }

    fn forget_root(&self, name: &str) {
        if let Ok(p) = self.root_path(name) {
            let _ = std::fs::remove_file(p);
        }
    }

    fn remembered_root(&self, name: &str) -> Option<RootRecord> {
        let raw = std::fs::read(self.root_path(name).ok()?).ok()?;
        RootRecord::decode(&raw).ok().filter(|r| r.name == name)
    }
}

#[async_trait]
impl BlobService for Cached {
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        let (c, d) = (self.cache.clone(), *blob);
        if let Some(m) = blocking(move || c.get_meta(&d)).await? {
            bump(&self.cache.counters.meta_hits, 1);
            return Ok(Some(m));
        }
        bump(&self.cache.counters.meta_misses, 1);
        let meta = self.inner.blobs.stat(blob).await?;
        if let Some(m) = &meta {
            if !m.chunks.is_empty() {
                let (c, d) = (self.cache.clone(), *blob);
                let bytes = m.to_index().encode_sealed();
                blocking(move || c.write_entry(&c.entry_path(Kind::BlobIndex, &d), &bytes)).await?;
            }
        }
        Ok(meta)
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let (c, d) = (self.cache.clone(), *chunk);
        if let Some(b) = blocking(move || c.get_chunk(&d)).await? {
            bump(&self.cache.counters.chunk_hits, 1);
            return Ok(Some(b));
        }
        bump(&self.cache.counters.chunk_misses, 1);
        let data = self.inner.blobs.read_chunk(chunk).await?;
        if let Some(b) = &data {
            bump(&self.cache.counters.fetched_bytes, b.len() as u64);
            let (c, d, b) = (self.cache.clone(), *chunk, b.clone());
            blocking(move || c.write_entry(&c.entry_path(Kind::Chunk, &d), &b)).await?;
        }
        Ok(data)
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        if self.cache.has_entry(Kind::Chunk, chunk) {
            return Ok(true);
        }
        self.inner.blobs.has_chunk(chunk).await
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        self.inner.blobs.put_chunk(digest, data).await
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        self.inner.blobs.put_blob_index(blob, index).await?;
        let (c, bytes) = (self.cache.clone(), index.encode_sealed());
        blocking(move || c.write_entry(&c.entry_path(Kind::BlobIndex, &blob), &bytes)).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.blobs.flush().await
    }
}

#[async_trait]
impl DirectoryService for Cached {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let (c, d) = (self.cache.clone(), *digest);
        if let Some(dir) = blocking(move || c.get_dir(&d)).await? {
            bump(&self.cache.counters.meta_hits, 1);
            return Ok(Some(dir));
        }
        bump(&self.cache.counters.meta_misses, 1);
        let dir = self.inner.dirs.get(digest).await?;
        if let Some(d) = &dir {
            let bytes = d.encode_canonical();
            if B3Digest::of(&bytes) == *digest {
                let (c, dg) = (self.cache.clone(), *digest);
                blocking(move || c.write_entry(&c.entry_path(Kind::Directory, &dg), &bytes))
                    .await?;
            }
        }
        Ok(dir)
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        let digest = self.inner.dirs.put(dir).await?;
        let (c, bytes) = (self.cache.clone(), dir.encode_canonical());
        blocking(move || c.write_entry(&c.entry_path(Kind::Directory, &digest), &bytes)).await?;
        Ok(digest)
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        if self.cache.has_entry(Kind::Directory, digest) {
            return Ok(true);
        }
        self.inner.dirs.has(digest).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.dirs.flush().await
    }
}

#[async_trait]
impl RootService for Cached {
    /// Asks the store every time (roots change); only if the store cannot answer is the record
    /// last read used, with a warning.
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        match self.inner.roots.get(name).await {
            Ok(Some(r)) => {
                self.remember_root(&r);
                Ok(Some(r))
            }
            Ok(None) => {
                self.forget_root(name);
                Ok(None)
            }
            Err(e) => match self.remembered_root(name) {
                Some(r) if !matches!(e, StoreError::Corrupt { .. }) => {
                    tracing::warn!("{e}; using root {name:?} as last read into the cache");
                    Ok(Some(r))
                }
                _ => Err(e),
            },
        }
    }

    async fn put(&self, root: &RootRecord) -> Result<()> {
        self.inner.roots.put(root).await?;
        self.remember_root(root);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        match self.inner.roots.list().await {
            Ok(names) => Ok(names),
            Err(e) => {
                let dir = self.store_dir.join("roots");
                let Ok(rd) = std::fs::read_dir(&dir) else {
                    return Err(e);
                };
                tracing::warn!("{e}; listing the roots last read into the cache");
                let mut names: Vec<String> = rd
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect();
                names.sort();
                Ok(names)
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let r = self.inner.roots.delete(name).await?;
        self.forget_root(name);
        Ok(r)
    }
}

/// Whole-store operations go to the store itself; `counters` adds the cache's.
#[async_trait]
impl Maintenance for Cached {
    async fn usage(&self) -> Result<Usage> {
        self.maint()?.usage().await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.maint()?.list(kind).await
    }

    async fn delete_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let r = self.maint()?.delete_if_older(kind, digest, cutoff).await?;
        if r {
            let _ = std::fs::remove_file(self.cache.entry_path(kind, digest));
        }
        Ok(r)
    }

    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        let _ = std::fs::remove_file(self.cache.entry_path(kind, digest));
        self.maint()?.remove(kind, digest).await
    }

    async fn sweep_temp(&self, cutoff: SystemTime) -> Result<u64> {
        self.maint()?.sweep_temp(cutoff).await
    }

    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut v = self.maint()?.counters().await?;
        let r = {
            let c = self.cache.clone();
            blocking(move || c.report()).await??
        };
        v.push(("cache entries", r.entries));
        v.push(("cache bytes", r.bytes));
        v.push(("cache chunk hits", r.stats.chunk_hits));
        v.push(("cache chunk misses", r.stats.chunk_misses));
        Ok(v)
    }
}

impl Cached {
    fn maint(&self) -> Result<&Arc<dyn Maintenance>> {
        self.inner
            .maintenance
            .as_ref()
            .ok_or_else(|| StoreError::Backend("store has no maintenance operations".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn bounded_verified_and_repairing() {
        let tmp = tempfile::tempdir().unwrap();
        let inner = MemoryStore::new_store("memory://", StoreConfig::default());
        let mut digests = Vec::new();
        for i in 0..40u8 {
            let data = Bytes::from(vec![i; 10_000]);
            let d = B3Digest::of(&data);
            inner.blobs.put_chunk(d, data).await.unwrap();
            digests.push(d);
        }
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        let store = wrap(inner, cache.clone(), tmp.path().join("stores/x"));
        for d in &digests {
            let b = store.blobs.read_chunk(d).await.unwrap().unwrap();
            assert_eq!(B3Digest::of(&b), *d);
            let r = report(tmp.path());
            assert!(r.bytes <= 100_000, "{} bytes cached", r.bytes);
        }
        // The last one is cached: corrupt it; the next read refetches right bytes.
        let last = digests[39];
        let path = cache.entry_path(Kind::Chunk, &last);
        std::fs::write(&path, b"garbage").unwrap();
        let b = store.blobs.read_chunk(&last).await.unwrap().unwrap();
        assert_eq!(B3Digest::of(&b), last);
        assert_eq!(std::fs::read(&path).unwrap(), b.to_vec());
        cache.flush_stats().unwrap();
        let s = read_stats(tmp.path());
        assert_eq!(s.corrupt, 1);
        assert!(s.evicted > 0);
        assert_eq!(s.chunk_misses, 41);
    }
}
