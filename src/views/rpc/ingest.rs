//! Ingest sessions: a client uploads a whole tree in one stream; the daemon checks what is
//! cheap (framing, names, size limits) while spooling the bytes to an anonymous temp file,
//! answers with a session token as soon as the upload is complete, and chunks, hashes and
//! stores the tree in the background. The session outlives the client's connection; its
//! outcome is kept for a retention time, then forgotten.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

use crate::model::castore::{
    self, validate_name, validate_root_name, Directory, Node, RootRecord, SymlinkEntry,
};
use crate::model::times::{self, TimesRef};
use crate::store::blob_writer::{self, BlobWriter};
use crate::store::remote::wire::proto::{self, ingest_entry::Kind, ingest_frame::Frame};
use crate::store::remote::wire::root_to_proto;
use crate::store::{Store, StoreError};

/// What one upload may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
    /// Bytes of entry paths and symlink targets held in memory while a tree is imported.
    pub max_metadata: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 30,
            max_entries: 4 << 20,
            max_metadata: 512 << 20,
        }
    }
}

/// Longest entry path in an upload.
pub const MAX_PATH: usize = 64 << 10;

enum State {
    Running,
    Done(Box<castore::proto::Root>),
    Failed(String),
}

struct Session {
    bytes_total: u64,
    bytes_done: AtomicU64,
    state: Mutex<State>,
    finished: Mutex<Option<Instant>>,
}

impl Session {
    fn finish(&self, state: State) {
        if let Ok(mut s) = self.state.lock() {
            *s = state;
        }
        if let Ok(mut f) = self.finished.lock() {
            *f = Some(Instant::now());
        }
    }
}

/// Session counts for the `stats` call.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionCounts {
    pub started: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
}

/// All sessions of one daemon.
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    retention: Duration,
    spool_dir: PathBuf,
    limits: Limits,
    started: AtomicU64,
}

/// One entry of an upload, with where its bytes are in the spool file.
struct Spooled {
    path: Bytes,
    kind: Kind,
    executable: bool,
    size: u64,
    target: Bytes,
    offset: u64,
    mtime: Option<i64>,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(format!("ingest: {}", msg.into()))
}

