//! `s3://BUCKET[/PREFIX]?endpoint=URL&region=R[&allow_http=true][&timeout=30s]`: the store kept
//! in an S3-compatible object store, through the `object_store` crate.
//!
//! The key layout is the `file://` store's (config.toml, chunks/ab/<hex> zstd-compressed,
//! blobs/ab/<hex>, dirs/ab/<hex>, roots/<name>), under PREFIX, so a `file://` store copied
//! into a bucket with any S3 tool is a valid `s3://` store, and the other way round.
//! Credentials come from the usual AWS environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, ...).
//!
//! - Objects are written with one PUT each (S3 PUTs are atomic), after a HEAD that skips
//!   objects already there: concurrent puts of one object both succeed and leave one copy.
//! - Root puts are conditional (`If-Match` on the version seen, `If-None-Match: *` for a new
//!   root) where the server supports it, so a put never silently replaces a version it did not
//!   see; on servers without conditional puts they are last-writer-wins per root.
//! - Every call has a deadline (`timeout`, default 30 s, with a 5 s connect timeout and a few
//!   retries inside it): a missing bucket, wrong credentials or a dead endpoint give a one-line
//!   error, never a hang.
//! - Pack files (`packs/<id>.pack` + `.idx`, see [`super::pack`]) of a `file://` store copied
//!   into the bucket are read: an object not found under its own key is looked up in the
//!   packs' indexes (listed on the first such miss, and again at most every
//!   [`PACK_RESCAN`]) and fetched with a ranged GET. Objects are written one PUT each, never
//!   packed, and gc here does not rewrite packs: run it on the `file://` side for those.
//! - gc: S3 cannot refresh an object's LastModified without rewriting it, so reuse by an import
//!   does not "touch" objects here. gc's grace rule on `s3://` is therefore based on
//!   LastModified (the object's upload time) alone: run `gc` on an S3 store only while no
//!   import writes to it, or with a grace longer than any import.
//!
//! Requests are counted process-wide ([`request_counts`]); `granary info` shows them and
//! `GRANARY_S3_STATS=1` prints them to stderr when the command ends.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, UpdateVersion,
};

use super::codec::decode_chunk;
use super::pack::{self, IndexEntry};
use super::{
    check_children, empty_blob, BlobMeta, BlobService, ChunkRef, DirectoryService, Maintenance,
    ObjectInfo, ObjectKind as Kind, Result, RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};
use crate::model::chunking::MAX_CHUNK;

/// Requests issued by this process to S3 stores, by kind.
static GETS: AtomicU64 = AtomicU64::new(0);
static PUTS: AtomicU64 = AtomicU64::new(0);
static HEADS: AtomicU64 = AtomicU64::new(0);
static LISTS: AtomicU64 = AtomicU64::new(0);
static DELETES: AtomicU64 = AtomicU64::new(0);
static GET_BYTES: AtomicU64 = AtomicU64::new(0);

/// `(name, count)` of the S3 requests this process made so far.
pub fn request_counts() -> Vec<(&'static str, u64)> {
    vec![
        ("s3 GET requests", GETS.load(Ordering::Relaxed)),
        ("s3 GET bytes", GET_BYTES.load(Ordering::Relaxed)),
        ("s3 HEAD requests", HEADS.load(Ordering::Relaxed)),
        ("s3 PUT requests", PUTS.load(Ordering::Relaxed)),
        ("s3 LIST requests", LISTS.load(Ordering::Relaxed)),
        ("s3 DELETE requests", DELETES.load(Ordering::Relaxed)),
    ]
}

/// Whether any S3 request was made (so the stats line is worth printing).
pub fn any_requests() -> bool {
    request_counts().iter().any(|(_, n)| *n > 0)
}

/// Default deadline of one call (retries included).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Ranged GETs issued at once when `usage` reads chunk headers.
const USAGE_CONCURRENCY: usize = 32;
/// Bytes of a zstd frame header that hold the content size.
const ZSTD_HEADER: u64 = 18;

/// What an `s3://` URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Key prefix without leading or trailing '/' (empty for the bucket's top).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
    pub timeout: Duration,
}

