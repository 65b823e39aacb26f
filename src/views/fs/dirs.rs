//! Directories for the mount: views loaded from the store (cached, prefetched a level ahead in batches), lookups, and listings of trees and of the top level.

#[allow(unused_imports)]
use super::*;

impl Inner {
    /// One request's whole answer within the deadline, however many backend calls it takes
    /// (each has the deadline too, but several in a row must not add up).
    pub(super) async fn within<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, Errno>>,
    ) -> Result<T, Errno> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(eio(
                &what(),
                format!("no answer within {:.1}s", self.deadline.as_secs_f64()),
            )),
        }
    }

    pub(super) async fn deadline<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, Errno> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(eio(&what(), e)),
            Err(_) => Err(eio(
                &what(),
                format!("timed out after {:.1}s", self.deadline.as_secs_f64()),
            )),
        }
    }

    /// The listing of a stored directory, from the cache or the store.
    pub(super) async fn dir_view(&self, digest: B3Digest) -> Result<Arc<DirView>, Errno> {
        if digest == self.empty_view.digest {
            return Ok(self.empty_view.clone());
        }
        if let Some(t) = &self.tracer {
            t.on_dir(digest);
        }
        if let Some(v) = lock(&self.dirs).0.get(&digest) {
            return Ok(v.clone());
        }
        let what = || format!("directory {digest}");
        Stats::add(&self.stats.dir_calls, 1);
        Stats::add(&self.stats.dirs_loaded, 1);
        let dir = self
            .deadline(what, self.store.dirs.get(&digest))
            .await?
            .ok_or_else(|| eio(&what(), "missing from the store"))?;
        self.keep_view(digest, &dir)
    }

    /// Makes the view of a fetched directory and keeps it in the cache.
    pub(super) fn keep_view(
        &self,
        digest: B3Digest,
        dir: &crate::model::castore::Directory,
    ) -> Result<Arc<DirView>, Errno> {
        let what = || format!("directory {digest}");
        let view = Arc::new(DirView::new(digest, dir).map_err(|e| eio(&what(), e))?);
        let mut guard = lock(&self.dirs);
        let (cache, bytes) = &mut *guard;
        if cache.put(digest, view.clone()).is_none() {
            *bytes += view.weight();
        }
        while *bytes > self.dir_cache_bytes {
            match cache.pop_lru() {
                Some((_, old)) => *bytes -= old.weight(),
                None => break,
            }
        }
        self.chunks.set_other_bytes(*bytes);
        Ok(view)
    }

    /// The views of those of `nodes` that are directories (`None` for the others), the
    /// uncached ones fetched as one batch.
    pub(super) async fn views_of(
        &self,
        nodes: &[&Node],
    ) -> Vec<Result<Option<Arc<DirView>>, Errno>> {
        let mut out: Vec<Result<Option<Arc<DirView>>, Errno>> = Vec::with_capacity(nodes.len());
        let mut missing = Vec::new();
        {
            let mut guard = lock(&self.dirs);
            for (i, node) in nodes.iter().enumerate() {
                out.push(Ok(None));
                if let Node::Directory { digest, .. } = node {
                    if let Some(t) = &self.tracer {
                        t.on_dir(*digest);
                    }
                    if *digest == self.empty_view.digest {
                        out[i] = Ok(Some(self.empty_view.clone()));
                        continue;
                    }
                    match guard.0.get(digest) {
                        Some(v) => out[i] = Ok(Some(v.clone())),
                        None => missing.push((i, *digest)),
                    }
                }
            }
        }
        if missing.is_empty() {
            return out;
        }
        let digests: Vec<B3Digest> = missing.iter().map(|(_, d)| *d).collect();
        Stats::add(&self.stats.dir_calls, 1);
        Stats::add(&self.stats.dirs_loaded, digests.len());
        let got = match tokio::time::timeout(self.deadline, self.store.dirs.get_many(digests)).await
        {
            Ok(got) if got.len() == missing.len() => got,
            Ok(_) => {
                let e = eio("directory batch", "the backend answered the wrong count");
                return nodes.iter().map(|_| Err(e)).collect();
            }
            Err(_) => {
                let why = format!("timed out after {:.1}s", self.deadline.as_secs_f64());
                let e = eio("directory batch", why);
                return nodes.iter().map(|_| Err(e)).collect();
            }
        };
        for ((i, digest), res) in missing.into_iter().zip(got) {
            let what = || format!("directory {digest}");
            out[i] = match res {
                Ok(Some(dir)) => self.keep_view(digest, &dir).map(Some),
                Ok(None) => Err(eio(&what(), "missing from the store")),
                Err(e) => Err(eio(&what(), e)),
            };
        }
        out
    }

    /// A walk lists a directory's subdirectories next: load the directories below `views`
    /// in the background, as one batch, so those listings find their children cached.
    pub(super) fn prefetch_views(self: &Arc<Self>, views: &[Arc<DirView>]) {
        let wanted: Vec<B3Digest> = {
            let guard = lock(&self.dirs);
            views
                .iter()
                .flat_map(|v| v.entries.iter())
                .filter_map(|(_, n)| match n {
                    Node::Directory { digest, .. } if !guard.0.contains(digest) => Some(*digest),
                    _ => None,
                })
                .take(VIEW_PREFETCH)
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let Ok(permit) = self.dir_prefetch.clone().try_acquire_owned() else {
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            Stats::add(&this.stats.prefetch_calls, 1);
            Stats::add(&this.stats.dirs_prefetched, wanted.len());
            let fetch = this.store.dirs.get_many(wanted.clone());
            // Failures are met (and reported) again by the listing that needs the directory.
            if let Ok(got) = tokio::time::timeout(this.deadline, fetch).await {
                for (digest, res) in wanted.into_iter().zip(got) {
                    if let Ok(Some(dir)) = res {
                        let _ = this.keep_view(digest, &dir);
                    }
                }
            }
        });
    }

    pub(super) async fn view_of(&self, node: &Node) -> Result<Option<Arc<DirView>>, Errno> {
        match node {
            Node::Directory { digest, .. } => Ok(Some(self.dir_view(*digest).await?)),
            _ => Ok(None),
        }
    }
}

