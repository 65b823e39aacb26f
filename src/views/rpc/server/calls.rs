//! The daemon's calls that take more than a few lines: blob, blob index and closure puts (each checked before anything is stored), and chunk frames.

#[allow(unused_imports)]
use super::*;

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

    pub(super) fn has_feature(&self, f: &str) -> bool {
        self.features.iter().any(|x| x == f)
    }

    pub(super) fn need(&self, f: &str) -> Result<(), Status> {
        if self.has_feature(f) {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "this daemon does not offer feature {f:?}"
            )))
        }
    }

    /// Counts an error before handing it back.
    pub(super) fn fail<T>(&self, r: Result<T, Status>) -> Result<T, Status> {
        if r.is_err() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    pub(super) fn inb(&self, n: usize) {
        self.counters
            .bytes_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(super) async fn put_blob_inner(
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

    pub(super) async fn put_blob_index_inner(
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

    pub(super) async fn put_closure_inner(
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
    pub(super) async fn check_node_stored(&self, node: &Node) -> Result<(), Status> {
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
pub(super) fn chunk_frames(
    digest: &B3Digest,
    data: Option<Bytes>,
) -> Vec<Result<proto::ChunkFrame, Status>> {
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
