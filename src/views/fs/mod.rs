//! The read-only FUSE filesystem over a store (DESIGN.md §4).
//!
//! The glue is thin: each `Filesystem` method builds one future over plain code — the
//! [`inode`] table for metadata, the [`chunk_cache`] for content — and replies once. The future
//! is polled once on the FUSE thread (answers from memory cost no hand-off); if it has to wait
//! for the store it moves to the tokio runtime and replies from there, so no FUSE thread ever
//! blocks on I/O. Every backend call has a deadline, and every failure is `EIO` for that request
//! only. Nothing here writes: every modifying operation is `EROFS`.

pub mod chunk_cache;
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use crate::store::{Store, StoreError};
use crate::views::nar::store_path::parse_basename;
use chunk_cache::{ChunkCache, Layout};
use inode::{DirView, Inode, InodeTable, Kind, ROOT_INO};

/// The xattr holding a file's blob digest or a directory's digest (hex).
pub const XATTR_DIGEST: &str = "user.granary.digest";
/// The xattr on the mount root holding the number of live inodes (for tests and debugging).
pub const XATTR_INODES: &str = "user.granary.inodes";

/// How long the kernel may cache entries and attributes of stored trees: they never change.
const TREE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Named roots can be added or replaced while mounted, so the top level is cached briefly.
const TOP_TTL: Duration = Duration::from_secs(1);
/// Small files after the one being read whose chunks are fetched ahead.
const SIBLING_PREFETCH: usize = 16;
/// Files whose first chunks a listing starts fetching: enough that a whole-tree reader's
/// first read in each directory finds them, few enough that a plain walk (find, ls -R)
/// pays little for them (measured on docs: 16 slowed `find` by ≈ 60%, 4 by little).
const LISTING_PREFETCH: usize = 4;
/// Directories loaded ahead of a walk per listing.
const VIEW_PREFETCH: usize = 1024;
/// Roots looked up at once when listing the top level.
const DIR_CONCURRENCY: usize = 32;
/// Bytes of decoded directories kept beyond the live inodes that hold them.
const DIR_CACHE_BYTES: usize = 64 << 20;

/// What the mount's top level shows.
#[derive(Debug, Clone)]
pub enum Top {
    /// The store's named roots; `listable: false` refuses to list them (lookups still work).
    Roots { listable: bool },
    /// One stored directory.
    Tree(Node),
}

/// Settings of one mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub top: Top,
    /// Kernel channels served by their own thread each.
    pub threads: usize,
    /// Bytes of verified chunks kept in memory.
    pub cache_size: usize,
    pub allow_other: bool,
    /// Deadline of every backend call.
    pub deadline: Duration,
    /// Reads answered at once; the kernel's background queue is raised to match.
    pub max_reads: usize,
    /// Bytes prefetched past a sequential read (0: none).
    pub readahead: u64,
    /// Present the top level as Nix's local store expects it (see [`NixTop`]).
    pub nix: Option<NixTop>,
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
            readahead: chunk_cache::PREFETCH_BYTES,
            nix: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("mount root must be a directory, {0} is not")]
    NotDirectory(String),
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
    /// Background loads of directories one level below a listing (see `prefetch_views`).
    dir_prefetch: Arc<tokio::sync::Semaphore>,
    reads: Arc<tokio::sync::Semaphore>,
    /// Read state of file inodes that were read, by inode number.
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// The kernel accepted `FUSE_NO_OPEN_SUPPORT` / `FUSE_NO_OPENDIR_SUPPORT`: answering
    /// `open`/`opendir` with ENOSYS makes it stop sending them (and release/releasedir),
    /// saving two round trips per file or directory while keeping its caches.
    no_open: std::sync::atomic::AtomicBool,
    no_opendir: std::sync::atomic::AtomicBool,
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
    /// The empty directory (Nix's `.links`), answered without asking the store.
    empty_view: Arc<DirView>,
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
fn dispatch(rt: &tokio::runtime::Handle, fut: impl Future<Output = ()> + Send + 'static) {
    let _guard = rt.enter();
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(futures::task::noop_waker_ref());
    if fut.as_mut().poll(&mut cx).is_pending() {
        rt.spawn(fut);
    }
}

