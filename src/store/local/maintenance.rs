//! Whole-store operations of the local store: usage, listing, gc (age-checked deletion, pack rewrites and merges), temp sweeping, damage reports.

#[allow(unused_imports)]
use super::*;

impl LocalStore {
    pub(super) fn usage_blocking(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for kind in [Kind::Chunk, Kind::BlobIndex, Kind::Directory] {
            let top = self.root.join(kind.dir());
            for fan in read_dir_names(&top)? {
                let dir = top.join(&fan);
                for name in read_dir_names(&dir)? {
                    if name.starts_with(TMP_PREFIX) {
                        continue;
                    }
                    let path = dir.join(&name);
                    let meta = match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) if e.kind() == ErrorKind::NotFound => continue,
                        Err(e) => {
                            return Err(StoreError::io(format!("stat {}", path.display()), e))
                        }
                    };
                    u.stored_bytes += meta.len();
                    match kind {
                        Kind::Chunk => {
                            u.chunks += 1;
                            let mut header = [0u8; 18];
                            let n = std::fs::File::open(&path)
                                .and_then(|mut f| read_up_to(&mut f, &mut header))
                                .unwrap_or(0);
                            if let Ok(Some(s)) =
                                zstd::zstd_safe::get_frame_content_size(&header[..n])
                            {
                                u.chunk_bytes += s;
                            }
                        }
                        Kind::BlobIndex => u.blob_indexes += 1,
                        Kind::Directory => u.directories += 1,
                    }
                }
            }
        }
        self.packs.refresh(false)?;
        let groups = self.packs.group_plain_sizes();
        for kind in Kind::ALL {
            for (e, id) in self.packs.objects(kind) {
                let group = groups.get(&(id, e.offset)).copied().unwrap_or(0);
                u.stored_bytes += e.stored_share(group);
                match kind {
                    Kind::Chunk => {
                        u.chunks += 1;
                        if let Some(m) = e.member {
                            u.chunk_bytes += m.len as u64;
                            continue;
                        }
                        let header = self.read_packed(kind, &e.digest, Some(18))?;
                        let header = header.map(Stored::into_protobuf).unwrap_or_default();
                        if let Ok(Some(s)) = zstd::zstd_safe::get_frame_content_size(&header) {
                            u.chunk_bytes += s;
                        }
                    }
                    Kind::BlobIndex => u.blob_indexes += 1,
                    Kind::Directory => u.directories += 1,
                }
            }
        }
        u.roots = read_dir_names(&self.root.join("roots"))?
            .iter()
            .filter(|n| !n.starts_with(TMP_PREFIX))
            .count() as u64;
        Ok(u)
    }
}

