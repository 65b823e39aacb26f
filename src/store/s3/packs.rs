//! Packs in the bucket: puts gathered into packs (the pack uploaded first, its index after it
//! as the commit point), the merged index of the bucket's packs, and chunk batches read with
//! few ranged GETs.
//!
//! Nothing is HEADed before a put: an object counts as stored when a pack index this process
//! has read lists it (the bucket's indexes are listed once, and again at most every
//! [`PACK_RESCAN`] on a miss). An object stored only loose (a store from before packs) is
//! written again, into a pack; `gc` moves the rest (see `maintenance`).

#[allow(unused_imports)]
use super::*;

use std::collections::{HashMap, VecDeque};

use futures::FutureExt;

/// Bytes of objects gathered before a pack is uploaded. Large enough that an import costs one
/// PUT per 32 MiB stored; small enough to hold in memory (the pack being filled, plus one per
/// upload in flight) and to upload in one PUT (S3 takes 5 GiB in one).
pub(super) const PACK_TARGET: usize = 32 << 20;

/// Packs are read in aligned extents of this many bytes, kept in memory (see [`Extents`]):
/// an import writes a tree's objects in walk order, so the neighbours of an object are what a
/// walk, a `tar` or a build reads next. One GET per 2 MiB keeps a cold read of a tree near
/// one request per MiB stored; at 20 ms a round trip and ≈ 100 MB/s per connection, 2 MiB
/// costs about as long to transfer as the round trip itself, so a lone small read pays at
/// most twice its latency for its neighbours.
pub(super) const EXTENT: u64 = 2 << 20;

/// Bytes of pack extents kept in memory.
pub(super) const EXTENT_CACHE: usize = 64 << 20;

/// Extents fetched after the one a read needs (4 MiB): the next stretch of a walk or a file.
pub(super) const EXTENT_READAHEAD: u64 = 2;

/// Most extents one GET asks for (16 MiB): a batch's consecutive extents go in one request.
pub(super) const MAX_RUN: u64 = 8;

/// GETs of one batch in flight at once.
pub(super) const BATCH_GETS: usize = 8;

/// An exact batch (see `BlobService::read_chunks_exact`): two wanted objects of one pack at
/// most this far apart are read by one GET, gap included (a GET costs a round trip; 256 KiB is
/// a few milliseconds of transfer)...
const EXACT_GAP: u64 = 256 << 10;
/// ...of at most this many bytes.
const EXACT_RUN: u64 = 16 << 20;

/// Objects put but not yet in a committed pack: the pack being filled, then those sealed and
/// waiting for (or in) their upload. Reads look here first.
#[derive(Default)]
pub(super) struct Staged {
    objects: HashMap<(Kind, B3Digest), Bytes>,
    filling: Vec<(Kind, B3Digest)>,
    filling_bytes: usize,
    sealed: VecDeque<Vec<(Kind, B3Digest)>>,
    /// Chunks staged uncompressed, to be compressed with their neighbours in a compression
    /// group when their pack is built (the rest of `objects` are stored bytes).
    plain_chunks: HashSet<B3Digest>,
    /// Objects a put found already packed: written to a keep marker before the next root
    /// (gc rescues them from a pack it means to delete).
    pub(super) reused: HashSet<(Kind, B3Digest)>,
    /// Packs this process uploaded.
    own: HashSet<String>,
}

impl Staged {
    fn seal(&mut self) {
        if !self.filling.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.filling));
            self.filling_bytes = 0;
        }
    }
}

/// A grouped object as if stored alone: a chunk as a zstd frame, metadata as itself.
fn as_stored(kind: Kind, s: Stored) -> Bytes {
    Bytes::from(match s {
        Stored::Plain(p) if kind == Kind::Chunk => plain_as_frame(&p),
        s => s.into_protobuf(),
    })
}

/// Decompressed compression groups by (pack id, frame offset): a pack's bytes never change
/// under its id, so a cached group stays good.
#[derive(Default)]
pub(super) struct Groups {
    lru: Mutex<pack::GroupCache<Arc<Vec<u8>>>>,
}

/// A pack gc means to delete, and loose keys it has copied into packs: deleted by the first
/// gc that runs a grace period later, once what concurrent imports reused is rescued.
#[derive(Debug, Clone, Default)]
pub(super) struct Doomed {
    pub packs: Vec<String>,
    pub loose: Vec<String>,
}

