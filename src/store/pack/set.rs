//! The committed packs of a store as one in-memory index from object to location: loaded once in the background, rescanned when another process commits or a gc rewrites packs, each pack file kept open.

#[allow(unused_imports)]
use super::*;

fn member_in(e: &IndexEntry, plain: &[u8], pack: &str) -> Result<Option<Stored>> {
    match e.member {
        Some(m) => slice_member(e, m, plain, pack).map(Some),
        None => Ok(None),
    }
}

/// One committed pack this process knows.
pub(super) struct KnownPack {
    id: String,
    path: PathBuf,
    /// Its index, in index order (empty while `unchecked`).
    entries: Vec<IndexEntry>,
    /// Until its index has been read whole and checked: the index file, searched in place.
    unchecked: Option<Unchecked>,
    /// Opened on first read and kept: a gc that replaces the pack unlinks it, and reads through
    /// an open descriptor still see its bytes.
    file: std::sync::Mutex<Option<std::sync::Arc<std::fs::File>>>,
}

/// A pack index not yet read whole: its shape checked against its length, its entries read
/// one at a time by a binary search (a mount's first lookups need a few dozen entries, not
/// the ≈ 10 ms of reading, checksumming and decoding every index of a large store). What such
/// a search finds is checked as a whole index's entries are, and the object read from it is
/// verified by its digest like every other; the checksum is checked when the index is read
/// whole, soon after, in the background.
pub(super) struct Unchecked {
    idx: std::sync::Arc<std::fs::File>,
    shape: IndexShape,
    count: usize,
    pack_len: u64,
}

impl Unchecked {
    /// The entry of an object, if the search in place meets it. `None` is not proof of
    /// absence: an index an older granary wrote unsorted cannot be searched in place.
    fn search(&self, id: &str, kind: ObjectKind, digest: &B3Digest) -> Option<IndexEntry> {
        use std::os::unix::fs::FileExt;
        let key = (digest.as_bytes().as_slice(), kind_code(kind));
        let mut buf = [0u8; 64];
        let rec = buf.get_mut(..self.shape.entry_bytes)?;
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = INDEX_HEAD as u64 + mid as u64 * self.shape.entry_bytes as u64;
            self.idx.read_exact_at(rec, at).ok()?;
            match IndexShape::key_of(rec).cmp(&key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.shape.record(id, rec, self.pack_len).ok(),
            }
        }
        None
    }
}

/// What a lookup found.
pub(super) enum Found<'a> {
    At(&'a KnownPack, IndexEntry),
    Absent,
    /// Not found, but an index searched in place could not say for sure.
    Unsure,
}

impl PackState {
    /// The newest pack holding an object, and where in it: a binary search per pack.
    pub(super) fn find(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
    ) -> Option<(&KnownPack, IndexEntry)> {
        match self.lookup(kind, digest) {
            Found::At(p, e) => Some((p, e)),
            Found::Absent | Found::Unsure => None,
        }
    }

    /// As [`PackState::find`], also searching indexes not yet checked whole in place. A copy
    /// found there may be older than one such a search missed: every copy holds the same
    /// verified bytes, so a read may use it.
    pub(super) fn lookup(&self, kind: ObjectKind, digest: &B3Digest) -> Found<'_> {
        let key = (digest.as_bytes(), kind_code(kind));
        let mut unsure = false;
        for p in self.packs.iter().rev() {
            let hit = match &p.unchecked {
                None => p
                    .entries
                    .binary_search_by(|e| (e.digest.as_bytes(), kind_code(e.kind)).cmp(&key))
                    .ok()
                    .map(|i| p.entries[i]),
                Some(u) => {
                    let e = u.search(&p.id, kind, digest);
                    unsure |= e.is_none();
                    e
                }
            };
            if let Some(e) = hit {
                return Found::At(p, e);
            }
        }
        if unsure {
            Found::Unsure
        } else {
            Found::Absent
        }
    }
}

