//! `granary import`: a file tree into the store.
//!
//! The tree is walked first (metadata only, so every bad path is reported before anything is
//! written that a root would point at); then files are chunked and hashed in parallel on the
//! blocking pool, each streamed through the chunker so memory stays bounded whatever the
//! file size; then directories are put leaves first. Nothing is recorded as a root here.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::castore::{
    proto::blob_index, validate_name, B3Digest, BlobIndex, Directory, DirectoryEntry, FileEntry,
    Node, SymlinkEntry,
};
use crate::chunking::{ChunkParams, Chunker};
use crate::store::{empty_blob, BlobService, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {reason}")]
    Path { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("import task failed: {0}")]
    Task(String),
}

impl ImportError {
    fn path(path: &Path, reason: impl Into<String>) -> Self {
        ImportError::Path {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Skip devices, fifos and sockets with a warning instead of failing.
    pub skip_special: bool,
    /// Files imported at once (default: twice the number of cores).
    pub parallelism: Option<usize>,
}

/// Counters an import updates as it goes, for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
}

/// The tree as walked: metadata only.
enum Walked {
    Dir(Vec<(Bytes, Walked)>),
    File {
        executable: bool,
        /// Index into the file job list.
        job: usize,
    },
    Symlink(Bytes),
}

struct Walker<'a> {
    opts: &'a ImportOptions,
    files: Vec<PathBuf>,
    bytes: u64,
}

impl Walker<'_> {
    fn walk(&mut self, path: &Path) -> Result<Walked, ImportError> {
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| ImportError::path(path, format!("cannot stat: {e}")))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(path)
                .map_err(|e| ImportError::path(path, format!("cannot read link: {e}")))?;
            let target = Bytes::copy_from_slice(target.as_os_str().as_bytes());
            let probe = SymlinkEntry {
                name: Bytes::from_static(b"x"),
                target: target.clone(),
            };
            Directory {
                symlinks: vec![probe],
                ..Default::default()
            }
            .validate()
            .map_err(|e| ImportError::path(path, e.to_string()))?;
            Ok(Walked::Symlink(target))
        } else if ft.is_file() {
            let job = self.files.len();
            self.files.push(path.to_path_buf());
            self.bytes += meta.len();
            Ok(Walked::File {
                executable: meta.permissions().mode() & 0o100 != 0,
                job,
            })
        } else if ft.is_dir() {
            let rd = std::fs::read_dir(path)
                .map_err(|e| ImportError::path(path, format!("cannot read directory: {e}")))?;
            let mut children = Vec::new();
            for entry in rd {
                let entry = entry
                    .map_err(|e| ImportError::path(path, format!("cannot read directory: {e}")))?;
                let name = entry.file_name();
                let child = entry.path();
                validate_name(name.as_bytes())
                    .map_err(|e| ImportError::path(&child, e.to_string()))?;
                if let Some(kind) = special_kind(&child) {
                    if self.opts.skip_special {
                        tracing::warn!("skipping {} ({kind})", child.display());
                        continue;
                    }
                    return Err(ImportError::path(
                        &child,
                        format!("is a {kind}; granary stores only files, directories and symlinks (--skip-special skips them)"),
                    ));
                }
                let node = self.walk(&child)?;
                children.push((Bytes::copy_from_slice(name.as_bytes()), node));
            }
            children.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Walked::Dir(children))
        } else {
            let kind = special_kind(path).unwrap_or("special file");
            Err(ImportError::path(
                path,
                format!("is a {kind}; granary stores only files, directories and symlinks"),
            ))
        }
    }
}

fn special_kind(path: &Path) -> Option<&'static str> {
    let ft = std::fs::symlink_metadata(path).ok()?.file_type();
    if ft.is_block_device() {
        Some("block device")
    } else if ft.is_char_device() {
        Some("character device")
    } else if ft.is_fifo() {
        Some("fifo")
    } else if ft.is_socket() {
        Some("socket")
    } else {
        None
    }
}

/// Chunk puts kept in flight per file, so one large file still uses several cores.
const PUTS_IN_FLIGHT: usize = 4;

/// Bytes read from a file at a time.
const READ_BUF_BYTES: usize = 1 << 20;

