//! The mount's inode table: a pure data structure, no I/O and no FUSE types.
//!
//! Every path position gets its own inode number, so two identical files at different paths
//! are never shown as hard links. Numbers are handed out lazily, one directory at a time: when
//! a directory inode is given its listing it reserves a block of numbers, one per entry, so
//! child `i` is always `first_child + i` (readdir can name children that have no table entry
//! yet). Table entries exist only for inodes the kernel holds: each lookup (or readdirplus
//! entry) adds one reference, `forget` drops them, and an inode with no references and no
//! live children is removed. Numbers are never reused, so the generation is always 0.
//!
//! The top level of a mount that lists named roots is different: roots can be added or
//! replaced while mounted, so its children are found by name instead of by position.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::model::castore::{B3Digest, Directory, ModelError, Node};
use crate::model::times::{TimesPos, TimesRef, UNRECORDED_NS};
use crate::trees::entry_node;

/// The inode number of the mount's root.
pub const ROOT_INO: u64 = 1;

/// A directory's entries in name order, ready to serve lookups and readdir.
#[derive(Debug)]
pub struct DirView {
    pub digest: B3Digest,
    pub entries: Vec<(Bytes, Node)>,
    /// Child directories, for `st_nlink`.
    pub subdirs: u32,
}

impl DirView {
    pub fn new(digest: B3Digest, dir: &Directory) -> Result<Self, ModelError> {
        let entries = dir
            .entries()
            .map(|e| Ok((e.name().clone(), entry_node(e).map_err(model)?)))
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            digest,
            entries,
            subdirs: u32::try_from(dir.directories.len()).unwrap_or(u32::MAX),
        })
    }

    /// Index of the entry called `name`.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.entries.binary_search_by(|(n, _)| n[..].cmp(name)).ok()
    }

    /// Rough bytes held, for cache accounting.
    pub fn weight(&self) -> usize {
        64 + self
            .entries
            .iter()
            .map(|(n, node)| {
                n.len()
                    + 96
                    + match node {
                        Node::Symlink { target } => target.len(),
                        _ => 0,
                    }
            })
            .sum::<usize>()
    }
}

fn model(e: crate::store::StoreError) -> ModelError {
    match e {
        crate::store::StoreError::Model(m) => m,
        other => ModelError::Decode {
            what: "directory",
            reason: other.to_string(),
        },
    }
}

/// An inode's recorded time, and where the times of a directory's entries are (a root's
/// table and this directory's place in it), if its tree has a table. Every inode of a tree
/// shares its table's reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub mtime: i64,
    pub at: Option<(Arc<TimesRef>, TimesPos)>,
}

impl Default for Stamp {
    fn default() -> Self {
        Self {
            mtime: UNRECORDED_NS,
            at: None,
        }
    }
}

/// The times of one directory's entries, in entry order, and each entry's place in the table.
#[derive(Debug)]
pub struct BlockTimes {
    pub mtimes: Vec<i64>,
    pub children: Vec<TimesPos>,
}

/// What an inode stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The top level of a mount that shows the store's named roots.
    Roots,
    /// A node of a stored tree.
    Node(Node),
}

/// One live inode.
#[derive(Debug)]
pub struct Inode {
    pub parent: u64,
    pub kind: Kind,
    /// References the kernel holds (lookups not yet forgotten).
    pub nlookup: u64,
    /// Live child inodes; a parent stays while any child does.
    children: u64,
    /// For directories: the listing and the first number of the children's block.
    pub dir: Option<(Arc<DirView>, u64)>,
    pub stamp: Stamp,
    /// For directories with a table: their entries' times, once loaded.
    pub block: Option<Arc<BlockTimes>>,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Roots | Kind::Node(Node::Directory { .. }))
    }
}

/// All inodes the kernel currently knows.
#[derive(Debug)]
pub struct InodeTable {
    /// Boxed: a table slot is then 16 bytes, and the map, half empty after it grows, holds
    /// 128-byte records only for live inodes (55 MB for pystore's 122,756 inodes, 27 MB
    /// more while growing, when records were kept in the map itself).
    inodes: HashMap<u64, Box<Inode>>,
    /// Children of a `Roots` top level, by name, and the other way round (so a forgotten
    /// one can be unmapped).
    top: HashMap<Bytes, u64>,
    top_names: HashMap<u64, Bytes>,
    next: u64,
}

