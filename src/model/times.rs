//! Recorded modification times of a tree, kept beside the castore rather than in it.
//!
//! castore directories carry no times, and must not: a digest that changed with every `touch`
//! would end dedup across imports of the same content. So an import writes the times of a
//! tree as one more blob (chunked and deduplicated like any file) and the root record points
//! at it ([`TimesRef`]); directory and file digests stay exactly those of the tree without
//! times. Roots without a table (NAR and Nix store imports, older roots) show mtime 1, which
//! is what Nix itself sets.
//!
//! The table: `GRNTIME1`, a u64 record count, then one i64 (nanoseconds since the epoch,
//! little-endian) per entry of the tree. Record 0 is the top node; every directory's entries
//! follow as one block, in name order, and blocks come in depth-first order of directories.
//! A directory's `size` (its recursive entry count) then gives every block's position without
//! reading anything else, so the mount reads just the records of the directory it lists.

use super::castore::{B3Digest, ModelError, Node};

pub const MAGIC: &[u8; 8] = b"GRNTIME1";
/// Bytes before the first record.
pub const HEADER: u64 = 16;
/// Bytes per record.
pub const RECORD: u64 = 8;
/// The time shown where none is recorded: one second after the epoch, as in a Nix store.
pub const UNRECORDED_NS: i64 = 1_000_000_000;

/// A root's table of times: the blob holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimesRef {
    pub digest: B3Digest,
    pub size: u64,
}

impl TimesRef {
    /// The table's size in bytes for a tree of `node`, or `None` if it would overflow.
    pub fn expected_size(node: &Node) -> Option<u64> {
        records_of(node)
            .checked_mul(RECORD)
            .and_then(|b| b.checked_add(HEADER))
    }

    /// Whether this table can be the one of `node` (right number of records).
    pub fn fits(&self, node: &Node) -> bool {
        Self::expected_size(node) == Some(self.size)
    }
}

/// Records in the table of a tree whose top is `node`.
pub fn records_of(node: &Node) -> u64 {
    match node {
        Node::Directory { size, .. } => size.saturating_add(1),
        _ => 1,
    }
}

/// Where a node's times are: its own record, and (for a directory) where its entries' block
/// starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimesPos {
    pub index: u64,
    pub block: u64,
}

impl TimesPos {
    /// The top of a tree.
    pub const TOP: TimesPos = TimesPos { index: 0, block: 1 };

    /// The positions of the entries of the directory at `self`, given the entries in name
    /// order.
    pub fn children<'a>(self, entries: impl IntoIterator<Item = &'a Node>) -> Vec<TimesPos> {
        let entries: Vec<&Node> = entries.into_iter().collect();
        let n = entries.len() as u64;
        let mut next_block = self.block.saturating_add(n);
        entries
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let pos = TimesPos {
                    index: self.block + i as u64,
                    block: next_block,
                };
                if let Node::Directory { size, .. } = node {
                    next_block = next_block.saturating_add(*size);
                }
                pos
            })
            .collect()
    }
}

/// Most entries of a top directory whose block a root record's head copies (beyond that the
/// head holds the top's own record only): 1,024 records, 8 KiB in the record.
pub const HEAD_ENTRIES_MAX: usize = 1024;

/// The head a root record keeps of `records` (a whole table) for a tree whose top directory
/// has `top_entries` entries (0 for a file or symlink): the top's record and, when the top has
/// at most [`HEAD_ENTRIES_MAX`] entries, their block, which follows it. With it a mount
/// answers the lookups of the top and of its entries without reading the table.
pub fn head(records: &[i64], top_entries: usize) -> Vec<i64> {
    let n = if top_entries <= HEAD_ENTRIES_MAX {
        1 + top_entries
    } else {
        1
    };
    records[..n.min(records.len())].to_vec()
}

/// Byte offset of record `index` in the table.
pub fn offset_of(index: u64) -> u64 {
    HEADER.saturating_add(index.saturating_mul(RECORD))
}

/// The table holding `records`.
pub fn encode(records: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER as usize + records.len() * RECORD as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for r in records {
        out.extend_from_slice(&r.to_le_bytes());
    }
    out
}

