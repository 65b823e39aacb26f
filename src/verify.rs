//! `granary verify`: re-hash every chunk, check every blob against its digest, decode and
//! validate every directory, check every root's closure is complete; and optionally repair
//! damaged or missing objects from another store.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::StreamExt;

use crate::castore::{B3Digest, Node};
use crate::store::{BlobReader, ObjectKind, Result, Store, StoreError};

/// One damaged or missing object and the roots that reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ObjectKind,
    pub digest: B3Digest,
    pub reason: String,
    pub roots: BTreeSet<String>,
}

#[derive(Default)]
struct Findings {
    problems: BTreeMap<(u8, B3Digest), Problem>,
}

impl Findings {
    fn add(&mut self, kind: ObjectKind, digest: B3Digest, reason: String, root: Option<&str>) {
        let p = self
            .problems
            .entry((kind as u8, digest))
            .or_insert_with(|| Problem {
                kind,
                digest,
                reason,
                roots: BTreeSet::new(),
            });
        if let Some(r) = root {
            p.roots.insert(r.to_string());
        }
    }
}

/// Reads a whole blob; on failure says which object is at fault.
async fn check_blob(store: &Store, blob: &B3Digest) -> Option<(ObjectKind, B3Digest, String)> {
    let meta = match store.blobs.stat(blob).await {
        Ok(Some(m)) => m,
        Ok(None) => return Some((ObjectKind::Chunk, *blob, "missing blob".into())),
        Err(e) => return Some((ObjectKind::BlobIndex, *blob, e.to_string())),
    };
    let single = meta.chunks.len() == 1 && meta.chunks[0].digest == *blob;
    for c in &meta.chunks {
        match store.blobs.read_chunk(&c.digest).await {
            Ok(Some(b)) if b.len() as u64 == c.size => {}
            Ok(Some(b)) => {
                return Some((
                    ObjectKind::BlobIndex,
                    *blob,
                    format!(
                        "chunk {} is {} bytes, index says {}",
                        c.digest,
                        b.len(),
                        c.size
                    ),
                ))
            }
            Ok(None) => return Some((ObjectKind::Chunk, c.digest, "missing chunk".into())),
            Err(e) => return Some((ObjectKind::Chunk, c.digest, e.to_string())),
        }
    }
    if single {
        return None;
    }
    let reader = match BlobReader::with_meta(store.blobs.clone(), *blob, meta).await {
        Ok(r) => r,
        Err(e) => return Some((ObjectKind::BlobIndex, *blob, e.to_string())),
    };
    let mut s = Box::pin(reader.stream());
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            return Some((ObjectKind::BlobIndex, *blob, e.to_string()));
        }
    }
    None
}

/// Verifies the named roots (all roots if empty), then every stored chunk and directory
/// (when the backend can list them and no roots were named).
pub async fn verify(store: &Store, only: &[String]) -> Result<Vec<Problem>> {
    let mut f = Findings::default();
    let names = if only.is_empty() {
        store.roots.list().await?
    } else {
        only.to_vec()
    };
    let mut blobs_ok: HashSet<B3Digest> = HashSet::new();
    let mut dirs_ok: HashSet<B3Digest> = HashSet::new();
    let mut chunks_seen: HashSet<B3Digest> = HashSet::new();
    for name in &names {
        let root = match store.roots.get(name).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(StoreError::Backend(format!("no root named {name:?}")));
            }
            Err(e) => {
                tracing::error!("root {name}: {e}");
                continue;
            }
        };
        let mut todo = Vec::new();
        match &root.node {
            Node::Directory { digest, .. } => todo.push(*digest),
            Node::File { digest, .. } => {
                if let Some((k, d, why)) = check_blob(store, digest).await {
                    f.add(k, d, why, Some(name));
                }
            }
            Node::Symlink { .. } => {}
        }
        while let Some(d) = todo.pop() {
            let dir = match store.dirs.get(&d).await {
                Ok(Some(dir)) => dir,
                Ok(None) => {
                    f.add(
                        ObjectKind::Directory,
                        d,
                        "missing directory".into(),
                        Some(name),
                    );
                    continue;
                }
                Err(e) => {
                    f.add(ObjectKind::Directory, d, e.to_string(), Some(name));
                    continue;
                }
            };
            dirs_ok.insert(d);
            for e in &dir.directories {
                let c = B3Digest::try_from(&e.digest[..])?;
                // A missing or corrupt child is reported when visited.
                if let Ok(Some(child)) = store.dirs.get(&c).await {
                    if let Err(err) = crate::castore::Directory::check_child(e, &child) {
                        f.add(ObjectKind::Directory, d, err.to_string(), Some(name));
                    }
                }
                todo.push(c);
            }
            for file in &dir.files {
                let b = B3Digest::try_from(&file.digest[..])?;
                // Already known bad: this root is affected too.
                if let Some(p) = f.problems.values_mut().find(|p| p.digest == b) {
                    p.roots.insert(name.clone());
                    continue;
                }
                if blobs_ok.contains(&b) {
                    continue;
                }
                match check_blob(store, &b).await {
                    Some((k, dg, why)) => f.add(k, dg, why, Some(name)),
                    None => {
                        blobs_ok.insert(b);
                        if let Ok(Some(m)) = store.blobs.stat(&b).await {
                            chunks_seen.extend(m.chunks.iter().map(|c| c.digest));
                        }
                    }
                }
            }
        }
    }
    if only.is_empty() {
        if let Some(maint) = &store.maintenance {
            let listed = match maint.list(ObjectKind::Chunk).await {
                Ok(v) => v,
                Err(e) => {
                    // E.g. through a daemon: the roots' closures were still checked.
                    tracing::warn!("not scanning unreferenced objects: {e}");
                    return Ok(f.problems.into_values().collect());
                }
            };
            for obj in listed {
                if chunks_seen.contains(&obj.digest) {
                    continue;
                }
                match store.blobs.read_chunk(&obj.digest).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {}
                    Err(e) => f.add(ObjectKind::Chunk, obj.digest, e.to_string(), None),
                }
            }
            for obj in maint.list(ObjectKind::Directory).await? {
                if dirs_ok.contains(&obj.digest) {
                    continue;
                }
                if let Err(e) = store.dirs.get(&obj.digest).await {
                    f.add(ObjectKind::Directory, obj.digest, e.to_string(), None);
                }
            }
        }
    }
    Ok(f.problems.into_values().collect())
}

