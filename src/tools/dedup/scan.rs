//! Reading data once through every strategy at once: the cutters (whole file, fixed, FastCDC) and per-thread workers.

#[allow(unused_imports)]
use super::*;

/// Files up to this size are buffered for the whole-file strategy and compressed only if new;
/// larger ones are compressed as they stream (and the result dropped if they turn out dupes).
pub(super) const WHOLE_BUFFER_MAX: usize = 1 << 20;

pub(super) enum Cutter {
    Whole {
        buf: Vec<u8>,
        enc: Option<zstd::stream::write::Encoder<'static, CountingSink>>,
        /// Whether this file is compressed at all (always when every chunk is; else chosen
        /// by its first bytes, known before it streams past the buffer).
        sampled: Option<bool>,
    },
    Fixed {
        size: usize,
        buf: Vec<u8>,
    },
    Cdc(Box<Chunker>),
}

/// Per-thread state: reusable compressor, and per strategy the compression group being
/// filled with this thread's small sampled chunks.
pub(super) struct Worker<'a> {
    pub(super) shared: &'a Shared,
    pub(super) compressor: zstd::bulk::Compressor<'static>,
    pub(super) groups: Vec<Group>,
}

/// A compression group being filled by one worker, and whether it is in the sample.
#[derive(Default)]
pub(super) struct Group {
    /// Plain bytes in the group so far (kept only for a group in the sample).
    len: usize,
    plain: Vec<u8>,
    sampled: bool,
}

/// One file being analysed: its bytes go through every strategy's cutter.
pub(super) struct FileScan<'w, 'a> {
    pub(super) worker: &'w mut Worker<'a>,
    pub(super) cutters: Vec<Cutter>,
    /// Per strategy: chunks of this file and the encoded length of their index entries.
    pub(super) index: Vec<(u64, u64)>,
    pub(super) whole: blake3::Hasher,
    pub(super) size: u64,
}

impl<'a> Worker<'a> {
    pub(super) fn new(shared: &'a Shared) -> Result<Self, DedupError> {
        let compressor = zstd::bulk::Compressor::new(shared.level)
            .map_err(|e| DedupError::Task(format!("zstd: {e}")))?;
        Ok(Worker {
            shared,
            compressor,
            groups: (0..shared.strategies.len())
                .map(|_| Group::default())
                .collect(),
        })
    }

    /// Whether a chunk of `len` bytes goes into a compression group.
    fn small(&self, len: u64) -> bool {
        crate::store::pack::grouped(self.shared.group_bytes, len as usize)
    }

    /// Accounts a new chunk's compressed size `z` alone, for the packed figures of strategy
    /// `i` (if it is stored alone there).
    fn sampled_alone(&self, i: usize, len: u64, z: u64) {
        if !self.small(len) {
            let acc = &self.shared.accs[i];
            acc.sampled_large_raw.fetch_add(len, Ordering::Relaxed);
            acc.sampled_large_zstd.fetch_add(z, Ordering::Relaxed);
        }
    }

    /// Adds a small new chunk to this thread's open group of strategy `i` (a group in the
    /// sample keeps its bytes, to be compressed when full).
    fn pack(&mut self, i: usize, digest: &B3Digest, data: &[u8]) -> Result<(), DedupError> {
        let g = &mut self.groups[i];
        if g.len == 0 {
            g.sampled = in_sample(digest, self.shared.group_one_in.load(Ordering::Relaxed));
        }
        g.len += data.len();
        if g.sampled {
            g.plain.extend_from_slice(data);
        }
        if g.len >= self.shared.group_bytes as usize {
            self.seal(i)?;
        }
        Ok(())
    }

    fn seal(&mut self, i: usize) -> Result<(), DedupError> {
        let g = &mut self.groups[i];
        g.len = 0;
        if g.plain.is_empty() {
            return Ok(());
        }
        let z = self
            .compressor
            .compress(&g.plain)
            .map_err(|e| DedupError::Task(format!("zstd: {e}")))?
            .len() as u64;
        let acc = &self.shared.accs[i];
        acc.pack_raw
            .fetch_add(g.plain.len() as u64, Ordering::Relaxed);
        acc.sampled_packed.fetch_add(z, Ordering::Relaxed);
        g.plain.clear();
        Ok(())
    }

