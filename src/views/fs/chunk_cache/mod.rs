//! Reading file content for the mount: a byte-bounded LRU of verified chunks in front of a
//! [`BlobService`], with concurrent requests for one chunk merged into one fetch, a deadline
//! on every backend call, and prefetch of the chunks that follow a sequential read.
//!
//! Only bytes the backend has verified (see the `BlobService` contract) enter the cache, so a
//! cached chunk is served without hashing it again. Errors carry the digest and are logged once
//! per failed fetch; the caller turns them into `EIO` for that read only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, StreamExt, TryStreamExt};
use lru::LruCache;

use crate::model::castore::B3Digest;
use crate::store::layout::BlobLayout;
use crate::store::{BlobService, ChunkRef, StoreError};

/// Chunks of one read fetched at once.
const READ_CONCURRENCY: usize = 16;
/// How far past a sequential read to prefetch, in bytes, by default.
pub const PREFETCH_BYTES: u64 = 4 << 20;
/// The same over a remote store: one batch of 16 MiB is a few GETs of a pack.
pub const REMOTE_PREFETCH_BYTES: u64 = 16 << 20;
/// Blob layouts remembered (a layout is the chunk list of one multi-chunk blob).
const LAYOUTS: usize = 4096;

/// A failed fetch, shared by every reader that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}")]
pub struct FetchError {
    msg: Arc<str>,
    /// The backend did not answer in time (remembered for a while; see `State::failed`).
    timed_out: bool,
}

impl FetchError {
    /// A failure, logged once here.
    fn new(msg: String) -> Self {
        tracing::error!("{msg}");
        Self::unlogged(msg)
    }

    /// A failure nobody waits for yet (a trace replay's), logged at debug level only: a
    /// trace may name chunks a newer tree no longer has.
    fn unlogged(msg: String) -> Self {
        FetchError {
            msg: msg.into(),
            timed_out: false,
        }
    }

