//! Reading blobs back: any byte range by fetching only the chunks it covers, or the whole
//! blob in order with its digest checked at the end.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::{self, Stream, StreamExt, TryStreamExt};

use super::{BlobMeta, BlobService, ChunkRef, Result, StoreError};
use crate::castore::B3Digest;

/// Chunks fetched at once while streaming a whole blob.
pub const STREAM_CONCURRENCY: usize = 8;

/// Fetches one chunk, treating absence as an error naming the blob it belongs to.
pub async fn fetch_chunk(blobs: &dyn BlobService, blob: &B3Digest, c: &ChunkRef) -> Result<Bytes> {
    let data = blobs.read_chunk(&c.digest).await?.ok_or_else(|| {
        StoreError::Backend(format!("chunk {} of blob {blob} is missing", c.digest))
    })?;
    if data.len() as u64 != c.size {
        return Err(StoreError::corrupt(
            "blob index",
            blob,
            format!(
                "chunk {} is {} bytes, index says {}",
                c.digest,
                data.len(),
                c.size
            ),
        ));
    }
    Ok(data)
}

/// A blob opened for random access.
#[derive(Clone)]
pub struct BlobReader {
    blobs: Arc<dyn BlobService>,
    digest: B3Digest,
    meta: Arc<BlobMeta>,
    /// `starts[i]` is the offset of chunk i; one extra entry holds the blob size.
    starts: Arc<Vec<u64>>,
}

impl BlobReader {
    pub async fn open(blobs: Arc<dyn BlobService>, digest: B3Digest) -> Result<Self> {
        let meta = blobs
            .stat(&digest)
            .await?
            .ok_or_else(|| StoreError::not_found("blob", &digest))?;
        Ok(Self::with_meta(blobs, digest, meta))
    }

    pub fn with_meta(blobs: Arc<dyn BlobService>, digest: B3Digest, meta: BlobMeta) -> Self {
        let mut starts = Vec::with_capacity(meta.chunks.len() + 1);
        let mut off = 0u64;
        for c in &meta.chunks {
            starts.push(off);
            off += c.size;
        }
        starts.push(off);
        Self {
            blobs,
            digest,
            meta: Arc::new(meta),
            starts: Arc::new(starts),
        }
    }

    pub fn size(&self) -> u64 {
        self.meta.size
    }

    pub fn digest(&self) -> &B3Digest {
        &self.digest
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.meta.chunks
    }

    /// Index of the chunk holding byte `offset` (offset < size).
    pub fn chunk_at(&self, offset: u64) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        }
    }

    /// Offset of chunk `i` within the blob.
    pub fn chunk_start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the blob).
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let size = self.meta.size;
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let first = self.chunk_at(offset);
        let last = self.chunk_at(end - 1);
        let parts: Vec<Bytes> = stream::iter(first..=last)
            .map(|i| self.read_chunk(i))
            .buffered(STREAM_CONCURRENCY)
            .try_collect()
            .await?;
        if parts.len() == 1 {
            let s = (offset - self.starts[first]) as usize;
            return Ok(parts[0].slice(s..s + (end - offset) as usize));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for (k, part) in parts.iter().enumerate() {
            let i = first + k;
            let cs = self.starts[i];
            let from = offset.saturating_sub(cs) as usize;
            let to = ((end - cs) as usize).min(part.len());
            out.extend_from_slice(&part[from..to]);
        }
        Ok(out.freeze())
    }

    /// The verified bytes of chunk `i`.
    pub async fn read_chunk(&self, i: usize) -> Result<Bytes> {
        fetch_chunk(&*self.blobs, &self.digest, &self.meta.chunks[i]).await
    }

    /// The whole blob as a stream of chunks, fetched ahead concurrently; the last item is an
    /// error if the content does not hash to the blob digest.
    pub fn stream(self) -> impl Stream<Item = Result<Bytes>> + Send {
        let n = self.meta.chunks.len();
        let hasher = blake3::Hasher::new();
        let digest = self.digest;
        let this = self.clone();
        stream::iter(0..n)
            .map(move |i| {
                let r = this.clone();
                async move { r.read_chunk(i).await }
            })
            .buffered(STREAM_CONCURRENCY)
            .scan((hasher, 0usize), move |(h, seen), item| {
                let out = match item {
                    Ok(b) => {
                        h.update(&b);
                        *seen += 1;
                        if *seen == n && B3Digest::from(h.finalize()) != digest {
                            Err(StoreError::corrupt(
                                "blob",
                                &digest,
                                "content does not hash to the blob digest",
                            ))
                        } else {
                            Ok(b)
                        }
                    }
                    Err(e) => Err(e),
                };
                futures::future::ready(Some(out))
            })
    }
}
