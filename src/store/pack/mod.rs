//! Pack files: many objects in one file, so an import creates a handful of files instead of
//! one per object (on ext4, allocating an inode cost more than chunking, hashing and
//! compressing the object put together).
//!
//! ```text
//! packs/<id>.pack   "GRNPACK1", then the objects' stored bytes back to back (a chunk is its
//!                   zstd frame, a directory or blob index its protobuf: the bytes a loose
//!                   object file would hold)
//! packs/<id>.idx    "GRNIDX01", u64 count, count × (u8 kind, 32-byte digest, u64 offset,
//!                   u32 length), then blake3 of everything before it
//! ```
//!
//! All integers little-endian. `<id>` is 16 hex digits of creation time in nanoseconds and 8
//! random hex digits, so ids sort by age and a later copy of an object wins. A pack is written
//! as a temp file, made durable and renamed; its index is written the same way after it. The
//! index is the commit point: a pack without one is a leftover that gc sweeps. Objects in a
//! pack are verified when read, exactly as loose objects are.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{ObjectKind, Result, StoreError};
use crate::model::castore::B3Digest;

pub const PACK_DIR: &str = "packs";
pub const PACK_MAGIC: &[u8; 8] = b"GRNPACK1";
const INDEX_MAGIC: &[u8; 8] = b"GRNIDX01";
const ENTRY_BYTES: usize = 1 + 32 + 8 + 4;
const INDEX_OVERHEAD: usize = 8 + 8 + 32;

/// Where one object lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub kind: ObjectKind,
    pub digest: B3Digest,
    pub offset: u64,
    pub len: u32,
}

fn kind_code(kind: ObjectKind) -> u8 {
    match kind {
        ObjectKind::Chunk => 0,
        ObjectKind::BlobIndex => 1,
        ObjectKind::Directory => 2,
    }
}

fn kind_of(code: u8) -> Option<ObjectKind> {
    match code {
        0 => Some(ObjectKind::Chunk),
        1 => Some(ObjectKind::BlobIndex),
        2 => Some(ObjectKind::Directory),
        _ => None,
    }
}

/// A new pack id: creation time first, so ids sort oldest first.
pub fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{nanos:016x}{:08x}", rand::random::<u32>())
}

/// Whether `id` has the shape [`new_id`] gives (so names of strangers are ignored).
pub fn is_id(id: &str) -> bool {
    id.len() == 24
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Order of entries in an index (and in memory): by digest, then kind, so a lookup is a
/// binary search.
fn order(a: &IndexEntry, b: &IndexEntry) -> std::cmp::Ordering {
    (a.digest.as_bytes(), kind_code(a.kind)).cmp(&(b.digest.as_bytes(), kind_code(b.kind)))
}

/// Sorts entries into index order (a no-op for an index this granary wrote).
fn sorted(mut entries: Vec<IndexEntry>) -> Vec<IndexEntry> {
    if !entries.is_sorted_by(|a, b| order(a, b).is_le()) {
        entries.sort_unstable_by(order);
    }
    entries
}

/// Encodes an index, entries in index order.
pub fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    encode_entries_as_given(&sorted(entries.to_vec()))
}

