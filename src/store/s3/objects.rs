//! Objects in the bucket: each under its own key or inside a pack (read with ranged GETs), and the blob and directory services over them.

#[allow(unused_imports)]
use super::*;

/// Pack indexes fetched at once when a store is opened or rescanned.
const INDEX_FETCHES: usize = 16;

impl S3Store {
    pub(super) fn root_key(&self, name: &str) -> Result<Key> {
        validate_root_name(name)?;
        Ok(self.key(&format!("roots/{name}")))
    }

    /// An object's stored bytes (or the first `prefix` of them): put by this process and not
    /// yet uploaded, in a pack this process knows, under its own key (a store from before
    /// packs), else in a pack listed since. `Ok(None)` if none has it.
    pub(super) async fn get_object(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<u64>,
    ) -> Result<Option<Bytes>> {
        if let Some(b) = self.staged_object(kind, digest) {
            let n = prefix.map_or(b.len(), |n| (n as usize).min(b.len()));
            return Ok(Some(b.slice(..n)));
        }
        self.ensure_scanned().await?;
        let known = self.packs.lock().await.map.get(&(kind, *digest)).cloned();
        if let Some(at) = known {
            if let Some(b) = self.read_at(&at.0, &at.1, prefix).await? {
                return Ok(Some(b));
            }
            // Its pack has gone (a gc replaced it after committing the copy): look again now.
            let mut st = self.packs.lock().await;
            self.scan_packs(&mut st).await?;
            let again = st.map.get(&(kind, *digest)).cloned();
            drop(st);
            if let Some(at) = again {
                return self.read_at(&at.0, &at.1, prefix).await;
            }
        }
        if self.may_have_loose().await {
            let range = prefix.map(|n| GetRange::Bounded(0..n));
            if let Some(b) = self.get_raw(&self.object_key(kind, digest), range).await? {
                return Ok(Some(b));
            }
        }
        self.get_packed(kind, digest, prefix).await
    }

