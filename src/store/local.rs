//! The embedded `file://` store (DESIGN.md §3):
//!
//! ```text
//! config.toml        chunking parameters, compression, format version
//! packs/<id>.pack    objects written together (format 2; see [`super::pack`])
//! packs/<id>.idx     where each object of the pack is
//! chunks/ab/abcd..   zstd-compressed chunk, named by blake3 of the uncompressed bytes
//! blobs/ab/abcd..    blob index (multi-chunk blobs only)
//! dirs/ab/abcd..     directory protobuf
//! roots/<name>       root record
//! ```
//!
//! A store created with `packs = true` (the default since format 2) writes new objects into
//! pack files; a format-1 store writes one file per object. Both are read either way.
//! Objects are immutable: written to a temp file in the target directory, made durable, then
//! renamed into place, so a crash never leaves a partial object under a final name, and two
//! processes writing the same object both succeed. Disk I/O runs on tokio's blocking pool.
//!
//! An fsync per object costs milliseconds, which dominates an import of many small files. So
//! objects are *staged*: written to temp files, then made durable together by one `syncfs`
//! and renamed into place ([`LocalStore::flush`]), before any root can refer to them (a root
//! put flushes first) and whenever the staged set grows large. Staged objects are visible to
//! this process (reads fall back to the temp file) but not to others until flushed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::codec::{decode_chunk, encode_chunk};
use super::pack::{self, IndexEntry, PackSet, PackWriter};
pub use super::ObjectKind as Kind;
use super::{
    check_children, empty_blob, BlobMeta, BlobService, ChunkRef, ChunkSink, DirectoryService,
    Maintenance, ObjectInfo, Result, RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};

/// Largest chunk we will decompress: FastCDC's largest allowed maximum.
pub use crate::model::chunking::MAX_CHUNK;

const TMP_PREFIX: &str = ".tmp-";

/// First read buffer for an object: most compressed chunks and directories fit.
const OBJECT_READ_BUF: usize = 64 << 10;

/// Bytes of a chunk batch read on one thread (see `read_chunks`).
const BATCH_GROUP_BYTES: u64 = 1 << 20;

/// gc merges packs smaller than this once there are `MERGE_AT` of them.
const MERGE_BELOW: u64 = 64 << 20;
const MERGE_AT: usize = 16;

/// Staged objects are flushed once they hold this many bytes or objects.
const STAGE_MAX_BYTES: u64 = 512 << 20;
const STAGE_MAX_OBJECTS: usize = 50_000;

/// Objects written to temp files, awaiting one `syncfs` and their rename into place.
#[derive(Default)]
struct Staged {
    objects: HashMap<PathBuf, tempfile::TempPath>,
    /// The pack being written (packed stores), and what it holds so far.
    pack: Option<PackWriter>,
    packed: HashMap<(Kind, B3Digest), IndexEntry>,
    bytes: u64,
    /// Whether this process ever staged an object (a reader never does, so it can trust a
    /// first "not found").
    ever: bool,
}

/// The on-disk store. Cheap to clone (all state is shared).
#[derive(Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
    config: StoreConfig,
    staged: Arc<Mutex<Staged>>,
    packs: Arc<PackSet>,
    /// Packed objects a gc found collectable, with that gc's cutoff; removed by repacking at
    /// the sweep that ends the same gc.
    pending: Arc<Mutex<HashMap<(Kind, B3Digest), SystemTime>>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .finish()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
}

/// Writes `data` under `path` atomically: temp file beside it, fsync, rename. An existing
/// object is left alone (objects are content-addressed, so it holds the same bytes).
pub fn write_atomic(path: &Path, data: &[u8], replace: bool) -> Result<()> {
    if !replace && path.exists() {
        return Ok(());
    }
    let mut tmp = temp_beside(path)?;
    let ctx = |e| StoreError::io(format!("writing {}", path.display()), e);
    tmp.write_all(data).map_err(ctx)?;
    tmp.as_file().sync_data().map_err(ctx)?;
    tmp.persist(path).map_err(|e| ctx(e.error))?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx)?;
    }
    Ok(())
}

/// Largest root record read (a root holds a node and Nix metadata: kilobytes).
const MAX_ROOT_BYTES: u64 = 16 << 20;

/// Reads a root record file without following a link or blocking on a FIFO: anything but a
/// regular file under `roots/` is refused without being opened for reading.
fn read_root_file(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StoreError::Backend(format!(
                "{}: a symbolic link, not a root record",
                path.display()
            )))
        }
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let meta = f
        .metadata()
        .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(StoreError::Backend(format!(
            "{}: not a regular file, not a root record",
            path.display()
        )));
    }
    if meta.len() > MAX_ROOT_BYTES {
        return Err(StoreError::Backend(format!(
            "{}: {} bytes, over the {MAX_ROOT_BYTES}-byte limit of a root record",
            path.display(),
            meta.len()
        )));
    }
    let mut raw = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_ROOT_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
    Ok(Some(raw))
}

/// Creates a temp file beside `path`, creating the fan-out directory on first use.
fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .ok_or_else(|| StoreError::Backend(format!("{} has no parent", path.display())))?;
    let make = || tempfile::Builder::new().prefix(TMP_PREFIX).tempfile_in(dir);
    match make() {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
            make().map_err(|e| StoreError::io(format!("temp file in {}", dir.display()), e))
        }
        Err(e) => Err(StoreError::io(format!("temp file in {}", dir.display()), e)),
    }
}

/// Checks that encoded object bytes hash to the digest they are stored under.
fn check_digest(kind: Kind, digest: &B3Digest, bytes: &[u8]) -> Result<()> {
    let actual = B3Digest::of(bytes);
    if actual != *digest {
        return Err(StoreError::corrupt(
            kind.what(),
            digest,
            format!("digest mismatch (content hashes to {actual})"),
        ));
    }
    Ok(())
}

impl LocalStore {
    /// Opens the store at `path`, creating it (with default parameters) if it does not exist.
    pub async fn open(url: &str, path: &Path) -> Result<Store> {
        Self::open_with(url, path, StoreConfig::default()).await
    }