impl S3Url {
    pub fn parse(url: &str) -> std::result::Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| "not an s3:// URL".to_string())?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err("s3:// needs a bucket name".into());
        }
        let mut u = S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            allow_http: false,
            timeout: DEFAULT_TIMEOUT,
        };
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "endpoint" => u.endpoint = Some(v.to_string()),
                "region" => u.region = Some(v.to_string()),
                "allow_http" => {
                    u.allow_http = match v {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("allow_http={v}: want true or false")),
                    }
                }
                "timeout" => {
                    u.timeout = crate::units::parse_positive_duration(v)
                        .map_err(|e| format!("timeout={v}: {e}"))?;
                    if u.timeout.is_zero() {
                        return Err("timeout must be positive".into());
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown parameter {k:?} (want endpoint, region, allow_http, timeout)"
                    ))
                }
            }
        }
        if let Some(ep) = &u.endpoint {
            if ep.starts_with("http://") && !u.allow_http {
                return Err(format!("endpoint {ep} is plain http: add allow_http=true"));
            }
        }
        Ok(u)
    }
}

/// The S3 store. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    os: Arc<AmazonS3>,
    loc: Arc<S3Url>,
    config: StoreConfig,
    /// Objects this process stored or found stored: later puts skip the HEAD.
    known: Arc<Mutex<HashSet<(Kind, B3Digest)>>>,
    /// Chunks fetched whole by `stat` (of a single-chunk blob), kept for the read that
    /// usually follows, so a small file costs one GET instead of three.
    stash: Arc<Mutex<lru::LruCache<B3Digest, Bytes>>>,
    packs: Arc<tokio::sync::Mutex<S3Packs>>,
}

/// Chunks kept in the stash.
const STASH: usize = 64;

/// Least time between two listings of `packs/` prompted by misses.
const PACK_RESCAN: Duration = Duration::from_secs(5);

/// The packs of the bucket, as last listed: object → (pack id, entry), newest pack winning.
#[derive(Default)]
struct S3Packs {
    map: std::collections::HashMap<(Kind, B3Digest), (String, IndexEntry)>,
    /// Pack id → its LastModified.
    packs: std::collections::HashMap<String, SystemTime>,
    scanned: Option<std::time::Instant>,
}

