//! The blob service: chunks and blob indexes. This file is the contract every backend keeps
//! (memory, local, S3, a remote daemon, the disk cache layer).
//!
//! - A *chunk* is stored under `blake3(bytes)`. A *blob* (a file's content) is either one
//!   chunk (blob digest = chunk digest), empty (never stored), or several chunks listed by a
//!   *blob index* stored under the blob digest, with the blob's outboard.
//! - Everything returned is verified: chunk bytes hash to their digest; a blob index decodes,
//!   its checksum holds and its sizes add up. (That an index's chunks *are* the blob is
//!   checked by readers against the outboard: see [`super::layout`].)
//! - `Ok(None)` means absent; an error means the backend could not answer, or what it holds
//!   is corrupt ([`StoreError::Corrupt`](super::StoreError::Corrupt), naming it) — never
//!   wrong bytes.
//! - Puts are idempotent: putting what exists succeeds, one copy is kept, and its time is
//!   refreshed (see [`super::maintenance`]).
//! - Writing a whole blob (chunking, hashing, index last) is [`super::blob_writer`]; reading
//!   one back, any range of it, is [`super::reader`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::Result;
use crate::model::castore::{B3Digest, BlobIndex, ModelError};

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
                .map(|c| crate::model::castore::proto::blob_index::Chunk {
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
    /// Size, chunk list and outboard of a blob; `Ok(None)` if neither a chunk nor a blob
    /// index is stored under its digest. The empty blob is always present (no chunks).
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>>;

    /// The verified bytes of one chunk; `Ok(None)` if absent.
    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>>;

    /// Whether a chunk is stored (without reading it where the backend can tell).
    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool>;

    /// Reads a batch of chunks, handing each to `sink` exactly once as soon as it is read (in
    /// any order), with the same contract as [`BlobService::read_chunk`]. The default reads
    /// them concurrently; backends do better where they can: the local store reads a batch on
    /// a few threads (no hand-off per chunk), a remote daemon answers the whole batch in one
    /// streamed call.
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        use futures::StreamExt;
        futures::stream::iter(chunks)
            .for_each_concurrent(BATCH_CONCURRENCY, |c| {
                let sink = sink.clone();
                async move { sink(c.digest, self.read_chunk(&c.digest).await) }
            })
            .await
    }

    /// [`BlobService::read_chunks`] for a batch the caller knows it needs exactly as asked (a
    /// trace replay): a backend that reads around what is asked, for neighbours later reads
    /// may want (object storage reads aligned extents and more), reads only these bytes.
    /// Same contract; the default is `read_chunks`.
    async fn read_chunks_exact(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        self.read_chunks(chunks, sink).await
    }

    /// Stores one chunk. `digest` must be `blake3(data)`; a backend that does not trust its
    /// caller re-hashes and refuses a mismatch.
    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()>;

    /// [`BlobService::put_chunk`] from a blocking thread (never a runtime worker): the
    /// default waits for `put_chunk` on the current runtime; a backend whose puts are local
    /// file writes does the work on the calling thread (for the many one-chunk files of an
    /// import, that saves two thread hand-offs each).
    fn put_chunk_blocking(&self, digest: &B3Digest, data: &[u8]) -> Result<()> {
        let data = Bytes::copy_from_slice(data);
        tokio::runtime::Handle::current().block_on(self.put_chunk(*digest, data))
    }

    /// Records the blob index of a multi-chunk blob. Its chunks must already be stored (an
    /// index never names a chunk that is not there). A backend that does not trust its caller
    /// (the daemon) re-reads the chunks, recomputes the digest and the outboard, and refuses a
    /// mismatch.
    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()>;

    /// Whether a blob is stored (as a chunk or an index).
    async fn has(&self, blob: &B3Digest) -> Result<bool> {
        Ok(self.stat(blob).await?.is_some())
    }

    /// Makes every object put so far durable and visible to other processes. A root put
    /// flushes first, so only tree digests printed without a root need this.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Whether a read costs a network round trip (object storage, a daemon). A mount then
    /// fetches ahead more eagerly: the small files of a directory and of its subdirectories
    /// as soon as it is listed, in one batch.
    fn remote(&self) -> bool {
        false
    }

    /// Memory this backend may hold, at most, for reads: its own caches and buffers
    /// (decompressed compression groups, fetched extents of packs, frames being decoded). A
    /// mount counts it in its memory budget (`--cache-size`) and keeps that much fewer
    /// chunks. Zero for a backend that keeps none in this process.
    fn read_memory_bytes(&self) -> usize {
        0
    }
}
