//! Materialising stored trees: a blob to any writer (`granary cat`), a whole tree to a new
//! path (`granary export`), every byte checked before it is written.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::read::{entry_node, get_dir, TimesAt};
use crate::model::castore::{B3Digest, Directory, Node};
use crate::model::times::{self, TimesPos, TimesRef};
use crate::store::{BlobReader, Result, Store, StoreError};

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
/// time (each file's chunks are themselves fetched ahead concurrently). With `times` (where
/// the node's recorded times are), every entry gets its recorded mtime; without, mtime 1.
pub async fn export(store: &Store, node: &Node, times: TimesAt, dest: &Path) -> Result<()> {
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
    let res = export_into(store, node, times, &tmp).await;
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

async fn export_into(store: &Store, node: &Node, times: TimesAt, dest: &Path) -> Result<()> {
    let mut files: Vec<(PathBuf, B3Digest, u64, bool)> = Vec::new();
    let mut level: Vec<(PathBuf, B3Digest, Option<TimesPos>)> = Vec::new();
    let table = match times {
        Some((t, pos)) => Some((load_times(store, &t).await?, pos)),
        None => None,
    };
    let record = |pos: Option<TimesPos>| -> Result<i64> {
        match (&table, pos) {
            (Some((recs, _)), Some(p)) => recs.get(p.index as usize).copied().ok_or_else(|| {
                StoreError::Backend("the tree's times table is shorter than the tree".into())
            }),
            _ => Ok(times::UNRECORDED_NS),
        }
    };
    let top_pos = table.as_ref().map(|(_, p)| *p);
    // Every path written and its time, set once everything is in place.
    let mut stamps: Vec<(PathBuf, i64)> = vec![(dest.to_path_buf(), record(top_pos)?)];
    match node {
        Node::Directory { digest, .. } => {
            create_dir(dest).await?;
            level.push((dest.to_path_buf(), *digest, top_pos));
        }
        Node::File {
            digest,
            size,
            executable,
        } => files.push((dest.to_path_buf(), *digest, *size, *executable)),
        Node::Symlink { target } => symlink(target, dest).await?,
    }
    while !level.is_empty() {
        let dirs: Vec<(PathBuf, Directory, Option<TimesPos>)> =
            futures::stream::iter(level.drain(..))
                .map(|(path, digest, pos)| async move {
                    Ok((path, get_dir(store, &digest).await?, pos))
                })
                .buffered(EXPORT_CONCURRENCY)
                .collect::<Vec<Result<_>>>()
                .await
                .into_iter()
                .collect::<Result<_>>()?;
        for (path, dir, pos) in dirs {
            let entries = dir
                .entries()
                .map(|e| Ok((e.name().clone(), entry_node(e)?)))
                .collect::<Result<Vec<_>>>()?;
            let kids = pos.map(|p| p.children(entries.iter().map(|(_, n)| n)));
            for (i, (name, node)) in entries.into_iter().enumerate() {
                let p = path.join(std::ffi::OsStr::from_bytes(&name));
                let cpos = kids.as_ref().map(|k| k[i]);
                stamps.push((p.clone(), record(cpos)?));
                match node {
                    Node::Directory { digest, .. } => {
                        create_dir(&p).await?;
                        level.push((p, digest, cpos));
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
    set_times(stamps).await
}

/// A whole table of times (a tree's, checked by the caller to fit it).
async fn load_times(store: &Store, t: &TimesRef) -> Result<Vec<i64>> {
    let reader = BlobReader::open_sized(store.blobs.clone(), t.digest, t.size).await?;
    let len = usize::try_from(t.size)
        .map_err(|_| StoreError::Backend(format!("times table {}: too large", t.digest)))?;
    let bytes = reader.read_at(0, len).await?;
    if bytes.len() < times::HEADER as usize || &bytes[..8] != times::MAGIC {
        return Err(StoreError::corrupt(
            "times table",
            &t.digest,
            "no GRNTIME1 header",
        ));
    }
    Ok(times::decode_records(&bytes[times::HEADER as usize..]))
}

/// Sets each path's mtime (and atime), not following symlinks.
async fn set_times(stamps: Vec<(PathBuf, i64)>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        for (p, ns) in stamps.iter().rev() {
            let (sec, nsec) = times::split(*ns);
            let t = rustix::fs::Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                p,
                &rustix::fs::Timestamps {
                    last_access: t,
                    last_modification: t,
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| {
                StoreError::io(
                    format!("setting the time of {}", p.display()),
                    std::io::Error::from_raw_os_error(e.raw_os_error()),
                )
            })?;
        }
        Ok(())
    })
    .await
    .map_err(|e| StoreError::Backend(format!("export task failed: {e}")))?
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