    /// Opens the store at `path`; a new store is created with `create_with`.
    pub async fn open_with(url: &str, path: &Path, create_with: StoreConfig) -> Result<Store> {
        let url_s = url.to_string();
        let path = path.to_path_buf();
        let local = blocking(move || Self::open_blocking(&url_s, &path, create_with)).await?;
        let local = Arc::new(local);
        Ok(Store {
            url: url.to_string(),
            config: local.config,
            blobs: local.clone(),
            dirs: local.clone(),
            roots: local.clone(),
            maintenance: Some(local),
            ingest: None,
        })
    }

    fn open_blocking(url: &str, path: &Path, create_with: StoreConfig) -> Result<Self> {
        let bad = |reason: String| StoreError::Config {
            url: url.to_string(),
            reason,
        };
        let cfg_path = path.join("config.toml");
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => StoreConfig::from_toml(&text)
                .map_err(|r| bad(format!("{}: {r}", cfg_path.display())))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Refuse to take over a directory holding anything but what a store being
                // created by another process at this moment would hold.
                let foreign = match std::fs::read_dir(path) {
                    Ok(rd) => rd.flatten().any(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        !(n.starts_with(TMP_PREFIX)
                            || [
                                "config.toml",
                                "chunks",
                                "blobs",
                                "dirs",
                                "roots",
                                pack::PACK_DIR,
                            ]
                            .contains(&n.as_ref()))
                    }),
                    Err(_) => false,
                };
                if foreign {
                    return Err(bad(format!(
                        "{} is a non-empty directory without config.toml; not a granary store",
                        path.display()
                    )));
                }
                // A store whose config.toml was deleted: making a new one would silently
                // change how files are cut (other chunking parameters).
                let holds = ["roots", "chunks", "blobs", "dirs", pack::PACK_DIR]
                    .iter()
                    .any(|sub| {
                        std::fs::read_dir(path.join(sub)).is_ok_and(|mut rd| {
                            rd.any(|e| {
                                e.is_ok_and(|e| {
                                    !e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                                })
                            })
                        })
                    });
                if holds {
                    return Err(bad(format!(
                        "{} is missing, but the store holds objects or roots; restore it (it \
                         records the store's chunking parameters and format) rather than let a \
                         new one change them",
                        cfg_path.display()
                    )));
                }
                std::fs::create_dir_all(path)
                    .map_err(|e| bad(format!("cannot create {}: {e}", path.display())))?;
                create_with
                    .chunking
                    .validate()
                    .map_err(|e| bad(e.to_string()))?;
                write_atomic(&cfg_path, create_with.to_toml().as_bytes(), false)?;
                // Another process may have created it first with other parameters: theirs win.
                let text = std::fs::read_to_string(&cfg_path)
                    .map_err(|e| bad(format!("{}: {e}", cfg_path.display())))?;
                StoreConfig::from_toml(&text).map_err(bad)?
            }
            Err(e) => return Err(bad(format!("{}: {e}", cfg_path.display()))),
        };
        let subs: &[&str] = if config.packs {
            &["roots", pack::PACK_DIR]
        } else {
            &["chunks", "blobs", "dirs", "roots"]
        };
        for sub in subs {
            std::fs::create_dir_all(path.join(sub))
                .map_err(|e| bad(format!("cannot create {sub}/: {e}")))?;
        }
        // The pack indexes are read in the background from here, and waited for by the first
        // lookup that needs them.
        let packs = Arc::new(PackSet::new(path.join(pack::PACK_DIR)));
        {
            let packs = packs.clone();
            std::thread::spawn(move || {
                if let Err(e) = packs.ensure_loaded() {
                    tracing::warn!("{e}");
                }
            });
        }
        Ok(LocalStore {
            root: Arc::new(path.to_path_buf()),
            config,
            staged: Arc::default(),
            packs,
            pending: Arc::default(),
        })
    }

    /// Stages an object for the next flush: appended to this process's pack (packed stores),
    /// or written to a temp file beside its final path. An object already stored or already
    /// staged is left alone.
    fn stage(&self, kind: Kind, digest: &B3Digest, data: &[u8]) -> Result<()> {
        if self.reuse(kind, digest)? {
            return Ok(());
        }
        if self.config.packs {
            let full = {
                let mut st = self.lock_staged()?;
                // Another thread may have staged it, or staged and flushed it, since `reuse`.
                if st.packed.contains_key(&(kind, *digest)) || self.packs.contains(kind, digest) {
                    return Ok(());
                }
                let writer = match &mut st.pack {
                    Some(w) => w,
                    None => st
                        .pack
                        .insert(PackWriter::new(self.packs.dir(), TMP_PREFIX)?),
                };
                let e = writer.append(kind, *digest, data)?;
                let bytes = writer.bytes();
                st.packed.insert((kind, *digest), e);
                st.ever = true;
                bytes >= STAGE_MAX_BYTES || st.packed.len() >= STAGE_MAX_OBJECTS
            };
            if full {
                self.flush_blocking()?;
            }
            return Ok(());
        }
        let path = self.object_path(kind, digest);
        let mut tmp = temp_beside(&path)?;
        tmp.write_all(data)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        let tmp = tmp.into_temp_path();
        let full = {
            let mut st = self.lock_staged()?;
            if st.objects.contains_key(&path) {
                return Ok(());
            }
            st.objects.insert(path, tmp);
            st.ever = true;
            st.bytes += data.len() as u64;
            st.bytes >= STAGE_MAX_BYTES || st.objects.len() >= STAGE_MAX_OBJECTS
        };
        if full {
            self.flush_blocking()?;
        }
        Ok(())
    }

    fn lock_staged(&self) -> Result<std::sync::MutexGuard<'_, Staged>> {
        self.staged
            .lock()
            .map_err(|_| StoreError::Backend("staged-object lock poisoned".into()))
    }

    /// Makes every staged object durable (one `syncfs`), renames them into place, and makes
    /// the renames durable (a second `syncfs`).
    pub fn flush_blocking(&self) -> Result<()> {
        let mut st = self.lock_staged()?;
        if let Some(writer) = st.pack.take() {
            // Nothing is staged any more, even if the commit fails (a long-lived daemon must
            // not later skip these objects as "staged" and record a root without them).
            st.packed.clear();
            if !writer.is_empty() {
                let entries = writer.entries().to_vec();
                let id = writer.commit(TMP_PREFIX)?;
                self.packs.add(&id, &entries)?;
            }
        }
        if st.objects.is_empty() {
            return Ok(());
        }
        self.syncfs()?;
        for (path, tmp) in st.objects.drain() {
            tmp.persist(&path).map_err(|e| {
                StoreError::io(format!("renaming into {}", path.display()), e.error)
            })?;
        }
        st.bytes = 0;
        drop(st);
        self.syncfs()
    }

    fn syncfs(&self) -> Result<()> {
        let dir = std::fs::File::open(&*self.root)
            .map_err(|e| StoreError::io(format!("opening {}", self.root.display()), e))?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(StoreError::io(
                format!("syncfs {}", self.root.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Opens an object in place or, if staged by this process, its temp file.
    fn open_object(&self, path: &Path) -> Result<Option<std::fs::File>> {
        let ctx = |e| StoreError::io(format!("reading {}", path.display()), e);
        match std::fs::File::open(path) {
            Ok(f) => return Ok(Some(f)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(ctx(e)),
        }
        {
            let st = self.lock_staged()?;
            if let Some(tmp) = st.objects.get(path) {
                return std::fs::File::open(tmp).map(Some).map_err(ctx);
            }
            if !st.ever {
                return Ok(None);
            }
        }
        // A flush may have renamed it between the two looks.
        match std::fs::File::open(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ctx(e)),
        }
    }

    fn read_loose(&self, path: &Path, prefix: Option<usize>) -> Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open_object(path)? else {
            return Ok(None);
        };
        let ctx = |e| StoreError::io(format!("reading {}", path.display()), e);
        if let Some(n) = prefix {
            let mut buf = vec![0u8; n];
            let got = read_up_to(&mut f, &mut buf).map_err(ctx)?;
            buf.truncate(got);
            return Ok(Some(buf));
        }
        // Through `Take`, read_to_end fills the buffer's spare room directly, without
        // File's size probe (an fstat and an lseek per object); most objects fit the first
        // buffer.
        let mut buf = Vec::with_capacity(OBJECT_READ_BUF);
        (&mut f).take(u64::MAX).read_to_end(&mut buf).map_err(ctx)?;
        Ok(Some(buf))
    }

    /// An object's stored bytes (the first `prefix` bytes only, if given), from a pack, this
    /// process's unflushed pack, or its own file; `None` if absent.
    fn read_object_bytes(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.read_packed(kind, digest, prefix)? {
            return Ok(Some(b));
        }
        if self.config.packs {
            let st = self.lock_staged()?;
            if let (Some(e), Some(w)) = (st.packed.get(&(kind, *digest)), &st.pack) {
                let mut e = *e;
                if let Some(n) = prefix {
                    e.len = e.len.min(n as u32);
                }
                return w.read(&e).map(Some);
            }
        }
        if let Some(b) = self.read_loose(&self.object_path(kind, digest), prefix)? {
            return Ok(Some(b));
        }
        // Another process may have committed a pack (or a gc replaced one) since we looked,
        // or this process's own flush moved the object from its unflushed pack to the index
        // between the looks above: look again either way.
        if self.config.packs || !self.packs.is_empty() {
            self.packs.refresh(false)?;
            return self.read_packed(kind, digest, prefix);
        }
        Ok(None)
    }

    /// Reads an object from the known packs; rescans once if its pack has gone (a gc
    /// replaced it).
    fn read_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.packs.read(kind, digest, prefix)? {
            return Ok(Some(b));
        }
        if !self.packs.contains(kind, digest) {
            return Ok(None);
        }
        // Known but its pack is gone: a gc rewrote it.
        self.packs.refresh(true)?;
        self.packs.read(kind, digest, prefix)
    }

    /// For a put: true if the object is already stored (its mtime, or its pack's, is
    /// refreshed, so a concurrent gc's grace period protects it) or staged by this process.
    fn reuse(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        if self.config.packs {
            if self.lock_staged()?.packed.contains_key(&(kind, *digest)) {
                return Ok(true);
            }
            if let Some(path) = self.packs.path_of(kind, digest) {
                // A pack a gc has moved aside is not there to touch: write the object again.
                return touch(&path);
            }
            return Ok(false);
        }
        let path = self.object_path(kind, digest);
        if self.lock_staged()?.objects.contains_key(&path) {
            return Ok(true);
        }
        touch(&path)
    }

    fn object_exists(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        if self.packs.contains(kind, digest) {
            return Ok(true);
        }
        let path = self.object_path(kind, digest);
        {
            let st = self.lock_staged()?;
            if st.packed.contains_key(&(kind, *digest)) || st.objects.contains_key(&path) {
                return Ok(true);
            }
        }
        if path.exists() {
            return Ok(true);
        }
        // As in `read_object_bytes`: a flush or another process may have moved it meanwhile.
        if !self.config.packs && self.packs.is_empty() {
            return Ok(false);
        }
        self.packs.refresh(false)?;
        Ok(self.packs.contains(kind, digest))
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, kind: Kind, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(kind.dir()).join(&hex[..2]).join(hex)
    }

    fn root_path(&self, name: &str) -> Result<PathBuf> {
        validate_root_name(name)?;
        if name.starts_with(TMP_PREFIX) {
            return Err(StoreError::Backend(format!(
                "root name {name:?} starts with {TMP_PREFIX:?}, which the local store reserves"
            )));
        }
        Ok(self.root.join("roots").join(name))
    }

    /// Stores a chunk from a blocking context (the import pipeline's worker threads).
    pub fn put_chunk_blocking(&self, digest: &B3Digest, data: &[u8]) -> Result<()> {
        if self.reuse(Kind::Chunk, digest)? {
            return Ok(());
        }
        let compressed = encode_chunk(data, self.config.zstd_level)
            .map_err(|e| StoreError::io(format!("compressing chunk {digest}"), e))?;
        self.stage(Kind::Chunk, digest, &compressed)
    }

    fn read_chunk_blocking(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        let Some(raw) = self.read_object_bytes(Kind::Chunk, digest, None)? else {
            return Ok(None);
        };
        decode_chunk(digest, &raw).map(Some)
    }

    fn read_object(&self, kind: Kind, digest: &B3Digest) -> Result<Option<Vec<u8>>> {
        let Some(raw) = self.read_object_bytes(kind, digest, None)? else {
            return Ok(None);
        };
        check_digest(kind, digest, &raw)?;
        Ok(Some(raw))
    }

    fn get_dir_blocking(&self, d: &B3Digest) -> Result<Option<Directory>> {
        let Some(raw) = self.read_object(Kind::Directory, d)? else {
            return Ok(None);
        };
        Directory::decode_valid(&raw)
            .map(Some)
            .map_err(|e| StoreError::corrupt("directory", d, e.to_string()))
    }

    fn stat_blocking(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        if *blob == empty_blob() {
            return Ok(Some(BlobMeta::default()));
        }
        // Most blobs are one chunk, so look for that first. A chunk stored under the blob's
        // digest holds exactly the blob's bytes, so the two looks cannot disagree.
        // In a packed store both looks are in memory: skip the chunk look (and its
        // rescan of the packs on a miss) when the index is known.
        let header = if self.packs.contains(Kind::BlobIndex, blob)
            && !self.packs.contains(Kind::Chunk, blob)
        {
            None
        } else {
            self.read_object_bytes(Kind::Chunk, blob, Some(18))?
        };
        let header = match header {
            Some(h) => h,
            None => {
                // The index is named by the blob digest, which is not the hash of the index
                // bytes, so it is validated structurally here; chunk reads verify the bytes.
                let Some(raw) = self.read_object_bytes(Kind::BlobIndex, blob, None)? else {
                    return Ok(None);
                };
                let idx = BlobIndex::decode_valid(&raw)
                    .map_err(|e| StoreError::corrupt("blob index", blob, e.to_string()))?;
                return BlobMeta::from_index(&idx).map(Some);
            }
        };
        let size = match zstd::zstd_safe::get_frame_content_size(&header) {
            Ok(Some(s)) if s as usize <= MAX_CHUNK => s,
            _ => {
                // No size in the header: decode it (verifies too).
                match self.read_chunk_blocking(blob)? {
                    Some(b) => b.len() as u64,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(BlobMeta {
            size,
            chunks: vec![ChunkRef {
                digest: *blob,
                size,
            }],
            outboard: Bytes::new(),
        }))
    }

    fn usage_blocking(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for kind in [Kind::Chunk, Kind::BlobIndex, Kind::Directory] {
            let top = self.root.join(kind.dir());
            for fan in read_dir_names(&top)? {
                let dir = top.join(&fan);
                for name in read_dir_names(&dir)? {
                    if name.starts_with(TMP_PREFIX) {
                        continue;
                    }
                    let path = dir.join(&name);
                    let meta = match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(StoreError::io(format!("stat {}", path.display()), e))
                        }
                    };
                    u.stored_bytes += meta.len();
                    match kind {
                        Kind::Chunk => {
                            u.chunks += 1;
                            let mut header = [0u8; 18];
                            let n = std::fs::File::open(&path)
                                .and_then(|mut f| read_up_to(&mut f, &mut header))
                                .unwrap_or(0);
                            if let Ok(Some(s)) =
                                zstd::zstd_safe::get_frame_content_size(&header[..n])
                            {
                                u.chunk_bytes += s;
                            }
                        }
                        Kind::BlobIndex => u.blob_indexes += 1,
                        Kind::Directory => u.directories += 1,
                    }
                }
            }
        }
        self.packs.refresh(false)?;
        for kind in Kind::ALL {
            for (e, _) in self.packs.objects(kind) {
                u.stored_bytes += e.len as u64;
                match kind {
                    Kind::Chunk => {
                        u.chunks += 1;
                        let header = self.read_packed(kind, &e.digest, Some(18))?;
                        if let Ok(Some(s)) = zstd::zstd_safe::get_frame_content_size(
                            header.as_deref().unwrap_or(&[]),
                        ) {
                            u.chunk_bytes += s;
                        }
                    }
                    Kind::BlobIndex => u.blob_indexes += 1,
                    Kind::Directory => u.directories += 1,
                }
            }
        }
        u.roots = read_dir_names(&self.root.join("roots"))?
            .iter()
            .filter(|n| !n.starts_with(TMP_PREFIX))
            .count() as u64;
        Ok(u)
    }
}

/// Refreshes a file's mtime; false if it does not exist. One utimensat both tests existence
/// and refreshes the time.
fn touch(path: &Path) -> Result<bool> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| StoreError::Backend(format!("{} contains NUL", path.display())))?;
    // SAFETY: `c` is a valid NUL-terminated path; a null `times` means "now".
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        ErrorKind::NotFound => Ok(false),
        _ => Err(StoreError::io(format!("touching {}", path.display()), e)),
    }
}