/// One line from an object_store error (they can span lines and be long).
fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string().replace(['\n', '\r'], " ");
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 400 {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && !one_line(e).contains("NoSuchBucket")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl S3Store {
    /// Opens the store a URL names, creating its config.toml (default parameters) if the
    /// bucket holds none under the prefix.
    pub async fn open(url: &str) -> Result<Store> {
        Self::open_with(url, StoreConfig::default(), None).await
    }

    /// As [`S3Store::open`]; a new store is created with `create_with`. With `offline`, a
    /// config.toml that cannot be read because the endpoint is unreachable is replaced by that
    /// config (a cache in front of the store remembered it), so cached objects stay readable.
    pub async fn open_with(
        url: &str,
        create_with: StoreConfig,
        offline: Option<StoreConfig>,
    ) -> Result<Store> {
        let s3 = Self::connect(url)?;
        let config = match s3.read_config(create_with).await {
            Ok(c) => c,
            Err(e) => match offline {
                Some(c) if !matches!(e, StoreError::Config { .. }) => {
                    tracing::warn!("{e}; using the cached store parameters");
                    c
                }
                _ => return Err(e),
            },
        };
        let s3 = Arc::new(S3Store { config, ..s3 });
        Ok(Store {
            url: url.to_string(),
            config,
            blobs: s3.clone(),
            dirs: s3.clone(),
            roots: s3.clone(),
            maintenance: Some(s3),
            ingest: None,
        })
    }

    /// Builds the client; no request is made.
    pub fn connect(url: &str) -> Result<Self> {
        let bad = |reason: String| StoreError::Config {
            url: url.to_string(),
            reason,
        };
        let loc = S3Url::parse(url).map_err(bad)?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&loc.bucket)
            .with_allow_http(loc.allow_http)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(loc.allow_http)
                    .with_timeout(loc.timeout)
                    .with_connect_timeout(CONNECT_TIMEOUT.min(loc.timeout)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: loc.timeout,
                ..RetryConfig::default()
            });
        if let Some(ep) = &loc.endpoint {
            b = b.with_endpoint(ep);
        }
        match &loc.region {
            Some(r) => b = b.with_region(r),
            None if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none() =>
            {
                b = b.with_region("us-east-1")
            }
            None => {}
        }
        let os = b.build().map_err(|e| bad(one_line(&e)))?;
        Ok(S3Store {
            os: Arc::new(os),
            loc: Arc::new(loc),
            config: StoreConfig::default(),
            known: Arc::default(),
            stash: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(STASH).unwrap_or(std::num::NonZeroUsize::MIN),
            ))),
            packs: Arc::default(),
        })
    }

    fn key(&self, rel: &str) -> Key {
        if self.loc.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.loc.prefix))
        }
    }

    fn object_key(&self, kind: Kind, digest: &B3Digest) -> Key {
        let hex = digest.to_hex();
        self.key(&format!("{}/{}/{hex}", kind.dir(), &hex[..2]))
    }

    fn where_(&self) -> String {
        if self.loc.prefix.is_empty() {
            format!("s3://{}", self.loc.bucket)
        } else {
            format!("s3://{}/{}", self.loc.bucket, self.loc.prefix)
        }
    }

    /// The error for a failed request: one line, naming the bucket and what was asked.
    fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> StoreError {
        let msg = one_line(e);
        if msg.contains("NoSuchBucket") {
            return StoreError::Backend(format!(
                "{}: bucket {:?} does not exist ({what})",
                self.where_(),
                self.loc.bucket
            ));
        }
        if msg.contains("InvalidAccessKeyId")
            || msg.contains("SignatureDoesNotMatch")
            || msg.contains("403 Forbidden")
        {
            return StoreError::Backend(format!(
                "{}: access denied ({what}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: {msg}",
                self.where_()
            ));
        }
        if msg.contains("error sending request") {
            return StoreError::Backend(format!(
                "{}: cannot reach endpoint {} ({what}): {msg}",
                self.where_(),
                self.loc.endpoint.as_deref().unwrap_or("(AWS default)")
            ));
        }
        StoreError::Backend(format!("{}: {what}: {msg}", self.where_()))
    }

    /// Runs one request under the store's deadline (object_store's own timeouts and retries
    /// should end it first; this is the backstop against anything that would wait forever).
    async fn timed<T>(
        &self,
        what: impl Fn() -> String,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<object_store::Result<T>> {
        let limit = self.loc.timeout + Duration::from_secs(2);
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => Ok(r),
            Err(_) => Err(StoreError::Timeout {
                what: format!("{}: {}", self.where_(), what()),
                secs: limit.as_secs_f64(),
            }),
        }
    }

    /// GETs an object (or a range of it); `Ok(None)` if absent.
    async fn get_raw(&self, key: &Key, range: Option<GetRange>) -> Result<Option<Bytes>> {
        GETS.fetch_add(1, Ordering::Relaxed);
        let what = || format!("GET {key}");
        let opts = GetOptions {
            range,
            ..GetOptions::default()
        };
        let res = self
            .timed(what, async {
                let r = self.os.get_opts(key, opts).await?;
                r.bytes().await
            })
            .await?;
        match res {
            Ok(b) => {
                GET_BYTES.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    /// HEADs an object: its metadata, or `None` if absent.
    async fn head(&self, key: &Key) -> Result<Option<object_store::ObjectMeta>> {
        HEADS.fetch_add(1, Ordering::Relaxed);
        let what = || format!("HEAD {key}");
        match self.timed(what, self.os.head(key)).await? {
            Ok(m) => Ok(Some(m)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    async fn put_raw(
        &self,
        key: &Key,
        data: Bytes,
        mode: PutMode,
    ) -> Result<object_store::Result<object_store::PutResult>> {
        PUTS.fetch_add(1, Ordering::Relaxed);
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.timed(
            || format!("PUT {key}"),
            self.os.put_opts(key, PutPayload::from(data), opts),
        )
        .await
    }

    async fn delete_key(&self, key: &Key) -> Result<()> {
        DELETES.fetch_add(1, Ordering::Relaxed);
        let what = || format!("DELETE {key}");
        match self.timed(what, self.os.delete(key)).await? {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.fail(&what(), &e)),
        }
    }

    /// Every object under `rel/` (listing pages are fetched in turn).
    async fn list_under(&self, rel: &str) -> Result<Vec<object_store::ObjectMeta>> {
        LISTS.fetch_add(1, Ordering::Relaxed);
        let prefix = self.key(rel);
        let what = || format!("LIST {prefix}/");
        let res = self
            .timed(what, self.os.list(Some(&prefix)).try_collect::<Vec<_>>())
            .await?;
        res.map_err(|e| self.fail(&what(), &e))
    }

    /// Stores a content-addressed object unless it is already there.
    async fn put_object(&self, kind: Kind, digest: &B3Digest, data: Bytes) -> Result<()> {
        if self.is_known(kind, digest) {
            return Ok(());
        }
        let key = self.object_key(kind, digest);
        if self.head(&key).await?.is_none() {
            if let Err(e) = self.put_raw(&key, data, PutMode::Overwrite).await? {
                return Err(self.fail(&format!("PUT {key}"), &e));
            }
        }
        self.remember(kind, digest);
        Ok(())
    }

    fn is_known(&self, kind: Kind, digest: &B3Digest) -> bool {
        self.known
            .lock()
            .map(|k| k.contains(&(kind, *digest)))
            .unwrap_or(false)
    }

    fn remember(&self, kind: Kind, digest: &B3Digest) {
        if let Ok(mut k) = self.known.lock() {
            k.insert((kind, *digest));
        }
    }

    fn forget(&self, kind: Kind, digest: &B3Digest) {
        if let Ok(mut k) = self.known.lock() {
            k.remove(&(kind, *digest));
        }
    }

    /// Reads config.toml, creating it if absent.
    async fn read_config(&self, create_with: StoreConfig) -> Result<StoreConfig> {
        let key = self.key("config.toml");
        let bad = |reason: String| StoreError::Config {
            url: self.where_(),
            reason,
        };
        if let Some(raw) = self.get_raw(&key, None).await? {
            let text = String::from_utf8(raw.to_vec())
                .map_err(|_| bad("config.toml is not UTF-8".into()))?;
            return StoreConfig::from_toml(&text).map_err(|r| bad(format!("config.toml: {r}")));
        }
        create_with
            .chunking
            .validate()
            .map_err(|e| bad(e.to_string()))?;
        let body = Bytes::from(create_with.to_toml());
        // Create only if absent: a store being created by another process at the same moment
        // keeps its parameters. Servers without conditional puts fall back to a plain put.
        match self.put_raw(&key, body.clone(), PutMode::Create).await? {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {}
            Err(object_store::Error::NotImplemented { .. })
            | Err(object_store::Error::NotSupported { .. }) => {
                if let Err(e) = self.put_raw(&key, body, PutMode::Overwrite).await? {
                    return Err(self.fail("creating config.toml", &e));
                }
            }
            Err(e) => return Err(self.fail("creating config.toml", &e)),
        }
        let raw = self
            .get_raw(&key, None)
            .await?
            .ok_or_else(|| bad("config.toml vanished right after it was written".into()))?;
        let text =
            String::from_utf8(raw.to_vec()).map_err(|_| bad("config.toml is not UTF-8".into()))?;
        StoreConfig::from_toml(&text).map_err(|r| bad(format!("config.toml: {r}")))
    }

    fn root_key(&self, name: &str) -> Result<Key> {
        validate_root_name(name)?;
        Ok(self.key(&format!("roots/{name}")))
    }

    /// An object's stored bytes (or the first `prefix` of them): under its own key, else in a
    /// pack. `Ok(None)` if neither has it.
    async fn get_object(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<u64>,
    ) -> Result<Option<Bytes>> {
        let range = prefix.map(|n| GetRange::Bounded(0..n));
        if let Some(b) = self.get_raw(&self.object_key(kind, digest), range).await? {
            return Ok(Some(b));
        }
        self.get_packed(kind, digest, prefix).await
    }

    async fn get_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
        prefix: Option<u64>,
    ) -> Result<Option<Bytes>> {
        let Some((id, e)) = self.find_packed(kind, digest).await? else {
            return Ok(None);
        };
        let len = prefix.map_or(e.len as u64, |n| n.min(e.len as u64));
        if len == 0 {
            // An empty directory encodes to no bytes, and S3 has no empty range.
            return Ok(Some(Bytes::new()));
        }
        let key = self.key(&format!("{}/{id}.pack", pack::PACK_DIR));
        let got = self
            .get_raw(&key, Some(GetRange::Bounded(e.offset..e.offset + len)))
            .await?;
        Ok(got.filter(|b| b.len() as u64 == len))
    }

    /// Where a packed object is, listing the packs first if they were never listed or a
    /// miss comes [`PACK_RESCAN`] after the last listing.
    async fn find_packed(
        &self,
        kind: Kind,
        digest: &B3Digest,
    ) -> Result<Option<(String, IndexEntry)>> {
        let mut st = self.packs.lock().await;
        if let Some(hit) = st.map.get(&(kind, *digest)) {
            return Ok(Some(hit.clone()));
        }
        if st.scanned.is_some_and(|t| t.elapsed() < PACK_RESCAN) {
            return Ok(None);
        }
        self.scan_packs(&mut st).await?;
        Ok(st.map.get(&(kind, *digest)).cloned())
    }

    /// Lists `packs/` and reads the indexes not read before (all of them again if a pack
    /// went away).
    async fn scan_packs(&self, st: &mut S3Packs) -> Result<()> {
        let listed = self.list_under(pack::PACK_DIR).await?;
        let mut sizes = std::collections::HashMap::new();
        let mut times = std::collections::HashMap::new();
        let mut ids = Vec::new();
        for m in &listed {
            let Some(name) = m.location.filename() else {
                continue;
            };
            if let Some(id) = name.strip_suffix(".pack").filter(|id| pack::is_id(id)) {
                sizes.insert(id.to_string(), m.size);
                times.insert(id.to_string(), SystemTime::from(m.last_modified));
            } else if let Some(id) = name.strip_suffix(".idx").filter(|id| pack::is_id(id)) {
                ids.push(id.to_string());
            }
        }
        ids.retain(|id| sizes.contains_key(id));
        ids.sort();
        if st.packs.keys().any(|id| !sizes.contains_key(id)) {
            *st = S3Packs::default();
        }
        ids.retain(|id| !st.packs.contains_key(id));
        for id in &ids {
            let key = self.key(&format!("{}/{id}.idx", pack::PACK_DIR));
            let Some(raw) = self.get_raw(&key, None).await? else {
                continue;
            };
            let size = sizes.get(id).copied().unwrap_or(0);
            for e in pack::decode_index(id, &raw, size)? {
                let newer = st
                    .map
                    .get(&(e.kind, e.digest))
                    .is_none_or(|(held, _)| held.as_str() <= id.as_str());
                if newer {
                    st.map.insert((e.kind, e.digest), (id.clone(), e));
                }
            }
            let t = times.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH);
            st.packs.insert(id.clone(), t);
        }
        st.scanned = Some(std::time::Instant::now());
        Ok(())
    }

    /// GETs and verifies one chunk.
    async fn fetch_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let Some(raw) = self.get_object(Kind::Chunk, chunk, None).await? else {
            return Ok(None);
        };
        let d = *chunk;
        tokio::task::spawn_blocking(move || decode_chunk(&d, &raw))
            .await
            .map_err(|e| StoreError::Backend(format!("decode task failed: {e}")))?
            .map(Some)
    }

    /// Uncompressed size of a stored chunk, from its zstd frame header (one ranged GET).
    async fn chunk_size(&self, digest: &B3Digest) -> Result<Option<u64>> {
        let Some(head) = self
            .get_object(Kind::Chunk, digest, Some(ZSTD_HEADER))
            .await?
        else {
            return Ok(None);
        };
        match zstd::zstd_safe::get_frame_content_size(&head) {
            Ok(Some(s)) if s as usize <= MAX_CHUNK => Ok(Some(s)),
            // No size in the header: decode it (verifies too).
            _ => Ok(self.read_chunk(digest).await?.map(|b| b.len() as u64)),
        }
    }
}

#[async_trait]
impl BlobService for S3Store {
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        if *blob == empty_blob() {
            return Ok(Some(BlobMeta::default()));
        }
        // Most blobs are small, single-chunk ones: fetch the chunk itself (verified, and kept
        // for the read that follows); only if there is none look for a blob index.
        if let Some(data) = self.fetch_chunk(blob).await? {
            let size = data.len() as u64;
            if let Ok(mut st) = self.stash.lock() {
                st.put(*blob, data);
            }
            return Ok(Some(BlobMeta {
                size,
                chunks: vec![ChunkRef {
                    digest: *blob,
                    size,
                }],
                outboard: Bytes::new(),
            }));
        }
        let Some(raw) = self.get_object(Kind::BlobIndex, blob, None).await? else {
            return Ok(None);
        };
        let idx = BlobIndex::decode_valid(&raw)
            .map_err(|e| StoreError::corrupt("blob index", blob, e.to_string()))?;
        BlobMeta::from_index(&idx).map(Some)
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        let stashed = self.stash.lock().ok().and_then(|mut st| st.pop(chunk));
        if let Some(b) = stashed {
            return Ok(Some(b));
        }
        self.fetch_chunk(chunk).await
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        if self.is_known(Kind::Chunk, chunk) {
            return Ok(true);
        }
        Ok(self
            .head(&self.object_key(Kind::Chunk, chunk))
            .await?
            .is_some()
            || self.find_packed(Kind::Chunk, chunk).await?.is_some())
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        if self.is_known(Kind::Chunk, &digest) {
            return Ok(());
        }
        let level = self.config.zstd_level;
        let compressed = tokio::task::spawn_blocking(move || {
            let actual = B3Digest::of(&data);
            if actual != digest {
                return Err(StoreError::corrupt(
                    "chunk",
                    &digest,
                    format!("content hashes to {actual}"),
                ));
            }
            super::codec::encode_chunk(&data, level)
                .map_err(|e| StoreError::io(format!("compressing chunk {digest}"), e))
        })
        .await
        .map_err(|e| StoreError::Backend(format!("compress task failed: {e}")))??;
        self.put_object(Kind::Chunk, &digest, Bytes::from(compressed))
            .await
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        index.validate()?;
        let bytes = index.encode_sealed();
        self.put_object(Kind::BlobIndex, &blob, Bytes::from(bytes))
            .await
    }
}

