//! `granary verify`: re-hash every chunk, check every blob against its digest, decode and
//! validate every directory and blob index, check every root record and every root's closure;
//! and optionally repair damaged or missing objects from another store.
//!
//! Every problem names what is at fault — a chunk, a blob index, a directory, a whole blob
//! whose objects are all gone, a root record, or a pack file — and the roots that reach it.
//! Repair copies what is missing or damaged from another store (verified), sets damaged pack
//! files aside once nothing of theirs is missing, and is repeated by the caller until it makes
//! no progress, so it walks into the closure of what it restored.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use futures::StreamExt;

use crate::model::castore::{B3Digest, Directory, Node};
use crate::model::times::{self, TimesRef};
use crate::store::{BlobMeta, BlobReader, ObjectKind, Result, Store, StoreError};

/// What a problem is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Object(ObjectKind, B3Digest),
    /// A blob of which nothing is stored: neither a chunk nor a blob index under its digest.
    Blob(B3Digest),
    /// A root record that cannot be read.
    Root(String),
    /// A storage unit (a pack file) damaged as a whole.
    Pack(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Object(k, d) => write!(f, "{} {d}", k.what()),
            Subject::Blob(d) => write!(f, "blob {d}"),
            Subject::Root(n) => write!(f, "root {n}"),
            Subject::Pack(id) => write!(f, "pack {id}"),
        }
    }
}

/// One damaged or missing thing and the roots that reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub subject: Subject,
    pub reason: String,
    pub roots: BTreeSet<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)?;
        match &self.subject {
            Subject::Root(_) | Subject::Pack(_) => Ok(()),
            _ if self.roots.is_empty() => write!(f, " (roots: none)"),
            _ => {
                let roots: Vec<&str> = self.roots.iter().map(String::as_str).collect();
                write!(f, " (roots: {})", roots.join(","))
            }
        }
    }
}

#[derive(Default)]
struct Findings {
    problems: BTreeMap<Subject, Problem>,
}

impl Findings {
    fn add(&mut self, subject: Subject, reason: String, root: Option<&str>) {
        let p = self
            .problems
            .entry(subject.clone())
            .or_insert_with(|| Problem {
                subject,
                reason,
                roots: BTreeSet::new(),
            });
        if let Some(r) = root {
            p.roots.insert(r.to_string());
        }
    }

    /// Whether anything about blob `b` (its index, its chunks when known) was found bad;
    /// if so `root` is added to those problems.
    fn touch_blob(&mut self, b: &B3Digest, chunks: &[B3Digest], root: &str) -> bool {
        let mut hit = false;
        for p in self.problems.values_mut() {
            let about = match &p.subject {
                Subject::Object(_, d) | Subject::Blob(d) => d == b || chunks.contains(d),
                _ => false,
            };
            if about {
                p.roots.insert(root.to_string());
                hit = true;
            }
        }
        hit
    }
}

