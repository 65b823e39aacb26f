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

/// Bytes of objects gathered before a pack is uploaded. Large enough that an import costs one
/// PUT per 32 MiB stored; small enough to hold in memory (the pack being filled, plus one per
/// upload in flight) and to upload in one PUT (S3 takes 5 GiB in one).
pub(super) const PACK_TARGET: usize = 32 << 20;

/// Two chunks of one pack with less than this between them are read with one GET, the gap
/// read and dropped. At 20 ms a round trip and ≈ 100 MB/s per connection, a round trip costs
/// as long as reading 2 MB; 512 KiB keeps the bytes wasted on gaps small (readahead asks for
/// chunks that lie back to back, so gaps are rare) while never splitting a readahead window.
pub(super) const COALESCE_GAP: u64 = 512 << 10;

/// Longest range one GET asks for: 16 MiB keeps a batch of several ranges in flight and
/// bounds what a failed GET throws away.
pub(super) const MAX_RANGE: u64 = 16 << 20;

/// Ranged GETs of one batch in flight at once.
pub(super) const BATCH_GETS: usize = 8;

/// Objects put but not yet in a committed pack: the pack being filled, then those sealed and
/// waiting for (or in) their upload. Reads look here first.
#[derive(Default)]
pub(super) struct Staged {
    objects: HashMap<(Kind, B3Digest), Bytes>,
    filling: Vec<(Kind, B3Digest)>,
    filling_bytes: usize,
    sealed: VecDeque<Vec<(Kind, B3Digest)>>,
    /// Objects a put found already packed: written to a keep marker before the next root
    /// (gc rescues them from a pack it means to delete).
    pub(super) reused: HashSet<(Kind, B3Digest)>,
}

impl Staged {
    fn seal(&mut self) {
        if !self.filling.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.filling));
            self.filling_bytes = 0;
        }
    }
}

