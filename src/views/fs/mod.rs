//! The read-only FUSE filesystem over a store (DESIGN.md §4).
//!
//! The glue is thin: each `Filesystem` method builds one future over plain code — the
//! [`inode`] table for metadata, the [`chunk_cache`] for content — and replies once. The future
//! is polled once on the FUSE thread (answers from memory cost no hand-off); if it has to wait
//! for the store it moves to the tokio runtime and replies from there, so no FUSE thread ever
//! blocks on I/O. Every backend call has a deadline, and every failure is `EIO` for that request
//! only. Nothing here writes: every modifying operation is `EROFS`.

pub mod chunk_cache;
pub mod file_cache;
pub mod inode;
pub mod reaper;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Context;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use futures::stream::{self, StreamExt};
use lru::LruCache;

use crate::model::castore::{validate_root_name, B3Digest, Node};
use crate::model::times::{TimesPos, TimesRef};
use crate::store::{Store, StoreError};
use crate::views::nar::store_path::parse_basename;
use chunk_cache::{ChunkCache, Layout};
use file_cache::FileCache;
pub use file_cache::FileCacheOptions;
use inode::{DirView, Inode, InodeTable, Kind, ROOT_INO};

/// The xattr holding a file's blob digest or a directory's digest (hex).
pub const XATTR_DIGEST: &str = "user.granary.digest";
/// The xattr of a tree's top holding the digest of its table of recorded times (hex), when it
/// has one: two mounts of one tree agree on times only if this agrees too.
pub const XATTR_TIMES: &str = "user.granary.times";
/// The xattr on the mount root holding the number of live inodes (for tests and debugging).
pub const XATTR_INODES: &str = "user.granary.inodes";
/// The xattr on the mount root holding counts of kernel requests and directory loads (text).
pub const XATTR_OPS: &str = "user.granary.ops";

/// How long the kernel may cache entries and attributes of stored trees: they never change.
const TREE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Named roots can be added or replaced while mounted, so the top level is cached briefly.
const TOP_TTL: Duration = Duration::from_secs(1);
/// Small files after the one being read whose chunks are fetched ahead. (A listing fetches
/// nothing: on pystore, fetching 4 files per listed directory took a third of the mount's CPU
/// in a plain `find` and 200 MB of cache, and saved a `tar` of the tree under 3%.)
const SIBLING_PREFETCH: usize = 16;
/// Inodes forgotten (at least half of those live) before the heap is trimmed.
const TRIM_AFTER_FORGETTING: u64 = 10_000;
/// Read records kept (see `Inner::files`): the files being read by every reader at once.
const OPEN_FILES: std::num::NonZeroUsize = std::num::NonZeroUsize::MIN.saturating_add(4095);
/// Bytes of one-chunk files fetched when a directory is listed over a remote store.
const LISTING_PREFETCH_BYTES: u64 = 16 << 20;
/// Directories loaded ahead of a walk per listing.
const VIEW_PREFETCH: usize = 1024;
/// Roots looked up at once when listing the top level.
const DIR_CONCURRENCY: usize = 32;
/// Bytes of decoded directories kept beyond the live inodes that hold them, at most (and at
/// most a quarter of the mount's memory budget, which they share with chunks).
const DIR_CACHE_BYTES: usize = 64 << 20;

/// What the mount's top level shows.
#[derive(Debug, Clone)]
pub enum Top {
    /// The store's named roots; `listable: false` refuses to list them (lookups still work).
    Roots { listable: bool },
    /// One stored directory, and where its times are (its root's table and its place there).
    Tree(Node, Option<(TimesRef, TimesPos)>),
}

/// Settings of one mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub top: Top,
    /// Kernel channels served by their own thread each.
    pub threads: usize,
    /// The memory budget of the mount's caches: verified chunks, directory listings and the
    /// store's own read cache (see [`crate::store::BlobService::read_memory_bytes`]).
    pub cache_size: usize,
    pub allow_other: bool,
    /// Deadline of every backend call.
    pub deadline: Duration,
    /// Reads answered at once; the kernel's background queue is raised to match.
    pub max_reads: usize,
    /// Bytes prefetched past a sequential read (0: none; `None`: 4 MiB, or 16 MiB over a
    /// remote store, where each batch costs a round trip).
    pub readahead: Option<u64>,
    /// Present the top level as Nix's local store expects it (see [`NixTop`]).
    pub nix: Option<NixTop>,
    /// Whole files kept verified on local disk and handed to the kernel (FUSE passthrough),
    /// so their reads and `mmap`s go to the local file's page cache.
    pub file_cache: Option<FileCacheOptions>,
    /// Use passthrough where the kernel offers it (false: never, as on a kernel without it).
    pub passthrough: bool,
    /// Record what jobs first read (see `trace.rs`); written here at unmount.
    pub record_trace: Option<PathBuf>,
    /// Replay this trace of the mounted root as prefetch.
    pub replay: Option<crate::model::trace::TraceRef>,
    /// Poll the kernel channel while metadata requests come back to back (see `spin.rs`).
    pub poll: bool,
}