/// Checks a table's header against the tree it should describe; the number of records.
pub fn check_header(bytes: &[u8], node: &Node) -> Result<u64, ModelError> {
    let bad = |reason: String| ModelError::Decode {
        what: "times table",
        reason,
    };
    if bytes.len() < HEADER as usize || &bytes[..8] != MAGIC {
        return Err(bad("no GRNTIME1 header".into()));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[8..16]);
    let count = u64::from_le_bytes(n);
    let want = records_of(node);
    if count != want {
        return Err(bad(format!("{count} records for a tree of {want} entries")));
    }
    Ok(count)
}

/// Records from raw record bytes (a whole number of records).
pub fn decode_records(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(RECORD as usize)
        .map(|r| {
            let mut b = [0u8; 8];
            b.copy_from_slice(r);
            i64::from_le_bytes(b)
        })
        .collect()
}

/// A whole table, checked against the tree it describes.
pub fn decode(bytes: &[u8], node: &Node) -> Result<Vec<i64>, ModelError> {
    let count = check_header(bytes, node)?;
    let body = &bytes[HEADER as usize..];
    if body.len() as u64 != count.saturating_mul(RECORD) {
        return Err(ModelError::Decode {
            what: "times table",
            reason: format!("{} bytes of records for {count} records", body.len()),
        });
    }
    Ok(decode_records(body))
}

/// Seconds and nanoseconds of a recorded time, for `timespec`s.
pub fn split(ns: i64) -> (i64, u32) {
    (
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// A recorded time as a `SystemTime`.
pub fn system_time(ns: i64) -> std::time::SystemTime {
    let (s, n) = split(ns);
    let d = std::time::Duration::new(s.unsigned_abs(), 0);
    let base = if s >= 0 {
        std::time::UNIX_EPOCH + d
    } else {
        std::time::UNIX_EPOCH - d
    };
    base + std::time::Duration::from_nanos(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(size: u64) -> Node {
        Node::Directory {
            digest: B3Digest::of(b"d"),
            size,
        }
    }
    fn file() -> Node {
        Node::File {
            digest: B3Digest::of(b"f"),
            size: 1,
            executable: false,
        }
    }

    #[test]
    fn blocks_follow_sizes() {
        // top: [a/ (2 entries), b, c/ (1 entry)]; a: [x, y]; c: [z]
        let top = TimesPos::TOP;
        let kids = top.children([&dir(2), &file(), &dir(1)]);
        assert_eq!(kids[0], TimesPos { index: 1, block: 4 });
        assert_eq!(kids[1].index, 2);
        assert_eq!(kids[2], TimesPos { index: 3, block: 6 });
        let a = kids[0].children([&file(), &file()]);
        assert_eq!((a[0].index, a[1].index), (4, 5));
        let c = kids[2].children([&file()]);
        assert_eq!(c[0].index, 6);
        // 1 + size(top) = 1 + 3 + 2 + 1 records: indexes 0..=6.
        assert_eq!(records_of(&dir(6)), 7);
    }

    #[test]
    fn round_trip_and_checks() {
        let recs = vec![5, -1_500_000_000, 1_700_000_000_123_456_789];
        let bytes = encode(&recs);
        assert_eq!(decode(&bytes, &dir(2)).unwrap(), recs);
        assert!(decode(&bytes, &dir(3)).is_err(), "wrong count");
        assert!(decode(&bytes[..20], &dir(2)).is_err(), "short");
        assert!(decode(b"NOTTIMES________", &file()).is_err());
        assert_eq!(split(-1_500_000_000), (-2, 500_000_000));
        assert!(TimesRef {
            digest: B3Digest::of(&bytes),
            size: bytes.len() as u64
        }
        .fits(&dir(2)));
    }

    #[test]
    fn a_head_is_the_top_and_its_block_when_the_top_is_small() {
        // top: [a/ (2 entries), b, c/ (1 entry)]: the top's block is records 1..=3.
        let recs: Vec<i64> = (10..17).collect();
        assert_eq!(head(&recs, 3), vec![10, 11, 12, 13]);
        assert_eq!(head(&[42], 0), vec![42], "a file's table is its one record");
        // A top with more entries than a head holds: its own record only.
        let big: Vec<i64> = (0..HEAD_ENTRIES_MAX as i64 + 2).collect();
        assert_eq!(head(&big, HEAD_ENTRIES_MAX + 1), vec![0]);
        assert_eq!(head(&big, HEAD_ENTRIES_MAX).len(), HEAD_ENTRIES_MAX + 1);
    }
}
