//! Opens through the file cache: a file whose verified copy is in the cache is handed to the
//! kernel (FUSE passthrough), which then reads and maps it like a local file; any other file is
//! opened as usual and, if the cache wants it, copied into the cache in the background from
//! verified chunks, for its next open.

#[allow(unused_imports)]
use super::*;

/// Bytes copied into the file cache per step.
const FILL_STEP: usize = 4 << 20;

impl Inner {
    /// Records an open through the mount's own reads.
    pub(super) fn note_open(&self, ino: u64) {
        if self.passthrough_wanted {
            lock(&self.io_modes).entry(ino).or_default().cached += 1;
        }
    }

    /// Ends one open of `ino`; the last passthrough open gives its backing file back.
    pub(super) fn note_release(&self, ino: u64, fh: u64) {
        if !self.passthrough_wanted {
            return;
        }
        let mut modes = lock(&self.io_modes);
        let Some(m) = modes.get_mut(&ino) else {
            return;
        };
        if fh == FH_PASSTHROUGH {
            if let Some((_, n)) = &mut m.pass {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.pass = None;
                }
            }
        } else {
            m.cached = m.cached.saturating_sub(1);
        }
        if m.cached == 0 && m.pass.is_none() {
            modes.remove(&ino);
        }
    }

    /// Answers an open with passthrough when the file cache holds the file verified, else as
    /// usual. The kernel refuses to mix the two on one inode, so while the inode is open the
    /// mode of its first open holds.
    pub(super) async fn open_through_cache(
        self: &Arc<Self>,
        ino: u64,
        file: Arc<OpenFile>,
        reply: ReplyOpen,
    ) {
        let Some(cache) = self.file_cache.clone() else {
            self.note_open(ino);
            return reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE);
        };
        let ask_cache = {
            let mut modes = lock(&self.io_modes);
            let m = modes.entry(ino).or_default();
            if let Some((id, n)) = &mut m.pass {
                *n += 1;
                Stats::add(&self.stats.passthrough_opens, 1);
                return reply.opened_passthrough(
                    FileHandle(FH_PASSTHROUGH),
                    FopenFlags::empty(),
                    id,
                );
            }
            m.cached == 0 && cache.wants(file.size)
        };
        let cached = if ask_cache {
            let (c, digest, size) = (cache.clone(), file.digest, file.size);
            tokio::task::spawn_blocking(move || c.get(&digest, size))
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let mut modes = lock(&self.io_modes);
        let m = modes.entry(ino).or_default();
        if let Some((id, n)) = &mut m.pass {
            *n += 1;
            Stats::add(&self.stats.passthrough_opens, 1);
            return reply.opened_passthrough(FileHandle(FH_PASSTHROUGH), FopenFlags::empty(), id);
        }
        match cached {
            Some(f) if m.cached == 0 => match reply.open_backing(&*f) {
                Ok(id) => {
                    let id = Arc::new(id);
                    m.pass = Some((id.clone(), 1));
                    Stats::add(&self.stats.passthrough_opens, 1);
                    return reply.opened_passthrough(
                        FileHandle(FH_PASSTHROUGH),
                        FopenFlags::empty(),
                        &id,
                    );
                }
                Err(e) => {
                    // Without CAP_SYS_ADMIN, or a backing file the kernel will not stack on.
                    tracing::warn!(
                        "FUSE passthrough refused ({e}); files are read through the mount"
                    );
                    self.passthrough.store(false, Ordering::Relaxed);
                }
            },
            Some(_) => {}
            None if ask_cache => self.fill_file_cache(cache, file),
            None => {}
        }
        m.cached += 1;
        reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE)
    }

    /// Copies a file into the file cache in the background, from verified chunks.
    fn fill_file_cache(self: &Arc<Self>, cache: Arc<FileCache>, file: Arc<OpenFile>) {
        if !cache.start_fill(&file.digest) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = this.fills.clone().acquire_owned().await;
            let copied = this.copy_out(&cache, &file).await;
            let digest = file.digest;
            let done = tokio::task::spawn_blocking(move || match copied {
                Ok(tmp) => cache.finish_fill(&digest, Some(tmp)),
                Err((tmp, e)) => {
                    if let Some(path) = tmp {
                        let _ = std::fs::remove_file(path);
                    }
                    let _ = cache.finish_fill(&digest, None);
                    Err(std::io::Error::other(format!("copying out: {e}")))
                }
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("file cache: {digest}: {e}"),
                Err(e) => tracing::debug!("file cache: {digest}: {e}"),
            }
        });
    }

    /// The file's content in a temporary file of the cache directory; on failure, the reason
    /// and the temporary file to remove, if it was made.
    async fn copy_out(
        &self,
        cache: &Arc<FileCache>,
        file: &OpenFile,
    ) -> Result<(PathBuf, std::fs::File), (Option<PathBuf>, String)> {
        let layout = file
            .layout
            .get_or_try_init(|| self.chunks.layout(&file.digest, file.size))
            .await
            .map_err(|e| (None, e.to_string()))?
            .clone();
        let (c, digest) = (cache.clone(), file.digest);
        let (path, mut out) = tokio::task::spawn_blocking(move || c.create_tmp(&digest))
            .await
            .map_err(|e| (None, e.to_string()))?
            .map_err(|e| (None, e.to_string()))?;
        let failed = |e: String| (Some(path.clone()), e);
        let mut offset = 0;
        while offset < file.size {
            let data = self
                .chunks
                .read(&layout, offset, FILL_STEP)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if data.is_empty() {
                return Err(failed(format!("no bytes at {offset} of {}", file.size)));
            }
            offset += data.len() as u64;
            out = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                out.write_all(&data).map(|()| out)
            })
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        }
        Ok((path, out))
    }
}