/// Every problem of blob `blob`, `size` bytes as its directory entry says: all its damaged
/// or missing chunks (not just the first), a damaged or missing index, content that does
/// not hash to the digest. Empty if it reads back whole and right.
async fn check_blob(
    store: &Store,
    blob: &B3Digest,
    size: u64,
) -> (Vec<(Subject, String)>, Vec<B3Digest>) {
    let params = store.params();
    let meta = match store.blobs.stat(blob).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            // Which object should have been there follows from the size the chunker saw.
            let subject = if size <= u64::from(params.min) {
                Subject::Object(ObjectKind::Chunk, *blob)
            } else if size > u64::from(params.max) {
                Subject::Object(ObjectKind::BlobIndex, *blob)
            } else {
                Subject::Blob(*blob)
            };
            let why = match subject {
                Subject::Blob(_) => "missing: neither its chunk nor its blob index is stored",
                _ => "missing",
            };
            return (vec![(subject, why.into())], vec![]);
        }
        Err(StoreError::Corrupt { what, reason, .. }) => {
            let kind = if what == "chunk" {
                ObjectKind::Chunk
            } else {
                ObjectKind::BlobIndex
            };
            return (
                vec![(Subject::Object(kind, *blob), format!("corrupt: {reason}"))],
                vec![],
            );
        }
        Err(e) => {
            return (
                vec![(Subject::Object(ObjectKind::BlobIndex, *blob), e.to_string())],
                vec![],
            )
        }
    };
    let chunks: Vec<B3Digest> = meta.chunks.iter().map(|c| c.digest).collect();
    let mut found = Vec::new();
    if meta.size != size {
        found.push((
            Subject::Blob(*blob),
            format!("is {} bytes, its directory entry records {size}", meta.size),
        ));
        return (found, chunks);
    }
    let mut chunks_ok = true;
    for c in &meta.chunks {
        let reason = match store.blobs.read_chunk(&c.digest).await {
            Ok(Some(b)) if b.len() as u64 == c.size => continue,
            Ok(Some(b)) => {
                found.push((
                    Subject::Object(ObjectKind::BlobIndex, *blob),
                    format!(
                        "lists chunk {} as {} bytes; it is {}",
                        c.digest,
                        c.size,
                        b.len()
                    ),
                ));
                chunks_ok = false;
                continue;
            }
            Ok(None) => "missing".to_string(),
            Err(StoreError::Corrupt { reason, .. }) => format!("corrupt: {reason}"),
            Err(e) => e.to_string(),
        };
        chunks_ok = false;
        found.push((Subject::Object(ObjectKind::Chunk, c.digest), reason));
    }
    if chunks_ok && meta.chunks.len() > 1 {
        if let Some(why) = check_content(store, blob, meta).await {
            found.push((Subject::Object(ObjectKind::BlobIndex, *blob), why));
        }
    }
    (found, chunks)
}

/// Reads a multi-chunk blob whole; why it is wrong, if it is.
async fn check_content(store: &Store, blob: &B3Digest, meta: BlobMeta) -> Option<String> {
    let reader = match BlobReader::with_meta(store.blobs.clone(), *blob, meta).await {
        Ok(r) => r,
        Err(StoreError::Corrupt { reason, .. }) => return Some(reason),
        Err(e) => return Some(e.to_string()),
    };
    let mut s = Box::pin(reader.stream());
    while let Some(item) = s.next().await {
        match item {
            Err(StoreError::Corrupt { reason, .. }) => return Some(reason),
            Err(e) => return Some(e.to_string()),
            Ok(_) => {}
        }
    }
    None
}

/// Verifies the named roots (all roots if empty), then — when no roots were named and the
/// backend can list its objects — the store's storage units and every stored object.
pub async fn verify(store: &Store, only: &[String]) -> Result<Vec<Problem>> {
    verify_with(store, only, &super::Steps::default()).await
}