    /// Compresses the groups left open (at the end of an input, as an import's last pack).
    pub(super) fn finish(&mut self) -> Result<(), DedupError> {
        (0..self.groups.len()).try_for_each(|i| self.seal(i))
    }

    pub(super) fn scan(&mut self) -> FileScan<'_, 'a> {
        let cutters = self
            .shared
            .strategies
            .iter()
            .map(|s| match s {
                Strategy::WholeFile => Cutter::Whole {
                    buf: Vec::new(),
                    enc: None,
                    sampled: None,
                },
                Strategy::Fixed(n) => Cutter::Fixed {
                    size: *n as usize,
                    buf: Vec::new(),
                },
                Strategy::FastCdc(p) | Strategy::Store(p) => {
                    Cutter::Cdc(Box::new(Chunker::new(*p)))
                }
            })
            .collect();
        let n = self.shared.strategies.len();
        FileScan {
            worker: self,
            cutters,
            index: vec![(0, 0); n],
            whole: blake3::Hasher::new(),
            size: 0,
        }
    }

    /// Accounts one chunk of strategy `i`.
    pub(super) fn chunk(&mut self, i: usize, data: &[u8]) -> Result<(), DedupError> {
        let digest = B3Digest::of(data);
        let len = data.len() as u64;
        let acc = &self.shared.accs[i];
        let new = {
            let mut s = lock(&acc.seen);
            let new = s.chunks.insert(digest, len).is_none();
            if new {
                s.bytes += len;
            }
            new
        };
        let small = self.small(len);
        if new && small {
            acc.small_bytes.fetch_add(len, Ordering::Relaxed);
        }
        if new && in_sample(&digest, self.shared.sample) {
            let z = self
                .compressor
                .compress(data)
                .map_err(|e| DedupError::Task(format!("zstd: {e}")))?
                .len() as u64;
            acc.zstd_exact.fetch_add(z, Ordering::Relaxed);
            acc.sampled_raw.fetch_add(len, Ordering::Relaxed);
            acc.sampled_zstd.fetch_add(z, Ordering::Relaxed);
            self.shared.sampled_chunks.fetch_add(1, Ordering::Relaxed);
            self.shared.sampled_bytes.fetch_add(len, Ordering::Relaxed);
            self.sampled_alone(i, len, z);
        }
        if new && small {
            self.pack(i, &digest, data)?;
        }
        Ok(())
    }
}

