//! The one way a blob is written: bytes in, digest out. Content is cut by the store's chunker,
//! each chunk hashed and put (compressed and stored by the backend) concurrently with the
//! bytes that follow, the blob hashed block by block into its digest and outboard; a blob of
//! several chunks gets its blob index only once every chunk is stored, so an index never names
//! a chunk that is not there. `import`, `import-nar`, the daemon's blob puts and its ingest
//! sessions all write through here.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::outboard::TreeHasher;
use super::{BlobService, ChunkRef, Result, Store, StoreError};
use crate::model::castore::{B3Digest, BlobIndex};
use crate::model::chunking::Chunker;

/// Chunk puts in flight per blob by default: enough that one large blob keeps several cores
/// busy compressing, few enough to bound memory at a few chunks.
pub const PUTS_IN_FLIGHT: usize = 4;

/// Chunk puts under way, oldest first; shared by the blobs of one stream (a NAR) so that a
/// blob of one chunk does not wait for its put before the next blob starts.
pub struct PutQueue {
    puts: VecDeque<JoinHandle<Result<()>>>,
    limit: usize,
}

impl PutQueue {
    pub fn new(limit: usize) -> Self {
        Self {
            puts: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    fn push(&mut self, h: JoinHandle<Result<()>>) {
        self.puts.push_back(h);
    }

    async fn wait_one(&mut self) -> Result<()> {
        if let Some(h) = self.puts.pop_front() {
            h.await
                .map_err(|e| StoreError::Backend(format!("chunk put task failed: {e}")))??;
        }
        Ok(())
    }

    /// Waits while more puts than the limit are running.
    async fn wait_over_limit(&mut self) -> Result<()> {
        while self.puts.len() > self.limit {
            self.wait_one().await?;
        }
        Ok(())
    }

    /// Waits for every put: after this, every chunk submitted is stored.
    pub async fn drain(&mut self) -> Result<()> {
        while !self.puts.is_empty() {
            self.wait_one().await?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.puts.is_empty()
    }
}

/// Where a writer's puts wait: its own queue, or one shared with other blobs.
enum Queue<'q> {
    Own(PutQueue),
    Shared(&'q mut PutQueue),
}

impl Queue<'_> {
    fn get(&mut self) -> &mut PutQueue {
        match self {
            Queue::Own(q) => q,
            Queue::Shared(q) => q,
        }
    }
}

/// A blob being written.
pub struct BlobWriter<'q> {
    blobs: std::sync::Arc<dyn BlobService>,
    rt: tokio::runtime::Handle,
    chunker: Chunker,
    tree: TreeHasher,
    index: Vec<ChunkRef>,
    size: u64,
    queue: Queue<'q>,
}

/// What a finished write gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub digest: B3Digest,
    pub size: u64,
    /// Chunks the blob was cut into.
    pub chunks: usize,
}

impl<'q> BlobWriter<'q> {
    /// A writer into `store`, keeping at most `in_flight` chunk puts running. Must be created
    /// inside the store's runtime (an async task or a blocking thread of it).
    pub fn new(store: &Store, in_flight: usize) -> Self {
        Self::with_queue(store, Queue::Own(PutQueue::new(in_flight)))
    }

    /// A writer whose chunk puts join `queue`. A blob of one chunk finishes without waiting
    /// for its put: drain the queue before anything refers to the blob durably (a root).
    pub fn on_queue(store: &Store, queue: &'q mut PutQueue) -> Self {
        Self::with_queue(store, Queue::Shared(queue))
    }