impl Inner {
    /// One request's whole answer within the deadline, however many backend calls it takes
    /// (each has the deadline too, but several in a row must not add up).
    async fn within<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, Errno>>,
    ) -> Result<T, Errno> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(eio(
                &what(),
                format!("no answer within {:.1}s", self.deadline.as_secs_f64()),
            )),
        }
    }

    async fn deadline<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Errno> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(eio(&what(), e)),
            Err(_) => Err(eio(
                &what(),
                format!("timed out after {:.1}s", self.deadline.as_secs_f64()),
            )),
        }
    }

    /// The listing of a stored directory, from the cache or the store.
    async fn dir_view(&self, digest: B3Digest) -> Result<Arc<DirView>, Errno> {
        if digest == self.empty_view.digest {
            return Ok(self.empty_view.clone());
        }
        if let Some(v) = lock(&self.dirs).0.get(&digest) {
            return Ok(v.clone());
        }
        let what = || format!("directory {digest}");
        let dir = self
            .deadline(what, self.store.dirs.get(&digest))
            .await?
            .ok_or_else(|| eio(&what(), "missing from the store"))?;
        self.keep_view(digest, &dir)
    }

    /// Makes the view of a fetched directory and keeps it in the cache.
    fn keep_view(
        &self,
        digest: B3Digest,
        dir: &crate::model::castore::Directory,
    ) -> Result<Arc<DirView>, Errno> {
        let what = || format!("directory {digest}");
        let view = Arc::new(DirView::new(digest, dir).map_err(|e| eio(&what(), e))?);
        let mut guard = lock(&self.dirs);
        let (cache, bytes) = &mut *guard;
        if cache.put(digest, view.clone()).is_none() {
            *bytes += view.weight();
        }
        while *bytes > DIR_CACHE_BYTES {
            match cache.pop_lru() {
                Some((_, old)) => *bytes -= old.weight(),
                None => break,
            }
        }
        Ok(view)
    }

    /// The views of those of `nodes` that are directories (`None` for the others), the
    /// uncached ones fetched as one batch.
    async fn views_of(&self, nodes: &[&Node]) -> Vec<Result<Option<Arc<DirView>>, Errno>> {
        let mut out: Vec<Result<Option<Arc<DirView>>, Errno>> = Vec::with_capacity(nodes.len());
        let mut missing = Vec::new();
        {
            let mut guard = lock(&self.dirs);
            for (i, node) in nodes.iter().enumerate() {
                out.push(Ok(None));
                if let Node::Directory { digest, .. } = node {
                    if *digest == self.empty_view.digest {
                        out[i] = Ok(Some(self.empty_view.clone()));
                        continue;
                    }
                    match guard.0.get(digest) {
                        Some(v) => out[i] = Ok(Some(v.clone())),
                        None => missing.push((i, *digest)),
                    }
                }
            }
        }
        if missing.is_empty() {
            return out;
        }
        let digests: Vec<B3Digest> = missing.iter().map(|(_, d)| *d).collect();
        let got = match tokio::time::timeout(self.deadline, self.store.dirs.get_many(digests)).await
        {
            Ok(got) if got.len() == missing.len() => got,
            Ok(_) => {
                let e = eio("directory batch", "the backend answered the wrong count");
                return nodes.iter().map(|_| Err(e)).collect();
            }
            Err(_) => {
                let why = format!("timed out after {:.1}s", self.deadline.as_secs_f64());
                let e = eio("directory batch", why);
                return nodes.iter().map(|_| Err(e)).collect();
            }
        };
        for ((i, digest), res) in missing.into_iter().zip(got) {
            let what = || format!("directory {digest}");
            out[i] = match res {
                Ok(Some(dir)) => self.keep_view(digest, &dir).map(Some),
                Ok(None) => Err(eio(&what(), "missing from the store")),
                Err(e) => Err(eio(&what(), e)),
            };
        }
        out
    }

    /// A walk lists a directory's subdirectories next: load the directories below `views`
    /// in the background, as one batch, so those listings find their children cached.
    fn prefetch_views(self: &Arc<Self>, views: &[Arc<DirView>]) {
        let wanted: Vec<B3Digest> = {
            let guard = lock(&self.dirs);
            views
                .iter()
                .flat_map(|v| v.entries.iter())
                .filter_map(|(_, n)| match n {
                    Node::Directory { digest, .. } if !guard.0.contains(digest) => Some(*digest),
                    _ => None,
                })
                .take(VIEW_PREFETCH)
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let Ok(permit) = self.dir_prefetch.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let fetch = this.store.dirs.get_many(wanted.clone());
            // Failures are met (and reported) again by the listing that needs the directory.
            if let Ok(got) = tokio::time::timeout(this.deadline, fetch).await {
                for (digest, res) in wanted.into_iter().zip(got) {
                    if let Ok(Some(dir)) = res {
                        let _ = this.keep_view(digest, &dir);
                    }
                }
            }
        });
    }

    async fn view_of(&self, node: &Node) -> Result<Option<Arc<DirView>>, Errno> {
        match node {
            Node::Directory { digest, .. } => Ok(Some(self.dir_view(*digest).await?)),
            _ => Ok(None),
        }
    }

    fn attr(&self, ino: u64, inode: &Inode) -> FileAttr {
        let (kind, perm, size, nlink) = match &inode.kind {
            Kind::Roots => (
                FileType::Directory,
                if self.listable { 0o555 } else { 0o111 },
                0,
                2,
            ),
            Kind::Node(Node::Directory { .. }) => {
                let (entries, subdirs) = inode
                    .dir
                    .as_ref()
                    .map_or((0, 0), |(v, _)| (v.entries.len() as u64, v.subdirs));
                (
                    FileType::Directory,
                    0o555,
                    entries,
                    2u32.saturating_add(subdirs),
                )
            }
            Kind::Node(Node::File {
                size, executable, ..
            }) => (
                FileType::RegularFile,
                if *executable { 0o555 } else { 0o444 },
                *size,
                1,
            ),
            Kind::Node(Node::Symlink { target }) => {
                (FileType::Symlink, 0o777, target.len() as u64, 1)
            }
        };
        let (mut uid, mut gid, mut perm) = (self.uid, self.gid, perm);
        if let (Some(nix), Kind::Roots) = (&self.nix, &inode.kind) {
            (uid, gid, perm) = (0, nix.gid, 0o1775);
        }
        let time = UNIX_EPOCH + Duration::from_secs(1);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn ttl(&self, inode: &Inode) -> Duration {
        let top_level = inode.parent == ROOT_INO && self.roots_top;
        if top_level || matches!(inode.kind, Kind::Roots) {
            TOP_TTL
        } else {
            TREE_TTL
        }
    }

    /// Attributes of a live inode.
    fn attr_of(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        Ok((self.attr(ino, inode), self.ttl(inode)))
    }

    async fn lookup(&self, parent: u64, name: Bytes) -> Result<(FileAttr, Duration), Errno> {
        enum Parent {
            Roots,
            Dir(Arc<DirView>),
        }
        let p = {
            let table = lock(&self.table);
            let inode = table.get(parent).ok_or(Errno::ENOENT)?;
            match (&inode.kind, &inode.dir) {
                (Kind::Roots, _) => Parent::Roots,
                (_, Some((view, _))) => Parent::Dir(view.clone()),
                _ => return Err(Errno::ENOTDIR),
            }
        };
        match p {
            Parent::Roots => {
                let Ok(text) = std::str::from_utf8(&name) else {
                    return Err(Errno::ENOENT);
                };
                if validate_root_name(text).is_err() {
                    return Err(Errno::ENOENT);
                }
                if self.nix.is_some() {
                    if name[..] == *NIX_LINKS {
                        let (node, view) = self.links_entry();
                        let mut table = lock(&self.table);
                        let ino = table.lookup_top(&name, node, Some(view));
                        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                        return Ok((self.attr(ino, inode), TOP_TTL));
                    }
                    if parse_basename(text).is_err() {
                        return Err(Errno::ENOENT);
                    }
                }
                let what = || format!("root {text:?}");
                let rec = self
                    .deadline(what, self.store.roots.get(text))
                    .await?
                    .ok_or(Errno::ENOENT)?;
                let view = self.view_of(&rec.node).await?;
                let mut table = lock(&self.table);
                let ino = table.lookup_top(&name, rec.node, view);
                let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                Ok((self.attr(ino, inode), TOP_TTL))
            }
            Parent::Dir(pview) => {
                let index = pview.find(&name).ok_or(Errno::ENOENT)?;
                let view = self.view_of(&pview.entries[index].1).await?;
                let mut table = lock(&self.table);
                let ino = table
                    .lookup_child(parent, index, view)
                    .ok_or(Errno::ENOENT)?;
                let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                Ok((self.attr(ino, inode), self.ttl(inode)))
            }
        }
    }

    /// The top-level listing: every named root and what it points at.
    async fn list_roots(&self) -> Result<Vec<(Bytes, Node)>, Errno> {
        let names = self
            .deadline(|| "listing roots".into(), self.store.roots.list())
            .await?;
        let recs: Vec<_> = stream::iter(names)
            .map(|n| async move {
                let what = || format!("root {n:?}");
                let r = self.deadline(what, self.store.roots.get(&n)).await?;
                Ok::<_, Errno>(r.map(|r| (Bytes::from(n.into_bytes()), r.node)))
            })
            .buffered(DIR_CONCURRENCY)
            .collect()
            .await;
        // A root deleted between list and get is simply not shown.
        let mut list = recs
            .into_iter()
            .filter_map(|r| r.transpose())
            .collect::<Result<Vec<_>, Errno>>()?;
        if self.nix.is_some() {
            // Only store paths belong in a Nix store; `.links` sorts before every one of them.
            list.retain(|(n, _)| std::str::from_utf8(n).is_ok_and(|t| parse_basename(t).is_ok()));
            list.insert(0, (Bytes::from_static(NIX_LINKS), self.links_entry().0));
        }
        Ok(list)
    }

    /// Nix's `.links`: an empty directory.
    fn links_entry(&self) -> (Node, Arc<DirView>) {
        let node = Node::Directory {
            digest: self.empty_view.digest,
            size: 0,
        };
        (node, self.empty_view.clone())
    }

    /// The listing a readdir of `ino` at `offset` works from. The top level is a snapshot:
    /// per open handle, or (without opendir) taken afresh whenever a reader starts at 0.
    async fn entries(&self, ino: u64, fh: u64, offset: u64) -> Result<Listing, Errno> {
        let parent = {
            let table = lock(&self.table);
            let inode = table.get(ino).ok_or(Errno::ENOENT)?;
            match (&inode.kind, &inode.dir) {
                (Kind::Roots, _) => inode.parent,
                (_, Some((view, first))) => {
                    return Ok(Listing::Dir(view.clone(), *first, inode.parent))
                }
                _ => return Err(Errno::ENOTDIR),
            }
        };
        if let Some(l) = lock(&self.listings).get(&fh) {
            return Ok(Listing::Roots(l.clone(), parent));
        }
        if !self.listable {
            return Err(Errno::EACCES);
        }
        let cached = if offset == 0 {
            None
        } else {
            lock(&self.top_listing).clone()
        };
        let l = match cached {
            Some(l) => l,
            None => {
                let l = Arc::new(self.list_roots().await?);
                *lock(&self.top_listing) = Some(l.clone());
                l
            }
        };
        Ok(Listing::Roots(l, parent))
    }

    /// The read state of a file inode. It is kept per inode rather than per open handle, so
    /// it also serves kernels that skip `open` (`FUSE_NO_OPEN_SUPPORT`); it goes with the
    /// inode on `forget`.
    fn open_file(&self, ino: u64) -> Result<Arc<OpenFile>, Errno> {
        if let Some(f) = lock(&self.files).get(&ino) {
            return Ok(f.clone());
        }
        let (digest, size) = {
            let table = lock(&self.table);
            match &table.get(ino).ok_or(Errno::ENOENT)?.kind {
                Kind::Node(Node::File { digest, size, .. }) => (*digest, *size),
                Kind::Node(Node::Directory { .. }) | Kind::Roots => return Err(Errno::EISDIR),
                Kind::Node(Node::Symlink { .. }) => return Err(Errno::ELOOP),
            }
        };
        let file = Arc::new(OpenFile {
            digest,
            size,
            layout: tokio::sync::OnceCell::new(),
            next: AtomicU64::new(u64::MAX),
        });
        Ok(lock(&self.files).entry(ino).or_insert(file).clone())
    }

    /// Whole-tree readers (tar, cp -r, rsync) read a directory's files one after another:
    /// when a file is first read, fetch the next few siblings' first chunks in the background.
    fn prefetch_siblings(&self, ino: u64) {
        let found = {
            let table = lock(&self.table);
            let Some(parent) = table.get(ino).map(|i| i.parent) else {
                return;
            };
            let Some((view, first)) = table.get(parent).and_then(|p| p.dir.as_ref()) else {
                return;
            };
            ino.checked_sub(*first)
                .map(|i| (view.clone(), i as usize + 1))
        };
        if let Some((view, from)) = found {
            self.prefetch_files(&view, from, SIBLING_PREFETCH);
        }
    }

    /// Starts fetching the first chunks of the files among the `n` entries of `view` from
    /// index `from`.
    fn prefetch_files(&self, view: &DirView, from: usize, n: usize) {
        let blobs: Vec<_> = view
            .entries
            .iter()
            .skip(from)
            .take(n)
            .filter_map(|(_, node)| match node {
                Node::File { digest, size, .. } if *size > 0 => Some((*digest, *size)),
                _ => None,
            })
            .collect();
        if !blobs.is_empty() {
            self.chunks.prefetch_blobs(blobs);
        }
    }

    async fn read(
        &self,
        ino: u64,
        file: Arc<OpenFile>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, Errno> {
        if offset == 0 {
            self.prefetch_siblings(ino);
        }
        let _permit = self.reads.acquire().await.map_err(|_| Errno::EIO)?;
        let layout = file
            .layout
            .get_or_try_init(|| self.chunks.layout(&file.digest, file.size))
            .await
            .map_err(|_| Errno::EIO)?
            .clone();
        let data = self
            .chunks
            .read(&layout, offset, size as usize)
            .await
            .map_err(|_| Errno::EIO)?;
        let end = offset + data.len() as u64;
        let prev = file.next.swap(end, Ordering::Relaxed);
        if prev == offset && end < file.size {
            self.chunks.prefetch(layout, end);
        }
        Ok(data)
    }

    fn xattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        if name.as_bytes() == XATTR_DIGEST.as_bytes() {
            if let Kind::Node(n) = &inode.kind {
                if let Some(d) = n.digest() {
                    return Ok(d.to_hex().into_bytes());
                }
            }
        } else if name.as_bytes() == XATTR_INODES.as_bytes() && ino == ROOT_INO {
            return Ok(table.len().to_string().into_bytes());
        }
        Err(Errno::NO_XATTR)
    }

    fn xattr_names(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        let mut out = Vec::new();
        if let Kind::Node(Node::Directory { .. } | Node::File { .. }) = &inode.kind {
            out.extend_from_slice(XATTR_DIGEST.as_bytes());
            out.push(0);
        }
        if ino == ROOT_INO {
            out.extend_from_slice(XATTR_INODES.as_bytes());
            out.push(0);
        }
        Ok(out)
    }
}

