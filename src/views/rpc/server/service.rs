//! The gRPC service: each call counted, feature-checked, refused to a read-only token if it writes, and answered from the store.

#[allow(unused_imports)]
use super::*;

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
        self.counters
            .chunk_read_calls
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .chunks_read
            .fetch_add(digests.len() as u64, Ordering::Relaxed);
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
            chunk_read_calls: c.chunk_read_calls.load(Ordering::Relaxed),
            chunks_read: c.chunks_read.load(Ordering::Relaxed),
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
