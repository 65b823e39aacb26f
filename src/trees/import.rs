//! `granary import`: a file tree into the store.
//!
//! The tree is walked first (metadata only, so every bad path is reported before anything is
//! written that a root would point at); then files are chunked and hashed in parallel on the
//! blocking pool, each streamed through the [`BlobWriter`] so memory stays bounded whatever the
//! file size; then directories are put leaves first. Nothing is recorded as a root here.
//!
//! The tree may change while it is imported, and may be writable by someone who should not
//! be able to make this import read other files (root importing a user's tree). So nothing is
//! opened by following a link: directories and files are opened relative to the tree's top
//! with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` and `O_NOFOLLOW | O_NONBLOCK` (a FIFO
//! swapped in never blocks), and each opened object must be the one the walk saw (same device
//! and inode, checked with `fstat` on the descriptor). A file is read up to the size it had
//! when opened: one that grows is imported as it was, one that shrinks is refused.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use crate::model::castore::{validate_name, B3Digest, Directory, Node, SymlinkEntry};
use crate::model::times::{self, TimesRef};
use crate::store::blob_writer::{write_all, BlobWriter, PUTS_IN_FLIGHT};
use crate::store::{Store, StoreError};

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
    /// Record no modification times (the tree then shows mtime 1, like a Nix store path).
    pub no_times: bool,
}

/// Counters an import updates as it goes, for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
}

/// The tree as walked: metadata only. Each entry has its name and mtime (ns since the epoch).
enum Walked {
    Dir(Vec<(Bytes, i64, Walked)>),
    File {
        executable: bool,
        /// Index into the file job list.
        job: usize,
    },
    Symlink(Bytes),
}

/// A regular file to import: where it is below the tree's top, and which inode the walk saw.
#[derive(Debug, Clone)]
struct FileJob {
    rel: PathBuf,
    shown: PathBuf,
    dev: u64,
    ino: u64,
}

/// The directory everything is opened below, shared by the import threads.
struct Top {
    fd: OwnedFd,
}

fn errno(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

impl Top {
    /// Opens `rel` below the top without following any symbolic link on the way.
    fn open(&self, rel: &Path, flags: OFlags) -> std::io::Result<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match rustix::fs::openat2(
            self.fd.as_fd(),
            rel,
            flags,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH,
        ) {
            // Kernels before 5.6 (or a seccomp filter) lack openat2; the inode check after
            // the open still refuses anything but the object the walk saw.
            Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {
                rustix::fs::openat(self.fd.as_fd(), rel, flags, Mode::empty()).map_err(errno)
            }
            r => r.map_err(errno),
        }
    }
}

/// What a file type is called in messages, for the types granary does not store.
fn special_name(t: FileType) -> Option<&'static str> {
    match t {
        FileType::BlockDevice => Some("block device"),
        FileType::CharacterDevice => Some("character device"),
        FileType::Fifo => Some("fifo"),
        FileType::Socket => Some("socket"),
        _ => None,
    }
}

/// Checks a symlink target against the model.
fn check_target(path: &Path, target: &[u8]) -> Result<Bytes, ImportError> {
    let target = Bytes::copy_from_slice(target);
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
    Ok(target)
}

struct Walker<'a> {
    opts: &'a ImportOptions,
    top: &'a Top,
    files: Vec<FileJob>,
    bytes: u64,
}

