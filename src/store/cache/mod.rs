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
    BlobMeta, BlobService, ChunkRef, ChunkSink, DirectoryService, Maintenance, ObjectInfo,
    ObjectKind as Kind, Result, RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};

mod disk;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use disk::*;
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
    let p = cfg_path.clone();
    let remembered = blocking(move || std::fs::read_to_string(p))
        .await?
        .ok()
        .and_then(|t| StoreConfig::from_toml(&t).ok());
    let inner = if url.starts_with("s3://") {
        let indexes = store_dir.join("pack-indexes");
        super::s3::S3Store::open_with(url, StoreConfig::default(), remembered, Some(indexes))
            .await?
    } else {
        super::open(url).await?
    };
    if remembered != Some(inner.config) {
        let (c, d, toml) = (cache.clone(), store_dir.clone(), inner.config.to_toml());
        blocking(move || {
            std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
            c.write_file(&cfg_path, toml.as_bytes())
        })
        .await??;
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
    /// A batch: hits from the cache, misses from the store (exactly as asked if `exact`),
    /// each miss kept as it arrives.
    async fn read_batch(&self, chunks: Vec<ChunkRef>, sink: ChunkSink, exact: bool) {
        let (c, wanted) = (self.cache.clone(), chunks.clone());
        let looked = blocking(move || {
            wanted
                .into_iter()
                .map(|ch| (ch, c.get_chunk(&ch.digest)))
                .collect::<Vec<_>>()
        })
        .await
        // A failed lookup sends the whole batch to the store.
        .unwrap_or_else(|_| chunks.into_iter().map(|ch| (ch, None)).collect());
        let mut misses = Vec::new();
        for (ch, hit) in looked {
            match hit {
                Some(b) => {
                    bump(&self.cache.counters.chunk_hits, 1);
                    sink(ch.digest, Ok(Some(b)));
                }
                None => misses.push(ch),
            }
        }
        if misses.is_empty() {
            return;
        }
        bump(&self.cache.counters.chunk_misses, misses.len() as u64);
        let (cache, outer) = (self.cache.clone(), sink.clone());
        let keep: ChunkSink = Arc::new(move |digest, r: Result<Option<Bytes>>| {
            if let Ok(Some(b)) = &r {
                bump(&cache.counters.fetched_bytes, b.len() as u64);
                // Written on the calling thread (a backend's decoding thread, or a worker for a
                // chunk fetched alone): one small page-cache write, not worth a hand-off.
                cache.write_entry(&cache.entry_path(Kind::Chunk, &digest), b);
            }
            outer(digest, r);
        });
        if exact {
            self.inner.blobs.read_chunks_exact(misses, keep).await
        } else {
            self.inner.blobs.read_chunks(misses, keep).await
        }
    }

    fn root_path(&self, name: &str) -> Result<PathBuf> {
        validate_root_name(name)?;
        Ok(self.store_dir.join("roots").join(name))
    }

    /// Keeps the record last read of a root (in the background: best effort, off the runtime).
    async fn remember_root(&self, root: &RootRecord) {
        let Ok(p) = self.root_path(&root.name) else {
            return;
        };
        let (cache, raw) = (self.cache.clone(), root.encode());
        let done = blocking(move || {
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            cache.write_file(&p, &raw)
        })
        .await;
        match done {
            Ok(Err(e)) | Err(e) => tracing::warn!("cache: {e}"),
            Ok(Ok(())) => {}
        }
    }

    async fn forget_root(&self, name: &str) {
        if let Ok(p) = self.root_path(name) {
            let _ = blocking(move || std::fs::remove_file(p)).await;
        }
    }

    async fn remembered_root(&self, name: &str) -> Option<RootRecord> {
        let p = self.root_path(name).ok()?;
        let raw = blocking(move || std::fs::read(p)).await.ok()?.ok()?;
        RootRecord::decode(&raw).ok().filter(|r| r.name == name)
    }

    async fn forget_entry(&self, kind: Kind, digest: &B3Digest) {
        let p = self.cache.entry_path(kind, digest);
        let _ = blocking(move || std::fs::remove_file(p)).await;
    }
}

#[async_trait]
impl BlobService for Cached {
    fn remote(&self) -> bool {
        self.inner.blobs.remote()
    }

    fn read_memory_bytes(&self) -> usize {
        self.inner.blobs.read_memory_bytes()
    }

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

    /// Hits are served from the cache; the misses go to the store as one batch (so a backend
    /// that reads batches with few requests still does), each kept as it arrives.
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        self.read_batch(chunks, sink, false).await
    }

    async fn read_chunks_exact(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        self.read_batch(chunks, sink, true).await
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
                self.remember_root(&r).await;
                Ok(Some(r))
            }
            Ok(None) => {
                self.forget_root(name).await;
                Ok(None)
            }
            Err(e) => match self.remembered_root(name).await {
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
        self.remember_root(root).await;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        match self.inner.roots.list().await {
            Ok(names) => Ok(names),
            Err(e) => {
                let dir = self.store_dir.join("roots");
                let listed = blocking(move || {
                    std::fs::read_dir(&dir).map(|rd| {
                        let mut names: Vec<String> = rd
                            .flatten()
                            .filter_map(|e| e.file_name().into_string().ok())
                            .collect();
                        names.sort();
                        names
                    })
                })
                .await?;
                let Ok(names) = listed else {
                    return Err(e);
                };
                tracing::warn!("{e}; listing the roots last read into the cache");
                Ok(names)
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let r = self.inner.roots.delete(name).await?;
        self.forget_root(name).await;
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
            self.forget_entry(kind, digest).await;
        }
        Ok(r)
    }

    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        self.forget_entry(kind, digest).await;
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