thread_local! {
    /// The read buffer of each import thread: zeroing a fresh 1 MiB buffer per file cost more
    /// than reading a small file.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads `f` to its end through `buf`, handing each read to `each`.
fn read_through(
    f: &mut std::fs::File,
    buf: &mut [u8],
    path: &Path,
    each: &mut dyn FnMut(&[u8]) -> Result<(), ImportError>,
) -> Result<(), ImportError> {
    loop {
        match f.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => each(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ImportError::path(path, format!("read failed: {e}"))),
        }
    }
}

/// Imports one regular file, streaming it through the chunker; runs on a blocking thread.
fn import_file_blocking(
    rt: &tokio::runtime::Handle,
    blobs: &Arc<dyn BlobService>,
    params: ChunkParams,
    path: &Path,
    progress: &Progress,
) -> Result<(B3Digest, u64), ImportError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| ImportError::path(path, format!("cannot open: {e}")))?;
    let mut chunker = Chunker::new(params);
    let mut whole = blake3::Hasher::new();
    let mut index: Vec<blob_index::Chunk> = Vec::new();
    let mut size = 0u64;
    let mut in_flight: VecDeque<JoinHandle<Result<(), StoreError>>> = VecDeque::new();
    let store_err = |e: StoreError| ImportError::Store {
        path: path.to_path_buf(),
        source: e,
    };
    let wait_one = |q: &mut VecDeque<JoinHandle<Result<(), StoreError>>>| {
        if let Some(h) = q.pop_front() {
            rt.block_on(h)
                .map_err(|e| ImportError::Task(e.to_string()))?
                .map_err(store_err)?;
        }
        Ok::<(), ImportError>(())
    };
    let submit = |chunk: Bytes,
                  q: &mut VecDeque<JoinHandle<Result<(), StoreError>>>,
                  index: &mut Vec<blob_index::Chunk>| {
        let digest = B3Digest::of(&chunk);
        index.push(blob_index::Chunk {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size: chunk.len() as u64,
        });
        let b = blobs.clone();
        q.push_back(rt.spawn(async move { b.put_chunk(digest, chunk).await }));
    };
    READ_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.is_empty() {
            buf.resize(READ_BUF_BYTES, 0);
        }
        read_through(&mut f, &mut buf, path, &mut |data| {
            whole.update(data);
            size += data.len() as u64;
            progress
                .bytes_done
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            chunker.push(data);
            while let Some(chunk) = chunker.next_chunk() {
                submit(chunk, &mut in_flight, &mut index);
                while in_flight.len() > PUTS_IN_FLIGHT {
                    wait_one(&mut in_flight)?;
                }
            }
            Ok(())
        })
    })?;
    while let Some(chunk) = chunker.finish_chunk() {
        // A file of one chunk (most files): put it from this thread if the store can.
        if index.is_empty() && in_flight.is_empty() {
            let digest = B3Digest::of(&chunk);
            if let Some(r) = blobs.put_chunk_here(&digest, &chunk) {
                r.map_err(store_err)?;
                index.push(blob_index::Chunk {
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    size: chunk.len() as u64,
                });
                continue;
            }
        }
        submit(chunk, &mut in_flight, &mut index);
    }
    while !in_flight.is_empty() {
        wait_one(&mut in_flight)?;
    }
    let digest = B3Digest::from(whole.finalize());
    if index.len() > 1 {
        let idx = BlobIndex {
            chunks: index,
            size,
        };
        rt.block_on(blobs.put_blob_index(digest, &idx))
            .map_err(store_err)?;
    } else if index.is_empty() {
        debug_assert_eq!(digest, empty_blob());
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok((digest, size))
}

/// Imports the tree at `path` and returns the node naming it. Symlinks at the top are
/// stored as symlinks, not followed.
pub async fn import_path(
    store: &Store,
    path: &Path,
    opts: &ImportOptions,
    progress: Arc<Progress>,
) -> Result<Node, ImportError> {
    let (walked, files, bytes) = {
        let path = path.to_path_buf();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = Walker {
                opts: &opts,
                files: Vec::new(),
                bytes: 0,
            };
            let t = w.walk(&path)?;
            Ok::<_, ImportError>((t, w.files, w.bytes))
        })
        .await
        .map_err(|e| ImportError::Task(e.to_string()))??
    };
    progress.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    progress
        .files_total
        .fetch_add(files.len() as u64, Ordering::Relaxed);

    let results = import_files(store, files, opts, progress).await?;
    put_tree(store, &walked, &results).await
}

