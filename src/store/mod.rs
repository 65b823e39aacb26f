//! The three store services (DESIGN.md §3) and the URL that picks their backend.
//!
//! Contracts, for every backend:
//! - Everything a service returns has been verified: chunk bytes hash to their digest,
//!   directories decode, validate and hash to their digest. Corruption is
//!   [`StoreError::Corrupt`], never wrong data.
//! - `Ok(None)` means absent; an error means the backend could not answer.
//! - Puts are idempotent: putting an object that exists succeeds and stores one copy.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::castore::{B3Digest, BlobIndex, Directory, ModelError, RootRecord};
use crate::chunking::ChunkParams;

pub mod blob_writer;
pub mod cache;
pub mod codec;
pub mod config;
pub mod layout;
pub mod local;
pub mod memory;
pub mod outboard;
pub mod pack;
pub mod reader;
pub mod remote;
pub mod s3;

pub use config::StoreConfig;
pub use reader::BlobReader;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {digest}: corrupt: {reason}")]
    Corrupt {
        what: &'static str,
        digest: String,
        reason: String,
    },
    #[error("{what} {digest} not found")]
    NotFound { what: &'static str, digest: String },
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store {url}: {reason}")]
    Config { url: String, reason: String },
    #[error("{0}")]
    Backend(String),
    #[error("{what} timed out after {secs:.1}s")]
    Timeout { what: String, secs: f64 },
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
    pub fn corrupt(what: &'static str, digest: &B3Digest, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what,
            digest: digest.to_hex(),
            reason: reason.into(),
        }
    }
    pub fn not_found(what: &'static str, digest: &B3Digest) -> Self {
        StoreError::NotFound {
            what,
            digest: digest.to_hex(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One chunk of a blob: its digest and uncompressed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub digest: B3Digest,
    pub size: u64,
}

/// What `stat` tells about a blob: its size and the chunks that make it, in order.
/// A single-chunk blob lists itself as its one chunk; an empty blob lists none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlobMeta {
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
    /// The blob's outboard (see [`outboard`]): empty for a blob of one chunk or one block,
    /// and for blob indexes written before outboards.
    pub outboard: Bytes,
}

impl BlobMeta {
    pub fn from_index(idx: &BlobIndex) -> Result<Self> {
        idx.validate()?;
        let chunks = idx
            .chunks
            .iter()
            .map(|c| {
                Ok(ChunkRef {
                    digest: B3Digest::try_from(&c.digest[..])?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(BlobMeta {
            size: idx.size,
            chunks,
            outboard: idx.outboard.clone(),
        })
    }

    pub fn to_index(&self) -> BlobIndex {
        BlobIndex {
            chunks: self
                .chunks
                .iter()
                .map(|c| crate::castore::proto::blob_index::Chunk {
                    digest: Bytes::copy_from_slice(c.digest.as_bytes()),
                    size: c.size,
                })
                .collect(),
            size: self.size,
            outboard: self.outboard.clone(),
            checksum: Bytes::new(),
        }
    }
}

/// The digest of the empty blob: present in every store without being written.
pub fn empty_blob() -> B3Digest {
    B3Digest::of(b"")
}

/// Receives each chunk of a [`BlobService::read_chunks`] batch as it is read.
pub type ChunkSink = Arc<dyn Fn(B3Digest, Result<Option<Bytes>>) + Send + Sync>;

/// Chunks read at once by the default [`BlobService::read_chunks`].
const BATCH_CONCURRENCY: usize = 16;

/// Chunks and blob indexes.
#[async_trait]
pub trait BlobService: Send + Sync {
    /// Size and chunk list of a blob; `Ok(None)` if the blob is absent.
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>>;

    /// The verified bytes of one chunk; `Ok(None)` if absent.
    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>>;

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool>;

    /// Reads a batch of chunks, handing each to `sink` as soon as it is read (in any order),
    /// with the same contract as [`BlobService::read_chunk`]. The default reads them
    /// concurrently; a backend whose reads are short blocking calls reads a batch on a few
    /// threads instead, saving a thread hand-off per chunk.
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        use futures::StreamExt;
        futures::stream::iter(chunks)
            .for_each_concurrent(BATCH_CONCURRENCY, |c| {
                let sink = sink.clone();
                async move { sink(c.digest, self.read_chunk(&c.digest).await) }
            })
            .await
    }

    /// Stores one chunk. `digest` must be `blake3(data)`; a backend that does not trust its
    /// caller re-hashes and refuses a mismatch.
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()>;

    /// Stores one chunk on the calling (blocking) thread, if the backend can do that without
    /// waiting on the network; `None` if it cannot (the caller uses `put_chunk`). Saves the
    /// two thread hand-offs of an async put for each small file an import reads.
    fn put_chunk_here(&self, _digest: &B3Digest, _data: &[u8]) -> Option<Result<()>> {
        None
    }

    /// Records the chunk list of a multi-chunk blob. The chunks must already be stored.
    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()>;

    async fn has(&self, blob: &B3Digest) -> Result<bool> {
        Ok(self.stat(blob).await?.is_some())
    }

    /// Makes every object put so far durable and visible to other processes. A root put
    /// flushes first, so only tree digests printed without a root need this.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Directory nodes.
#[async_trait]
pub trait DirectoryService: Send + Sync {
    /// A verified, validated directory; `Ok(None)` if absent.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>>;

    /// Validates and stores one directory, returning its digest. Its child directories
    /// must already be stored (leaves first) and agree with their recorded sizes.
    async fn put(&self, dir: &Directory) -> Result<B3Digest>;

    async fn has(&self, digest: &B3Digest) -> Result<bool>;

    /// Several directories, in the order asked, each as [`DirectoryService::get`] gives it.
    /// The default asks concurrently; a backend whose reads are short blocking calls reads
    /// them on one thread, saving a thread hand-off per directory.
    async fn get_many(&self, digests: Vec<B3Digest>) -> Vec<Result<Option<Directory>>> {
        use futures::StreamExt;
        futures::stream::iter(digests)
            .map(|d| async move { self.get(&d).await })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    /// As [`BlobService::flush`].
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Named roots.
#[async_trait]
pub trait RootService: Send + Sync {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>>;
    /// Creates or atomically replaces the root of that name.
    async fn put(&self, root: &RootRecord) -> Result<()>;

    /// Records several roots, one result each. A local store makes everything they refer to
    /// durable once for the lot (one pack rather than one per root).
    async fn put_many(&self, roots: &[RootRecord]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(roots.len());
        for r in roots {
            out.push(self.put(r).await);
        }
        out
    }
    /// All root names, sorted.
    async fn list(&self) -> Result<Vec<String>>;
    /// Removes a root; `Ok(false)` if there was none.
    async fn delete(&self, name: &str) -> Result<bool>;
}

/// Decodes the record stored for root `name`, refusing one that names another root: the
/// one root-record check every backend applies.
pub fn decode_root(name: &str, raw: &[u8]) -> Result<RootRecord> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "root",
        digest: name.to_string(),
        reason,
    };
    let r = RootRecord::decode(raw).map_err(|e| corrupt(e.to_string()))?;
    if r.name != name {
        return Err(corrupt(format!("record names itself {:?}", r.name)));
    }
    Ok(r)
}

/// Checks a directory's child entries against the children already in the store.
pub async fn check_children(dirs: &dyn DirectoryService, dir: &Directory) -> Result<()> {
    for entry in &dir.directories {
        let d = B3Digest::try_from(&entry.digest[..])?;
        let child = dirs
            .get(&d)
            .await?
            .ok_or_else(|| StoreError::not_found("child directory", &d))?;
        Directory::check_child(entry, &child)?;
    }
    Ok(())
}

/// The kinds of content-addressed object a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Chunk,
    BlobIndex,
    Directory,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 3] = [Self::Chunk, Self::BlobIndex, Self::Directory];

    /// Directory (or key prefix) holding objects of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Chunk => "chunks",
            Self::BlobIndex => "blobs",
            Self::Directory => "dirs",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Self::Chunk => "chunk",
            Self::BlobIndex => "blob index",
            Self::Directory => "directory",
        }
    }
}

/// One stored object, as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub kind: ObjectKind,
    pub digest: B3Digest,
    /// Bytes as stored (compressed, for chunks).
    pub stored_bytes: u64,
    /// Last write or reuse by an import (protects it from a concurrent gc).
    pub modified: std::time::SystemTime,
}

