//! Pack files: many objects in one file, so an import creates a handful of files instead of
//! one per object (on ext4, allocating an inode cost more than chunking, hashing and
//! compressing the object put together).
//!
//! ```text
//! packs/<id>.pack   "GRNPACK1", then the objects' stored bytes back to back (a chunk is its
//!                   zstd frame, a directory or blob index its protobuf: the bytes a loose
//!                   object file would hold)
//! packs/<id>.idx    "GRNIDX01", u64 count, count × (u8 kind, 32-byte digest, u64 offset,
//!                   u32 length), then blake3 of everything before it; or "GRNIDX02", the
//!                   same with two more u32 per entry: where the object lies inside its
//!                   compression group (offset, length), both u32::MAX for an object alone
//! ```
//!
//! A compression group (format 3) is one zstd frame holding the plain bytes of several small
//! objects written together (chunks, directories, blob indexes): small objects compress far
//! better together than alone. Each grouped object's entry points at its group's frame (offset,
//! length) and at its own bytes inside the decompressed group; it is still verified alone, by
//! its digest, when read. Packs without groups keep the first index format.
//!
//! All integers little-endian. `<id>` is 16 hex digits of creation time in nanoseconds and 8
//! random hex digits, so ids sort by age and a later copy of an object wins. A pack is written
//! as a temp file, made durable and renamed; its index is written the same way after it. The
//! index is the commit point: a pack without one is a leftover that gc sweeps. Objects in a
//! pack are verified when read, exactly as loose objects are.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::codec::{decode_group, encode_chunk, Stored, GROUP_PLAIN_MAX};
use super::{ObjectKind, Result, StoreError};
use crate::model::castore::B3Digest;

pub const PACK_DIR: &str = "packs";
pub const PACK_MAGIC: &[u8; 8] = b"GRNPACK1";
const INDEX_MAGIC: &[u8; 8] = b"GRNIDX01";
const INDEX_MAGIC_GROUPS: &[u8; 8] = b"GRNIDX02";
const ENTRY_BYTES: usize = 1 + 32 + 8 + 4;
const ENTRY_BYTES_GROUPS: usize = ENTRY_BYTES + 4 + 4;
/// Bytes of one object's entry in a pack index with groups.
pub const GROUPED_ENTRY_BYTES: u64 = ENTRY_BYTES_GROUPS as u64;
/// Marks an object stored alone in a format-2 index entry.
const ALONE: u32 = u32::MAX;
const INDEX_OVERHEAD: usize = 8 + 8 + 32;

/// Where one object lives inside a pack: its stored bytes, or for a grouped object its
/// group's frame (`offset`, `len`) and its place in the decompressed group (`member`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub kind: ObjectKind,
    pub digest: B3Digest,
    pub offset: u64,
    pub len: u32,
    pub member: Option<Member>,
}

/// An object's bytes inside its decompressed compression group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub offset: u32,
    pub len: u32,
}

impl IndexEntry {
    /// The object's share of the bytes stored for it: its own stored bytes, or for a grouped
    /// object its part of the group's frame, in proportion to its plain bytes (`group_plain`
    /// is the sum of the plain bytes of the group's members).
    pub fn stored_share(&self, group_plain: u64) -> u64 {
        match self.member {
            None => self.len as u64,
            Some(m) => (self.len as u64 * m.len as u64)
                .checked_div(group_plain)
                .unwrap_or(0),
        }
    }
}

