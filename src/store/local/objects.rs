//! Reading objects (loose files and packs), the blob and directory services of the local store.

#[allow(unused_imports)]
use super::*;

pub(super) use crate::store::codec::{check_digest, Stored};

impl LocalStore {
    /// Opens an object in place or, if staged by this process, its temp file.
    pub(super) fn open_object(&self, path: &Path) -> Result<Option<std::fs::File>> {
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

    pub(super) fn read_loose(&self, path: &Path, prefix: Option<usize>) -> Result<Option<Vec<u8>>> {
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

    /// An object's bytes (for one stored alone, the first `prefix` bytes only, if given),
    /// from a pack, this process's unflushed pack, or its own file; `None` if absent.
    pub(super) fn read_object_bytes(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Stored>> {
        if let Some(b) = self.read_packed(kind, digest, prefix)? {
            return Ok(Some(b));
        }
        if self.config.packs {
            let st = self.lock_staged()?;
            if let Some(w) = &st.pack {
                if let Some(b) = w.read(kind, digest)? {
                    return Ok(Some(b));
                }
            }
        }
        if let Some(b) = self.read_loose(&self.object_path(kind, digest), prefix)? {
            return Ok(Some(Stored::Alone(b)));
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
    pub(super) fn read_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Stored>> {
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
    pub(super) fn reuse(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        if self.config.packs {
            if self.lock_staged()?.packed.contains(&(kind, *digest)) {
                return Ok(true);
            }
            return self.touch_packed(kind, digest);
        }
        let path = self.object_path(kind, digest);
        if self.lock_staged()?.objects.contains_key(&path) {
            return Ok(true);
        }
        touch(&path)
    }

    /// True if a pack holding the object is still there (its time is refreshed). A pack a gc
    /// has removed since this process indexed it is not: the packs are looked at again, since
    /// the gc may have copied the object into a new one; if none has it, the caller writes
    /// it again rather than trust the stale index.
    pub(super) fn touch_packed(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        let Some(path) = self.packs.path_of(kind, digest) else {
            return Ok(false);
        };
        if touch(&path)? {
            return Ok(true);
        }
        self.packs.refresh(true)?;
        match self.packs.path_of(kind, digest) {
            Some(path) => touch(&path),
            None => Ok(false),
        }
    }

    pub(super) fn object_exists(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        if self.packs.contains(kind, digest) {
            return Ok(true);
        }
        let path = self.object_path(kind, digest);
        {
            let st = self.lock_staged()?;
            if st.packed.contains(&(kind, *digest)) || st.objects.contains_key(&path) {
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
}

impl LocalStore {
    /// Stores a chunk from a blocking context (the import pipeline's worker threads).
    pub fn put_chunk_blocking(&self, digest: &B3Digest, data: &[u8]) -> Result<()> {
        self.stage(Kind::Chunk, digest, data)
    }

    pub(super) fn read_chunk_blocking(&self, digest: &B3Digest) -> Result<Option<Bytes>> {
        let Some(stored) = self.read_object_bytes(Kind::Chunk, digest, None)? else {
            return Ok(None);
        };
        stored.into_chunk(digest).map(Some)
    }

    pub(super) fn read_object(&self, kind: Kind, digest: &B3Digest) -> Result<Option<Vec<u8>>> {
        let Some(stored) = self.read_object_bytes(kind, digest, None)? else {
            return Ok(None);
        };
        let raw = stored.into_protobuf();
        check_digest(kind, digest, &raw)?;
        Ok(Some(raw))
    }

    pub(super) fn get_dir_blocking(&self, d: &B3Digest) -> Result<Option<Directory>> {
        let Some(raw) = self.read_object(Kind::Directory, d)? else {
            return Ok(None);
        };
        Directory::decode_valid(&raw)
            .map(Some)
            .map_err(|e| StoreError::corrupt("directory", d, e.to_string()))
    }

    pub(super) fn stat_blocking(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        if *blob == empty_blob() {
            return Ok(Some(BlobMeta::default()));
        }
        // Most blobs are one chunk, so look for that first. A chunk stored under the blob's
        // digest holds exactly the blob's bytes, so the two looks cannot disagree.
        // In a packed store both looks are in memory: skip the chunk look (and its
        // rescan of the packs on a miss) when the index is known.
        // (At a glance: a blob with an index is not also one chunk under its own digest.)
        let header =
            if self.packs.seen(Kind::BlobIndex, blob) && !self.packs.seen(Kind::Chunk, blob) {
                None
            } else if let Some(m) = self.packs.locate(Kind::Chunk, blob).and_then(|e| e.member) {
                // A grouped chunk's size is in the index.
                return Ok(Some(one_chunk_blob(blob, m.len as u64)));
            } else {
                self.read_object_bytes(Kind::Chunk, blob, Some(18))?
            };
        let header = match header {
            Some(Stored::Alone(h)) => h,
            Some(Stored::Plain(p)) => return Ok(Some(one_chunk_blob(blob, p.len() as u64))),
            None => {
                // The index is named by the blob digest, which is not the hash of the index
                // bytes, so it is validated structurally here; chunk reads verify the bytes.
                let Some(raw) = self.read_object_bytes(Kind::BlobIndex, blob, None)? else {
                    return Ok(None);
                };
                let raw = raw.into_protobuf();
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
        Ok(Some(one_chunk_blob(blob, size)))
    }
}

/// A blob stored as one chunk under its own digest.
fn one_chunk_blob(blob: &B3Digest, size: u64) -> BlobMeta {
    BlobMeta {
        size,
        chunks: vec![ChunkRef {
            digest: *blob,
            size,
        }],
        outboard: Bytes::new(),
    }
}

/// Refreshes a file's mtime; false if it does not exist. One utimensat both tests existence
/// and refreshes the time.
pub(super) fn touch(path: &Path) -> Result<bool> {
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
pub(super) fn modified(p: &Path) -> Result<Option<SystemTime>> {
    match std::fs::metadata(p) {
        Ok(m) => Ok(Some(m.modified().unwrap_or(SystemTime::now()))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(format!("stat {}", p.display()), e)),
    }
}

pub(super) fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(format!("removing {}", p.display()), e)),
    }
}

pub(super) fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
pub(super) fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
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
    fn read_memory_bytes(&self) -> usize {
        // The packs' groups and frames (a store without packs holds none, but may get packs
        // from another process's import at any time).
        crate::store::pack::READ_MEMORY_BYTES
    }

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
    /// Chunks of one compression group stay on one thread, which decompresses it once.
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        let mut groups: Vec<Vec<ChunkRef>> = Vec::new();
        let mut bytes = u64::MAX;
        let mut frame = None;
        for c in chunks {
            let this = self
                .packs
                .locate(Kind::Chunk, &c.digest)
                .filter(|e| e.member.is_some())
                .map(|e| e.offset);
            let same = this.is_some() && this == frame;
            frame = this;
            if bytes >= BATCH_GROUP_BYTES && !same {
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
