//! Garbage collection: mark every object reachable from the named roots, sweep the rest.
//!
//! Safe beside concurrent imports: an object modified after `min(mark start, now - grace)`
//! is never deleted, and a put that reuses an existing object refreshes its time (see
//! [`crate::store::Maintenance`]), so an import never ends up with a root pointing at an
//! object this sweep removed — provided no import runs longer than the grace period.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::model::castore::{B3Digest, Node};
use crate::store::{ObjectKind, Result, Store, StoreError};

/// The objects reachable from a set of roots.
#[derive(Debug, Default)]
pub struct Marks {
    pub chunks: HashSet<B3Digest>,
    pub blob_indexes: HashSet<B3Digest>,
    pub dirs: HashSet<B3Digest>,
}

impl Marks {
    fn contains(&self, kind: ObjectKind, d: &B3Digest) -> bool {
        match kind {
            ObjectKind::Chunk => self.chunks.contains(d),
            ObjectKind::BlobIndex => self.blob_indexes.contains(d),
            ObjectKind::Directory => self.dirs.contains(d),
        }
    }
}

/// Marks a blob: its index (if it has one) and its chunks.
async fn mark_blob(store: &Store, blob: &B3Digest, marks: &mut Marks) -> Result<()> {
    let meta = store
        .blobs
        .stat(blob)
        .await?
        .ok_or_else(|| StoreError::not_found("blob", blob))?;
    if !(meta.chunks.is_empty() || meta.chunks.len() == 1 && meta.chunks[0].digest == *blob) {
        marks.blob_indexes.insert(*blob);
    }
    marks.chunks.extend(meta.chunks.iter().map(|c| c.digest));
    Ok(())
}

/// Marks everything reachable from `node`. A missing object is an error: gc must not sweep
/// a store whose roots are already broken (run `granary verify`).
pub async fn mark_node(store: &Store, node: &Node, marks: &mut Marks) -> Result<()> {
    let mut blobs_seen = HashSet::new();
    let mut todo = Vec::new();
    match node {
        Node::Directory { digest, .. } => todo.push(*digest),
        Node::File { digest, .. } => return mark_blob(store, digest, marks).await,
        Node::Symlink { .. } => return Ok(()),
    }
    while let Some(d) = todo.pop() {
        if !marks.dirs.insert(d) {
            continue;
        }
        let dir = crate::trees::get_dir(store, &d).await?;
        for e in &dir.directories {
            todo.push(B3Digest::try_from(&e.digest[..])?);
        }
        for f in &dir.files {
            let b = B3Digest::try_from(&f.digest[..])?;
            if blobs_seen.insert(b) {
                mark_blob(store, &b, marks).await?;
            }
        }
    }
    Ok(())
}

/// Marks everything a root keeps: its tree, its table of times and its traces.
pub async fn mark_root(
    store: &Store,
    root: &crate::model::castore::RootRecord,
    marks: &mut Marks,
) -> Result<()> {
    mark_node(store, &root.node, marks).await?;
    if let Some(t) = &root.times {
        mark_blob(store, &t.digest, marks)
            .await
            .map_err(|e| StoreError::Backend(format!("times table: {e}")))?;
    }
    for t in &root.traces {
        mark_blob(store, &t.digest, marks)
            .await
            .map_err(|e| StoreError::Backend(format!("trace {}: {e}", t.name)))?;
    }
    Ok(())
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub kept: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Unreachable but too young to delete.
    pub young: u64,
    pub temp_files: u64,
}

/// Runs a gc. With `dry_run`, only reports what would be deleted.
pub async fn gc(store: &Store, grace: Duration, dry_run: bool) -> Result<GcReport> {
    gc_with(store, grace, dry_run, &super::Steps::default()).await
}

/// [`gc`], counting roots marked and then objects swept in `steps`.
pub async fn gc_with(
    store: &Store,
    grace: Duration,
    dry_run: bool,
    steps: &super::Steps,
) -> Result<GcReport> {
    let maint = store.maintenance.as_ref().ok_or_else(|| {
        StoreError::Backend(format!(
            "{}: this backend cannot list its objects",
            store.url
        ))
    })?;
    let mark_start = SystemTime::now();
    let cutoff = mark_start
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .min(mark_start);
    let mut marks = Marks::default();
    let names = store.roots.list().await?;
    steps.start("marking roots", names.len() as u64);
    for name in names {
        steps.step();
        // A root deleted since the listing is simply not marked.
        let Some(root) = store.roots.get(&name).await? else {
            continue;
        };
        mark_root(store, &root, &mut marks)
            .await
            .map_err(|e| StoreError::Backend(format!("root {name}: {e}; not collecting")))?;
    }
    let mut report = GcReport::default();
    steps.start("sweeping objects", 0);
    for kind in ObjectKind::ALL {
        for obj in maint.list(kind).await? {
            steps.step();
            if marks.contains(kind, &obj.digest) {
                report.kept += 1;
            } else if obj.modified >= cutoff {
                report.young += 1;
            } else if dry_run || maint.delete_if_older(kind, &obj.digest, cutoff).await? {
                report.deleted += 1;
                report.deleted_bytes += obj.stored_bytes;
            } else {
                report.young += 1;
            }
        }
    }
    if !dry_run {
        report.temp_files = maint.sweep_temp(cutoff).await?;
    }
    Ok(report)
}