impl FileScan<'_, '_> {
    pub(super) fn push(&mut self, data: &[u8]) -> Result<(), DedupError> {
        self.whole.update(data);
        self.size += data.len() as u64;
        let so_far = self.size;
        let FileScan {
            worker,
            cutters,
            index,
            ..
        } = self;
        let zerr = |e: std::io::Error| DedupError::Task(format!("zstd: {e}"));
        for (i, cutter) in cutters.iter_mut().enumerate() {
            match cutter {
                Cutter::Whole { buf, enc, sampled } => {
                    let one_in = worker.shared.sample;
                    // A file in the sample is chosen by its first bytes: the same files every
                    // run, and known before a big one must start streaming.
                    let sampled = *sampled.get_or_insert_with(|| {
                        one_in <= 1
                            || in_sample(&B3Digest::of(&data[..data.len().min(4096)]), one_in)
                    });
                    // Buffered if in the sample, or while small enough for a group.
                    let small = worker.small(so_far);
                    if !sampled && !small {
                        *buf = Vec::new();
                        continue;
                    }
                    if enc.is_none() && buf.len() + data.len() > WHOLE_BUFFER_MAX {
                        let mut e = zstd::stream::write::Encoder::new(
                            CountingSink::default(),
                            worker.shared.level,
                        )
                        .map_err(zerr)?;
                        e.write_all(buf).map_err(zerr)?;
                        *buf = Vec::new();
                        *enc = Some(e);
                    }
                    match enc {
                        Some(e) => e.write_all(data).map_err(zerr)?,
                        None => buf.extend_from_slice(data),
                    }
                }
                Cutter::Fixed { size, buf } => {
                    let size = *size;
                    let mut rest = data;
                    while !rest.is_empty() {
                        // Whole chunks straight from the input; partial ones via the buffer.
                        if buf.is_empty() && rest.len() >= size {
                            let (c, r) = rest.split_at(size);
                            rest = r;
                            note(&mut index[i], size as u64);
                            worker.chunk(i, c)?;
                            continue;
                        }
                        let take = (size - buf.len()).min(rest.len());
                        buf.extend_from_slice(&rest[..take]);
                        rest = &rest[take..];
                        if buf.len() == size {
                            note(&mut index[i], size as u64);
                            worker.chunk(i, buf)?;
                            buf.clear();
                        }
                    }
                }
                Cutter::Cdc(chunker) => {
                    chunker.push(data);
                    while let Some(c) = chunker.next_chunk() {
                        note(&mut index[i], c.len() as u64);
                        worker.chunk(i, &c)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the file: flushes every cutter, accounts the whole-file chunk and, if this blob is
    /// new, its blob index per strategy. Returns the blob digest and size.
    pub(super) fn finish(mut self) -> Result<(B3Digest, u64), DedupError> {
        {
            let FileScan {
                worker,
                cutters,
                index,
                ..
            } = &mut self;
            for (i, cutter) in cutters.iter_mut().enumerate() {
                match cutter {
                    Cutter::Fixed { buf, .. } => {
                        if !buf.is_empty() {
                            note(&mut index[i], buf.len() as u64);
                            worker.chunk(i, buf)?;
                            buf.clear();
                        }
                    }
                    Cutter::Cdc(chunker) => {
                        while let Some(c) = chunker.finish_chunk() {
                            note(&mut index[i], c.len() as u64);
                            worker.chunk(i, &c)?;
                        }
                    }
                    Cutter::Whole { .. } => {}
                }
            }
        }
        let digest = B3Digest::from(self.whole.finalize());
        let shared = self.worker.shared;
        // The whole-file strategy: one chunk per non-empty blob.
        for i in 0..self.cutters.len() {
            let Cutter::Whole { buf, enc, sampled } = &mut self.cutters[i] else {
                continue;
            };
            let sampled = sampled.unwrap_or(false);
            if self.size == 0 {
                continue;
            }
            let acc = &shared.accs[i];
            let new = {
                let mut s = lock(&acc.seen);
                let new = s.chunks.insert(digest, self.size).is_none();
                if new {
                    s.bytes += self.size;
                }
                new
            };
            let small = self.worker.small(self.size);
            if new && small {
                acc.small_bytes.fetch_add(self.size, Ordering::Relaxed);
            }
            if new && small && buf.len() as u64 == self.size {
                self.worker.pack(i, &digest, buf)?;
            }
            if new && sampled {
                let z = match enc.take() {
                    Some(e) => {
                        e.finish()
                            .map_err(|e| DedupError::Task(format!("zstd: {e}")))?
                            .0
                    }
                    None => self
                        .worker
                        .compressor
                        .compress(buf)
                        .map_err(|e| DedupError::Task(format!("zstd: {e}")))?
                        .len() as u64,
                };
                acc.zstd_exact.fetch_add(z, Ordering::Relaxed);
                acc.sampled_raw.fetch_add(self.size, Ordering::Relaxed);
                acc.sampled_zstd.fetch_add(z, Ordering::Relaxed);
                shared.sampled_chunks.fetch_add(1, Ordering::Relaxed);
                shared.sampled_bytes.fetch_add(self.size, Ordering::Relaxed);
                self.worker.sampled_alone(i, self.size, z);
            }
        }
        if digest != empty_blob() && lock(&shared.blobs).insert(digest) {
            for (i, (chunks, entries)) in self.index.iter().enumerate() {
                if *chunks > 1 {
                    let acc = &shared.accs[i];
                    acc.blob_indexes.fetch_add(1, Ordering::Relaxed);
                    let len = index_len(*entries, self.size);
                    acc.blob_index_bytes.fetch_add(len, Ordering::Relaxed);
                }
            }
        }
        Ok((digest, self.size))
    }
}

/// Counts one chunk of a file towards its (hypothetical) blob index.
pub(super) fn note(index: &mut (u64, u64), len: u64) {
    index.0 += 1;
    index.1 += index_entry_len(len);
}
