//! gc on S3 in two halves a grace period apart, safe beside imports on other machines.
//!
//! S3 cannot refresh an object's time when an import reuses it, so the local store's rule
//! ("a reused object looks young") cannot hold. Instead:
//!
//! 1. A gc copies the live objects of every old pack holding garbage (and every loose object)
//!    into new packs, commits them, then writes a *gc record* (`packs/doomed/<id>`) naming the
//!    old packs and loose keys. Nothing is deleted yet. Puts that see the record no longer
//!    count an object whose only copy is in a doomed pack as stored (they write it again).
//! 2. An import that reused objects from packs writes, before its root, a *keep marker*
//!    (`packs/keep/<id>`) naming them.
//! 3. A later gc, once the record is a grace period old, reads every keep marker, copies any
//!    object named there whose only copy is in a doomed pack into a new pack, commits it, and
//!    only then deletes the doomed packs (index first) and loose keys, and the record.
//!
//! An import that reused a doomed object had read the packs before the record appeared, so
//! (provided no import runs longer than the grace period, the rule `gc` states everywhere) its
//! keep marker exists when step 3 runs. Loose keys are deleted no sooner than
//! [`LOOSE_WAIT`] after their record, by when every reader has listed the packs again.

#[allow(unused_imports)]
use super::*;

/// Least age of a gc record before the loose keys it names are deleted: two pack listings.
pub(super) const LOOSE_WAIT: Duration = Duration::from_secs(2 * PACK_RESCAN.as_secs());

/// A pack is rewritten once at least this share of its bytes is garbage; below it, its
/// garbage waits for more of the pack to die (a rewrite costs a GET and a PUT of the rest).
const REWRITE_DEAD_FRACTION: f64 = 0.25;

/// Keep markers older than this are deleted by gc (no import runs for a day).
const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);

impl S3Store {
    /// Step 3: finishes the gc records written before `cutoff`. Returns the keys deleted.
    pub(super) async fn finish_records(&self, cutoff: SystemTime) -> Result<u64> {
        let now = SystemTime::now();
        let (due, keeps) = {
            let mut st = self.packs.lock().await;
            self.scan_packs(&mut st).await?;
            let due: Vec<(Key, packs::Doomed)> = st
                .records
                .iter()
                .filter(|(_, t, d)| {
                    *t <= cutoff
                        && (d.loose.is_empty()
                            || now.duration_since(*t).is_ok_and(|a| a >= LOOSE_WAIT))
                })
                .map(|(k, _, d)| (k.clone(), d.clone()))
                .collect();
            (due, st.keeps.clone())
        };
        let mut deleted = 0;
        let old_keeps: Vec<Key> = keeps
            .iter()
            .filter(|(_, t)| now.duration_since(*t).is_ok_and(|a| a > KEEP_FOR))
            .map(|(k, _)| k.clone())
            .collect();
        if !due.is_empty() {
            let gone: HashSet<String> = due
                .iter()
                .flat_map(|(_, d)| d.packs.iter().cloned())
                .collect();
            self.rescue_kept(&keeps, &gone).await?;
            for id in &gone {
                self.delete_key(&self.pack_key(id, "idx")).await?;
                self.delete_key(&self.pack_key(id, "pack")).await?;
                deleted += 2;
            }
            for (key, d) in &due {
                for k in &d.loose {
                    self.delete_key(&Key::from(k.as_str())).await?;
                    deleted += 1;
                }
                self.delete_key(key).await?;
            }
        }
        for k in old_keeps {
            self.delete_key(&k).await?;
            deleted += 1;
        }
        if deleted > 0 {
            let mut st = self.packs.lock().await;
            self.scan_packs(&mut st).await?;
        }
        Ok(deleted)
    }

