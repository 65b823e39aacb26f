//! What each strategy would store: unique chunks, their bytes and compressed bytes, blob indexes, directories; shared by every thread.

#[allow(unused_imports)]
use super::*;

/// Encoded length of one `BlobIndex.Chunk` entry inside its parent (tag + length + body).
pub(super) fn index_entry_len(size: u64) -> u64 {
    let body = 2
        + 32
        + if size > 0 {
            1 + encoded_len_varint(size)
        } else {
            0
        };
    (1 + encoded_len_varint(body as u64) + body) as u64
}

/// Encoded length of a whole blob index as stored (with its outboard and checksum), given
/// the sum of its entries' lengths.
pub(super) fn index_len(entries: u64, size: u64) -> u64 {
    let bytes_field = |n: u64| {
        if n == 0 {
            0
        } else {
            1 + encoded_len_varint(n) as u64 + n
        }
    };
    entries
        + if size > 0 {
            1 + encoded_len_varint(size) as u64
        } else {
            0
        }
        + bytes_field(crate::store::outboard::outboard_len(size))
        + bytes_field(16)
}

/// Whether a unique chunk is in the compression sample: chosen by digest, so the same chunk
/// is in or out whatever order files are read in.
pub(super) fn in_sample(digest: &B3Digest, one_in: u64) -> bool {
    if one_in <= 1 {
        return true;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(b) % one_in == 0
}

/// See [`Shared::plan_groups`].
pub(super) const GROUP_SAMPLE_DENSER: u64 = 4;
pub(super) const GROUPS_SAMPLED_MIN: u64 = 256;

/// The distinct chunks of one strategy, shared by all worker threads.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) chunks: HashMap<B3Digest, u64>,
    pub(super) bytes: u64,
}

#[derive(Default)]
pub(super) struct StrategyAcc {
    pub(super) seen: Mutex<Seen>,
    pub(super) zstd_exact: AtomicU64,
    pub(super) sampled_raw: AtomicU64,
    pub(super) sampled_zstd: AtomicU64,
    /// Unique bytes of chunks small enough for a compression group (all of them, exact).
    pub(super) small_bytes: AtomicU64,
    /// Larger chunks in the (digest) sample: their bytes and compressed bytes, alone.
    pub(super) sampled_large_raw: AtomicU64,
    pub(super) sampled_large_zstd: AtomicU64,
    /// Compression groups in the sample (chosen by their first chunk's digest): their plain
    /// and compressed bytes. Every small new chunk goes into a group, in the order read, so a
    /// group holds neighbours as an import's does; sampling chunks one by one would form
    /// groups of strangers and overstate the figure (by 18% on pystore).
    pub(super) pack_raw: AtomicU64,
    pub(super) sampled_packed: AtomicU64,
    pub(super) blob_indexes: AtomicU64,
    pub(super) blob_index_bytes: AtomicU64,
}

/// A snapshot of the cumulative figures of one strategy (for marginal gains).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Totals {
    pub(super) unique_bytes: u64,
    pub(super) unique_chunks: u64,
    pub(super) metadata: u64,
    pub(super) zstd: u64,
    pub(super) packed: u64,
    pub(super) pack_disk: u64,
}

/// State shared by every worker for a whole analysis.
pub(super) struct Shared {
    pub(super) strategies: Vec<Strategy>,
    pub(super) accs: Vec<StrategyAcc>,
    pub(super) level: i32,
    pub(super) sample: u64,
    pub(super) group_bytes: u32,
    /// One compression group in this many is compressed for the packed figures (see
    /// [`Shared::plan_groups`]).
    pub(super) group_one_in: AtomicU64,
    /// New directories, compressed together as a store's metadata group is.
    pub(super) dir_group: Mutex<Group>,
    /// Distinct blobs (whole-file digests) seen so far: a blob index is counted once per blob.
    pub(super) blobs: Mutex<HashSet<B3Digest>>,
    pub(super) dirs: Mutex<HashMap<B3Digest, u64>>,
    pub(super) logical: AtomicU64,
    pub(super) sampled_chunks: AtomicU64,
    pub(super) sampled_bytes: AtomicU64,
}

impl Shared {
    pub(super) fn new(opts: &DedupOptions) -> Self {
        Shared {
            strategies: opts.strategies.clone(),
            accs: opts
                .strategies
                .iter()
                .map(|_| StrategyAcc::default())
                .collect(),
            level: opts.zstd_level,
            sample: opts.sample.max(1),
            group_bytes: opts.group_bytes,
            group_one_in: AtomicU64::new(opts.sample.max(1).div_ceil(GROUP_SAMPLE_DENSER)),
            dir_group: Mutex::default(),
            blobs: Mutex::default(),
            dirs: Mutex::default(),
            logical: AtomicU64::new(0),
            sampled_chunks: AtomicU64::new(0),
            sampled_bytes: AtomicU64::new(0),
        }
    }