/// [`verify`], counting the roots checked in `steps`.
pub async fn verify_with(
    store: &Store,
    only: &[String],
    steps: &super::Steps,
) -> Result<Vec<Problem>> {
    let mut f = Findings::default();
    let names = if only.is_empty() {
        store.roots.list().await?
    } else {
        only.to_vec()
    };
    steps.start("roots", names.len() as u64);
    if only.is_empty() {
        if let Some(m) = &store.maintenance {
            for (unit, why) in m.damage().await? {
                f.add(Subject::Pack(unit), why, None);
            }
        }
    }
    let mut blobs_ok: HashSet<B3Digest> = HashSet::new();
    let mut dirs_ok: HashSet<B3Digest> = HashSet::new();
    let mut chunks_seen: HashSet<B3Digest> = HashSet::new();
    for name in &names {
        steps.step();
        let root = match store.roots.get(name).await {
            Ok(Some(r)) => r,
            Ok(None) if !only.is_empty() => {
                return Err(StoreError::Backend(format!("no root named {name:?}")));
            }
            // Removed since the listing.
            Ok(None) => continue,
            Err(e) => {
                let why = match e {
                    StoreError::Corrupt { reason, .. } => format!("cannot be read: {reason}"),
                    other => format!("cannot be read: {other}"),
                };
                f.add(Subject::Root(name.clone()), why, None);
                continue;
            }
        };
        let mut todo = Vec::new();
        let mut files: Vec<(B3Digest, u64)> = Vec::new();
        match &root.node {
            Node::Directory { digest, .. } => todo.push(*digest),
            Node::File { digest, size, .. } => files.push((*digest, *size)),
            Node::Symlink { .. } => {}
        }
        // The table of times is checked like a file of the tree, and must fit the tree.
        if let Some(t) = &root.times {
            if !t.fits(&root.node) {
                f.add(
                    Subject::Root(name.clone()),
                    format!(
                        "times table {} is {} bytes, not the {} of its tree",
                        t.digest,
                        t.size,
                        crate::model::times::TimesRef::expected_size(&root.node).unwrap_or(0)
                    ),
                    None,
                );
            } else if let Some(i) = head_disagrees(store, t, &root.times_head).await {
                let why = format!("the head of times table {} it keeps", t.digest);
                f.add(
                    Subject::Root(name.clone()),
                    format!("{why} disagrees with the table at record {i}"),
                    None,
                );
            }
            files.push((t.digest, t.size));
        }
        // Traces are checked like files too (their content is checked when read).
        files.extend(root.traces.iter().map(|t| (t.digest, t.size)));
        while let Some(d) = todo.pop() {
            let dir = match store.dirs.get(&d).await {
                Ok(Some(dir)) => dir,
                Ok(None) => {
                    f.add(
                        Subject::Object(ObjectKind::Directory, d),
                        "missing".into(),
                        Some(name),
                    );
                    continue;
                }
                Err(e) => {
                    let why = match e {
                        StoreError::Corrupt { reason, .. } => format!("corrupt: {reason}"),
                        other => other.to_string(),
                    };
                    f.add(Subject::Object(ObjectKind::Directory, d), why, Some(name));
                    continue;
                }
            };
            dirs_ok.insert(d);
            for e in &dir.directories {
                let c = B3Digest::try_from(&e.digest[..])?;
                // A missing or corrupt child is reported when visited.
                if let Ok(Some(child)) = store.dirs.get(&c).await {
                    if let Err(err) = Directory::check_child(e, &child) {
                        f.add(
                            Subject::Object(ObjectKind::Directory, d),
                            err.to_string(),
                            Some(name),
                        );
                    }
                }
                todo.push(c);
            }
            for file in &dir.files {
                files.push((B3Digest::try_from(&file.digest[..])?, file.size));
            }
        }
        for (b, size) in files {
            if blobs_ok.contains(&b) {
                continue;
            }
            let (found, chunks) = check_blob(store, &b, size).await;
            if found.is_empty() {
                if f.touch_blob(&b, &chunks, name) {
                    continue;
                }
                blobs_ok.insert(b);
                chunks_seen.extend(chunks);
            } else {
                for (subject, why) in found {
                    f.add(subject, why, Some(name));
                }
            }
        }
    }
    if only.is_empty() {
        if let Some(maint) = &store.maintenance {
            scan_objects(store, maint.as_ref(), &mut f, &chunks_seen, &dirs_ok).await;
        }
    }
    Ok(f.problems.into_values().collect())
}

/// Checks every stored object the roots did not reach (they may be garbage, or reached by a
/// root being written): chunks re-hashed, blob indexes and directories decoded.
async fn scan_objects(
    store: &Store,
    maint: &dyn crate::store::Maintenance,
    f: &mut Findings,
    chunks_seen: &HashSet<B3Digest>,
    dirs_ok: &HashSet<B3Digest>,
) {
    let corrupt = |e: StoreError| match e {
        StoreError::Corrupt { reason, .. } => format!("corrupt: {reason}"),
        other => other.to_string(),
    };
    for kind in ObjectKind::ALL {
        let listed = match maint.list(kind).await {
            Ok(v) => v,
            Err(e) => {
                // E.g. through a daemon, or past a damaged pack (reported above): the roots'
                // closures were still checked.
                tracing::info!("not scanning every stored {}: {e}", kind.what());
                continue;
            }
        };
        for obj in listed {
            let d = obj.digest;
            let key = Subject::Object(kind, d);
            if f.problems.contains_key(&key) {
                continue;
            }
            let err = match kind {
                ObjectKind::Chunk if chunks_seen.contains(&d) => continue,
                ObjectKind::Chunk => store.blobs.read_chunk(&d).await.err(),
                ObjectKind::Directory if dirs_ok.contains(&d) => continue,
                ObjectKind::Directory => store.dirs.get(&d).await.err(),
                ObjectKind::BlobIndex => match store.blobs.stat(&d).await {
                    Ok(Some(m)) if m.chunks.len() > 1 => {
                        crate::store::layout::BlobLayout::new(d, m)
                            .err()
                            .and_then(|e| {
                                // An index written before outboards is still sound.
                                (!e.to_string().contains("has no outboard")).then_some(e)
                            })
                    }
                    Ok(_) => None,
                    Err(e) => Some(e),
                },
            };
            if let Some(e) = err {
                f.add(key, corrupt(e), None);
            }
        }
    }
}

