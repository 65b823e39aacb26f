//! Reading blobs back: any byte range by fetching only the chunks it covers, or the whole
//! blob in order — every byte checked against the blob digest before it is handed out (see
//! [`super::layout`]).

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::Stream;

use super::layout::{fetch_chunk, stream_blob, BlobLayout};
use super::{BlobMeta, BlobService, ChunkRef, Result, StoreError};
use crate::model::castore::B3Digest;

/// Chunks fetched at once while streaming a whole blob.
pub const STREAM_CONCURRENCY: usize = 8;

/// A blob opened for reading.
#[derive(Clone)]
pub struct BlobReader {
    blobs: Arc<dyn BlobService>,
    layout: Arc<BlobLayout>,
}

impl BlobReader {
    pub async fn open(blobs: Arc<dyn BlobService>, digest: B3Digest) -> Result<Self> {
        let meta = blobs
            .stat(&digest)
            .await?
            .ok_or_else(|| StoreError::not_found("blob", &digest))?;
        Self::with_meta(blobs, digest, meta).await
    }

    /// Opens a blob whose chunk list is already known.
    pub async fn with_meta(
        blobs: Arc<dyn BlobService>,
        digest: B3Digest,
        meta: BlobMeta,
    ) -> Result<Self> {
        let layout = Arc::new(BlobLayout::load(&*blobs, digest, meta).await?);
        Ok(Self { blobs, layout })
    }

    /// Opens a blob, refusing it if it is not `size` bytes (the size its directory entry
    /// records).
    pub async fn open_sized(
        blobs: Arc<dyn BlobService>,
        digest: B3Digest,
        size: u64,
    ) -> Result<Self> {
        let r = Self::open(blobs, digest).await?;
        if r.size() != size {
            return Err(StoreError::corrupt(
                "blob",
                &digest,
                format!("is {} bytes, its directory entry says {size}", r.size()),
            ));
        }
        Ok(r)
    }

    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    pub fn digest(&self) -> &B3Digest {
        &self.layout.digest
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.layout.chunks
    }

    pub fn layout(&self) -> &Arc<BlobLayout> {
        &self.layout
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the blob), checked.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let (blobs, digest) = (&self.blobs, self.layout.digest);
        self.layout
            .read_with(offset, len, |c| async move {
                fetch_chunk(&**blobs, &digest, &c).await
            })
            .await
    }

    /// The whole blob as a stream of pieces, fetched ahead concurrently; each piece is
    /// checked before it is yielded, and an error ends the stream.
    pub fn stream(self) -> impl Stream<Item = Result<Bytes>> + Send {
        stream_blob(self.blobs, self.layout, STREAM_CONCURRENCY)
    }
}