fn lock_err() -> Status {
    Status::internal("ingest session table lock poisoned")
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Sessions {
    pub fn new(retention: Duration, spool_dir: PathBuf, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(HashMap::new()),
            retention,
            spool_dir,
            limits,
            started: AtomicU64::new(0),
        })
    }

    /// Forgets finished sessions older than the retention time, periodically, for as long
    /// as the sessions table lives.
    pub fn spawn_gc(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period =
            (self.retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(this) = weak.upgrade() else { return };
                this.gc();
            }
        });
    }

    pub fn gc(&self) {
        let Ok(mut map) = self.map.lock() else { return };
        map.retain(|_, s| match s.finished.lock().ok().and_then(|f| *f) {
            Some(t) => t.elapsed() < self.retention,
            None => true,
        });
    }

    pub fn counts(&self) -> SessionCounts {
        let mut c = SessionCounts {
            started: self.started.load(Ordering::Relaxed),
            ..Default::default()
        };
        if let Ok(map) = self.map.lock() {
            for s in map.values() {
                match s.state.lock().as_deref() {
                    Ok(State::Running) => c.running += 1,
                    Ok(State::Done(_)) => c.done += 1,
                    Ok(State::Failed(_)) => c.failed += 1,
                    Err(_) => {}
                }
            }
        }
        c
    }

    pub fn status(&self, token: &str) -> Result<proto::IngestStatusResponse, Status> {
        use proto::ingest_status_response::State as S;
        let s = self
            .map
            .lock()
            .map_err(|_| lock_err())?
            .get(token)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no ingest session {token:?} (unknown, or forgotten after the retention time)"
                ))
            })?;
        let state = match &*s.state.lock().map_err(|_| lock_err())? {
            State::Running => S::Running(proto::IngestRunning {
                bytes_done: s.bytes_done.load(Ordering::Relaxed),
                bytes_total: s.bytes_total,
            }),
            State::Done(root) => S::Done(proto::IngestDone {
                root: Some((**root).clone()),
            }),
            State::Failed(reason) => S::Failed(reason.clone()),
        };
        Ok(proto::IngestStatusResponse { state: Some(state) })
    }

    /// Receives and checks an upload, then starts its import in the background. Returns the
    /// session token and the bytes received.
    pub async fn start(
        &self,
        store: Store,
        mut stream: Streaming<proto::IngestFrame>,
    ) -> Result<(String, u64), Status> {
        let header = match stream.message().await? {
            Some(proto::IngestFrame {
                frame: Some(Frame::Header(h)),
            }) => h,
            _ => return Err(bad("the first frame must be a header")),
        };
        if !header.root_name.is_empty() {
            validate_root_name(&header.root_name)
                .map_err(|e| bad(format!("root name {:?}: {e}", header.root_name)))?;
        }
        let spool = tempfile::tempfile_in(&self.spool_dir).map_err(|e| {
            Status::internal(format!(
                "ingest: cannot create a spool file in {}: {e}",
                self.spool_dir.display()
            ))
        })?;
        let mut spool = tokio::fs::File::from_std(spool);
        let mut entries: Vec<Spooled> = Vec::new();
        let mut dirs: HashSet<Bytes> = HashSet::new();
        let mut paths: HashSet<Bytes> = HashSet::new();
        let mut remaining = 0u64;
        let mut written = 0u64;
        let mut metadata = 0u64;
        let mut ended = false;
        while let Some(frame) = stream.message().await? {
            if ended {
                return Err(bad("frames after the end frame"));
            }
            match frame.frame {
                Some(Frame::Entry(e)) => {
                    if remaining > 0 {
                        return Err(bad(format!(
                            "file {:?}: {remaining} bytes of data missing",
                            show(&entries.last().map(|s| s.path.clone()).unwrap_or_default())
                        )));
                    }
                    if entries.len() as u64 >= self.limits.max_entries {
                        return Err(bad(format!(
                            "more than {} entries",
                            self.limits.max_entries
                        )));
                    }
                    if e.path.len() > MAX_PATH {
                        return Err(bad(format!("a path of {} bytes", e.path.len())));
                    }
                    metadata += (e.path.len() + e.target.len()) as u64;
                    if metadata > self.limits.max_metadata {
                        return Err(bad(format!(
                            "more than {} bytes of paths and link targets",
                            self.limits.max_metadata
                        )));
                    }
                    let kind = Kind::try_from(e.kind).unwrap_or(Kind::Unspecified);
                    check_entry_path(&e.path, entries.is_empty(), &dirs, &paths)?;
                    match kind {
                        Kind::Directory => {
                            dirs.insert(e.path.clone());
                        }
                        Kind::File => {
                            let total = written.saturating_add(e.size);
                            if total > self.limits.max_bytes {
                                return Err(bad(format!(
                                    "more than {} bytes of file data",
                                    self.limits.max_bytes
                                )));
                            }
                            remaining = e.size;
                        }
                        Kind::Symlink => {
                            Directory {
                                symlinks: vec![SymlinkEntry {
                                    name: Bytes::from_static(b"x"),
                                    target: e.target.clone(),
                                }],
                                ..Default::default()
                            }
                            .validate()
                            .map_err(|err| bad(format!("{:?}: {err}", show(&e.path))))?;
                        }
                        Kind::Unspecified => {
                            return Err(bad(format!("{:?}: no entry kind", show(&e.path))))
                        }
                    }
                    paths.insert(e.path.clone());
                    entries.push(Spooled {
                        path: e.path,
                        kind,
                        executable: e.executable,
                        size: e.size,
                        target: e.target,
                        offset: written,
                        mtime: e.mtime_ns,
                    });
                }
                Some(Frame::Data(data)) => {
                    if data.len() as u64 > remaining {
                        return Err(bad("file data beyond the size its entry announced"));
                    }
                    spool
                        .write_all(&data)
                        .await
                        .map_err(|e| Status::internal(format!("ingest: spooling: {e}")))?;
                    remaining -= data.len() as u64;
                    written += data.len() as u64;
                }
                Some(Frame::End(end)) => {
                    if remaining > 0 {
                        return Err(bad(format!("{remaining} bytes of file data missing")));
                    }
                    if end.entries != entries.len() as u64 || end.bytes != written {
                        return Err(bad(format!(
                            "end frame counts {} entries and {} bytes, the upload held {} and {written}",
                            end.entries,
                            end.bytes,
                            entries.len()
                        )));
                    }
                    ended = true;
                }
                Some(Frame::Header(_)) => return Err(bad("a second header")),
                None => return Err(bad("an empty frame")),
            }
        }
        if !ended {
            // The stream stopped without its end frame: a truncated upload commits nothing.
            return Err(bad("upload truncated (no end frame)"));
        }
        if entries.is_empty() {
            return Err(bad("no entries"));
        }
        spool
            .flush()
            .await
            .map_err(|e| Status::internal(format!("ingest: spooling: {e}")))?;
        let spool = spool.into_std().await;

        let token = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Session {
            bytes_total: written,
            bytes_done: AtomicU64::new(0),
            state: Mutex::new(State::Running),
            finished: Mutex::new(None),
        });
        self.map
            .lock()
            .map_err(|_| lock_err())?
            .insert(token.clone(), session.clone());
        self.started.fetch_add(1, Ordering::Relaxed);
        let rt = tokio::runtime::Handle::current();
        let root_name = header.root_name;
        // Not tied to the client's call: the import finishes whether or not it is still there.
        tokio::task::spawn_blocking(move || {
            let outcome = build_tree(&rt, &store, &entries, &spool, &session).and_then(|node| {
                let (times, times_head) = match times_table(&entries) {
                    Some((t, top_entries)) => {
                        let mut w = BlobWriter::new(&store, blob_writer::PUTS_IN_FLIGHT);
                        w.write_blocking(&times::encode(&t))?;
                        let done = w.finish_blocking()?;
                        let table = TimesRef {
                            digest: done.digest,
                            size: done.size,
                        };
                        (Some(table), times::head(&t, top_entries))
                    }
                    None => (None, Vec::new()),
                };
                let rec = RootRecord {
                    name: root_name.clone(),
                    node,
                    nix: None,
                    times,
                    times_head,
                    traces: Vec::new(),
                };
                if !root_name.is_empty() {
                    rt.block_on(store.flush())?;
                    rt.block_on(store.roots.put(&rec))?;
                }
                Ok(rec)
            });
            match outcome {
                Ok(rec) => session.finish(State::Done(Box::new(root_to_proto(&rec)))),
                Err(e) => {
                    tracing::warn!("ingest session failed: {e}");
                    session.finish(State::Failed(e.to_string()));
                }
            }
        });
        Ok((token, written))
    }
}

