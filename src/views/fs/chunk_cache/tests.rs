//! Unit tests of the chunk cache.

use super::*;
use crate::store::BlobMeta;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A blob service that counts chunk reads and can be slowed down.
struct Counting {
    inner: Arc<dyn BlobService>,
    reads: AtomicUsize,
    delay: Duration,
}

#[async_trait::async_trait]
impl BlobService for Counting {
    async fn stat(&self, b: &B3Digest) -> crate::store::Result<Option<BlobMeta>> {
        self.inner.stat(b).await
    }
    async fn read_chunk(&self, c: &B3Digest) -> crate::store::Result<Option<Bytes>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.inner.read_chunk(c).await
    }
    async fn has_chunk(&self, c: &B3Digest) -> crate::store::Result<bool> {
        self.inner.has_chunk(c).await
    }
    async fn put_chunk(&self, d: B3Digest, data: Bytes) -> crate::store::Result<()> {
        self.inner.put_chunk(d, data).await
    }
    async fn put_blob_index(
        &self,
        b: B3Digest,
        i: &crate::model::castore::BlobIndex,
    ) -> crate::store::Result<()> {
        self.inner.put_blob_index(b, i).await
    }
}

async fn setup(delay: Duration, n: usize) -> (Arc<Counting>, Vec<ChunkRef>) {
    let store = crate::store::open("memory://").await.unwrap();
    let mut refs = Vec::new();
    for i in 0..n {
        let data = Bytes::from(vec![i as u8; 1000 + i]);
        let d = B3Digest::of(&data);
        store.blobs.put_chunk(d, data.clone()).await.unwrap();
        refs.push(ChunkRef {
            digest: d,
            size: data.len() as u64,
        });
    }
    let c = Arc::new(Counting {
        inner: store.blobs.clone(),
        reads: AtomicUsize::new(0),
        delay,
    });
    (c, refs)
}

#[tokio::test]
async fn concurrent_requests_share_one_fetch() {
    let (svc, refs) = setup(Duration::from_millis(50), 1).await;
    let cache = ChunkCache::new(svc.clone(), 1 << 20, Duration::from_secs(5), 0);
    let all = futures::future::join_all((0..10).map(|_| cache.chunk(refs[0]))).await;
    assert!(all.iter().all(|r| r.as_ref().unwrap().len() == 1000));
    assert_eq!(svc.reads.load(Ordering::SeqCst), 1);
    cache.chunk(refs[0]).await.unwrap();
    assert_eq!(
        svc.reads.load(Ordering::SeqCst),
        1,
        "second read from cache"
    );
}

#[tokio::test]
async fn cache_is_bounded_in_bytes() {
    let (svc, refs) = setup(Duration::ZERO, 10).await;
    let cache = ChunkCache::new(svc.clone(), 3000, Duration::from_secs(5), 0);
    for r in &refs {
        cache.chunk(*r).await.unwrap();
    }
    assert!(cache.cached_bytes() <= 3000, "{}", cache.cached_bytes());
    assert!(cache.cached_bytes() > 0);
}

#[tokio::test]
async fn listings_are_counted_in_the_chunk_budget() {
    let (svc, refs) = setup(Duration::ZERO, 10).await;
    let cache = ChunkCache::new(svc.clone(), 8000, Duration::from_secs(5), 0);
    for r in &refs[..6] {
        cache.chunk(*r).await.unwrap();
    }
    assert!(cache.cached_bytes() > 5000, "{}", cache.cached_bytes());
    // Listings now hold 5,000 of the 8,000 bytes: chunks give way as the next ones arrive.
    cache.set_other_bytes(5000);
    assert_eq!(cache.budget(), (8000, 5000));
    for r in &refs[6..] {
        cache.chunk(*r).await.unwrap();
    }
    assert!(cache.cached_bytes() <= 3000, "{}", cache.cached_bytes());
    assert!(cache.cached_bytes() > 0);
    // Listings taking the whole budget leave no room, and reads still work.
    cache.set_other_bytes(9000);
    assert_eq!(cache.chunk(refs[0]).await.unwrap().len(), 1000);
    assert_eq!(cache.cached_bytes(), 0);
}

#[tokio::test]
async fn slow_backend_times_out_then_recovers() {
    let (svc, refs) = setup(Duration::from_millis(300), 1).await;
    let cache = ChunkCache::new(svc.clone(), 1 << 20, Duration::from_millis(50), 0);
    let e = cache.chunk(refs[0]).await.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    let cache = ChunkCache::new(svc, 1 << 20, Duration::from_secs(5), 0);
    assert!(cache.chunk(refs[0]).await.is_ok());
}

#[tokio::test]
async fn wrong_length_is_an_error() {
    let (svc, refs) = setup(Duration::ZERO, 1).await;
    let cache = ChunkCache::new(svc, 1 << 20, Duration::from_secs(5), 0);
    let mut bad = refs[0];
    bad.size += 1;
    assert!(cache.chunk(bad).await.is_err());
}

