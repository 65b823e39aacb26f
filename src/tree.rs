//! Stored trees read back: resolving `ROOT/PATH`, listing, and materialising a tree on disk.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
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
        let name = unescape_name(part)
            .map_err(|why| StoreError::Backend(format!("{walked}/{part}: {why}")))?;
        let dir = get_dir(store, digest).await?;
        let e = dir
            .lookup(&name)
            .ok_or_else(|| StoreError::Backend(format!("{walked}/{part}: no such entry")))?;
        node = entry_node(e)?;
        walked = format!("{walked}/{part}");
    }
    Ok(node)
}

/// A name as `granary ls` prints it and `ROOT/PATH` arguments take it back: printable text as
/// it is; a backslash as `\\`; control characters and bytes that are not UTF-8 as `\xNN`.
/// So a listing never sends raw control characters to a terminal, and every name can be
/// addressed exactly.
pub fn escape_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The bytes of a name written as [`escape_name`] prints it.
pub fn unescape_name(s: &str) -> std::result::Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("\\x must be followed by two hex digits")?;
                out.push(hex);
                i += 4;
            }
            _ => return Err("a backslash starts \\\\ or \\xNN (write a backslash as \\\\)".into()),
        }
    }
    Ok(out)
}

/// Writes a blob's content to `out`, every piece checked against the blob digest before it
/// is written; a blob that is not `size` bytes (its directory entry's size) is refused.
pub async fn write_blob<W: tokio::io::AsyncWrite + Unpin>(
    store: &Store,
    digest: &B3Digest,
    size: u64,
    out: &mut W,
) -> Result<u64> {
    use tokio::io::AsyncWriteExt;
    let reader = BlobReader::open_sized(store.blobs.clone(), *digest, size).await?;
    let mut stream = Box::pin(reader.stream());
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        out.write_all(&chunk)
            .await
            .map_err(|e| StoreError::io("writing output", e))?;
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// Directories fetched, and files written, at once by [`export`]: with a remote store each
/// is a round trip, so they overlap rather than queue.
pub const EXPORT_CONCURRENCY: usize = 16;

/// Materialises a node at `dest`, which must not exist yet: everything is written under a
/// temporary name beside it and renamed into place only once complete and checked, so a
/// failed export leaves nothing at `dest` (and removes what it wrote). Names come from
/// validated directories (no `/`, `.` or `..`) and files are created with
/// `O_EXCL | O_NOFOLLOW`, so nothing is written outside `dest` even if the tree holds hostile
/// symlinks. Runs of zeros are left as holes, so a sparse file stays sparse.
///
/// Directories are fetched a level at a time and files written [`EXPORT_CONCURRENCY`] at a
/// time (each file's chunks are themselves fetched ahead concurrently).
pub async fn export(store: &Store, node: &Node, dest: &Path) -> Result<()> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = dest
        .file_name()
        .ok_or_else(|| StoreError::Backend(format!("{}: not a path to create", dest.display())))?;
    let tmp = parent.join(format!(
        ".{}.granary-export-{}-{:x}",
        base.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let res = export_into(store, node, &tmp).await;
    let res = match res {
        Ok(()) => {
            let (t, d) = (tmp.clone(), dest.to_path_buf());
            tokio::task::spawn_blocking(move || {
                // Never over something that appeared at `dest` meanwhile.
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &t,
                    rustix::fs::CWD,
                    &d,
                    rustix::fs::RenameFlags::NOREPLACE,
                )
                .map_err(|e| {
                    StoreError::io(
                        format!("moving the export into place at {}", d.display()),
                        std::io::Error::from_raw_os_error(e.raw_os_error()),
                    )
                })
            })
            .await
            .map_err(|e| StoreError::Backend(format!("export task failed: {e}")))?
        }
        Err(e) => Err(e),
    };
    if res.is_err() {
        let t = tmp.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&t).or_else(|_| std::fs::remove_file(&t));
        })
        .await;
    }
    res
}