    pub(super) async fn get_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<u64>,
    ) -> Result<Option<Bytes>> {
        match self.find_packed(kind, digest).await? {
            Some(at) => self.read_at(&at.0, &at.1, prefix).await,
            None => Ok(None),
        }
    }

    /// Where a packed object is, listing the packs first if they were never listed or a
    /// miss comes [`PACK_RESCAN`] after the last listing.
    pub(super) async fn find_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
    ) -> Result<Option<(String, IndexEntry)>> {
        let mut st = self.packs.lock().await;
        if let Some(hit) = st.map.get(&(kind, *digest)) {
            return Ok(Some(hit.clone()));
        }
        if st.scanned.is_some_and(|t| t.elapsed() < PACK_RESCAN) {
            return Ok(None);
        }
        self.scan_packs(&mut st).await?;
        Ok(st.map.get(&(kind, *digest)).cloned())
    }

    /// Lists `packs/` (packs, indexes, gc records, keep markers in one listing) and reads
    /// the gc records and the indexes not read before (all of them again if a pack went away
    /// or a gc record came or went). Of several copies of an object, one in a pack no gc
    /// record names wins, then the newest.
    pub(super) async fn scan_packs(&self, st: &mut S3Packs) -> Result<()> {
        let listed = self.list_under(pack::PACK_DIR).await?;
        let mut sizes = std::collections::HashMap::new();
        let mut times = std::collections::HashMap::new();
        let mut ids = Vec::new();
        let mut record_keys = Vec::new();
        let mut keeps = Vec::new();
        let doomed_dir = self.key(DOOMED_DIR);
        let keep_dir = self.key(KEEP_DIR);
        for m in &listed {
            let Some(name) = m.location.filename() else {
                continue;
            };
            let t = SystemTime::from(m.last_modified);
            if m.location.prefix_matches(&doomed_dir) {
                record_keys.push((m.location.clone(), t));
            } else if m.location.prefix_matches(&keep_dir) {
                keeps.push((m.location.clone(), t));
            } else if let Some(id) = name.strip_suffix(".pack").filter(|id| pack::is_id(id)) {
                sizes.insert(id.to_string(), m.size);
                times.insert(id.to_string(), t);
            } else if let Some(id) = name.strip_suffix(".idx").filter(|id| pack::is_id(id)) {
                ids.push(id.to_string());
            }
        }
        let mut records = Vec::new();
        for (key, t) in record_keys {
            let Some(raw) = self.get_raw(&key, None).await? else {
                continue;
            };
            let d = packs::Doomed::decode(key.as_ref(), &raw)?;
            records.push((key, t, d));
        }
        let doomed: HashSet<String> = records
            .iter()
            .flat_map(|(_, _, d)| d.packs.iter().cloned())
            .collect();
        ids.retain(|id| sizes.contains_key(id));
        ids.sort();
        if let Ok(mut known) = self.pack_sizes.lock() {
            known.clone_from(&sizes);
        }
        if st.packs.keys().any(|id| !sizes.contains_key(id)) || doomed != st.doomed {
            *st = S3Packs::default();
        }
        st.doomed = doomed;
        st.records = records;
        st.keeps = keeps;
        ids.retain(|id| !st.packs.contains_key(id));
        self.prune_kept_indexes(&sizes).await;
        // Fetched concurrently (a cold start over a long link would otherwise pay one round
        // trip per pack), merged in id order.
        let mut fetched: Vec<Option<Vec<IndexEntry>>> = Vec::with_capacity(ids.len());
        for group in ids.chunks(INDEX_FETCHES) {
            let mut loads = Vec::with_capacity(group.len());
            for id in group {
                loads.push(self.pack_index(id, sizes.get(id).copied().unwrap_or(0)));
            }
            for r in futures::future::join_all(loads).await {
                fetched.push(r?);
            }
        }
        for (id, entries) in ids.iter().zip(fetched) {
            let Some(entries) = entries else {
                continue;
            };
            let gone = st.doomed.contains(id);
            for e in entries {
                let newer = match st.map.get(&(e.kind, e.digest)) {
                    None => true,
                    Some((held, _)) => {
                        let held_gone = st.doomed.contains(held);
                        (held_gone && !gone) || (held_gone == gone && held.as_str() <= id.as_str())
                    }
                };
                if newer {
                    st.map.insert((e.kind, e.digest), (id.clone(), e));
                }
            }
            let t = times.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH);
            st.packs.insert(id.clone(), t);
        }
        st.has_loose = Some(self.lists_loose().await?);
        st.scanned = Some(std::time::Instant::now());
        Ok(())
    }

    /// A pack's index: kept on disk (checked as if fetched), else fetched and kept.
    async fn pack_index(&self, id: &str, size: u64) -> Result<Option<Vec<IndexEntry>>> {
        let kept = self.index_dir.as_ref().map(|d| d.join(format!("{id}.idx")));
        if let Some(path) = &kept {
            if let Ok(raw) = tokio::fs::read(path).await {
                match pack::decode_index(id, &raw, size) {
                    Ok(entries) => return Ok(Some(entries)),
                    // Damaged on disk: fetched again below and the copy replaced.
                    Err(e) => tracing::warn!("{}: {e}", path.display()),
                }
            }
        }
        let Some(raw) = self.get_raw(&self.pack_key(id, "idx"), None).await? else {
            return Ok(None);
        };
        let entries = pack::decode_index(id, &raw, size)?;
        if let Some(path) = kept {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let written = async {
                if let Some(dir) = path.parent() {
                    tokio::fs::create_dir_all(dir).await?;
                }
                tokio::fs::write(&tmp, &raw).await?;
                tokio::fs::rename(&tmp, &path).await
            };
            if let Err(e) = written.await {
                tracing::warn!("keeping pack index {}: {e}", path.display());
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        Ok(Some(entries))
    }

    /// Removes kept indexes of packs the bucket no longer lists (a gc deleted them).
    async fn prune_kept_indexes(&self, listed: &std::collections::HashMap<String, u64>) {
        let Some(dir) = &self.index_dir else { return };
        let Ok(mut rd) = tokio::fs::read_dir(&**dir).await else {
            return;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".idx")) else {
                continue;
            };
            if !listed.contains_key(id) {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
    }

    /// Whether the store's top level holds any of the loose objects' directories.
    async fn lists_loose(&self) -> Result<bool> {
        LISTS.fetch_add(1, Ordering::Relaxed);
        let top = (!self.loc.prefix.is_empty()).then(|| Key::from(self.loc.prefix.as_str()));
        let what = || format!("LIST {}/ (top level)", self.loc.prefix);
        let listed = self
            .timed(what, self.os.list_with_delimiter(top.as_ref()))
            .await?
            .map_err(|e| self.fail(&what(), &e))?;
        Ok(listed.common_prefixes.iter().any(|p| {
            p.filename()
                .is_some_and(|f| Kind::ALL.iter().any(|k| k.dir() == f))
        }))
    }

    /// Whether an object is stored: put here, in a known pack, loose, or in a pack listed
    /// since.
    pub(super) async fn has_object(&self, kind: Kind, digest: &B3Digest) -> Result<bool> {
        if self.staged_object(kind, digest).is_some() {
            return Ok(true);
        }
        self.ensure_scanned().await?;
        if self.packs.lock().await.map.contains_key(&(kind, *digest)) {
            return Ok(true);
        }
        if self.may_have_loose().await && self.head(&self.object_key(kind, digest)).await?.is_some()
        {
            return Ok(true);
        }
        Ok(self.find_packed(kind, digest).await?.is_some())
    }

    /// Whether objects may be stored under their own keys: a store from before packs, or a
    /// bucket whose last listing showed loose objects (one listing of the store's top level
    /// with each scan of the packs tells). Where there are none, a miss costs no GET.
    pub(super) async fn may_have_loose(&self) -> bool {
        !self.config.packs || self.packs.lock().await.has_loose != Some(false)
    }

    /// GETs and verifies one chunk.
    pub(super) async fn fetch_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let Some(raw) = self.get_object(Kind::Chunk, chunk, None).await? else {
            return Ok(None);
        };
        let d = *chunk;
        tokio::task::spawn_blocking(move || decode_chunk(&d, &raw))
            .await
            .map_err(|e| StoreError::Backend(format!("decode task failed: {e}")))?
            .map(Some)
    }

    /// Uncompressed size of a stored chunk, from its zstd frame header (one ranged GET).
    pub(super) async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        let Some(head) = self
            .get_object(Kind::Chunk, digest, Some(ZSTD_HEADER))
            .await?
        else {
            return Ok(None);
        };
        match zstd::zstd_safe::get_frame_content_size(&head) {
            Ok(Some(s)) if s as usize <= MAX_CHUNK => Ok(Some(s)),
            // No size in the header: decode it (verifies too).
            _ => Ok(self.read_chunk(digest).await?.map(|b| b.len() as u64)),
        }
    }
}
#[async_trait]
impl BlobService for S3Store {
    fn remote(&self) -> bool {
        true
    }

