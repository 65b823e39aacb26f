//! The fuser `Filesystem`: each method builds one future over the operations in the sibling modules and replies once; every modifying operation is `EROFS`.

#[allow(unused_imports)]
use super::*;

/// Replies to an xattr request honouring the size protocol (0 asks for the length).
pub(super) fn reply_xattr(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, Errno>) {
    match data {
        Err(e) => reply.error(e),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(d) => reply.data(&d),
    }
}

impl Filesystem for GranaryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for flag in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // Always readdirplus, never READDIRPLUS_AUTO: under AUTO the kernel asks for the
            // rest of a directory too big for one reply with plain readdir and then looks up
            // every entry of it one by one (pystore: 23,400 lookups in a `find`, +15% time).
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_SPLICE_WRITE,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            }
        }
        // Passthrough needs an answer to every open, so it excludes no-open. A stacking depth
        // of 1 lets the backing files be on any plain filesystem and an overlay (the sandbox)
        // go on top of this mount.
        let passthrough = self.inner.passthrough_wanted
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        if self.inner.passthrough_wanted && !passthrough {
            tracing::info!(
                "the kernel offers no FUSE passthrough; files are read through the mount"
            );
        }
        self.inner.passthrough.store(passthrough, Ordering::Relaxed);
        self.inner.no_open.store(
            !passthrough
                && config
                    .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                    .is_ok(),
            Ordering::Relaxed,
        );
        self.inner.no_opendir.store(
            config
                .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
                .is_ok(),
            Ordering::Relaxed,
        );
        let bg = u16::try_from(self.max_reads.clamp(16, 1024)).unwrap_or(1024);
        let _ = config.set_max_background(bg);
        let _ = config.set_congestion_threshold(bg * 3 / 4);
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let inner = self.inner.clone();
        let name = Bytes::copy_from_slice(name.as_bytes());
        self.run(Op::Lookup, async move {
            let what = || format!("lookup of {:?}", String::from_utf8_lossy(&name));
            match inner
                .within(what, inner.lookup(parent.0, name.clone()))
                .await
            {
                Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.stats.count(Op::Forget);
        let (gone, live) = {
            let mut table = lock(&self.inner.table);
            table.forget(ino.0, nlookup);
            (table.get(ino.0).is_none(), table.len() as u64)
        };
        if gone {
            lock(&self.inner.files).pop(&ino.0);
        }
        // Once the kernel has forgotten half the inodes (and many), their memory goes back.
        let mark = self
            .inner
            .trim_mark
            .fetch_max(live, Ordering::Relaxed)
            .max(live);
        if live * 2 < mark && mark - live >= TRIM_AFTER_FORGETTING {
            self.inner.trim_mark.store(live, Ordering::Relaxed);
            super::trim_heap();
        }
    }

    // batch_forget: fuser's default calls `forget` for each inode (its `ForgetOne` type is
    // not nameable outside the crate).

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.inner.stats.count(Op::Getattr);
        match self.inner.attr_of(ino.0) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.inner.stats.count(Op::Readlink);
        let table = lock(&self.inner.table);
        match table.get(ino.0).map(|i| &i.kind) {
            Some(Kind::Node(Node::Symlink { target })) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let file = if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            Err(Errno::EROFS)
        } else {
            self.inner.open_file(ino.0)
        };
        if let Ok(file) = &file {
            if self.inner.passthrough.load(Ordering::Relaxed) {
                let (inner, file) = (self.inner.clone(), file.clone());
                return self.run(Op::Open, async move {
                    inner.open_through_cache(ino.0, file, reply).await;
                });
            }
        }
        self.inner.stats.count(Op::Open);
        match file {
            Err(e) => reply.error(e),
            Ok(_) if self.inner.no_open.load(Ordering::Relaxed) => reply.error(Errno::ENOSYS),
            Ok(_) => {
                self.inner.note_open(ino.0);
                reply.opened(FileHandle(FH_CACHED), FopenFlags::FOPEN_KEEP_CACHE)
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.inner.open_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let inner = self.inner.clone();
        self.run(Op::Read, async move {
            let what = || format!("read of inode {} at {offset}", ino.0);
            match inner
                .within(what, inner.read(ino.0, file, offset, size))
                .await
            {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush; ENOSYS tells the kernel not to ask again (close needs no round trip).
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.inner.note_release(ino.0, fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let is_roots = match lock(&self.inner.table).get(ino.0) {
            None => return reply.error(Errno::ENOENT),
            Some(i) if !i.is_dir() => return reply.error(Errno::ENOTDIR),
            Some(i) => matches!(i.kind, Kind::Roots),
        };
        if self.inner.no_opendir.load(Ordering::Relaxed) && (!is_roots || self.inner.listable) {
            return reply.error(Errno::ENOSYS);
        }
        if !is_roots {
            return reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            );
        }
        if !self.inner.listable {
            return reply.error(Errno::EACCES);
        }
        let inner = self.inner.clone();
        self.run(Op::Opendir, async move {
            match inner.list_roots().await {
                Ok(list) => {
                    let fh = inner.next_fh.fetch_add(1, Ordering::Relaxed);
                    lock(&inner.listings).insert(fh, Arc::new(list));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inner = self.inner.clone();
        self.run(Op::Readdir, async move {
            let listing = match inner.entries(ino.0, fh.0, offset).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            // Offsets: 1 and 2 are "." and "..", entry i is at i + 3.
            let (parent, n) = match &listing {
                Listing::Roots(l, p) => (*p, l.len()),
                Listing::Dir(v, _, p) => (*p, v.entries.len()),
            };
            if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset < 2 && reply.add(INodeNo(parent), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            let table = lock(&inner.table);
            for i in (offset.saturating_sub(2) as usize)..n {
                let (name, node, child) = match &listing {
                    Listing::Roots(l, _) => {
                        let (name, node) = &l[i];
                        // Roots not looked up yet have no number; any unused one will do.
                        let child = table.top_ino(name).unwrap_or(u64::MAX - i as u64);
                        (name, node, child)
                    }
                    Listing::Dir(v, first, _) => {
                        (&v.entries[i].0, &v.entries[i].1, first + i as u64)
                    }
                };
                if reply.add(
                    INodeNo(child),
                    i as u64 + 3,
                    file_type(node),
                    OsStr::from_bytes(name),
                ) {
                    break;
                }
            }
            drop(table);
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let inner = self.inner.clone();
        self.run(Op::Readdirplus, async move {
            let listing = match inner.entries(ino.0, fh.0, offset).await {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            let (parent, entries): (u64, &[(Bytes, Node)]) = match &listing {
                Listing::Roots(l, p) => (*p, &l[..]),
                Listing::Dir(v, _, p) => (*p, &v.entries[..]),
            };
            let start = offset.saturating_sub(2) as usize;
            // A reply holds at most a few hundred entries; load the child directories those
            // need (for their link counts) all at once.
            let window: Vec<usize> = (start..entries.len().min(start + 512)).collect();
            let nodes: Vec<&Node> = window.iter().map(|&i| &entries[i].1).collect();
            let views = inner.views_of(&nodes).await;
            let loaded: Vec<Arc<DirView>> = views
                .iter()
                .filter_map(|v| v.clone().ok().flatten())
                .collect();
            inner.prefetch_views(&loaded);
            if let (0, Listing::Dir(v, ..), true) = (offset, &listing, inner.remote) {
                let mut listed: Vec<&DirView> = vec![v];
                listed.extend(loaded.iter().map(|v| &**v));
                inner.prefetch_listing(&listed);
            }
            if let Listing::Dir(..) = listing {
                if let Err(e) = inner.block_times(ino.0).await {
                    return reply.error(e);
                }
            }
            let mut table = lock(&inner.table);
            let self_attr = match table.get(ino.0) {
                Some(i) => inner.attr(ino.0, i),
                None => return reply.error(Errno::ENOENT),
            };
            if offset < 1 && reply.add(ino, 1, ".", &TREE_TTL, &self_attr, Generation(0)) {
                return reply.ok();
            }
            if offset < 2 {
                let pattr = table
                    .get(parent)
                    .map_or(self_attr, |i| inner.attr(parent, i));
                if reply.add(INodeNo(parent), 2, "..", &TREE_TTL, &pattr, Generation(0)) {
                    return reply.ok();
                }
            }
            for (i, view) in window.into_iter().zip(views) {
                let view = match view {
                    Ok(v) => v,
                    // A root whose tree cannot be loaded is left out of the top level (and
                    // gives EIO by name); the other roots are still listed.
                    Err(_) if matches!(listing, Listing::Roots(..)) => continue,
                    // Entries before a broken child are still served; the error comes with
                    // the next call, which starts at that child.
                    Err(e) if i == start => return reply.error(e),
                    Err(_) => break,
                };
                let (name, node) = &entries[i];
                let (child, ttl) = match &listing {
                    Listing::Roots(..) => {
                        let stamp = inner.known_root_stamp(name);
                        (table.lookup_top(name, node.clone(), view, stamp), TOP_TTL)
                    }
                    Listing::Dir(..) => match table.lookup_child(ino.0, i, view) {
                        Some(c) => (c, TREE_TTL),
                        None => break,
                    },
                };
                let Some(cinode) = table.get(child) else {
                    break;
                };
                let attr = inner.attr(child, cinode);
                if reply.add(
                    INodeNo(child),
                    i as u64 + 3,
                    OsStr::from_bytes(name),
                    &ttl,
                    &attr,
                    Generation(0),
                ) {
                    // Not sent: the kernel holds no reference for it.
                    table.forget(child, 1);
                    break;
                }
            }
            drop(table);
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.inner.listings).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.inner.stats.count(Op::Statfs);
        let files = lock(&self.inner.table).len() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.inner.stats.count(Op::Xattr);
        reply_xattr(reply, size, self.inner.xattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.inner.stats.count(Op::Xattr);
        reply_xattr(reply, size, self.inner.xattr_names(ino.0));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.inner.stats.count(Op::Access);
        if lock(&self.inner.table).get(ino.0).is_none() {
            reply.error(Errno::ENOENT)
        } else if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }

    // Everything below would modify the tree: the mount is read-only.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