/// A pack gc means to delete, and loose keys it has copied into packs: deleted by the first
/// gc that runs a grace period later, once what concurrent imports reused is rescued.
#[derive(Debug, Clone, Default)]
pub(super) struct Doomed {
    pub packs: Vec<String>,
    pub loose: Vec<String>,
    pub written: Option<SystemTime>,
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

/// One ranged GET of a batch: a stretch of one pack and the chunks inside it.
struct Span {
    id: String,
    start: u64,
    end: u64,
    chunks: Vec<(B3Digest, IndexEntry)>,
}

/// Groups packed chunks into spans: per pack, by offset, joining neighbours less than
/// [`COALESCE_GAP`] apart up to [`MAX_RANGE`].
fn spans(mut located: Vec<(String, IndexEntry)>) -> Vec<Span> {
    located.sort_by(|a, b| (&a.0, a.1.offset).cmp(&(&b.0, b.1.offset)));
    let mut out: Vec<Span> = Vec::new();
    for (id, e) in located {
        let (s, end) = (e.offset, e.offset + e.len as u64);
        if let Some(last) = out.last_mut() {
            if last.id == id
                && s >= last.start
                && s <= last.end.saturating_add(COALESCE_GAP)
                && end.max(last.end) - last.start <= MAX_RANGE
            {
                last.end = last.end.max(end);
                last.chunks.push((e.digest, e));
                continue;
            }
        }
        out.push(Span {
            id,
            start: s,
            end,
            chunks: vec![(e.digest, e)],
        });
    }
    out
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

    /// An object put by this process and not yet uploaded.
    pub(super) fn staged_object(&self, kind: Kind, digest: &B3Digest) -> Option<Bytes> {
        self.lock_staged()
            .ok()
            .and_then(|st| st.objects.get(&(kind, *digest)).cloned())
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
        if !self.config.packs {
            return self.put_loose(kind, digest, data).await;
        }
        self.ensure_scanned().await?;
        let packed = {
            let st = self.packs.lock().await;
            st.map
                .get(&(kind, *digest))
                .is_some_and(|(id, _)| !st.doomed.contains(id))
        };
        let full = {
            let mut st = self.lock_staged()?;
            if packed {
                st.reused.insert((kind, *digest));
                return Ok(());
            }
            if st.objects.contains_key(&(kind, *digest)) {
                return Ok(());
            }
            st.filling_bytes += data.len();
            st.objects.insert((kind, *digest), data);
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

    /// Stores an object even if a pack holds it (gc's copies out of packs it will delete).
    pub(super) async fn put_copy(&self, kind: Kind, digest: &B3Digest, raw: Bytes) -> Result<()> {
        let full = {
            let mut st = self.lock_staged()?;
            if st.objects.contains_key(&(kind, *digest)) {
                return Ok(());
            }
            st.filling_bytes += raw.len();
            st.objects.insert((kind, *digest), raw);
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
            let (keys, body, entries) = {
                let mut st = self.lock_staged()?;
                let Some(keys) = st.sealed.pop_front() else {
                    return Ok(());
                };
                let size: usize = keys
                    .iter()
                    .filter_map(|k| st.objects.get(k).map(|b| b.len()))
                    .sum();
                let mut body = Vec::with_capacity(pack::PACK_MAGIC.len() + size);
                body.extend_from_slice(pack::PACK_MAGIC);
                let mut entries = Vec::with_capacity(keys.len());
                for k in &keys {
                    let Some(b) = st.objects.get(k) else { continue };
                    entries.push(IndexEntry {
                        kind: k.0,
                        digest: k.1,
                        offset: body.len() as u64,
                        len: b.len() as u32,
                    });
                    body.extend_from_slice(b);
                }
                (keys, body, entries)
            };
            let id = pack::new_id();
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
            let mut st = self.lock_staged()?;
            for k in &keys {
                st.objects.remove(k);
            }
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

    /// Reads a batch of chunks with as few GETs as the packs allow (see [`spans`]); chunks
    /// not in a known pack are read one by one.
    pub(super) async fn read_chunks_coalesced(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        if let Err(e) = self.ensure_scanned().await {
            for c in chunks {
                sink(c.digest, Err(e.duplicate()));
            }
            return;
        }
        let mut located = Vec::new();
        let mut single = Vec::new();
        {
            let packs = self.packs.lock().await;
            for c in chunks {
                let staged = self.staged_object(Kind::Chunk, &c.digest);
                let stashed = self.stash.lock().ok().and_then(|mut st| st.pop(&c.digest));
                if staged.is_some() || stashed.is_some() {
                    single.push(c);
                    if let Some(b) = stashed {
                        if let Ok(mut st) = self.stash.lock() {
                            st.put(c.digest, b);
                        }
                    }
                    continue;
                }
                match packs.map.get(&(Kind::Chunk, c.digest)) {
                    Some((id, e)) if e.len > 0 => located.push((id.clone(), *e)),
                    _ => single.push(c),
                }
            }
        }
        // Boxed futures, so the batch's borrow of `self` has one lifetime the trait's future
        // can name.
        type Job<'a> = futures::future::BoxFuture<'a, ()>;
        let mut jobs: Vec<Job<'_>> = Vec::new();
        for span in spans(located) {
            let sink = sink.clone();
            jobs.push(Box::pin(async move { self.read_span(span, &sink).await }));
        }
        for c in single {
            let sink = sink.clone();
            jobs.push(Box::pin(async move {
                sink(c.digest, self.read_chunk(&c.digest).await)
            }));
        }
        futures::stream::iter(jobs)
            .buffer_unordered(BATCH_GETS)
            .for_each(|()| async {})
            .await;
    }

    /// One ranged GET for a span, its chunks decoded (and verified) off the runtime. A pack
    /// gone since it was indexed (a gc replaced it) sends its chunks the single way, which
    /// looks for them again.
    async fn read_span(&self, span: Span, sink: &ChunkSink) {
        let key = self.pack_key(&span.id, "pack");
        let got = self
            .get_raw(&key, Some(GetRange::Bounded(span.start..span.end)))
            .await;
        match got {
            Ok(Some(body)) if body.len() as u64 == span.end - span.start => {
                let start = span.start;
                let chunks = span.chunks;
                let sink2 = sink.clone();
                let decoded = tokio::task::spawn_blocking(move || {
                    for (d, e) in chunks {
                        let at = (e.offset - start) as usize;
                        let raw = &body[at..at + e.len as usize];
                        sink2(d, decode_chunk(&d, raw).map(Some));
                    }
                })
                .await;
                if let Err(e) = decoded {
                    tracing::warn!("decoding a span of pack {}: {e}", span.id);
                }
            }
            Ok(_) => {
                for (d, _) in span.chunks {
                    sink(d, self.read_chunk(&d).await);
                }
            }
            Err(e) => {
                for (d, _) in span.chunks {
                    sink(d, Err(e.duplicate()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, len: u32) -> IndexEntry {
        IndexEntry {
            kind: Kind::Chunk,
            digest: B3Digest::of(&offset.to_le_bytes()),
            offset,
            len,
        }
    }

    #[test]
    fn spans_join_neighbours_of_one_pack_within_the_limits() {
        let a = "a".to_string();
        let b = "b".to_string();
        let located = vec![
            (a.clone(), entry(100_000, 1000)),
            (a.clone(), entry(8, 1000)),
            (b.clone(), entry(8, 50)),
            // Just beyond the gap from the first two.
            (a.clone(), entry(101_000 + COALESCE_GAP + 1, 10)),
            // Would make the span longer than MAX_RANGE.
            (
                a.clone(),
                entry(101_000 + COALESCE_GAP + 11, MAX_RANGE as u32),
            ),
        ];
        let s = spans(located);
        let shape: Vec<(&str, u64, u64, usize)> = s
            .iter()
            .map(|s| (s.id.as_str(), s.start, s.end, s.chunks.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("a", 8, 101_000, 2),
                (
                    "a",
                    101_000 + COALESCE_GAP + 1,
                    101_000 + COALESCE_GAP + 11,
                    1
                ),
                (
                    "a",
                    101_000 + COALESCE_GAP + 11,
                    101_000 + COALESCE_GAP + 11 + MAX_RANGE,
                    1
                ),
                ("b", 8, 58, 1),
            ]
        );
    }

    #[test]
    fn gc_records_and_keep_markers_round_trip_and_refuse_garbage() {
        let d = Doomed {
            packs: vec![pack::new_id()],
            loose: vec!["p/chunks/ab/abcd".into()],
            written: None,
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
