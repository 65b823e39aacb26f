//! Traces in the mount: recording the order in which a job first reads directories, blob
//! indexes and chunks, and replaying a root's trace as prefetch ahead of the job — in large
//! batches, a bounded window ahead of where the job is, and never in the way of its reads.
//!
//! Why the job never waits behind the replay: its reads do not queue behind replay batches
//! anywhere in the mount (a read of a chunk the replay is fetching joins that fetch; any other
//! chunk is fetched at once, as without a trace), and the replay keeps at most
//! [`BATCHES_IN_FLIGHT`] batches of at most [`BATCH_BYTES`] in flight, far below the backends'
//! own concurrency limits (32 GETs on S3; the daemon serves calls concurrently).

#[allow(unused_imports)]
use super::*;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::OnceLock;

use futures::stream::FuturesUnordered;

use crate::model::trace::{EntryKind, Trace, TraceEntry, TraceRef};
use crate::store::ChunkRef;

/// Chunk bytes one replay batch asks for at most: a few ranged GETs of a pack on S3, one
/// `ReadChunks` call to a daemon.
const BATCH_BYTES: u64 = 8 << 20;
/// The first batch's limit; each next one doubles it up to [`BATCH_BYTES`]. The job starts
/// with the trace, so what it needs first must arrive after one round trip, not after a whole
/// large batch has crossed the link (measured: a Python start on grpc+tcp at 20 ms round trips
/// waited 170-200 ms for its first reads behind 8 MiB batches).
const FIRST_BATCH_BYTES: u64 = 256 << 10;
/// Entries one replay batch takes at most (directories and blob indexes weigh nothing).
const BATCH_ENTRIES: usize = 1024;
/// Replay batches in flight at once: two keep a long link busy while one is being answered.
pub const BATCHES_IN_FLIGHT: usize = 2;
/// The xattr on the mount root describing the trace being recorded or replayed (text).
pub const XATTR_TRACE: &str = "user.granary.trace";

/// Records first reads and feeds a replay's bookkeeping; one per mount that does either.
pub struct Tracer {
    tree: Option<B3Digest>,
    recording: bool,
    seen: Mutex<Seen>,
    replay: Option<Replay>,
}

#[derive(Default)]
struct Seen {
    set: HashSet<(EntryKind, B3Digest)>,
    order: Vec<TraceEntry>,
}

/// A replay in progress: the trace, how far the job has come in it, and what it brought.
pub struct Replay {
    trace: TraceRef,
    /// Chunk bytes the replay may fetch ahead of the job.
    budget: u64,
    loaded: OnceLock<Loaded>,
    /// Chunks the replay asked for.
    requested: Mutex<HashSet<B3Digest>>,
    /// One past the furthest traced chunk the job has read.
    job_pos: AtomicUsize,
    /// Chunk bytes the job read outside the trace since it last read a traced chunk.
    stray: AtomicU64,
    moved: tokio::sync::Notify,
    stop: AtomicBool,
    state: Mutex<String>,
    c: Counters,
}

struct Loaded {
    entries: Vec<TraceEntry>,
    /// `cum[i]`: chunk bytes of `entries[..i]`.
    cum: Vec<u64>,
    /// Where each traced chunk is.
    index: HashMap<B3Digest, usize>,
}