impl Walker<'_> {
    /// Walks the directory `rel` below the top (`shown` in messages), which the parent's
    /// listing saw as inode (dev, ino).
    fn walk_dir(
        &mut self,
        rel: &Path,
        shown: &Path,
        dev: u64,
        ino: u64,
    ) -> Result<Walked, ImportError> {
        let fd = self
            .top
            .open(rel, OFlags::RDONLY | OFlags::DIRECTORY)
            .map_err(|e| ImportError::path(shown, format!("cannot open directory: {e}")))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| ImportError::path(shown, e.to_string()))?;
        if st.st_dev != dev || st.st_ino != ino {
            return Err(ImportError::path(shown, "changed while being imported"));
        }
        let dir = rustix::fs::Dir::read_from(&fd)
            .map_err(|e| ImportError::path(shown, format!("cannot read directory: {e}")))?;
        // Entries are taken in name order, not the directory's own order: files are stored in
        // the order they are met, so files of one directory and kind sit side by side (they
        // compress far better together, and a walk or `tar`, which go in name order, reads a
        // pack front to back).
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry
                .map_err(|e| ImportError::path(shown, format!("cannot read directory: {e}")))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        names.sort_unstable();
        let mut children = Vec::with_capacity(names.len());
        for name in &names {
            let name = &name[..];
            let name_os = OsStr::from_bytes(name);
            let child_shown = shown.join(name_os);
            let child_rel = rel.join(name_os);
            validate_name(name).map_err(|e| ImportError::path(&child_shown, e.to_string()))?;
            let cname =
                CString::new(name).map_err(|_| ImportError::path(&child_shown, "NUL in name"))?;
            let st = rustix::fs::statat(&fd, &cname, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| ImportError::path(&child_shown, format!("cannot stat: {e}")))?;
            let node = match FileType::from_raw_mode(st.st_mode) {
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&fd, &cname, Vec::new()).map_err(|e| {
                        ImportError::path(&child_shown, format!("cannot read link: {e}"))
                    })?;
                    Walked::Symlink(check_target(&child_shown, target.as_bytes())?)
                }
                FileType::RegularFile => {
                    let job = self.files.len();
                    self.files.push(FileJob {
                        rel: child_rel,
                        shown: child_shown,
                        dev: st.st_dev,
                        ino: st.st_ino,
                    });
                    self.bytes += st.st_size as u64;
                    Walked::File {
                        executable: st.st_mode & 0o100 != 0,
                        job,
                    }
                }
                FileType::Directory => {
                    self.walk_dir(&child_rel, &child_shown, st.st_dev, st.st_ino)?
                }
                other => {
                    let kind = special_name(other).unwrap_or("special file");
                    if self.opts.skip_special {
                        tracing::warn!("skipping {} ({kind})", child_shown.display());
                        continue;
                    }
                    return Err(ImportError::path(
                        &child_shown,
                        format!("is a {kind}; granary stores only files, directories and symlinks (--skip-special skips them)"),
                    ));
                }
            };
            let mtime = mtime_ns(st.st_mtime as i64, st.st_mtime_nsec as i64);
            children.push((Bytes::copy_from_slice(name), mtime, node));
        }
        Ok(Walked::Dir(children))
    }
}

fn mtime_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// The tree as walked, ready to import.
struct WalkResult {
    walked: Walked,
    /// The top's own mtime.
    mtime: i64,
    top: Option<Top>,
    files: Vec<FileJob>,
    bytes: u64,
}

/// Walks the tree at `path`: its top (not followed if a symlink), and below it.
fn walk(path: &Path, opts: &ImportOptions) -> Result<WalkResult, ImportError> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| ImportError::path(path, format!("cannot stat: {e}")))?;
    let ft = meta.file_type();
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let mtime = mtime_ns(meta.mtime(), meta.mtime_nsec());
    if ft.is_symlink() {
        let target = std::fs::read_link(path)
            .map_err(|e| ImportError::path(path, format!("cannot read link: {e}")))?;
        let t = check_target(path, target.as_os_str().as_bytes())?;
        return Ok(WalkResult {
            walked: Walked::Symlink(t),
            mtime,
            top: None,
            files: Vec::new(),
            bytes: 0,
        });
    }
    if ft.is_file() || ft.is_dir() {
        // The top of a file import is its directory: the file is opened below it like any other.
        let (dir, rel) = if ft.is_dir() {
            (path.to_path_buf(), PathBuf::new())
        } else {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (
                parent.to_path_buf(),
                PathBuf::from(path.file_name().unwrap_or_default()),
            )
        };
        let fd = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImportError::path(&dir, format!("cannot open directory: {e}")))?;
        let top = Top { fd };
        if ft.is_file() {
            let job = FileJob {
                rel,
                shown: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            };
            let walked = Walked::File {
                executable: meta.permissions().mode() & 0o100 != 0,
                job: 0,
            };
            return Ok(WalkResult {
                walked,
                mtime,
                top: Some(top),
                files: vec![job],
                bytes: meta.len(),
            });
        }
        let mut w = Walker {
            opts,
            top: &top,
            files: Vec::new(),
            bytes: 0,
        };
        let walked = w.walk_dir(Path::new(""), path, meta.dev(), meta.ino())?;
        let (files, bytes) = (w.files, w.bytes);
        return Ok(WalkResult {
            walked,
            mtime,
            top: Some(top),
            files,
            bytes,
        });
    }
    let kind = if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Err(ImportError::path(
        path,
        format!("is a {kind}; granary stores only files, directories and symlinks"),
    ))
}

