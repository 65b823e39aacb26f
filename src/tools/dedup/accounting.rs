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
    pub(super) disk_exact: AtomicU64,
    pub(super) sampled_raw: AtomicU64,
    pub(super) sampled_zstd: AtomicU64,
    pub(super) sampled_disk: AtomicU64,
    pub(super) blob_indexes: AtomicU64,
    pub(super) blob_index_bytes: AtomicU64,
    pub(super) blob_index_disk: AtomicU64,
}

/// Filesystem block size assumed for `disk_bytes` (ext4's default).
pub const BLOCK: u64 = 4096;

/// Bytes a file of `len` bytes occupies in whole blocks.
pub(super) fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// A snapshot of the cumulative figures of one strategy (for marginal gains).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Totals {
    pub(super) unique_bytes: u64,
    pub(super) unique_chunks: u64,
    pub(super) metadata: u64,
    pub(super) zstd: u64,
    pub(super) disk: u64,
}

/// State shared by every worker for a whole analysis.
pub(super) struct Shared {
    pub(super) strategies: Vec<Strategy>,
    pub(super) accs: Vec<StrategyAcc>,
    pub(super) level: i32,
    pub(super) sample: u64,
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
            blobs: Mutex::default(),
            dirs: Mutex::default(),
            logical: AtomicU64::new(0),
            sampled_chunks: AtomicU64::new(0),
            sampled_bytes: AtomicU64::new(0),
        }
    }

    /// Distinct directories: count, encoded bytes, and bytes in whole blocks.
    pub(super) fn dir_totals(&self) -> (u64, u64, u64) {
        let d = lock(&self.dirs);
        (
            d.len() as u64,
            d.values().sum(),
            d.values().map(|&l| blocks(l)).sum(),
        )
    }

    /// Compressed bytes of the unique chunks, and the same in whole blocks: exact, or
    /// scaled from the sample.
    pub(super) fn zstd_estimate(&self, i: usize, unique_bytes: u64) -> (u64, u64) {
        let a = &self.accs[i];
        if self.sample <= 1 {
            return (
                a.zstd_exact.load(Ordering::Relaxed),
                a.disk_exact.load(Ordering::Relaxed),
            );
        }
        let raw = a.sampled_raw.load(Ordering::Relaxed);
        let scale = |v: u64| {
            if raw == 0 {
                unique_bytes
            } else {
                (unique_bytes as f64 * v as f64 / raw as f64).round() as u64
            }
        };
        (
            scale(a.sampled_zstd.load(Ordering::Relaxed)),
            scale(a.sampled_disk.load(Ordering::Relaxed)),
        )
    }

    pub(super) fn totals(&self) -> Vec<Totals> {
        let (_, dir_bytes, dir_disk) = self.dir_totals();
        (0..self.accs.len())
            .map(|i| {
                let (unique_bytes, unique_chunks) = {
                    let s = lock(&self.accs[i].seen);
                    (s.bytes, s.chunks.len() as u64)
                };
                let a = &self.accs[i];
                let (zstd, zstd_disk) = self.zstd_estimate(i, unique_bytes);
                Totals {
                    unique_bytes,
                    unique_chunks,
                    metadata: a.blob_index_bytes.load(Ordering::Relaxed) + dir_bytes,
                    zstd,
                    disk: zstd_disk + a.blob_index_disk.load(Ordering::Relaxed) + dir_disk,
                }
            })
            .collect()
    }

    /// Records a directory (canonical encoding) once per digest.
    pub(super) fn add_dir(&self, dir: &Directory) -> B3Digest {
        let bytes = dir.encode_canonical();
        let d = B3Digest::of(&bytes);
        lock(&self.dirs).insert(d, bytes.len() as u64);
        d
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking worker cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