/// What one repair pass did.
#[derive(Debug, Default)]
pub struct Repaired {
    pub fixed: usize,
    /// Problems left, each with why it could not be repaired.
    pub left: Vec<(Problem, String)>,
}

/// Copies a chunk from `from` into `store`, replacing any damaged copy.
async fn restore_chunk(
    store: &Store,
    from: &Store,
    d: &B3Digest,
) -> Result<std::result::Result<(), String>> {
    let Some(data) = from.blobs.read_chunk(d).await? else {
        return Ok(Err(format!("{} does not have it", from.url)));
    };
    if let Some(m) = &store.maintenance {
        // A damaged copy may still be listed; a missing one is no error.
        let _ = m.remove(ObjectKind::Chunk, d).await;
    }
    store.blobs.put_chunk(*d, data).await?;
    Ok(Ok(()))
}

/// Copies blob `b` (its index and every chunk this store cannot read) from `from`.
async fn restore_blob(
    store: &Store,
    from: &Store,
    b: &B3Digest,
) -> Result<std::result::Result<(), String>> {
    let Some(meta) = from.blobs.stat(b).await? else {
        return Ok(Err(format!("{} does not have it", from.url)));
    };
    for c in &meta.chunks {
        if !matches!(store.blobs.read_chunk(&c.digest).await, Ok(Some(_))) {
            if let Err(why) = restore_chunk(store, from, &c.digest).await? {
                return Ok(Err(format!("its chunk {}: {why}", c.digest)));
            }
        }
    }
    if meta.chunks.len() > 1 {
        // The donor's index is only trusted once its outboard checks against the digest.
        let layout = crate::store::layout::BlobLayout::load(&*from.blobs, *b, meta).await?;
        if let Some(m) = &store.maintenance {
            let _ = m.remove(ObjectKind::BlobIndex, b).await;
        }
        let meta = BlobMeta {
            size: layout.size(),
            chunks: layout.chunks.clone(),
            outboard: from
                .blobs
                .stat(b)
                .await?
                .map(|m| m.outboard)
                .unwrap_or_default(),
        };
        store.blobs.put_blob_index(*b, &meta.to_index()).await?;
    }
    Ok(Ok(()))
}

/// Restores directory `d` from `from` with whatever below it this store cannot read: the
/// donor's subtree is walked down to directories this store holds intact, the missing ones
/// put leaves first, and the blobs their files name restored where this store has nothing.
async fn restore_dir(
    store: &Store,
    from: &Store,
    d: &B3Digest,
) -> Result<std::result::Result<(), String>> {
    let mut order: Vec<(B3Digest, Directory)> = Vec::new();
    let mut todo = vec![*d];
    let mut seen = HashSet::new();
    while let Some(x) = todo.pop() {
        if !seen.insert(x) {
            continue;
        }
        if x != *d && matches!(store.dirs.get(&x).await, Ok(Some(_))) {
            continue;
        }
        let Some(dir) = from.dirs.get(&x).await? else {
            return Ok(Err(if x == *d {
                format!("{} does not have it", from.url)
            } else {
                format!("{} lacks directory {x} below it", from.url)
            }));
        };
        for e in &dir.directories {
            todo.push(B3Digest::try_from(&e.digest[..])?);
        }
        for f in &dir.files {
            let b = B3Digest::try_from(&f.digest[..])?;
            if !matches!(store.blobs.stat(&b).await, Ok(Some(_))) {
                if let Err(why) = restore_blob(store, from, &b).await? {
                    return Ok(Err(format!("blob {b} below it: {why}")));
                }
            }
        }
        order.push((x, dir));
    }
    for (x, dir) in order.into_iter().rev() {
        if let Some(m) = &store.maintenance {
            let _ = m.remove(ObjectKind::Directory, &x).await;
        }
        let got = store.dirs.put(&dir).await?;
        if got != x {
            return Ok(Err(format!("the donor's copy of {x} hashes to {got}")));
        }
    }
    Ok(Ok(()))
}