/// The plain bytes of each group's members together, by the group frame's offset.
pub fn group_plain_sizes<'a>(
    entries: impl IntoIterator<Item = &'a IndexEntry>,
) -> std::collections::HashMap<u64, u64> {
    let mut out = std::collections::HashMap::new();
    for e in entries {
        if let Some(m) = e.member {
            *out.entry(e.offset).or_insert(0) += m.len as u64;
        }
    }
    out
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
/// An index of a pack without groups keeps the first format, which older granaries read.
fn encode_entries_as_given(entries: &[IndexEntry]) -> Vec<u8> {
    let groups = entries.iter().any(|e| e.member.is_some());
    let size = if groups {
        ENTRY_BYTES_GROUPS
    } else {
        ENTRY_BYTES
    };
    let mut out = Vec::with_capacity(INDEX_OVERHEAD + entries.len() * size);
    out.extend_from_slice(if groups {
        INDEX_MAGIC_GROUPS
    } else {
        INDEX_MAGIC
    });
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.push(kind_code(e.kind));
        out.extend_from_slice(e.digest.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        if groups {
            let m = e.member.unwrap_or(Member {
                offset: ALONE,
                len: ALONE,
            });
            out.extend_from_slice(&m.offset.to_le_bytes());
            out.extend_from_slice(&m.len.to_le_bytes());
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Parses and checks an index: magic, length, checksum, kinds, and every entry inside a pack
/// of `pack_len` bytes. `id` names the pack in errors.
pub fn decode_index(id: &str, raw: &[u8], pack_len: u64) -> Result<Vec<IndexEntry>> {
    let shape = IndexShape::of(id, raw)?;
    if raw.len() < INDEX_OVERHEAD {
        return Err(index_damaged(id, "not a granary pack index".into()));
    }
    let (body, sum) = raw.split_at(raw.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(index_damaged(id, "checksum mismatch".into()));
    }
    let count = shape.count(id, raw.len() as u64)?;
    let mut out = Vec::with_capacity(count);
    for rec in body[16..].chunks_exact(shape.entry_bytes) {
        out.push(shape.record(id, rec, pack_len)?);
    }
    Ok(out)
}

fn index_damaged(id: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        what: "pack index",
        digest: id.to_string(),
        reason,
    }
}

/// An index's format, from its first 16 bytes: what one entry holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct IndexShape {
    pub(super) groups: bool,
    pub(super) entry_bytes: usize,
    /// The count the index states (checked against its length by [`IndexShape::count`]).
    stated: u64,
}

/// Bytes before an index's first entry.
pub(super) const INDEX_HEAD: usize = 16;

impl IndexShape {
    /// The format of an index whose first bytes are `head` (at least the magic and count).
    pub(super) fn of(id: &str, head: &[u8]) -> Result<Self> {
        if head.len() < INDEX_HEAD
            || (&head[..8] != INDEX_MAGIC && &head[..8] != INDEX_MAGIC_GROUPS)
        {
            return Err(index_damaged(id, "not a granary pack index".into()));
        }
        let groups = &head[..8] == INDEX_MAGIC_GROUPS;
        Ok(Self {
            groups,
            entry_bytes: if groups {
                ENTRY_BYTES_GROUPS
            } else {
                ENTRY_BYTES
            },
            stated: u64::from_le_bytes(head[8..16].try_into().unwrap_or_default()),
        })
    }

    /// The number of entries, checked against the index's length before anything is
    /// allocated or read from it.
    pub(super) fn count(&self, id: &str, len: u64) -> Result<usize> {
        let body = len.checked_sub(INDEX_OVERHEAD as u64);
        match body {
            Some(b)
                if b % self.entry_bytes as u64 == 0
                    && b / self.entry_bytes as u64 == self.stated =>
            {
                Ok(self.stated as usize)
            }
            _ => Err(index_damaged(
                id,
                format!("says {} entries but holds {len} bytes", self.stated),
            )),
        }
    }

    /// The kind and digest of an entry, as its record holds them (for a search in place).
    pub(super) fn key_of(rec: &[u8]) -> (&[u8], u8) {
        (&rec[1..33], rec[0])
    }

    /// One entry, checked: a known kind, its bytes inside the pack (`pack_len` bytes), its
    /// member inside a group's largest size.
    pub(super) fn record(&self, id: &str, rec: &[u8], pack_len: u64) -> Result<IndexEntry> {
        let bad = |reason: String| index_damaged(id, reason);
        if rec.len() != self.entry_bytes {
            return Err(bad(format!("an entry of {} bytes", rec.len())));
        }
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
        let member = if self.groups {
            let u32_at =
                |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap_or_default());
            match (u32_at(45), u32_at(49)) {
                (ALONE, ALONE) => None,
                (o, l) if o as u64 + l as u64 <= GROUP_PLAIN_MAX as u64 => {
                    Some(Member { offset: o, len: l })
                }
                (o, l) => {
                    return Err(bad(format!(
                        "{} {digest} at {o}+{l} lies outside any compression group",
                        kind.what()
                    )))
                }
            }
        } else {
            None
        };
        Ok(IndexEntry {
            kind,
            digest,
            offset,
            len,
            member,
        })
    }
}

/// Whether an object of `len` plain bytes goes into a compression group of a store whose
/// groups hold `group_bytes` (0: no groups): objects up to half a group and at most
/// [`GROUPED_MAX`]; bigger ones are stored alone.
pub fn grouped(group_bytes: u32, len: usize) -> bool {
    group_bytes > 0 && len <= (group_bytes as usize / 2).min(GROUPED_MAX)
}

/// The largest object put in a compression group. Bigger chunks (mostly the cut-at-maximum
/// chunks of big files) gain little from neighbours (on pystore, grouping them too saved 4 MB
/// of 506), and alone they are read without decompressing anyone else's bytes.
pub const GROUPED_MAX: usize = 128 << 10;

/// Plain bytes of a group of directories and blob indexes. Smaller than a chunk group: they
/// are read one at a time where latency shows (a fresh mount's first lookups, a file's open),
/// and a whole 2 MiB group decompressed for one directory cost 1–3 ms; metadata is a small
/// share of a store, so the ratio lost to smaller groups is a small share of its bytes.
pub const METADATA_GROUP_BYTES: usize = 256 << 10;

/// A pack being written: a temp file in `packs/`, committed by [`PackWriter::commit`], or
/// bytes in memory for an object store ([`PackWriter::in_memory`], [`PackWriter::finish`]).
pub struct PackWriter {
    sink: Sink,
    len: u64,
    entries: Vec<IndexEntry>,
    /// Where each object added is: its entry, or its place in the open group.
    at: std::collections::HashMap<(ObjectKind, B3Digest), Slot>,
    /// The open compression groups, one for chunks and one for directories and blob indexes
    /// (a walk reads metadata only, and then finds it together), each sealed into one frame
    /// once it holds `group_bytes`.
    open: [OpenGroup; 2],
    /// Full groups handed out to be compressed outside the writer's lock
    /// ([`Self::add_grouped_deferred`]), until their frames come back
    /// ([`Self::finish_seal`]); their members stay readable meanwhile.
    sealing: std::collections::HashMap<u64, OpenGroup>,
    next_seal: u64,
    /// Tells this writer from the next one of the same store, so a frame compressed for a
    /// pack that was committed meanwhile (which sealed the group itself) is dropped.
    serial: u64,
    group_bytes: u32,
    level: i32,
}

/// A full compression group to compress without holding the writer (see
/// [`PackWriter::add_grouped_deferred`]).
pub struct SealJob {
    writer: u64,
    id: u64,
    plain: std::sync::Arc<Vec<u8>>,
    members: usize,
    level: i32,
}

impl SealJob {
    /// The group's frame, for [`PackWriter::finish_seal`].
    pub fn compress(&self) -> Result<Vec<u8>> {
        compress_group(&self.plain, self.members, self.level)
    }
}

fn compress_group(plain: &[u8], members: usize, level: i32) -> Result<Vec<u8>> {
    encode_chunk(plain, level)
        .map_err(|e| StoreError::io(format!("compressing a group of {members} objects"), e))
}

enum Sink {
    File {
        dir: PathBuf,
        file: tempfile::NamedTempFile,
    },
    Memory(Vec<u8>),
}

impl Sink {
    fn name(&self) -> String {
        match self {
            Sink::File { file, .. } => file.path().display().to_string(),
            Sink::Memory(_) => "a pack in memory".into(),
        }
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Entry(usize),
    Open(usize, Member),
    Sealing(u64, Member),
}

#[derive(Default)]
struct OpenGroup {
    /// Shared with a [`SealJob`] once the group is full.
    plain: std::sync::Arc<Vec<u8>>,
    members: Vec<(ObjectKind, B3Digest, Member)>,
}

/// Which open group an object goes into: chunks, or metadata.
fn class(kind: ObjectKind) -> usize {
    match kind {
        ObjectKind::Chunk => 0,
        ObjectKind::Directory | ObjectKind::BlobIndex => 1,
    }
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
        Ok(Self::with_sink(Sink::File {
            dir: dir.to_path_buf(),
            file,
        }))
    }

    /// A pack built in memory, for a store that uploads it whole (see [`Self::finish`]).
    pub fn in_memory() -> Self {
        Self::with_sink(Sink::Memory(PACK_MAGIC.to_vec()))
    }

    fn with_sink(sink: Sink) -> Self {
        Self {
            sink,
            len: PACK_MAGIC.len() as u64,
            entries: Vec::new(),
            at: Default::default(),
            open: Default::default(),
            sealing: Default::default(),
            next_seal: 0,
            serial: NEXT_WRITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            group_bytes: 0,
            level: 3,
        }
    }

    /// Compresses small objects added with [`Self::add_grouped`] together, in groups of
    /// `group_bytes` plain bytes, at zstd `level`.
    pub fn with_groups(mut self, group_bytes: u32, level: i32) -> Self {
        self.group_bytes = group_bytes;
        self.level = level;
        self
    }

    /// Appends one object's stored bytes, alone; returns where it went.
    pub fn append(
        &mut self,
        kind: ObjectKind,
        digest: B3Digest,
        data: &[u8],
    ) -> Result<IndexEntry> {
        let len = u32::try_from(data.len()).map_err(|_| {
            StoreError::Backend(format!("{} {digest}: too large for a pack", kind.what()))
        })?;
        self.write(data)?;
        let e = IndexEntry {
            kind,
            digest,
            offset: self.len,
            len,
            member: None,
        };
        self.len += data.len() as u64;
        self.at
            .insert((kind, digest), Slot::Entry(self.entries.len()));
        self.entries.push(e);
        Ok(e)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.sink {
            Sink::File { file, .. } => file
                .write_all(data)
                .map_err(|e| StoreError::io(format!("writing pack {}", file.path().display()), e)),
            Sink::Memory(body) => {
                body.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Adds one small object's plain bytes to its open compression group (see [`grouped`]),
    /// sealing the group once it is full.
    pub fn add_grouped(&mut self, kind: ObjectKind, digest: B3Digest, plain: &[u8]) -> Result<()> {
        let c = class(kind);
        if self.add_to_group(c, kind, digest, plain)? {
            self.seal(c)?;
        }
        Ok(())
    }

    /// As [`Self::add_grouped`], but a group this fills is handed back to be compressed by
    /// the caller without holding the writer (so several threads compress at once), and
    /// appended with [`Self::finish_seal`]. Until then its objects are read from its plain
    /// bytes, and a commit compresses it itself.
    pub fn add_grouped_deferred(
        &mut self,
        kind: ObjectKind,
        digest: B3Digest,
        plain: &[u8],
    ) -> Result<Option<SealJob>> {
        let c = class(kind);
        if !self.add_to_group(c, kind, digest, plain)? {
            return Ok(None);
        }
        let g = std::mem::take(&mut self.open[c]);
        let id = self.next_seal;
        self.next_seal += 1;
        for (kind, digest, m) in &g.members {
            self.at.insert((*kind, *digest), Slot::Sealing(id, *m));
        }
        let job = SealJob {
            writer: self.serial,
            id,
            plain: g.plain.clone(),
            members: g.members.len(),
            level: self.level,
        };
        self.sealing.insert(id, g);
        Ok(Some(job))
    }

    /// Appends the frame of a group handed out by [`Self::add_grouped_deferred`]. A job of
    /// another writer, or one already sealed by a commit, is ignored.
    pub fn finish_seal(&mut self, job: &SealJob, frame: &[u8]) -> Result<()> {
        if job.writer != self.serial {
            return Ok(());
        }
        match self.sealing.remove(&job.id) {
            Some(g) => self.append_group(g, frame),
            None => Ok(()),
        }
    }

    /// Puts an object's plain bytes into open group `c`; true once the group is full.
    fn add_to_group(
        &mut self,
        c: usize,
        kind: ObjectKind,
        digest: B3Digest,
        plain: &[u8],
    ) -> Result<bool> {
        let g = &mut self.open[c];
        let m = Member {
            offset: g.plain.len() as u32,
            len: plain.len() as u32,
        };
        if self.group_bytes == 0
            || plain.len() > self.group_bytes as usize
            || g.plain.len() + plain.len() > GROUP_PLAIN_MAX
        {
            return Err(StoreError::Backend(format!(
                "{} {digest}: {} bytes do not fit a compression group",
                kind.what(),
                plain.len()
            )));
        }
        // The open group's bytes are never shared (only a full group's are).
        std::sync::Arc::make_mut(&mut g.plain).extend_from_slice(plain);
        g.members.push((kind, digest, m));
        self.at.insert((kind, digest), Slot::Open(c, m));
        Ok(g.plain.len() >= self.seal_at(c))
    }

    /// Plain bytes at which open group `c` is sealed: the store's group size for chunks, at
    /// most [`METADATA_GROUP_BYTES`] for directories and blob indexes.
    fn seal_at(&self, c: usize) -> usize {
        match c {
            0 => self.group_bytes as usize,
            _ => (self.group_bytes as usize).min(METADATA_GROUP_BYTES),
        }
    }

    /// Compresses an open group into one frame and appends it.
    fn seal(&mut self, c: usize) -> Result<()> {
        let g = std::mem::take(&mut self.open[c]);
        if g.members.is_empty() {
            return Ok(());
        }
        let frame = compress_group(&g.plain, g.members.len(), self.level)?;
        self.append_group(g, &frame)
    }

    /// Seals every group still open or still out for compression (before a commit).
    fn seal_all(&mut self) -> Result<()> {
        self.seal(0)?;
        self.seal(1)?;
        let mut out: Vec<u64> = self.sealing.keys().copied().collect();
        out.sort_unstable();
        for id in out {
            if let Some(g) = self.sealing.remove(&id) {
                let frame = compress_group(&g.plain, g.members.len(), self.level)?;
                self.append_group(g, &frame)?;
            }
        }
        Ok(())
    }

    fn append_group(&mut self, g: OpenGroup, frame: &[u8]) -> Result<()> {
        let len = u32::try_from(frame.len())
            .map_err(|_| StoreError::Backend("compression group too large for a pack".into()))?;
        self.write(frame)?;
        for (kind, digest, m) in g.members {
            self.at
                .insert((kind, digest), Slot::Entry(self.entries.len()));
            self.entries.push(IndexEntry {
                kind,
                digest,
                offset: self.len,
                len,
                member: Some(m),
            });
        }
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Verifies an object read from another pack and writes it here: grouped if it is small
    /// and this pack groups (so a gc's rewrite moves objects of older stores into groups),
    /// else alone (a chunk stored alone keeps its frame, unless `recompress`).
    pub fn copy(
        &mut self,
        kind: ObjectKind,
        digest: B3Digest,
        stored: Stored,
        recompress: bool,
    ) -> Result<()> {
        if kind != ObjectKind::Chunk {
            stored.verify(kind, &digest)?;
            let bytes = stored.into_protobuf();
            return if grouped(self.group_bytes, bytes.len()) {
                self.add_grouped(kind, digest, &bytes)
            } else {
                self.append(kind, digest, &bytes).map(drop)
            };
        }
        let frame = match &stored {
            Stored::Alone(raw) if !recompress => Some(raw.clone()),
            _ => None,
        };
        let plain = stored.into_chunk(&digest)?;
        if grouped(self.group_bytes, plain.len()) {
            return self.add_grouped(kind, digest, &plain);
        }
        let frame = match frame {
            Some(f) => f,
            None => encode_chunk(&plain, self.level)
                .map_err(|e| StoreError::io(format!("compressing chunk {digest}"), e))?,
        };
        self.append(kind, digest, &frame).map(drop)
    }

    pub fn contains(&self, kind: ObjectKind, digest: &B3Digest) -> bool {
        self.at.contains_key(&(kind, *digest))
    }

    /// Reads back an object added earlier (this process's not yet committed writes).
    pub fn read(&self, kind: ObjectKind, digest: &B3Digest) -> Result<Option<Stored>> {
        match self.at.get(&(kind, *digest)) {
            None => Ok(None),
            Some(Slot::Open(c, m)) => Ok(member_plain(&self.open[*c], *m)),
            Some(Slot::Sealing(id, m)) => {
                Ok(self.sealing.get(id).and_then(|g| member_plain(g, *m)))
            }
            Some(Slot::Entry(i)) => {
                let e = self.entries[*i];
                let raw = match &self.sink {
                    Sink::File { file, .. } => read_at(file.as_file(), file.path(), &e)?,
                    Sink::Memory(body) => body
                        .get(e.offset as usize..e.offset as usize + e.len as usize)
                        .map(<[u8]>::to_vec)
                        .ok_or_else(|| {
                            StoreError::Backend(format!("{}: short", self.sink.name()))
                        })?,
                };
                member_of(&e, &raw, "this process's unflushed pack").map(Some)
            }
        }
    }

    /// Bytes written, or waiting in open groups and groups out for compression.
    pub fn bytes(&self) -> u64 {
        let open = self.open.iter().chain(self.sealing.values());
        self.len + open.map(|g| g.plain.len() as u64).sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
            && self.sealing.is_empty()
            && self.open.iter().all(|g| g.members.is_empty())
    }

    /// Makes the pack durable under its final name, then its index (the commit point).
    /// Returns the pack's id and its entries.
    pub fn commit(mut self, tmp_prefix: &str) -> Result<(String, Vec<IndexEntry>)> {
        self.seal_all()?;
        let Sink::File { dir, file } = self.sink else {
            return Err(StoreError::Backend(
                "a pack built in memory has no directory to commit to".into(),
            ));
        };
        let id = new_id();
        let pack = dir.join(format!("{id}.pack"));
        let ctx = |p: &Path, e| StoreError::io(format!("writing {}", p.display()), e);
        file.as_file().sync_data().map_err(|e| ctx(&pack, e))?;
        file.persist(&pack).map_err(|e| ctx(&pack, e.error))?;
        let idx = dir.join(format!("{id}.idx"));
        let mut t = tempfile::Builder::new()
            .prefix(tmp_prefix)
            .tempfile_in(&dir)
            .map_err(|e| ctx(&idx, e))?;
        t.write_all(&encode_index(&self.entries))
            .map_err(|e| ctx(&idx, e))?;
        t.as_file().sync_data().map_err(|e| ctx(&idx, e))?;
        t.persist(&idx).map_err(|e| ctx(&idx, e.error))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ctx(&dir, e))?;
        Ok((id, self.entries))
    }

    /// Seals the open groups and hands over a pack built [`Self::in_memory`]: its bytes and
    /// its entries (for [`encode_index`]).
    pub fn finish(mut self) -> Result<(Vec<u8>, Vec<IndexEntry>)> {
        self.seal_all()?;
        match self.sink {
            Sink::Memory(body) => Ok((body, self.entries)),
            Sink::File { file, .. } => Err(StoreError::Backend(format!(
                "{} is a file: commit it instead",
                file.path().display()
            ))),
        }
    }
}

/// Plain bytes of decompressed compression groups a store keeps in memory: 8 groups at the
/// default group size. Counted in bytes, not groups, so a store with bigger groups (up to
/// 8 MiB) holds no more memory.
pub const GROUP_CACHE_BYTES: usize = 16 << 20;

/// Decompressed compression groups by (pack id, frame offset), least recently used first
/// out once they hold more than [`GROUP_CACHE_BYTES`] (the newest always stays).
pub struct GroupCache<V> {
    lru: lru::LruCache<(String, u64), (V, usize)>,
    bytes: usize,
}

impl<V> Default for GroupCache<V> {
    fn default() -> Self {
        Self {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
        }
    }
}

impl<V> GroupCache<V> {
    pub fn get(&mut self, id: &str, offset: u64) -> Option<&V> {
        self.lru.get(&(id.to_string(), offset)).map(|(v, _)| v)
    }

    /// Caches `group`, which holds `bytes` plain bytes; gives back the groups let go.
    pub fn put(&mut self, id: String, offset: u64, group: V, bytes: usize) -> Vec<V> {
        let mut out = Vec::new();
        self.bytes += bytes;
        if let Some((old, n)) = self.lru.put((id, offset), (group, bytes)) {
            self.bytes -= n;
            out.push(old);
        }
        while self.bytes > GROUP_CACHE_BYTES && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, (old, n))) => {
                    self.bytes -= n;
                    out.push(old);
                }
                None => break,
            }
        }
        out
    }
}