/// Checks an entry's path: the first entry is the top (empty path); every other path is
/// `parent/name` with a valid name, a parent directory already sent, and no repeat.
fn check_entry_path(
    path: &Bytes,
    first: bool,
    dirs: &HashSet<Bytes>,
    paths: &HashSet<Bytes>,
) -> Result<(), Status> {
    if first {
        if !path.is_empty() {
            return Err(bad("the first entry must be the top (empty path)"));
        }
        return Ok(());
    }
    if path.is_empty() {
        return Err(bad("a second top entry"));
    }
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (path.slice(..i), path.slice(i + 1..)),
        None => (Bytes::new(), path.clone()),
    };
    validate_name(&name).map_err(|e| bad(format!("{:?}: {e}", show(path))))?;
    if !dirs.contains(&parent) {
        return Err(bad(format!(
            "{:?}: its parent was not sent as a directory before it",
            show(path)
        )));
    }
    if paths.contains(path) {
        return Err(bad(format!("{:?}: sent twice", show(path))));
    }
    Ok(())
}

/// Each directory's entries (by index), in name order.
fn children_of(entries: &[Spooled]) -> HashMap<&[u8], Vec<usize>> {
    let mut children: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, e) in entries.iter().enumerate().skip(1) {
        let parent = match e.path.iter().rposition(|&b| b == b'/') {
            Some(k) => &e.path[..k],
            None => &e.path[..0],
        };
        children.entry(parent).or_default().push(i);
    }
    // Siblings share their parent's prefix, so path order is name order.
    for kids in children.values_mut() {
        kids.sort_by(|&a, &b| entries[a].path.cmp(&entries[b].path));
    }
    children
}

