//! File attributes: what `stat` shows for each inode, and how long the kernel may keep it.

#[allow(unused_imports)]
use super::*;

impl Inner {
    pub(super) fn attr(&self, ino: u64, inode: &Inode) -> FileAttr {
        let (kind, perm, size, nlink) = match &inode.kind {
            Kind::Roots => (
                FileType::Directory,
                if self.listable { 0o555 } else { 0o111 },
                0,
                2,
            ),
            Kind::Node(Node::Directory { .. }) => {
                let (entries, subdirs) = inode
                    .dir
                    .as_ref()
                    .map_or((0, 0), |(v, _)| (v.entries.len() as u64, v.subdirs));
                (
                    FileType::Directory,
                    0o555,
                    entries,
                    2u32.saturating_add(subdirs),
                )
            }
            Kind::Node(Node::File {
                size, executable, ..
            }) => (
                FileType::RegularFile,
                if *executable { 0o555 } else { 0o444 },
                *size,
                1,
            ),
            Kind::Node(Node::Symlink { target }) => {
                (FileType::Symlink, 0o777, target.len() as u64, 1)
            }
        };
        let (mut uid, mut gid, mut perm) = (self.uid, self.gid, perm);
        if let (Some(nix), Kind::Roots) = (&self.nix, &inode.kind) {
            (uid, gid, perm) = (0, nix.gid, 0o1775);
        }
        // Recorded at import where the root has a table; mtime 1 (as in a Nix store) where
        // not. Nothing here changes, so ctime and atime are the same.
        let time = crate::model::times::system_time(inode.stamp.mtime);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    pub(super) fn ttl(&self, inode: &Inode) -> Duration {
        let top_level = inode.parent == ROOT_INO && self.roots_top;
        if top_level || matches!(inode.kind, Kind::Roots) {
            TOP_TTL
        } else {
            TREE_TTL
        }
    }

    /// Attributes of a live inode.
    pub(super) fn attr_of(&self, ino: u64) -> Result<(FileAttr, Duration), Errno> {
        let table = lock(&self.table);
        let inode = table.get(ino).ok_or(Errno::ENOENT)?;
        Ok((self.attr(ino, inode), self.ttl(inode)))
    }
}