impl Inner {
    pub(super) async fn lookup(
        &self,
        parent: u64,
        name: Bytes,
    ) -> Result<(FileAttr, Duration), Errno> {
        enum Parent {
            Roots,
            Dir(Arc<DirView>),
        }
        let p = {
            let table = lock(&self.table);
            let inode = table.get(parent).ok_or(Errno::ENOENT)?;
            match (&inode.kind, &inode.dir) {
                (Kind::Roots, _) => Parent::Roots,
                (_, Some((view, _))) => Parent::Dir(view.clone()),
                _ => return Err(Errno::ENOTDIR),
            }
        };
        match p {
            Parent::Roots => {
                let Ok(text) = std::str::from_utf8(&name) else {
                    return Err(Errno::ENOENT);
                };
                if validate_root_name(text).is_err() {
                    return Err(Errno::ENOENT);
                }
                if self.nix.is_some() {
                    if name[..] == *NIX_LINKS {
                        let (node, view) = self.links_entry();
                        let mut table = lock(&self.table);
                        let ino =
                            table.lookup_top(&name, node, Some(view), inode::Stamp::default());
                        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                        return Ok((self.attr(ino, inode), TOP_TTL));
                    }
                    if parse_basename(text).is_err() {
                        return Err(Errno::ENOENT);
                    }
                }
                let what = || format!("root {text:?}");
                let rec = self
                    .deadline(what, self.store.roots.get(text))
                    .await?
                    .ok_or(Errno::ENOENT)?;
                let view = self.view_of(&rec.node).await?;
                let stamp = self.root_stamp(&rec).await?;
                let mut table = lock(&self.table);
                let ino = table.lookup_top(&name, rec.node, view, stamp);
                let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                Ok((self.attr(ino, inode), TOP_TTL))
            }
            Parent::Dir(pview) => {
                let index = pview.find(&name).ok_or(Errno::ENOENT)?;
                let view = self.view_of(&pview.entries[index].1).await?;
                self.block_times(parent).await?;
                let mut table = lock(&self.table);
                let ino = table
                    .lookup_child(parent, index, view)
                    .ok_or(Errno::ENOENT)?;
                let inode = table.get(ino).ok_or(Errno::ENOENT)?;
                Ok((self.attr(ino, inode), self.ttl(inode)))
            }
        }
    }

