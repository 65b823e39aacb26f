//! Where a blob's bytes are, and how a read of any part of it is checked against the blob
//! digest: the one layout both the mount and the whole-blob reader use.
//!
//! A blob is empty, one chunk (its digest is the chunk's: fetching the chunk checks it), or
//! several chunks listed by a blob index. For several chunks the chunk digests only say each
//! chunk is intact, not that the list is the blob's, so every byte served is also checked
//! against the blob's outboard ([`super::outboard`]): the block holding it is hashed as the
//! subtree at its offset. A blob of one block is checked by hashing it whole.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blake3::hazmat::ChainingValue;
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};

use super::outboard::{self, BLOCK};
use super::{BlobMeta, BlobService, ChunkRef, Result, StoreError};
use crate::model::castore::B3Digest;

/// Chunks fetched at once when a blob without an outboard is hashed whole to make one.
const HASH_CONCURRENCY: usize = 8;

/// A blob's chunks, where each starts, and what checks a read of it.
#[derive(Debug)]
pub struct BlobLayout {
    pub digest: B3Digest,
    pub chunks: Vec<ChunkRef>,
    /// `starts[i]` is the offset of chunk `i`; one extra entry holds the blob size.
    starts: Vec<u64>,
    check: Check,
}

#[derive(Debug)]
enum Check {
    /// Empty, or one chunk whose digest is the blob's.
    Chunk,
    /// Several chunks in one block: the whole blob hashes to the digest.
    Whole(AtomicU64),
    /// Several blocks: each hashes to its chaining value. `done` marks checked blocks.
    Blocks {
        cvs: Vec<ChainingValue>,
        done: Vec<AtomicU64>,
    },
}

fn bad(digest: &B3Digest, why: impl Into<String>) -> StoreError {
    StoreError::corrupt("blob index", digest, why)
}

impl BlobLayout {
    /// The layout `meta` describes, its outboard checked against `digest`. A multi-block blob
    /// whose index has no outboard (written before outboards) is refused here; see
    /// [`BlobLayout::load`].
    pub fn new(digest: B3Digest, meta: BlobMeta) -> Result<Self> {
        let check = match meta.chunks.as_slice() {
            [] if meta.size == 0 && digest == super::empty_blob() => Check::Chunk,
            [] => return Err(bad(&digest, "no chunks for a blob that is not empty")),
            [one] if one.digest == digest && one.size == meta.size => Check::Chunk,
            [_] => return Err(bad(&digest, "its one chunk is not the blob")),
            _ if meta.size <= BLOCK => Check::Whole(AtomicU64::new(0)),
            _ if meta.outboard.is_empty() => {
                return Err(bad(&digest, "has no outboard"));
            }
            _ => {
                let cvs = outboard::check(&meta.outboard, &digest, meta.size)
                    .map_err(|e| bad(&digest, e))?;
                let words = cvs.len().div_ceil(64);
                Check::Blocks {
                    cvs,
                    done: (0..words).map(|_| AtomicU64::new(0)).collect(),
                }
            }
        };
        let mut starts = Vec::with_capacity(meta.chunks.len() + 1);
        let mut off = 0u64;
        for c in &meta.chunks {
            starts.push(off);
            off = off
                .checked_add(c.size)
                .ok_or_else(|| bad(&digest, "chunk sizes overflow"))?;
        }
        starts.push(off);
        if off != meta.size {
            return Err(bad(
                &digest,
                format!("chunk sizes add up to {off}, index says {}", meta.size),
            ));
        }
        Ok(Self {
            digest,
            chunks: meta.chunks,
            starts,
            check,
        })
    }

    /// The layout of a one-chunk blob (its size alone tells: the chunker never cuts below
    /// its minimum).
    pub fn single(digest: B3Digest, size: u64) -> Self {
        let chunks = if size == 0 {
            vec![]
        } else {
            vec![ChunkRef { digest, size }]
        };
        Self {
            digest,
            chunks,
            starts: vec![0, size],
            check: Check::Chunk,
        }
    }

    /// Like [`BlobLayout::new`]; a blob index written before outboards existed gets one by
    /// hashing the blob once, whole (and is refused if the blob does not hash to its digest).
    pub async fn load(
        blobs: &dyn BlobService,
        digest: B3Digest,
        mut meta: BlobMeta,
    ) -> Result<Self> {
        if meta.chunks.len() > 1 && meta.size > BLOCK && meta.outboard.is_empty() {
            let mut h = outboard::TreeHasher::new();
            let mut parts = stream::iter(meta.chunks.clone())
                .map(|c| async move { fetch_chunk(blobs, &digest, &c).await })
                .buffered(HASH_CONCURRENCY);
            while let Some(part) = parts.next().await {
                h.update(&part?);
            }
            let (got, ob) = h.finish();
            if got != digest {
                return Err(StoreError::corrupt(
                    "blob",
                    &digest,
                    "content does not hash to the blob digest",
                ));
            }
            meta.outboard = Bytes::from(ob);
        }
        Self::new(digest, meta)
    }