/// Bytes read from a file at a time.
const READ_BUF_BYTES: usize = 1 << 20;

thread_local! {
    /// The read buffer of each import thread: zeroing a fresh 1 MiB buffer per file cost more
    /// than reading a small file.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Imports one regular file, streaming it into the store; runs on a blocking thread.
fn import_file_blocking(
    store: &Store,
    top: &Top,
    job: &FileJob,
    progress: &Progress,
) -> Result<(B3Digest, u64), ImportError> {
    let path = &job.shown;
    let fd = top
        .open(&job.rel, OFlags::RDONLY)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                ImportError::path(path, "became a symbolic link while being imported")
            }
            _ => ImportError::path(path, format!("cannot open: {e}")),
        })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| ImportError::path(path, e.to_string()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
        || st.st_dev != job.dev
        || st.st_ino != job.ino
    {
        return Err(ImportError::path(path, "changed while being imported"));
    }
    let size = st.st_size as u64;
    let file = std::fs::File::from(fd);
    let store_err = |e: StoreError| ImportError::Store {
        path: path.to_path_buf(),
        source: e,
    };
    let mut w = BlobWriter::new(store, PUTS_IN_FLIGHT);
    READ_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.is_empty() {
            buf.resize(READ_BUF_BYTES, 0);
        }
        use std::os::unix::fs::FileExt;
        let mut off = 0u64;
        // Read up to the size at open: a file that grows is imported as it was.
        while off < size {
            let want = ((size - off) as usize).min(buf.len());
            let n = match file.read_at(&mut buf[..want], off) {
                Ok(0) => {
                    return Err(ImportError::path(
                        path,
                        format!("shrank while being imported (read {off} of {size} bytes)"),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ImportError::path(path, format!("read failed: {e}"))),
            };
            w.write_blocking(&buf[..n]).map_err(store_err)?;
            off += n as u64;
            progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    })?;
    let done = w.finish_blocking().map_err(store_err)?;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok((done.digest, done.size))
}

/// Imports the tree at `path` and returns the node naming it. Symlinks at the top are
/// stored as symlinks, not followed.
pub async fn import_path(
    store: &Store,
    path: &Path,
    opts: &ImportOptions,
    progress: Arc<Progress>,
) -> Result<Imported, ImportError> {
    let WalkResult {
        walked,
        mtime,
        top,
        files,
        bytes,
    } = {
        let path = path.to_path_buf();
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || walk(&path, &opts))
            .await
            .map_err(|e| ImportError::Task(e.to_string()))??
    };
    progress.bytes_total.fetch_add(bytes, Ordering::Relaxed);
    progress
        .files_total
        .fetch_add(files.len() as u64, Ordering::Relaxed);
    let results = match top {
        Some(top) => import_files(store, Arc::new(top), files, opts, progress).await?,
        None => Vec::new(),
    };
    let node = put_tree(store, &walked, &results).await?;
    let (times, times_head) = if opts.no_times {
        (None, Vec::new())
    } else {
        let records = times_table(mtime, &walked);
        let top_entries = match &walked {
            Walked::Dir(children) => children.len(),
            _ => 0,
        };
        let w = write_all(store, &times::encode(&records))
            .await
            .map_err(|e| ImportError::Store {
                path: path.to_path_buf(),
                source: e,
            })?;
        let table = TimesRef {
            digest: w.digest,
            size: w.size,
        };
        (Some(table), times::head(&records, top_entries))
    };
    Ok(Imported {
        node,
        times,
        times_head,
    })
}

