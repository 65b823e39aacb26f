//! Writing objects: staged (into this process's pack, or temp files beside their names), made durable together by one syncfs, then committed.

#[allow(unused_imports)]
use super::*;

/// Writes `data` under `path` atomically: temp file beside it, fsync, rename. An existing
/// object is left alone (objects are content-addressed, so it holds the same bytes).
pub fn write_atomic(path: &Path, data: &[u8], replace: bool) -> Result<()> {
    if !replace && path.exists() {
        return Ok(());
    }
    let mut tmp = temp_beside(path)?;
    let ctx = |e| StoreError::io(format!("writing {}", path.display()), e);
    tmp.write_all(data).map_err(ctx)?;
    tmp.as_file().sync_data().map_err(ctx)?;
    tmp.persist(path).map_err(|e| ctx(e.error))?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx)?;
    }
    Ok(())
}

/// Creates a temp file beside `path`, creating the fan-out directory on first use.
pub(super) fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = path
        .parent()
        .ok_or_else(|| StoreError::Backend(format!("{} has no parent", path.display())))?;
    let make = || tempfile::Builder::new().prefix(TMP_PREFIX).tempfile_in(dir);
    match make() {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
            make().map_err(|e| StoreError::io(format!("temp file in {}", dir.display()), e))
        }
        Err(e) => Err(StoreError::io(format!("temp file in {}", dir.display()), e)),
    }
}

impl LocalStore {
    /// Stages an object for the next flush: added to this process's pack (packed stores;
    /// small objects into its open compression group), or written to a temp file beside its
    /// final path. `plain` is the object itself (a chunk uncompressed). An object already
    /// stored or already staged is left alone.
    pub(super) fn stage(&self, kind: Kind, digest: &B3Digest, plain: &[u8]) -> Result<()> {
        if self.reuse(kind, digest)? {
            return Ok(());
        }
        let group = self.config.packs && pack::grouped(self.config.group_bytes, plain.len());
        // A chunk stored alone is compressed alone, before any lock is taken.
        let alone;
        let data = if kind == Kind::Chunk && !group {
            alone = encode_chunk(plain, self.config.zstd_level)
                .map_err(|e| StoreError::io(format!("compressing chunk {digest}"), e))?;
            &alone[..]
        } else {
            plain
        };
        if self.config.packs {
            let (full, job) = {
                let mut st = self.lock_staged()?;
                // Another thread may have staged it, or staged and flushed it, since `reuse`
                // (the index alone is not proof: its pack may be one a gc has removed).
                if st.packed.contains(&(kind, *digest)) || self.touch_packed(kind, digest)? {
                    return Ok(());
                }
                let writer = match &mut st.pack {
                    Some(w) => w,
                    None => st.pack.insert(
                        PackWriter::new(self.packs.dir(), TMP_PREFIX)?
                            .with_groups(self.config.group_bytes, self.config.zstd_level),
                    ),
                };
                let job = if group {
                    writer.add_grouped_deferred(kind, *digest, data)?
                } else {
                    writer.append(kind, *digest, data)?;
                    None
                };
                let bytes = writer.bytes();
                st.packed.insert((kind, *digest));
                st.ever = true;
                let full = bytes >= STAGE_MAX_BYTES || st.packed.len() >= STAGE_MAX_OBJECTS;
                (full, job)
            };
            // A full group is compressed without the lock, so the import's threads compress
            // at once (under it, one core did all the grouped objects' compression).
            if let Some(job) = job {
                let frame = job.compress()?;
                if let Some(writer) = &mut self.lock_staged()?.pack {
                    writer.finish_seal(&job, &frame)?;
                }
            }
            if full {
                self.flush_blocking()?;
            }
            return Ok(());
        }
        let path = self.object_path(kind, digest);
        let mut tmp = temp_beside(&path)?;
        tmp.write_all(data)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        let tmp = tmp.into_temp_path();
        let full = {
            let mut st = self.lock_staged()?;
            if st.objects.contains_key(&path) {
                return Ok(());
            }
            st.objects.insert(path, tmp);
            st.ever = true;
            st.bytes += data.len() as u64;
            st.bytes >= STAGE_MAX_BYTES || st.objects.len() >= STAGE_MAX_OBJECTS
        };
        if full {
            self.flush_blocking()?;
        }
        Ok(())
    }

    pub(super) fn lock_staged(&self) -> Result<std::sync::MutexGuard<'_, Staged>> {
        self.staged
            .lock()
            .map_err(|_| StoreError::Backend("staged-object lock poisoned".into()))
    }

    /// Makes every staged object durable (one `syncfs`), renames them into place, and makes
    /// the renames durable (a second `syncfs`).
    pub fn flush_blocking(&self) -> Result<()> {
        let mut st = self.lock_staged()?;
        if let Some(writer) = st.pack.take() {
            // Nothing is staged any more, even if the commit fails (a long-lived daemon must
            // not later skip these objects as "staged" and record a root without them).
            st.packed.clear();
            if !writer.is_empty() {
                let (id, entries) = writer.commit(TMP_PREFIX)?;
                self.packs.add(&id, &entries)?;
            }
        }
        if st.objects.is_empty() {
            return Ok(());
        }
        self.syncfs()?;
        for (path, tmp) in st.objects.drain() {
            tmp.persist(&path).map_err(|e| {
                StoreError::io(format!("renaming into {}", path.display()), e.error)
            })?;
        }
        st.bytes = 0;
        drop(st);
        self.syncfs()
    }

    pub(super) fn syncfs(&self) -> Result<()> {
        let dir = std::fs::File::open(&*self.root)
            .map_err(|e| StoreError::io(format!("opening {}", self.root.display()), e))?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(StoreError::io(
                format!("syncfs {}", self.root.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}