/// Encodes an index with the entries in the order given (readers sort what is not sorted).
fn encode_entries_as_given(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_OVERHEAD + entries.len() * ENTRY_BYTES);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.push(kind_code(e.kind));
        out.extend_from_slice(e.digest.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Parses and checks an index: magic, length, checksum, kinds, and every entry inside a pack
/// of `pack_len` bytes. `id` names the pack in errors.
pub fn decode_index(id: &str, raw: &[u8], pack_len: u64) -> Result<Vec<IndexEntry>> {
    let bad = |reason: String| StoreError::Corrupt {
        what: "pack index",
        digest: id.to_string(),
        reason,
    };
    if raw.len() < INDEX_OVERHEAD || &raw[..8] != INDEX_MAGIC {
        return Err(bad("not a granary pack index".into()));
    }
    let (body, sum) = raw.split_at(raw.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch".into()));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().unwrap_or_default());
    // The count is checked against the bytes present before anything is allocated from it.
    let expect = (raw.len() - INDEX_OVERHEAD) / ENTRY_BYTES;
    if (raw.len() - INDEX_OVERHEAD) % ENTRY_BYTES != 0 || count != expect as u64 {
        return Err(bad(format!(
            "says {count} entries but holds {} bytes",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(expect);
    for rec in body[16..].chunks_exact(ENTRY_BYTES) {
        let kind = kind_of(rec[0]).ok_or_else(|| bad(format!("unknown kind {}", rec[0])))?;
        let digest = B3Digest::try_from(&rec[1..33]).map_err(|e| bad(e.to_string()))?;
        let offset = u64::from_le_bytes(rec[33..41].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rec[41..45].try_into().unwrap_or_default());
        if offset < PACK_MAGIC.len() as u64 || offset.saturating_add(len as u64) > pack_len {
            return Err(bad(format!(
                "{} {digest} at {offset}+{len} lies outside the pack ({pack_len} bytes)",
                kind.what()
            )));
        }
        out.push(IndexEntry {
            kind,
            digest,
            offset,
            len,
        });
    }
    Ok(out)
}

/// A pack being written: a temp file in `packs/`, committed by [`PackWriter::commit`].
pub struct PackWriter {
    dir: PathBuf,
    file: tempfile::NamedTempFile,
    len: u64,
    entries: Vec<IndexEntry>,
}

impl PackWriter {
    pub fn new(dir: &Path, tmp_prefix: &str) -> Result<Self> {
        let ctx = |e| StoreError::io(format!("temp pack in {}", dir.display()), e);
        std::fs::create_dir_all(dir).map_err(ctx)?;
        let mut file = tempfile::Builder::new()
            .prefix(tmp_prefix)
            .suffix(".pack")
            .tempfile_in(dir)
            .map_err(ctx)?;
        file.write_all(PACK_MAGIC).map_err(ctx)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            len: PACK_MAGIC.len() as u64,
            entries: Vec::new(),
        })
    }

    /// Appends one object; returns where it went.
    pub fn append(
        &mut self,
        kind: ObjectKind,
        digest: B3Digest,
        data: &[u8],
    ) -> Result<IndexEntry> {
        let len = u32::try_from(data.len()).map_err(|_| {
            StoreError::Backend(format!("{} {digest}: too large for a pack", kind.what()))
        })?;
        self.file.write_all(data).map_err(|e| {
            StoreError::io(format!("writing pack {}", self.file.path().display()), e)
        })?;
        let e = IndexEntry {
            kind,
            digest,
            offset: self.len,
            len,
        };
        self.len += data.len() as u64;
        self.entries.push(e);
        Ok(e)
    }

    /// Reads back an object appended earlier (this process's not yet committed writes).
    pub fn read(&self, e: &IndexEntry) -> Result<Vec<u8>> {
        read_at(self.file.as_file(), self.file.path(), e)
    }

    pub fn bytes(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Makes the pack durable under its final name, then its index (the commit point).
    /// Returns the pack's id.
    pub fn commit(self, tmp_prefix: &str) -> Result<String> {
        let id = new_id();
        let pack = self.dir.join(format!("{id}.pack"));
        let ctx = |p: &Path, e| StoreError::io(format!("writing {}", p.display()), e);
        self.file.as_file().sync_data().map_err(|e| ctx(&pack, e))?;
        self.file.persist(&pack).map_err(|e| ctx(&pack, e.error))?;
        let idx = self.dir.join(format!("{id}.idx"));
        let mut t = tempfile::Builder::new()
            .prefix(tmp_prefix)
            .tempfile_in(&self.dir)
            .map_err(|e| ctx(&idx, e))?;
        t.write_all(&encode_index(&self.entries))
            .map_err(|e| ctx(&idx, e))?;
        t.as_file().sync_data().map_err(|e| ctx(&idx, e))?;
        t.persist(&idx).map_err(|e| ctx(&idx, e.error))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ctx(&self.dir, e))?;
        Ok(id)
    }
}

/// Reads one object's stored bytes from an open pack.
pub fn read_at(file: &std::fs::File, path: &Path, e: &IndexEntry) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; e.len as usize];
    file.read_exact_at(&mut buf, e.offset).map_err(|err| {
        StoreError::io(
            format!(
                "reading {} {} from {}",
                e.kind.what(),
                e.digest,
                path.display()
            ),
            err,
        )
    })?;
    Ok(buf)
}

mod set;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use set::*;