/// A file's mtime, `None` if it does not exist.
fn modified(p: &Path) -> Result<Option<SystemTime>> {
    match std::fs::metadata(p) {
        Ok(m) => Ok(Some(m.modified().unwrap_or(SystemTime::now()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(format!("stat {}", p.display()), e)),
    }
}

fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("removing {}", p.display()), e)),
    }
}

/// Checks an object's stored bytes as a read would.
fn verify_stored(kind: Kind, digest: &B3Digest, raw: &[u8]) -> Result<()> {
    match kind {
        Kind::Chunk => decode_chunk(digest, raw).map(drop),
        Kind::Directory => {
            check_digest(kind, digest, raw)?;
            Directory::decode_valid(raw)
                .map(drop)
                .map_err(|e| StoreError::corrupt("directory", digest, e.to_string()))
        }
        Kind::BlobIndex => BlobIndex::decode_valid(raw)
            .map(drop)
            .map_err(|e| StoreError::corrupt("blob index", digest, e.to_string())),
    }
}

fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Names in a directory (empty if it does not exist).
fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        if let Ok(n) = e.file_name().into_string() {
            names.push(n);
        }
    }
    names.sort();
    Ok(names)
}

#[async_trait]
impl BlobService for LocalStore {
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        let (s, d) = (self.clone(), *blob);
        blocking(move || s.stat_blocking(&d)).await
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let (s, d) = (self.clone(), *chunk);
        blocking(move || s.read_chunk_blocking(&d)).await
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        let (s, d) = (self.clone(), *chunk);
        blocking(move || s.object_exists(Kind::Chunk, &d)).await
    }

    /// Reads the batch in groups of about [`BATCH_GROUP_BYTES`], each on one blocking
    /// thread: a page-cache read and decompression is shorter than waking a thread per chunk.
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        let mut groups: Vec<Vec<ChunkRef>> = Vec::new();
        let mut bytes = u64::MAX;
        for c in chunks {
            if bytes >= BATCH_GROUP_BYTES {
                groups.push(Vec::new());
                bytes = 0;
            }
            bytes += c.size;
            if let Some(g) = groups.last_mut() {
                g.push(c);
            }
        }
        let tasks = groups.into_iter().map(|group| {
            let (s, sink) = (self.clone(), sink.clone());
            tokio::task::spawn_blocking(move || {
                for c in group {
                    sink(c.digest, s.read_chunk_blocking(&c.digest));
                }
            })
        });
        // A group that panicked leaves its chunks unanswered; the caller fails those.
        futures::future::join_all(tasks).await;
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        let s = self.clone();
        blocking(move || s.put_chunk_blocking(&digest, &data)).await
    }

    fn put_chunk_blocking(&self, digest: &B3Digest, data: &[u8]) -> Result<()> {
        // The write itself, on the calling thread (the inherent method).
        LocalStore::put_chunk_blocking(self, digest, data)
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        index.validate()?;
        let s = self.clone();
        let bytes = index.encode_sealed();
        blocking(move || s.stage(Kind::BlobIndex, &blob, &bytes)).await
    }

    async fn flush(&self) -> Result<()> {
        let s = self.clone();
        blocking(move || s.flush_blocking()).await
    }
}