#[tokio::test]
async fn reads_across_chunk_boundaries() {
    let (svc, refs) = setup(Duration::ZERO, 5).await;
    let cache = ChunkCache::new(svc, 1 << 20, Duration::from_secs(5), 0);
    let mut whole = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        whole.extend(std::iter::repeat_n(i as u8, r.size as usize));
    }
    let mut tree = crate::store::outboard::TreeHasher::new();
    tree.update(&whole);
    let (digest, outboard) = tree.finish();
    let meta = BlobMeta {
        size: refs.iter().map(|r| r.size).sum(),
        chunks: refs.clone(),
        outboard: outboard.into(),
    };
    let layout = Layout::new(digest, meta).unwrap();
    for (off, len) in [(0, 10), (995, 20), (0, 100_000), (1500, 2500), (5005, 10)] {
        let got = cache.read(&layout, off, len).await.unwrap();
        let end = (off as usize + len).min(whole.len());
        let want = if off as usize >= whole.len() {
            &[][..]
        } else {
            &whole[off as usize..end]
        };
        assert_eq!(&got[..], want, "offset {off} len {len}");
    }
}

/// Answers only the chunks of a batch whose first byte is even.
struct HalfDeaf(Arc<Counting>);

#[async_trait::async_trait]
impl BlobService for HalfDeaf {
    async fn stat(&self, b: &B3Digest) -> crate::store::Result<Option<BlobMeta>> {
        self.0.stat(b).await
    }
    async fn read_chunk(&self, c: &B3Digest) -> crate::store::Result<Option<Bytes>> {
        self.0.read_chunk(c).await
    }
    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: crate::store::ChunkSink) {
        for c in chunks {
            let r = self.0.read_chunk(&c.digest).await;
            if matches!(&r, Ok(Some(b)) if b[0] % 2 == 0) {
                sink(c.digest, r);
            }
        }
    }
    async fn has_chunk(&self, c: &B3Digest) -> crate::store::Result<bool> {
        self.0.has_chunk(c).await
    }
    async fn put_chunk(&self, d: B3Digest, data: Bytes) -> crate::store::Result<()> {
        self.0.put_chunk(d, data).await
    }
    async fn put_blob_index(
        &self,
        b: B3Digest,
        i: &crate::model::castore::BlobIndex,
    ) -> crate::store::Result<()> {
        self.0.put_blob_index(b, i).await
    }
}

#[tokio::test]
async fn a_batch_fetches_each_chunk_once_and_readers_join_it() {
    let (svc, refs) = setup(Duration::from_millis(20), 6).await;
    let cache = ChunkCache::new(svc.clone(), 1 << 20, Duration::from_secs(5), 0);
    // The batch names one chunk twice; readers arrive while it is in flight.
    let mut batch = refs.clone();
    batch.push(refs[0]);
    let (_, read) = tokio::join!(
        cache.fetch_batch(batch),
        futures::future::join_all(refs.iter().map(|r| cache.chunk(*r)))
    );
    for (r, got) in refs.iter().zip(read) {
        assert_eq!(got.unwrap().len() as u64, r.size);
    }
    assert_eq!(svc.reads.load(Ordering::SeqCst), refs.len());
    // A second batch of cached chunks asks the backend for nothing.
    cache.fetch_batch(refs.clone()).await;
    assert_eq!(svc.reads.load(Ordering::SeqCst), refs.len());
}

#[tokio::test]
async fn chunks_a_batch_leaves_unanswered_fail_and_are_fetched_again() {
    let (svc, refs) = setup(Duration::ZERO, 4).await;
    let deaf = Arc::new(HalfDeaf(svc.clone()));
    let cache = ChunkCache::new(deaf, 1 << 20, Duration::from_secs(5), 0);
    let odd = refs[1];
    let (_, waiting) = tokio::join!(cache.fetch_batch(refs.clone()), cache.chunk(odd));
    // Either the reader joined the batch (and got its error) or fetched it itself.
    if let Err(e) = &waiting {
        assert!(e.to_string().contains("no answer"), "{e}");
    }
    // Nothing is left in flight: a later read fetches the chunk on its own.
    assert_eq!(cache.chunk(odd).await.unwrap().len() as u64, odd.size);
    assert_eq!(
        cache.chunk(refs[2]).await.unwrap().len() as u64,
        refs[2].size
    );
}

#[tokio::test]
async fn a_slow_batch_times_out_and_its_chunks_fail() {
    let (svc, refs) = setup(Duration::from_millis(300), 3).await;
    let cache = ChunkCache::new(svc, 1 << 20, Duration::from_millis(50), 0);
    let (_, r) = tokio::join!(cache.fetch_batch(refs.clone()), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache.chunk(refs[2]).await
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(cache.state().inflight.is_empty());
}

#[tokio::test]
async fn local_store_batches_hand_over_every_chunk_verified() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = crate::store::open(&url).await.unwrap().blobs;
    let mut refs = Vec::new();
    // Enough bytes for several groups of the local batch reader, incompressible.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        let data: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let data = Bytes::from(data);
        let d = B3Digest::of(&data);
        store.put_chunk(d, data.clone()).await.unwrap();
        refs.push(ChunkRef {
            digest: d,
            size: data.len() as u64,
        });
    }
    store.flush().await.unwrap();
    let missing = B3Digest::of(b"not stored");
    let mut batch = refs.clone();
    batch.push(ChunkRef {
        digest: missing,
        size: 10,
    });
    let got = Arc::new(Mutex::new(HashMap::new()));
    let sink: crate::store::ChunkSink = {
        let got = got.clone();
        Arc::new(move |d, r| {
            got.lock()
                .unwrap()
                .insert(d, r.map(|b| b.map(|b| b.len())).ok());
        })
    };
    store.read_chunks(batch, sink).await;
    let got = got.lock().unwrap();
    assert_eq!(got.len(), refs.len() + 1);
    for r in &refs {
        assert_eq!(got[&r.digest], Some(Some(r.size as usize)));
    }
    assert_eq!(got[&missing], Some(None));
}