enum Listing {
    /// Top-level snapshot and the parent's inode.
    Roots(RootListing, u64),
    /// A directory's view, its children's first number, the parent's inode.
    Dir(Arc<DirView>, u64, u64),
}

fn file_type(node: &Node) -> FileType {
    match node {
        Node::Directory { .. } => FileType::Directory,
        Node::File { .. } => FileType::RegularFile,
        Node::Symlink { .. } => FileType::Symlink,
    }
}

/// Replies to an xattr request honouring the size protocol (0 asks for the length).
fn reply_xattr(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, Errno>) {
    match data {
        Err(e) => reply.error(e),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(d) => reply.data(&d),
    }
}

impl GranaryFs {
    /// A filesystem over `store`; the top-level directory view (for `Top::Tree`) is loaded
    /// here so that mount errors are reported before mounting.
    pub async fn new(
        store: Store,
        opts: &MountOptions,
        rt: tokio::runtime::Handle,
    ) -> Result<Self, MountError> {
        let (kind, view, listable) = match &opts.top {
            Top::Roots { listable } => (Kind::Roots, None, *listable),
            Top::Tree(node @ Node::Directory { digest, .. }) => {
                let dir = crate::trees::get_dir(&store, digest).await?;
                let view = DirView::new(*digest, &dir).map_err(StoreError::from)?;
                (Kind::Node(node.clone()), Some(Arc::new(view)), true)
            }
            Top::Tree(other) => {
                return Err(MountError::NotDirectory(match other.digest() {
                    Some(d) => format!("blob {d}"),
                    None => "a symlink".into(),
                }))
            }
        };
        let chunks = ChunkCache::new(
            store.blobs.clone(),
            opts.cache_size,
            opts.deadline,
            u64::from(store.params().min),
        );
        chunks.set_prefetch(opts.readahead);
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let inner = Inner {
            table: Mutex::new(InodeTable::new(kind, view)),
            chunks,
            dirs: Mutex::new((LruCache::unbounded(), 0)),
            dir_prefetch: Arc::new(tokio::sync::Semaphore::new(2)),
            reads: Arc::new(tokio::sync::Semaphore::new(opts.max_reads.max(1))),
            files: Mutex::new(HashMap::new()),
            no_open: Default::default(),
            no_opendir: Default::default(),
            top_listing: Mutex::new(None),
            listings: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            deadline: opts.deadline,
            listable,
            roots_top: matches!(opts.top, Top::Roots { .. }),
            uid,
            gid,
            nix: opts.nix,
            empty_view: {
                let empty = crate::model::castore::Directory::default();
                Arc::new(DirView::new(empty.digest(), &empty).map_err(StoreError::from)?)
            },
            store,
            rt,
        };
        Ok(Self {
            inner: Arc::new(inner),
            max_reads: opts.max_reads,
        })
    }

