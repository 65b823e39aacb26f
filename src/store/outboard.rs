//! Verified partial reads: a blob's BLAKE3 tree kept at a fixed granularity (an "outboard",
//! as in bao), so any byte range of a multi-chunk blob is checked against the blob digest in
//! its directory entry without hashing the whole blob.
//!
//! BLAKE3 hashes 1 KiB chunks into a left-balanced binary tree. Cut the input into blocks of
//! [`BLOCK`] bytes (a power-of-two number of BLAKE3 chunks): every block that starts at a
//! multiple of `BLOCK` is a complete subtree, and the tree above the blocks depends only on
//! their chaining values. The outboard is those chaining values, 32 bytes per block (0.2% of
//! the blob). It is checked once against the blob digest by merging it up to the root; each
//! block read is then checked by hashing it (as the subtree at its offset) and comparing with
//! its chaining value. A blob index whose chunk list was altered — entries swapped, a chunk
//! replaced by another that hashes right — fails that check instead of serving wrong bytes.
//!
//! Castore digests are unchanged: the root is `blake3(content)`; the blocks are not stored
//! or deduplicated by, only hashed by (content-defined chunks stay the unit of storage).

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::model::castore::B3Digest;

/// Bytes per outboard block: 16 KiB = 16 BLAKE3 chunks, the default minimum CDC chunk, so a
/// block straddles at most two chunks of a default store.
pub const BLOCK: u64 = 16 << 10;
/// Bytes of one chaining value.
pub const CV_LEN: usize = 32;

/// Number of blocks of a blob of `size` bytes.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Bytes of the outboard of a blob of `size` bytes: nothing for a blob of one block (its
/// digest checks it directly).
pub fn outboard_len(size: u64) -> u64 {
    match blocks(size) {
        0 | 1 => 0,
        n => n * CV_LEN as u64,
    }
}

/// The chaining value of block `i` of a blob, given the block's bytes.
pub fn block_cv(i: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(i * BLOCK);
    h.update(data);
    h.finalize_non_root()
}

/// The chaining value of the subtree over `len` bytes starting at block `first`.
fn subtree(cvs: &[ChainingValue], first: usize, len: u64) -> ChainingValue {
    if len <= BLOCK {
        return cvs[first];
    }
    let left = left_subtree_len(len);
    let right_first = first + (left / BLOCK) as usize;
    merge_subtrees_non_root(
        &subtree(cvs, first, left),
        &subtree(cvs, right_first, len - left),
        Mode::Hash,
    )
}

/// The blob digest the chaining values of a blob of `size` bytes (more than one block) hash to.
pub fn root(cvs: &[ChainingValue], size: u64) -> Option<B3Digest> {
    if blocks(size) < 2 || cvs.len() as u64 != blocks(size) {
        return None;
    }
    let left = left_subtree_len(size);
    let right_first = (left / BLOCK) as usize;
    let h = merge_subtrees_root(
        &subtree(cvs, 0, left),
        &subtree(cvs, right_first, size - left),
        Mode::Hash,
    );
    Some(B3Digest::from(h))
}

/// Splits outboard bytes into chaining values.
pub fn parse(outboard: &[u8]) -> Option<Vec<ChainingValue>> {
    if outboard.len() % CV_LEN != 0 {
        return None;
    }
    Some(
        outboard
            .chunks_exact(CV_LEN)
            .map(|c| {
                let mut cv = [0u8; CV_LEN];
                cv.copy_from_slice(c);
                cv
            })
            .collect(),
    )
}

/// Checks an outboard against the blob it claims to describe; returns its chaining values.
pub fn check(outboard: &[u8], digest: &B3Digest, size: u64) -> Result<Vec<ChainingValue>, String> {
    if outboard.len() as u64 != outboard_len(size) {
        return Err(format!(
            "outboard is {} bytes, a blob of {size} bytes needs {}",
            outboard.len(),
            outboard_len(size)
        ));
    }
    let cvs = parse(outboard).ok_or("outboard is not whole chaining values")?;
    match root(&cvs, size) {
        Some(r) if r == *digest => Ok(cvs),
        _ => Err("outboard does not hash to the blob digest".into()),
    }
}

/// Hashes a blob as it streams by, giving its digest and its outboard: the blob hash computed
/// block by block (no more work than hashing it whole).
#[derive(Default)]
pub struct TreeHasher {
    /// The current, incomplete block.
    buf: Vec<u8>,
    /// Chaining values of the complete blocks so far.
    cvs: Vec<ChainingValue>,
    size: u64,
}

impl TreeHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        let block = BLOCK as usize;
        if !self.buf.is_empty() {
            let take = (block - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < block || data.is_empty() {
                // A full block is hashed only once more data shows it is not the last.
                return;
            }
            let i = self.cvs.len() as u64;
            self.cvs.push(block_cv(i, &self.buf));
            self.buf.clear();
        }
        // Whole blocks straight from the input, keeping the last one back (it may be the end).
        while data.len() > block {
            let i = self.cvs.len() as u64;
            self.cvs.push(block_cv(i, &data[..block]));
            data = &data[block..];
        }
        self.buf.extend_from_slice(data);
    }

    /// The blob digest and its outboard (empty for a blob of at most one block).
    pub fn finish(mut self) -> (B3Digest, Vec<u8>) {
        if self.cvs.is_empty() {
            return (B3Digest::of(&self.buf), Vec::new());
        }
        let i = self.cvs.len() as u64;
        self.cvs.push(block_cv(i, &self.buf));
        let digest = root(&self.cvs, self.size).unwrap_or_else(|| B3Digest::of(b""));
        (digest, self.cvs.concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    #[test]
    fn digest_and_outboard_match_blake3_for_every_shape() {
        let b = BLOCK as usize;
        for n in [
            0,
            1,
            1023,
            1024,
            b - 1,
            b,
            b + 1,
            2 * b,
            2 * b + 1,
            3 * b - 7,
            5 * b,
            17 * b + 1000,
            1 << 20,
            (1 << 20) + 1,
        ] {
            let d = data(n);
            // Fed in awkward pieces, and whole.
            for piece in [1usize, 1000, b, b + 3, n.max(1)] {
                let mut h = TreeHasher::new();
                for p in d.chunks(piece) {
                    h.update(p);
                }
                let (digest, ob) = h.finish();
                assert_eq!(digest, B3Digest::of(&d), "n={n} piece={piece}");
                assert_eq!(ob.len() as u64, outboard_len(n as u64), "n={n}");
                if !ob.is_empty() {
                    let cvs = check(&ob, &digest, n as u64).unwrap();
                    for (i, blk) in d.chunks(b).enumerate() {
                        assert_eq!(block_cv(i as u64, blk), cvs[i], "n={n} block {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_changed_outboard_or_block_is_caught() {
        let n = 5 * BLOCK as usize + 100;
        let d = data(n);
        let mut h = TreeHasher::new();
        h.update(&d);
        let (digest, ob) = h.finish();
        let mut bad = ob.clone();
        bad[40] ^= 1;
        assert!(check(&bad, &digest, n as u64).is_err());
        assert!(check(&ob[..64], &digest, n as u64).is_err());
        assert!(check(&ob, &B3Digest::of(b"other"), n as u64).is_err());
        // Two blocks swapped: each hashes, but not as the block at its position.
        let cvs = check(&ob, &digest, n as u64).unwrap();
        let b = BLOCK as usize;
        assert_ne!(block_cv(1, &d[..b]), cvs[1]);
        assert_ne!(block_cv(0, &d[b..2 * b]), cvs[0]);
    }
}
