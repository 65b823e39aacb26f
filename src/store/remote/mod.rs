//! `grpc+tcp://host:port` and `grpc+unix:///path`: a store served by `granary daemon`.
//!
//! Same contracts as the other backends, enforced here on what the daemon sends: chunks are
//! hashed (in the client), directories decoded, validated and hashed to the digest asked for,
//! roots validated. Puts send bytes and compare the digest the daemon computed.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{
    BlobMeta, BlobService, DirectoryService, Maintenance, Result, RootService, Store, StoreConfig,
    StoreError, Usage,
};
use crate::model::castore::{self, B3Digest, BlobIndex, Directory, RootRecord};
use client::{Client, ClientConfig};
use wire::{digest_bytes, feature, proto, root_from_proto, root_to_proto};

pub mod client;
pub mod upload;
pub mod wire;

/// Small blobs received inline with a stat, kept (verified) for the read that follows.
const INLINE_CACHE_ENTRIES: usize = 256;
/// Directories kept after a closure prefetch (verified; immutable, so never stale).
const DIR_CACHE_ENTRIES: usize = 16384;
/// Most directories one prefetch takes from a closure: a walk of a tree needs them all,
/// but a lookup in a huge tree must not pull the whole tree.
const PREFETCH_DIRS: usize = 2048;

/// The remote store; one client (and its connection pool) behind all three services.
#[derive(Clone)]
pub struct RemoteStore {
    client: Client,
    inline: Arc<Mutex<LruCache<B3Digest, Bytes>>>,
    dir_cache: Arc<Mutex<LruCache<B3Digest, Directory>>>,
}

fn verify_dir(digest: &B3Digest, dir: Directory) -> Result<Directory> {
    let bytes = dir.encode_canonical();
    let dir = Directory::decode_valid(&bytes)
        .map_err(|e| StoreError::corrupt("directory", digest, e.to_string()))?;
    let actual = B3Digest::of(&bytes);
    if actual != *digest {
        return Err(StoreError::corrupt(
            "directory",
            digest,
            format!("daemon sent a directory hashing to {actual}"),
        ));
    }
    Ok(dir)
}

impl RemoteStore {
    /// Connects (handshake included) and returns the store; fails naming a missing feature.
    pub async fn open(url: &str) -> Result<Store> {
        let remote = Arc::new(Self::connect(url).await?);
        let info = remote.client.info().await?;
        Ok(Store {
            url: url.to_string(),
            config: StoreConfig {
                chunking: info.chunking,
                ..StoreConfig::default()
            },
            blobs: remote.clone(),
            dirs: remote.clone(),
            roots: remote.clone(),
            ingest: remote
                .client
                .has_feature(feature::INGEST_SESSIONS)
                .then(|| remote.clone() as Arc<dyn super::IngestService>),
            maintenance: Some(remote),
        })
    }