#[async_trait]
impl DirectoryService for LocalStore {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || s.get_dir_blocking(&d)).await
    }

    async fn get_many(&self, digests: Vec<B3Digest>) -> Vec<Result<Option<Directory>>> {
        let n = digests.len();
        let s = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            digests.iter().map(|d| s.get_dir_blocking(d)).collect()
        });
        match read.await {
            Ok(v) => v,
            Err(e) => (0..n)
                .map(|_| Err(StoreError::Backend(format!("directory read task: {e}"))))
                .collect(),
        }
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        dir.validate()?;
        check_children(self, dir).await?;
        let bytes = dir.encode_canonical();
        let digest = B3Digest::of(&bytes);
        let s = self.clone();
        blocking(move || s.stage(Kind::Directory, &digest, &bytes)).await?;
        Ok(digest)
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || s.object_exists(Kind::Directory, &d)).await
    }

    async fn flush(&self) -> Result<()> {
        let s = self.clone();
        blocking(move || s.flush_blocking()).await
    }
}

#[async_trait]
impl RootService for LocalStore {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        let path = self.root_path(name)?;
        let name = name.to_string();
        blocking(move || {
            let Some(raw) = read_root_file(&path)? else {
                return Ok(None);
            };
            super::decode_root(&name, &raw).map(Some)
        })
        .await
    }

    async fn put(&self, root: &RootRecord) -> Result<()> {
        let path = self.root_path(&root.name)?;
        let bytes = root.encode();
        let s = self.clone();
        // Everything the root refers to is durable and in place before the root is.
        blocking(move || {
            s.flush_blocking()?;
            write_atomic(&path, &bytes, true)
        })
        .await
    }

    async fn put_many(&self, roots: &[RootRecord]) -> Vec<Result<()>> {
        let s = self.clone();
        let roots = roots.to_vec();
        let n = roots.len();
        let done = blocking(move || {
            s.flush_blocking()?;
            Ok(roots
                .iter()
                .map(|r| write_atomic(&s.root_path(&r.name)?, &r.encode(), true))
                .collect::<Vec<_>>())
        })
        .await;
        match done {
            Ok(v) => v,
            Err(e) => (0..n)
                .map(|_| Err(StoreError::Backend(e.to_string())))
                .collect(),
        }
    }

    async fn list(&self) -> Result<Vec<String>> {
        let dir = self.root.join("roots");
        blocking(move || {
            Ok(read_dir_names(&dir)?
                .into_iter()
                .filter(|n| !n.starts_with(TMP_PREFIX))
                .collect())
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let path = self.root_path(name)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(format!("removing {}", path.display()), e)),
        })
        .await
    }
}