#[async_trait]
impl DirectoryService for S3Store {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        let Some(raw) = self.get_object(Kind::Directory, digest, None).await? else {
            return Ok(None);
        };
        let actual = B3Digest::of(&raw);
        if actual != *digest {
            return Err(StoreError::corrupt(
                "directory",
                digest,
                format!("digest mismatch (content hashes to {actual})"),
            ));
        }
        Directory::decode_valid(&raw)
            .map(Some)
            .map_err(|e| StoreError::corrupt("directory", digest, e.to_string()))
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        dir.validate()?;
        check_children(self, dir).await?;
        let bytes = dir.encode_canonical();
        let digest = B3Digest::of(&bytes);
        self.put_object(Kind::Directory, &digest, Bytes::from(bytes))
            .await?;
        Ok(digest)
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        if self.is_known(Kind::Directory, digest) {
            return Ok(true);
        }
        Ok(self
            .head(&self.object_key(Kind::Directory, digest))
            .await?
            .is_some()
            || self.find_packed(Kind::Directory, digest).await?.is_some())
    }
}

/// Tries a conditional put this many times before giving up on a root that keeps changing.
const ROOT_PUT_ATTEMPTS: usize = 8;

#[async_trait]
impl RootService for S3Store {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        let key = self.root_key(name)?;
        let Some(raw) = self.get_raw(&key, None).await? else {
            return Ok(None);
        };
        super::decode_root(name, &raw).map(Some)
    }

    /// Replaces the version it saw (or creates the root if there was none); if another writer
    /// got in between, looks again and retries, so the put is ordered after every write it
    /// replaces. Servers that cannot do conditional puts get a plain put (last writer wins).
    async fn put(&self, root: &RootRecord) -> Result<()> {
        let key = self.root_key(&root.name)?;
        let body = Bytes::from(root.encode());
        for _ in 0..ROOT_PUT_ATTEMPTS {
            let mode = match self.head(&key).await? {
                Some(m) => PutMode::Update(UpdateVersion {
                    e_tag: m.e_tag,
                    version: m.version,
                }),
                None => PutMode::Create,
            };
            match self.put_raw(&key, body.clone(), mode).await? {
                Ok(_) => return Ok(()),
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => continue,
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => {
                    return match self.put_raw(&key, body, PutMode::Overwrite).await? {
                        Ok(_) => Ok(()),
                        Err(e) => Err(self.fail(&format!("PUT {key}"), &e)),
                    };
                }
                Err(e) => return Err(self.fail(&format!("PUT {key}"), &e)),
            }
        }
        Err(StoreError::Backend(format!(
            "{}: root {:?} kept changing under {ROOT_PUT_ATTEMPTS} conditional puts; not written",
            self.where_(),
            root.name
        )))
    }

    async fn list(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .list_under("roots")
            .await?
            .into_iter()
            .filter_map(|m| m.location.filename().map(percent_decode))
            .filter(|n| validate_root_name(n).is_ok() && !n.starts_with(".tmp-"))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let key = self.root_key(name)?;
        if self.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.delete_key(&key).await?;
        Ok(true)
    }
}