/// Imports every file, `parallelism` at a time; results in job order.
async fn import_files(
    store: &Store,
    files: Vec<PathBuf>,
    opts: &ImportOptions,
    progress: Arc<Progress>,
) -> Result<Vec<(B3Digest, u64)>, ImportError> {
    use futures::stream::{StreamExt, TryStreamExt};
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let parallelism = opts.parallelism.unwrap_or(cores * 2).max(1);
    let rt = tokio::runtime::Handle::current();
    let params = store.params();
    futures::stream::iter(files)
        .map(|path| {
            let (rt, blobs, progress) = (rt.clone(), store.blobs.clone(), progress.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    import_file_blocking(&rt, &blobs, params, &path, &progress)
                })
                .await
                .map_err(|e| ImportError::Task(e.to_string()))?
            }
        })
        .buffered(parallelism)
        .try_collect()
        .await
}

/// Puts the directories of a walked tree, leaves first, and returns the top node.
async fn put_tree(
    store: &Store,
    top: &Walked,
    files: &[(B3Digest, u64)],
) -> Result<Node, ImportError> {
    match top {
        Walked::File { executable, job } => {
            let (digest, size) = files[*job];
            Ok(Node::File {
                digest,
                size,
                executable: *executable,
            })
        }
        Walked::Symlink(target) => Ok(Node::Symlink {
            target: target.clone(),
        }),
        Walked::Dir(_) => {
            let (digest, size) = put_dir(store, top, files).await?;
            Ok(Node::Directory { digest, size })
        }
    }
}

/// Post-order walk with an explicit stack (deep trees must not overflow the task's stack).
async fn put_dir(
    store: &Store,
    top: &Walked,
    files: &[(B3Digest, u64)],
) -> Result<(B3Digest, u64), ImportError> {
    struct Frame<'a> {
        children: &'a [(Bytes, Walked)],
        next: usize,
        dir: Directory,
    }
    let Walked::Dir(children) = top else {
        unreachable!("put_dir is called on directories")
    };
    let mut stack = vec![Frame {
        children,
        next: 0,
        dir: Directory::default(),
    }];
    let mut done: Option<(B3Digest, u64)> = None;
    while let Some(frame) = stack.last_mut() {
        // A child directory just finished: record it in its parent.
        if let Some((digest, size)) = done.take() {
            let name = frame.children[frame.next - 1].0.clone();
            frame.dir.directories.push(DirectoryEntry {
                name,
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size,
            });
        }
        if frame.next == frame.children.len() {
            let Some(frame) = stack.pop() else { break };
            let dir = frame.dir;
            let size = dir.size().map_err(|e| ImportError::Task(e.to_string()))?;
            let digest = store.dirs.put(&dir).await.map_err(|e| ImportError::Store {
                path: PathBuf::from("<directory>"),
                source: e,
            })?;
            done = Some((digest, size));
            if stack.is_empty() {
                return done.ok_or_else(|| ImportError::Task("empty walk".into()));
            }
            continue;
        }
        let (name, child) = &frame.children[frame.next];
        frame.next += 1;
        match child {
            Walked::Dir(grand) => stack.push(Frame {
                children: grand,
                next: 0,
                dir: Directory::default(),
            }),
            Walked::File { executable, job } => {
                let (digest, size) = files[*job];
                frame.dir.files.push(FileEntry {
                    name: name.clone(),
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    size,
                    executable: *executable,
                });
            }
            Walked::Symlink(target) => frame.dir.symlinks.push(SymlinkEntry {
                name: name.clone(),
                target: target.clone(),
            }),
        }
    }
    Err(ImportError::Task("empty walk".into()))
}

/// The basename of a path as a root name, if it is a valid one.
pub fn default_root_name(path: &Path) -> Option<String> {
    let canon = std::fs::canonicalize(path).ok();
    let p = canon.as_deref().unwrap_or(path);
    p.file_name()
        .and_then(OsStr::to_str)
        .filter(|n| validate_name(n.as_bytes()).is_ok())
        .map(str::to_string)
}