impl LocalStore {
    /// Removes a pack without an index or an index without its pack (an interrupted commit
    /// or gc), older than `cutoff`.
    pub(super) fn sweep_orphan_packs(&self, cutoff: SystemTime) -> Result<u64> {
        let dir = self.packs.dir();
        let names = read_dir_names(dir)?;
        let have: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut n = 0;
        for name in &names {
            let (id, other) = if let Some(id) = name.strip_suffix(".pack") {
                (id, format!("{id}.idx"))
            } else if let Some(id) = name.strip_suffix(".idx") {
                (id, format!("{id}.pack"))
            } else {
                continue;
            };
            if !pack::is_id(id) || have.contains(other.as_str()) {
                continue;
            }
            let p = dir.join(name);
            if modified(&p)?.is_some_and(|t| t < cutoff) {
                remove_if_present(&p)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub(super) fn list_blocking(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let top = self.root.join(kind.dir());
        let mut out = Vec::new();
        for fan in read_dir_names(&top)? {
            let dir = top.join(&fan);
            for name in read_dir_names(&dir)? {
                let Ok(digest) = name.parse::<B3Digest>() else {
                    continue; // temp files and strangers
                };
                let path = dir.join(&name);
                let meta = match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(format!("stat {}", path.display()), e)),
                };
                out.push(ObjectInfo {
                    kind,
                    digest,
                    stored_bytes: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        // Packed objects carry their pack's time: a put that reuses one refreshes the pack.
        self.packs.refresh(true)?;
        if let Some((id, reason)) = self.packs.bad().into_iter().next() {
            return Err(StoreError::Corrupt {
                what: "pack index",
                digest: id,
                reason,
            });
        }
        let loose: std::collections::HashSet<B3Digest> = out.iter().map(|o| o.digest).collect();
        let mut times: HashMap<String, SystemTime> = HashMap::new();
        let groups = self.packs.group_plain_sizes();
        for (e, id) in self.packs.objects(kind) {
            if loose.contains(&e.digest) {
                continue;
            }
            let group = groups.get(&(id.clone(), e.offset)).copied().unwrap_or(0);
            let modified = match times.get(&id) {
                Some(t) => *t,
                None => {
                    let t = std::fs::metadata(self.packs.pack_path(&id))
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::now());
                    times.insert(id, t);
                    t
                }
            };
            out.push(ObjectInfo {
                kind,
                digest: e.digest,
                stored_bytes: e.stored_share(group),
                modified,
            });
        }
        Ok(out)
    }

    /// Marks a packed object for removal at this gc's sweep, if its pack is older than
    /// `cutoff`. Returns whether it was marked.
    pub(super) fn mark_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let Some(path) = self.packs.path_of(kind, digest) else {
            return Ok(false);
        };
        let old = match modified(&path)? {
            Some(t) => t < cutoff,
            None => false,
        };
        if old {
            self.pending
                .lock()
                .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?
                .insert((kind, *digest), cutoff);
        }
        Ok(old)
    }

    /// Rewrites every pack holding one of `dead` without it (see [`Self::rewrite_packs`]).
    /// Returns how many objects were removed.
    pub(super) fn repack(
        &self,
        dead: &std::collections::HashSet<(Kind, B3Digest)>,
        cutoff: Option<SystemTime>,
    ) -> Result<u64> {
        self.packs.refresh(true)?;
        let mut ids = Vec::new();
        for id in self.packs.ids() {
            match self.packs.entries_of(&id) {
                Ok(e) if e.iter().any(|e| dead.contains(&(e.kind, e.digest))) => ids.push(id),
                Ok(_) => {}
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.rewrite_packs(&ids, dead, cutoff, self.keep_compression())
    }

    /// Merges the packs smaller than [`MERGE_BELOW`] and older than `cutoff` into one, once
    /// there are [`MERGE_AT`] of them: every import (and every root `import-store` records
    /// in a batch) leaves a pack, and a reader opens and indexes each.
    pub(super) fn merge_small_packs(&self, cutoff: SystemTime) -> Result<usize> {
        self.packs.refresh(true)?;
        let small: Vec<String> = self
            .packs
            .ids()
            .into_iter()
            .filter(|id| {
                std::fs::metadata(self.packs.pack_path(id))
                    .is_ok_and(|m| m.len() < MERGE_BELOW && m.modified().is_ok_and(|t| t < cutoff))
            })
            .collect();
        if small.len() < MERGE_AT {
            return Ok(0);
        }
        self.rewrite_packs(
            &small,
            &Default::default(),
            Some(cutoff),
            self.keep_compression(),
        )?;
        Ok(small.len())
    }

    /// How a gc's rewrite stores what it copies: as the store writes new objects.
    fn keep_compression(&self) -> (u32, i32, bool) {
        (self.config.group_bytes, self.config.zstd_level, false)
    }

    /// Rewrites every pack, grouping small objects (a store without groups is switched to
    /// them: format 3) and, with `level`, compressing everything again at that level.
    pub(super) fn repack_all(&self, level: Option<i32>) -> Result<crate::store::Repacked> {
        if !self.config.packs {
            return Err(StoreError::Backend(format!(
                "{}: repack needs a store with packs (this one is format {}, one file per object)",
                self.root.display(),
                self.config.format_version
            )));
        }
        let group_bytes = match self.config.group_bytes {
            0 => {
                let config = crate::store::StoreConfig {
                    format_version: crate::store::config::FORMAT_VERSION,
                    group_bytes: crate::store::config::DEFAULT_GROUP_BYTES,
                    ..self.config
                };
                write_atomic(
                    &self.root.join("config.toml"),
                    config.to_toml().as_bytes(),
                    true,
                )?;
                config.group_bytes
            }
            g => g,
        };
        self.flush_blocking()?;
        self.packs.refresh(true)?;
        let ids = self.packs.ids();
        let bytes = |ids: &[String]| -> u64 {
            ids.iter()
                .flat_map(|id| [self.packs.pack_path(id), self.packs.index_path(id)])
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum()
        };
        let bytes_before = bytes(&ids);
        let level_now = level.unwrap_or(self.config.zstd_level);
        self.rewrite_packs(
            &ids,
            &Default::default(),
            None,
            (group_bytes, level_now, level.is_some()),
        )?;
        let after: Vec<String> = self.packs.ids();
        Ok(crate::store::Repacked {
            packs_before: ids.len(),
            packs_after: after.len(),
            bytes_before,
            bytes_after: bytes(&after),
        })
    }

    /// Writes the objects of packs `ids`, except `dead` ones, into new packs, then removes
    /// the old ones. Every object kept is verified on the way: a corrupt one is dropped,
    /// never copied. With a `cutoff`, a pack modified at or after it is left whole — checked
    /// before copying and again after moving it aside, since a put that reuses an object
    /// refreshes its pack's time (its objects then exist twice; the newer copy is read).
    /// Returns how many `dead` objects were removed.
    pub(super) fn rewrite_packs(
        &self,
        ids: &[String],
        dead: &std::collections::HashSet<(Kind, B3Digest)>,
        cutoff: Option<SystemTime>,
        (group_bytes, level, recompress): (u32, i32, bool),
    ) -> Result<u64> {
        let young = |p: &Path| -> Result<Option<bool>> {
            Ok(match (modified(p)?, cutoff) {
                (None, _) => None,
                (Some(t), Some(c)) => Some(t >= c),
                (Some(_), None) => Some(false),
            })
        };
        let mut writer: Option<PackWriter> = None;
        let mut copied: std::collections::HashSet<(Kind, B3Digest)> = Default::default();
        let mut sources: Vec<(String, u64)> = Vec::new();
        for id in ids {
            let path = self.packs.pack_path(id);
            if young(&path)? != Some(false) {
                continue;
            }
            let mut entries = match self.packs.entries_of(id) {
                Ok(e) => e,
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e),
            };
            // Copied in the order they were written (an index lists them by digest): objects
            // written together stay together, in their groups too (by digest order, docs
            // grew by 1% at repack instead of shrinking), and a group is decompressed once.
            entries.sort_by_key(|e| (e.offset, e.member.map(|m| m.offset)));
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
            };
            let mut dropped = 0;
            let mut last_group: Option<(u64, Vec<u8>)> = None;
            for e in &entries {
                let key = (e.kind, e.digest);
                if dead.contains(&key) {
                    dropped += 1;
                    continue;
                }
                if !copied.insert(key) {
                    continue;
                }
                // A group's frame is decompressed once for all its members.
                let stored = match e.member {
                    None => Stored::Alone(pack::read_at(&file, &path, e)?),
                    Some(m) => {
                        if last_group.as_ref().is_none_or(|(at, _)| *at != e.offset) {
                            let frame = pack::read_at(&file, &path, e)?;
                            match decode_group(&frame) {
                                Ok(plain) => last_group = Some((e.offset, plain)),
                                Err(why) => {
                                    let err = pack::group_damaged(e, id, &why);
                                    tracing::warn!("dropping {err} while rewriting pack {id}");
                                    continue;
                                }
                            }
                        }
                        let plain = last_group.as_ref().map_or(&[][..], |(_, p)| &p[..]);
                        match pack::slice_member(e, m, plain, id) {
                            Ok(s) => s,
                            Err(err) => {
                                tracing::warn!("dropping {err} while rewriting pack {id}");
                                continue;
                            }
                        }
                    }
                };
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(
                        PackWriter::new(self.packs.dir(), TMP_PREFIX)?
                            .with_groups(group_bytes, level),
                    ),
                };
                if let Err(err) = w.copy(e.kind, e.digest, stored, recompress) {
                    if matches!(err, StoreError::Corrupt { .. }) {
                        tracing::warn!("dropping {err} while rewriting pack {id}");
                        continue;
                    }
                    return Err(err);
                }
                if w.bytes() >= STAGE_MAX_BYTES {
                    if let Some(full) = writer.take() {
                        full.commit(TMP_PREFIX)?;
                    }
                }
            }
            sources.push((id.clone(), dropped));
        }
        // The copies are durable and indexed before any original goes.
        if let Some(w) = writer.take() {
            if !w.is_empty() {
                w.commit(TMP_PREFIX)?;
            }
        }
        let mut removed = 0;
        for (id, dropped) in sources {
            let path = self.packs.pack_path(&id);
            let aside = self.packs.dir().join(format!("{TMP_PREFIX}gc-{id}.pack"));
            match std::fs::rename(&path, &aside) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io(format!("moving {}", path.display()), e)),
            }
            if young(&aside)? == Some(true) {
                std::fs::rename(&aside, &path)
                    .map_err(|e| StoreError::io(format!("restoring {}", path.display()), e))?;
                continue;
            }
            remove_if_present(&self.packs.index_path(&id))?;
            remove_if_present(&aside)?;
            removed += dropped;
        }
        self.packs.refresh(true)?;
        Ok(removed)
    }