#[async_trait]
impl Maintenance for S3Store {
    async fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for kind in Kind::ALL {
            let objs = Maintenance::list(self, kind).await?;
            u.stored_bytes += objs.iter().map(|o| o.stored_bytes).sum::<u64>();
            let n = objs.len() as u64;
            match kind {
                Kind::Chunk => {
                    u.chunks = n;
                    let sizes: Vec<Option<u64>> = futures::stream::iter(objs)
                        .map(|o| async move { self.chunk_size(&o.digest).await })
                        .buffer_unordered(USAGE_CONCURRENCY)
                        .try_collect()
                        .await?;
                    u.chunk_bytes = sizes.into_iter().flatten().sum();
                }
                Kind::BlobIndex => u.blob_indexes = n,
                Kind::Directory => u.directories = n,
            }
        }
        u.roots = RootService::list(self).await?.len() as u64;
        Ok(u)
    }

    async fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let mut out: Vec<ObjectInfo> = self
            .list_under(kind.dir())
            .await?
            .into_iter()
            .filter_map(|m| {
                let digest = m.location.filename()?.parse::<B3Digest>().ok()?;
                Some(ObjectInfo {
                    kind,
                    digest,
                    stored_bytes: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        let loose: HashSet<B3Digest> = out.iter().map(|o| o.digest).collect();
        let mut st = self.packs.lock().await;
        self.scan_packs(&mut st).await?;
        for ((k, digest), (id, e)) in &st.map {
            if *k == kind && !loose.contains(digest) {
                out.push(ObjectInfo {
                    kind,
                    digest: *digest,
                    stored_bytes: e.len as u64,
                    modified: st.packs.get(id).copied().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(out)
    }

    /// Deletes the object if its LastModified is before `cutoff`. S3 offers no atomic
    /// check-and-delete and no touch-on-reuse, so this is only as safe as the module docs say.
    async fn delete_if_older(
        &self,
        kind: Kind,
        digest: &B3Digest,
        cutoff: SystemTime,
    ) -> Result<bool> {
        // Packed objects stay (see the module docs).
        let key = self.object_key(kind, digest);
        let Some(m) = self.head(&key).await? else {
            return Ok(false);
        };
        if SystemTime::from(m.last_modified) >= cutoff {
            return Ok(false);
        }
        self.delete_key(&key).await?;
        self.forget(kind, digest);
        Ok(true)
    }

    async fn remove(&self, kind: Kind, digest: &B3Digest) -> Result<()> {
        self.forget(kind, digest);
        self.delete_key(&self.object_key(kind, digest)).await
    }

    /// S3 puts are atomic: there are no partial writes to sweep.
    async fn sweep_temp(&self, _cutoff: SystemTime) -> Result<u64> {
        Ok(0)
    }

    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(request_counts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let u = S3Url::parse(
            "s3://b/p/q/?endpoint=http://127.0.0.1:9000&region=eu&allow_http=true&timeout=5s",
        )
        .unwrap();
        assert_eq!(u.bucket, "b");
        assert_eq!(u.prefix, "p/q");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("eu"));
        assert!(u.allow_http);
        assert_eq!(u.timeout, Duration::from_secs(5));
        assert_eq!(S3Url::parse("s3://b").unwrap().prefix, "");
        assert!(S3Url::parse("s3://").is_err());
        assert!(S3Url::parse("s3://b?bogus=1").is_err());
        assert!(S3Url::parse("s3://b?endpoint=http://x").is_err());
        assert!(S3Url::parse("s3://b?timeout=0s").is_err());
    }

    #[test]
    fn decoding_names() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("x%4"), "x%4");
    }
}