/// What an import made: the tree's node, and its table of times unless told not to record
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub node: Node,
    pub times: Option<TimesRef>,
    /// The table's head for a root record ([`times::head`]).
    pub times_head: Vec<i64>,
}

/// The mtimes of a walked tree in the table's order ([`crate::model::times`]): the top, then
/// each directory's entries as one block, directories depth first.
fn times_table(top: i64, walked: &Walked) -> Vec<i64> {
    let mut out = vec![top];
    let mut stack: Vec<&[(Bytes, i64, Walked)]> = Vec::new();
    if let Walked::Dir(children) = walked {
        stack.push(children);
    }
    while let Some(children) = stack.pop() {
        out.extend(children.iter().map(|(_, t, _)| *t));
        for (_, _, w) in children.iter().rev() {
            if let Walked::Dir(grand) = w {
                stack.push(grand);
            }
        }
    }
    out
}

/// Imports each path and records it as a root where a name is given: everything made
/// durable first, then the roots. Returns what each path became, in order.
pub async fn import_named(
    store: &Store,
    paths: &[(PathBuf, Option<String>)],
    opts: &ImportOptions,
    progress: Arc<Progress>,
) -> Result<Vec<Imported>, ImportError> {
    let mut nodes = Vec::with_capacity(paths.len());
    for (p, _) in paths {
        nodes.push(import_path(store, p, opts, progress.clone()).await?);
    }
    store.flush().await.map_err(|e| ImportError::Store {
        path: PathBuf::from("<store>"),
        source: e,
    })?;
    for ((p, name), node) in paths.iter().zip(&nodes) {
        if let Some(name) = name {
            // A new version of a tree keeps the traces of the old: most of what a job reads
            // is usually unchanged, and a traced chunk that is gone is skipped by a replay.
            // (A previous record that cannot be read is replaced, as before.)
            let previous_traces = match store.roots.get(name).await {
                Ok(Some(old)) => old.traces,
                _ => Vec::new(),
            };
            let root = crate::model::castore::RootRecord {
                name: name.clone(),
                node: node.node.clone(),
                nix: None,
                times: node.times,
                times_head: node.times_head.clone(),
                traces: previous_traces,
            };
            store
                .roots
                .put(&root)
                .await
                .map_err(|e| ImportError::Store {
                    path: p.clone(),
                    source: e,
                })?;
        }
    }
    Ok(nodes)
}

/// Imports every file, `parallelism` at a time; results in job order.
async fn import_files(
    store: &Store,
    top: Arc<Top>,
    files: Vec<FileJob>,
    opts: &ImportOptions,
    progress: Arc<Progress>,
) -> Result<Vec<(B3Digest, u64)>, ImportError> {
    use futures::stream::{StreamExt, TryStreamExt};
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let parallelism = opts.parallelism.unwrap_or(cores * 2).max(1);
    futures::stream::iter(files)
        .map(|job| {
            let (store, top, progress) = (store.clone(), top.clone(), progress.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    import_file_blocking(&store, &top, &job, &progress)
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
        children: &'a [(Bytes, i64, Walked)],
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
            frame.dir.add(name, &Node::Directory { digest, size });
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
        let (name, _, child) = &frame.children[frame.next];
        frame.next += 1;
        match child {
            Walked::Dir(grand) => stack.push(Frame {
                children: grand,
                next: 0,
                dir: Directory::default(),
            }),
            Walked::File { executable, job } => {
                let (digest, size) = files[*job];
                let node = Node::File {
                    digest,
                    size,
                    executable: *executable,
                };
                frame.dir.add(name.clone(), &node);
            }
            Walked::Symlink(target) => frame.dir.add(
                name.clone(),
                &Node::Symlink {
                    target: target.clone(),
                },
            ),
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