    fn run(&self, fut: impl Future<Output = ()> + Send + 'static) {
        dispatch(&self.inner.rt, fut)
    }
}

impl Filesystem for GranaryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for flag in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_SPLICE_WRITE,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            }
        }
        self.inner.no_open.store(
            config
                .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                .is_ok(),
            Ordering::Relaxed,
        );
        self.inner.no_opendir.store(
            config
                .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
                .is_ok(),
            Ordering::Relaxed,
        );
        let bg = u16::try_from(self.max_reads.clamp(16, 1024)).unwrap_or(1024);
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold(bg * 3 / 4);
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.inner.clone();
        let name = Bytes::copy_from_slice(name.as_bytes());
        self.run(async move {
            let what = || format!("lookup of {:?}", String::from_utf8_lossy(&name));
            match inner
                .within(what, inner.lookup(parent.0, name.clone()))
                .await
            {
                Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let gone = {
            let mut table = lock(&self.inner.table);
            table.forget(ino.0, nlookup);
            table.get(ino.0).is_none()
        };
        if gone {
            lock(&self.inner.files).remove(&ino.0);
        }
    }

    // batch_forget: fuser's default calls `forget` for each inode (its `ForgetOne` type is
    // not nameable outside the crate).

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.inner.attr_of(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let table = lock(&self.inner.table);
        match table.get(ino.0).map(|i| &i.kind) {
            Some(Kind::Node(Node::Symlink { target })) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.inner.open_file(ino.0) {
            Err(e) => reply.error(e),
            Ok(_) if self.inner.no_open.load(Ordering::Relaxed) => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.inner.open_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let inner = self.inner.clone();
        self.run(async move {
            let what = || format!("read of inode {} at {offset}", ino.0);
            match inner
                .within(what, inner.read(ino.0, file, offset, size))
                .await
            {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush; ENOSYS tells the kernel not to ask again (close needs no round trip).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let is_roots = match lock(&self.inner.table).get(ino.0) {
            None => return reply.error(Errno::ENOENT),
            Some(i) if !i.is_dir() => return reply.error(Errno::ENOTDIR),
            Some(i) => matches!(i.kind, Kind::Roots),
        };
        if self.inner.no_opendir.load(Ordering::Relaxed) && (!is_roots || self.inner.listable) {
            return reply.error(Errno::ENOSYS);
        }
        if !is_roots {
            return reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            );
        }
        if !self.inner.listable {
            return reply.error(Errno::EACCES);
        }
        let inner = self.inner.clone();
        self.run(async move {
            match inner.list_roots().await {
                Ok(list) => {
                    let fh = inner.next_fh.fetch_add(1, Ordering::Relaxed);
                    lock(&inner.listings).insert(fh, Arc::new(list));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.inner.clone();
        self.run(async move {
            let listing = match inner.entries(ino.0, fh.0, offset).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            // Offsets: 1 and 2 are "." and "..", entry i is at i + 3.
            let (parent, n) = match &listing {
                Listing::Roots(l, p) => (*p, l.len()),
                Listing::Dir(v, _, p) => (*p, v.entries.len()),
            };
            if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 && reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            let table = lock(&inner.table);
            for i in (offset.saturating_sub(2) as usize)..n {
                let (name, node, child) = match &listing {
                    Listing::Roots(l, _) => {
                        let (name, node) = &l[i];
                        // Roots not looked up yet have no number; any unused one will do.
                        let child = table.top_ino(name).unwrap_or(u64::MAX - i as u64);
                        (name, node, child)
                    }
                    Listing::Dir(v, first, _) => {
                        (&v.entries[i].0, &v.entries[i].1, first + i as u64)
                    }
                };
                if reply.add(
                    INodeNo(child),
                    i as u64 + 3,
                    file_type(node),
                    OsStr::from_bytes(name),
                ) {
                    break;
                }
            }
            drop(table);
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let inner = self.inner.clone();
        self.run(async move {
            let listing = match inner.entries(ino.0, fh.0, offset).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let (parent, entries): (u64, &[(Bytes, Node)]) = match &listing {
                Listing::Roots(l, p) => (*p, &l[..]),
                Listing::Dir(v, _, p) => (*p, &v.entries[..]),
            };
            let start = offset.saturating_sub(2) as usize;
            // A listed directory's files are often read next, in order (tar, cp -r).
            if let (Listing::Dir(v, ..), 0) = (&listing, offset) {
                inner.prefetch_files(v, 0, LISTING_PREFETCH);
            }
            // A reply holds at most a few hundred entries; load the child directories those
            // need (for their link counts) all at once.
            let window: Vec<usize> = (start..entries.len().min(start + 512)).collect();
            let nodes: Vec<&Node> = window.iter().map(|&i| &entries[i].1).collect();
            let views = inner.views_of(&nodes).await;
            let loaded: Vec<Arc<DirView>> = views
                .iter()
                .filter_map(|v| v.clone().ok().flatten())
                .collect();
            inner.prefetch_views(&loaded);
            let mut table = lock(&inner.table);
            let self_attr = match table.get(ino.0) {
                Some(i) => inner.attr(ino.0, i),
                None => return reply.error(Errno::ENOENT),
            };
            if offset < 1 && reply.add(ino, 1, ".", &TREE_TTL, &self_attr, Generation(0)) {
                return reply.ok();
            }
            if offset < 2 {
                let pattr = table
                    .get(parent)
                    .map_or(self_attr, |i| inner.attr(parent, i));
                if reply.add(INodeNo(parent), 2, "..", &TREE_TTL, &pattr, Generation(0)) {
                    return reply.ok();
                }
            }
            for (i, view) in window.into_iter().zip(views) {
                let view = match view {
                    Ok(v) => v,
                    // A root whose tree cannot be loaded is left out of the top level (and
                    // gives EIO by name); the other roots are still listed.
                    Err(_) if matches!(listing, Listing::Roots(..)) => continue,
                    // Entries before a broken child are still served; the error comes with
                    // the next call, which starts at that child.
                    Err(e) if i == start => return reply.error(e),
                    Err(_) => break,
                };
                let (name, node) = &entries[i];
                let (child, ttl) = match &listing {
                    Listing::Roots(..) => (table.lookup_top(name, node.clone(), view), TOP_TTL),
                    Listing::Dir(..) => match table.lookup_child(ino.0, i, view) {
                        Some(c) => (c, TREE_TTL),
                        None => break,
                    },
                };
                let Some(cinode) = table.get(child) else {
                    break;
                };
                let attr = inner.attr(child, cinode);
                if reply.add(
                    INodeNo(child),
                    i as u64 + 3,
                    OsStr::from_bytes(name),
                    &ttl,
                    &attr,
                    Generation(0),
                ) {
                    // Not sent: the kernel holds no reference for it.
                    table.forget(child, 1);
                    break;
                }
            }
            drop(table);
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.inner.listings).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = lock(&self.inner.table).len() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.inner.xattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.inner.xattr_names(ino.0));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if lock(&self.inner.table).get(ino.0).is_none() {
            reply.error(Errno::ENOENT)
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    // Everything below would modify the tree: the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// A mounted filesystem, not yet serving.
pub struct Mounted {
    session: fuser::Session<GranaryFs>,
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
}

/// Prepares the filesystem for `store`, mounts it at `mountpoint` and serves it on a blocking
/// thread; returns once the kernel is being served.
pub async fn mount_and_serve(
    store: &Store,
    opts: &MountOptions,
    mountpoint: &Path,
) -> Result<Served, MountError> {
    let filesystem = GranaryFs::new(store.clone(), opts, tokio::runtime::Handle::current()).await?;
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
    Ok(Served { serving, unmounter })
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
    let mut session =
        fuser::Session::new(fs, mountpoint, &config).map_err(|source| MountError::Mount {
            path: mountpoint.display().to_string(),
            source,
        })?;
    let unmounter = session.unmount_callable();
    Ok(Mounted {
        session,
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
        self.session.run()
    }
}

/// Decodes the octal escapes `/proc/self/mountinfo` uses in paths.
fn unescape_mountinfo(s: &str) -> PathBuf {
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
fn mountinfo_field(path: &Path, idx: usize) -> Option<String> {
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
