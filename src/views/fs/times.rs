//! Recorded modification times for the mount: a directory's entries' times read from its
//! root's table (just that directory's block, through the chunk cache, verified like any file
//! content) the first time they are needed, and a root's own time. A table that cannot be read
//! leaves mtime 1 (with a warning) rather than an error: times are not content.

#[allow(unused_imports)]
use super::*;

use crate::model::castore::RootRecord;
use crate::model::times::{self, TimesPos, TimesRef};
use inode::{BlockTimes, Stamp};

/// Most records of times-table heads a mount keeps (8 MiB).
const HEADS_MAX_RECORDS: usize = 1 << 20;

/// The heads of times tables that root records carry, by table, and their records in all.
#[derive(Default)]
pub(super) struct Heads {
    by_table: HashMap<B3Digest, Arc<[i64]>>,
    records: usize,
}

impl Inner {
    /// Records `index..index + n` of `table`: from the head its root record carries where it
    /// holds them, else read.
    async fn read_times(&self, table: &TimesRef, index: u64, n: u64) -> Result<Vec<i64>, Errno> {
        if let Some(head) = lock(&self.times_heads).by_table.get(&table.digest) {
            let end = index.checked_add(n).and_then(|e| usize::try_from(e).ok());
            if let Some(records) = end.and_then(|e| head.get(index as usize..e)) {
                self.stats.times_from_head.fetch_add(1, Ordering::Relaxed);
                return Ok(records.to_vec());
            }
        }
        self.stats.times_read.fetch_add(1, Ordering::Relaxed);
        let what = || format!("times table {}", table.digest);
        let len = n
            .checked_mul(times::RECORD)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| eio(&what(), "block too large"))?;
        let layout = self
            .chunks
            .layout(&table.digest, table.size)
            .await
            .map_err(|e| eio(&what(), e))?;
        let bytes = self
            .chunks
            .read(&layout, times::offset_of(index), len)
            .await
            .map_err(|e| eio(&what(), e))?;
        if bytes.len() != len {
            return Err(eio(&what(), "shorter than its tree"));
        }
        Ok(times::decode_records(&bytes))
    }

    /// The times of directory `ino`'s entries: `None` if its tree has no table.
    pub(super) async fn block_times(&self, ino: u64) -> Result<Option<Arc<BlockTimes>>, Errno> {
        let (at, view) = {
            let table = lock(&self.table);
            let inode = table.get(ino).ok_or(Errno::ENOENT)?;
            if let Some(b) = &inode.block {
                return Ok(Some(b.clone()));
            }
            match (inode.stamp.at.clone(), &inode.dir) {
                (Some(at), Some((view, _))) => (at, view.clone()),
                _ => return Ok(None),
            }
        };
        let (table, pos) = at;
        let n = view.entries.len() as u64;
        let mtimes = match self.read_times(&table, pos.block, n).await {
            Ok(m) => m,
            // Times are not content: a table that cannot be read (a backend that is gone, an
            // offline cache that never saw it) leaves this directory's entries at mtime 1
            // rather than making them unreachable. Said once; not retried for this inode.
            Err(_) => {
                tracing::warn!(
                    "times table {}: unreadable; entries of this directory show mtime 1",
                    table.digest
                );
                lock(&self.table).drop_times(ino);
                return Ok(None);
            }
        };
        let block = Arc::new(BlockTimes {
            mtimes,
            children: pos.children(view.entries.iter().map(|(_, node)| node)),
        });
        lock(&self.table).set_block(ino, block.clone());
        Ok(Some(block))
    }

    /// The stamp of a tree's top at `pos` of `table` (checked by the caller to fit the root).
    pub(super) async fn top_stamp(&self, at: Option<(TimesRef, TimesPos)>) -> Result<Stamp, Errno> {
        let Some((table, pos)) = at else {
            return Ok(Stamp::default());
        };
        match self.read_times(&table, pos.index, 1).await {
            Ok(mtime) => Ok(Stamp {
                mtime: mtime.first().copied().unwrap_or(times::UNRECORDED_NS),
                at: Some((Arc::new(table), pos)),
            }),
            Err(_) => {
                tracing::warn!(
                    "times table {}: unreadable; this tree shows mtime 1",
                    table.digest
                );
                Ok(Stamp::default())
            }
        }
    }

    /// The stamp of a named root, remembered for the top-level listing.
    pub(super) async fn root_stamp(&self, rec: &RootRecord) -> Result<Stamp, Errno> {
        let at = rec.times.filter(|t| fits(t, &rec.node));
        if let Some(t) = &at {
            if !rec.times_head.is_empty() {
                let mut heads = lock(&self.times_heads);
                // Bounded: past it (tens of thousands of roots with wide tops), a root's
                // first lookups read its table as a record without a head does.
                if heads.records + rec.times_head.len() <= HEADS_MAX_RECORDS
                    && !heads.by_table.contains_key(&t.digest)
                {
                    heads.records += rec.times_head.len();
                    heads
                        .by_table
                        .insert(t.digest, Arc::from(&rec.times_head[..]));
                }
            }
        }
        let stamp = self.top_stamp(at.map(|t| (t, TimesPos::TOP))).await?;
        lock(&self.root_stamps).insert(Bytes::from(rec.name.clone().into_bytes()), stamp.clone());
        Ok(stamp)
    }

    /// The remembered stamp of the named root `name`.
    pub(super) fn known_root_stamp(&self, name: &[u8]) -> Stamp {
        lock(&self.root_stamps)
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}

/// Whether a root's table fits its tree; a table that does not is ignored (mtime 1), said once
/// per table in the log.
pub(super) fn fits(table: &TimesRef, node: &Node) -> bool {
    if table.fits(node) {
        return true;
    }
    tracing::warn!(
        "times table {} ({} bytes) does not fit its tree; showing mtime 1",
        table.digest,
        table.size
    );
    false
}