impl LocalStore {
    /// Removes a pack without an index or an index without its pack (an interrupted commit
    /// or gc), older than `cutoff`.
    fn sweep_orphan_packs(&self, cutoff: SystemTime) -> Result<u64> {
        let dir = self.packs.dir();
        let names = read_dir_names(dir)?;
        let have: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut n = 0;
        for name in &names {
            let (id, other) = if let Some(id) = name.strip_suffix(".pack") {
                (id, format!("{id}.idx"))
            } else if let Some(id) = name.strip_suffix(".idx") {
                (id, format!("{id}.pack"))
            } else {
                continue;
            };
            if !pack::is_id(id) || have.contains(other.as_str()) {
                continue;
            }
            let p = dir.join(name);
            if modified(&p)?.is_some_and(|t| t < cutoff) {
                remove_if_present(&p)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn list_blocking(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let top = self.root.join(kind.dir());
        let mut out = Vec::new();
        for fan in read_dir_names(&top)? {
            let dir = top.join(&fan);
            for name in read_dir_names(&dir)? {
                let Ok(digest) = name.parse::<B3Digest>() else {
                    continue; // temp files and strangers
                };
                let path = dir.join(&name);
                let meta = match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(format!("stat {}", path.display()), e)),
                };
                out.push(ObjectInfo {
                    kind,
                    digest,
                    stored_bytes: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        // Packed objects carry their pack's time: a put that reuses one refreshes the pack.
        self.packs.refresh(true)?;
        if let Some((id, reason)) = self.packs.bad().into_iter().next() {
            return Err(StoreError::Corrupt {
                what: "pack index",
                digest: id,
                reason,
            });
        }
        let loose: std::collections::HashSet<B3Digest> = out.iter().map(|o| o.digest).collect();
        let mut times: HashMap<String, SystemTime> = HashMap::new();
        for (e, id) in self.packs.objects(kind) {
            if loose.contains(&e.digest) {
                continue;
            }
            let modified = match times.get(&id) {
                Some(t) => *t,
                None => {
                    let t = std::fs::metadata(self.packs.pack_path(&id))
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::now());
                    times.insert(id, t);
                    t
                }
            };
            out.push(ObjectInfo {
                kind,
                digest: e.digest,
                stored_bytes: e.len as u64,
                modified,
            });
        }
        Ok(out)
    }

    /// Marks a packed object for removal at this gc's sweep, if its pack is older than
    /// `cutoff`. Returns whether it was marked.
    fn mark_packed(&self, kind: Kind, digest: &B3Digest, cutoff: SystemTime) -> Result<bool> {
        let Some(path) = self.packs.path_of(kind, digest) else {
            return Ok(false);
        };
        let old = match modified(&path)? {
            Some(t) => t < cutoff,
            None => false,
        };
        if old {
            self.pending
                .lock()
                .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?
                .insert((kind, *digest), cutoff);
        }
        Ok(old)
    }

    /// Rewrites every pack holding one of `dead` without it (see [`Self::rewrite_packs`]).
    /// Returns how many objects were removed.
    fn repack(
        &self,
        dead: &std::collections::HashSet<(Kind, B3Digest)>,
        cutoff: Option<SystemTime>,
    ) -> Result<u64> {
        self.packs.refresh(true)?;
        let mut ids = Vec::new();
        for id in self.packs.ids() {
            match self.packs.entries_of(&id) {
                Ok(e) if e.iter().any(|e| dead.contains(&(e.kind, e.digest))) => ids.push(id),
                Ok(_) => {}
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.rewrite_packs(&ids, dead, cutoff)
    }

    /// Merges the packs smaller than [`MERGE_BELOW`] and older than `cutoff` into one, once
    /// there are [`MERGE_AT`] of them: every import (and every root `import-store` records
    /// in a batch) leaves a pack, and a reader opens and indexes each.
    fn merge_small_packs(&self, cutoff: SystemTime) -> Result<usize> {
        self.packs.refresh(true)?;
        let small: Vec<String> = self
            .packs
            .ids()
            .into_iter()
            .filter(|id| {
                std::fs::metadata(self.packs.pack_path(id))
                    .is_ok_and(|m| m.len() < MERGE_BELOW && m.modified().is_ok_and(|t| t < cutoff))
            })
            .collect();
        if small.len() < MERGE_AT {
            return Ok(0);
        }
        self.rewrite_packs(&small, &Default::default(), Some(cutoff))?;
        Ok(small.len())
    }

    /// Writes the objects of packs `ids`, except `dead` ones, into new packs, then removes
    /// the old ones. Every object kept is verified on the way: a corrupt one is dropped,
    /// never copied. With a `cutoff`, a pack modified at or after it is left whole — checked
    /// before copying and again after moving it aside, since a put that reuses an object
    /// refreshes its pack's time (its objects then exist twice; the newer copy is read).
    /// Returns how many `dead` objects were removed.
    fn rewrite_packs(
        &self,
        ids: &[String],
        dead: &std::collections::HashSet<(Kind, B3Digest)>,
        cutoff: Option<SystemTime>,
    ) -> Result<u64> {
        let young = |p: &Path| -> Result<Option<bool>> {
            Ok(match (modified(p)?, cutoff) {
                (None, _) => None,
                (Some(t), Some(c)) => Some(t >= c),
                (Some(_), None) => Some(false),
            })
        };
        let mut writer: Option<PackWriter> = None;
        let mut copied: std::collections::HashSet<(Kind, B3Digest)> = Default::default();
        let mut sources: Vec<(String, u64)> = Vec::new();
        for id in ids {
            let path = self.packs.pack_path(id);
            if young(&path)? != Some(false) {
                continue;
            }
            let entries = match self.packs.entries_of(id) {
                Ok(e) => e,
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
            };
            let mut dropped = 0;
            for e in &entries {
                let key = (e.kind, e.digest);
                if dead.contains(&key) {
                    dropped += 1;
                    continue;
                }
                if !copied.insert(key) {
                    continue;
                }
                let raw = pack::read_at(&file, &path, e)?;
                if let Err(err) = verify_stored(e.kind, &e.digest, &raw) {
                    tracing::warn!("dropping {err} while rewriting pack {id}");
                    continue;
                }
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(PackWriter::new(self.packs.dir(), TMP_PREFIX)?),
                };
                w.append(e.kind, e.digest, &raw)?;
                if w.bytes() >= STAGE_MAX_BYTES {
                    if let Some(full) = writer.take() {
                        full.commit(TMP_PREFIX)?;
                    }
                }
            }
            sources.push((id.clone(), dropped));
        }
        // The copies are durable and indexed before any original goes.
        if let Some(w) = writer.take() {
            if !w.is_empty() {
                w.commit(TMP_PREFIX)?;
            }
        }
        let mut removed = 0;
        for (id, dropped) in sources {
            let path = self.packs.pack_path(&id);
            let aside = self.packs.dir().join(format!("{TMP_PREFIX}gc-{id}.pack"));
            match std::fs::rename(&path, &aside) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("moving {}", path.display()), e)),
            }
            if young(&aside)? == Some(true) {
                std::fs::rename(&aside, &path)
                    .map_err(|e| StoreError::io(format!("restoring {}", path.display()), e))?;
                continue;
            }
            remove_if_present(&self.packs.index_path(&id))?;
            remove_if_present(&aside)?;
            removed += dropped;
        }
        self.packs.refresh(true)?;
        Ok(removed)
    }

    /// Moves the object aside, re-checks its age (a put may have refreshed it in between),
    /// then deletes it or puts it back. A put that touches it after the move finds it gone
    /// and writes it again.
    fn delete_if_older_blocking(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let loose = self.delete_loose_if_older(kind, digest, cutoff)?;
        // A packed copy goes when the sweep rewrites its pack; counted as deleted now (the
        // sweep keeps it after all only if a put reuses it in between).
        let packed = self.mark_packed(kind, digest, cutoff)?;
        Ok(loose || packed)
    }

    fn delete_loose_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let path = self.object_path(kind, digest);
        let young = |p: &Path| -> Result<Option<bool>> {
            match std::fs::metadata(p) {
                Ok(m) => Ok(Some(m.modified().unwrap_or(SystemTime::now()) >= cutoff)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(format!("stat {}", p.display()), e)),
            }
        };
        if young(&path)? != Some(false) {
            return Ok(false);
        }
        let aside = path.with_file_name(format!("{TMP_PREFIX}gc-{}", digest.to_hex()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io(format!("moving {}", path.display()), e)),
        }
        if young(&aside)? == Some(true) {
            std::fs::rename(&aside, &path)
                .map_err(|e| StoreError::io(format!("restoring {}", path.display()), e))?;
            return Ok(false);
        }
        std::fs::remove_file(&aside)
            .map_err(|e| StoreError::io(format!("removing {}", aside.display()), e))?;
        Ok(true)
    }

    fn sweep_temp_blocking(&self, cutoff: SystemTime) -> Result<u64> {
        // The packed objects this gc marked (entries of an earlier, interrupted gc carry
        // another cutoff and are dropped: what they named may be reachable again).
        let dead: std::collections::HashSet<(Kind, B3Digest)> = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?;
            p.drain()
                .filter(|(_, c)| *c == cutoff)
                .map(|(k, _)| k)
                .collect()
        };
        if !dead.is_empty() {
            self.repack(&dead, Some(cutoff))?;
        }
        let merged = self.merge_small_packs(cutoff)?;
        if merged > 0 {
            tracing::info!("merged {merged} small packs");
        }
        let mut n = self.sweep_orphan_packs(cutoff)?;
        let mut dirs = vec![
            self.root.to_path_buf(),
            self.root.join("roots"),
            self.packs.dir().to_path_buf(),
        ];
        for kind in Kind::ALL {
            let top = self.root.join(kind.dir());
            dirs.extend(read_dir_names(&top)?.into_iter().map(|f| top.join(f)));
        }
        for dir in dirs {
            for name in read_dir_names(&dir)? {
                if !name.starts_with(TMP_PREFIX) {
                    continue;
                }
                let p = dir.join(&name);
                let old = std::fs::symlink_metadata(&p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old && std::fs::remove_file(&p).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl Maintenance for LocalStore {
    async fn usage(&self) -> Result<Usage> {
        let s = self.clone();
        blocking(move || s.usage_blocking()).await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let s = self.clone();
        blocking(move || s.list_blocking(kind)).await
    }

    async fn delete_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || s.delete_if_older_blocking(kind, &d, cutoff)).await
    }

    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || {
            remove_if_present(&s.object_path(kind, &d))?;
            if s.packs.contains(kind, &d) {
                s.repack(&[(kind, d)].into_iter().collect(), None)?;
            }
            Ok(())
        })
        .await
    }

    async fn sweep_temp(&self, cutoff: SystemTime) -> Result<u64> {
        let s = self.clone();
        blocking(move || s.sweep_temp_blocking(cutoff)).await
    }

    async fn damage(&self) -> Result<Vec<(String, String)>> {
        let s = self.clone();
        blocking(move || s.damage_blocking()).await
    }

    async fn set_aside(&self, unit: &str) -> Result<()> {
        let (s, unit) = (self.clone(), unit.to_string());
        blocking(move || s.set_aside_blocking(&unit)).await
    }
}

/// Where damaged packs are moved by a repair (not scanned, not deleted).
const DAMAGED_DIR: &str = "damaged";

impl LocalStore {
    fn damage_blocking(&self) -> Result<Vec<(String, String)>> {
        if !self.config.packs {
            return Ok(Vec::new());
        }
        self.packs.refresh(true)?;
        let mut out: Vec<(String, String)> = self
            .packs
            .bad()
            .into_iter()
            .map(|(id, why)| {
                let prefix = format!("pack index {id}: corrupt: ");
                let why = why.strip_prefix(&prefix).unwrap_or(&why).to_string();
                (
                    id,
                    format!("its index is damaged ({why}); the objects it lists are lost"),
                )
            })
            .collect();
        for name in read_dir_names(self.packs.dir())? {
            let Some(id) = name.strip_suffix(".idx") else {
                continue;
            };
            if !pack::is_id(id) || self.packs.pack_path(id).exists() {
                continue;
            }
            let listed = std::fs::read(self.packs.index_path(id))
                .ok()
                .and_then(|raw| pack::decode_index(id, &raw, u64::MAX).ok())
                .map_or_else(
                    || "an unreadable number of".to_string(),
                    |e| e.len().to_string(),
                );
            out.push((
                id.to_string(),
                format!("its pack file is missing ({listed} objects listed in its index are lost)"),
            ));
        }
        out.sort();
        Ok(out)
    }

