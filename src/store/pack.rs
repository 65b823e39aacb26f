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

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<IndexEntry> {
        (0..3u8)
            .map(|i| IndexEntry {
                kind: [
                    ObjectKind::Chunk,
                    ObjectKind::BlobIndex,
                    ObjectKind::Directory,
                ][i as usize],
                digest: B3Digest::of(&[i]),
                offset: 8 + 10 * i as u64,
                len: 10,
            })
            .collect()
    }

    #[test]
    fn index_round_trips() {
        let e = entries();
        assert_eq!(decode_index("p", &encode_index(&e), 38).unwrap(), e);
        assert!(decode_index("p", &encode_index(&[]), 8).unwrap().is_empty());
    }

    #[test]
    fn bad_indexes_are_refused_with_their_reason() {
        let good = encode_index(&entries());
        let err = |raw: &[u8], pack_len| decode_index("p1", raw, pack_len).unwrap_err().to_string();
        assert!(err(b"short", 38).contains("not a granary pack index"));
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(err(&flipped, 38).contains("checksum mismatch"));
        // An entry reaching past the end of the pack.
        assert!(
            err(&good, 37).contains("outside the pack"),
            "{}",
            err(&good, 37)
        );
        // A count that disagrees with the bytes (checksum recomputed so only the count is wrong).
        let mut body = good[..good.len() - 32].to_vec();
        body[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        assert!(
            err(&body, 38).contains("entries but holds"),
            "{}",
            err(&body, 38)
        );
        // An unknown kind.
        let mut body = good[..good.len() - 32].to_vec();
        body[16] = 9;
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        assert!(err(&body, 38).contains("unknown kind 9"));
    }

    #[test]
    fn lookups_find_the_newest_copy_in_any_index_order() {
        let d = tempfile::tempdir().unwrap();
        let set = PackSet::new(d.path().to_path_buf());
        let objs: Vec<B3Digest> = (0..50u8).map(|i| B3Digest::of(&[i])).collect();
        // An old pack holding every object, its index in write order (as an index from
        // before sorting was introduced would be).
        let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
        for (i, o) in objs.iter().enumerate() {
            w.append(ObjectKind::Chunk, *o, &[b'a', i as u8]).unwrap();
        }
        let old_entries = w.entries().to_vec();
        let old = w.commit(".tmp-").unwrap();
        let raw = encode_entries_as_given(&old_entries);
        assert!(
            raw != encode_index(&old_entries),
            "written out of index order"
        );
        std::fs::write(d.path().join(format!("{old}.idx")), raw).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        // A newer pack holding a second copy of every other object.
        let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
        for (i, o) in objs.iter().enumerate().step_by(2) {
            w.append(ObjectKind::Chunk, *o, &[b'b', i as u8]).unwrap();
        }
        w.commit(".tmp-").unwrap();
        for (i, o) in objs.iter().enumerate() {
            let got = set.read(ObjectKind::Chunk, o, None).unwrap().unwrap();
            let want = if i % 2 == 0 { b'b' } else { b'a' };
            assert_eq!(got, vec![want, i as u8], "object {i}");
            assert!(!set.contains(ObjectKind::Directory, o));
        }
        assert_eq!(set.objects(ObjectKind::Chunk).len(), objs.len());
    }

    #[test]
    fn writer_commits_a_pack_and_its_index() {
        let d = tempfile::tempdir().unwrap();
        let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
        let a = w
            .append(ObjectKind::Chunk, B3Digest::of(b"a"), b"hello")
            .unwrap();
        let b = w
            .append(ObjectKind::Directory, B3Digest::of(b"b"), b"world!")
            .unwrap();
        assert_eq!(w.read(&b).unwrap(), b"world!");
        let id = w.commit(".tmp-").unwrap();
        assert!(is_id(&id), "{id}");
        let pack = d.path().join(format!("{id}.pack"));
        let raw = std::fs::read(d.path().join(format!("{id}.idx"))).unwrap();
        let len = std::fs::metadata(&pack).unwrap().len();
        // The index lists entries by digest, whatever the order they were written in.
        let mut want = vec![a, b];
        want.sort_by(order);
        assert_eq!(decode_index(&id, &raw, len).unwrap(), want);
        let f = std::fs::File::open(&pack).unwrap();
        assert_eq!(read_at(&f, &pack, &a).unwrap(), b"hello");
        // Nothing but the pack and its index is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }
}

/// One committed pack this process knows.
struct KnownPack {
    id: String,
    path: PathBuf,
    /// Its index, in index order.
    entries: Vec<IndexEntry>,
    /// Opened on first read and kept: a gc that replaces the pack unlinks it, and reads through
    /// an open descriptor still see its bytes.
    file: std::sync::Mutex<Option<std::sync::Arc<std::fs::File>>>,
}

impl PackState {
    /// The newest pack holding an object, and where in it: a binary search per pack.
    fn find(&self, kind: ObjectKind, digest: &B3Digest) -> Option<(&KnownPack, IndexEntry)> {
        let key = (digest.as_bytes(), kind_code(kind));
        self.packs.iter().rev().find_map(|p| {
            p.entries
                .binary_search_by(|e| (e.digest.as_bytes(), kind_code(e.kind)).cmp(&key))
                .ok()
                .map(|i| (p, p.entries[i]))
        })
    }
}

#[derive(Default)]
struct PackState {
    /// Oldest first (ids sort by age).
    packs: Vec<KnownPack>,
    /// The packs directory's mtime at the last scan, and when that scan ran.
    seen: Option<(std::time::SystemTime, std::time::SystemTime)>,
    /// Indexes that could not be read at the last scan: (id, reason).
    bad: Vec<(String, String)>,
}

/// The committed packs of a directory, as an in-memory index from object to location.
/// Rescanned when the directory changes (another process committed or a gc replaced packs).
pub struct PackSet {
    dir: PathBuf,
    state: std::sync::RwLock<PackState>,
    /// Pack files held open; past [`MAX_OPEN_PACKS`] further packs are opened per read, so
    /// a store of very many packs cannot exhaust the process's descriptors.
    open: std::sync::atomic::AtomicUsize,
    /// Whether the indexes were read once (it is done on first use, not at open: a store of
    /// a million objects takes a while to index, and a mount's first stat needs none).
    loaded: std::sync::atomic::AtomicBool,
    load: std::sync::Mutex<()>,
    /// Damaged packs already reported in the log.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
}

const MAX_OPEN_PACKS: usize = 256;

impl PackSet {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            state: Default::default(),
            open: Default::default(),
            loaded: Default::default(),
            load: Default::default(),
            warned: Default::default(),
        }
    }

    /// Reads every index, once; concurrent first users wait for the one that does it.
    pub fn ensure_loaded(&self) -> Result<()> {
        use std::sync::atomic::Ordering::{Acquire, Release};
        if self.loaded.load(Acquire) {
            return Ok(());
        }
        let _g = self
            .load
            .lock()
            .map_err(|_| StoreError::Backend("pack load lock poisoned".into()))?;
        if !self.loaded.load(Acquire) {
            self.refresh(true)?;
            self.loaded.store(true, Release);
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_state(&self) -> Result<std::sync::RwLockReadGuard<'_, PackState>> {
        self.state
            .read()
            .map_err(|_| StoreError::Backend("pack index lock poisoned".into()))
    }

    fn write_state(&self) -> Result<std::sync::RwLockWriteGuard<'_, PackState>> {
        self.state
            .write()
            .map_err(|_| StoreError::Backend("pack index lock poisoned".into()))
    }

    pub fn contains(&self, kind: ObjectKind, digest: &B3Digest) -> bool {
        // A failed load shows up as "absent" here and as its error on the read that follows.
        let _ = self.ensure_loaded();
        self.state
            .read()
            .is_ok_and(|s| s.find(kind, digest).is_some())
    }

    pub fn is_empty(&self) -> bool {
        let _ = self.ensure_loaded();
        self.state
            .read()
            .map_or(true, |s| s.packs.iter().all(|p| p.entries.is_empty()))
    }

    /// The committed packs' ids, oldest first, as of the last scan.
    pub fn ids(&self) -> Vec<String> {
        self.state
            .read()
            .map(|s| s.packs.iter().map(|p| p.id.clone()).collect())
            .unwrap_or_default()
    }

    pub fn pack_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pack"))
    }

    pub fn index_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.idx"))
    }

    /// The path of the newest pack holding an object.
    pub fn path_of(&self, kind: ObjectKind, digest: &B3Digest) -> Option<PathBuf> {
        self.ensure_loaded().ok()?;
        let st = self.state.read().ok()?;
        st.find(kind, digest).map(|(p, _)| p.path.clone())
    }

    /// Reads an object's stored bytes (the first `prefix` bytes only, if given). `Ok(None)`
    /// if no known pack holds it, or its pack is gone (replaced by a gc: the caller rescans
    /// and looks again). Lookup and pack are taken under one lock, so a concurrent rescan
    /// cannot pair a location with another pack.
    pub fn read(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Vec<u8>>> {
        self.ensure_loaded()?;
        let (file, path, mut e) = {
            let st = self.read_state()?;
            let Some((p, entry)) = st.find(kind, digest) else {
                return Ok(None);
            };
            let mut slot = p
                .file
                .lock()
                .map_err(|_| StoreError::Backend("pack file lock poisoned".into()))?;
            let file = match &*slot {
                Some(f) => f.clone(),
                None => match std::fs::File::open(&p.path) {
                    Ok(f) => {
                        let f = std::sync::Arc::new(f);
                        use std::sync::atomic::Ordering::Relaxed;
                        if self.open.fetch_add(1, Relaxed) < MAX_OPEN_PACKS {
                            *slot = Some(f.clone());
                        } else {
                            self.open.fetch_sub(1, Relaxed);
                        }
                        f
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(StoreError::io(format!("opening {}", p.path.display()), e))
                    }
                },
            };
            (file, p.path.clone(), entry)
        };
        if let Some(n) = prefix {
            e.len = e.len.min(n as u32);
        }
        read_at(&file, &path, &e).map(Some)
    }

    /// Rescans the directory if it changed since the last scan (or `force`). Returns whether
    /// anything changed.
    pub fn refresh(&self, force: bool) -> Result<bool> {
        if !force && !self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            self.ensure_loaded()?;
            return Ok(true);
        }
        let mtime = match std::fs::metadata(&self.dir) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io(format!("stat {}", self.dir.display()), e)),
        };
        let Some(mtime) = mtime else {
            return Ok(false);
        };
        let now = std::time::SystemTime::now();
        if !force {
            // Directory times are coarse (a few ms): a scan that ran well after the last
            // change saw everything up to it; one that ran in the same moment may not have.
            if let Some((seen, at)) = self.read_state()?.seen {
                let settled = at
                    .duration_since(seen)
                    .is_ok_and(|d| d > std::time::Duration::from_millis(100));
                if seen == mtime && settled {
                    return Ok(false);
                }
            }
        }
        let mut names: Vec<String> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(StoreError::io(format!("listing {}", self.dir.display()), e)),
        };
        names.sort();
        let have: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut ids: Vec<String> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".idx"))
            .filter(|id| is_id(id) && have.contains(format!("{id}.pack").as_str()))
            .map(str::to_string)
            .collect();
        let mut st = self.write_state()?;
        // A pack this process committed after the listing above is still there.
        for p in &st.packs {
            if !ids.contains(&p.id) && self.index_path(&p.id).exists() {
                ids.push(p.id.clone());
            }
        }
        ids.sort();
        st.seen = Some((mtime, now));
        let listed: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        // Damaged indexes are judged afresh: one set aside (or repaired) is no longer listed.
        st.bad.retain(|(id, _)| listed.contains(id.as_str()));
        if st.packs.iter().all(|p| listed.contains(p.id.as_str())) {
            // Only additions (the common case: another import committed): load just those.
            let known: std::collections::HashSet<String> =
                st.packs.iter().map(|p| p.id.clone()).collect();
            let mut changed = false;
            for id in ids.iter().filter(|id| !known.contains(id.as_str())) {
                let Some(entries) = self.entries_or_skip(id, &mut st.bad) else {
                    continue;
                };
                st.packs.push(self.known(id, entries));
                changed = true;
            }
            st.packs.sort_by(|a, b| a.id.cmp(&b.id));
            return Ok(changed);
        }
        // Some pack went away (a gc rewrote it): rebuild.
        let mut old: std::collections::HashMap<String, KnownPack> =
            st.packs.drain(..).map(|p| (p.id.clone(), p)).collect();
        let mut fresh = PackState {
            seen: st.seen,
            ..Default::default()
        };
        for id in &ids {
            let Some(entries) = self.entries_or_skip(id, &mut fresh.bad) else {
                continue;
            };
            let known = match old.remove(id) {
                Some(k) => KnownPack {
                    entries: sorted(entries),
                    ..k
                },
                None => self.known(id, entries),
            };
            fresh.packs.push(known);
        }
        let open = fresh
            .packs
            .iter()
            .filter(|p| p.file.lock().is_ok_and(|f| f.is_some()))
            .count();
        self.open.store(open, std::sync::atomic::Ordering::Relaxed);
        *st = fresh;
        Ok(true)
    }

    fn known(&self, id: &str, entries: Vec<IndexEntry>) -> KnownPack {
        KnownPack {
            id: id.to_string(),
            path: self.pack_path(id),
            entries: sorted(entries),
            file: Default::default(),
        }
    }

    /// A pack's entries; `None` if it went away meanwhile (a gc) or its index is unreadable
    /// (recorded in `bad`, for gc and verify to report).
    fn entries_or_skip(
        &self,
        id: &str,
        bad: &mut Vec<(String, String)>,
    ) -> Option<Vec<IndexEntry>> {
        match self.entries_of(id) {
            Ok(e) => Some(e),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(e) => {
                // Once per pack per process: every rescan meets it again.
                if self
                    .warned
                    .lock()
                    .is_ok_and(|mut w| w.insert(id.to_string()))
                {
                    tracing::warn!("{e}");
                }
                if !bad.iter().any(|(b, _)| b == id) {
                    bad.push((id.to_string(), e.to_string()));
                }
                None
            }
        }
    }

    /// Reads and checks one pack's index.
    pub fn entries_of(&self, id: &str) -> Result<Vec<IndexEntry>> {
        let idx = self.index_path(id);
        let pack = self.pack_path(id);
        let raw = std::fs::read(&idx)
            .map_err(|e| StoreError::io(format!("reading {}", idx.display()), e))?;
        let len = std::fs::metadata(&pack)
            .map_err(|e| StoreError::io(format!("stat {}", pack.display()), e))?
            .len();
        decode_index(id, &raw, len)
    }

    /// Indexes the last scan could not read.
    pub fn bad(&self) -> Vec<(String, String)> {
        self.state.read().map(|s| s.bad.clone()).unwrap_or_default()
    }

    /// Every object of one kind in the known packs, with its pack's id.
    pub fn objects(&self, kind: ObjectKind) -> Vec<(IndexEntry, String)> {
        let Ok(st) = self.state.read() else {
            return Vec::new();
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for p in st.packs.iter().rev() {
            for e in p.entries.iter().filter(|e| e.kind == kind) {
                if seen.insert(e.digest) {
                    out.push((*e, p.id.clone()));
                }
            }
        }
        out
    }
}

impl PackSet {
    /// Makes a pack this process just committed known without rescanning the directory.
    pub fn add(&self, id: &str, entries: &[IndexEntry]) -> Result<()> {
        let mut st = self.write_state()?;
        if !st.packs.iter().any(|p| p.id == id) {
            let known = self.known(id, entries.to_vec());
            st.packs.push(known);
            st.packs.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(())
    }
}
