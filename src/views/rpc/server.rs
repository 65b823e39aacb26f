//! The daemon's side of the protocol: serves one [`Store`] over gRPC. Everything it receives
//! is untrusted: digests are computed here, directories are validated as a graph, sizes are
//! bounded before anything is allocated from them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::ingest::Sessions;
use crate::model::castore::{self, B3Digest, Directory, Node};
use crate::model::chunking::MAX_CHUNK;
use crate::store::blob_writer::{self, BlobWriter};
use crate::store::remote::wire::proto::{self, granary_server::Granary};
use crate::store::remote::wire::{
    self, digest_bytes, feature, root_from_proto, root_to_proto, FRAME_BYTES, MAX_BATCH, MAX_INLINE,
};
use crate::store::{Store, StoreError};

/// Most directories one closure put may carry, and their total encoded bytes.
pub const MAX_CLOSURE_DIRS: usize = 1 << 20;
pub const MAX_CLOSURE_BYTES: usize = 256 << 20;

/// The daemon's counters, reported by the `Stats` call.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub in_flight: AtomicU64,
    pub connections: AtomicU64,
}

/// Counts a call as in flight until dropped.
struct InFlight(Arc<Counters>);

impl InFlight {
    fn new(c: &Arc<Counters>) -> Self {
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The service implementation; cheap to clone (one per listener shares the same state).
#[derive(Clone)]
pub struct Daemon {
    store: Store,
    features: Arc<Vec<String>>,
    counters: Arc<Counters>,
    sessions: Arc<Sessions>,
}

/// Maps a store error to the status a client sees.
pub fn status_of(e: StoreError) -> Status {
    match &e {
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Model(_) => Status::invalid_argument(e.to_string()),
        StoreError::Corrupt { .. } => Status::data_loss(e.to_string()),
        StoreError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn bad_digest(what: &str, b: &[u8]) -> Result<B3Digest, Status> {
    B3Digest::try_from(b).map_err(|e| Status::invalid_argument(format!("{what}: {e}")))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Daemon {
    pub fn new(store: Store, disabled: &[String], sessions: Arc<Sessions>) -> Self {
        let features = feature::ALL
            .iter()
            .filter(|f| !disabled.iter().any(|d| d == *f))
            .map(|f| f.to_string())
            .collect();
        Self {
            store,
            features: Arc::new(features),
            counters: Arc::new(Counters::default()),
            sessions,
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn has_feature(&self, f: &str) -> bool {
        self.features.iter().any(|x| x == f)
    }

    fn need(&self, f: &str) -> Result<(), Status> {
        if self.has_feature(f) {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "this daemon does not offer feature {f:?}"
            )))
        }
    }

    /// Counts an error before handing it back.
    fn fail<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if r.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn inb(&self, n: usize) {
        self.counters
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    async fn put_blob_inner(
        &self,
        mut stream: Streaming<proto::PutBlobFrame>,
    ) -> Result<proto::PutBlobResponse, Status> {
        use proto::put_blob_frame::Frame;
        let header = match stream.message().await? {
            Some(proto::PutBlobFrame {
                frame: Some(Frame::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "put blob: first frame must be a header",
                ))
            }
        };
        if header.single_chunk && header.size > MAX_CHUNK as u64 {
            return Err(Status::invalid_argument(format!(
                "put blob: a single chunk of {} bytes is over the {MAX_CHUNK}-byte limit",
                header.size
            )));
        }
        let mut received = 0u64;
        // A single chunk is kept whole (the client decided it is one chunk); anything else
        // goes through the store's one blob writer.
        let mut single = BytesMut::new();
        let mut writer = (!header.single_chunk)
            .then(|| BlobWriter::new(&self.store, blob_writer::PUTS_IN_FLIGHT));
        while let Some(frame) = stream.message().await? {
            let Some(Frame::Data(data)) = frame.frame else {
                return Err(Status::invalid_argument("put blob: a second header"));
            };
            self.inb(data.len());
            received += data.len() as u64;
            if received > header.size {
                return Err(Status::invalid_argument(format!(
                    "put blob: more than the announced {} bytes",
                    header.size
                )));
            }
            match &mut writer {
                Some(w) => w.write(&data).await.map_err(status_of)?,
                None => single.extend_from_slice(&data),
            }
        }
        if received != header.size {
            // Truncated: no index and no root may point at this; whole chunks already stored
            // are complete objects that nothing references.
            return Err(Status::invalid_argument(format!(
                "put blob: truncated upload ({received} of {} bytes)",
                header.size
            )));
        }
        let (digest, chunks) = match writer {
            Some(w) => {
                let done = w.finish().await.map_err(status_of)?;
                (done.digest, done.chunks)
            }
            None => {
                let single = single.freeze();
                let d = B3Digest::of(&single);
                if !single.is_empty() {
                    self.store
                        .blobs
                        .put_chunk(d, single)
                        .await
                        .map_err(status_of)?;
                }
                (d, usize::from(received > 0))
            }
        };
        Ok(proto::PutBlobResponse {
            digest: digest_bytes(&digest),
            size: received,
            chunks: chunks as u32,
        })
    }

    async fn put_blob_index_inner(
        &self,
        req: proto::PutBlobIndexRequest,
    ) -> Result<proto::PutBlobIndexResponse, Status> {
        let blob = bad_digest("blob", &req.blob)?;
        let idx = req
            .index
            .ok_or_else(|| Status::invalid_argument("put blob index: no index"))?;
        idx.validate()
            .map_err(|e| Status::invalid_argument(format!("blob index: {e}")))?;
        // The client's claim is checked: the chunks, in order, must hash to the blob digest;
        // the outboard stored is the one computed here, whatever the client sent.
        let mut whole = crate::store::outboard::TreeHasher::new();
        for c in &idx.chunks {
            let d = bad_digest("chunk", &c.digest)?;
            let data = self
                .store
                .blobs
                .read_chunk(&d)
                .await
                .map_err(status_of)?
                .ok_or_else(|| {
                    Status::failed_precondition(format!("blob index: chunk {d} is not stored"))
                })?;
            if data.len() as u64 != c.size {
                return Err(Status::invalid_argument(format!(
                    "blob index: chunk {d} is {} bytes, index says {}",
                    data.len(),
                    c.size
                )));
            }
            whole.update(&data);
        }
        let (actual, outboard) = whole.finish();
        if actual != blob {
            return Err(Status::invalid_argument(format!(
                "blob index: chunks hash to {actual}, not {blob}"
            )));
        }
        let mut idx = idx;
        idx.outboard = Bytes::from(outboard);
        if idx.chunks.len() > 1 {
            self.store
                .blobs
                .put_blob_index(blob, &idx)
                .await
                .map_err(status_of)?;
        }
        Ok(proto::PutBlobIndexResponse {})
    }

    async fn put_closure_inner(
        &self,
        mut stream: Streaming<castore::proto::Directory>,
    ) -> Result<proto::PutClosureResponse, Status> {
        // Everything is received and checked before anything is stored: all-or-nothing.
        let mut dirs: Vec<(B3Digest, Directory)> = Vec::new();
        let mut index: HashMap<B3Digest, usize> = HashMap::new();
        let mut total = 0usize;
        while let Some(dir) = stream.message().await? {
            if dirs.len() >= MAX_CLOSURE_DIRS {
                return Err(Status::invalid_argument(format!(
                    "put closure: more than {MAX_CLOSURE_DIRS} directories"
                )));
            }
            let bytes = dir.encode_canonical();
            total += bytes.len();
            self.inb(bytes.len());
            if total > MAX_CLOSURE_BYTES {
                return Err(Status::invalid_argument(format!(
                    "put closure: more than {MAX_CLOSURE_BYTES} bytes"
                )));
            }
            // Re-decode from the canonical bytes so unknown fields cannot ride along.
            let dir = Directory::decode_valid(&bytes)
                .map_err(|e| Status::invalid_argument(format!("put closure: {e}")))?;
            let digest = B3Digest::of(&bytes);
            // Leaves first: every child must already be in this stream or in the store.
            for e in &dir.directories {
                let cd = bad_digest("child directory", &e.digest)?;
                let child = match index.get(&cd) {
                    Some(&i) => dirs[i].1.clone(),
                    None => self
                        .store
                        .dirs
                        .get(&cd)
                        .await
                        .map_err(status_of)?
                        .ok_or_else(|| {
                            Status::failed_precondition(format!(
                                "put closure: directory {digest} refers to {cd}, which is neither sent before it nor stored"
                            ))
                        })?,
                };
                Directory::check_child(e, &child)
                    .map_err(|e| Status::invalid_argument(format!("put closure: {e}")))?;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = index.entry(digest) {
                v.insert(dirs.len());
                dirs.push((digest, dir));
            }
        }
        let Some((root, _)) = dirs.last().cloned() else {
            return Err(Status::invalid_argument("put closure: no directories"));
        };
        // Every directory sent must be reachable from the root (the last one).
        let mut seen = HashSet::from([root]);
        let mut queue = VecDeque::from([root]);
        while let Some(d) = queue.pop_front() {
            if let Some(&i) = index.get(&d) {
                for e in &dirs[i].1.directories {
                    let cd = bad_digest("child directory", &e.digest)?;
                    if seen.insert(cd) {
                        queue.push_back(cd);
                    }
                }
            }
        }
        if let Some((stray, _)) = dirs.iter().find(|(d, _)| !seen.contains(d)) {
            return Err(Status::invalid_argument(format!(
                "put closure: directory {stray} is not reachable from the root {root}"
            )));
        }
        for (_, dir) in &dirs {
            self.store.dirs.put(dir).await.map_err(status_of)?;
        }
        Ok(proto::PutClosureResponse {
            root: digest_bytes(&root),
            directories: dirs.len() as u32,
        })
    }

    /// A root may only point at something stored (a truncated upload leaves no root).
    async fn check_node_stored(&self, node: &Node) -> Result<(), Status> {
        let present = match node {
            Node::Directory { digest, .. } => {
                self.store.dirs.has(digest).await.map_err(status_of)?
            }
            Node::File { digest, size, .. } => match self.store.blobs.stat(digest).await {
                Ok(Some(meta)) if meta.size == *size => true,
                Ok(Some(meta)) => {
                    return Err(Status::invalid_argument(format!(
                        "root: blob {digest} is {} bytes, root says {size}",
                        meta.size
                    )))
                }
                Ok(None) => false,
                Err(e) => return Err(status_of(e)),
            },
            Node::Symlink { .. } => true,
        };
        if present {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "root points at {} which is not stored",
                node.digest().map(|d| d.to_hex()).unwrap_or_default()
            )))
        }
    }
}

/// Splits a chunk into frames no larger than [`FRAME_BYTES`].
fn chunk_frames(digest: &B3Digest, data: Option<Bytes>) -> Vec<Result<proto::ChunkFrame, Status>> {
    let digest = digest_bytes(digest);
    let Some(data) = data else {
        return vec![Ok(proto::ChunkFrame {
            digest,
            found: false,
            ..Default::default()
        })];
    };
    let total = data.len() as u64;
    if data.is_empty() {
        return vec![Ok(proto::ChunkFrame {
            digest,
            found: true,
            offset: 0,
            total,
            data,
        })];
    }
    (0..data.len())
        .step_by(FRAME_BYTES)
        .map(|off| {
            Ok(proto::ChunkFrame {
                digest: digest.clone(),
                found: true,
                offset: off as u64,
                total,
                data: data.slice(off..(off + FRAME_BYTES).min(data.len())),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl Granary for Daemon {
    async fn handshake(
        &self,
        req: Request<proto::HandshakeRequest>,
    ) -> Result<Response<proto::HandshakeResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let req = req.into_inner();
        if let Some(missing) = req.required.iter().find(|f| !self.has_feature(f)) {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Err(Status::failed_precondition(format!(
                "daemon lacks required feature {missing:?} (it offers: {})",
                self.features.join(", ")
            )));
        }
        // Unknown features the client mentions are simply not in the intersection.
        let features = req
            .features
            .into_iter()
            .filter(|f| self.has_feature(f))
            .collect();
        let p = self.store.params();
        Ok(Response::new(proto::HandshakeResponse {
            features,
            offered: self.features.to_vec(),
            chunking: Some(proto::ChunkingParams {
                min: p.min,
                avg: p.avg,
                max: p.max,
            }),
        }))
    }

    async fn stat_blob(
        &self,
        req: Request<proto::StatBlobRequest>,
    ) -> Result<Response<proto::StatBlobResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = async {
            let d = bad_digest("blob", &req.get_ref().digest)?;
            let meta = self.store.blobs.stat(&d).await.map_err(status_of)?;
            Ok(Response::new(match meta {
                None => proto::StatBlobResponse::default(),
                Some(m) => {
                    let inline = if req.get_ref().want_inline
                        && self.has_feature(feature::STAT_INLINE)
                        && m.chunks.len() == 1
                        && m.size <= MAX_INLINE
                    {
                        let data = self.store.blobs.read_chunk(&d).await.map_err(status_of)?;
                        let data = data.unwrap_or_default();
                        self.counters
                            .bytes_out
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        data
                    } else {
                        Bytes::new()
                    };
                    proto::StatBlobResponse {
                        found: true,
                        size: m.size,
                        chunks: m.to_index().chunks,
                        inline,
                        outboard: m.outboard,
                    }
                }
            }))
        }
        .await;
        self.fail(r)
    }

    type ReadChunksStream = BoxStream<proto::ChunkFrame>;

    async fn read_chunks(
        &self,
        req: Request<proto::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let guard = InFlight::new(&self.counters);
        let req = req.into_inner();
        let r = (|| {
            self.need(feature::CHUNKED_READ)?;
            if req.digests.len() > 1 {
                self.need(feature::BATCH_READ)?;
            }
            if req.digests.len() > MAX_BATCH {
                return Err(Status::invalid_argument(format!(
                    "read chunks: {} digests, at most {MAX_BATCH} per call",
                    req.digests.len()
                )));
            }
            req.digests
                .iter()
                .map(|d| bad_digest("chunk", d))
                .collect::<Result<Vec<_>, _>>()
        })();
        let digests = self.fail(r)?;
        let blobs = self.store.blobs.clone();
        let counters = self.counters.clone();
        let stream = futures::stream::iter(digests)
            .map(move |d| {
                let blobs = blobs.clone();
                async move { (d, blobs.read_chunk(&d).await) }
            })
            .buffered(4)
            .flat_map(move |(d, res)| {
                let _keep = &guard;
                let frames = match res {
                    Ok(data) => {
                        if let Some(b) = &data {
                            counters
                                .bytes_out
                                .fetch_add(b.len() as u64, Ordering::Relaxed);
                        }
                        chunk_frames(&d, data)
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        vec![Err(status_of(e))]
                    }
                };
                futures::stream::iter(frames)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<proto::PutBlobFrame>>,
    ) -> Result<Response<proto::PutBlobResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "put blob"))?;
        self.fail(self.need(feature::BLOB_PUT))?;
        let r = self.put_blob_inner(req.into_inner()).await;
        self.fail(r).map(Response::new)
    }

    async fn put_blob_index(
        &self,
        req: Request<proto::PutBlobIndexRequest>,
    ) -> Result<Response<proto::PutBlobIndexResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "put blob index"))?;
        let r = self.put_blob_index_inner(req.into_inner()).await;
        self.fail(r).map(Response::new)
    }

    async fn get_directory(
        &self,
        req: Request<proto::DigestRequest>,
    ) -> Result<Response<proto::GetDirectoryResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = async {
            let d = bad_digest("directory", &req.get_ref().digest)?;
            let dir = self.store.dirs.get(&d).await.map_err(status_of)?;
            Ok(Response::new(proto::GetDirectoryResponse {
                found: dir.is_some(),
                directory: dir,
            }))
        }
        .await;
        self.fail(r)
    }

    type GetClosureStream = BoxStream<castore::proto::Directory>;

    async fn get_closure(
        &self,
        req: Request<proto::DigestRequest>,
    ) -> Result<Response<Self::GetClosureStream>, Status> {
        let guard = InFlight::new(&self.counters);
        self.fail(self.need(feature::CLOSURE_GET))?;
        let root = self.fail(bad_digest("directory", &req.get_ref().digest))?;
        let dirs = self.store.dirs.clone();
        // Breadth first from the root, each directory once: the root is the first message.
        let state = (
            VecDeque::from([root]),
            HashSet::from([root]),
            dirs,
            guard,
            true,
        );
        let stream =
            futures::stream::unfold(state, |(mut queue, mut seen, dirs, g, first)| async move {
                let d = queue.pop_front()?;
                let item = match dirs.get(&d).await {
                    Ok(Some(dir)) => {
                        for e in &dir.directories {
                            if let Ok(cd) = B3Digest::try_from(&e.digest[..]) {
                                if seen.insert(cd) {
                                    queue.push_back(cd);
                                }
                            }
                        }
                        Ok(dir)
                    }
                    Ok(None) if first => Err(Status::not_found(format!("directory {d} not found"))),
                    Ok(None) => Err(Status::data_loss(format!(
                        "directory {d} of the closure is missing from the store"
                    ))),
                    Err(e) => Err(status_of(e)),
                };
                if item.is_err() {
                    g.0.errors.fetch_add(1, Ordering::Relaxed);
                    queue.clear();
                }
                Some((item, (queue, seen, dirs, g, false)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put_closure(
        &self,
        req: Request<Streaming<castore::proto::Directory>>,
    ) -> Result<Response<proto::PutClosureResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "put closure"))?;
        let r = self.put_closure_inner(req.into_inner()).await;
        self.fail(r).map(Response::new)
    }

    async fn get_root(
        &self,
        req: Request<proto::RootName>,
    ) -> Result<Response<proto::GetRootResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = async {
            let root = self
                .store
                .roots
                .get(&req.get_ref().name)
                .await
                .map_err(status_of)?;
            Ok(Response::new(proto::GetRootResponse {
                found: root.is_some(),
                root: root.as_ref().map(root_to_proto),
            }))
        }
        .await;
        self.fail(r)
    }

    async fn list_roots(
        &self,
        _req: Request<proto::ListRootsRequest>,
    ) -> Result<Response<proto::ListRootsResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = self.store.roots.list().await.map_err(status_of);
        self.fail(r)
            .map(|names| Response::new(proto::ListRootsResponse { names }))
    }

    async fn put_root(
        &self,
        req: Request<castore::proto::Root>,
    ) -> Result<Response<proto::PutRootResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "put root"))?;
        let r = async {
            let rec = root_from_proto(req.get_ref())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.check_node_stored(&rec.node).await?;
            self.store.roots.put(&rec).await.map_err(status_of)?;
            Ok(Response::new(proto::PutRootResponse {}))
        }
        .await;
        self.fail(r)
    }

    async fn delete_root(
        &self,
        req: Request<proto::RootName>,
    ) -> Result<Response<proto::DeleteRootResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "delete root"))?;
        let r = self
            .store
            .roots
            .delete(&req.get_ref().name)
            .await
            .map_err(status_of);
        self.fail(r)
            .map(|existed| Response::new(proto::DeleteRootResponse { existed }))
    }

    async fn ingest_start(
        &self,
        req: Request<Streaming<proto::IngestFrame>>,
    ) -> Result<Response<proto::IngestStartResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "ingest"))?;
        self.fail(self.need(feature::INGEST_SESSIONS))?;
        let r = self
            .sessions
            .start(self.store.clone(), req.into_inner())
            .await;
        self.fail(r).map(|(token, bytes)| {
            self.inb(bytes as usize);
            Response::new(proto::IngestStartResponse { token })
        })
    }

    async fn ingest_status(
        &self,
        req: Request<proto::IngestStatusRequest>,
    ) -> Result<Response<proto::IngestStatusResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = self.sessions.status(&req.get_ref().token);
        self.fail(r).map(Response::new)
    }

    async fn stats(
        &self,
        _req: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let c = &self.counters;
        let s = self.sessions.counts();
        let mut resp = proto::StatsResponse {
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            // This call itself is not counted as in flight.
            in_flight: c.in_flight.load(Ordering::Relaxed).saturating_sub(1),
            connections: c.connections.load(Ordering::Relaxed),
            sessions_started: s.started,
            sessions_running: s.running,
            sessions_done: s.done,
            sessions_failed: s.failed,
            ..Default::default()
        };
        if let Some(m) = &self.store.maintenance {
            let u = m.usage().await.map_err(status_of)?;
            resp.has_usage = true;
            resp.chunks = u.chunks;
            resp.blob_indexes = u.blob_indexes;
            resp.directories = u.directories;
            resp.roots = u.roots;
            resp.chunk_bytes = u.chunk_bytes;
            resp.stored_bytes = u.stored_bytes;
        }
        Ok(Response::new(resp))
    }

    type ListObjectsStream = BoxStream<proto::ObjectBatch>;

    async fn list_objects(
        &self,
        req: Request<proto::ListObjectsRequest>,
    ) -> Result<Response<Self::ListObjectsStream>, Status> {
        let _g = InFlight::new(&self.counters);
        self.need(feature::MAINTENANCE)?;
        let kind = proto::ObjectKind::try_from(req.get_ref().kind)
            .map_err(|_| Status::invalid_argument("unknown object kind"))?;
        let m = self.maintenance()?;
        let r = m.list(wire::kind_from_proto(kind)).await.map_err(status_of);
        let all = self.fail(r)?;
        // Batches keep every message far below the message size limit.
        let batches: Vec<Result<proto::ObjectBatch, Status>> = all
            .chunks(8192)
            .map(|part| {
                Ok(proto::ObjectBatch {
                    objects: part
                        .iter()
                        .map(|o| proto::ObjectEntry {
                            digest: Bytes::copy_from_slice(o.digest.as_bytes()),
                            stored_bytes: o.stored_bytes,
                            modified_unix_nanos: wire::to_nanos(o.modified),
                        })
                        .collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn delete_object(
        &self,
        req: Request<proto::DeleteObjectRequest>,
    ) -> Result<Response<proto::DeleteObjectResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "delete object"))?;
        self.need(feature::MAINTENANCE)?;
        let req = req.into_inner();
        let kind = wire::kind_from_proto(
            proto::ObjectKind::try_from(req.kind)
                .map_err(|_| Status::invalid_argument("unknown object kind"))?,
        );
        let digest = B3Digest::try_from(&req.digest[..])
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let m = self.maintenance()?;
        let r = if req.unconditional {
            m.remove(kind, &digest).await.map(|()| true)
        } else {
            m.delete_if_older(kind, &digest, wire::from_nanos(req.cutoff_unix_nanos))
                .await
        };
        let deleted = self.fail(r.map_err(status_of))?;
        Ok(Response::new(proto::DeleteObjectResponse { deleted }))
    }

    async fn sweep_temp(
        &self,
        req: Request<proto::SweepTempRequest>,
    ) -> Result<Response<proto::SweepTempResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        self.fail(writable(&req, "sweep temp"))?;
        self.need(feature::MAINTENANCE)?;
        let m = self.maintenance()?;
        let r = m
            .sweep_temp(wire::from_nanos(req.get_ref().cutoff_unix_nanos))
            .await
            .map_err(status_of);
        let removed = self.fail(r)?;
        Ok(Response::new(proto::SweepTempResponse { removed }))
    }

    async fn flush(
        &self,
        _req: Request<proto::FlushRequest>,
    ) -> Result<Response<proto::FlushResponse>, Status> {
        let _g = InFlight::new(&self.counters);
        let r = self.store.flush().await.map_err(status_of);
        self.fail(r)?;
        Ok(Response::new(proto::FlushResponse {}))
    }
}