    /// Chooses how many compression groups are compressed, once the data's size is known:
    /// groups are sampled [`GROUP_SAMPLE_DENSER`] times as often as chunks, and every one is
    /// while the data holds fewer than [`GROUPS_SAMPLED_MIN`] sampled groups' worth (a
    /// sample of a few 1 MiB groups varies with the order threads read files in).
    pub(super) fn plan_groups(&self, data_bytes: u64) {
        let gb = (self.group_bytes as u64).max(1);
        let most = (data_bytes / (gb * GROUPS_SAMPLED_MIN)).max(1);
        let one_in = self.sample.div_ceil(GROUP_SAMPLE_DENSER).min(most);
        self.group_one_in.store(one_in, Ordering::Relaxed);
    }

    /// Distinct directories: count and encoded bytes.
    pub(super) fn dir_totals(&self) -> (u64, u64) {
        let d = lock(&self.dirs);
        (d.len() as u64, d.values().sum())
    }

    /// Compressed bytes of the unique chunks, alone and packed: exact, or scaled from the
    /// samples (packed: larger chunks from the digest sample, as they are stored alone; small
    /// ones from the groups of the packing sample).
    pub(super) fn zstd_estimate(&self, i: usize, unique_bytes: u64) -> (u64, u64) {
        let a = &self.accs[i];
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        // `bytes` scaled by the sample's compressed/plain ratio (no sample: left as it is).
        let scale = |bytes: u64, z: u64, raw: u64| {
            if raw == 0 {
                bytes
            } else {
                (bytes as f64 * z as f64 / raw as f64).round() as u64
            }
        };
        let small = load(&a.small_bytes).min(unique_bytes);
        if self.sample <= 1 {
            return (
                load(&a.zstd_exact),
                load(&a.sampled_large_zstd) + load(&a.sampled_packed),
            );
        }
        (
            scale(unique_bytes, load(&a.sampled_zstd), load(&a.sampled_raw)),
            scale(
                unique_bytes - small,
                load(&a.sampled_large_zstd),
                load(&a.sampled_large_raw),
            ) + scale(small, load(&a.sampled_packed), load(&a.pack_raw)),
        )
    }

    /// Directories as packed: the groups compressed so far and the open one's bytes
    /// compressed now.
    fn dirs_packed(&self) -> u64 {
        let g = lock(&self.dir_group);
        let open = if g.plain.is_empty() {
            0
        } else {
            zstd::bulk::compress(&g.plain, self.level).map_or(g.plain.len(), |z| z.len()) as u64
        };
        g.packed + open
    }

    pub(super) fn totals(&self) -> Vec<Totals> {
        let (dir_count, dir_bytes) = self.dir_totals();
        let dirs_packed = if self.group_bytes > 0 {
            self.dirs_packed()
        } else {
            dir_bytes
        };
        (0..self.accs.len())
            .map(|i| {
                let (unique_bytes, unique_chunks) = {
                    let s = lock(&self.accs[i].seen);
                    (s.bytes, s.chunks.len() as u64)
                };
                let a = &self.accs[i];
                let (zstd, chunks_packed) = self.zstd_estimate(i, unique_bytes);
                let (indexes, index_bytes) = (
                    a.blob_indexes.load(Ordering::Relaxed),
                    a.blob_index_bytes.load(Ordering::Relaxed),
                );
                let packed = chunks_packed + dirs_packed + index_bytes;
                Totals {
                    unique_bytes,
                    unique_chunks,
                    metadata: index_bytes + dir_bytes,
                    zstd,
                    packed,
                    pack_disk: packed
                        + crate::store::pack::GROUPED_ENTRY_BYTES
                            * (unique_chunks + indexes + dir_count),
                }
            })
            .collect()
    }

    /// Records a directory (canonical encoding) once per digest.
    pub(super) fn add_dir(&self, dir: &Directory) -> B3Digest {
        let bytes = dir.encode_canonical();
        let d = B3Digest::of(&bytes);
        let new = lock(&self.dirs).insert(d, bytes.len() as u64).is_none();
        if new && self.group_bytes > 0 {
            let mut g = lock(&self.dir_group);
            if crate::store::pack::grouped(self.group_bytes, bytes.len()) {
                g.plain.extend_from_slice(&bytes);
                if g.plain.len() >= self.group_bytes as usize {
                    let z = zstd::bulk::compress(&g.plain, self.level)
                        .map_or(g.plain.len(), |z| z.len());
                    g.packed += z as u64;
                    g.plain.clear();
                }
            } else {
                // A big directory is stored alone, as it is.
                g.packed += bytes.len() as u64;
            }
        }
        d
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking worker cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A compression group being filled, and the compressed bytes of those already full.
#[derive(Default)]
pub(super) struct Group {
    pub(super) plain: Vec<u8>,
    pub(super) packed: u64,
}

/// Counts bytes written (the size of a streamed zstd frame).
#[derive(Default)]
pub(super) struct CountingSink(pub(super) u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