impl Doomed {
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::from("granary doomed 1\n");
        for p in &self.packs {
            s.push_str(&format!("pack {p}\n"));
        }
        for k in &self.loose {
            s.push_str(&format!("loose {k}\n"));
        }
        s.into_bytes()
    }

    pub fn decode(name: &str, raw: &[u8]) -> Result<Self> {
        let bad = |reason: &str| StoreError::Corrupt {
            what: "gc record",
            digest: name.to_string(),
            reason: reason.to_string(),
        };
        let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text.lines();
        if lines.next() != Some("granary doomed 1") {
            return Err(bad("not a granary gc record"));
        }
        let mut d = Doomed::default();
        for l in lines {
            match l.split_once(' ') {
                Some(("pack", id)) if pack::is_id(id) => d.packs.push(id.to_string()),
                Some(("loose", key)) if !key.is_empty() => d.loose.push(key.to_string()),
                _ => return Err(bad(&format!("bad line {l:?}"))),
            }
        }
        Ok(d)
    }
}

/// Encodes a keep marker: kind byte and digest per object.
pub(super) fn encode_keep(objects: &HashSet<(Kind, B3Digest)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + objects.len() * 33);
    out.extend_from_slice(b"GRNKEEP1");
    for (k, d) in objects {
        out.push(*k as u8);
        out.extend_from_slice(d.as_bytes());
    }
    out
}

pub(super) fn decode_keep(name: &str, raw: &[u8]) -> Result<Vec<(Kind, B3Digest)>> {
    let bad = |reason: &str| StoreError::Corrupt {
        what: "keep marker",
        digest: name.to_string(),
        reason: reason.to_string(),
    };
    let body = raw
        .strip_prefix(b"GRNKEEP1".as_slice())
        .ok_or_else(|| bad("not a granary keep marker"))?;
    if body.len() % 33 != 0 {
        return Err(bad("truncated"));
    }
    body.chunks_exact(33)
        .map(|r| {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| *k as u8 == r[0])
                .ok_or_else(|| bad("unknown kind"))?;
            let d = B3Digest::try_from(&r[1..]).map_err(|_| bad("bad digest"))?;
            Ok((kind, d))
        })
        .collect()
}

/// Pack extents held in memory, and those being fetched (one fetch each, however many
/// readers want it).
pub(super) struct Extents {
    lru: lru::LruCache<(String, u64), Bytes>,
    bytes: usize,
    inflight: HashMap<(String, u64), ExtentFetch>,
}

type ExtentFetch = futures::future::Shared<
    futures::future::BoxFuture<'static, std::result::Result<Option<Bytes>, String>>,
>;

impl Default for Extents {
    fn default() -> Self {
        Self {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            inflight: HashMap::new(),
        }
    }
}

impl Extents {
    fn keep(&mut self, key: (String, u64), b: Bytes) {
        self.bytes += b.len();
        if let Some(old) = self.lru.put(key, b) {
            self.bytes -= old.len();
        }
        while self.bytes > EXTENT_CACHE {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }
}

/// The extents (by index) that hold bytes `offset..offset + len` of a pack.
fn extents_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    let last = (offset + len.max(1) - 1) / EXTENT;
    offset / EXTENT..=last
}

