//! Whole-bucket operations: usage, listing, age-checked deletion.

#[allow(unused_imports)]
use super::*;

#[async_trait]
impl Maintenance for S3Store {
    async fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for kind in Kind::ALL {
            let objs = Maintenance::list(self, kind).await?;
            u.stored_bytes += objs.iter().map(|o| o.stored_bytes).sum::<u64>();
            let n = objs.len() as u64;
            match kind {
                Kind::Chunk => {
                    u.chunks = n;
                    let sizes: Vec<Option<u64>> = futures::stream::iter(objs)
                        .map(|o| async move { self.chunk_size(&o.digest).await })
                        .buffer_unordered(USAGE_CONCURRENCY)
                        .try_collect()
                        .await?;
                    u.chunk_bytes = sizes.into_iter().flatten().sum();
                }
                Kind::BlobIndex => u.blob_indexes = n,
                Kind::Directory => u.directories = n,
            }
        }
        u.roots = RootService::list(self).await?.len() as u64;
        Ok(u)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let mut out: Vec<ObjectInfo> = self
            .list_under(kind.dir())
            .await?
            .into_iter()
            .filter_map(|m| {
                let digest = m.location.filename()?.parse::<B3Digest>().ok()?;
                Some(ObjectInfo {
                    kind,
                    digest,
                    stored_bytes: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        let loose: HashSet<B3Digest> = out.iter().map(|o| o.digest).collect();
        let mut st = self.packs.lock().await;
        self.scan_packs(&mut st).await?;
        // A grouped object's share of its group's frame, in proportion to its plain bytes.
        let mut groups: std::collections::HashMap<(&str, u64), u64> = Default::default();
        for (id, e) in st.map.values() {
            if let Some(m) = e.member {
                *groups.entry((id.as_str(), e.offset)).or_default() += m.len as u64;
            }
        }
        for ((k, digest), (id, e)) in &st.map {
            if *k == kind && !loose.contains(digest) {
                let group = groups.get(&(id.as_str(), e.offset)).copied();
                out.push(ObjectInfo {
                    kind,
                    digest: *digest,
                    stored_bytes: e.stored_share(group.unwrap_or_default()),
                    modified: st.packs.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// A loose object is deleted if its LastModified is before `cutoff` (S3 offers no
    /// atomic check-and-delete: only as safe as the module docs say). A packed one whose pack
    /// is older than `cutoff` is marked for this gc's sweep, which rewrites its pack.
    async fn delete_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let key = self.object_key(kind, digest);
        let mut deleted = false;
        if let Some(m) = self.head(&key).await? {
            if SystemTime::from(m.last_modified) < cutoff {
                self.delete_key(&key).await?;
                deleted = true;
            }
        }
        let st = self.packs.lock().await;
        if let Some((id, _)) = st.map.get(&(kind, *digest)) {
            if st.packs.get(id).is_some_and(|t| *t < cutoff) {
                self.pending
                    .lock()
                    .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?
                    .insert((kind, *digest), cutoff);
                deleted = true;
            }
        }
        Ok(deleted)
    }

    /// Deletes a loose copy and forgets the packed one, so that the repair's put that follows
    /// writes a newer copy (which readers then prefer); the old one goes with its pack's gc.
    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        self.packs.lock().await.map.remove(&(kind, *digest));
        self.delete_key(&self.object_key(kind, digest)).await
    }

    /// gc's second half on S3: finishes earlier gc records that are a grace period old, then
    /// rewrites the packs holding this gc's dead objects and moves live loose objects into
    /// packs, recording what is to go (see `gc_rewrite`). Returns how many keys it deleted.
    async fn sweep_temp(&self, cutoff: SystemTime) -> Result<u64> {
        let deleted = self.finish_records(cutoff).await?;
        self.gc_rewrite(cutoff).await?;
        Ok(deleted)
    }

    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(request_counts())
    }
}
