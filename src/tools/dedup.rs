//! `granary dedup`: how much each chunking strategy would save on some data, without writing
//! a store (DESIGN.md §2: the store's default parameters are chosen from this report).
//!
//! One pass over the data: every file is read once and its bytes are pushed through every
//! chunker at the same time (whole-file, fixed-size, FastCDC with any parameters, and the
//! store's own parameters). Files are analysed in parallel on a bounded set of threads, each
//! streaming its file through fixed-size buffers, so memory per file is bounded whatever its
//! size; only the sets of unique chunk digests grow with the data.
//!
//! The `store` strategy is accounted exactly as `granary import` stores: chunks are keyed by
//! blake3 of their bytes, a one-chunk blob is stored as that chunk (no index), the empty blob
//! is never stored, a multi-chunk blob has one blob index per distinct blob, directories are
//! their canonical protobuf, and chunks are compressed with `zstd::bulk` at the store's level.
//! With every unique chunk compressed (`sample == 1`) its `stored_bytes` therefore equals
//! what the store's objects occupy after an import of the same data.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use prost::encoding::encoded_len_varint;
use serde::Serialize;

use crate::model::castore::{B3Digest, Directory, Node};
use crate::model::chunking::{ChunkParams, Chunker};
use crate::store::{empty_blob, BlobReader, Store, StoreError};
use crate::trees::import::Progress;
use crate::units::parse_size;

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("bad strategy {spec:?}: {reason}")]
    Strategy { spec: String, reason: String },
    #[error("dedup task failed: {0}")]
    Task(String),
}