/// What a mount at `/nix/store` shows so that an unmodified Nix opens it as its local store:
/// Nix (as root) forces the store directory to owner root, the build-users group and mode
/// 1775, and creates `.links`; on a read-only filesystem both fail unless they are already so.
/// So the top level is owned by root and `gid` with mode 1775, holds an empty `.links`, and
/// shows only roots named like store paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixTop {
    /// Group of the store directory: the build-users group's (`nixbld`), else 0.
    pub gid: u32,
}

/// Nix's hard-link directory inside a store, shown empty by a Nix mount.
pub const NIX_LINKS: &[u8] = b".links";

/// FUSE threads by default: half the CPUs (1 to 8). They answer from memory and hand every
/// wait to the runtime, so more threads than that only add switching (measured: on 2 CPUs,
/// 1 thread reads the docs corpus ≈ 25% faster than 4, also with 4 parallel readers).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .clamp(1, 8)
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            top: Top::Roots { listable: true },
            threads: default_threads(),
            cache_size: 256 << 20,
            allow_other: false,
            deadline: Duration::from_secs(60),
            max_reads: 64,
            readahead: None,
            nix: None,
            file_cache: None,
            passthrough: true,
            record_trace: None,
            replay: None,
            poll: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("mount root must be a directory, {0} is not")]
    NotDirectory(String),
    #[error("writing the recorded trace to {path}: {source}")]
    Trace {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting at {path}: {source}")]
    Mount {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A snapshot of the top level: root names and what they point at.
type RootListing = Arc<Vec<(Bytes, Node)>>;

/// A file opened for reading.
struct OpenFile {
    digest: B3Digest,
    size: u64,
    layout: tokio::sync::OnceCell<Arc<Layout>>,
    /// Where the previous read ended, to detect sequential access.
    next: AtomicU64,
}

struct Inner {
    store: Store,
    rt: tokio::runtime::Handle,
    table: Mutex<InodeTable>,
    chunks: Arc<ChunkCache>,
    dirs: Mutex<(LruCache<B3Digest, Arc<DirView>>, usize)>,
    /// The most `dirs` keeps, in bytes.
    dir_cache_bytes: usize,
    /// Background loads of directories one level below a listing (see `prefetch_views`).
    dir_prefetch: Arc<tokio::sync::Semaphore>,
    reads: Arc<tokio::sync::Semaphore>,
    /// Read state of the files read last, by inode number. Bounded: in no-open mode nothing
    /// says a file is closed, and one record per file ever read was ≈ 300 bytes an inode
    /// (35 MB after reading pystore); a record is rebuilt from its inode when needed again.
    files: Mutex<LruCache<u64, Arc<OpenFile>>>,
    /// The kernel accepted `FUSE_NO_OPEN_SUPPORT` / `FUSE_NO_OPENDIR_SUPPORT`: answering
    /// `open`/`opendir` with ENOSYS makes it stop sending them (and release/releasedir),
    /// saving two round trips per file or directory while keeping its caches.
    no_open: std::sync::atomic::AtomicBool,
    no_opendir: std::sync::atomic::AtomicBool,
    /// Live inodes when the heap was last trimmed, or the most seen since (see `forget`).
    trim_mark: AtomicU64,
    /// The top-level listing for readers without a handle (no-opendir), refreshed at offset 0.
    top_listing: Mutex<Option<RootListing>>,
    /// Snapshots of the top-level listing, one per open handle.
    listings: Mutex<HashMap<u64, RootListing>>,
    next_fh: AtomicU64,
    deadline: Duration,
    listable: bool,
    /// The top level lists named roots (rather than showing one tree).
    roots_top: bool,
    uid: u32,
    gid: u32,
    nix: Option<NixTop>,
    /// Reads cross a network (see `BlobService::remote`): listings fetch files ahead.
    remote: bool,
    /// The empty directory (Nix's `.links`), answered without asking the store.
    empty_view: Arc<DirView>,
    /// Stamps of named roots as last read, for the top-level listing.
    root_stamps: Mutex<HashMap<Bytes, inode::Stamp>>,
    /// The heads of times tables that root records carry, by table, and their records in
    /// all: a lookup of a root or of an entry of its top is answered from them without
    /// reading the table.
    times_heads: Mutex<times::Heads>,
    stats: Arc<Stats>,
    file_cache: Option<Arc<FileCache>>,
    /// Passthrough was asked for (a file cache and not `passthrough: false`)...
    passthrough_wanted: bool,
    /// ... and the kernel agreed, and it has not failed since.
    passthrough: std::sync::atomic::AtomicBool,
    /// How the kernel has each file inode open (it refuses to mix modes on one inode).
    io_modes: Mutex<HashMap<u64, IoMode>>,
    /// Files being copied into the file cache at once.
    fills: Arc<tokio::sync::Semaphore>,
    /// Records and replays traces, when the mount does either.
    tracer: Option<Arc<trace::Tracer>>,
}

/// The open handles of one file inode: through the mount's own reads, or passed through to a
/// cached file (all sharing one backing id).
#[derive(Default)]
struct IoMode {
    cached: u32,
    pass: Option<(Arc<fuser::BackingId>, u32)>,
}

/// File handles: which kind of open a `release` ends.
const FH_CACHED: u64 = 0;
const FH_PASSTHROUGH: u64 = 1;

/// Keeps a long-running mount's heap near what it holds: glibc makes up to 8 arenas a core,
/// each keeping freed chunks for itself; one a core is enough for a mount's threads (on
/// pystore, `benches/memory.sh`: 637 → 518 MB after a full read, with no slower reads).
/// Fixing the mmap threshold instead (64 KiB: 469 MB) halved big-file reads, every
/// decompressed chunk then paying for a fresh mapping. Call before threads start.
pub fn bound_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        // SAFETY: mallopt only sets an allocator parameter; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cores).unwrap_or(2));
        }
    }
}