/// The mtimes of an uploaded tree in the times table's order ([`crate::model::times`]), if
/// every entry came with one.
fn times_table(entries: &[Spooled]) -> Option<(Vec<i64>, usize)> {
    let mtimes = entries
        .iter()
        .map(|e| e.mtime)
        .collect::<Option<Vec<i64>>>()?;
    let children = children_of(entries);
    let mut out = vec![*mtimes.first()?];
    let top_entries = children.get(&entries[0].path[..]).map_or(0, |k| k.len());
    let mut stack = vec![0usize];
    while let Some(d) = stack.pop() {
        let Some(kids) = children.get(&entries[d].path[..]) else {
            continue;
        };
        out.extend(kids.iter().map(|&k| mtimes[k]));
        for &k in kids.iter().rev() {
            if entries[k].kind == Kind::Directory {
                stack.push(k);
            }
        }
    }
    Some((out, top_entries))
}

/// Imports a spooled tree (on a blocking thread): files chunked with the store's
/// parameters, then directories leaves first. Returns the top node.
fn build_tree(
    rt: &tokio::runtime::Handle,
    store: &Store,
    entries: &[Spooled],
    spool: &std::fs::File,
    session: &Session,
) -> Result<Node, StoreError> {
    let mut nodes: Vec<Option<Node>> = vec![None; entries.len()];
    let children = children_of(entries);
    let mut buf = vec![0u8; crate::store::remote::wire::FRAME_BYTES];
    for (i, e) in entries.iter().enumerate() {
        match e.kind {
            Kind::File => {
                let mut w = BlobWriter::new(store, blob_writer::PUTS_IN_FLIGHT);
                let mut off = 0u64;
                while off < e.size {
                    let n = (e.size - off).min(buf.len() as u64) as usize;
                    spool
                        .read_exact_at(&mut buf[..n], e.offset + off)
                        .map_err(|err| StoreError::io("reading the ingest spool", err))?;
                    w.write_blocking(&buf[..n])?;
                    off += n as u64;
                    session.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
                }
                let digest = w.finish_blocking()?.digest;
                nodes[i] = Some(Node::File {
                    digest,
                    size: e.size,
                    executable: e.executable,
                });
            }
            Kind::Symlink => {
                nodes[i] = Some(Node::Symlink {
                    target: e.target.clone(),
                });
            }
            _ => {}
        }
    }
    // Pre-order reversed puts every directory after everything below it.
    for i in (0..entries.len()).rev() {
        let e = &entries[i];
        if e.kind != Kind::Directory {
            continue;
        }
        let mut dir = Directory::default();
        let kids = children.get(&e.path[..]).cloned().unwrap_or_default();
        for k in kids {
            let name = match entries[k].path.iter().rposition(|&b| b == b'/') {
                Some(p) => entries[k].path.slice(p + 1..),
                None => entries[k].path.clone(),
            };
            match &nodes[k] {
                Some(node) => dir.add(name, node),
                None => {
                    return Err(StoreError::Backend(format!(
                        "ingest: {:?} was not built",
                        show(&entries[k].path)
                    )))
                }
            }
        }
        dir.directories.sort_by(|a, b| a.name.cmp(&b.name));
        dir.files.sort_by(|a, b| a.name.cmp(&b.name));
        dir.symlinks.sort_by(|a, b| a.name.cmp(&b.name));
        let size = dir.size()?;
        let digest = rt.block_on(store.dirs.put(&dir))?;
        nodes[i] = Some(Node::Directory { digest, size });
    }
    nodes[0]
        .clone()
        .ok_or_else(|| StoreError::Backend("ingest: empty tree".into()))
}