impl DedupError {
    fn path(path: &Path, reason: impl Into<String>) -> Self {
        DedupError::Path {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// How files are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One chunk per file.
    WholeFile,
    /// Fixed-size chunks of this many bytes (the last may be shorter).
    Fixed(u32),
    /// FastCDC v2020 with these parameters.
    FastCdc(ChunkParams),
    /// FastCDC with the parameters of the store (named `store` in reports).
    Store(ChunkParams),
}

/// A size as the shortest K/M/G spelling that is exact, else plain bytes.
pub fn show_size(n: u64) -> String {
    for (suffix, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        if n != 0 && n % (1 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

impl Strategy {
    /// Parses `whole-file`, `fixed:SIZE`, `fastcdc:MIN/AVG/MAX`, `fastcdc:AVG` (min = avg/4,
    /// max = avg×4) or `store` (the store's parameters, given here).
    pub fn parse(spec: &str, store: ChunkParams) -> Result<Self, DedupError> {
        let bad = |reason: String| DedupError::Strategy {
            spec: spec.to_string(),
            reason,
        };
        let (kind, arg) = match spec.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        match (kind, arg) {
            ("whole-file" | "whole" | "file", None) => Ok(Strategy::WholeFile),
            ("store", None) => Ok(Strategy::Store(store)),
            ("fixed", Some(a)) => {
                let n: u32 = parse_size(a).map_err(bad)?;
                if n == 0 || n as usize > crate::model::chunking::MAX_CHUNK {
                    return Err(bad(format!(
                        "size must be in 1..={}",
                        crate::model::chunking::MAX_CHUNK
                    )));
                }
                Ok(Strategy::Fixed(n))
            }
            ("fastcdc" | "cdc", Some(a)) if a.contains('/') => {
                Ok(Strategy::FastCdc(ChunkParams::parse(a).map_err(bad)?))
            }
            ("fastcdc" | "cdc", Some(a)) => {
                let avg: u32 = parse_size(a).map_err(bad)?;
                let p = around(avg).ok_or_else(|| bad("average too large".into()))?;
                p.validate().map_err(|e| bad(e.to_string()))?;
                Ok(Strategy::FastCdc(p))
            }
            _ => Err(bad(
                "want whole-file, fixed:SIZE, fastcdc:MIN/AVG/MAX, fastcdc:AVG or store".into(),
            )),
        }
    }

    /// The name used in reports; parses back to the same strategy.
    pub fn name(&self) -> String {
        match self {
            Strategy::WholeFile => "whole-file".into(),
            Strategy::Fixed(n) => format!("fixed:{}", show_size(u64::from(*n))),
            Strategy::FastCdc(p) => format!(
                "fastcdc:{}/{}/{}",
                show_size(p.min.into()),
                show_size(p.avg.into()),
                show_size(p.max.into())
            ),
            Strategy::Store(_) => "store".into(),
        }
    }

    /// What the strategy cuts with, spelled out (for `store`, its parameters).
    pub fn describe(&self) -> String {
        match self {
            Strategy::Store(p) => Strategy::FastCdc(*p).name(),
            s => s.name(),
        }
    }
}

/// FastCDC parameters with min = avg/4 and max = avg×4.
fn around(avg: u32) -> Option<ChunkParams> {
    Some(ChunkParams {
        min: avg / 4,
        avg,
        max: avg.checked_mul(4)?,
    })
}

/// The default strategy set: whole-file, fixed 64K, FastCDC at average 16K, 64K, 256K and 1M.
pub fn default_strategies() -> Vec<Strategy> {
    let mut v = vec![Strategy::WholeFile, Strategy::Fixed(64 << 10)];
    for avg in [16u32 << 10, 64 << 10, 256 << 10, 1 << 20] {
        if let Some(p) = around(avg) {
            v.push(Strategy::FastCdc(p));
        }
    }
    v
}

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    pub strategies: Vec<Strategy>,
    /// zstd level used to estimate stored bytes (the store's level).
    pub zstd_level: i32,
    /// Compress one unique chunk in `sample` (chosen by digest, so deterministic); 1 = all.
    pub sample: u64,
    /// Files analysed at once (default: the number of cores).
    pub jobs: Option<usize>,
}

impl Default for DedupOptions {
    fn default() -> Self {
        Self {
            strategies: default_strategies(),
            zstd_level: crate::store::StoreConfig::default().zstd_level,
            sample: 1,
            jobs: None,
        }
    }
}

/// The increments one input (a PATH, or a root of a store) adds given the inputs before it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Marginal {
    pub input: String,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub unique_chunks: u64,
    pub metadata_bytes: u64,
    pub zstd_bytes: u64,
    pub stored_bytes: u64,
}

/// The figures for one strategy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StrategyReport {
    pub strategy: String,
    /// The chunker spelled out (differs from `strategy` for `store`).
    pub chunker: String,
    pub logical_bytes: u64,
    /// Bytes of distinct chunks.
    pub unique_bytes: u64,
    /// logical / unique.
    pub dedup_ratio: f64,
    pub unique_chunks: u64,
    /// Sizes of the distinct chunks.
    pub mean_chunk: u64,
    pub median_chunk: u64,
    pub p99_chunk: u64,
    /// Distinct multi-chunk blobs, each needing a blob index.
    pub blob_indexes: u64,
    pub blob_index_bytes: u64,
    pub directories: u64,
    pub directory_bytes: u64,
    /// blob_index_bytes + directory_bytes.
    pub metadata_bytes: u64,
    /// Distinct chunks after zstd (exact, or scaled from the sample).
    pub zstd_bytes: u64,
    /// zstd_bytes + metadata_bytes: what a store of this strategy would occupy.
    pub stored_bytes: u64,
    /// logical / stored.
    pub stored_ratio: f64,
    /// What the objects of a local store (one file each) occupy in whole 4 KiB blocks.
    pub disk_bytes: u64,
    pub marginal: Vec<Marginal>,
}

/// Which chunks were compressed to estimate `zstd_bytes`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SampleInfo {
    /// One unique chunk in `one_in` (by digest); 1 means every chunk, so figures are exact.
    pub one_in: u64,
    /// Chunks compressed over all strategies, and their uncompressed bytes.
    pub chunks: u64,
    pub bytes: u64,
}

/// A whole `granary dedup` report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub inputs: Vec<String>,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Devices, fifos and sockets, which a store cannot hold and are left out.
    pub skipped_special: u64,
    pub logical_bytes: u64,
    pub zstd_level: i32,
    pub sample: SampleInfo,
    pub strategies: Vec<StrategyReport>,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Encoded length of one `BlobIndex.Chunk` entry inside its parent (tag + length + body).
fn index_entry_len(size: u64) -> u64 {
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
fn index_len(entries: u64, size: u64) -> u64 {
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
fn in_sample(digest: &B3Digest, one_in: u64) -> bool {
    if one_in <= 1 {
        return true;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(b) % one_in == 0
}

/// The distinct chunks of one strategy, shared by all worker threads.
#[derive(Default)]
struct Seen {
    chunks: HashMap<B3Digest, u64>,
    bytes: u64,
}

#[derive(Default)]
struct StrategyAcc {
    seen: Mutex<Seen>,
    zstd_exact: AtomicU64,
    disk_exact: AtomicU64,
    sampled_raw: AtomicU64,
    sampled_zstd: AtomicU64,
    sampled_disk: AtomicU64,
    blob_indexes: AtomicU64,
    blob_index_bytes: AtomicU64,
    blob_index_disk: AtomicU64,
}

/// Filesystem block size assumed for `disk_bytes` (ext4's default).
pub const BLOCK: u64 = 4096;

/// Bytes a file of `len` bytes occupies in whole blocks.
fn blocks(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK
}

/// A snapshot of the cumulative figures of one strategy (for marginal gains).
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    unique_bytes: u64,
    unique_chunks: u64,
    metadata: u64,
    zstd: u64,
    disk: u64,
}

/// State shared by every worker for a whole analysis.
struct Shared {
    strategies: Vec<Strategy>,
    accs: Vec<StrategyAcc>,
    level: i32,
    sample: u64,
    /// Distinct blobs (whole-file digests) seen so far: a blob index is counted once per blob.
    blobs: Mutex<HashSet<B3Digest>>,
    dirs: Mutex<HashMap<B3Digest, u64>>,
    logical: AtomicU64,
    sampled_chunks: AtomicU64,
    sampled_bytes: AtomicU64,
}

impl Shared {
    fn new(opts: &DedupOptions) -> Self {
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
    fn dir_totals(&self) -> (u64, u64, u64) {
        let d = lock(&self.dirs);
        (
            d.len() as u64,
            d.values().sum(),
            d.values().map(|&l| blocks(l)).sum(),
        )
    }

    /// Compressed bytes of the unique chunks, and the same in whole blocks: exact, or
    /// scaled from the sample.
    fn zstd_estimate(&self, i: usize, unique_bytes: u64) -> (u64, u64) {
        let a = &self.accs[i];
        if self.sample <= 1 || self.strategies[i] == Strategy::WholeFile {
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

    fn totals(&self) -> Vec<Totals> {
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
    fn add_dir(&self, dir: &Directory) -> B3Digest {
        let bytes = dir.encode_canonical();
        let d = B3Digest::of(&bytes);
        lock(&self.dirs).insert(d, bytes.len() as u64);
        d
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking worker cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts bytes written (the size of a streamed zstd frame).
#[derive(Default)]
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Files up to this size are buffered for the whole-file strategy and compressed only if new;
/// larger ones are compressed as they stream (and the result dropped if they turn out dupes).
const WHOLE_BUFFER_MAX: usize = 1 << 20;

enum Cutter {
    Whole {
        buf: Vec<u8>,
        enc: Option<zstd::stream::write::Encoder<'static, CountingSink>>,
    },
    Fixed {
        size: usize,
        buf: Vec<u8>,
    },
    Cdc(Box<Chunker>),
}

/// Per-thread state: reusable compressor and read buffer.
struct Worker<'a> {
    shared: &'a Shared,
    compressor: zstd::bulk::Compressor<'static>,
}

/// One file being analysed: its bytes go through every strategy's cutter.
struct FileScan<'w, 'a> {
    worker: &'w mut Worker<'a>,
    cutters: Vec<Cutter>,
    /// Per strategy: chunks of this file and the encoded length of their index entries.
    index: Vec<(u64, u64)>,
    whole: blake3::Hasher,
    size: u64,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared) -> Result<Self, DedupError> {
        let compressor = zstd::bulk::Compressor::new(shared.level)
            .map_err(|e| DedupError::Task(format!("zstd: {e}")))?;
        Ok(Worker { shared, compressor })
    }

    fn scan(&mut self) -> FileScan<'_, 'a> {
        let cutters = self
            .shared
            .strategies
            .iter()
            .map(|s| match s {
                Strategy::WholeFile => Cutter::Whole {
                    buf: Vec::new(),
                    enc: None,
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
    fn chunk(&mut self, i: usize, data: &[u8]) -> Result<(), DedupError> {
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
        if new && in_sample(&digest, self.shared.sample) {
            let z = self
                .compressor
                .compress(data)
                .map_err(|e| DedupError::Task(format!("zstd: {e}")))?
                .len() as u64;
            acc.zstd_exact.fetch_add(z, Ordering::Relaxed);
            acc.disk_exact.fetch_add(blocks(z), Ordering::Relaxed);
            acc.sampled_raw.fetch_add(len, Ordering::Relaxed);
            acc.sampled_zstd.fetch_add(z, Ordering::Relaxed);
            acc.sampled_disk.fetch_add(blocks(z), Ordering::Relaxed);
            self.shared.sampled_chunks.fetch_add(1, Ordering::Relaxed);
            self.shared.sampled_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl FileScan<'_, '_> {
    fn push(&mut self, data: &[u8]) -> Result<(), DedupError> {
        self.whole.update(data);
        self.size += data.len() as u64;
        let FileScan {
            worker,
            cutters,
            index,
            ..
        } = self;
        let zerr = |e: std::io::Error| DedupError::Task(format!("zstd: {e}"));
        for (i, cutter) in cutters.iter_mut().enumerate() {
            match cutter {
                Cutter::Whole { buf, enc } => {
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
    fn finish(mut self) -> Result<(B3Digest, u64), DedupError> {
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
            let Cutter::Whole { buf, enc } = &mut self.cutters[i] else {
                continue;
            };
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
            if new {
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
                acc.disk_exact.fetch_add(blocks(z), Ordering::Relaxed);
            }
        }
        if digest != empty_blob() && lock(&shared.blobs).insert(digest) {
            for (i, (chunks, entries)) in self.index.iter().enumerate() {
                if *chunks > 1 {
                    let acc = &shared.accs[i];
                    acc.blob_indexes.fetch_add(1, Ordering::Relaxed);
                    let len = index_len(*entries, self.size);
                    acc.blob_index_bytes.fetch_add(len, Ordering::Relaxed);
                    acc.blob_index_disk
                        .fetch_add(blocks(len), Ordering::Relaxed);
                }
            }
        }
        Ok((digest, self.size))
    }
}

/// Counts one chunk of a file towards its (hypothetical) blob index.
fn note(index: &mut (u64, u64), len: u64) {
    index.0 += 1;
    index.1 += index_entry_len(len);
}

/// The tree under one PATH, as walked: metadata only.
enum Walked {
    Dir(Vec<(Bytes, Walked)>),
    File { executable: bool, job: usize },
    Symlink(Bytes),
}

#[derive(Default)]
struct Walk {
    files: Vec<(PathBuf, u64)>,
    bytes: u64,
    dirs: u64,
    symlinks: u64,
    skipped: u64,
}

/// The first bytes of every NAR file.
const NAR_MAGIC: &[u8] = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1";

impl Walk {
    fn walk(&mut self, path: &Path, top: bool) -> Result<Option<Walked>, DedupError> {
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| DedupError::path(path, format!("cannot stat: {e}")))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(path)
                .map_err(|e| DedupError::path(path, format!("cannot read link: {e}")))?;
            self.symlinks += 1;
            Ok(Some(Walked::Symlink(Bytes::copy_from_slice(
                target.as_os_str().as_bytes(),
            ))))
        } else if ft.is_file() {
            // NAR files are unpacked by the caller (see `cli::dedup`) before the walk.
            let job = self.files.len();
            self.files.push((path.to_path_buf(), meta.len()));
            self.bytes += meta.len();
            Ok(Some(Walked::File {
                executable: meta.permissions().mode() & 0o100 != 0,
                job,
            }))
        } else if ft.is_dir() {
            self.dirs += 1;
            let rd = std::fs::read_dir(path)
                .map_err(|e| DedupError::path(path, format!("cannot read directory: {e}")))?;
            let mut children = Vec::new();
            for entry in rd {
                let entry = entry
                    .map_err(|e| DedupError::path(path, format!("cannot read directory: {e}")))?;
                if let Some(node) = self.walk(&entry.path(), false)? {
                    children.push((Bytes::copy_from_slice(entry.file_name().as_bytes()), node));
                }
            }
            children.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Some(Walked::Dir(children)))
        } else if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket() {
            if top {
                return Err(DedupError::path(
                    path,
                    "is a special file; granary analyses files, directories and symlinks",
                ));
            }
            // A store cannot hold these; analysis leaves them out and counts them.
            self.skipped += 1;
            Ok(None)
        } else {
            Err(DedupError::path(path, "unknown file type"))
        }
    }
}

/// Whether a file starts with the NAR magic.
pub fn is_nar(path: &Path) -> Result<bool, DedupError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| DedupError::path(path, format!("cannot open: {e}")))?;
    let mut head = [0u8; 21];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DedupError::path(path, format!("read failed: {e}"))),
        }
    }
    Ok(&head[..n] == NAR_MAGIC)
}

/// Computes (and records) the directories of a walked tree bottom-up; returns the top node.
fn account_tree(
    shared: &Shared,
    node: &Walked,
    files: &[(B3Digest, u64)],
) -> Result<Node, DedupError> {
    Ok(match node {
        Walked::File { executable, job } => {
            let (digest, size) = files[*job];
            Node::File {
                digest,
                size,
                executable: *executable,
            }
        }
        Walked::Symlink(t) => Node::Symlink { target: t.clone() },
        Walked::Dir(children) => {
            let mut dir = Directory::default();
            for (name, child) in children {
                let node = account_tree(shared, child, files)?;
                dir.add(name.clone(), &node);
            }
            let size = dir
                .size()
                .map_err(|e| DedupError::Task(format!("directory size: {e}")))?;
            let digest = shared.add_dir(&dir);
            Node::Directory { digest, size }
        }
    })
}

/// Runs `work(worker, job)` for every job on `jobs` threads; the first error stops the rest.
fn run_parallel<T: Send>(
    shared: &Shared,
    jobs: usize,
    n: usize,
    work: impl Fn(&mut Worker<'_>, usize) -> Result<T, DedupError> + Sync,
) -> Result<Vec<Option<T>>, DedupError> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_err: Mutex<Option<DedupError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| {
                let mut worker = match Worker::new(shared) {
                    Ok(w) => w,
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        lock(&first_err).get_or_insert(e);
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    match work(&mut worker, i) {
                        Ok(v) => lock(&results)[i] = Some(v),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            lock(&first_err).get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|e| e.into_inner()))
}

fn default_jobs(opts: &DedupOptions) -> usize {
    opts.jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

/// Read buffer per file.
const READ_BUF: usize = 256 << 10;

fn scan_file(
    worker: &mut Worker<'_>,
    path: &Path,
    progress: &Progress,
) -> Result<(B3Digest, u64), DedupError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| DedupError::path(path, format!("cannot open: {e}")))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut scan = worker.scan();
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DedupError::path(path, format!("read failed: {e}"))),
        };
        scan.push(&buf[..n])?;
        progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
    }
    let r = scan.finish()?;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(r)
}

/// Collects the figures once every input has been analysed.
fn build_report(
    shared: Shared,
    inputs: Vec<String>,
    per_input: Vec<(u64, Vec<Totals>)>,
    counts: (u64, u64, u64, u64),
) -> Report {
    let (files, directories, symlinks, skipped_special) = counts;
    let logical = shared.logical.load(Ordering::Relaxed);
    let final_totals = shared.totals();
    let (dir_count, dir_bytes, _) = shared.dir_totals();
    let mut strategies = Vec::new();
    for (i, s) in shared.strategies.iter().enumerate() {
        let acc = &shared.accs[i];
        let mut sizes: Vec<u64> = lock(&acc.seen).chunks.values().copied().collect();
        sizes.sort_unstable();
        let t = final_totals[i];
        let pick = |q: f64| -> u64 {
            if sizes.is_empty() {
                return 0;
            }
            // Nearest-rank percentile.
            let rank = ((q * sizes.len() as f64).ceil() as usize).clamp(1, sizes.len());
            sizes[rank - 1]
        };
        let mut marginal = Vec::new();
        let mut prev = Totals::default();
        for (name, (logical_i, tot)) in inputs.iter().zip(&per_input) {
            let now = tot[i];
            let m = Marginal {
                input: name.clone(),
                logical_bytes: *logical_i,
                unique_bytes: now.unique_bytes - prev.unique_bytes,
                unique_chunks: now.unique_chunks - prev.unique_chunks,
                metadata_bytes: now.metadata.saturating_sub(prev.metadata),
                zstd_bytes: now.zstd.saturating_sub(prev.zstd),
                stored_bytes: (now.zstd + now.metadata).saturating_sub(prev.zstd + prev.metadata),
            };
            marginal.push(m);
            prev = now;
        }
        let stored = t.zstd + t.metadata;
        strategies.push(StrategyReport {
            strategy: s.name(),
            chunker: s.describe(),
            logical_bytes: logical,
            unique_bytes: t.unique_bytes,
            dedup_ratio: ratio(logical, t.unique_bytes),
            unique_chunks: t.unique_chunks,
            mean_chunk: if sizes.is_empty() {
                0
            } else {
                t.unique_bytes / sizes.len() as u64
            },
            median_chunk: pick(0.5),
            p99_chunk: pick(0.99),
            blob_indexes: acc.blob_indexes.load(Ordering::Relaxed),
            blob_index_bytes: acc.blob_index_bytes.load(Ordering::Relaxed),
            directories: dir_count,
            directory_bytes: dir_bytes,
            metadata_bytes: t.metadata,
            zstd_bytes: t.zstd,
            stored_bytes: stored,
            stored_ratio: ratio(logical, stored),
            disk_bytes: t.disk,
            marginal,
        });
    }
    Report {
        inputs,
        files,
        directories,
        symlinks,
        skipped_special,
        logical_bytes: logical,
        zstd_level: shared.level,
        sample: SampleInfo {
            one_in: shared.sample,
            chunks: shared.sampled_chunks.load(Ordering::Relaxed),
            bytes: shared.sampled_bytes.load(Ordering::Relaxed),
        },
        strategies,
    }
}

/// Analyses the trees at `paths` (directories or files), in order; blocking.
pub fn analyse_paths(
    paths: &[PathBuf],
    opts: &DedupOptions,
    progress: &Progress,
) -> Result<Report, DedupError> {
    if opts.strategies.is_empty() {
        return Err(DedupError::Task("no strategy to measure".into()));
    }
    // Walk everything first: bad paths fail before any reading, and progress knows the total.
    let mut walks = Vec::new();
    for p in paths {
        let mut w = Walk::default();
        let top = w.walk(p, true)?;
        progress.bytes_total.fetch_add(w.bytes, Ordering::Relaxed);
        progress
            .files_total
            .fetch_add(w.files.len() as u64, Ordering::Relaxed);
        walks.push((w, top));
    }
    let shared = Shared::new(opts);
    let jobs = default_jobs(opts);
    let mut per_input = Vec::new();
    let mut counts = (0, 0, 0, 0);
    for (w, top) in &walks {
        let results = run_parallel(&shared, jobs, w.files.len(), |worker, i| {
            scan_file(worker, &w.files[i].0, progress)
        })?;
        let files: Vec<(B3Digest, u64)> = results
            .into_iter()
            .map(|r| r.ok_or_else(|| DedupError::Task("a file was not analysed".into())))
            .collect::<Result<_, _>>()?;
        let logical: u64 = files.iter().map(|f| f.1).sum();
        shared.logical.fetch_add(logical, Ordering::Relaxed);
        if let Some(top) = top {
            account_tree(&shared, top, &files)?;
        }
        per_input.push((logical, shared.totals()));
        counts.0 += w.files.len() as u64;
        counts.1 += w.dirs;
        counts.2 += w.symlinks;
        counts.3 += w.skipped;
    }
    let inputs = paths.iter().map(|p| p.display().to_string()).collect();
    Ok(build_report(shared, inputs, per_input, counts))
}

/// What a walk of a store's roots found, metadata only.
#[derive(Default)]
struct StoreWalk {
    /// Directories seen, with what their subtree holds (memoised: shared subtrees are
    /// fetched once but counted at every occurrence).
    dir_logical: HashMap<B3Digest, SubtreeCounts>,
    /// Distinct non-empty blobs, in the order first met, with their size.
    blobs: Vec<(B3Digest, u64)>,
    blob_set: HashSet<B3Digest>,
    files: u64,
    dirs: u64,
    symlinks: u64,
}

/// Totals over a subtree, the directory itself included.
#[derive(Debug, Clone, Copy, Default)]
struct SubtreeCounts {
    logical: u64,
    files: u64,
    dirs: u64,
    symlinks: u64,
}

impl StoreWalk {
    /// Walks the tree under `node`; returns its logical bytes. New directories are recorded
    /// in `shared`, new blobs appended to `self.blobs`.
    async fn walk(
        &mut self,
        store: &Store,
        shared: &Shared,
        node: &Node,
    ) -> Result<u64, DedupError> {
        let top = match node {
            Node::File { digest, size, .. } => {
                self.files += 1;
                self.blob(digest, *size);
                return Ok(*size);
            }
            Node::Symlink { .. } => {
                self.symlinks += 1;
                return Ok(0);
            }
            Node::Directory { digest, .. } => *digest,
        };
        // Iterative post-order, as in tree::logical_size.
        let mut stack = vec![(top, false)];
        while let Some((d, expanded)) = stack.pop() {
            if self.dir_logical.contains_key(&d) {
                continue;
            }
            let dir = store
                .dirs
                .get(&d)
                .await?
                .ok_or_else(|| StoreError::not_found("directory", &d))?;
            let children: Vec<B3Digest> = dir
                .directories
                .iter()
                .map(|e| B3Digest::try_from(&e.digest[..]))
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)?;
            if !expanded && children.iter().any(|c| !self.dir_logical.contains_key(c)) {
                stack.push((d, true));
                stack.extend(children.into_iter().map(|c| (c, false)));
                continue;
            }
            shared.add_dir(&dir);
            let mut total = SubtreeCounts {
                dirs: 1,
                files: dir.files.len() as u64,
                symlinks: dir.symlinks.len() as u64,
                logical: 0,
            };
            for f in &dir.files {
                let digest = B3Digest::try_from(&f.digest[..]).map_err(StoreError::from)?;
                self.blob(&digest, f.size);
                total.logical = total.logical.saturating_add(f.size);
            }
            for c in &children {
                let sub = self.dir_logical.get(c).copied().unwrap_or_default();
                total.logical = total.logical.saturating_add(sub.logical);
                total.files += sub.files;
                total.dirs += sub.dirs;
                total.symlinks += sub.symlinks;
            }
            self.dir_logical.insert(d, total);
        }
        let t = self.dir_logical.get(&top).copied().unwrap_or_default();
        self.files += t.files;
        self.dirs += t.dirs;
        self.symlinks += t.symlinks;
        Ok(t.logical)
    }

    fn blob(&mut self, digest: &B3Digest, size: u64) {
        if size > 0 && self.blob_set.insert(*digest) {
            self.blobs.push((*digest, size));
        }
    }
}

/// Analyses the content of a store's named roots, each root an input in name order.
/// Each distinct blob is read once (via the store, digests checked); repeated files and
/// subtrees still count towards logical bytes. Async; the reading runs on blocking threads.
pub async fn analyse_store(
    store: &Store,
    opts: &DedupOptions,
    progress: Arc<Progress>,
) -> Result<Report, DedupError> {
    if opts.strategies.is_empty() {
        return Err(DedupError::Task("no strategy to measure".into()));
    }
    let shared = Arc::new(Shared::new(opts));
    let names = store.roots.list().await?;
    let mut walk = StoreWalk::default();
    // (root, logical, first new blob, end) per root.
    let mut plan = Vec::new();
    for name in &names {
        let rec = store
            .roots
            .get(name)
            .await?
            .ok_or_else(|| DedupError::Task(format!("root {name} vanished during the walk")))?;
        let start = walk.blobs.len();
        let logical = walk.walk(store, &shared, &rec.node).await?;
        plan.push((name.clone(), logical, start, walk.blobs.len()));
    }
    let total: u64 = walk.blobs.iter().map(|b| b.1).sum();
    progress.bytes_total.fetch_add(total, Ordering::Relaxed);
    progress
        .files_total
        .fetch_add(walk.blobs.len() as u64, Ordering::Relaxed);
    // Directories were recorded during the walk; the marginal gains attribute them to the
    // first root that reaches them, so record them again per root below.
    let dirs_by_root = per_root_dirs(store, &names).await?;
    lock(&shared.dirs).clear();

    let jobs = default_jobs(opts);
    let rt = tokio::runtime::Handle::current();
    let blobs = Arc::new(walk.blobs);
    let mut per_input = Vec::new();
    for ((name, logical, start, end), dirs) in plan.into_iter().zip(dirs_by_root) {
        let _ = name;
        let (shared2, blobs2, rt2, progress2, store2) = (
            shared.clone(),
            blobs.clone(),
            rt.clone(),
            progress.clone(),
            store.clone(),
        );
        let totals = tokio::task::spawn_blocking(move || {
            run_parallel(&shared2, jobs, end - start, |worker, i| {
                let (digest, size) = blobs2[start + i];
                scan_blob(&rt2, &store2, worker, &digest, size, &progress2)
            })?;
            shared2.logical.fetch_add(logical, Ordering::Relaxed);
            {
                let mut d = lock(&shared2.dirs);
                for (k, v) in dirs {
                    d.insert(k, v);
                }
            }
            Ok::<_, DedupError>(shared2.totals())
        })
        .await
        .map_err(|e| DedupError::Task(e.to_string()))??;
        per_input.push((logical, totals));
    }
    let shared =
        Arc::try_unwrap(shared).map_err(|_| DedupError::Task("analysis still running".into()))?;
    let counts = (walk.files, walk.dirs, walk.symlinks, 0);
    Ok(build_report(shared, names, per_input, counts))
}

/// The directories reachable from each root (encoded lengths), for per-root marginal gains.
async fn per_root_dirs(
    store: &Store,
    names: &[String],
) -> Result<Vec<Vec<(B3Digest, u64)>>, DedupError> {
    let mut out = Vec::new();
    let mut seen: HashSet<B3Digest> = HashSet::new();
    for name in names {
        let mut mine = Vec::new();
        if let Some(rec) = store.roots.get(name).await? {
            if let Node::Directory { digest, .. } = rec.node {
                let mut stack = vec![digest];
                while let Some(d) = stack.pop() {
                    if !seen.insert(d) {
                        continue;
                    }
                    let dir = store
                        .dirs
                        .get(&d)
                        .await?
                        .ok_or_else(|| StoreError::not_found("directory", &d))?;
                    mine.push((d, dir.encode_canonical().len() as u64));
                    for e in &dir.directories {
                        stack.push(B3Digest::try_from(&e.digest[..]).map_err(StoreError::from)?);
                    }
                }
            }
        }
        out.push(mine);
    }
    Ok(out)
}

fn scan_blob(
    rt: &tokio::runtime::Handle,
    store: &Store,
    worker: &mut Worker<'_>,
    digest: &B3Digest,
    size: u64,
    progress: &Progress,
) -> Result<(), DedupError> {
    let mut scan = worker.scan();
    rt.block_on(async {
        let reader = BlobReader::open(store.blobs.clone(), *digest).await?;
        if reader.size() != size {
            return Err(DedupError::Store(StoreError::corrupt(
                "blob",
                digest,
                format!("is {} bytes, its directory says {size}", reader.size()),
            )));
        }
        let mut s = std::pin::pin!(reader.stream());
        while let Some(piece) = s.next().await {
            let piece = piece?;
            scan.push(&piece)?;
            progress
                .bytes_done
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let (got, _) = scan.finish()?;
    if got != *digest {
        return Err(DedupError::Store(StoreError::corrupt(
            "blob",
            digest,
            format!("content hashes to {got}"),
        )));
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// What a store holds as it is, from its metadata alone (no chunk is read): the `store`
/// strategy's figures for `granary info --dedup`. `zstd_bytes`/`stored_bytes` are left 0:
/// the caller knows the real on-disk size from the backend.
pub async fn store_figures(store: &Store) -> Result<StrategyReport, DedupError> {
    let opts = DedupOptions {
        strategies: vec![Strategy::Store(store.params())],
        ..Default::default()
    };
    let shared = Shared::new(&opts);
    let names = store.roots.list().await?;
    let mut walk = StoreWalk::default();
    let mut per_input = Vec::new();
    let mut logical_total = 0u64;
    let mut indexes = (0u64, 0u64);
    let mut done = 0usize;
    for name in &names {
        let rec = store
            .roots
            .get(name)
            .await?
            .ok_or_else(|| DedupError::Task(format!("root {name} vanished during the walk")))?;
        let logical = walk.walk(store, &shared, &rec.node).await?;
        logical_total += logical;
        for (digest, size) in &walk.blobs[done..] {
            let meta = store
                .blobs
                .stat(digest)
                .await?
                .ok_or_else(|| StoreError::not_found("blob", digest))?;
            if meta.size != *size {
                return Err(DedupError::Store(StoreError::corrupt(
                    "blob",
                    digest,
                    format!("is {} bytes, its directory says {size}", meta.size),
                )));
            }
            if meta.chunks.len() > 1 {
                indexes.0 += 1;
                indexes.1 += meta.to_index().encode_sealed().len() as u64;
            }
            let mut s = lock(&shared.accs[0].seen);
            for c in &meta.chunks {
                if s.chunks.insert(c.digest, c.size).is_none() {
                    s.bytes += c.size;
                }
            }
        }
        done = walk.blobs.len();
        shared.accs[0]
            .blob_indexes
            .store(indexes.0, Ordering::Relaxed);
        shared.accs[0]
            .blob_index_bytes
            .store(indexes.1, Ordering::Relaxed);
        per_input.push((logical, shared.totals()));
    }
    shared.logical.store(logical_total, Ordering::Relaxed);
    let counts = (walk.files, walk.dirs, walk.symlinks, 0);
    let mut report = build_report(shared, names, per_input, counts);
    let mut s = report
        .strategies
        .pop()
        .ok_or_else(|| DedupError::Task("no figures".into()))?;
    s.zstd_bytes = 0;
    s.stored_bytes = 0;
    s.stored_ratio = 0.0;
    s.disk_bytes = 0;
    for m in &mut s.marginal {
        m.zstd_bytes = 0;
        m.stored_bytes = 0;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::castore::BlobIndex;

    #[test]
    fn index_length_matches_prost() {
        for sizes in [
            vec![1u64, 2],
            vec![65536, 300_000, 5],
            vec![1 << 40, 7, 128, 16383],
        ] {
            let idx = BlobIndex {
                chunks: sizes
                    .iter()
                    .map(|&s| crate::model::castore::proto::blob_index::Chunk {
                        digest: Bytes::from(vec![7u8; 32]),
                        size: s,
                    })
                    .collect(),
                size: sizes.iter().sum(),
                outboard: vec![
                    9u8;
                    crate::store::outboard::outboard_len(sizes.iter().sum()) as usize
                ]
                .into(),
                ..Default::default()
            };
            let entries: u64 = sizes.iter().map(|&s| index_entry_len(s)).sum();
            assert_eq!(
                index_len(entries, idx.size),
                idx.encode_sealed().len() as u64
            );
        }
    }

    #[test]
    fn strategy_specs_parse_and_print() {
        let sp = ChunkParams::default();
        for (spec, name) in [
            ("whole-file", "whole-file"),
            ("fixed:64K", "fixed:64K"),
            ("fixed:1000", "fixed:1000"),
            ("fastcdc:16K/64K/256K", "fastcdc:16K/64K/256K"),
            ("fastcdc:1M", "fastcdc:256K/1M/4M"),
            ("store", "store"),
        ] {
            let s = Strategy::parse(spec, sp).unwrap();
            assert_eq!(s.name(), name);
            if s != Strategy::Store(sp) {
                assert_eq!(Strategy::parse(&s.name(), sp).unwrap(), s);
            }
        }
        for bad in [
            "fixed:0",
            "fixed:x",
            "fastcdc:64K/16K/256K",
            "rabin:64K",
            "fixed",
            "fastcdc:8G",
        ] {
            assert!(Strategy::parse(bad, sp).is_err(), "{bad}");
        }
        assert_eq!(default_strategies().len(), 6);
    }

    #[test]
    fn fixed_chunks_are_cut_the_same_whatever_the_read_sizes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let opts = DedupOptions {
            strategies: vec![Strategy::Fixed(1000), Strategy::WholeFile],
            ..Default::default()
        };
        let mut counts = Vec::new();
        for piece in [1usize, 999, 1000, 4096, 300_000] {
            let shared = Shared::new(&opts);
            let mut w = Worker::new(&shared).unwrap();
            let mut scan = w.scan();
            for p in data.chunks(piece) {
                scan.push(p).unwrap();
            }
            let (d, size) = scan.finish().unwrap();
            assert_eq!(d, B3Digest::of(&data));
            assert_eq!(size, data.len() as u64);
            let t = shared.totals();
            counts.push((t[0].unique_bytes, t[0].unique_chunks, t[1].unique_bytes));
        }
        // The data repeats every 251 bytes: 1000-byte chunks repeat with period 251 too.
        assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
        assert_eq!(counts[0].0, counts[0].1 * 1000);
        assert_eq!(counts[0].2, 300_000);
    }
}