impl S3Store {
    pub(super) fn lock_staged(&self) -> Result<std::sync::MutexGuard<'_, Staged>> {
        self.staged
            .lock()
            .map_err(|_| StoreError::Backend("s3 staging lock poisoned".into()))
    }

    pub(super) fn pack_key(&self, id: &str, ext: &str) -> Key {
        self.key(&format!("{}/{id}.{ext}", pack::PACK_DIR))
    }

    /// An object put by this process and not yet uploaded, as stored bytes.
    pub(super) fn staged_object(&self, kind: Kind, digest: &B3Digest) -> Option<Bytes> {
        let st = self.lock_staged().ok()?;
        let b = st.objects.get(&(kind, *digest))?;
        if kind == Kind::Chunk && st.plain_chunks.contains(digest) {
            return Some(Bytes::from(plain_as_frame(b)));
        }
        Some(b.clone())
    }

    /// Whether this store compresses an object of `len` plain bytes in a group.
    pub(super) fn grouped(&self, len: usize) -> bool {
        self.config.packs && pack::grouped(self.config.group_bytes, len)
    }

    /// Lists the packs if this process never has.
    pub(super) async fn ensure_scanned(&self) -> Result<()> {
        let mut st = self.packs.lock().await;
        if st.scanned.is_none() {
            self.scan_packs(&mut st).await?;
        }
        Ok(())
    }

    /// Stores an object unless a pack already holds it (a pack a gc means to delete does not
    /// count): gathered into the pack being filled, uploaded when that is full.
    pub(super) async fn put_object(
        &self,
        kind: Kind,
        digest: &B3Digest,
        data: Bytes,
    ) -> Result<()> {
        self.stage(kind, digest, data, false).await
    }

    /// [`Self::put_object`] of a chunk's plain bytes, for a compression group (see
    /// [`Self::grouped`]).
    pub(super) async fn put_plain_chunk(&self, digest: &B3Digest, plain: Bytes) -> Result<()> {
        self.stage(Kind::Chunk, digest, plain, true).await
    }

    async fn stage(&self, kind: Kind, digest: &B3Digest, data: Bytes, plain: bool) -> Result<()> {
        if !self.config.packs {
            return self.put_loose(kind, digest, data).await;
        }
        self.ensure_scanned().await?;
        let packed = {
            let st = self.packs.lock().await;
            st.map
                .get(&(kind, *digest))
                .filter(|(id, _)| !st.doomed.contains(id))
                .map(|(id, _)| id.clone())
        };
        let full = {
            let mut st = self.lock_staged()?;
            if let Some(id) = packed {
                // A pack this process wrote is younger than any gc's cutoff: no marker needed.
                if !st.own.contains(&id) {
                    st.reused.insert((kind, *digest));
                }
                return Ok(());
            }
            if st.objects.contains_key(&(kind, *digest)) {
                return Ok(());
            }
            st.filling_bytes += data.len();
            st.objects.insert((kind, *digest), data);
            if plain {
                st.plain_chunks.insert(*digest);
            }
            st.filling.push((kind, *digest));
            if st.filling_bytes >= PACK_TARGET {
                st.seal();
                true
            } else {
                false
            }
        };
        if full {
            self.upload_sealed().await?;
        }
        Ok(())
    }

    /// A store from before packs (format 1, until a gc converts it) keeps one key per object,
    /// so that granaries of that time still see what is written: one HEAD and, if absent, one
    /// PUT.
    async fn put_loose(&self, kind: Kind, digest: &B3Digest, data: Bytes) -> Result<()> {
        let key = self.object_key(kind, digest);
        if self.head(&key).await?.is_none() {
            PUT_BYTES.fetch_add(data.len() as u64, Ordering::Relaxed);
            if let Err(e) = self.put_raw(&key, data, PutMode::Overwrite).await? {
                return Err(self.fail(&format!("PUT {key}"), &e));
            }
        }
        Ok(())
    }

    /// Stores an object even if a pack holds it (gc's copies out of packs it will delete). A
    /// small chunk of a store with compression groups goes into one, however it was stored.
    pub(super) async fn put_copy(&self, kind: Kind, digest: &B3Digest, raw: Bytes) -> Result<()> {
        let mut data = raw;
        let mut plain = false;
        if kind == Kind::Chunk && self.config.group_bytes > 0 {
            let d = *digest;
            let chunk =
                tokio::task::spawn_blocking(move || decode_chunk(&d, &data).map(|c| (c, data)))
                    .await
                    .map_err(|e| StoreError::Backend(format!("decode task failed: {e}")))??;
            (plain, data) = if self.grouped(chunk.0.len()) {
                (true, chunk.0)
            } else {
                (false, chunk.1)
            };
        }
        let full = {
            let mut st = self.lock_staged()?;
            if st.objects.contains_key(&(kind, *digest)) {
                return Ok(());
            }
            st.filling_bytes += data.len();
            st.objects.insert((kind, *digest), data);
            if plain {
                st.plain_chunks.insert(*digest);
            }
            st.filling.push((kind, *digest));
            st.filling_bytes >= PACK_TARGET
        };
        if full {
            self.lock_staged()?.seal();
            self.upload_sealed().await?;
        }
        Ok(())
    }

    /// Uploads every sealed pack, oldest first. Holding the upload lock while doing so means
    /// that when this returns, every pack sealed before the call is committed (or this call
    /// failed and the pack waits for the next flush).
    async fn upload_sealed(&self) -> Result<()> {
        let _one_at_a_time = self.upload.lock().await;
        loop {
            let (keys, objects) = {
                let mut st = self.lock_staged()?;
                let Some(keys) = st.sealed.pop_front() else {
                    return Ok(());
                };
                let objects: Vec<_> = keys
                    .iter()
                    .filter_map(|k| {
                        let plain = k.0 == Kind::Chunk && st.plain_chunks.contains(&k.1);
                        st.objects.get(k).map(|b| (*k, b.clone(), plain))
                    })
                    .collect();
                (keys, objects)
            };
            // Compressing the groups takes a while: off the runtime's threads.
            let (group_bytes, level) = (self.config.group_bytes, self.config.zstd_level);
            let built = tokio::task::spawn_blocking(move || {
                let mut w = pack::PackWriter::in_memory().with_groups(group_bytes, level);
                for ((kind, digest), b, plain) in objects {
                    // Directories and blob indexes are stored as they are: small ones group.
                    if plain || (kind != Kind::Chunk && pack::grouped(group_bytes, b.len())) {
                        w.add_grouped(kind, digest, &b)?;
                    } else {
                        w.append(kind, digest, &b)?;
                    }
                }
                w.finish()
            })
            .await
            .map_err(|e| StoreError::Backend(format!("pack building task failed: {e}")));
            let (body, entries) = match built.and_then(|r| r) {
                Ok(b) => b,
                Err(e) => {
                    self.lock_staged()?.sealed.push_front(keys);
                    return Err(e);
                }
            };
            let id = pack::new_id();
            let size = body.len() as u64;
            if let Err(e) = self.upload_pack(&id, body, &entries).await {
                self.lock_staged()?.sealed.push_front(keys);
                return Err(e);
            }
            {
                let mut packs = self.packs.lock().await;
                for e in &entries {
                    packs.map.insert((e.kind, e.digest), (id.clone(), *e));
                }
                packs.packs.insert(id.clone(), SystemTime::now());
            }
            if let Ok(mut sizes) = self.pack_sizes.lock() {
                sizes.insert(id.clone(), size);
            }
            let mut st = self.lock_staged()?;
            for k in &keys {
                st.objects.remove(k);
                if k.0 == Kind::Chunk {
                    st.plain_chunks.remove(&k.1);
                }
            }
            st.own.insert(id);
        }
    }

    /// PUTs a pack, then its index (the commit point: a pack without one is never read).
    async fn upload_pack(&self, id: &str, body: Vec<u8>, entries: &[IndexEntry]) -> Result<()> {
        let key = self.pack_key(id, "pack");
        PUT_BYTES.fetch_add(body.len() as u64, Ordering::Relaxed);
        if let Err(e) = self
            .put_raw(&key, Bytes::from(body), PutMode::Overwrite)
            .await?
        {
            return Err(self.fail(&format!("PUT {key}"), &e));
        }
        let idx = pack::encode_index(entries);
        let key = self.pack_key(id, "idx");
        PUT_BYTES.fetch_add(idx.len() as u64, Ordering::Relaxed);
        if let Err(e) = self
            .put_raw(&key, Bytes::from(idx), PutMode::Overwrite)
            .await?
        {
            return Err(self.fail(&format!("PUT {key}"), &e));
        }
        Ok(())
    }

    /// Commits everything put so far: the pack being filled and any waiting, then a keep
    /// marker naming the objects reused from packs already there.
    pub(super) async fn flush_staged(&self) -> Result<()> {
        self.lock_staged()?.seal();
        self.upload_sealed().await?;
        let reused = std::mem::take(&mut self.lock_staged()?.reused);
        if reused.is_empty() {
            return Ok(());
        }
        let key = self.key(&format!("{}/{}", KEEP_DIR, pack::new_id()));
        let body = encode_keep(&reused);
        PUT_BYTES.fetch_add(body.len() as u64, Ordering::Relaxed);
        match self
            .put_raw(&key, Bytes::from(body), PutMode::Overwrite)
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.lock_staged()?.reused.extend(reused);
                Err(self.fail(&format!("PUT {key}"), &e))
            }
        }
    }

    /// One extent of a pack: from memory, from a fetch already under way, or fetched now
    /// (with the [`EXTENT_READAHEAD`] extents after it, in the same GET). `None` if the pack
    /// is gone (a gc replaced it). Every look also starts fetching the extents after it that
    /// are not on their way: packs hold trees in walk order.
    async fn extent(&self, id: &str, index: u64) -> Result<Option<Bytes>> {
        let key = (id.to_string(), index);
        let hit = {
            let mut ex = self.lock_extents()?;
            ex.lru.get(&key).cloned()
        };
        // The extent itself in a GET of its own (a lone read waits for 2 MiB, not 6), then
        // the read-ahead.
        self.start_runs(id, index..=index)?;
        self.start_runs(id, index + 1..=index + EXTENT_READAHEAD)?;
        if let Some(b) = hit {
            return Ok(Some(b));
        }
        let fetch = self.lock_extents()?.inflight.get(&key).cloned();
        match fetch {
            Some(f) => f.await.map_err(StoreError::Backend),
            // Fetched and evicted again in between: fetch it alone.
            None => {
                self.start_runs(id, index..=index)?;
                let f = self.lock_extents()?.inflight.get(&key).cloned();
                match f {
                    Some(f) => f.await.map_err(StoreError::Backend),
                    None => Ok(self.lock_extents()?.lru.get(&key).cloned()),
                }
            }
        }
    }

    fn lock_extents(&self) -> Result<std::sync::MutexGuard<'_, Extents>> {
        self.extents
            .lock()
            .map_err(|_| StoreError::Backend("extent cache lock poisoned".into()))
    }

    /// Starts fetching the extents of `wanted` that are neither in memory nor on their way:
    /// each run of consecutive ones (up to [`MAX_RUN`]) with one GET, in the background.
    /// Each extent is in flight until its run lands.
    fn start_runs(&self, id: &str, wanted: std::ops::RangeInclusive<u64>) -> Result<()> {
        let size = self.pack_size(id);
        let last_extent = if size == u64::MAX {
            u64::MAX
        } else {
            size.saturating_sub(1) / EXTENT
        };
        let mut ex = self.lock_extents()?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in wanted {
            if i > last_extent {
                break;
            }
            let key = (id.to_string(), i);
            if ex.lru.contains(&key) || ex.inflight.contains_key(&key) {
                continue;
            }
            match runs.last_mut() {
                Some((first, last)) if *last + 1 == i && i - *first < MAX_RUN => *last = i,
                _ => runs.push((i, i)),
            }
        }
        for (first, last) in runs {
            let (this, pid) = (self.clone(), id.to_string());
            let run = async move {
                let start = first * EXTENT;
                let end = ((last + 1) * EXTENT).min(size);
                let range = GetRange::Bounded(start..end.max(start + 1));
                let got = this
                    .get_raw(&this.pack_key(&pid, "pack"), Some(range))
                    .await;
                let got = got.map_err(|e| e.to_string());
                let mut parts = Vec::new();
                if let Ok(Some(body)) = &got {
                    let mut at = 0usize;
                    while at < body.len() {
                        let n = (EXTENT as usize).min(body.len() - at);
                        parts.push(body.slice(at..at + n));
                        at += n;
                    }
                }
                if let Ok(mut ex) = this.extents.lock() {
                    for i in first..=last {
                        ex.inflight.remove(&(pid.clone(), i));
                    }
                    for (j, b) in parts.iter().enumerate() {
                        ex.keep((pid.clone(), first + j as u64), b.clone());
                    }
                }
                got.map(|g| g.map(|_| parts))
            }
            .boxed()
            .shared();
            for i in first..=last {
                let j = (i - first) as usize;
                let one = run
                    .clone()
                    .map(move |r| r.map(|parts| parts.and_then(|p| p.get(j).cloned())))
                    .boxed()
                    .shared();
                ex.inflight.insert((id.to_string(), i), one);
            }
            // Runs in the background, so read-ahead lands whether or not anyone waits.
            tokio::spawn(run.map(drop));
        }
        Ok(())
    }

    /// A pack's length as last listed (`u64::MAX` if unknown: the GET then ends at the end).
    fn pack_size(&self, id: &str) -> u64 {
        self.pack_sizes
            .lock()
            .ok()
            .and_then(|s| s.get(id).copied())
            .unwrap_or(u64::MAX)
    }

    /// An object's bytes at a known place in a pack, through the extents; `None` if the pack
    /// is gone or shorter than its index says.
    pub(super) async fn read_at(
        &self,
        id: &str,
        e: &IndexEntry,
        prefix: Option<u64>,
    ) -> Result<Option<Bytes>> {
        if let Some(m) = e.member {
            // A compression group: its frame decompressed (once, then cached), and the object
            // handed on as if stored alone.
            let Some(plain) = self.group(id, e).await? else {
                return Ok(None);
            };
            return pack::slice_member(e, m, &plain, id).map(|s| Some(as_stored(e.kind, s)));
        }
        let len = prefix.map_or(e.len as u64, |n| n.min(e.len as u64));
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let mut parts = Vec::new();
        for i in extents_of(e.offset, len) {
            match self.extent(id, i).await? {
                Some(b) => parts.push((i, b)),
                None => return Ok(None),
            }
        }
        let (end, mut out) = (e.offset + len, Vec::new());
        for (i, b) in &parts {
            let base = i * EXTENT;
            let from = e.offset.max(base) - base;
            let to = (end.min(base + b.len() as u64)).saturating_sub(base);
            if from >= to {
                return Ok(None);
            }
            if parts.len() == 1 {
                return Ok(
                    Some(b.slice(from as usize..to as usize)).filter(|b| b.len() as u64 == len)
                );
            }
            out.extend_from_slice(&b[from as usize..to as usize]);
        }
        Ok(Some(Bytes::from(out)).filter(|b| b.len() as u64 == len))
    }

    /// The plain bytes of the compression group `e` is in, decompressed once and cached (a
    /// batch asks for a group's members at once); `None` if its pack is gone.
    async fn group(&self, id: &str, e: &IndexEntry) -> Result<Option<Arc<Vec<u8>>>> {
        self.group_of(id, e, None).await
    }

    /// [`Self::group`], with the group's frame if the caller has it already.
    async fn group_of(
        &self,
        id: &str,
        e: &IndexEntry,
        frame: Option<Bytes>,
    ) -> Result<Option<Arc<Vec<u8>>>> {
        let cached = self
            .groups
            .lru
            .lock()
            .ok()
            .and_then(|mut g| g.get(id, e.offset).cloned());
        if let Some(g) = cached {
            return Ok(Some(g));
        }
        // No lock is held across the awaits below: a reader's future may sit unpolled (a
        // stream its consumer reads later) while another waits for the same group, and a
        // lock held there would deadlock them. Two readers of one cold group may both decode
        // it; the extents under it are fetched once.
        let frame = match frame {
            Some(f) => f,
            None => {
                let mut whole = *e;
                whole.member = None;
                let Some(frame) = Box::pin(self.read_at(id, &whole, None)).await? else {
                    return Ok(None);
                };
                frame
            }
        };
        let (e, pack) = (*e, id.to_string());
        let plain = tokio::task::spawn_blocking(move || {
            tracing::trace!(%pack, offset = e.offset, "decompressing a group");
            decode_group(&frame).map_err(|why| pack::group_damaged(&e, &pack, &why))
        })
        .await
        .map_err(|err| StoreError::Backend(format!("decompression task failed: {err}")))??;
        let plain = Arc::new(plain);
        if let Ok(mut g) = self.groups.lru.lock() {
            g.put(id.to_string(), e.offset, plain.clone(), plain.len());
        }
        Ok(Some(plain))
    }

    /// Where a batch's objects are: staged ones handed over at once, then (digest, pack,
    /// index entry) for the packed ones and the digests of the rest. `None` (every object
    /// answered with the error) if the bucket's packs cannot be listed.
    async fn locate(
        &self,
        kind: Kind,
        digests: Vec<B3Digest>,
        deliver: &Deliver,
    ) -> Option<(Vec<(B3Digest, String, IndexEntry)>, Vec<B3Digest>)> {
        if let Err(e) = self.ensure_scanned().await {
            for d in digests {
                deliver(d, Err(e.duplicate()));
            }
            return None;
        }
        let mut located = Vec::new();
        let mut single = Vec::new();
        let packs = self.packs.lock().await;
        for d in digests {
            if let Some(b) = self.staged_object(kind, &d) {
                deliver(d, Ok(Some(b)));
                continue;
            }
            match packs.map.get(&(kind, d)) {
                Some((id, e)) => located.push((d, id.clone(), *e)),
                None => single.push(d),
            }
        }
        Some((located, single))
    }

    /// Jobs reading each of `digests` alone (objects in no known pack).
    fn singles<'a>(
        &'a self,
        kind: Kind,
        digests: Vec<B3Digest>,
        deliver: &Deliver,
    ) -> Vec<futures::future::BoxFuture<'a, ()>> {
        digests
            .into_iter()
            .map(|d| {
                let deliver = deliver.clone();
                Box::pin(async move { deliver(d, self.get_object(kind, &d, None).await) })
                    as futures::future::BoxFuture<'a, ()>
            })
            .collect()
    }

    /// Reads a batch of objects of one kind, handing each one's stored bytes to `deliver`
    /// exactly once. Packed objects are read through the extents, the extents the batch needs
    /// fetched [`BATCH_GETS`] at a time, each object handed over (on a blocking thread, so it
    /// may decode there) once its extents are in; objects not in a known pack are read one by
    /// one.
    pub(super) async fn read_many(&self, kind: Kind, digests: Vec<B3Digest>, deliver: Deliver) {
        let Some((located, single)) = self.locate(kind, digests, &deliver).await else {
            return;
        };
        // Every extent the batch needs, fetched first (in pack order), so objects are then
        // cut from memory.
        let mut needed: Vec<(String, u64)> = located
            .iter()
            .flat_map(|(_, id, e)| extents_of(e.offset, e.len as u64).map(move |i| (id.clone(), i)))
            .collect();
        needed.sort();
        needed.dedup();
        // Consecutive extents of a pack go out as one GET each run.
        let mut i = 0;
        while i < needed.len() {
            let mut j = i;
            while j + 1 < needed.len()
                && needed[j + 1].0 == needed[i].0
                && needed[j + 1].1 == needed[j].1 + 1
            {
                j += 1;
            }
            if let Err(e) = self.start_runs(&needed[i].0, needed[i].1..=needed[j].1) {
                tracing::warn!("{e}");
            }
            i = j + 1;
        }
        futures::stream::iter(needed)
            .map(|(id, i)| async move { self.extent(&id, i).await.map(drop) })
            .buffer_unordered(BATCH_GETS)
            .for_each(|_| async {})
            .await;
        // Boxed futures, so the batch's borrow of `self` has one lifetime the trait's future
        // can name.
        type Job<'a> = futures::future::BoxFuture<'a, ()>;
        let mut jobs: Vec<Job<'_>> = Vec::new();
        for (d, id, e) in located {
            let deliver = deliver.clone();
            jobs.push(Box::pin(async move {
                let got = match self.read_at(&id, &e, None).await {
                    // Its pack has gone: the single way looks for it again.
                    Ok(None) => self.get_object(kind, &d, None).await,
                    other => other,
                };
                let handed = tokio::task::spawn_blocking(move || deliver(d, got)).await;
                if let Err(e) = handed {
                    tracing::warn!("handing over {} {d}: {e}", kind.what());
                }
            }));
        }
        jobs.extend(self.singles(kind, single, &deliver));
        futures::stream::iter(jobs)
            .buffer_unordered(BATCH_GETS)
            .for_each(|()| async {})
            .await;
    }

    /// Reads a batch of objects of one kind by exact byte ranges of their packs (neighbours
    /// joined across gaps up to [`EXACT_GAP`]), bypassing the extents and their read-ahead:
    /// for a batch that is all the caller wants. Objects not in a known pack, or whose pack
    /// has gone, are read one by one.
    pub(super) async fn read_many_exact(
        &self,
        kind: Kind,
        digests: Vec<B3Digest>,
        deliver: Deliver,
    ) {
        let Some((mut located, single)) = self.locate(kind, digests, &deliver).await else {
            return;
        };
        located.sort_by(|a, b| (&a.1, a.2.offset).cmp(&(&b.1, b.2.offset)));
        /// One GET: a pack, a byte range of it, the objects inside.
        type Run = (String, u64, u64, Vec<(B3Digest, IndexEntry)>);
        let mut runs: Vec<Run> = Vec::new();
        for (d, id, e) in located {
            let (start, end) = (e.offset, e.offset + e.len as u64);
            match runs.last_mut() {
                Some(r) if r.0 == id && start <= r.2 + EXACT_GAP && end - r.1 <= EXACT_RUN => {
                    r.2 = r.2.max(end);
                    r.3.push((d, e));
                }
                _ => runs.push((id, start, end, vec![(d, e)])),
            }
        }
        type Job<'a> = futures::future::BoxFuture<'a, ()>;
        let mut jobs: Vec<Job<'_>> = Vec::new();
        for (id, start, end, objects) in runs {
            let deliver = deliver.clone();
            jobs.push(Box::pin(async move {
                let range = GetRange::Bounded(start..end.max(start + 1));
                let body = match self.get_raw(&self.pack_key(&id, "pack"), Some(range)).await {
                    Ok(b) => b,
                    Err(e) => {
                        for (d, _) in objects {
                            deliver(d, Err(e.duplicate()));
                        }
                        return;
                    }
                };
                let mut cut = Vec::with_capacity(objects.len());
                let mut gone = Vec::new();
                for (d, e) in objects {
                    let from = (e.offset - start) as usize;
                    let to = from + e.len as usize;
                    let raw = match &body {
                        Some(b) if to <= b.len() => b.slice(from..to),
                        // The pack has gone or is shorter than its index says.
                        _ => {
                            gone.push(d);
                            continue;
                        }
                    };
                    let Some(m) = e.member else {
                        cut.push((d, Ok(Some(raw))));
                        continue;
                    };
                    // A grouped object: its group's frame is what was read.
                    let got = match self.group_of(&id, &e, Some(raw)).await {
                        Ok(Some(plain)) => {
                            pack::slice_member(&e, m, &plain, &id).map(|s| Some(as_stored(kind, s)))
                        }
                        Ok(None) => Ok(None),
                        Err(err) => Err(err),
                    };
                    cut.push((d, got));
                }
                let handed = tokio::task::spawn_blocking({
                    let deliver = deliver.clone();
                    move || {
                        for (d, got) in cut {
                            deliver(d, got);
                        }
                    }
                })
                .await;
                if let Err(e) = handed {
                    tracing::warn!("handing over a batch of {}: {e}", kind.what());
                }
                for d in gone {
                    deliver(d, self.get_object(kind, &d, None).await);
                }
            }));
        }
        jobs.extend(self.singles(kind, single, &deliver));
        futures::stream::iter(jobs)
            .buffer_unordered(BATCH_GETS)
            .for_each(|()| async {})
            .await;
    }

    /// Chunks through [`Self::read_many_exact`], decoded (and verified) where handed over.
    pub(super) async fn read_chunks_exact(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        let digests = chunks.iter().map(|c| c.digest).collect();
        let deliver: Deliver = Arc::new(move |d, r: Result<Option<Bytes>>| {
            sink(
                d,
                r.and_then(|raw| raw.map(|raw| decode_chunk(&d, &raw)).transpose()),
            )
        });
        self.read_many_exact(Kind::Chunk, digests, deliver).await
    }

    /// Chunks through [`Self::read_many`], each decoded (and verified) where it is handed
    /// over; those `stat` just fetched come from the stash.
    pub(super) async fn read_chunks_coalesced(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        let mut rest = Vec::with_capacity(chunks.len());
        for c in chunks {
            match self.stash.lock().ok().and_then(|mut st| st.pop(&c.digest)) {
                Some(b) => sink(c.digest, Ok(Some(b))),
                None => rest.push(c.digest),
            }
        }
        let deliver: Deliver = Arc::new(move |d, r: Result<Option<Bytes>>| {
            sink(
                d,
                r.and_then(|raw| raw.map(|raw| decode_chunk(&d, &raw)).transpose()),
            )
        });
        self.read_many(Kind::Chunk, rest, deliver).await
    }

    /// Directories through [`Self::read_many`], in the order asked, each checked against its
    /// digest and decoded.
    pub(super) async fn get_dirs(&self, digests: Vec<B3Digest>) -> Vec<Result<Option<Directory>>> {
        let got: Arc<Mutex<HashMap<B3Digest, Result<Option<Bytes>>>>> = Arc::default();
        let deliver: Deliver = {
            let got = got.clone();
            Arc::new(move |d, r| {
                if let Ok(mut g) = got.lock() {
                    g.insert(d, r);
                }
            })
        };
        self.read_many(Kind::Directory, digests.clone(), deliver)
            .await;
        let mut got = match got.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => HashMap::new(),
        };
        digests
            .iter()
            .map(|d| {
                let raw = got.remove(d).unwrap_or_else(|| {
                    Err(StoreError::Backend(format!("directory {d}: no answer")))
                })?;
                let Some(raw) = raw else { return Ok(None) };
                crate::store::codec::check_digest(Kind::Directory, d, &raw)?;
                Directory::decode_valid(&raw)
                    .map(Some)
                    .map_err(|e| StoreError::corrupt("directory", d, e.to_string()))
            })
            .collect()
    }
}

