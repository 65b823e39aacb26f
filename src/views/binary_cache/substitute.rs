//! Substitution from Nix binary caches: a store path the store lacks is fetched from an
//! upstream cache (`http://`, `https://` or `file://`, as Nix writes them), checked, stored
//! chunked and deduplicated, and recorded as a root with its Nix metadata.
//!
//! Checks, all before the root is recorded (a failed one records nothing; chunks already
//! written are left to `granary gc`): the narinfo names the store path asked for; it carries
//! a signature by a trusted key (unless signatures are not checked); the file's size and
//! sha256 equal `FileSize`/`FileHash` when given; the NAR, decompressed while it streams into
//! the store, is a valid NAR whose size and sha256 equal `NarSize`/`NarHash`.
//!
//! Concurrent requests for one path share one download; a path no cache has is remembered as
//! absent for a while. Every request has a deadline: connecting and each wait for more bytes
//! are bounded, so a cache that is down or stalls gives an error, never a hang.
//!
//! [`layer`] puts a substituter in front of a store's roots, so every reader of roots (a
//! mount's lookups, `granary cat`, the binary cache server) sees substituted paths.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio_util::io::StreamReader;

use super::narinfo::{self, UploadedNarInfo, MAX_NARINFO_BYTES};
use super::sign;
use crate::model::castore::{NixInfo, RootRecord};
use crate::store::{Result as StoreResult, RootService, Store, StoreError};
use crate::views::nar::store_path::{parse_basename, HASH_PART_LEN};
use crate::views::nar::{import_nar, NarHash};

/// How substitution behaves; see `granary mount --help`.
#[derive(Debug, Clone)]
pub struct SubstituteOptions {
    /// Cache URLs, tried in order.
    pub caches: Vec<String>,
    /// Public keys (`NAME:BASE64`) whose signatures are trusted.
    pub trusted_keys: Vec<String>,
    /// Require a signature by a trusted key.
    pub check_sigs: bool,
    /// Bound on connecting and on each wait for more bytes of an answer.
    pub timeout: Duration,
    /// How long a path no cache has is remembered as absent.
    pub negative_ttl: Duration,
    /// The store directory narinfos name paths under.
    pub store_dir: String,
}

/// Why a substitution failed: one line naming the cache, the path and the reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SubstituteError(String);

impl From<SubstituteError> for StoreError {
    fn from(e: SubstituteError) -> Self {
        StoreError::Backend(format!("substituting: {e}"))
    }
}

/// One path's result, shared by everyone waiting for it.
type Outcome = Result<Option<RootRecord>, SubstituteError>;

/// One upstream cache.
#[derive(Debug, Clone)]
enum Cache {
    Http(String),
    Dir(PathBuf),
}

impl Cache {
    fn parse(url: &str) -> Result<Self, SubstituteError> {
        let url = url.trim_end_matches('/');
        if url.starts_with("http://") || url.starts_with("https://") {
            Ok(Cache::Http(url.to_string()))
        } else if let Some(p) = url.strip_prefix("file://") {
            // Nix's file:// caches may carry settings after '?'; none matter for reading.
            let p = p.split('?').next().unwrap_or(p);
            if p.is_empty() {
                return Err(SubstituteError(format!("substituter {url}: no path")));
            }
            Ok(Cache::Dir(PathBuf::from(p)))
        } else {
            Err(SubstituteError(format!(
                "substituter {url}: want an http://, https:// or file:// URL"
            )))
        }
    }

    fn show(&self) -> String {
        match self {
            Cache::Http(u) => u.clone(),
            Cache::Dir(p) => format!("file://{}", p.display()),
        }
    }
}

/// Counters, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubstituteStats {
    pub narinfo_requests: u64,
    pub nar_downloads: u64,
    pub substituted: u64,
    pub failed: u64,
}