/// Counters a backend can report about itself, for `granary info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub chunks: u64,
    pub blob_indexes: u64,
    pub directories: u64,
    pub roots: u64,
    /// Uncompressed bytes of all chunks.
    pub chunk_bytes: u64,
    /// Bytes the store's objects occupy where they are kept.
    pub stored_bytes: u64,
}

/// Operations over all objects of a backend (counting now; listing and sweeping for gc).
///
/// Garbage collection relies on one rule every backend keeps: a put that finds its object
/// already stored refreshes the object's `modified` time, so an object an import is about to
/// refer to always looks young to a concurrent gc.
#[async_trait]
pub trait Maintenance: Send + Sync {
    async fn usage(&self) -> Result<Usage>;

    /// Every stored object of one kind.
    async fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;

    /// Deletes an object unless it was modified at or after `cutoff` (checked atomically with
    /// respect to a concurrent put). Returns whether it was deleted.
    async fn delete_if_older(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
        cutoff: std::time::SystemTime,
    ) -> Result<bool>;

    /// Deletes an object unconditionally (to replace a corrupt one during repair).
    async fn remove(&self, kind: ObjectKind, digest: &B3Digest) -> Result<()>;

    /// Removes leftovers of interrupted writes older than `cutoff`; returns how many.
    async fn sweep_temp(&self, cutoff: std::time::SystemTime) -> Result<u64>;
    /// Service counters worth showing in `granary info` (a daemon's requests, bytes, ...).
    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }

    /// Storage units damaged as a whole (a pack whose index cannot be read, whose index
    /// lists bytes past its end, or whose pack file is gone), each with why. Their objects
    /// read as absent; `verify` reports both.
    async fn damage(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Moves a damaged storage unit out of the store's view (kept aside, not deleted), once
    /// what it held is restored elsewhere.
    async fn set_aside(&self, unit: &str) -> Result<()> {
        Err(StoreError::Backend(format!(
            "{unit}: this store has no storage units to set aside"
        )))
    }
}