#[derive(Default)]
pub(super) struct PackState {
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
    /// Whether every index the first load left [`Unchecked`] was since read whole.
    checked: std::sync::atomic::AtomicBool,
    check: std::sync::Mutex<()>,
    /// Damaged packs already reported in the log.
    warned: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Compression groups decompressed lately, by pack and frame offset: the neighbours of
    /// an object are what a walk or a read asks for next.
    groups: std::sync::Mutex<Groups>,
    /// Buffers of groups the cache let go, for the next decompressions: a group's few MiB
    /// freed and allocated again for every group leave holes in the heap that chunk-sized
    /// allocations fill, and the allocator keeps them (≈ 60 MB more RSS over a full read of
    /// a Python store).
    pub(super) spare: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Buffers for compressed frames being read, for the same reason.
    pub(super) frames: Frames,
    decoding: [std::sync::Mutex<()>; DECODING_STRIPES],
}

/// Group buffers kept for reuse, and the largest kept (a default group is 2 MiB and a bit).
pub(super) const SPARE_BUFFERS: usize = 2;
pub(super) const SPARE_KEPT: usize = 4 << 20;
/// Groups read and decompressed at once, at most: two cores decompress no faster with more,
/// and each holds its compressed frame in memory meanwhile.
pub(super) const DECODERS: usize = 4;
/// The largest frame buffer kept for reuse (a default group's frame is 0.5–2 MiB).
const FRAME_KEPT: usize = 3 << 20;

/// The most memory a [`PackSet`] holds for reads: its decompressed groups, the buffers it
/// keeps, and the frames being decoded (larger ones, of bigger groups, are rare and brief).
pub const READ_MEMORY_BYTES: usize =
    GROUP_CACHE_BYTES + SPARE_BUFFERS * SPARE_KEPT + DECODERS * FRAME_KEPT;

/// The buffers for compressed frames, which are also the permits to decode (see
/// [`DECODERS`]).
pub(super) struct Frames {
    pub(super) free: std::sync::Mutex<Vec<Vec<u8>>>,
    returned: std::sync::Condvar,
}

impl Default for Frames {
    fn default() -> Self {
        Self {
            free: std::sync::Mutex::new((0..DECODERS).map(|_| Vec::new()).collect()),
            returned: std::sync::Condvar::new(),
        }
    }
}

impl Frames {
    /// A buffer, once one of the [`DECODERS`] is free.
    fn take(&self) -> Frame<'_> {
        // Every update under this lock is one step, so a poisoned lock holds sound data.
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(buf) = free.pop() {
                return Frame { pool: self, buf };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A frame buffer, given back when dropped (also on an error path).
struct Frame<'a> {
    pool: &'a Frames,
    buf: Vec<u8>,
}

impl Drop for Frame<'_> {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > FRAME_KEPT {
            buf = Vec::new();
        }
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(buf);
        drop(free);
        self.pool.returned.notify_one();
    }
}

const DECODING_STRIPES: usize = 16;

type Groups = super::GroupCache<CachedGroup>;

/// The stamp of the pack a group was read from, and the group's plain bytes.
type CachedGroup = std::sync::Arc<(Stamp, Vec<u8>)>;

/// A pack file's size and modification time: any write to it changes them.
type Stamp = (u64, i64, i64);

fn stamp_of(file: &std::fs::File) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    Some((m.size(), m.mtime(), m.mtime_nsec()))
}

pub(super) const MAX_OPEN_PACKS: usize = 256;
/// The most indexes the first load opens to search in place (each holds a descriptor until
/// it is read whole); a store of more packs is indexed whole at once, as it was before.
const MAX_IN_PLACE: usize = 64;