#[derive(Default)]
struct Counters {
    prefetched_chunks: AtomicU64,
    prefetched_bytes: AtomicU64,
    failed: AtomicU64,
    dirs: AtomicU64,
    blob_indexes: AtomicU64,
    used_chunks: AtomicU64,
    used_bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    outside: AtomicU64,
    batches: AtomicU64,
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Tracer {
    /// A tracer for a mount of `tree`, recording if asked, and replaying `replay` (with up to
    /// `budget` chunk bytes ahead of the job) if given.
    pub fn new(
        tree: Option<B3Digest>,
        recording: bool,
        replay: Option<TraceRef>,
        budget: u64,
    ) -> Self {
        Tracer {
            tree,
            recording,
            seen: Mutex::default(),
            replay: replay.map(|trace| Replay {
                trace,
                budget,
                loaded: OnceLock::new(),
                requested: Mutex::default(),
                job_pos: AtomicUsize::new(0),
                stray: AtomicU64::new(0),
                moved: tokio::sync::Notify::new(),
                stop: AtomicBool::new(false),
                state: Mutex::new("loading".into()),
                c: Counters::default(),
            }),
        }
    }

    /// A read of chunks `first..=last` of a blob by the job (not by prefetch).
    pub fn on_read(&self, cache: &ChunkCache, layout: &Layout, first: usize, last: usize) {
        let mut seen = lock(&self.seen);
        let seen = &mut *seen;
        // Every blob whose layout the read had to fetch, one chunk or many: a file above the
        // chunker's minimum may still be one chunk, but only its blob index says so.
        if cache.needs_layout(layout.size())
            && seen.set.insert((EntryKind::Blob, layout.digest))
            && self.recording
        {
            seen.order.push(TraceEntry {
                kind: EntryKind::Blob,
                digest: layout.digest,
                size: layout.size(),
            });
        }
        for c in layout.chunks.get(first..=last).unwrap_or_default() {
            if !seen.set.insert((EntryKind::Chunk, c.digest)) {
                continue;
            }
            if self.recording {
                seen.order.push(TraceEntry {
                    kind: EntryKind::Chunk,
                    digest: c.digest,
                    size: c.size,
                });
            }
            if let Some(r) = &self.replay {
                r.job_read(c);
            }
        }
    }

    /// A directory the job needed (a lookup or a listing).
    pub fn on_dir(&self, digest: B3Digest) {
        if !self.recording {
            return;
        }
        let mut seen = lock(&self.seen);
        if seen.set.insert((EntryKind::Dir, digest)) {
            seen.order.push(TraceEntry {
                kind: EntryKind::Dir,
                digest,
                size: 0,
            });
        }
    }

    /// What has been recorded so far (empty if not recording).
    pub fn recorded(&self) -> Trace {
        Trace {
            tree: self.tree,
            runs: 1,
            entries: lock(&self.seen).order.clone(),
        }
    }

    pub fn recording(&self) -> bool {
        self.recording
    }

    /// A replay is fetching (or has fetched) what the job reads: the mount's guesses by
    /// position (the files after the one read, the small files of a listed directory) would
    /// only compete with it for the link. False once it failed or the job left the trace.
    pub fn replay_leads(&self) -> bool {
        self.replay.as_ref().is_some_and(|r| {
            let st = lock(&r.state);
            !(st.starts_with("failed") || st.starts_with("stopped"))
        })
    }

    /// Ends the replay (at unmount).
    pub fn stop(&self) {
        if let Some(r) = &self.replay {
            r.stop.store(true, Ordering::Relaxed);
            r.moved.notify_one();
        }
    }

    /// The state and figures, one `key value` per line (the root's [`XATTR_TRACE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.recording {
            out.push_str(&format!(
                "recorded_entries {}\n",
                lock(&self.seen).order.len()
            ));
        }
        if let Some(r) = &self.replay {
            out.push_str(&format!("replay {} {}\n", r.trace.name, r.trace.digest));
            out.push_str(&format!("state {}\n", lock(&r.state)));
            if let Some(l) = r.loaded.get() {
                out.push_str(&format!("entries {}\n", l.entries.len()));
                out.push_str(&format!(
                    "trace_chunk_bytes {}\n",
                    l.cum.last().copied().unwrap_or(0)
                ));
            }
            let c = &r.c;
            for (k, v) in [
                ("prefetched_chunks", &c.prefetched_chunks),
                ("prefetched_bytes", &c.prefetched_bytes),
                ("failed", &c.failed),
                ("dirs_loaded", &c.dirs),
                ("blob_indexes_loaded", &c.blob_indexes),
                ("batches", &c.batches),
                ("used_chunks", &c.used_chunks),
                ("used_bytes", &c.used_bytes),
                ("hits", &c.hits),
                ("misses", &c.misses),
                ("outside", &c.outside),
            ] {
                out.push_str(&format!("{k} {}\n", v.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

impl Replay {
    /// The job's first read of chunk `c`.
    fn job_read(&self, c: &ChunkRef) {
        let Some(l) = self.loaded.get() else {
            add(&self.c.misses, 1);
            return;
        };
        match l.index.get(&c.digest) {
            Some(&i) => {
                self.job_pos.fetch_max(i + 1, Ordering::Relaxed);
                self.stray.store(0, Ordering::Relaxed);
                if lock(&self.requested).contains(&c.digest) {
                    add(&self.c.hits, 1);
                    add(&self.c.used_chunks, 1);
                    add(&self.c.used_bytes, c.size);
                } else {
                    add(&self.c.misses, 1);
                }
                self.moved.notify_one();
            }
            None => {
                add(&self.c.outside, 1);
                let stray = self.stray.fetch_add(c.size, Ordering::Relaxed) + c.size;
                if stray >= self.budget {
                    self.moved.notify_one();
                }
            }
        }
    }

    fn set_state(&self, s: impl Into<String>) {
        *lock(&self.state) = s.into();
    }

    /// Whether entry `i` is within the window ahead of the job.
    fn may_fetch(&self, l: &Loaded, i: usize) -> bool {
        let pos = self.job_pos.load(Ordering::Relaxed).min(i);
        l.cum[i] - l.cum[pos] < self.budget
    }

    /// The job has read as much outside the trace as the replay may fetch ahead of it.
    fn left_the_trace(&self) -> bool {
        self.stray.load(Ordering::Relaxed) >= self.budget
    }
}

impl Loaded {
    fn new(entries: Vec<TraceEntry>) -> Self {
        let mut cum = Vec::with_capacity(entries.len() + 1);
        let mut index = HashMap::new();
        let mut total = 0u64;
        for (i, e) in entries.iter().enumerate() {
            cum.push(total);
            if e.kind == EntryKind::Chunk {
                total = total.saturating_add(e.size);
                index.insert(e.digest, i);
            }
        }
        cum.push(total);
        Loaded {
            entries,
            cum,
            index,
        }
    }

    /// The end of the batch that starts at entry `i`, of at most `limit` chunk bytes.
    fn batch_end(&self, i: usize, limit: u64) -> usize {
        let mut j = i;
        while j < self.entries.len() && j - i < BATCH_ENTRIES && self.cum[j] - self.cum[i] < limit {
            j += 1;
        }
        j
    }
}

impl Inner {
    /// Starts replaying the mount's trace in the background, if it has one.
    pub(super) fn start_replay(self: &Arc<Self>) {
        let Some(tracer) = self.tracer.clone() else {
            return;
        };
        if tracer.replay.is_none() {
            return;
        }
        let this = self.clone();
        self.rt.spawn(async move { this.replay(tracer).await });
    }

    async fn replay(self: Arc<Self>, tracer: Arc<Tracer>) {
        let Some(r) = &tracer.replay else {
            return;
        };
        let trace = match crate::trees::trace::load(&self.store, &r.trace).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{e}; the mount goes on without it");
                r.set_state(format!("failed: {e}"));
                return;
            }
        };
        if trace.tree.is_some() && trace.tree != tracer.tree {
            tracing::info!(
                "trace {} was recorded on another version of the tree; what it names that is gone is skipped",
                r.trace.name
            );
        }
        let l = r.loaded.get_or_init(|| Loaded::new(trace.entries));
        r.set_state("running");
        let mut next = 0usize;
        let mut limit = FIRST_BATCH_BYTES;
        let mut inflight = FuturesUnordered::new();
        let end = loop {
            if r.stop.load(Ordering::Relaxed) {
                break "stopped: unmounted";
            }
            if r.left_the_trace() {
                break "stopped: the job left the trace";
            }
            while inflight.len() < BATCHES_IN_FLIGHT
                && next < l.entries.len()
                && r.may_fetch(l, next)
            {
                let stop = l.batch_end(next, limit);
                inflight.push(self.replay_batch(r, &l.entries[next..stop]));
                next = stop;
                limit = (limit * 2).min(BATCH_BYTES);
            }
            if inflight.is_empty() {
                if next >= l.entries.len() {
                    break "done";
                }
                r.set_state("waiting for the job");
                tokio::select! {
                    _ = r.moved.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if !r.stop.load(Ordering::Relaxed) && !r.left_the_trace() {
                    r.set_state("running");
                }
                continue;
            }
            // A batch is never dropped half-way: its chunks are in flight in the cache until
            // it hands them over.
            inflight.next().await;
        };
        while inflight.next().await.is_some() {}
        r.set_state(end);
        tracing::info!(
            "trace {}: {end}; prefetched {} chunks ({} bytes), the job used {} of them",
            r.trace.name,
            r.c.prefetched_chunks.load(Ordering::Relaxed),
            r.c.prefetched_bytes.load(Ordering::Relaxed),
            r.c.used_chunks.load(Ordering::Relaxed),
        );
    }

    /// Fetches one batch of trace entries: its directories as one batch, its blob indexes,
    /// and its chunks as one backend batch.
    async fn replay_batch(&self, r: &Replay, entries: &[TraceEntry]) {
        add(&r.c.batches, 1);
        let dirs: Vec<B3Digest> = {
            let cache = lock(&self.dirs);
            entries
                .iter()
                .filter(|e| e.kind == EntryKind::Dir && !cache.0.contains(&e.digest))
                .map(|e| e.digest)
                .collect()
        };
        let chunks: Vec<ChunkRef> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Chunk)
            .map(|e| ChunkRef {
                digest: e.digest,
                size: e.size,
            })
            .collect();
        lock(&r.requested).extend(chunks.iter().map(|c| c.digest));
        let load_dirs = async {
            if dirs.is_empty() {
                return;
            }
            let fetch = self.store.dirs.get_many(dirs.clone());
            if let Ok(got) = tokio::time::timeout(self.deadline, fetch).await {
                for (digest, res) in dirs.into_iter().zip(got) {
                    if let Ok(Some(dir)) = res {
                        if self.keep_view(digest, &dir).is_ok() {
                            add(&r.c.dirs, 1);
                        }
                    }
                }
            }
        };
        let blobs: Vec<(B3Digest, u64)> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Blob)
            .map(|e| (e.digest, e.size))
            .collect();
        let load_blobs = async {
            let mut loads = FuturesUnordered::new();
            for (digest, size) in blobs {
                let chunks = self.chunks.clone();
                loads.push(async move { chunks.layout_with(&digest, size, true).await.is_ok() });
            }
            while let Some(ok) = loads.next().await {
                if ok {
                    add(&r.c.blob_indexes, 1);
                }
            }
        };
        let (_, _, got) = futures::join!(
            load_dirs,
            load_blobs,
            self.chunks.fetch_batch_with(chunks, true)
        );
        add(&r.c.prefetched_chunks, got.fetched);
        add(&r.c.prefetched_bytes, got.bytes);
        add(&r.c.failed, got.failed);
    }
}