    /// The top-level listing: every named root and what it points at.
    pub(super) async fn list_roots(&self) -> Result<Vec<(Bytes, Node)>, Errno> {
        let names = self
            .deadline(|| "listing roots".into(), self.store.roots.list())
            .await?;
        let recs: Vec<_> = stream::iter(names)
            .map(|n| async move {
                let what = || format!("root {n:?}");
                let Some(r) = self.deadline(what, self.store.roots.get(&n)).await? else {
                    return Ok(None);
                };
                self.root_stamp(&r).await?;
                Ok::<_, Errno>(Some((Bytes::from(n.into_bytes()), r.node)))
            })
            .buffered(DIR_CONCURRENCY)
            .collect()
            .await;
        // A root deleted between list and get is simply not shown.
        let mut list = recs
            .into_iter()
            .filter_map(|r| r.transpose())
            .collect::<Result<Vec<_>, Errno>>()?;
        if self.nix.is_some() {
            // Only store paths belong in a Nix store; `.links` sorts before every one of them.
            list.retain(|(n, _)| std::str::from_utf8(n).is_ok_and(|t| parse_basename(t).is_ok()));
            list.insert(0, (Bytes::from_static(NIX_LINKS), self.links_entry().0));
        }
        Ok(list)
    }

    /// Nix's `.links`: an empty directory.
    pub(super) fn links_entry(&self) -> (Node, Arc<DirView>) {
        let node = Node::Directory {
            digest: self.empty_view.digest,
            size: 0,
        };
        (node, self.empty_view.clone())
    }

    /// The listing a readdir of `ino` at `offset` works from. The top level is a snapshot:
    /// per open handle, or (without opendir) taken afresh whenever a reader starts at 0.
    pub(super) async fn entries(&self, ino: u64, fh: u64, offset: u64) -> Result<Listing, Errno> {
        let parent = {
            let table = lock(&self.table);
            let inode = table.get(ino).ok_or(Errno::ENOENT)?;
            match (&inode.kind, &inode.dir) {
                (Kind::Roots, _) => inode.parent,
                (_, Some((view, first))) => {
                    return Ok(Listing::Dir(view.clone(), *first, inode.parent))
                }
                _ => return Err(Errno::ENOTDIR),
            }
        };
        if let Some(l) = lock(&self.listings).get(&fh) {
            return Ok(Listing::Roots(l.clone(), parent));
        }
        if !self.listable {
            return Err(Errno::EACCES);
        }
        let cached = if offset == 0 {
            None
        } else {
            lock(&self.top_listing).clone()
        };
        let l = match cached {
            Some(l) => l,
            None => {
                let l = Arc::new(self.list_roots().await?);
                *lock(&self.top_listing) = Some(l.clone());
                l
            }
        };
        Ok(Listing::Roots(l, parent))
    }
}
pub(super) enum Listing {
    /// Top-level snapshot and the parent's inode.
    Roots(RootListing, u64),
    /// A directory's view, its children's first number, the parent's inode.
    Dir(Arc<DirView>, u64, u64),
}

pub(super) fn file_type(node: &Node) -> FileType {
    match node {
        Node::Directory { .. } => FileType::Directory,
        Node::File { .. } => FileType::RegularFile,
        Node::Symlink { .. } => FileType::Symlink,
    }
}