    /// Copies every object a keep marker names whose only copy is in one of `gone` into a new
    /// pack, and commits it.
    async fn rescue_kept(&self, keeps: &[(Key, SystemTime)], gone: &HashSet<String>) -> Result<()> {
        let mut rescued = 0u64;
        for (key, _) in keeps {
            let Some(raw) = self.get_raw(key, None).await? else {
                continue;
            };
            let kept = match packs::decode_keep(key.as_ref(), &raw) {
                Ok(k) => k,
                // A damaged marker cannot be honoured: keep everything rather than guess.
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                    "{e}; not deleting packs while it is unreadable (delete it if no import runs)"
                )))
                }
            };
            for obj in kept {
                let at = self.packs.lock().await.map.get(&obj).cloned();
                let Some(at) = at.filter(|(id, _)| gone.contains(id)) else {
                    continue;
                };
                if let Some(raw) = self.copy_source(obj.0, &obj.1, &at).await? {
                    self.put_copy(obj.0, &obj.1, raw).await?;
                    rescued += 1;
                }
            }
        }
        if rescued > 0 {
            tracing::info!("kept {rescued} objects that running imports reused");
            self.flush_staged().await?;
        }
        Ok(())
    }

    /// An object's stored bytes at `at`, checked; `None` (and a warning) if they are damaged:
    /// a damaged object is dropped, never copied.
    async fn copy_source(
        &self,
        kind: Kind,
        digest: &B3Digest,
        at: &(String, IndexEntry),
    ) -> Result<Option<Bytes>> {
        let (id, e) = at;
        let raw = if e.member.is_some() {
            // A grouped object: its group read and decompressed, the object cut out of it.
            match self.read_at(id, e, None).await {
                Ok(Some(b)) => b,
                Ok(None) => return Ok(None),
                Err(err) => {
                    tracing::warn!("dropping {err} while rewriting pack {id}");
                    return Ok(None);
                }
            }
        } else if e.len == 0 {
            Bytes::new()
        } else {
            let range = GetRange::Bounded(e.offset..e.offset + e.len as u64);
            match self
                .get_raw(&self.pack_key(id, "pack"), Some(range))
                .await?
            {
                Some(b) => b,
                None => return Ok(None),
            }
        };
        match verify_stored(kind, digest, &raw) {
            Ok(()) => Ok(Some(raw)),
            Err(err) => {
                tracing::warn!("dropping {err} while rewriting pack {id}");
                Ok(None)
            }
        }
    }

    /// Step 1: copies the live objects of the old packs that hold this gc's dead objects, and
    /// every loose object no record names yet, into new packs; commits them; then records the
    /// old packs and keys for a later gc to delete.
    pub(super) async fn gc_rewrite(&self, cutoff: SystemTime) -> Result<()> {
        let dead: HashSet<(Kind, B3Digest)> = self
            .pending
            .lock()
            .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?
            .drain()
            .filter(|(_, c)| *c == cutoff)
            .map(|(k, _)| k)
            .collect();
        let (doomed_packs, recorded_loose) = {
            let st = self.packs.lock().await;
            let doomed_packs: Vec<String> = {
                let mut v: Vec<String> = st
                    .map
                    .iter()
                    .filter(|(k, (id, _))| {
                        dead.contains(k)
                            && !st.doomed.contains(id)
                            && st.packs.get(id).is_some_and(|t| *t < cutoff)
                    })
                    .map(|(_, (id, _))| id.clone())
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            let recorded: HashSet<String> = st
                .records
                .iter()
                .flat_map(|(_, _, d)| d.loose.iter().cloned())
                .collect();
            (doomed_packs, recorded)
        };
        let mut rewritten = Vec::new();
        for id in &doomed_packs {
            let Some(idx) = self.get_raw(&self.pack_key(id, "idx"), None).await? else {
                continue;
            };
            let entries = pack::decode_index(id, &idx, u64::MAX)?;
            // Only packs mostly garbage are worth a rewrite (a GET and a PUT of the live rest).
            let groups = pack::group_plain_sizes(&entries);
            let share =
                |e: &IndexEntry| e.stored_share(groups.get(&e.offset).copied().unwrap_or_default());
            let size: u64 = entries.iter().map(share).sum();
            let dead_bytes: u64 = entries
                .iter()
                .filter(|e| dead.contains(&(e.kind, e.digest)))
                .map(share)
                .sum();
            if (dead_bytes as f64) < REWRITE_DEAD_FRACTION * size as f64 {
                continue;
            }
            for e in entries {
                let key = (e.kind, e.digest);
                let winner = self.packs.lock().await.map.get(&key).cloned();
                // Garbage stays behind; so does an object whose copy readers use is elsewhere.
                if dead.contains(&key) || winner.as_ref().is_none_or(|(w, _)| w != id) {
                    continue;
                }
                if let Some(raw) = self
                    .copy_source(e.kind, &e.digest, &(id.clone(), e))
                    .await?
                {
                    self.put_copy(e.kind, &e.digest, raw).await?;
                }
            }
            rewritten.push(id.clone());
        }
        let doomed_packs = rewritten;
        let mut loose = Vec::new();
        for kind in Kind::ALL {
            for m in self.list_under(kind.dir()).await? {
                let key = m.location.as_ref().to_string();
                let Some(digest) = m.location.filename().and_then(|f| f.parse().ok()) else {
                    continue;
                };
                if recorded_loose.contains(&key) {
                    continue;
                }
                let packed = {
                    let st = self.packs.lock().await;
                    st.map
                        .get(&(kind, digest))
                        .is_some_and(|(id, _)| !st.doomed.contains(id))
                };
                if packed {
                    loose.push(key);
                    continue;
                }
                if let Some(raw) = self.get_raw(&m.location, None).await? {
                    match verify_stored(kind, &digest, &raw) {
                        Ok(()) => self.put_copy(kind, &digest, raw).await?,
                        Err(e) => tracing::warn!("not moving {e} into a pack"),
                    }
                }
                loose.push(key);
            }
        }
        if doomed_packs.is_empty() && loose.is_empty() {
            return Ok(());
        }
        // The copies are committed before anything names the originals for deletion.
        self.flush_staged().await?;
        if !self.config.packs {
            // Converted: from now on granaries write packs here (format 2).
            let config = StoreConfig {
                packs: true,
                ..self.config
            }
            .without_groups();
            let key = self.key("config.toml");
            if let Err(e) = self
                .put_raw(&key, Bytes::from(config.to_toml()), PutMode::Overwrite)
                .await?
            {
                return Err(self.fail(&format!("PUT {key}"), &e));
            }
        }
        let record = packs::Doomed {
            packs: doomed_packs,
            loose,
        };
        let key = self.key(&format!("{DOOMED_DIR}/{}", pack::new_id()));
        if let Err(e) = self
            .put_raw(&key, Bytes::from(record.encode()), PutMode::Overwrite)
            .await?
        {
            return Err(self.fail(&format!("PUT {key}"), &e));
        }
        let mut st = self.packs.lock().await;
        self.scan_packs(&mut st).await
    }
}