async fn export_into(store: &Store, node: &Node, dest: &Path) -> Result<()> {
    let mut files: Vec<(PathBuf, B3Digest, u64, bool)> = Vec::new();
    let mut level: Vec<(PathBuf, B3Digest)> = Vec::new();
    match node {
        Node::Directory { digest, .. } => {
            create_dir(dest).await?;
            level.push((dest.to_path_buf(), *digest));
        }
        Node::File {
            digest,
            size,
            executable,
        } => files.push((dest.to_path_buf(), *digest, *size, *executable)),
        Node::Symlink { target } => symlink(target, dest).await?,
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
                        create_dir(&p).await?;
                        level.push((p, digest));
                    }
                    Node::File {
                        digest,
                        size,
                        executable,
                    } => files.push((p, digest, size, executable)),
                    Node::Symlink { target } => symlink(&target, &p).await?,
                }
            }
        }
    }
    let mut writes = futures::stream::iter(files)
        .map(|(path, digest, size, executable)| export_file(store, path, digest, size, executable))
        .buffer_unordered(EXPORT_CONCURRENCY);
    while let Some(r) = writes.next().await {
        r?;
    }
    Ok(())
}

async fn create_dir(p: &Path) -> Result<()> {
    tokio::fs::create_dir(p)
        .await
        .map_err(|e| StoreError::io(format!("creating {}", p.display()), e))
}

async fn symlink(target: &[u8], p: &Path) -> Result<()> {
    let t = PathBuf::from(std::ffi::OsStr::from_bytes(target));
    tokio::fs::symlink(t, p)
        .await
        .map_err(|e| StoreError::io(format!("symlink {}", p.display()), e))
}

/// Holes are made of whole aligned blocks of zeros of this size.
const HOLE_BLOCK: usize = 64 << 10;

async fn export_file(
    store: &Store,
    path: PathBuf,
    digest: B3Digest,
    size: u64,
    executable: bool,
) -> Result<()> {
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    let mode = if executable { 0o755 } else { 0o644 };
    let io =
        |what: &str, e: std::io::Error| StoreError::io(format!("{what} {}", path.display()), e);
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&path)
        .await
        .map_err(|e| io("creating", e))?;
    let reader = BlobReader::open_sized(store.blobs.clone(), digest, size)
        .await
        .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
    let mut stream = Box::pin(reader.stream());
    let mut pos = 0u64;
    // Bytes not yet written.
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 20);
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let mut rest = &piece[..];
        while !rest.is_empty() {
            // Up to the next block boundary of the file.
            let room = HOLE_BLOCK - (pos % HOLE_BLOCK as u64) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            let whole_block = now.len() == HOLE_BLOCK;
            if whole_block && now.iter().all(|&b| b == 0) {
                if !pending.is_empty() {
                    f.write_all(&pending).await.map_err(|e| io("writing", e))?;
                    pending.clear();
                }
                f.seek(std::io::SeekFrom::Start(pos + now.len() as u64))
                    .await
                    .map_err(|e| io("seeking in", e))?;
            } else {
                pending.extend_from_slice(now);
                if pending.len() >= 1 << 20 {
                    f.write_all(&pending).await.map_err(|e| io("writing", e))?;
                    pending.clear();
                }
            }
            pos += now.len() as u64;
            rest = later;
        }
    }
    f.write_all(&pending).await.map_err(|e| io("writing", e))?;
    // A file ending in a hole gets its length here.
    f.set_len(pos).await.map_err(|e| io("sizing", e))?;
    f.flush().await.map_err(|e| io("writing", e))?;
    // The umask may have cleared bits: set the mode we mean.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| io("chmod", e))?;
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

#[cfg(test)]
mod escape_tests {
    use super::*;

    #[test]
    fn names_round_trip_through_their_escaped_form() {
        for name in [
            &b"plain.txt"[..],
            b"tab\there",
            b"\x1b[31mred",
            b"back\\slash",
            b"\xff\xfe latin1 \xe9",
            "caf\u{e9} \u{1f600}".as_bytes(),
        ] {
            let shown = escape_name(name);
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
            assert_eq!(unescape_name(&shown).unwrap(), name, "{shown}");
        }
        assert_eq!(escape_name(b"a\x1bb"), "a\\x1bb");
        assert!(unescape_name("a\\q").is_err());
        assert!(unescape_name("a\\x4").is_err());
    }
}
