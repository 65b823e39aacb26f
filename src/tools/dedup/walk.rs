//! The trees and NARs given on the command line: walked (metadata only), then scanned in parallel.

#[allow(unused_imports)]
use super::*;

/// The tree under one PATH, as walked: metadata only.
pub(super) enum Walked {
    Dir(Vec<(Bytes, Walked)>),
    File { executable: bool, job: usize },
    Symlink(Bytes),
}

#[derive(Default)]
pub(super) struct Walk {
    pub(super) files: Vec<(PathBuf, u64)>,
    pub(super) bytes: u64,
    pub(super) dirs: u64,
    pub(super) symlinks: u64,
    pub(super) skipped: u64,
}

/// The first bytes of every NAR file.
pub(super) const NAR_MAGIC: &[u8] = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1";

impl Walk {
    pub(super) fn walk(&mut self, path: &Path, top: bool) -> Result<Option<Walked>, DedupError> {
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| DedupError::path(path, format!("cannot stat: {e}")))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = std::fs::read_link(path)
                .map_err(|e| DedupError::path(path, format!("cannot read link: {e}")))?;
            self.symlinks += 1;
            Ok(Some(Walked::Symlink(Bytes::copy_from_slice(
                target.as_os_str().as_bytes(),
            ))))
        } else if ft.is_file() {
            // NAR files are unpacked by the caller (see `cli::dedup`) before the walk.
            let job = self.files.len();
            self.files.push((path.to_path_buf(), meta.len()));
            self.bytes += meta.len();
            Ok(Some(Walked::File {
                executable: meta.permissions().mode() & 0o100 != 0,
                job,
            }))
        } else if ft.is_dir() {
            self.dirs += 1;
            let rd = std::fs::read_dir(path)
                .map_err(|e| DedupError::path(path, format!("cannot read directory: {e}")))?;
            // Entries in name order, as an import takes them: files are read (and their small
            // chunks grouped) in the order a store would pack them.
            let mut names = Vec::new();
            for entry in rd {
                let entry = entry
                    .map_err(|e| DedupError::path(path, format!("cannot read directory: {e}")))?;
                names.push(entry.file_name());
            }
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            let mut children = Vec::new();
            for name in names {
                if let Some(node) = self.walk(&path.join(&name), false)? {
                    children.push((Bytes::copy_from_slice(name.as_bytes()), node));
                }
            }
            Ok(Some(Walked::Dir(children)))
        } else if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket() {
            if top {
                return Err(DedupError::path(
                    path,
                    "is a special file; granary analyses files, directories and symlinks",
                ));
            }
            // A store cannot hold these; analysis leaves them out and counts them.
            self.skipped += 1;
            Ok(None)
        } else {
            Err(DedupError::path(path, "unknown file type"))
        }
    }
}

/// Whether a file starts with the NAR magic.
pub fn is_nar(path: &Path) -> Result<bool, DedupError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| DedupError::path(path, format!("cannot open: {e}")))?;
    let mut head = [0u8; 21];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DedupError::path(path, format!("read failed: {e}"))),
        }
    }
    Ok(&head[..n] == NAR_MAGIC)
}

/// Computes (and records) the directories of a walked tree bottom-up; returns the top node.
pub(super) fn account_tree(
    shared: &Shared,
    node: &Walked,
    files: &[(B3Digest, u64)],
) -> Result<Node, DedupError> {
    Ok(match node {
        Walked::File { executable, job } => {
            let (digest, size) = files[*job];
            Node::File {
                digest,
                size,
                executable: *executable,
            }
        }
        Walked::Symlink(t) => Node::Symlink { target: t.clone() },
        Walked::Dir(children) => {
            let mut dir = Directory::default();
            for (name, child) in children {
                let node = account_tree(shared, child, files)?;
                dir.add(name.clone(), &node);
            }
            let size = dir
                .size()
                .map_err(|e| DedupError::Task(format!("directory size: {e}")))?;
            let digest = shared.add_dir(&dir);
            Node::Directory { digest, size }
        }
    })
}

/// Runs `work(worker, job)` for every job on `jobs` threads; the first error stops the rest.
pub(super) fn run_parallel<T: Send>(
    shared: &Shared,
    jobs: usize,
    n: usize,
    work: impl Fn(&mut Worker<'_>, usize) -> Result<T, DedupError> + Sync,
) -> Result<Vec<Option<T>>, DedupError> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_err: Mutex<Option<DedupError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| {
                let mut worker = match Worker::new(shared) {
                    Ok(w) => w,
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        lock(&first_err).get_or_insert(e);
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    match work(&mut worker, i) {
                        Ok(v) => lock(&results)[i] = Some(v),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            lock(&first_err).get_or_insert(e);
                        }
                    }
                }
                if let Err(e) = worker.finish() {
                    lock(&first_err).get_or_insert(e);
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|e| e.into_inner()))
}

pub(super) fn default_jobs(opts: &DedupOptions) -> usize {
    opts.jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

/// Read buffer per file.
pub(super) const READ_BUF: usize = 256 << 10;

pub(super) fn scan_file(
    worker: &mut Worker<'_>,
    path: &Path,
    progress: &Progress,
) -> Result<(B3Digest, u64), DedupError> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| DedupError::path(path, format!("cannot open: {e}")))?;
    let mut buf = vec![0u8; READ_BUF];
    let mut scan = worker.scan();
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DedupError::path(path, format!("read failed: {e}"))),
        };
        scan.push(&buf[..n])?;
        progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
    }
    let r = scan.finish()?;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(r)
}