/// A whole store: the three services and the parameters it was created with.
#[derive(Clone)]
pub struct Store {
    pub url: String,
    pub config: StoreConfig,
    pub blobs: Arc<dyn BlobService>,
    pub dirs: Arc<dyn DirectoryService>,
    pub roots: Arc<dyn RootService>,
    /// Whole-store operations, where the backend can list its objects.
    pub maintenance: Option<Arc<dyn Maintenance>>,
}

impl Store {
    pub fn params(&self) -> ChunkParams {
        self.config.chunking
    }

    /// Makes everything put so far durable (see [`BlobService::flush`]).
    pub async fn flush(&self) -> Result<()> {
        self.blobs.flush().await?;
        self.dirs.flush().await
    }
}

/// The default store location: `$GRANARY_STORE`, else `$XDG_DATA_HOME/granary`, else
/// `~/.local/share/granary`.
pub fn default_url() -> String {
    if let Ok(s) = std::env::var("GRANARY_STORE") {
        if !s.is_empty() {
            return if s.contains("://") {
                s
            } else {
                format!("file://{s}")
            };
        }
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    format!("file://{}", base.join("granary").display())
}

/// Opens the store a URL names, creating a `file://` store on first use.
pub async fn open(url: &str) -> Result<Store> {
    let bad = |reason: &str| StoreError::Config {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(bad("file:// needs a path"));
        }
        local::LocalStore::open(url, std::path::Path::new(path)).await
    } else if url == "memory://" || url.starts_with("memory://") {
        Ok(memory::MemoryStore::new_store(url, StoreConfig::default()))
    } else if url.starts_with("grpc+tcp://") || url.starts_with("grpc+unix://") {
        remote::RemoteStore::open(url).await
    } else if url.starts_with("s3://") {
        s3::S3Store::open(url).await
    } else if url.contains("://") {
        Err(bad(
            "unsupported scheme (want file://, memory://, s3://, grpc+tcp:// or grpc+unix://)",
        ))
    } else {
        // A bare path is a local store.
        local::LocalStore::open(&format!("file://{url}"), std::path::Path::new(url)).await
    }
}

#[cfg(test)]
mod conformance;
