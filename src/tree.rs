//! Stored trees read back: resolving `ROOT/PATH`, listing, and materialising a tree on disk.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;

use crate::castore::{B3Digest, Directory, Entry, Node, RootRecord};
use crate::store::{BlobReader, Result, Store, StoreError};

/// Finds a root by name, or takes a digest naming a directory or blob.
pub async fn resolve_root(store: &Store, root: &str) -> Result<Node> {
    if crate::castore::validate_root_name(root).is_ok() {
        if let Some(r) = store.roots.get(root).await? {
            return Ok(r.node);
        }
    }
    if let Ok(d) = root.parse::<B3Digest>() {
        if let Some(dir) = store.dirs.get(&d).await? {
            return Ok(Node::Directory {
                digest: d,
                size: dir.size()?,
            });
        }
        if let Some(meta) = store.blobs.stat(&d).await? {
            return Ok(Node::File {
                digest: d,
                size: meta.size,
                executable: false,
            });
        }
    }
    Err(StoreError::Backend(format!(
        "no root named {root:?} (and it is not the digest of a stored directory or blob)"
    )))
}

/// The root record if `root` is a name, for commands that need its metadata.
pub async fn get_root(store: &Store, name: &str) -> Result<RootRecord> {
    store
        .roots
        .get(name)
        .await?
        .ok_or_else(|| StoreError::Backend(format!("no root named {name:?}")))
}

/// Node of an entry within a directory.
pub fn entry_node(e: Entry<'_>) -> Result<Node> {
    Ok(match e {
        Entry::Directory(d) => Node::try_from(d)?,
        Entry::File(f) => Node::try_from(f)?,
        Entry::Symlink(s) => Node::from(s),
    })
}

pub async fn get_dir(store: &Store, digest: &B3Digest) -> Result<Directory> {
    store
        .dirs
        .get(digest)
        .await?
        .ok_or_else(|| StoreError::not_found("directory", digest))
}

/// Resolves `ROOT[/PATH...]` (symlinks inside the tree are not followed).
pub async fn resolve(store: &Store, spec: &str) -> Result<Node> {
    let mut parts = spec.split('/').filter(|p| !p.is_empty());
    let root = parts
        .next()
        .ok_or_else(|| StoreError::Backend("empty path".into()))?;
    let mut node = resolve_root(store, root).await?;
    let mut walked = root.to_string();
    for part in parts {
        let Node::Directory { digest, .. } = &node else {
            return Err(StoreError::Backend(format!("{walked} is not a directory")));
        };
        let dir = get_dir(store, digest).await?;
        let e = dir
            .lookup(part.as_bytes())
            .ok_or_else(|| StoreError::Backend(format!("{walked}/{part}: no such entry")))?;
        node = entry_node(e)?;
        walked = format!("{walked}/{part}");
    }
    Ok(node)
}

