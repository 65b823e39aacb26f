//! File content for the mount: per-inode read state, reads through the chunk cache, prefetch of what a reader is likely to read next, and xattrs.

#[allow(unused_imports)]
use super::*;

impl Inner {
    /// The read state of a file inode. It is kept per inode rather than per open handle, so
    /// it also serves kernels that skip `open` (`FUSE_NO_OPEN_SUPPORT`); it goes with the
    /// inode on `forget`.
    pub(super) fn open_file(&self, ino: u64) -> Result<Arc<OpenFile>, Errno> {
        if let Some(f) = lock(&self.files).get(&ino) {
            return Ok(f.clone());
        }
        let (digest, size) = {
            let table = lock(&self.table);
            match &table.get(ino).ok_or(Errno::ENOENT)?.kind {
                Kind::Node(Node::File { digest, size, .. }) => (*digest, *size),
                Kind::Node(Node::Directory { .. }) | Kind::Roots => return Err(Errno::EISDIR),
                Kind::Node(Node::Symlink { .. }) => return Err(Errno::ELOOP),
            }
        };
        let file = Arc::new(OpenFile {
            digest,
            size,
            layout: tokio::sync::OnceCell::new(),
            next: AtomicU64::new(u64::MAX),
        });
        Ok(lock(&self.files).get_or_insert(ino, || file).clone())
    }

    /// Whole-tree readers (tar, cp -r, rsync) read a directory's files one after another:
    /// when a file is first read, fetch the next few siblings' first chunks in the background.
    pub(super) fn prefetch_siblings(&self, ino: u64) {
        if self.tracer.as_ref().is_some_and(|t| t.replay_leads()) {
            return;
        }
        let found = {
            let table = lock(&self.table);
            let Some(parent) = table.get(ino).map(|i| i.parent) else {
                return;
            };
            let Some((view, first)) = table.get(parent).and_then(|p| p.dir.as_ref()) else {
                return;
            };
            ino.checked_sub(*first)
                .map(|i| (view.clone(), i as usize + 1))
        };
        if let Some((view, from)) = found {
            self.prefetch_files(&view, from, SIBLING_PREFETCH);
        }
    }

    /// Over a remote store, a listing fetches the one-chunk files of the directory and of
    /// its subdirectories (up to [`LISTING_PREFETCH_BYTES`]) as one batch: a walk that reads
    /// (`tar`, a build) then finds them cached one level ahead of it, where a file at a time
    /// would cost a round trip each. (Not over a local store: there a plain `find` would pay
    /// for reading files it never opens; see [`SIBLING_PREFETCH`].)
    pub(super) fn prefetch_listing(&self, views: &[&DirView]) {
        if self.tracer.as_ref().is_some_and(|t| t.replay_leads()) {
            return;
        }
        let mut bytes = 0u64;
        let mut wanted = Vec::new();
        'views: for v in views {
            for (_, node) in &v.entries {
                let Node::File { digest, size, .. } = node else {
                    continue;
                };
                let Some(c) = self.chunks.single_chunk(digest, *size) else {
                    continue;
                };
                if bytes + size > LISTING_PREFETCH_BYTES {
                    break 'views;
                }
                bytes += size;
                wanted.push(c);
            }
        }
        self.chunks.prefetch_chunks(wanted);
    }

    /// Starts fetching the first chunks of the files among the `n` entries of `view` from
    /// index `from`.
    pub(super) fn prefetch_files(&self, view: &DirView, from: usize, n: usize) {
        let blobs: Vec<_> = view
            .entries
            .iter()
            .skip(from)
            .take(n)
            .filter_map(|(_, node)| match node {
                Node::File { digest, size, .. } if *size > 0 => Some((*digest, *size)),
                _ => None,
            })
            .collect();
        if !blobs.is_empty() {
            self.chunks.prefetch_blobs(blobs);
        }
    }

    pub(super) async fn read(
        &self,
        ino: u64,
        file: Arc<OpenFile>,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, Errno> {
        if offset == 0 {
            self.prefetch_siblings(ino);
        }
        let _permit = self.reads.acquire().await.map_err(|_| Errno::EIO)?;
        let layout = file
            .layout
            .get_or_try_init(|| self.chunks.layout(&file.digest, file.size))
            .await
            .map_err(|_| Errno::EIO)?
            .clone();
        // A sequential read starts the window after it before waiting for its own bytes.
        let end = offset.saturating_add(size as u64).min(file.size);
        let prev = file.next.swap(end, Ordering::Relaxed);
        if prev == offset && end < file.size {
            self.chunks.prefetch(layout.clone(), end);
        }
        self.chunks
            .read(&layout, offset, size as usize)
            .await
            .map_err(|_| Errno::EIO)
    }

    pub(super) fn xattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        if name.as_bytes() == XATTR_DIGEST.as_bytes() {
            if let Kind::Node(n) = &inode.kind {
                if let Some(d) = n.digest() {
                    return Ok(d.to_hex().into_bytes());
                }
            }
        } else if name.as_bytes() == XATTR_TIMES.as_bytes() {
            if let Some((table, _)) = &inode.stamp.at {
                return Ok(table.digest.to_hex().into_bytes());
            }
        } else if name.as_bytes() == trace::XATTR_TRACE.as_bytes() && ino == ROOT_INO {
            if let Some(t) = &self.tracer {
                return Ok(t.render().into_bytes());
            }
        } else if name.as_bytes() == XATTR_INODES.as_bytes() && ino == ROOT_INO {
            return Ok(table.len().to_string().into_bytes());
        } else if name.as_bytes() == XATTR_OPS.as_bytes() && ino == ROOT_INO {
            let mut extra: Vec<(String, u64)> = match &self.file_cache {
                Some(c) => vec![
                    (
                        "file_cache_filled".into(),
                        c.stats.filled.load(Ordering::Relaxed),
                    ),
                    (
                        "file_cache_rejected".into(),
                        c.stats.rejected.load(Ordering::Relaxed),
                    ),
                ],
                None => Vec::new(),
            };
            // Object-storage requests of this process ("s3_get_requests" ...), for benchmarks.
            extra.extend(
                crate::store::request_counts()
                    .into_iter()
                    .map(|(k, v)| (k.to_lowercase().replace(' ', "_"), v)),
            );
            let (budget, listings) = self.chunks.budget();
            extra.push(("cache_budget_bytes".into(), budget as u64));
            extra.push(("listing_cache_bytes".into(), listings as u64));
            extra.extend(super::heap_figures());
            let extra: Vec<(&str, u64)> = extra.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let text = self.stats.render(self.chunks.cached_bytes(), &extra);
            return Ok(text.into_bytes());
        }
        Err(Errno::NO_XATTR)
    }

    pub(super) fn xattr_names(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        let mut out = Vec::new();
        if let Kind::Node(Node::Directory { .. } | Node::File { .. }) = &inode.kind {
            out.extend_from_slice(XATTR_DIGEST.as_bytes());
            out.push(0);
        }
        if inode.stamp.at.is_some() {
            out.extend_from_slice(XATTR_TIMES.as_bytes());
            out.push(0);
        }
        if ino == ROOT_INO {
            out.extend_from_slice(XATTR_INODES.as_bytes());
            out.push(0);
            out.extend_from_slice(XATTR_OPS.as_bytes());
            out.push(0);
            if self.tracer.is_some() {
                out.extend_from_slice(trace::XATTR_TRACE.as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }
}
