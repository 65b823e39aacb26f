//! Reference scanning, as Nix does it: a store path refers to another if the other's 32-char
//! hash part appears anywhere in its NAR serialisation. Used by `import-store` to fill in
//! references between the store paths of one directory.

use std::collections::{BTreeSet, HashSet};

use super::hash::is_nix32_char;
use super::store_path::HASH_PART_LEN;

/// Finds which of a set of hash parts occur in a byte stream fed in pieces.
pub struct RefScanner {
    wanted: HashSet<[u8; HASH_PART_LEN]>,
    found: BTreeSet<[u8; HASH_PART_LEN]>,
    /// The last bytes of the previous piece, so a hash split across pieces is still found.
    tail: Vec<u8>,
}

impl RefScanner {
    pub fn new(hash_parts: impl IntoIterator<Item = [u8; HASH_PART_LEN]>) -> Self {
        Self {
            wanted: hash_parts.into_iter().collect(),
            found: BTreeSet::new(),
            tail: Vec::with_capacity(2 * HASH_PART_LEN),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        if self.wanted.is_empty() {
            return;
        }
        // Windows that straddle the previous piece and this one.
        let mut seam = std::mem::take(&mut self.tail);
        let old = seam.len();
        seam.extend_from_slice(&data[..data.len().min(HASH_PART_LEN)]);
        if old > 0 {
            self.search(&seam);
        }
        self.search(data);
        // Keep the last HASH_PART_LEN - 1 bytes of (old tail + data).
        let keep = HASH_PART_LEN - 1;
        if data.len() >= keep {
            seam.clear();
            seam.extend_from_slice(&data[data.len() - keep..]);
        } else {
            seam.truncate(old);
            seam.extend_from_slice(data);
            let cut = seam.len().saturating_sub(keep);
            seam.drain(..cut);
        }
        self.tail = seam;
    }

    /// Nix's search: check a window from its end, skipping past any non-base32 byte.
    fn search(&mut self, s: &[u8]) {
        let mut i = 0;
        while i + HASH_PART_LEN <= s.len() {
            if let Some(j) = (0..HASH_PART_LEN).rev().find(|&j| !is_nix32_char(s[i + j])) {
                i += j + 1;
                continue;
            }
            let mut w = [0u8; HASH_PART_LEN];
            w.copy_from_slice(&s[i..i + HASH_PART_LEN]);
            if self.wanted.remove(&w) {
                self.found.insert(w);
            }
            i += 1;
        }
    }

    /// The hash parts seen, sorted.
    pub fn found(&self) -> impl Iterator<Item = &[u8; HASH_PART_LEN]> {
        self.found.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(c: u8) -> [u8; 32] {
        [c; 32]
    }

    #[test]
    fn finds_hashes_whatever_the_split() {
        let mut text = b"prefix /nix/store/".to_vec();
        text.extend_from_slice(&h(b'a'));
        text.extend_from_slice(b"-foo and ");
        text.extend_from_slice(&h(b'b'));
        text.extend_from_slice(b" but not ");
        text.extend_from_slice(&h(b'c')[..31]);
        for piece in [1usize, 3, 7, 31, 32, 33, 1000] {
            let mut s = RefScanner::new([h(b'a'), h(b'b'), h(b'c'), h(b'd')]);
            for p in text.chunks(piece) {
                s.update(p);
            }
            let found: Vec<_> = s.found().copied().collect();
            assert_eq!(found, vec![h(b'a'), h(b'b')], "piece {piece}");
        }
    }
}