/// Writes a blob's content to `out`, verifying every chunk and the whole digest.
pub async fn write_blob<W: Write>(store: &Store, digest: &B3Digest, out: &mut W) -> Result<u64> {
    let reader = BlobReader::open(store.blobs.clone(), *digest).await?;
    let mut stream = Box::pin(reader.stream());
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        out.write_all(&chunk)
            .map_err(|e| StoreError::io("writing output", e))?;
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// Directories fetched, and files written, at once by [`export`]: with a remote store each
/// is a round trip, so they overlap rather than queue.
pub const EXPORT_CONCURRENCY: usize = 16;

/// Materialises a node at `dest`, which must not exist yet. Names come from validated
/// directories (no `/`, `.` or `..`) and files are created with `O_EXCL | O_NOFOLLOW`, so
/// nothing is written outside `dest` even if the tree holds hostile symlinks.
///
/// Directories are fetched a level at a time and files written [`EXPORT_CONCURRENCY`] at a
/// time (each file's chunks are themselves fetched ahead concurrently).
pub async fn export(store: &Store, node: &Node, dest: &Path) -> Result<()> {
    let mut files: Vec<(PathBuf, B3Digest, bool)> = Vec::new();
    let mut level: Vec<(PathBuf, B3Digest)> = Vec::new();
    match node {
        Node::Directory { digest, .. } => {
            std::fs::create_dir(dest)
                .map_err(|e| StoreError::io(format!("creating {}", dest.display()), e))?;
            level.push((dest.to_path_buf(), *digest));
        }
        Node::File {
            digest, executable, ..
        } => files.push((dest.to_path_buf(), *digest, *executable)),
        Node::Symlink { target } => {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), dest)
                .map_err(|e| StoreError::io(format!("symlink {}", dest.display()), e))?;
        }
    }
    while !level.is_empty() {
        let dirs: Vec<(PathBuf, Directory)> = futures::stream::iter(level.drain(..))
            .map(|(path, digest)| async move { Ok((path, get_dir(store, &digest).await?)) })
            .buffered(EXPORT_CONCURRENCY)
            .collect::<Vec<Result<_>>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        for (path, dir) in dirs {
            for e in dir.entries() {
                let p = path.join(std::ffi::OsStr::from_bytes(e.name()));
                match entry_node(e)? {
                    Node::Directory { digest, .. } => {
                        std::fs::create_dir(&p)
                            .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
                        level.push((p, digest));
                    }
                    Node::File {
                        digest, executable, ..
                    } => files.push((p, digest, executable)),
                    Node::Symlink { target } => {
                        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), &p)
                            .map_err(|e| StoreError::io(format!("symlink {}", p.display()), e))?;
                    }
                }
            }
        }
    }
    let mut writes = futures::stream::iter(files)
        .map(|(path, digest, executable)| export_file(store, path, digest, executable))
        .buffer_unordered(EXPORT_CONCURRENCY);
    while let Some(r) = writes.next().await {
        r?;
    }
    Ok(())
}

async fn export_file(
    store: &Store,
    path: PathBuf,
    digest: B3Digest,
    executable: bool,
) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(if executable { 0o755 } else { 0o644 })
        .open(&path)
        .map_err(|e| StoreError::io(format!("creating {}", path.display()), e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
    write_blob(store, &digest, &mut w).await?;
    w.flush()
        .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
    drop(w);
    // The umask may have cleared bits: set the mode we mean.
    let mode = if executable { 0o755 } else { 0o644 };
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| StoreError::io(format!("chmod {}", path.display()), e))?;
    Ok(())
}

/// One line of `granary ls`.
pub struct Listing {
    pub name: Bytes,
    pub node: Node,
}

pub async fn list(store: &Store, node: &Node) -> Result<Vec<Listing>> {
    match node {
        Node::Directory { digest, .. } => {
            let dir = get_dir(store, digest).await?;
            dir.entries()
                .map(|e| {
                    Ok(Listing {
                        name: e.name().clone(),
                        node: entry_node(e)?,
                    })
                })
                .collect()
        }
        other => Ok(vec![Listing {
            name: Bytes::new(),
            node: other.clone(),
        }]),
    }
}

/// Bytes of file content under a node, counting every occurrence (what a plain copy holds).
/// Directories are memoised by digest, so shared subtrees are walked once.
pub async fn logical_size(
    store: &Store,
    node: &Node,
    memo: &mut std::collections::HashMap<B3Digest, u64>,
) -> Result<u64> {
    let top = match node {
        Node::File { size, .. } => return Ok(*size),
        Node::Symlink { .. } => return Ok(0),
        Node::Directory { digest, .. } => *digest,
    };
    // Iterative post-order over directory digests.
    let mut stack = vec![(top, false)];
    while let Some((d, expanded)) = stack.pop() {
        if memo.contains_key(&d) {
            continue;
        }
        let dir = get_dir(store, &d).await?;
        let children: Vec<B3Digest> = dir
            .directories
            .iter()
            .map(|e| B3Digest::try_from(&e.digest[..]))
            .collect::<Result<_, _>>()?;
        if !expanded && children.iter().any(|c| !memo.contains_key(c)) {
            stack.push((d, true));
            stack.extend(children.into_iter().map(|c| (c, false)));
            continue;
        }
        let mut total: u64 = dir.files.iter().map(|f| f.size).sum();
        for c in &children {
            total += memo.get(c).copied().unwrap_or(0);
        }
        memo.insert(d, total);
    }
    Ok(memo.get(&top).copied().unwrap_or(0))
}