static NEXT_WRITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn member_plain(g: &OpenGroup, m: Member) -> Option<Stored> {
    g.plain
        .get(m.offset as usize..(m.offset + m.len) as usize)
        .map(|b| Stored::Plain(b.to_vec()))
}

/// Reads one entry's bytes as stored in an open pack: an object alone, or its group's frame.
pub fn read_at(file: &std::fs::File, path: &Path, e: &IndexEntry) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_into(file, path, e, &mut buf)?;
    Ok(buf)
}

/// [`read_at`] into `buf` (resized to the entry's length; its allocation reused).
pub fn read_into(
    file: &std::fs::File,
    path: &Path,
    e: &IndexEntry,
    buf: &mut Vec<u8>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    buf.resize(e.len as usize, 0);
    file.read_exact_at(buf, e.offset).map_err(|err| {
        StoreError::io(
            format!(
                "reading {} {} from {}",
                e.kind.what(),
                e.digest,
                path.display()
            ),
            err,
        )
    })
}

/// The object an entry names, from the bytes [`read_at`] read for it (for a grouped object,
/// its group's frame, decompressed here). `pack` names the pack in errors.
pub fn member_of(e: &IndexEntry, raw: &[u8], pack: &str) -> Result<Stored> {
    match e.member {
        None => Ok(Stored::Alone(raw.to_vec())),
        Some(m) => {
            let plain = decode_group(raw).map_err(|why| group_damaged(e, pack, &why))?;
            slice_member(e, m, &plain, pack)
        }
    }
}

/// A grouped object's bytes out of its decompressed group.
pub fn slice_member(e: &IndexEntry, m: Member, plain: &[u8], pack: &str) -> Result<Stored> {
    plain
        .get(m.offset as usize..m.offset as usize + m.len as usize)
        .map(|b| Stored::Plain(b.to_vec()))
        .ok_or_else(|| {
            group_damaged(
                e,
                pack,
                &format!("it holds {} bytes, too few for this object", plain.len()),
            )
        })
}

/// The error for an object whose compression group cannot be read: it names the object, and
/// the group, so every object sharing it can be found.
pub fn group_damaged(e: &IndexEntry, pack: &str, why: &str) -> StoreError {
    StoreError::corrupt(
        e.kind.what(),
        &e.digest,
        format!(
            "its compression group ({} bytes at {} in pack {pack}) is damaged: {why}",
            e.len, e.offset
        ),
    )
}

mod set;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use set::*;