    /// Connects to the daemon a URL names (handshake included).
    pub async fn connect(url: &str) -> Result<Self> {
        let cfg = ClientConfig::from_url(url).map_err(|reason| StoreError::Config {
            url: url.to_string(),
            reason,
        })?;
        let client = Client::new(cfg).map_err(|reason| StoreError::Config {
            url: url.to_string(),
            reason,
        })?;
        client.info().await?;
        let cap = NonZeroUsize::new(INLINE_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        let dcap = NonZeroUsize::new(DIR_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Ok(RemoteStore {
            client,
            inline: Arc::new(Mutex::new(LruCache::new(cap))),
            dir_cache: Arc::new(Mutex::new(LruCache::new(dcap))),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Reads several chunks in one call (verified); falls back to one call per chunk when
    /// the daemon does not offer batched reads.
    async fn read_batch(&self, digests: &[B3Digest]) -> Result<Vec<Option<Bytes>>> {
        if digests.len() <= 1 || self.client.has_feature(feature::BATCH_READ) {
            let mut out = Vec::with_capacity(digests.len());
            for part in digests.chunks(wire::MAX_BATCH) {
                out.extend(self.client.read_chunks(part).await?);
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            out.extend(self.client.read_chunks(std::slice::from_ref(d)).await?);
        }
        Ok(out)
    }

    /// The first `limit` directories of a closure (root first), each verified; empty if the
    /// root is absent.
    async fn closure_up_to(&self, root: &B3Digest, limit: usize) -> Result<Vec<Directory>> {
        let want = digest_bytes(root);
        let dirs = self
            .client
            .call("get closure", true, |mut api| {
                let want = want.clone();
                async move {
                    let mut s = match api.get_closure(proto::DigestRequest { digest: want }).await {
                        Ok(r) => r.into_inner(),
                        Err(e) if e.code() == tonic::Code::NotFound => return Ok(Vec::new()),
                        Err(e) => return Err(e),
                    };
                    let mut out = Vec::new();
                    while out.len() < limit {
                        match s.next().await {
                            Some(Ok(d)) => out.push(d),
                            Some(Err(e)) if e.code() == tonic::Code::NotFound && out.is_empty() => {
                                return Ok(Vec::new())
                            }
                            Some(Err(e)) => return Err(e),
                            None => break,
                        }
                    }
                    Ok(out)
                }
            })
            .await?;
        // The first is the root; every later one must be named by one received before it.
        let mut expected = std::collections::HashSet::from([*root]);
        let mut out = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let digest = B3Digest::of(&dir.encode_canonical());
            if !expected.contains(&digest) {
                return Err(StoreError::corrupt(
                    "directory closure",
                    root,
                    format!("daemon sent directory {digest}, which nothing before it names"),
                ));
            }
            let dir = verify_dir(&digest, dir)?;
            for e in &dir.directories {
                expected.insert(B3Digest::try_from(&e.digest[..])?);
            }
            out.push(dir);
        }
        Ok(out)
    }

    /// Puts directories (leaves first) in one all-or-nothing call; returns the root digest.
    async fn put_closure_call(&self, dirs: Vec<Directory>) -> Result<B3Digest> {
        for d in &dirs {
            d.validate()?;
        }
        let expected = dirs
            .last()
            .map(Directory::digest)
            .ok_or_else(|| StoreError::Backend("put closure: no directories".into()))?;
        let resp = self
            .client
            .call("put closure", true, |mut api| {
                let dirs = dirs.clone();
                async move {
                    Ok(api
                        .put_closure(futures::stream::iter(dirs))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        let got = B3Digest::try_from(&resp.root[..])?;
        if got != expected {
            return Err(StoreError::corrupt(
                "directory",
                &expected,
                format!("daemon stored it as {got}"),
            ));
        }
        Ok(got)
    }

    pub async fn stats(&self) -> Result<proto::StatsResponse> {
        self.client
            .call("stats", true, |mut api| async move {
                Ok(api.stats(proto::StatsRequest {}).await?.into_inner())
            })
            .await
    }
}

#[async_trait]
impl BlobService for RemoteStore {
    fn remote(&self) -> bool {
        true
    }

    async fn flush(&self) -> Result<()> {
        self.flush_remote().await
    }

    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        let want = digest_bytes(blob);
        let want_inline = self.client.has_feature(feature::STAT_INLINE);
        let resp = self
            .client
            .call("stat blob", true, |mut api| {
                let want = want.clone();
                async move {
                    Ok(api
                        .stat_blob(proto::StatBlobRequest {
                            digest: want,
                            want_inline,
                        })
                        .await?
                        .into_inner())
                }
            })
            .await?;
        if !resp.found {
            return Ok(None);
        }
        let idx = BlobIndex {
            chunks: resp.chunks,
            size: resp.size,
            outboard: resp.outboard,
            checksum: Bytes::new(),
        };
        let meta = BlobMeta::from_index(&idx)
            .map_err(|e| StoreError::corrupt("blob index", blob, e.to_string()))?;
        // A one-chunk blob is its own chunk; an empty blob has none.
        let consistent = match meta.chunks.as_slice() {
            [] => meta.size == 0 && *blob == super::empty_blob(),
            [one] => one.digest == *blob,
            _ => true,
        };
        if !consistent {
            return Err(StoreError::corrupt(
                "blob index",
                blob,
                "daemon's chunk list does not fit the blob digest",
            ));
        }
        // Inline bytes are kept only if they are exactly the blob.
        if !resp.inline.is_empty() && meta.chunks.len() == 1 {
            if B3Digest::of(&resp.inline) == *blob {
                if let Ok(mut c) = self.inline.lock() {
                    c.put(*blob, resp.inline);
                }
            } else {
                tracing::error!("inline bytes of blob {blob} from the daemon do not hash to it");
            }
        }
        Ok(Some(meta))
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        if let Some(b) = self
            .inline
            .lock()
            .ok()
            .and_then(|mut c| c.get(chunk).cloned())
        {
            return Ok(Some(b));
        }
        Ok(self
            .client
            .read_chunks(std::slice::from_ref(chunk))
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    /// The whole batch in one streamed call per [`wire::MAX_BATCH`] chunks (where the daemon
    /// offers batched reads), each chunk verified before it is handed on.
    async fn read_chunks(&self, chunks: Vec<super::ChunkRef>, sink: super::ChunkSink) {
        let digests: Vec<B3Digest> = chunks.iter().map(|c| c.digest).collect();
        for part in digests.chunks(wire::MAX_BATCH) {
            match self.read_batch(part).await {
                Ok(got) => {
                    for (d, r) in part.iter().zip(got) {
                        sink(*d, Ok(r));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for d in part {
                        sink(*d, Err(StoreError::Backend(msg.clone())));
                    }
                }
            }
        }
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        // A stat of a chunk digest answers for the chunk (it is a one-chunk blob) or for a
        // blob index; only the former counts, so ask for the bytes when unsure.
        match self.stat(chunk).await {
            Ok(Some(m)) if m.chunks.len() == 1 => Ok(true),
            Ok(_) => Ok(self.read_chunk(chunk).await?.is_some()),
            Err(e) => Err(e),
        }
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        let got = self.client.put_blob(data, true).await?;
        if got != digest {
            return Err(StoreError::corrupt(
                "chunk",
                &digest,
                format!("daemon computed {got} for the bytes sent"),
            ));
        }
        Ok(())
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        index.validate()?;
        let req = proto::PutBlobIndexRequest {
            blob: digest_bytes(&blob),
            index: Some(index.clone()),
        };
        self.client
            .call("put blob index", true, |mut api| {
                let req = req.clone();
                async move { Ok(api.put_blob_index(req).await?.into_inner()) }
            })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl DirectoryService for RemoteStore {
    async fn flush(&self) -> Result<()> {
        self.flush_remote().await
    }

    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        if let Some(d) = self
            .dir_cache
            .lock()
            .ok()
            .and_then(|mut c| c.get(digest).cloned())
        {
            return Ok(Some(d));
        }
        if self.client.has_feature(feature::CLOSURE_GET) {
            // Whoever reads a directory usually reads below it next: take a bounded part of
            // its closure in the same round trip.
            let mut dirs = self.closure_up_to(digest, PREFETCH_DIRS).await?.into_iter();
            let first = dirs.next();
            if let Ok(mut c) = self.dir_cache.lock() {
                for d in dirs {
                    c.put(d.digest(), d);
                }
            }
            return Ok(first);
        }
        let want = digest_bytes(digest);
        let resp = self
            .client
            .call("get directory", true, |mut api| {
                let want = want.clone();
                async move {
                    Ok(api
                        .get_directory(proto::DigestRequest { digest: want })
                        .await?
                        .into_inner())
                }
            })
            .await?;
        match (resp.found, resp.directory) {
            (false, _) => Ok(None),
            (true, Some(d)) => verify_dir(digest, d).map(Some),
            (true, None) => Ok(Some(verify_dir(digest, Directory::default())?)),
        }
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        self.put_closure_call(vec![dir.clone()]).await
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        Ok(DirectoryService::get(self, digest).await?.is_some())
    }

    /// One streamed call, each directory verified as it arrives.
    async fn get_closure(&self, root: &B3Digest) -> Result<Vec<Directory>> {
        if !self.client.has_feature(feature::CLOSURE_GET) {
            return super::directory::closure_by_levels(self, root).await;
        }
        self.closure_up_to(root, usize::MAX).await
    }

    /// One all-or-nothing call.
    async fn put_closure(&self, dirs: Vec<Directory>) -> Result<B3Digest> {
        self.put_closure_call(dirs).await
    }
}

#[async_trait]
impl RootService for RemoteStore {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        let req = proto::RootName {
            name: name.to_string(),
        };
        let resp = self
            .client
            .call("get root", true, |mut api| {
                let req = req.clone();
                async move { Ok(api.get_root(req).await?.into_inner()) }
            })
            .await?;
        let Some(r) = resp.root.filter(|_| resp.found) else {
            return Ok(None);
        };
        let rec = root_from_proto(&r).map_err(|e| StoreError::Corrupt {
            what: "root",
            digest: name.to_string(),
            reason: e.to_string(),
        })?;
        if rec.name != name {
            return Err(StoreError::Corrupt {
                what: "root",
                digest: name.to_string(),
                reason: format!("daemon answered with root {:?}", rec.name),
            });
        }
        Ok(Some(rec))
    }

    async fn put(&self, root: &RootRecord) -> Result<()> {
        castore::validate_root_name(&root.name)?;
        let msg = root_to_proto(root);
        self.client
            .call("put root", true, |mut api| {
                let msg = msg.clone();
                async move { Ok(api.put_root(msg).await?.into_inner()) }
            })
            .await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names = self
            .client
            .call("list roots", true, |mut api| async move {
                Ok(api
                    .list_roots(proto::ListRootsRequest {})
                    .await?
                    .into_inner()
                    .names)
            })
            .await?;
        names.sort();
        Ok(names)
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let req = proto::RootName {
            name: name.to_string(),
        };
        // Not retried: a second attempt would report `false` for a root the first removed.
        self.client
            .call("delete root", false, |mut api| {
                let req = req.clone();
                async move { Ok(api.delete_root(req).await?.into_inner().existed) }
            })
            .await
    }
}

/// gc and verify through a daemon need its "maintenance" feature; say so when it is missing.
fn not_offered(what: &str) -> StoreError {
    StoreError::Backend(format!(
        "{what}: the daemon does not offer the \"maintenance\" feature; run it against the daemon's store directly"
    ))
}

impl RemoteStore {
    async fn delete_object(
        &self,
        kind: crate::store::ObjectKind,
        digest: &B3Digest,
        cutoff: Option<std::time::SystemTime>,
    ) -> Result<bool> {
        if !self.client.has_feature(feature::MAINTENANCE) {
            return Err(not_offered("deleting objects"));
        }
        let req = proto::DeleteObjectRequest {
            kind: wire::kind_to_proto(kind) as i32,
            digest: digest_bytes(digest),
            cutoff_unix_nanos: cutoff.map_or(0, wire::to_nanos),
            unconditional: cutoff.is_none(),
        };
        // Retrying is safe: a second delete of a deleted object reports false.
        self.client
            .call("delete object", true, |mut api| {
                let req = req.clone();
                async move { Ok(api.delete_object(req).await?.into_inner().deleted) }
            })
            .await
    }

    /// Asks the daemon to make everything put so far durable (no-op for older daemons).
    async fn flush_remote(&self) -> Result<()> {
        if !self.client.has_feature(feature::MAINTENANCE) {
            return Ok(());
        }
        self.client
            .call("flush", true, |mut api| async move {
                api.flush(proto::FlushRequest {}).await?;
                Ok(())
            })
            .await
    }
}

#[async_trait]
impl Maintenance for RemoteStore {
    async fn list(&self, kind: crate::store::ObjectKind) -> Result<Vec<crate::store::ObjectInfo>> {
        if !self.client.has_feature(feature::MAINTENANCE) {
            return Err(not_offered("listing objects"));
        }
        let k = wire::kind_to_proto(kind) as i32;
        let entries = self
            .client
            .call("list objects", true, |mut api| async move {
                let mut s = api
                    .list_objects(proto::ListObjectsRequest { kind: k })
                    .await?
                    .into_inner();
                let mut out = Vec::new();
                while let Some(batch) = s.next().await {
                    out.extend(batch?.objects);
                }
                Ok(out)
            })
            .await?;
        entries
            .into_iter()
            .map(|e| {
                Ok(crate::store::ObjectInfo {
                    kind,
                    digest: B3Digest::try_from(&e.digest[..])?,
                    stored_bytes: e.stored_bytes,
                    modified: wire::from_nanos(e.modified_unix_nanos),
                })
            })
            .collect()
    }

    async fn delete_if_older(
        &self,
        kind: crate::store::ObjectKind,
        digest: &B3Digest,
        cutoff: std::time::SystemTime,
    ) -> Result<bool> {
        self.delete_object(kind, digest, Some(cutoff)).await
    }

    async fn remove(&self, kind: crate::store::ObjectKind, digest: &B3Digest) -> Result<()> {
        self.delete_object(kind, digest, None).await.map(|_| ())
    }

    async fn sweep_temp(&self, cutoff: std::time::SystemTime) -> Result<u64> {
        if !self.client.has_feature(feature::MAINTENANCE) {
            return Err(not_offered("sweeping temp files"));
        }
        let c = wire::to_nanos(cutoff);
        self.client
            .call("sweep temp", true, |mut api| async move {
                Ok(api
                    .sweep_temp(proto::SweepTempRequest {
                        cutoff_unix_nanos: c,
                    })
                    .await?
                    .into_inner()
                    .removed)
            })
            .await
    }

    async fn usage(&self) -> Result<Usage> {
        let s = self.stats().await?;
        if !s.has_usage {
            return Err(StoreError::Backend(
                "the daemon's store cannot count its objects".into(),
            ));
        }
        Ok(Usage {
            chunks: s.chunks,
            blob_indexes: s.blob_indexes,
            directories: s.directories,
            roots: s.roots,
            chunk_bytes: s.chunk_bytes,
            stored_bytes: s.stored_bytes,
        })
    }

    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let s = self.stats().await?;
        Ok(vec![
            ("daemon requests", s.requests),
            ("daemon errors", s.errors),
            ("daemon bytes in", s.bytes_in),
            ("daemon bytes out", s.bytes_out),
            ("daemon in flight", s.in_flight),
            ("daemon connections", s.connections),
            ("daemon chunk read calls", s.chunk_read_calls),
            ("daemon chunks read", s.chunks_read),
            ("sessions started", s.sessions_started),
            ("sessions running", s.sessions_running),
            ("sessions done", s.sessions_done),
            ("sessions failed", s.sessions_failed),
        ])
    }
}