/// Fetches missing store paths from upstream caches into a store.
pub struct Substituter {
    store: Store,
    opts: SubstituteOptions,
    caches: Vec<Cache>,
    http: reqwest::Client,
    inflight: Mutex<HashMap<String, Shared<BoxFuture<'static, Outcome>>>>,
    absent: Mutex<HashMap<String, Instant>>,
    stats: Mutex<SubstituteStats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is one step: a poisoned lock still holds sound data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Remembered absent paths, at most (an entry is about 80 bytes).
const MAX_ABSENT: usize = 100_000;
/// Finished substitutions kept before they are pruned (see [`Substituter::fetch`]).
const MAX_KEPT: usize = 4096;

impl Substituter {
    /// Checks the URLs and keys; `store` is where substituted paths go.
    pub fn new(store: Store, opts: SubstituteOptions) -> Result<Arc<Self>, SubstituteError> {
        if opts.caches.is_empty() {
            return Err(SubstituteError("no substituter given".into()));
        }
        let caches = opts
            .caches
            .iter()
            .map(|u| Cache::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        for k in &opts.trusted_keys {
            check_public_key(k)?;
        }
        if opts.check_sigs && opts.trusted_keys.is_empty() {
            return Err(SubstituteError(
                "substituters need --trusted-public-key NAME:KEY (or --no-check-sigs to accept \
                 unsigned paths)"
                    .into(),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(opts.timeout)
            .read_timeout(opts.timeout)
            .build()
            .map_err(|e| SubstituteError(format!("starting the HTTP client: {e}")))?;
        Ok(Arc::new(Self {
            store,
            opts,
            caches,
            http,
            inflight: Mutex::new(HashMap::new()),
            absent: Mutex::new(HashMap::new()),
            stats: Mutex::new(SubstituteStats::default()),
        }))
    }

    pub fn stats(&self) -> SubstituteStats {
        *lock(&self.stats)
    }

    /// The store path with this hash part, fetched from the first cache that has it and
    /// recorded in the store; `Ok(None)` if no cache has it.
    pub async fn fetch(self: &Arc<Self>, hash: &str) -> Outcome {
        if hash.len() != HASH_PART_LEN {
            return Ok(None);
        }
        if let Some(at) = lock(&self.absent).get(hash) {
            if at.elapsed() < self.opts.negative_ttl {
                return Ok(None);
            }
        }
        let fut = {
            let mut map = lock(&self.inflight);
            match map.get(hash) {
                Some(f) => f.clone(),
                None => {
                    // On its own task: a lookup that gives up (its deadline) does not cancel
                    // the download for the others, or for the next lookup.
                    let this = self.clone();
                    let h = hash.to_string();
                    let task = tokio::spawn(async move {
                        let out = this.substitute(&h).await;
                        // A success stays (its root is recorded, so the store answers from
                        // now on; keeping it closes the window in which a request that missed
                        // the store a moment ago would start a second download). Failures
                        // are forgotten, to be retried by the next request.
                        if !matches!(out, Ok(Some(_))) {
                            lock(&this.inflight).remove(&h);
                        }
                        out
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(SubstituteError(format!("substitution task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    if map.len() >= MAX_KEPT {
                        map.retain(|_, f| f.peek().is_none());
                    }
                    map.insert(hash.to_string(), f.clone());
                    f
                }
            }
        };
        fut.await
    }

    async fn substitute(&self, hash: &str) -> Outcome {
        let mut last_err = None;
        for cache in &self.caches {
            match self.try_cache(cache, hash).await {
                Ok(Some(rec)) => {
                    lock(&self.stats).substituted += 1;
                    return Ok(Some(rec));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}");
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            lock(&self.stats).failed += 1;
            return Err(e);
        }
        let mut absent = lock(&self.absent);
        if absent.len() >= MAX_ABSENT {
            absent.clear();
        }
        absent.insert(hash.to_string(), Instant::now());
        Ok(None)
    }

    async fn try_cache(&self, cache: &Cache, hash: &str) -> Outcome {
        let file = format!("{hash}.narinfo");
        let err = |why: String| SubstituteError(format!("{}/{file}: {why}", cache.show()));
        lock(&self.stats).narinfo_requests += 1;
        let Some(text) = self.get_small(cache, &file).await.map_err(&err)? else {
            return Ok(None);
        };
        let text = String::from_utf8(text).map_err(|_| err("narinfo is not UTF-8".into()))?;
        let info = narinfo::parse(&text, &self.opts.store_dir).map_err(&err)?;
        if !info.basename.starts_with(hash) {
            return Err(err(format!(
                "narinfo names {}, not a path with hash {hash}; nothing recorded",
                info.basename
            )));
        }
        let nix = NixInfo {
            nar_size: info.nar_size,
            nar_sha256: Bytes::copy_from_slice(&info.nar_hash.0),
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            signatures: info.signatures.clone(),
            ca: info.ca.clone(),
        };
        if self.opts.check_sigs {
            let fp = sign::fingerprint(&self.opts.store_dir, &info.basename, &nix)
                .ok_or_else(|| err("narinfo has an invalid NAR hash".into()))?;
            let trusted = info.signatures.iter().any(|s| {
                self.opts
                    .trusted_keys
                    .iter()
                    .any(|k| sign::verify(k, &fp, s))
            });
            if !trusted {
                return Err(err(format!(
                    "{} has no valid signature by a trusted key; nothing recorded",
                    info.basename
                )));
            }
        }
        let node = self.fetch_nar(cache, &info).await?;
        let rec = RootRecord {
            name: info.basename.clone(),
            node,
            nix: Some(nix),
            times: None,
            times_head: Vec::new(),
            traces: Vec::new(),
        };
        self.store
            .roots
            .put(&rec)
            .await
            .map_err(|e| err(format!("recording {}: {e}", info.basename)))?;
        tracing::info!(
            "substituted {} from {} ({} NAR bytes)",
            info.basename,
            cache.show(),
            info.nar_size
        );
        Ok(Some(rec))
    }

    /// Downloads, checks and stores the NAR `info` describes; returns its tree.
    async fn fetch_nar(
        &self,
        cache: &Cache,
        info: &UploadedNarInfo,
    ) -> Result<crate::model::castore::Node, SubstituteError> {
        let err = |why: String| {
            SubstituteError(format!(
                "{}/{}: {} ({why}); nothing recorded",
                cache.show(),
                info.url,
                info.basename
            ))
        };
        lock(&self.stats).nar_downloads += 1;
        let body = self.open(cache, &info.url).await.map_err(&err)?;
        let limit = info.file_size.unwrap_or(u64::MAX);
        let mut tap = FileTap {
            inner: body,
            sha: Sha256::new(),
            size: 0,
            limit,
        };
        // At most NarSize + 1 bytes reach the reader: a longer NAR is refused as such, and a
        // decompression bomb cannot run on.
        let want = info.nar_size.saturating_add(1);
        let imported = {
            let buffered = BufReader::with_capacity(256 << 10, &mut tap);
            match info.compression.as_str() {
                "none" | "" => import_nar(&self.store, buffered.take(want)).await,
                "xz" => {
                    let dec = async_compression::tokio::bufread::XzDecoder::new(buffered);
                    import_nar(&self.store, dec.take(want)).await
                }
                "zstd" => {
                    let dec = async_compression::tokio::bufread::ZstdDecoder::new(buffered);
                    import_nar(&self.store, dec.take(want)).await
                }
                "bzip2" => {
                    let dec = async_compression::tokio::bufread::BzDecoder::new(buffered);
                    import_nar(&self.store, dec.take(want)).await
                }
                other => return Err(err(format!("compression {other:?} is not supported"))),
            }
        };
        let imported = imported.map_err(|e| err(e.to_string()))?;
        // The file hash covers the whole file, including anything after the compressed stream.
        tokio::io::copy(&mut tap, &mut tokio::io::sink())
            .await
            .map_err(|e| err(format!("reading the file: {e}")))?;
        if imported.nar_sha256 != info.nar_hash || imported.nar_size != info.nar_size {
            return Err(err(format!(
                "NAR is {} ({} bytes), the narinfo says {} ({} bytes)",
                imported.nar_sha256, imported.nar_size, info.nar_hash, info.nar_size
            )));
        }
        let file_hash = NarHash(tap.sha.finalize().into());
        if info.file_hash.is_some_and(|h| h != file_hash)
            || info.file_size.is_some_and(|s| s != tap.size)
        {
            return Err(err(format!(
                "file is {file_hash} ({} bytes), the narinfo's FileHash/FileSize differ",
                tap.size
            )));
        }
        Ok(imported.node)
    }

    /// A small file (a narinfo) whole; `Ok(None)` if the cache does not have it.
    async fn get_small(&self, cache: &Cache, file: &str) -> Result<Option<Vec<u8>>, String> {
        match cache {
            Cache::Dir(dir) => {
                let path = dir.join(file);
                let read = tokio::time::timeout(self.opts.timeout, async {
                    let f = tokio::fs::File::open(&path).await?;
                    let mut out = Vec::new();
                    f.take(MAX_NARINFO_BYTES as u64 + 1)
                        .read_to_end(&mut out)
                        .await?;
                    Ok::<_, std::io::Error>(out)
                })
                .await
                .map_err(|_| "timed out".to_string())?;
                match read {
                    Ok(b) if b.len() > MAX_NARINFO_BYTES => {
                        Err(format!("over {MAX_NARINFO_BYTES} bytes"))
                    }
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            }
            Cache::Http(base) => {
                let url = format!("{base}/{file}");
                let fut = async {
                    let resp = self
                        .http
                        .get(&url)
                        .send()
                        .await
                        .map_err(|e| describe_http(&e))?;
                    match resp.status().as_u16() {
                        200 => {}
                        404 | 403 | 410 => return Ok(None),
                        s => return Err(format!("HTTP status {s}")),
                    }
                    let mut out = Vec::new();
                    let mut body = resp.bytes_stream();
                    while let Some(piece) = body.next().await {
                        let piece = piece.map_err(|e| describe_http(&e))?;
                        if out.len() + piece.len() > MAX_NARINFO_BYTES {
                            return Err(format!("over {MAX_NARINFO_BYTES} bytes"));
                        }
                        out.extend_from_slice(&piece);
                    }
                    Ok(Some(out))
                };
                tokio::time::timeout(self.opts.timeout, fut)
                    .await
                    .map_err(|_| format!("no answer within {:?}", self.opts.timeout))?
            }
        }
    }

    /// A NAR file as a stream; every wait for more bytes is bounded by the timeout.
    async fn open(
        &self,
        cache: &Cache,
        url: &str,
    ) -> Result<Pin<Box<dyn AsyncRead + Send>>, String> {
        if url.starts_with('/') || url.split('/').any(|c| c == "..") || url.contains("://") {
            return Err(format!(
                "URL {url:?} is not a relative path inside the cache"
            ));
        }
        match cache {
            Cache::Dir(dir) => {
                let f = tokio::fs::File::open(dir.join(url))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Box::pin(f))
            }
            Cache::Http(base) => {
                let full = format!("{base}/{url}");
                let resp = tokio::time::timeout(self.opts.timeout, self.http.get(&full).send())
                    .await
                    .map_err(|_| format!("no answer within {:?}", self.opts.timeout))?
                    .map_err(|e| describe_http(&e))?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP status {}", resp.status().as_u16()));
                }
                let stream = Stall::new(
                    resp.bytes_stream()
                        .map_err(|e| std::io::Error::other(describe_http(&e))),
                    self.opts.timeout,
                );
                Ok(Box::pin(StreamReader::new(stream)))
            }
        }
    }
}

/// A reqwest error in one line, with its cause (connection refused, timed out, ...).
fn describe_http(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Checks that `key` is `NAME:BASE64` of a 32-byte ed25519 public key.
fn check_public_key(key: &str) -> Result<(), SubstituteError> {
    let bad = |why: &str| SubstituteError(format!("trusted public key {key:?}: {why}"));
    let (name, b64) = key.split_once(':').ok_or_else(|| bad("want NAME:BASE64"))?;
    if name.is_empty() {
        return Err(bad("the name before ':' is empty"));
    }
    let raw = data_encoding::BASE64
        .decode(b64.as_bytes())
        .map_err(|_| bad("not base64"))?;
    if raw.len() != 32 {
        return Err(bad(&format!(
            "{} bytes, want 32 (is this the secret key?)",
            raw.len()
        )));
    }
    Ok(())
}

/// Fails a stream that yields nothing for `limit`.
struct Stall<S> {
    inner: S,
    limit: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Stall<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<S: Stream<Item = std::io::Result<Bytes>> + Unpin> Stream for Stall<S> {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_next(cx) {
            Poll::Ready(item) => {
                let next = tokio::time::Instant::now() + me.limit;
                me.sleep.as_mut().reset(next);
                Poll::Ready(item)
            }
            Poll::Pending => match me.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the cache sent nothing for {:?}", me.limit),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Counts and hashes the bytes of a file on their way to the decompressor.
pub(crate) struct FileTap<R> {
    pub inner: R,
    pub sha: Sha256,
    pub size: u64,
    pub limit: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for FileTap<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                me.sha.update(new);
                me.size += new.len() as u64;
                if me.size > me.limit {
                    return Poll::Ready(Err(std::io::Error::other(format!(
                        "file is over the limit of {} bytes",
                        me.limit
                    ))));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// The roots of a store with substitution behind them: a name the store lacks that is a
/// store path basename is fetched from the substituter's caches.
struct SubstitutingRoots {
    inner: Arc<dyn RootService>,
    sub: Arc<Substituter>,
}

#[async_trait]
impl RootService for SubstitutingRoots {
    async fn get(&self, name: &str) -> StoreResult<Option<RootRecord>> {
        if let Some(r) = self.inner.get(name).await? {
            return Ok(Some(r));
        }
        let Ok((hash, _)) = parse_basename(name) else {
            return Ok(None);
        };
        match self.sub.fetch(hash).await? {
            Some(rec) if rec.name == name => Ok(Some(rec)),
            // The cache holds another path with this hash part: not the one asked for.
            _ => Ok(None),
        }
    }
    async fn put(&self, root: &RootRecord) -> StoreResult<()> {
        self.inner.put(root).await
    }
    async fn put_many(&self, roots: &[RootRecord]) -> Vec<StoreResult<()>> {
        self.inner.put_many(roots).await
    }
    async fn list(&self) -> StoreResult<Vec<String>> {
        self.inner.list().await
    }
    async fn delete(&self, name: &str) -> StoreResult<bool> {
        self.inner.delete(name).await
    }
}

/// `store` with `sub` behind its roots.
pub fn layer(store: &Store, sub: Arc<Substituter>) -> Store {
    let mut s = store.clone();
    s.roots = Arc::new(SubstitutingRoots {
        inner: store.roots.clone(),
        sub,
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_urls_and_keys_are_checked() {
        assert!(Cache::parse("http://x/").is_ok());
        assert!(Cache::parse("file:///tmp/c?compression=xz").is_ok());
        assert!(Cache::parse("s3://bucket").is_err());
        assert!(Cache::parse("file://").is_err());
        let pk = format!("k:{}", data_encoding::BASE64.encode(&[1u8; 32]));
        assert!(check_public_key(&pk).is_ok());
        assert!(check_public_key("k").is_err());
        assert!(check_public_key(":AAAA").is_err());
        let sk = format!("k:{}", data_encoding::BASE64.encode(&[1u8; 64]));
        assert!(check_public_key(&sk)
            .unwrap_err()
            .to_string()
            .contains("secret"));
    }

    #[tokio::test]
    async fn a_stalled_stream_fails_after_the_limit() {
        let pending = futures::stream::pending::<std::io::Result<Bytes>>();
        let mut s = Stall::new(pending, Duration::from_millis(200));
        let t0 = tokio::time::Instant::now();
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(200));
        // A stream that keeps sending is never cut, however long it runs in all.
        let ticks = futures::stream::iter(0..6).then(|_| async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        });
        let mut s = Stall::new(Box::pin(ticks), Duration::from_millis(200));
        let mut n = 0;
        while let Some(item) = s.next().await {
            item.unwrap();
            n += 1;
        }
        assert_eq!(n, 6);
    }
}