    fn timeout(msg: String) -> Self {
        FetchError {
            timed_out: true,
            ..Self::new(msg)
        }
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// A backend's answer for chunk `c`, checked against the size its blob index gives; failures
/// are logged unless `quiet`.
fn checked(
    c: ChunkRef,
    r: crate::store::Result<Option<Bytes>>,
    quiet: bool,
) -> Result<Bytes, FetchError> {
    let fail = |msg: String| {
        if quiet {
            tracing::debug!("{msg}");
            FetchError::unlogged(msg)
        } else {
            FetchError::new(msg)
        }
    };
    match r {
        Err(e) => Err(fail(format!("chunk {}: {e}", c.digest))),
        Ok(None) => Err(fail(format!("chunk {} is missing", c.digest))),
        Ok(Some(b)) if b.len() as u64 != c.size => Err(fail(format!(
            "chunk {} is {} bytes, its blob index says {}",
            c.digest,
            b.len(),
            c.size
        ))),
        Ok(Some(b)) => Ok(b),
    }
}

/// What one backend batch brought.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchOutcome {
    /// Chunks fetched and kept, and their bytes.
    pub fetched: u64,
    pub bytes: u64,
    /// Chunks that failed (missing, corrupt, timed out).
    pub failed: u64,
}

/// A blob's layout as the mount reads it.
pub type Layout = BlobLayout;

struct State {
    chunks: LruCache<B3Digest, Bytes>,
    bytes: usize,
    /// Bytes evicted since the heap was last trimmed.
    evicted: usize,
    inflight: HashMap<B3Digest, Fetch>,
    layouts: LruCache<B3Digest, Arc<Layout>>,
    /// Fetches (chunks and layouts, by digest) that failed lately, and how: the kernel asks
    /// again for a page whose read failed (readahead, then the read itself), and each ask
    /// must not wait out the deadline again.
    failed: HashMap<B3Digest, (std::time::Instant, FetchError)>,
}

/// Evicted bytes between two trims of the heap (see `views::fs::trim_heap`), at least: the
/// heap is trimmed each time a quarter of the budget has been evicted. Once every full
/// turnover held pystore's full read at 381–386 MB RSS instead of 435; since group buffers
/// are reused (few holes left to give back), a quarter cost no read time measurable here and
/// ends the read at 335–342 MB.
const TRIM_EVERY: usize = 64 << 20;

/// Failures remembered at most (then forgotten all at once).
const MAX_FAILED: usize = 4096;

/// The chunk cache and the read path built on it.
pub struct ChunkCache {
    blobs: Arc<dyn BlobService>,
    /// The memory budget chunks share with the mount's other caches (see `others`).
    capacity: usize,
    /// Bytes the mount's other caches hold now (directory listings), in the same budget:
    /// chunks get what they leave.
    others: std::sync::atomic::AtomicUsize,
    deadline: Duration,
    /// Blobs up to this size are one chunk whose digest is the blob's (the chunker never
    /// cuts below its minimum), so they need no `stat`.
    single_chunk_max: u64,
    state: Mutex<State>,
    prefetching: Arc<tokio::sync::Semaphore>,
    /// How far past a sequential read to prefetch (0: no prefetch).
    prefetch_bytes: std::sync::atomic::AtomicU64,
    /// Told of every read, when the mount records or replays a trace.
    tracer: std::sync::OnceLock<Arc<super::trace::Tracer>>,
}

impl ChunkCache {
    pub fn new(
        blobs: Arc<dyn BlobService>,
        capacity: usize,
        deadline: Duration,
        single_chunk_max: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            blobs,
            capacity,
            others: Default::default(),
            deadline,
            single_chunk_max,
            state: Mutex::new(State {
                chunks: LruCache::unbounded(),
                bytes: 0,
                evicted: 0,
                inflight: HashMap::new(),
                layouts: LruCache::new(std::num::NonZeroUsize::MIN.saturating_add(LAYOUTS - 1)),
                failed: HashMap::new(),
            }),
            prefetching: Arc::new(tokio::sync::Semaphore::new(8)),
            prefetch_bytes: std::sync::atomic::AtomicU64::new(PREFETCH_BYTES),
            tracer: std::sync::OnceLock::new(),
        })
    }

    /// Reports every read to `tracer` from now on (set once).
    pub fn set_tracer(&self, tracer: Arc<super::trace::Tracer>) {
        let _ = self.tracer.set(tracer);
    }

    /// Blobs larger than this need their layout fetched (a `stat`) before they can be read.
    pub fn needs_layout(&self, size: u64) -> bool {
        size > self.single_chunk_max
    }

    /// Sets how far past a sequential read to prefetch (0 turns prefetch off).
    pub fn set_prefetch(&self, bytes: u64) {
        self.prefetch_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of chunk data held.
    pub fn cached_bytes(&self) -> usize {
        self.state().bytes
    }

    /// Tells the cache how many bytes the mount's other caches hold now; chunks are evicted
    /// to make room as new ones arrive.
    pub fn set_other_bytes(&self, bytes: usize) {
        self.others
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The budget chunks share with the other caches, and what those hold now.
    pub fn budget(&self) -> (usize, usize) {
        (
            self.capacity,
            self.others.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Bytes chunks may hold now: the budget less the other caches' bytes.
    fn room(&self) -> usize {
        let (budget, others) = self.budget();
        budget.saturating_sub(others)
    }

    /// A failure of `digest` within the last deadline, if any.
    fn recent_failure(&self, st: &mut State, digest: &B3Digest) -> Option<FetchError> {
        match st.failed.get(digest) {
            Some((at, e)) if at.elapsed() < self.deadline => Some(e.clone()),
            Some(_) => {
                st.failed.remove(digest);
                None
            }
            None => None,
        }
    }

    fn remember_failure(st: &mut State, digest: B3Digest, e: &FetchError) {
        // Only a backend that did not answer: other failures (a chunk a batch left out, a
        // corrupt copy another replica may not have) are tried again at once.
        if !e.timed_out {
            return;
        }
        if st.failed.len() >= MAX_FAILED {
            st.failed.clear();
        }
        st.failed
            .insert(digest, (std::time::Instant::now(), e.clone()));
    }

    /// The verified bytes of one chunk, from the cache or fetched (once, however many ask).
    pub async fn chunk(self: &Arc<Self>, c: ChunkRef) -> Result<Bytes, FetchError> {
        let fetch = {
            let mut st = self.state();
            if let Some(b) = st.chunks.get(&c.digest) {
                return Ok(b.clone());
            }
            if let Some(e) = self.recent_failure(&mut st, &c.digest) {
                return Err(e);
            }
            match st.inflight.get(&c.digest) {
                Some(f) => f.clone(),
                None => {
                    let this = self.clone();
                    let f = async move { this.fetch(c).await }.boxed().shared();
                    st.inflight.insert(c.digest, f.clone());
                    f
                }
            }
        };
        fetch.await
    }

    async fn fetch(self: Arc<Self>, c: ChunkRef) -> Result<Bytes, FetchError> {
        let res = match tokio::time::timeout(self.deadline, self.blobs.read_chunk(&c.digest)).await
        {
            Err(_) => Err(self.timed_out(&c.digest)),
            Ok(r) => checked(c, r, false),
        };
        self.complete(&c.digest, &res);
        res
    }

    fn timed_out(&self, digest: &B3Digest) -> FetchError {
        FetchError::timeout(format!(
            "chunk {digest}: fetch timed out after {:.1}s",
            self.deadline.as_secs_f64()
        ))
    }

    /// Ends the flight of one chunk, keeping its bytes if it arrived.
    fn complete(&self, digest: &B3Digest, res: &Result<Bytes, FetchError>) {
        let mut st = self.state();
        st.inflight.remove(digest);
        if let Err(e) = res {
            Self::remember_failure(&mut st, *digest, e);
        }
        if let Ok(b) = res {
            let room = self.room();
            if b.len() <= room && st.chunks.put(*digest, b.clone()).is_none() {
                st.bytes += b.len();
            }
            while st.bytes > room {
                match st.chunks.pop_lru() {
                    Some((_, old)) => {
                        st.bytes -= old.len();
                        st.evicted += old.len();
                    }
                    None => break,
                }
            }
            if st.evicted >= (self.capacity / 4).max(TRIM_EVERY) {
                st.evicted = 0;
                drop(st);
                crate::views::fs::trim_heap();
            }
        }
    }

    /// Fetches those of `chunks` neither cached nor in flight as one backend batch. Each is
    /// in flight (so readers wait for it rather than fetch it again) until the backend hands
    /// it over; chunks the batch leaves unanswered by the deadline fail like a timed-out fetch.
    /// With `replay` (a trace replay's batch), the backend reads exactly these chunks (see
    /// `BlobService::read_chunks_exact`) and failures are logged at debug level only (see
    /// [`FetchError::unlogged`]).
    pub(crate) async fn fetch_batch_with(
        self: &Arc<Self>,
        chunks: Vec<ChunkRef>,
        replay: bool,
    ) -> BatchOutcome {
        type Waiting = HashMap<
            B3Digest,
            (
                ChunkRef,
                tokio::sync::oneshot::Sender<Result<Bytes, FetchError>>,
            ),
        >;
        let mut waiting: Waiting = HashMap::new();
        let mut batch = Vec::new();
        {
            let mut st = self.state();
            for c in chunks {
                if st.chunks.contains(&c.digest)
                    || st.inflight.contains_key(&c.digest)
                    || waiting.contains_key(&c.digest)
                {
                    continue;
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                let digest = c.digest;
                let f = async move {
                    rx.await.unwrap_or_else(|_| {
                        Err(FetchError::new(format!("chunk {digest}: fetch abandoned")))
                    })
                }
                .boxed()
                .shared();
                st.inflight.insert(c.digest, f);
                waiting.insert(c.digest, (c, tx));
                batch.push(c);
            }
        }
        if batch.is_empty() {
            return BatchOutcome::default();
        }
        let waiting = Arc::new(Mutex::new(waiting));
        let outcome = Arc::new(Mutex::new(BatchOutcome::default()));
        let sink: crate::store::ChunkSink = {
            let (this, waiting, outcome) = (self.clone(), waiting.clone(), outcome.clone());
            Arc::new(move |digest, r| {
                let entry = waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&digest);
                if let Some((c, tx)) = entry {
                    let res = checked(c, r, replay);
                    {
                        let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
                        match &res {
                            Ok(b) => {
                                o.fetched += 1;
                                o.bytes += b.len() as u64;
                            }
                            Err(_) => o.failed += 1,
                        }
                    }
                    this.complete(&digest, &res);
                    let _ = tx.send(res);
                }
            })
        };
        let read = if replay {
            self.blobs.read_chunks_exact(batch, sink)
        } else {
            self.blobs.read_chunks(batch, sink)
        };
        let timed_out = tokio::time::timeout(self.deadline, read).await.is_err();
        let left: Vec<_> = waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        let mut outcome = *outcome.lock().unwrap_or_else(|p| p.into_inner());
        for (digest, (_, tx)) in left {
            let err = if timed_out {
                self.timed_out(&digest)
            } else {
                FetchError::new(format!("chunk {digest}: the backend gave no answer"))
            };
            outcome.failed += 1;
            let res = Err(err);
            self.complete(&digest, &res);
            let _ = tx.send(res);
        }
        outcome
    }

    async fn fetch_batch(self: &Arc<Self>, chunks: Vec<ChunkRef>) {
        self.fetch_batch_with(chunks, false).await;
    }

    /// Those of `chunks` neither cached nor on their way.
    fn unstarted(&self, chunks: impl Iterator<Item = ChunkRef>) -> Vec<ChunkRef> {
        let st = self.state();
        chunks
            .filter(|c| !st.chunks.contains(&c.digest) && !st.inflight.contains_key(&c.digest))
            .collect()
    }

    /// The layout of a blob of known size (the size its directory entry records).
    pub async fn layout(&self, blob: &B3Digest, size: u64) -> Result<Arc<Layout>, FetchError> {
        self.layout_with(blob, size, false).await
    }

    /// [`Self::layout`]; with `quiet`, a failure is logged at debug level only.
    pub(crate) async fn layout_with(
        &self,
        blob: &B3Digest,
        size: u64,
        quiet: bool,
    ) -> Result<Arc<Layout>, FetchError> {
        if size <= self.single_chunk_max {
            return Ok(Arc::new(Layout::single(*blob, size)));
        }
        {
            let mut st = self.state();
            if let Some(l) = st.layouts.get(blob) {
                return Ok(l.clone());
            }
            if let Some(e) = self.recent_failure(&mut st, blob) {
                return Err(e);
            }
        }
        let load = async {
            let meta = self
                .blobs
                .stat(blob)
                .await?
                .ok_or_else(|| StoreError::not_found("blob", blob))?;
            if meta.size != size {
                return Err(StoreError::corrupt(
                    "blob",
                    blob,
                    format!("is {} bytes, its directory entry says {size}", meta.size),
                ));
            }
            Layout::load(&*self.blobs, *blob, meta).await
        };
        let layout = match tokio::time::timeout(self.deadline, load).await {
            Err(_) => Err(StoreError::Timeout {
                what: format!("stat of blob {blob}"),
                secs: self.deadline.as_secs_f64(),
            }),
            Ok(r) => r,
        }
        .map_err(|e| {
            let timed_out =
                matches!(e, StoreError::Timeout { .. }) || e.to_string().contains("timed out");
            let msg = format!("blob {blob}: {e}");
            let e = if timed_out {
                FetchError::timeout(msg)
            } else if quiet {
                tracing::debug!("{msg}");
                FetchError::unlogged(msg)
            } else {
                FetchError::new(msg)
            };
            Self::remember_failure(&mut self.state(), *blob, &e);
            e
        })?;
        let layout = Arc::new(layout);
        self.state().layouts.put(*blob, layout.clone());
        Ok(layout)
    }

    /// Up to `len` bytes at `offset` of a blob (fewer at its end), checked against the blob
    /// digest (see [`BlobLayout`]).
    pub async fn read(
        self: &Arc<Self>,
        layout: &Layout,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, FetchError> {
        let size = layout.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let (first, last) = layout.span(offset, end);
        if let Some(t) = self.tracer.get() {
            t.on_read(self, layout, first, last);
        }
        let parts: Vec<Bytes> = if first == last {
            vec![self.chunk(layout.chunks[first]).await?]
        } else {
            // The chunks nobody is fetching yet go to the backend as one batch (one request
            // on object storage, where one per chunk would cost a round trip each); the batch
            // is polled first, so they are in flight before the reads below look for them.
            let missing = self.unstarted(layout.chunks[first..=last].iter().copied());
            let collect = stream::iter(first..=last)
                .map(|i| self.chunk(layout.chunks[i]))
                .buffered(READ_CONCURRENCY)
                .try_collect();
            if missing.len() > 1 {
                futures::join!(self.fetch_batch(missing), collect).1?
            } else {
                collect.await?
            }
        };
        layout
            .verify(first, &parts, offset, end)
            .map_err(|e| FetchError::new(e.to_string()))?;
        Ok(layout.assemble(first, &parts, offset, end))
    }

    /// The one chunk of a blob known (by its size) to be a single chunk.
    pub fn single_chunk(&self, blob: &B3Digest, size: u64) -> Option<ChunkRef> {
        (size > 0 && size <= self.single_chunk_max).then_some(ChunkRef {
            digest: *blob,
            size,
        })
    }

    /// Starts fetching the chunks that follow byte `from`, in the background, without waiting
    /// and without piling up: when enough prefetches are running, this does nothing.
    pub fn prefetch(self: &Arc<Self>, layout: Arc<Layout>, from: u64) {
        let ahead = self
            .prefetch_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if from >= layout.size() || ahead == 0 {
            return;
        }
        let first = layout.chunk_at(from);
        let end = from.saturating_add(ahead);
        let wanted = self.unstarted(
            (first..layout.chunks.len())
                .take_while(|&i| layout.chunk_start(i) < end)
                .map(|i| layout.chunks[i]),
        );
        // Top the window up in large steps: sliding it a read at a time would fetch a chunk or
        // two per batch, and on object storage every batch costs at least one request.
        let missing: u64 = wanted.iter().map(|c| c.size).sum();
        if missing < ahead / 2 && end < layout.size() {
            return;
        }
        self.prefetch_chunks(wanted);
    }

    /// Starts fetching the first chunks (up to 1 MiB) of each of `blobs` (digest, size) in
    /// the background, unless enough prefetches are already running.
    pub fn prefetch_blobs(self: &Arc<Self>, blobs: Vec<(B3Digest, u64)>) {
        let Ok(permit) = self.prefetching.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Errors are logged by the fetch and met again by the real read.
            let layouts: Vec<_> = stream::iter(blobs)
                .map(|(digest, size)| {
                    let this = this.clone();
                    async move { this.layout(&digest, size).await }
                })
                .buffered(READ_CONCURRENCY)
                .filter_map(|l| async move { l.ok() })
                .collect()
                .await;
            let mut wanted = Vec::new();
            for layout in &layouts {
                let mut bytes = 0u64;
                for c in &layout.chunks {
                    if bytes >= 1 << 20 {
                        break;
                    }
                    bytes += c.size;
                    wanted.push(*c);
                }
            }
            this.fetch_batch(wanted).await;
        });
    }

    /// Starts fetching `chunks` in the background (those not cached or on their way), unless
    /// enough prefetches are already running.
    pub fn prefetch_chunks(self: &Arc<Self>, chunks: Vec<ChunkRef>) {
        let wanted = self.unstarted(chunks.into_iter());
        if wanted.is_empty() {
            return;
        }
        let Ok(permit) = self.prefetching.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Errors are logged by the fetch and reported to the read that needs the chunk.
            this.fetch_batch(wanted).await;
        });
    }
}

#[cfg(test)]
mod tests;