impl Daemon {
    fn maintenance(&self) -> Result<&Arc<dyn crate::store::Maintenance>, Status> {
        self.store.maintenance.as_ref().ok_or_else(|| {
            Status::unimplemented("the daemon's store cannot list or delete its objects")
        })
    }
}

/// Checks `authorization: Bearer <token>` on every call when the daemon has a token.
#[derive(Clone)]
pub struct Auth {
    /// The token that may do everything.
    pub token: Option<Arc<String>>,
    /// A token that may only read.
    pub read_only: Option<Arc<String>>,
    /// Whether a call without a token is refused (TCP) or let through (a Unix socket, whose
    /// file permissions already chose who may connect).
    pub required: bool,
}

/// What a call may do, as the auth check found it (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Full,
    ReadOnly,
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let matches = |t: &Option<Arc<String>>, g: &str| {
            t.as_ref()
                .is_some_and(|t| crate::views::token_matches(g.as_bytes(), t.as_bytes()))
        };
        let access =
            match given {
                Some(g) if matches(&self.token, &g) => Access::Full,
                Some(g) if matches(&self.read_only, &g) => Access::ReadOnly,
                Some(_) if self.token.is_some() || self.read_only.is_some() => {
                    return Err(Status::unauthenticated("wrong bearer token"))
                }
                _ if self.required => return Err(Status::unauthenticated(
                    "this daemon needs `authorization: Bearer <token>` (set GRANARY_TOKEN_FILE)",
                )),
                _ => Access::Full,
            };
        req.extensions_mut().insert(access);
        Ok(req)
    }
}

/// Refuses a call that writes or deletes to a read-only token.
fn writable<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Access>() {
        Some(Access::ReadOnly) => Err(Status::permission_denied(format!(
            "{what}: refused to a read-only token"
        ))),
        _ => Ok(()),
    }
}