/// Gives the heap's free pages back to the system: freed chunks and inode records sit
/// between live ones, and glibc returns such pages only when asked (after the chunk cache
/// evicted a while, and after the kernel forgot many inodes).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's figures, for the stats xattr: bytes in use, free but kept, and mapped
/// on their own (glibc's `mallinfo2`); none elsewhere.
fn heap_figures() -> Vec<(String, u64)> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping.
        let m = unsafe { libc::mallinfo2() };
        vec![
            ("heap_in_use".into(), (m.uordblks + m.hblkhd) as u64),
            ("heap_free_kept".into(), m.fordblks as u64),
            ("heap_mapped".into(), m.hblkhd as u64),
        ]
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    Vec::new()
}

/// The filesystem handed to fuser.
pub struct GranaryFs {
    inner: Arc<Inner>,
    max_reads: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a poisoned lock holds sound data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs a backend failure and gives the errno the kernel sees.
fn eio(what: &str, e: impl std::fmt::Display) -> Errno {
    tracing::error!("{what}: {e}");
    Errno::EIO
}

/// Runs a request's future: polled once here, and if it must wait, finished on the runtime.
/// Counted in `stats` as one request of kind `op`, and as one that waited if it had to.
fn dispatch(
    rt: &tokio::runtime::Handle,
    stats: &Arc<Stats>,
    op: Op,
    fut: impl Future<Output = ()> + Send + 'static,
) {
    let _guard = rt.enter();
    stats.count(op);
    let since = std::time::Instant::now();
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    if fut.as_mut().poll(&mut cx).is_pending() {
        // The answer needs the store (decompressing, loading): the CPU a poller would take.
        stats.spin.pause();
        let stats = stats.clone();
        rt.spawn(async move {
            fut.await;
            stats.waited(op, since);
        });
    }
}

mod attr;
mod dirs;
mod glue;
mod passthrough;
mod read;
mod session;
mod spin;
mod stats;
mod times;
pub mod trace;

use stats::{Op, Stats};

#[allow(unused_imports)]
pub use attr::*;
#[allow(unused_imports)]
pub use dirs::*;
#[allow(unused_imports)]
pub use glue::*;
#[allow(unused_imports)]
pub use read::*;
#[allow(unused_imports)]
pub use session::*;
impl Inner {}

/// What the mount's own caches (chunks and listings) may hold of `cache_size`, the memory
/// budget the user gave: less what the store keeps as its read cache (`store_cache`), and
/// never less than a quarter of it.
fn memory_budget(cache_size: usize, store_cache: usize) -> usize {
    cache_size.saturating_sub(store_cache).max(cache_size / 4)
}

impl GranaryFs {
    /// A filesystem over `store`; the top-level directory view (for `Top::Tree`) is loaded
    /// here so that mount errors are reported before mounting.
    pub async fn new(
        store: Store,
        opts: &MountOptions,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, MountError> {
        let (kind, view, listable, top_times) = match &opts.top {
            Top::Roots { listable } => (Kind::Roots, None, *listable, None),
            Top::Tree(node @ Node::Directory { digest, .. }, at) => {
                let dir = crate::trees::get_dir(&store, digest).await?;
                let view = DirView::new(*digest, &dir).map_err(StoreError::from)?;
                (Kind::Node(node.clone()), Some(Arc::new(view)), true, *at)
            }
            Top::Tree(other, _) => {
                return Err(MountError::NotDirectory(match other.digest() {
                    Some(d) => format!("blob {d}"),
                    None => "a symlink".into(),
                }))
            }
        };
        let budget = memory_budget(opts.cache_size, store.blobs.read_memory_bytes());
        let chunks = ChunkCache::new(
            store.blobs.clone(),
            budget,
            opts.deadline,
            u64::from(store.params().min),
        );
        let remote = store.blobs.remote();
        chunks.set_prefetch(opts.readahead.unwrap_or(if remote {
            chunk_cache::REMOTE_PREFETCH_BYTES
        } else {
            chunk_cache::PREFETCH_BYTES
        }));
        let tracer = (opts.record_trace.is_some() || opts.replay.is_some()).then(|| {
            let tree = match &opts.top {
                Top::Tree(node, _) => node.digest(),
                Top::Roots { .. } => None,
            };
            // Half the memory cache: what the replay fetched ahead must still be there when
            // the job gets to it, beside what the job itself keeps reading. (A disk cache
            // under the mount is larger than that and keeps the rest.)
            let budget = (budget / 2).max(1) as u64;
            let t = Arc::new(trace::Tracer::new(
                tree,
                opts.record_trace.is_some(),
                opts.replay.clone(),
                budget,
            ));
            chunks.set_tracer(t.clone());
            t
        });
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let inner = Inner {
            table: Mutex::new(InodeTable::new(kind, view, inode::Stamp::default())),
            chunks,
            dirs: Mutex::new((LruCache::unbounded(), 0)),
            dir_cache_bytes: DIR_CACHE_BYTES.min(budget / 4),
            dir_prefetch: Arc::new(tokio::sync::Semaphore::new(2)),
            reads: Arc::new(tokio::sync::Semaphore::new(opts.max_reads.max(1))),
            files: Mutex::new(LruCache::new(OPEN_FILES)),
            no_open: Default::default(),
            no_opendir: Default::default(),
            trim_mark: AtomicU64::new(0),
            top_listing: Mutex::new(None),
            listings: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            deadline: opts.deadline,
            listable,
            roots_top: matches!(opts.top, Top::Roots { .. }),
            uid,
            gid,
            nix: opts.nix,
            remote,
            empty_view: {
                let empty = crate::model::castore::Directory::default();
                Arc::new(DirView::new(empty.digest(), &empty).map_err(StoreError::from)?)
            },
            root_stamps: Mutex::new(HashMap::new()),
            times_heads: Mutex::default(),
            stats: Arc::new(Stats::with_polling(opts.poll)),
            file_cache: match &opts.file_cache {
                Some(o) => Some(Arc::new(FileCache::open(o.clone()).map_err(|e| {
                    StoreError::Backend(format!("file cache {}: {e}", o.dir.display()))
                })?)),
                None => None,
            },
            passthrough_wanted: opts.file_cache.is_some() && opts.passthrough,
            passthrough: Default::default(),
            io_modes: Mutex::new(HashMap::new()),
            fills: Arc::new(tokio::sync::Semaphore::new(2)),
            tracer,
            store,
            rt,
        };
        // The top's own time: read now, so a table that cannot be read fails the mount.
        let stamp = inner
            .top_stamp(top_times)
            .await
            .map_err(|e| StoreError::Backend(format!("reading the tree's times: {e:?}")))?;
        lock(&inner.table).set_stamp(ROOT_INO, stamp);
        let inner = Arc::new(inner);
        inner.start_replay();
        Ok(Self {
            inner,
            max_reads: opts.max_reads,
        })
    }

    /// The mount's tracer, if it records or replays a trace.
    pub fn tracer(&self) -> Option<Arc<trace::Tracer>> {
        self.inner.tracer.clone()
    }

    fn run(&self, op: Op, fut: impl Future<Output = ()> + Send + 'static) {
        dispatch(&self.inner.rt, &self.inner.stats, op, fut)
    }
}