impl InodeTable {
    /// A table holding only the root inode, which is never forgotten.
    pub fn new(root: Kind, root_view: Option<Arc<DirView>>, stamp: Stamp) -> Self {
        let mut t = Self {
            inodes: HashMap::new(),
            top: HashMap::new(),
            top_names: HashMap::new(),
            next: ROOT_INO + 1,
        };
        let dir = root_view.map(|v| t.reserve(v));
        t.inodes.insert(
            ROOT_INO,
            Box::new(Inode {
                parent: ROOT_INO,
                kind: root,
                nlookup: u64::MAX / 2,
                children: 0,
                dir,
                stamp,
                block: None,
            }),
        );
        t
    }

    fn reserve(&mut self, view: Arc<DirView>) -> (Arc<DirView>, u64) {
        let first = self.next;
        self.next += view.entries.len() as u64;
        (view, first)
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino).map(|i| &**i)
    }

    /// Live inodes, the root included.
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }

    /// The inode number entry `index` of directory `parent` has (or will have).
    pub fn child_ino(&self, parent: u64, index: usize) -> Option<u64> {
        let (view, first) = self.inodes.get(&parent)?.dir.as_ref()?;
        (index < view.entries.len()).then(|| first + index as u64)
    }

    /// Records one kernel reference to entry `index` of directory `parent`, creating its
    /// inode if needed. `view` is the child's own listing when it is a directory (needed for
    /// its link count). Returns the child's number, or `None` if the parent is not a loaded
    /// directory or has no such entry.
    pub fn lookup_child(
        &mut self,
        parent: u64,
        index: usize,
        view: Option<Arc<DirView>>,
    ) -> Option<u64> {
        let ino = self.child_ino(parent, index)?;
        if let Some(has_dir) = self.inodes.get(&ino).map(|i| i.dir.is_some()) {
            let dir = match view {
                Some(v) if !has_dir => Some(self.reserve(v)),
                _ => None,
            };
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.nlookup += 1;
                if dir.is_some() {
                    inode.dir = dir;
                }
            }
            return Some(ino);
        }
        let (node, stamp) = {
            let p = self.inodes.get(&parent)?;
            let (pview, _) = p.dir.as_ref()?;
            // A child's time comes from its parent's block (loaded by the caller when the
            // tree has a table).
            let stamp = match (&p.stamp.at, &p.block) {
                (Some((table, _)), Some(b)) => Stamp {
                    mtime: *b.mtimes.get(index)?,
                    at: Some((table.clone(), *b.children.get(index)?)),
                },
                _ => Stamp::default(),
            };
            (pview.entries.get(index)?.1.clone(), stamp)
        };
        let dir = view.map(|v| self.reserve(v));
        self.inodes.insert(
            ino,
            Box::new(Inode {
                parent,
                kind: Kind::Node(node),
                nlookup: 1,
                children: 0,
                dir,
                stamp,
                block: None,
            }),
        );
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.children += 1;
        }
        Some(ino)
    }

    /// The live inode of a named root, if any.
    pub fn top_ino(&self, name: &[u8]) -> Option<u64> {
        self.top.get(name).copied()
    }

    /// Records one kernel reference to the named root `name` showing `node`. A root that was
    /// replaced by a different node gets a fresh inode; the old one lives until forgotten.
    pub fn lookup_top(
        &mut self,
        name: &Bytes,
        node: Node,
        view: Option<Arc<DirView>>,
        stamp: Stamp,
    ) -> u64 {
        if let Some(&ino) = self.top.get(name) {
            if let Some(inode) = self.inodes.get_mut(&ino) {
                if inode.kind == Kind::Node(node.clone()) && inode.stamp == stamp {
                    inode.nlookup += 1;
                    return ino;
                }
            }
        }
        let ino = self.next;
        self.next += 1;
        let dir = view.map(|v| self.reserve(v));
        self.inodes.insert(
            ino,
            Box::new(Inode {
                parent: ROOT_INO,
                kind: Kind::Node(node),
                nlookup: 1,
                children: 0,
                dir,
                stamp,
                block: None,
            }),
        );
        self.top.insert(name.clone(), ino);
        self.top_names.insert(ino, name.clone());
        if let Some(p) = self.inodes.get_mut(&ROOT_INO) {
            p.children += 1;
        }
        ino
    }

    /// Sets the stamp of inode `ino` (the root's, once its record is read).
    pub fn set_stamp(&mut self, ino: u64, stamp: Stamp) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.stamp = stamp;
        }
    }

    /// Forgets where directory `ino`'s times are (its table could not be read).
    pub fn drop_times(&mut self, ino: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.stamp.at = None;
        }
    }

    /// Keeps the loaded times of directory `ino`'s entries.
    pub fn set_block(&mut self, ino: u64, block: Arc<BlockTimes>) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.block.get_or_insert(block);
        }
    }

    /// Drops `n` kernel references; removes the inode (and, in turn, parents that were only
    /// kept for it) once nothing refers to it.
    pub fn forget(&mut self, ino: u64, n: u64) {
        self.drop_refs(ino, n);
        shrink_if_sparse(&mut self.inodes);
    }

    /// Table slots held (for tests).
    pub fn capacity(&self) -> usize {
        self.inodes.capacity()
    }

    fn drop_refs(&mut self, ino: u64, n: u64) {
        let Some(inode) = self.inodes.get_mut(&ino) else {
            return;
        };
        inode.nlookup = inode.nlookup.saturating_sub(n);
        let mut cur = ino;
        loop {
            let Some(inode) = self.inodes.get(&cur) else {
                return;
            };
            if cur == ROOT_INO || inode.nlookup > 0 || inode.children > 0 {
                return;
            }
            let parent = inode.parent;
            if let Some(name) = self.top_names.remove(&cur) {
                if self.top.get(&name) == Some(&cur) {
                    self.top.remove(&name);
                }
                shrink_if_sparse(&mut self.top_names);
            }
            self.inodes.remove(&cur);
            match self.inodes.get_mut(&parent) {
                Some(p) => p.children = p.children.saturating_sub(1),
                None => return,
            }
            cur = parent;
        }
    }
}