    pub fn size(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Index of the chunk holding byte `offset` (offset < size).
    pub fn chunk_at(&self, offset: u64) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        }
    }

    /// Offset of chunk `i` within the blob.
    pub fn chunk_start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    fn is_done(done: &[AtomicU64], b: u64) -> bool {
        done[(b / 64) as usize].load(Ordering::Relaxed) & (1 << (b % 64)) != 0
    }

    /// The chunks (first, last) to fetch to serve `[offset, end)` and check it: the range,
    /// widened to whole blocks where those are not checked yet.
    pub fn span(&self, offset: u64, end: u64) -> (usize, usize) {
        let (lo, hi) = match &self.check {
            Check::Chunk => (offset, end),
            Check::Whole(done) if done.load(Ordering::Relaxed) == 1 => (offset, end),
            Check::Whole(_) => (0, self.size()),
            Check::Blocks { done, .. } => {
                let (fb, lb) = (offset / BLOCK, (end - 1) / BLOCK);
                let lo = if Self::is_done(done, fb) {
                    offset
                } else {
                    fb * BLOCK
                };
                let hi = if Self::is_done(done, lb) {
                    end
                } else {
                    ((lb + 1) * BLOCK).min(self.size())
                };
                (lo, hi)
            }
        };
        (self.chunk_at(lo), self.chunk_at(hi - 1))
    }

    /// Calls `f` with the pieces of `[lo, hi)` held by `parts` (chunks from `first` on).
    fn each_piece(
        &self,
        first: usize,
        parts: &[Bytes],
        lo: u64,
        hi: u64,
        f: &mut dyn FnMut(&[u8]),
    ) {
        for (k, part) in parts.iter().enumerate() {
            let cs = self.starts[first + k];
            let ce = cs + part.len() as u64;
            if ce <= lo || cs >= hi {
                continue;
            }
            let from = (lo.max(cs) - cs) as usize;
            let to = (hi.min(ce) - cs) as usize;
            f(&part[from..to]);
        }
    }

    /// Checks the blocks of `[offset, end)` not checked yet, from `parts` (the chunks
    /// [`BlobLayout::span`] named, in order, each already checked against its own digest).
    pub fn verify(&self, first: usize, parts: &[Bytes], offset: u64, end: u64) -> Result<()> {
        match &self.check {
            Check::Chunk => Ok(()),
            Check::Whole(done) => {
                if done.load(Ordering::Relaxed) == 1 {
                    return Ok(());
                }
                let mut h = blake3::Hasher::new();
                self.each_piece(first, parts, 0, self.size(), &mut |p| {
                    h.update(p);
                });
                if B3Digest::from(h.finalize()) != self.digest {
                    return Err(self.wrong(0, self.size()));
                }
                done.store(1, Ordering::Relaxed);
                Ok(())
            }
            Check::Blocks { cvs, done } => {
                for b in offset / BLOCK..=(end - 1) / BLOCK {
                    if Self::is_done(done, b) {
                        continue;
                    }
                    let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size()));
                    let mut h = blake3::Hasher::new();
                    blake3::hazmat::HasherExt::set_input_offset(&mut h, lo);
                    self.each_piece(first, parts, lo, hi, &mut |p| {
                        h.update(p);
                    });
                    if blake3::hazmat::HasherExt::finalize_non_root(&h) != cvs[b as usize] {
                        return Err(self.wrong(lo, hi));
                    }
                    done[(b / 64) as usize].fetch_or(1 << (b % 64), Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    fn wrong(&self, lo: u64, hi: u64) -> StoreError {
        StoreError::corrupt(
            "blob",
            &self.digest,
            format!(
                "bytes {lo}..{hi} do not hash as the blob's (its blob index lists the wrong chunks)"
            ),
        )
    }

    /// The bytes `[offset, end)` out of `parts` (chunks from `first` on).
    pub fn assemble(&self, first: usize, parts: &[Bytes], offset: u64, end: u64) -> Bytes {
        let want = (end - offset) as usize;
        // One part holding all of it: a slice, no copy.
        for (k, part) in parts.iter().enumerate() {
            let cs = self.starts[first + k];
            if cs <= offset && end <= cs + part.len() as u64 {
                let s = (offset - cs) as usize;
                return part.slice(s..s + want);
            }
        }
        let mut out = BytesMut::with_capacity(want);
        self.each_piece(first, parts, offset, end, &mut |p| out.extend_from_slice(p));
        out.freeze()
    }

    /// Reads `[offset, offset + len)` (less at the end) with `fetch` giving chunk bytes,
    /// checked; the whole read path in one call.
    pub async fn read_with<F, Fut>(&self, offset: u64, len: usize, fetch: F) -> Result<Bytes>
    where
        F: Fn(ChunkRef) -> Fut,
        Fut: std::future::Future<Output = Result<Bytes>>,
    {
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let (first, last) = self.span(offset, end);
        let parts: Vec<Bytes> = stream::iter(first..=last)
            .map(|i| fetch(self.chunks[i]))
            .buffered(HASH_CONCURRENCY * 2)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        self.verify(first, &parts, offset, end)?;
        Ok(self.assemble(first, &parts, offset, end))
    }
}

/// Fetches one chunk of `blob`, treating absence as an error naming the blob, and checking
/// the size its index gives.
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

/// The whole blob in order, each piece checked before it is handed on: chunks fetched
/// `ahead` at a time, emitted a block at a time once their blocks are checked (so a wrong
/// chunk list stops the stream before any of its bytes), the end checked against the digest.
pub fn stream_blob(
    blobs: Arc<dyn BlobService>,
    layout: Arc<BlobLayout>,
    ahead: usize,
) -> impl futures::Stream<Item = Result<Bytes>> + Send {
    let n = layout.chunks.len();
    let fetches = {
        let (blobs, layout) = (blobs.clone(), layout.clone());
        stream::iter(0..n)
            .map(move |i| {
                let (blobs, layout) = (blobs.clone(), layout.clone());
                async move { fetch_chunk(&*blobs, &layout.digest, &layout.chunks[i]).await }
            })
            .buffered(ahead.max(1))
    };
    // State: pending bytes (starting at `pos`, block-aligned) and chunks seen.
    let init = (layout, Vec::<Bytes>::new(), 0u64, 0usize, false);
    stream::unfold((fetches.boxed(), init), |(mut fetches, st)| async move {
        let (layout, mut pending, mut pos, mut seen, failed) = st;
        if failed {
            return None;
        }
        loop {
            let next = fetches.next().await;
            match next {
                Some(Err(e)) => {
                    return Some((Err(e), (fetches, (layout, pending, pos, seen, true))))
                }
                Some(Ok(b)) => {
                    seen += 1;
                    pending.push(b);
                }
                None if pending.is_empty() => return None,
                None => {}
            }
            let held: u64 = pending.iter().map(|p| p.len() as u64).sum();
            let at_end = seen == layout.chunks.len();
            // Emit whole blocks; at the end, everything.
            let upto = if at_end {
                pos + held
            } else {
                match &layout.check {
                    Check::Chunk => pos + held,
                    Check::Whole(_) => pos,
                    Check::Blocks { .. } => ((pos + held) / BLOCK) * BLOCK,
                }
            };
            if upto == pos {
                if at_end && held == 0 {
                    return None;
                }
                continue;
            }
            // `pending` as parts starting at chunk `first` with the layout's offsets: build a
            // local view (the parts start at `pos`, which may be inside a chunk).
            let joined: Bytes = if pending.len() == 1 {
                pending[0].clone()
            } else {
                let mut b = BytesMut::with_capacity(held as usize);
                for p in &pending {
                    b.extend_from_slice(p);
                }
                b.freeze()
            };
            let out = joined.slice(0..(upto - pos) as usize);
            let check = verify_run(&layout, pos, &out);
            let rest = joined.slice((upto - pos) as usize..);
            pending = if rest.is_empty() { vec![] } else { vec![rest] };
            pos = upto;
            return match check {
                Ok(()) => Some((Ok(out), (fetches, (layout, pending, pos, seen, false)))),
                Err(e) => Some((Err(e), (fetches, (layout, pending, pos, seen, true)))),
            };
        }
    })
}

/// Checks `data`, the blob's bytes from `pos` (block-aligned; to a block end or the blob end).
fn verify_run(layout: &BlobLayout, pos: u64, data: &[u8]) -> Result<()> {
    match &layout.check {
        Check::Chunk => Ok(()),
        Check::Whole(_) => {
            if B3Digest::of(data) != layout.digest || pos != 0 {
                return Err(layout.wrong(0, layout.size()));
            }
            Ok(())
        }
        Check::Blocks { cvs, .. } => {
            for (k, blk) in data.chunks(BLOCK as usize).enumerate() {
                let b = pos / BLOCK + k as u64;
                if outboard::block_cv(b, blk) != cvs[b as usize] {
                    let lo = b * BLOCK;
                    return Err(layout.wrong(lo, lo + blk.len() as u64));
                }
            }
            Ok(())
        }
    }
}