/// One repair pass: each problem's object copied (verified) from `from`; damaged packs set
/// aside once nothing they held is missing. The caller verifies again and repeats while
/// this makes progress (restored directories reveal what is below them).
pub async fn repair(store: &Store, from: &Store, problems: &[Problem]) -> Result<Repaired> {
    let mut out = Repaired::default();
    // Chunks and blobs first, then directories (children before parents: the donor's order
    // is not known, so directories are retried until no progress), then packs.
    let mut ordered: Vec<&Problem> = problems.iter().collect();
    ordered.sort_by(|a, b| a.subject.cmp(&b.subject));
    let mut dirs: Vec<&Problem> = Vec::new();
    // (Directories go last: restoring one also restores what is missing below it.)
    let mut packs: Vec<&Problem> = Vec::new();
    for p in ordered {
        let res = match &p.subject {
            Subject::Object(ObjectKind::Chunk, d) => restore_chunk(store, from, d).await,
            Subject::Object(ObjectKind::BlobIndex, d) | Subject::Blob(d) => {
                restore_blob(store, from, d).await
            }
            Subject::Object(ObjectKind::Directory, _) => {
                dirs.push(p);
                continue;
            }
            Subject::Pack(_) => {
                packs.push(p);
                continue;
            }
            Subject::Root(name) => Ok(Err(match from.roots.get(name).await {
                Ok(Some(_)) => format!(
                    "root records are not copied by repair; `granary rm {name}` and record it again"
                ),
                _ => format!("{} has no root {name}", from.url),
            })),
        };
        match res {
            Ok(Ok(())) => out.fixed += 1,
            Ok(Err(why)) => out.left.push((p.clone(), why)),
            Err(e) => out.left.push((p.clone(), e.to_string())),
        }
    }
    for p in dirs {
        let Subject::Object(_, d) = &p.subject else {
            continue;
        };
        match restore_dir(store, from, d).await {
            Ok(Ok(())) => out.fixed += 1,
            Ok(Err(why)) => out.left.push((p.clone(), why)),
            Err(e) => out.left.push((p.clone(), e.to_string())),
        }
    }
    store.flush().await?;
    // A damaged pack goes once every object a root reaches is readable again (its other
    // objects are unreachable: what gc would remove).
    let objects_left = out
        .left
        .iter()
        .any(|(p, _)| !matches!(p.subject, Subject::Pack(_) | Subject::Root(_)));
    for p in packs {
        let Subject::Pack(unit) = &p.subject else {
            continue;
        };
        if objects_left {
            out.left.push((
                p.clone(),
                "kept until the objects it held are restored".into(),
            ));
            continue;
        }
        let Some(m) = &store.maintenance else {
            out.left
                .push((p.clone(), "the store cannot set it aside".into()));
            continue;
        };
        match m.set_aside(unit).await {
            Ok(()) => out.fixed += 1,
            Err(e) => out.left.push((p.clone(), e.to_string())),
        }
    }
    Ok(out)
}

/// The first record where a root record's copy of the head of its times table differs from
/// the table; `None` if they agree, or if the table cannot be read (reported as a file of the
/// tree).
async fn head_disagrees(store: &Store, t: &TimesRef, head: &[i64]) -> Option<usize> {
    if head.is_empty() {
        return None;
    }
    let reader = BlobReader::open_sized(store.blobs.clone(), t.digest, t.size)
        .await
        .ok()?;
    let bytes = reader
        .read_at(times::HEADER, head.len() * times::RECORD as usize)
        .await
        .ok()?;
    let table = times::decode_records(&bytes);
    (0..head.len()).find(|&i| table.get(i) != head.get(i))
}