/// Receives each object of a [`S3Store::read_many`] batch: its stored bytes, absent, or why
/// not.
pub(super) type Deliver = Arc<dyn Fn(B3Digest, Result<Option<Bytes>>) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_cover_exactly_the_bytes_asked_for() {
        assert_eq!(extents_of(0, 10), 0..=0);
        assert_eq!(extents_of(EXTENT - 1, 1), 0..=0);
        assert_eq!(extents_of(EXTENT - 1, 2), 0..=1);
        assert_eq!(extents_of(EXTENT, 0), 1..=1);
        assert_eq!(extents_of(3 * EXTENT + 5, 2 * EXTENT), 3..=5);
    }

    #[test]
    fn the_extent_cache_keeps_its_bound() {
        let mut ex = Extents::default();
        for i in 0..(EXTENT_CACHE as u64 / EXTENT + 5) {
            ex.keep(("p".into(), i), Bytes::from(vec![0u8; EXTENT as usize]));
        }
        assert!(ex.bytes <= EXTENT_CACHE);
        assert!(
            ex.lru.get(&("p".to_string(), 0)).is_none(),
            "oldest evicted"
        );
    }

    #[test]
    fn gc_records_and_keep_markers_round_trip_and_refuse_garbage() {
        let d = Doomed {
            packs: vec![pack::new_id()],
            loose: vec!["p/chunks/ab/abcd".into()],
        };
        let back = Doomed::decode("x", &d.encode()).unwrap();
        assert_eq!((back.packs, back.loose), (d.packs, d.loose));
        assert!(Doomed::decode("x", b"granary doomed 1\npack nope\n").is_err());
        assert!(Doomed::decode("x", b"hello").is_err());
        let set: HashSet<_> = [(Kind::Directory, B3Digest::of(b"d"))]
            .into_iter()
            .collect();
        let keep = decode_keep("k", &encode_keep(&set)).unwrap();
        assert_eq!(keep, vec![(Kind::Directory, B3Digest::of(b"d"))]);
        assert!(decode_keep("k", b"GRNKEEP1\x00").is_err());
        assert!(decode_keep("k", b"GRNKEEP1\x07").is_err());
    }
}