    fn set_aside_blocking(&self, unit: &str) -> Result<()> {
        if !pack::is_id(unit) {
            return Err(StoreError::Backend(format!(
                "{unit}: not a pack of this store"
            )));
        }
        let aside = self.packs.dir().join(DAMAGED_DIR);
        std::fs::create_dir_all(&aside)
            .map_err(|e| StoreError::io(format!("creating {}", aside.display()), e))?;
        for path in [self.packs.index_path(unit), self.packs.pack_path(unit)] {
            let Some(name) = path.file_name() else {
                continue;
            };
            match std::fs::rename(&path, aside.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(
                        format!("moving {} aside", path.display()),
                        e,
                    ))
                }
            }
        }
        self.packs.refresh(true)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open(dir: &Path) -> LocalStore {
        LocalStore::open_blocking("file://test", dir, StoreConfig::default()).unwrap()
    }

    fn put(s: &LocalStore, data: &[u8]) -> B3Digest {
        let d = B3Digest::of(data);
        s.put_chunk_blocking(&d, data).unwrap();
        d
    }

    fn pack_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join(pack::PACK_DIR))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pack"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_pack_committed_by_another_process_is_found() {
        let d = tempfile::tempdir().unwrap();
        let reader = open(d.path());
        let writer = open(d.path());
        let c = put(&writer, b"written after the reader opened");
        // Unflushed: only the writer sees it.
        assert!(writer.read_chunk_blocking(&c).unwrap().is_some());
        assert!(reader.read_chunk_blocking(&c).unwrap().is_none());
        writer.flush_blocking().unwrap();
        assert_eq!(
            &reader.read_chunk_blocking(&c).unwrap().unwrap()[..],
            b"written after the reader opened"
        );
        assert_eq!(pack_files(d.path()).len(), 1);
        assert!(!d.path().join("chunks").exists(), "nothing loose");
    }

    #[test]
    fn concurrent_puts_flushes_and_rescans_never_lose_an_object() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let other = open(d.path());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rescanner = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.packs.refresh(true).unwrap();
                }
            })
        };
        let workers: Vec<_> = (0..6u32)
            .map(|t| {
                let (s, other) = (s.clone(), other.clone());
                std::thread::spawn(move || {
                    for i in 0..300u32 {
                        let data = format!("thread {t} object {i}");
                        // Half the writers go through a second store handle, as a second
                        // process would.
                        let w = if i % 2 == 0 { &s } else { &other };
                        let c = put(w, data.as_bytes());
                        assert!(s.object_exists(Kind::Chunk, &c).unwrap() || i % 2 == 1);
                        if i % 37 == 0 {
                            w.flush_blocking().unwrap();
                        }
                        let got = w.read_chunk_blocking(&c).unwrap();
                        assert_eq!(got.as_deref(), Some(data.as_bytes()), "{data}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rescanner.join().unwrap();
        s.flush_blocking().unwrap();
        other.flush_blocking().unwrap();
        let fresh = open(d.path());
        for t in 0..6u32 {
            for i in 0..300u32 {
                let data = format!("thread {t} object {i}");
                let c = B3Digest::of(data.as_bytes());
                assert!(fresh.read_chunk_blocking(&c).unwrap().is_some(), "{data}");
            }
        }
    }

    #[test]
    fn gc_rewrites_a_pack_without_its_garbage_unless_it_was_reused() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let keep = put(&s, &[7u8; 5000]);
        let noise: Vec<u8> = (0..20_000).map(|_| rand::random::<u8>()).collect();
        let junk = put(&s, &noise);
        s.flush_blocking().unwrap();
        let before = std::fs::metadata(&pack_files(d.path())[0]).unwrap().len();

        // A pack reused after the gc's cutoff is left whole.
        let cutoff = SystemTime::now() - Duration::from_secs(60);
        assert!(!s
            .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
            .unwrap());
        s.sweep_temp_blocking(cutoff).unwrap();
        assert!(s.read_chunk_blocking(&junk).unwrap().is_some());

        // An old pack loses exactly its garbage; what stays reads through a reader that
        // opened before the rewrite.
        let reader = open(d.path());
        let cutoff = SystemTime::now() + Duration::from_secs(60);
        assert!(s
            .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
            .unwrap());
        // An interrupted gc's marks are not acted on by another gc's sweep.
        s.sweep_temp_blocking(cutoff + Duration::from_secs(1))
            .unwrap();
        assert!(s.read_chunk_blocking(&junk).unwrap().is_some());
        assert!(s
            .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
            .unwrap());
        s.sweep_temp_blocking(cutoff).unwrap();
        assert!(s.read_chunk_blocking(&junk).unwrap().is_none());
        assert!(reader.read_chunk_blocking(&keep).unwrap().is_some());
        let packs = pack_files(d.path());
        assert_eq!(packs.len(), 1);
        let after = std::fs::metadata(&packs[0]).unwrap().len();
        assert!(after < before - 15_000, "{before} -> {after}");
        let listed = s.list_blocking(Kind::Chunk).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].digest, keep);

        // Repair's remove drops one object at once, whatever its age.
        s.repack(&[(Kind::Chunk, keep)].into_iter().collect(), None)
            .unwrap();
        assert!(s.read_chunk_blocking(&keep).unwrap().is_none());
    }

    #[test]
    fn gc_merges_many_small_packs_into_one() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        let mut all = Vec::new();
        for i in 0..(MERGE_AT + 4) {
            all.push(put(&s, format!("object {i}").as_bytes()));
            s.flush_blocking().unwrap();
        }
        assert_eq!(pack_files(d.path()).len(), MERGE_AT + 4);
        // Packs younger than the cutoff are not merged.
        s.sweep_temp_blocking(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        assert_eq!(pack_files(d.path()).len(), MERGE_AT + 4);
        let reader = open(d.path());
        s.sweep_temp_blocking(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        assert_eq!(pack_files(d.path()).len(), 1);
        for c in &all {
            assert!(s.read_chunk_blocking(c).unwrap().is_some());
            // A reader that indexed the old packs finds them gone and rescans.
            assert!(reader.read_chunk_blocking(c).unwrap().is_some());
        }
        assert_eq!(s.list_blocking(Kind::Chunk).unwrap().len(), all.len());
    }

    #[test]
    fn a_corrupt_pack_index_is_reported_by_name() {
        let d = tempfile::tempdir().unwrap();
        let s = open(d.path());
        put(&s, b"x");
        s.flush_blocking().unwrap();
        let idx = pack_files(d.path())[0].with_extension("idx");
        let mut raw = std::fs::read(&idx).unwrap();
        raw[20] ^= 1;
        std::fs::write(&idx, raw).unwrap();
        let e = open(d.path())
            .list_blocking(Kind::Chunk)
            .unwrap_err()
            .to_string();
        let id = idx.file_stem().unwrap().to_str().unwrap();
        assert!(e.contains(id) && e.contains("checksum mismatch"), "{e}");
    }
}