/// Gives memory back once a map is mostly empty (the kernel forgot what a walk made it hold:
/// 122,755 inodes took 55 MB of table). Shrinks to twice the entries left, so the next shrink
/// waits until half of those are gone too: amortised O(1) per removal.
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &[u8]) -> (Bytes, Node) {
        (
            Bytes::copy_from_slice(name.as_bytes()),
            Node::File {
                digest: B3Digest::of(content),
                size: content.len() as u64,
                executable: false,
            },
        )
    }

    fn view(entries: Vec<(Bytes, Node)>) -> Arc<DirView> {
        let subdirs = entries
            .iter()
            .filter(|(_, n)| matches!(n, Node::Directory { .. }))
            .count() as u32;
        Arc::new(DirView {
            digest: B3Digest::of(b"dir"),
            entries,
            subdirs,
        })
    }

    fn dir_node() -> Node {
        Node::Directory {
            digest: B3Digest::of(b"sub"),
            size: 1,
        }
    }

    #[test]
    fn identical_files_get_distinct_inodes() {
        let root = view(vec![file("a", b"same"), file("b", b"same")]);
        let mut t = InodeTable::new(Kind::Node(dir_node()), Some(root), Stamp::default());
        let a = t.lookup_child(ROOT_INO, 0, None).unwrap();
        let b = t.lookup_child(ROOT_INO, 1, None).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.get(a).unwrap().kind, t.get(b).unwrap().kind);
        // Readdir names the same numbers before any lookup.
        assert_eq!(t.child_ino(ROOT_INO, 0), Some(a));
        assert_eq!(t.lookup_child(ROOT_INO, 2, None), None);
    }

    #[test]
    fn lookups_are_counted_and_forget_releases() {
        let root = view(vec![file("a", b"x")]);
        let mut t = InodeTable::new(Kind::Node(dir_node()), Some(root), Stamp::default());
        assert_eq!(t.len(), 1);
        let a = t.lookup_child(ROOT_INO, 0, None).unwrap();
        assert_eq!(t.lookup_child(ROOT_INO, 0, None), Some(a));
        assert_eq!(t.get(a).unwrap().nlookup, 2);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert_eq!(t.len(), 1);
        // Forgetting the root or unknown inodes does nothing.
        t.forget(ROOT_INO, 1000);
        t.forget(999, 1);
        assert_eq!(t.len(), 1);
        // The number is stable for the path position while the parent lives.
        assert_eq!(t.lookup_child(ROOT_INO, 0, None), Some(a));
    }

    #[test]
    fn the_table_gives_memory_back_when_the_kernel_forgets() {
        let files: Vec<_> = (0..20_000)
            .map(|i| file(&format!("f{i:05}"), b"x"))
            .collect();
        let mut t = InodeTable::new(Kind::Node(dir_node()), Some(view(files)), Stamp::default());
        let inos: Vec<u64> = (0..20_000)
            .map(|i| t.lookup_child(ROOT_INO, i, None).unwrap())
            .collect();
        let full = t.capacity();
        assert!(full >= 20_000);
        for &ino in &inos[..19_900] {
            t.forget(ino, 1);
        }
        assert_eq!(t.len(), 101);
        assert!(
            t.capacity() <= 2048,
            "{} slots for 101 inodes",
            t.capacity()
        );
        // What is left still works.
        assert_eq!(t.lookup_child(ROOT_INO, 19_950, None), Some(inos[19_950]));
    }

    #[test]
    fn parents_stay_while_children_live_and_go_after() {
        let root = view(vec![(Bytes::from_static(b"d"), dir_node())]);
        let mut t = InodeTable::new(Kind::Node(dir_node()), Some(root), Stamp::default());
        let d = t
            .lookup_child(ROOT_INO, 0, Some(view(vec![file("f", b"1")])))
            .unwrap();
        let f = t.lookup_child(d, 0, None).unwrap();
        assert_eq!(t.len(), 3);
        t.forget(d, 1);
        assert!(t.get(d).is_some(), "parent kept for its live child");
        t.forget(f, 1);
        assert!(t.get(f).is_none());
        assert!(t.get(d).is_none(), "parent released with its last child");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_directory_reloaded_gets_a_new_block() {
        let root = view(vec![(Bytes::from_static(b"d"), dir_node())]);
        let mut t = InodeTable::new(Kind::Node(dir_node()), Some(root), Stamp::default());
        let d = t
            .lookup_child(ROOT_INO, 0, Some(view(vec![file("f", b"1")])))
            .unwrap();
        let f1 = t.lookup_child(d, 0, None).unwrap();
        t.forget(f1, 1);
        t.forget(d, 1);
        let d2 = t
            .lookup_child(ROOT_INO, 0, Some(view(vec![file("f", b"1")])))
            .unwrap();
        assert_eq!(d, d2, "the path position keeps its number");
        let f2 = t.lookup_child(d2, 0, None).unwrap();
        assert_ne!(f1, f2, "numbers of forgotten inodes are not reused");
    }

    #[test]
    fn top_level_by_name_and_replaced_roots() {
        let mut t = InodeTable::new(Kind::Roots, None, Stamp::default());
        let name = Bytes::from_static(b"r");
        let n1 = file("r", b"one").1;
        let n2 = file("r", b"two").1;
        let a = t.lookup_top(&name, n1.clone(), None, Stamp::default());
        assert_eq!(t.lookup_top(&name, n1, None, Stamp::default()), a);
        let b = t.lookup_top(&name, n2, None, Stamp::default());
        assert_ne!(a, b, "a replaced root is a new inode");
        assert_eq!(t.top_ino(b"r"), Some(b));
        t.forget(a, 2);
        assert!(t.get(a).is_none());
        assert_eq!(
            t.top_ino(b"r"),
            Some(b),
            "forgetting the old one keeps the new mapping"
        );
        t.forget(b, 1);
        assert_eq!(t.top_ino(b"r"), None);
        assert_eq!(t.len(), 1);
        assert!(t.top_names.is_empty() && t.top.is_empty());
    }

    #[test]
    fn an_inode_record_stays_small() {
        // A mount holds one per inode the kernel knows (122,756 after reading pystore);
        // `benches/memory.sh` measures what they cost.
        assert!(
            std::mem::size_of::<Inode>() <= 128,
            "{} bytes",
            std::mem::size_of::<Inode>()
        );
    }

    #[test]
    fn wide_walk_returns_to_start() {
        let entries: Vec<_> = (0..10_000)
            .map(|i| file(&format!("f{i:05}"), b"x"))
            .collect();
        let mut t = InodeTable::new(
            Kind::Node(dir_node()),
            Some(view(entries)),
            Stamp::default(),
        );
        let inos: Vec<u64> = (0..10_000)
            .map(|i| t.lookup_child(ROOT_INO, i, None).unwrap())
            .collect();
        assert_eq!(t.len(), 10_001);
        for ino in inos {
            t.forget(ino, 1);
        }
        assert_eq!(t.len(), 1);
    }
}