    /// Moves the object aside, re-checks its age (a put may have refreshed it in between),
    /// then deletes it or puts it back. A put that touches it after the move finds it gone
    /// and writes it again.
    pub(super) fn delete_if_older_blocking(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let loose = self.delete_loose_if_older(kind, digest, cutoff)?;
        // A packed copy goes when the sweep rewrites its pack; counted as deleted now (the
        // sweep keeps it after all only if a put reuses it in between).
        let packed = self.mark_packed(kind, digest, cutoff)?;
        Ok(loose || packed)
    }

    pub(super) fn delete_loose_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let path = self.object_path(kind, digest);
        let young = |p: &Path| -> Result<Option<bool>> {
            match std::fs::metadata(p) {
                Ok(m) => Ok(Some(m.modified().unwrap_or(SystemTime::now()) >= cutoff)),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(format!("stat {}", p.display()), e)),
            }
        };
        if young(&path)? != Some(false) {
            return Ok(false);
        }
        let aside = path.with_file_name(format!("{TMP_PREFIX}gc-{}", digest.to_hex()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::io(format!("moving {}", path.display()), e)),
        }
        if young(&aside)? == Some(true) {
            std::fs::rename(&aside, &path)
                .map_err(|e| StoreError::io(format!("restoring {}", path.display()), e))?;
            return Ok(false);
        }
        std::fs::remove_file(&aside)
            .map_err(|e| StoreError::io(format!("removing {}", aside.display()), e))?;
        Ok(true)
    }

    pub(super) fn sweep_temp_blocking(&self, cutoff: SystemTime) -> Result<u64> {
        // The packed objects this gc marked (entries of an earlier, interrupted gc carry
        // another cutoff and are dropped: what they named may be reachable again).
        let dead: std::collections::HashSet<(Kind, B3Digest)> = {
            let mut p = self
                .pending
                .lock()
                .map_err(|_| StoreError::Backend("gc lock poisoned".into()))?;
            p.drain()
                .filter(|(_, c)| *c == cutoff)
                .map(|(k, _)| k)
                .collect()
        };
        if !dead.is_empty() {
            self.repack(&dead, Some(cutoff))?;
        }
        let merged = self.merge_small_packs(cutoff)?;
        if merged > 0 {
            tracing::info!("merged {merged} small packs");
        }
        let mut n = self.sweep_orphan_packs(cutoff)?;
        let mut dirs = vec![
            self.root.to_path_buf(),
            self.root.join("roots"),
            self.packs.dir().to_path_buf(),
        ];
        for kind in Kind::ALL {
            let top = self.root.join(kind.dir());
            dirs.extend(read_dir_names(&top)?.into_iter().map(|f| top.join(f)));
        }
        for dir in dirs {
            for name in read_dir_names(&dir)? {
                if !name.starts_with(TMP_PREFIX) {
                    continue;
                }
                let p = dir.join(&name);
                let old = std::fs::symlink_metadata(&p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old && std::fs::remove_file(&p).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl Maintenance for LocalStore {
    async fn usage(&self) -> Result<Usage> {
        let s = self.clone();
        blocking(move || s.usage_blocking()).await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let s = self.clone();
        blocking(move || s.list_blocking(kind)).await
    }

    async fn delete_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || s.delete_if_older_blocking(kind, &d, cutoff)).await
    }

    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        let (s, d) = (self.clone(), *digest);
        blocking(move || {
            remove_if_present(&s.object_path(kind, &d))?;
            if s.packs.contains(kind, &d) {
                s.repack(&[(kind, d)].into_iter().collect(), None)?;
            }
            Ok(())
        })
        .await
    }

    async fn sweep_temp(&self, cutoff: SystemTime) -> Result<u64> {
        let s = self.clone();
        blocking(move || s.sweep_temp_blocking(cutoff)).await
    }

    async fn damage(&self) -> Result<Vec<(String, String)>> {
        let s = self.clone();
        blocking(move || s.damage_blocking()).await
    }

    async fn repack(&self, level: Option<i32>) -> Result<crate::store::Repacked> {
        let s = self.clone();
        blocking(move || s.repack_all(level)).await
    }

    async fn set_aside(&self, unit: &str) -> Result<()> {
        let (s, unit) = (self.clone(), unit.to_string());
        blocking(move || s.set_aside_blocking(&unit)).await
    }
}

/// Where damaged packs are moved by a repair (not scanned, not deleted).
pub(super) const DAMAGED_DIR: &str = "damaged";

impl LocalStore {
    pub(super) fn damage_blocking(&self) -> Result<Vec<(String, String)>> {
        if !self.config.packs {
            return Ok(Vec::new());
        }
        self.packs.refresh(true)?;
        let mut out: Vec<(String, String)> = self
            .packs
            .bad()
            .into_iter()
            .map(|(id, why)| {
                let prefix = format!("pack index {id}: corrupt: ");
                let why = why.strip_prefix(&prefix).unwrap_or(&why).to_string();
                (
                    id,
                    format!("its index is damaged ({why}); the objects it lists are lost"),
                )
            })
            .collect();
        for name in read_dir_names(self.packs.dir())? {
            let Some(id) = name.strip_suffix(".idx") else {
                continue;
            };
            if !pack::is_id(id) || self.packs.pack_path(id).exists() {
                continue;
            }
            let listed = std::fs::read(self.packs.index_path(id))
                .ok()
                .and_then(|raw| pack::decode_index(id, &raw, u64::MAX).ok())
                .map_or_else(
                    || "an unreadable number of".to_string(),
                    |e| e.len().to_string(),
                );
            out.push((
                id.to_string(),
                format!("its pack file is missing ({listed} objects listed in its index are lost)"),
            ));
        }
        out.sort();
        Ok(out)
    }

    pub(super) fn set_aside_blocking(&self, unit: &str) -> Result<()> {
        if !pack::is_id(unit) {
            return Err(StoreError::Backend(format!(
                "{unit}: not a pack of this store"
            )));
        }
        let aside = self.packs.dir().join(DAMAGED_DIR);
        std::fs::create_dir_all(&aside)
            .map_err(|e| StoreError::io(format!("creating {}", aside.display()), e))?;
        for path in [self.packs.index_path(unit), self.packs.pack_path(unit)] {
            let Some(name) = path.file_name() else {
                continue;
            };
            match std::fs::rename(&path, aside.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(
                        format!("moving {} aside", path.display()),
                        e,
                    ))
                }
            }
        }
        self.packs.refresh(true)?;
        Ok(())
    }
}