    fn with_queue(store: &Store, queue: Queue<'q>) -> Self {
        Self {
            blobs: store.blobs.clone(),
            rt: tokio::runtime::Handle::current(),
            chunker: Chunker::new(store.params()),
            tree: TreeHasher::new(),
            index: Vec::new(),
            size: 0,
            queue,
        }
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn submit(&mut self, chunk: Bytes) {
        let digest = B3Digest::of(&chunk);
        self.index.push(ChunkRef {
            digest,
            size: chunk.len() as u64,
        });
        let blobs = self.blobs.clone();
        let h = self
            .rt
            .spawn(async move { blobs.put_chunk(digest, chunk).await });
        self.queue.get().push(h);
    }

    /// Feeds `data`; waits only when too many chunk puts are running.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.tree.update(data);
        self.size += data.len() as u64;
        // Fed at most one max-chunk at a time so the chunker's buffer stays bounded.
        let step = self.chunker.params().max as usize;
        for piece in data.chunks(step.max(1)) {
            self.chunker.push(piece);
            while let Some(chunk) = self.chunker.next_chunk() {
                self.submit(chunk);
                self.queue.get().wait_over_limit().await?;
            }
        }
        Ok(())
    }

    /// [`BlobWriter::write`] from a blocking thread.
    pub fn write_blocking(&mut self, data: &[u8]) -> Result<()> {
        let rt = self.rt.clone();
        rt.block_on(self.write(data))
    }

    /// Ends the blob: the last chunks put, then (for several chunks, once all are stored) its
    /// index. Returns its digest and size.
    pub async fn finish(mut self) -> Result<Written> {
        self.finish_chunks(false)?;
        self.finish_index().await
    }

    /// [`BlobWriter::finish`] from a blocking thread; a blob of one chunk is put from this
    /// thread ([`BlobService::put_chunk_blocking`]: for the local store, two thread hand-offs
    /// fewer per small file).
    pub fn finish_blocking(mut self) -> Result<Written> {
        self.finish_chunks(true)?;
        let rt = self.rt.clone();
        rt.block_on(self.finish_index())
    }

    fn finish_chunks(&mut self, here: bool) -> Result<()> {
        while let Some(chunk) = self.chunker.finish_chunk() {
            if here && self.index.is_empty() && self.queue.get().is_empty() {
                let digest = B3Digest::of(&chunk);
                self.blobs.put_chunk_blocking(&digest, &chunk)?;
                self.index.push(ChunkRef {
                    digest,
                    size: chunk.len() as u64,
                });
                continue;
            }
            self.submit(chunk);
        }
        Ok(())
    }

    async fn finish_index(mut self) -> Result<Written> {
        let several = self.index.len() > 1;
        let n = self.index.len();
        // An index may only name stored chunks; a writer with its own queue also leaves
        // nothing running behind it.
        if several || matches!(self.queue, Queue::Own(_)) {
            self.queue.get().drain().await?;
        }
        let (digest, outboard) = self.tree.finish();
        if several {
            let meta = super::BlobMeta {
                size: self.size,
                chunks: self.index,
                outboard: Bytes::from(outboard),
            };
            let idx: BlobIndex = meta.to_index();
            self.blobs.put_blob_index(digest, &idx).await?;
        }
        Ok(Written {
            digest,
            size: self.size,
            chunks: n,
        })
    }
}

/// Writes all of `data` as one blob.
pub async fn write_all(store: &Store, data: &[u8]) -> Result<Written> {
    let mut w = BlobWriter::new(store, PUTS_IN_FLIGHT);
    w.write(data).await?;
    w.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blobs_round_trip_with_checked_outboards() {
        let store = crate::store::open("memory://").await.unwrap();
        for n in [0usize, 1, 5000, 16 << 10, 300_000, 3 << 20] {
            let data: Vec<u8> = (0..n)
                .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
                .collect();
            let w = write_all(&store, &data).await.unwrap();
            let digest = w.digest;
            assert_eq!((digest, w.size), (B3Digest::of(&data), n as u64));
            let r = crate::store::BlobReader::open(store.blobs.clone(), digest)
                .await
                .unwrap();
            use futures::TryStreamExt;
            let back: Vec<Bytes> = r.clone().stream().try_collect().await.unwrap();
            assert_eq!(back.concat(), data, "n={n}");
            if n > 100 {
                assert_eq!(r.read_at(50, 70).await.unwrap(), &data[50..120]);
            }
            if r.chunks().len() > 1 {
                let meta = store.blobs.stat(&digest).await.unwrap().unwrap();
                assert_eq!(
                    meta.outboard.len() as u64,
                    super::super::outboard::outboard_len(n as u64)
                );
            }
        }
    }
}