    fn read_memory_bytes(&self) -> usize {
        super::packs::EXTENT_CACHE + crate::store::pack::GROUP_CACHE_BYTES
    }

    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        if *blob == empty_blob() {
            return Ok(Some(BlobMeta::default()));
        }
        // Most blobs are small, single-chunk ones: fetch the chunk itself (verified, and kept
        // for the read that follows); only if there is none look for a blob index. When the
        // packs say there is only an index, go there at once (the chunk look would miss).
        self.ensure_scanned().await?;
        let index_only = {
            let st = self.packs.lock().await;
            st.map.contains_key(&(Kind::BlobIndex, *blob))
                && !st.map.contains_key(&(Kind::Chunk, *blob))
        };
        let chunk = if index_only {
            None
        } else {
            self.fetch_chunk(blob).await?
        };
        if let Some(data) = chunk {
            let size = data.len() as u64;
            if let Ok(mut st) = self.stash.lock() {
                st.put(*blob, data);
            }
            return Ok(Some(BlobMeta {
                size,
                chunks: vec![ChunkRef {
                    digest: *blob,
                    size,
                }],
                outboard: Bytes::new(),
            }));
        }
        let Some(raw) = self.get_object(Kind::BlobIndex, blob, None).await? else {
            return Ok(None);
        };
        let idx = BlobIndex::decode_valid(&raw)
            .map_err(|e| StoreError::corrupt("blob index", blob, e.to_string()))?;
        BlobMeta::from_index(&idx).map(Some)
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let stashed = self.stash.lock().ok().and_then(|mut st| st.pop(chunk));
        if let Some(b) = stashed {
            return Ok(Some(b));
        }
        self.fetch_chunk(chunk).await
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        self.has_object(Kind::Chunk, chunk).await
    }

    async fn read_chunks(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        self.read_chunks_coalesced(chunks, sink).await
    }

    async fn read_chunks_exact(&self, chunks: Vec<ChunkRef>, sink: ChunkSink) {
        S3Store::read_chunks_exact(self, chunks, sink).await
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        let level = self.config.zstd_level;
        // A small chunk is staged as it is, and compressed with its neighbours in a group.
        let group = self.grouped(data.len());
        let stored = tokio::task::spawn_blocking(move || {
            let actual = B3Digest::of(&data);
            if actual != digest {
                return Err(StoreError::corrupt(
                    "chunk",
                    &digest,
                    format!("content hashes to {actual}"),
                ));
            }
            if group {
                return Ok(data);
            }
            crate::store::codec::encode_chunk(&data, level)
                .map(Bytes::from)
                .map_err(|e| StoreError::io(format!("compressing chunk {digest}"), e))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("compress task failed: {e}")))??;
        if group {
            return self.put_plain_chunk(&digest, stored).await;
        }
        self.put_object(Kind::Chunk, &digest, stored).await
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        index.validate()?;
        let bytes = index.encode_sealed();
        self.put_object(Kind::BlobIndex, &blob, Bytes::from(bytes))
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.flush_staged().await
    }
}

#[async_trait]
impl DirectoryService for S3Store {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let Some(raw) = self.get_object(Kind::Directory, digest, None).await? else {
            return Ok(None);
        };
        let actual = B3Digest::of(&raw);
        if actual != *digest {
            return Err(StoreError::corrupt(
                "directory",
                digest,
                format!("digest mismatch (content hashes to {actual})"),
            ));
        }
        Directory::decode_valid(&raw)
            .map(Some)
            .map_err(|e| StoreError::corrupt("directory", digest, e.to_string()))
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        dir.validate()?;
        check_children(self, dir).await?;
        let bytes = dir.encode_canonical();
        let digest = B3Digest::of(&bytes);
        self.put_object(Kind::Directory, &digest, Bytes::from(bytes))
            .await?;
        Ok(digest)
    }

    async fn get_many(&self, digests: Vec<B3Digest>) -> Vec<Result<Option<Directory>>> {
        self.get_dirs(digests).await
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        self.has_object(Kind::Directory, digest).await
    }

    async fn flush(&self) -> Result<()> {
        self.flush_staged().await
    }
}