impl PackSet {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            state: Default::default(),
            open: Default::default(),
            loaded: Default::default(),
            load: Default::default(),
            checked: Default::default(),
            check: Default::default(),
            warned: Default::default(),
            groups: Default::default(),
            spare: Default::default(),
            frames: Default::default(),
            decoding: Default::default(),
        }
    }

    /// Lists the packs and opens their indexes, once (each [`Unchecked`], searched in place
    /// until [`PackSet::ensure_checked`] reads it whole); concurrent first users wait for the
    /// one that does it.
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
            self.scan(true, true)?;
            self.loaded.store(true, Release);
        }
        Ok(())
    }

    /// Loads, then reads every index the load left unchecked whole: checksum and entries
    /// checked, entries kept in memory; a damaged one is set aside as a scan sets it aside.
    /// Concurrent users wait for the one that does it. Everything but a read's lookup needs
    /// this (listings, stats, gc and verify see exactly the checked indexes).
    pub fn ensure_checked(&self) -> Result<()> {
        use std::sync::atomic::Ordering::{Acquire, Release};
        if self.checked.load(Acquire) {
            return Ok(());
        }
        self.ensure_loaded()?;
        // One index at a time, each under the lock: a caller that needs them all takes over
        // from the low-priority background reader after at most one index, at its own
        // priority, rather than waiting for a thread the scheduler may starve.
        loop {
            let g = self
                .check
                .lock()
                .map_err(|_| StoreError::Backend("pack check lock poisoned".into()))?;
            if self.checked.load(Acquire) {
                return Ok(());
            }
            if !self.check_one_in_place_index()? {
                self.checked.store(true, Release);
                return Ok(());
            }
            drop(g);
            std::thread::yield_now();
        }
    }

    /// Reads one index left unchecked whole; `false` if none is left.
    fn check_one_in_place_index(&self) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let next = self.read_state()?.packs.iter().find_map(|p| {
            let u = p.unchecked.as_ref()?;
            Some((p.id.clone(), u.idx.clone(), u.pack_len))
        });
        let Some((id, idx, pack_len)) = next else {
            return Ok(false);
        };
        // Read with no lock on the index held: lookups go on meanwhile.
        let whole = idx
            .metadata()
            .and_then(|m| {
                let mut raw = vec![0; m.len().try_into().unwrap_or(usize::MAX)];
                idx.read_exact_at(&mut raw, 0).map(|()| raw)
            })
            .map_err(|e| StoreError::io(format!("reading {}", self.index_path(&id).display()), e))
            .and_then(|raw| decode_index(&id, &raw, pack_len));
        let mut st = self.write_state()?;
        let Some(i) = st.packs.iter().position(|p| p.id == id) else {
            return Ok(true);
        };
        match whole {
            Ok(entries) => {
                st.packs[i].entries = sorted(entries);
                st.packs[i].unchecked = None;
            }
            Err(e) => {
                st.packs.remove(i);
                let mut bad = Vec::new();
                self.note_damage(&id, &e, &mut bad);
                for b in bad {
                    if !st.bad.iter().any(|(id, _)| *id == b.0) {
                        st.bad.push(b);
                    }
                }
            }
        }
        Ok(true)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn read_state(&self) -> Result<std::sync::RwLockReadGuard<'_, PackState>> {
        self.state
            .read()
            .map_err(|_| StoreError::Backend("pack index lock poisoned".into()))
    }

    pub(super) fn write_state(&self) -> Result<std::sync::RwLockWriteGuard<'_, PackState>> {
        self.state
            .write()
            .map_err(|_| StoreError::Backend("pack index lock poisoned".into()))
    }

    pub fn contains(&self, kind: ObjectKind, digest: &B3Digest) -> bool {
        // A failed load shows up as "absent" here and as its error on the read that follows.
        let _ = self.ensure_checked();
        self.state
            .read()
            .is_ok_and(|s| s.find(kind, digest).is_some())
    }

    pub fn is_empty(&self) -> bool {
        let _ = self.ensure_checked();
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
        self.ensure_checked().ok()?;
        let st = self.state.read().ok()?;
        st.find(kind, digest).map(|(p, _)| p.path.clone())
    }

    /// Where the newest known copy of an object is, as a checked index says: an entry an
    /// index not yet checked whole gives is `None` here (the caller reads the object instead,
    /// which checks it).
    pub fn locate(&self, kind: ObjectKind, digest: &B3Digest) -> Option<IndexEntry> {
        self.ensure_loaded().ok()?;
        let st = self.state.read().ok()?;
        match st.lookup(kind, digest) {
            Found::At(p, e) => p.unchecked.is_none().then_some(e),
            Found::Absent => None,
            Found::Unsure => {
                drop(st);
                self.ensure_checked().ok()?;
                let st = self.state.read().ok()?;
                st.find(kind, digest).map(|(_, e)| e)
            }
        }
    }

    /// Whether an object is found at a glance: in a checked index, or by a search in place of
    /// one not yet checked (what that says is checked when the object is read). `false` may
    /// also mean "not known yet": for planning a read only; a put deciding to skip an object
    /// asks [`PackSet::contains`].
    pub fn seen(&self, kind: ObjectKind, digest: &B3Digest) -> bool {
        self.ensure_loaded().is_ok()
            && self
                .state
                .read()
                .is_ok_and(|st| matches!(st.lookup(kind, digest), Found::At(..)))
    }

    /// Reads an object (for one stored alone, the first `prefix` bytes only, if given).
    /// `Ok(None)` if no known pack holds it, or its pack is gone (replaced by a gc: the caller
    /// rescans and looks again). Lookup and pack are taken under one lock, so a concurrent
    /// rescan cannot pair a location with another pack.
    pub fn read(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
        prefix: Option<usize>,
    ) -> Result<Option<Stored>> {
        self.ensure_loaded()?;
        let (file, path, id, e, unchecked) = {
            let mut st = self.read_state()?;
            let (p, entry) = match st.lookup(kind, digest) {
                Found::At(p, entry) => (p, entry),
                Found::Absent => return Ok(None),
                Found::Unsure => {
                    drop(st);
                    self.ensure_checked()?;
                    st = self.read_state()?;
                    match st.find(kind, digest) {
                        Some(found) => found,
                        None => return Ok(None),
                    }
                }
            };
            let unchecked = p.unchecked.is_some();
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
            (file, p.path.clone(), p.id.clone(), entry, unchecked)
        };
        if unchecked && e.member.is_some() && kind != ObjectKind::BlobIndex {
            // A grouped object's length comes from its entry, and a blob's stat takes it as
            // the blob's size: from an index not yet checked, the bytes must hash to the
            // digest first. If they do not, the index is checked whole (and set aside if
            // damaged) before looking again.
            let got = self.read_entry(&file, &path, &id, e, prefix)?;
            if let Some(Stored::Plain(b)) = &got {
                if B3Digest::of(b) == *digest {
                    return Ok(got);
                }
            }
            self.ensure_checked()?;
            return self.read(kind, digest, prefix);
        }
        self.read_entry(&file, &path, &id, e, prefix)
    }

    /// Reads the object at `e` of pack `id`, open as `file`.
    fn read_entry(
        &self,
        file: &std::fs::File,
        path: &Path,
        id: &str,
        mut e: IndexEntry,
        prefix: Option<usize>,
    ) -> Result<Option<Stored>> {
        if e.member.is_none() {
            if let Some(n) = prefix {
                e.len = e.len.min(n as u32);
            }
            return read_at(file, path, &e).map(|b| Some(Stored::Alone(b)));
        }
        // A cached group is used only while its pack file is unchanged since it was read
        // (size and modification time, one fstat), so a read reflects the store as it is
        // now: a pack written over behind a long-running daemon is seen at once.
        let stamp = stamp_of(file);
        if let Some(g) = self.cached_group(id, e.offset, stamp) {
            return member_in(&e, &g.1, id);
        }
        // One reader decompresses a cold group while others wanting it wait, then find it
        // cached (a file's readahead asks for a group's chunks at once); readers of other
        // groups go on, unless they hash to the same stripe.
        let stripe = &self.decoding[(e.offset as usize / 4096) % DECODING_STRIPES];
        let _one = stripe.lock();
        if let Some(g) = self.cached_group(id, e.offset, stamp) {
            return member_in(&e, &g.1, id);
        }
        tracing::trace!(pack = %id, offset = e.offset, "decompressing a group");
        let mut frame = self.frames.take();
        read_into(file, path, &e, &mut frame.buf)?;
        let buf = self
            .spare
            .lock()
            .ok()
            .and_then(|mut s| s.pop())
            .unwrap_or_default();
        let plain = crate::store::codec::decode_group_into(&frame.buf, buf);
        drop(frame);
        let plain = plain.map_err(|why| group_damaged(&e, id, &why))?;
        let got = member_in(&e, &plain, id);
        if let (Ok(mut g), Some(stamp)) = (self.groups.lock(), stamp) {
            let n = plain.len();
            let gone = g.put(
                id.to_string(),
                e.offset,
                std::sync::Arc::new((stamp, plain)),
                n,
            );
            drop(g);
            self.recycle(gone);
        }
        got
    }

    /// Keeps the buffers of `groups` nobody else holds for later decompressions.
    fn recycle(&self, groups: Vec<CachedGroup>) {
        let Ok(mut spare) = self.spare.lock() else {
            return;
        };
        for g in groups {
            if spare.len() >= SPARE_BUFFERS {
                break;
            }
            if let Ok((_, buf)) = std::sync::Arc::try_unwrap(g) {
                if buf.capacity() <= SPARE_KEPT {
                    spare.push(buf);
                }
            }
        }
    }

    /// A decompressed group, if cached from its pack as it is now.
    fn cached_group(&self, id: &str, offset: u64, stamp: Option<Stamp>) -> Option<CachedGroup> {
        let stamp = stamp?;
        let mut g = self.groups.lock().ok()?;
        g.get(id, offset).filter(|c| c.0 == stamp).cloned()
    }

    /// Rescans the directory if it changed since the last scan (or `force`). Returns whether
    /// anything changed.
    pub fn refresh(&self, force: bool) -> Result<bool> {
        let first = !self.loaded.load(std::sync::atomic::Ordering::Acquire);
        self.ensure_checked()?;
        if first && !force {
            return Ok(true);
        }
        self.scan(force, false)
    }

    /// Rescans the directory if it changed since the last scan (or `force`); new indexes are
    /// opened [`Unchecked`] if `in_place` (and there are not too many to hold open), else
    /// read whole.
    fn scan(&self, force: bool, in_place: bool) -> Result<bool> {
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
        // What is known now, and packs this process committed after the listing above (still
        // there, even if the listing missed them).
        let known: std::collections::HashSet<String> = {
            let st = self.read_state()?;
            for p in &st.packs {
                if !ids.contains(&p.id) && self.index_path(&p.id).exists() {
                    ids.push(p.id.clone());
                }
            }
            st.packs.iter().map(|p| p.id.clone()).collect()
        };
        ids.sort();
        // New indexes are read with no lock held: readers go on meanwhile.
        let mut bad = Vec::new();
        let new: Vec<&String> = ids
            .iter()
            .filter(|id| !known.contains(id.as_str()))
            .collect();
        let in_place = in_place && new.len() <= MAX_IN_PLACE;
        let loaded: Vec<(String, Vec<IndexEntry>, Option<Unchecked>)> = new
            .into_iter()
            .filter_map(|id| {
                if in_place {
                    let u = self.or_skip(id, self.open_unchecked(id), &mut bad)?;
                    Some((id.clone(), Vec::new(), Some(u)))
                } else {
                    Some((
                        id.clone(),
                        self.or_skip(id, self.entries_of(id), &mut bad)?,
                        None,
                    ))
                }
            })
            .collect();
        let listed: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut st = self.write_state()?;
        st.seen = Some((mtime, now));
        // Damaged indexes are judged afresh: one set aside (or repaired) is no longer listed.
        st.bad.retain(|(id, _)| listed.contains(id.as_str()));
        for b in bad {
            if !st.bad.iter().any(|(id, _)| *id == b.0) {
                st.bad.push(b);
            }
        }
        // A pack known before the listing and not in it went away (a gc rewrote it). One
        // this process committed (`add`) while the listing ran is in neither, and stays.
        let went = |p: &KnownPack| known.contains(&p.id) && !listed.contains(p.id.as_str());
        let gone = st.packs.iter().any(went);
        if gone {
            // Drop what went away, keep the rest as known.
            st.packs.retain(|p| !went(p));
            let open = st
                .packs
                .iter()
                .filter(|p| p.file.lock().is_ok_and(|f| f.is_some()))
                .count();
            self.open.store(open, std::sync::atomic::Ordering::Relaxed);
        }
        let mut changed = gone;
        for (id, entries, unchecked) in loaded {
            // Another thread may have added it meanwhile.
            if st.packs.iter().any(|p| p.id == id) {
                continue;
            }
            st.packs.push(self.known(&id, entries, unchecked));
            changed = true;
        }
        st.packs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(changed)
    }

    pub(super) fn known(
        &self,
        id: &str,
        entries: Vec<IndexEntry>,
        unchecked: Option<Unchecked>,
    ) -> KnownPack {
        KnownPack {
            id: id.to_string(),
            path: self.pack_path(id),
            entries: sorted(entries),
            unchecked,
            file: Default::default(),
        }
    }

    /// What reading pack `id`'s index gave; `None` if the pack went away meanwhile (a gc) or
    /// its index is unreadable (recorded in `bad`, for gc and verify to report).
    fn or_skip<T>(&self, id: &str, got: Result<T>, bad: &mut Vec<(String, String)>) -> Option<T> {
        match got {
            Ok(v) => Some(v),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(e) => {
                self.note_damage(id, &e, bad);
                None
            }
        }
    }

    /// A pack's index opened to be searched in place, its shape checked against its length.
    fn open_unchecked(&self, id: &str) -> Result<Unchecked> {
        use std::os::unix::fs::FileExt;
        let (idx_path, pack) = (self.index_path(id), self.pack_path(id));
        let io = |what: &str, p: &Path, e| StoreError::io(format!("{what} {}", p.display()), e);
        let idx = std::fs::File::open(&idx_path).map_err(|e| io("reading", &idx_path, e))?;
        let len = idx.metadata().map_err(|e| io("stat", &idx_path, e))?.len();
        let mut head = [0u8; INDEX_HEAD];
        let head = match idx.read_exact_at(&mut head, 0) {
            Ok(()) => &head[..],
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => &[][..],
            Err(e) => return Err(io("reading", &idx_path, e)),
        };
        let shape = IndexShape::of(id, head)?;
        let count = shape.count(id, len)?;
        let pack_len = std::fs::metadata(&pack)
            .map_err(|e| io("stat", &pack, e))?
            .len();
        Ok(Unchecked {
            idx: std::sync::Arc::new(idx),
            shape,
            count,
            pack_len,
        })
    }

    /// Records a damaged index in `bad` (for gc and verify to report), and in the log once
    /// per pack per process: every rescan meets it again.
    fn note_damage(&self, id: &str, e: &StoreError, bad: &mut Vec<(String, String)>) {
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
        let _ = self.ensure_checked();
        self.state.read().map(|s| s.bad.clone()).unwrap_or_default()
    }

    /// The plain bytes of every compression group's members together, by pack and frame
    /// offset (for each grouped object's share of its frame, [`IndexEntry::stored_share`]).
    pub fn group_plain_sizes(&self) -> std::collections::HashMap<(String, u64), u64> {
        let _ = self.ensure_checked();
        let Ok(st) = self.state.read() else {
            return Default::default();
        };
        let mut out = std::collections::HashMap::new();
        for p in &st.packs {
            for (offset, plain) in group_plain_sizes(&p.entries) {
                out.insert((p.id.clone(), offset), plain);
            }
        }
        out
    }

    /// Every object of one kind in the known packs, with its pack's id.
    pub fn objects(&self, kind: ObjectKind) -> Vec<(IndexEntry, String)> {
        let _ = self.ensure_checked();
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
    /// How many packs are still searched in place (their index not yet read whole).
    #[cfg(test)]
    pub(super) fn in_place(&self) -> usize {
        self.read_state()
            .map(|st| st.packs.iter().filter(|p| p.unchecked.is_some()).count())
            .unwrap_or(0)
    }

    /// Makes a pack this process just committed known without rescanning the directory.
    pub fn add(&self, id: &str, entries: &[IndexEntry]) -> Result<()> {
        let mut st = self.write_state()?;
        if !st.packs.iter().any(|p| p.id == id) {
            let known = self.known(id, entries.to_vec(), None);
            st.packs.push(known);
            st.packs.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Ok(())
    }
}