/// Replaces each damaged or missing object with a verified copy from `from`. Returns the
/// problems it could not repair.
pub async fn repair(store: &Store, from: &Store, problems: &[Problem]) -> Result<Vec<Problem>> {
    let maint = store.maintenance.as_ref();
    let mut left = Vec::new();
    // Chunks first, then blob indexes, then directories (children before parents: the
    // donor's closure order is not known, so retry directories until no progress).
    let mut ordered: Vec<&Problem> = problems.iter().collect();
    ordered.sort_by_key(|p| p.kind as u8);
    let mut pending_dirs = Vec::new();
    for p in ordered {
        let res: Result<bool> = async {
            match p.kind {
                ObjectKind::Chunk => {
                    // A "missing blob" may be a single-chunk blob: same digest either way.
                    let Some(data) = from.blobs.read_chunk(&p.digest).await? else {
                        return Ok(false);
                    };
                    if let Some(m) = maint {
                        m.remove(ObjectKind::Chunk, &p.digest).await?;
                    }
                    store.blobs.put_chunk(p.digest, data).await?;
                    Ok(true)
                }
                ObjectKind::BlobIndex => {
                    let Some(meta) = from.blobs.stat(&p.digest).await? else {
                        return Ok(false);
                    };
                    for c in &meta.chunks {
                        if !matches!(store.blobs.read_chunk(&c.digest).await, Ok(Some(_))) {
                            let Some(data) = from.blobs.read_chunk(&c.digest).await? else {
                                return Ok(false);
                            };
                            if let Some(m) = maint {
                                m.remove(ObjectKind::Chunk, &c.digest).await?;
                            }
                            store.blobs.put_chunk(c.digest, data).await?;
                        }
                    }
                    if let Some(m) = maint {
                        m.remove(ObjectKind::BlobIndex, &p.digest).await?;
                    }
                    if meta.chunks.len() > 1 {
                        store
                            .blobs
                            .put_blob_index(p.digest, &meta.to_index())
                            .await?;
                    }
                    Ok(true)
                }
                ObjectKind::Directory => {
                    pending_dirs.push(p);
                    Ok(true)
                }
            }
        }
        .await;
        if !matches!(res, Ok(true)) {
            left.push(p.clone());
        }
    }
    loop {
        let before = pending_dirs.len();
        let mut still = Vec::new();
        for p in pending_dirs {
            let ok = async {
                let Some(dir) = from.dirs.get(&p.digest).await? else {
                    return Ok::<bool, StoreError>(false);
                };
                if let Some(m) = maint {
                    m.remove(ObjectKind::Directory, &p.digest).await?;
                }
                Ok(store.dirs.put(&dir).await? == p.digest)
            }
            .await;
            if !matches!(ok, Ok(true)) {
                still.push(p);
            }
        }
        pending_dirs = still;
        if pending_dirs.is_empty() || pending_dirs.len() == before {
            break;
        }
    }
    left.extend(pending_dirs.into_iter().cloned());
    store.flush().await?;
    Ok(left)
}
