//! A Nix binary cache over HTTP, backed by the store (DESIGN.md §6): plain `nix` clients
//! substitute from it and `nix copy --to http://...` fills it.
//!
//! - `GET /nix-cache-info`;
//! - `GET|HEAD /<hash>.narinfo` for every root named `<hash>-<name>` with Nix metadata, with
//!   the stored signatures plus one by `--sign-key`; unknown hashes are a 404 from memory;
//! - `GET|HEAD /nar/<narhash>.nar`: the NAR rendered from the castore as it is sent, with its
//!   `Content-Length` and single `Range`s. The last piece is held back until the whole NAR has
//!   been checked against the recorded hash, so a corrupt store yields a cut-off transfer,
//!   never a complete wrong one;
//! - `PUT /nar/<filehash>.nar[.xz]` then `PUT /<hash>.narinfo` (the order Nix uses): the NAR
//!   is streamed through the NAR reader into the store and held, unrecorded, until its narinfo
//!   arrives; the root is recorded only if the narinfo's NarHash/NarSize (and FileHash/FileSize)
//!   match what was received. The client keeps the narinfo it uploaded and later asks for
//!   its own `nar/<filehash>.nar.xz`; while the server runs, that name is answered with a
//!   fresh xz rendering of the same NAR (Nix checks the NarHash, not the FileHash).

pub mod index;
pub mod narinfo;
pub mod sign;
pub mod substitute;

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::{ReaderStream, StreamReader};

use self::index::RootIndex;
use self::sign::NixSigningKey;
use crate::model::castore::{NixInfo, Node, RootRecord};
use crate::store::{Store, StoreError};
use crate::views::nar::hash::{is_nix32_char, nix32_decode};
use crate::views::nar::store_path::HASH_PART_LEN;
use crate::views::nar::{import_nar, write_nar, NarError, NarHash, NarImport, NarSummary};

/// How the cache behaves; see `granary serve-cache --help`.
#[derive(Debug)]
pub struct CacheOptions {
    pub store_dir: String,
    pub priority: u32,
    pub sign_key: Option<NixSigningKey>,
    /// Bearer token (or Basic password) required when set.
    pub token: Option<String>,
    /// With a token: GET and HEAD need none.
    pub anonymous_read: bool,
    /// Refuse every upload.
    pub read_only: bool,
    /// Largest NAR file accepted in one PUT (compressed size).
    pub max_upload: u64,
    /// How long an uploaded NAR waits for its narinfo.
    pub pending_ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            store_dir: crate::views::nar::store_path::DEFAULT_STORE_DIR.to_string(),
            priority: 40,
            sign_key: None,
            token: None,
            anonymous_read: false,
            read_only: false,
            max_upload: 64 << 30,
            pending_ttl: Duration::from_secs(3600),
        }
    }
}

/// Uploaded NARs waiting for their narinfo, at most this many (oldest dropped first).
const MAX_PENDING: usize = 4096;

/// A NAR stored but not yet recorded as a root.
struct Pending {
    import: NarImport,
    file_hash: NarHash,
    file_size: u64,
    at: Instant,
}

/// The cache's state, shared by all connections.
pub struct BinaryCache {
    store: Store,
    opts: CacheOptions,
    index: RootIndex,
    pending: std::sync::Mutex<HashMap<String, Pending>>,
    /// Compressed NAR file names of recorded uploads -> their NAR hash. A Nix client caches
    /// the narinfo it uploaded, so it asks for that file name later, not ours.
    uploaded: std::sync::Mutex<HashMap<String, NarHash>>,
    /// Where paths the store lacks are fetched from (a caching proxy), if anywhere.
    upstream: Option<Arc<substitute::Substituter>>,
}

/// Upload file names remembered, at most (an entry is about 100 bytes).
const MAX_UPLOADED: usize = 100_000;

impl BinaryCache {
    pub fn new(store: Store, opts: CacheOptions) -> Arc<Self> {
        Self::with_upstream(store, opts, None)
    }

    /// A cache that fetches the paths its store lacks from `upstream` (stored deduplicated,
    /// then served like the rest).
    pub fn with_upstream(
        store: Store,
        opts: CacheOptions,
        upstream: Option<Arc<substitute::Substituter>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            opts,
            index: RootIndex::new(),
            pending: std::sync::Mutex::new(HashMap::new()),
            uploaded: std::sync::Mutex::new(HashMap::new()),
            upstream,
        })
    }

    /// The name of the store path with this hash part: from the index, else fetched upstream.
    async fn name_by_hash(&self, hash: &str) -> Result<Option<String>, HttpError> {
        if let Some(name) = self.index.by_hash(&self.store, hash).await? {
            return Ok(Some(name));
        }
        let Some(up) = &self.upstream else {
            return Ok(None);
        };
        match up.fetch(hash).await {
            Ok(Some(rec)) => {
                let nar = rec
                    .nix
                    .as_ref()
                    .and_then(|n| NarHash::try_from(&n.nar_sha256[..]).ok());
                if let Some(nar) = nar {
                    self.index.insert(&rec.name, nar).await;
                }
                Ok(Some(rec.name))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(HttpError(StatusCode::BAD_GATEWAY, e.to_string())),
        }
    }

    /// Loads the root index; returns how many roots carry Nix metadata.
    pub async fn load_index(&self) -> Result<usize, StoreError> {
        self.index.refresh(&self.store).await?;
        Ok(self.index.len().await)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        // A panic elsewhere while holding the lock leaves a map that is still consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn uploaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, NarHash>> {
        self.uploaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_pending(&self, url: String, p: Pending) {
        let ttl = self.opts.pending_ttl;
        let mut map = self.pending();
        map.retain(|_, v| v.at.elapsed() < ttl);
        while map.len() >= MAX_PENDING {
            let Some(oldest) = map.iter().min_by_key(|(_, v)| v.at).map(|(k, _)| k.clone()) else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(url, p);
    }

    /// The narinfo served for a root: stored signatures, plus ours (replacing a stored one
    /// by the same key name).
    fn render_narinfo(&self, name: &str, nix: &NixInfo) -> Result<String, HttpError> {
        let mut nix = nix.clone();
        if let Some(key) = &self.opts.sign_key {
            let prefix = format!("{}:", key.name());
            nix.signatures.retain(|s| !s.starts_with(&prefix));
            let fp = sign::fingerprint(&self.opts.store_dir, name, &nix).ok_or_else(|| {
                HttpError::internal(format!("{name}: recorded NAR hash is invalid"))
            })?;
            nix.signatures.push(key.sign(&fp));
        }
        crate::views::nar::narinfo::render(name, &nix, &self.opts.store_dir)
            .map_err(HttpError::internal)
    }
}

/// The HTTP routes, behind the auth check.
pub fn router(cache: Arc<BinaryCache>) -> Router {
    Router::new()
        .route("/nix-cache-info", get(get_cache_info).put(put_cache_info))
        .route("/nar/{file}", get(get_nar).put(put_nar))
        .route("/{file}", get(get_file).put(put_file))
        .fallback(|| async { HttpError::not_found("no such file in this cache") })
        .layer(axum::middleware::from_fn_with_state(cache.clone(), auth))
        .with_state(cache)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    cache: Arc<BinaryCache>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let guarded = crate::views::net_guard::GuardedListener {
        inner: listener,
        gate: crate::views::net_guard::Gate::new(crate::views::net_guard::default_cap()),
    };
    axum::serve(guarded, router(cache))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An error answer: a status and a one-line reason.
#[derive(Debug)]
pub struct HttpError(StatusCode, String);

impl HttpError {
    fn not_found(m: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, m.into())
    }
    fn bad(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
    fn internal(m: impl Into<String>) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, m.into())
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        Self::internal(format!("store: {e}"))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.0.is_server_error() {
            tracing::warn!("{}: {}", self.0, self.1);
        } else {
            tracing::debug!("{}: {}", self.0, self.1);
        }
        let mut r = (self.0, format!("{}\n", self.1)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

/// Whether the headers carry the token: `Bearer TOKEN`, or Basic with TOKEN as the password
/// (what Nix sends from a netrc file).
fn carries_token(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(t) = v.strip_prefix("Bearer ") {
        t.trim().as_bytes().to_vec()
    } else if let Some(b) = v.strip_prefix("Basic ") {
        let Ok(dec) = data_encoding::BASE64.decode(b.trim().as_bytes()) else {
            return false;
        };
        match dec.iter().position(|&c| c == b':') {
            Some(i) => dec[i + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    constant_time_eq(&given, token.as_bytes())
}

/// Compares without an early exit, so response times do not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(c): State<Arc<BinaryCache>>, req: Request, next: Next) -> Response {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    if write && c.opts.read_only {
        return HttpError(StatusCode::FORBIDDEN, "this cache is read-only".into()).into_response();
    }
    if let Some(token) = &c.opts.token {
        let anonymous_ok = c.opts.anonymous_read && !write;
        if !anonymous_ok && !carries_token(req.headers(), token) {
            let mut r = HttpError(
                StatusCode::UNAUTHORIZED,
                "this cache needs a token (Authorization: Bearer, or a netrc password)".into(),
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"granary\""),
            );
            return r;
        }
    }
    next.run(req).await
}

fn text_response(method: &Method, content_type: &'static str, text: String) -> Response {
    let len = text.len();
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(text)
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

async fn get_cache_info(State(c): State<Arc<BinaryCache>>, method: Method) -> Response {
    let text = format!(
        "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
        c.opts.store_dir, c.opts.priority
    );
    text_response(&method, "text/x-nix-cache-info", text)
}

/// Nix writes `nix-cache-info` only into a cache that has none; ours is generated, so the
/// upload is accepted if it names the same store directory and otherwise refused.
async fn put_cache_info(
    State(c): State<Arc<BinaryCache>>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let text = read_limited(body, 64 << 10).await?;
    for line in text.lines() {
        if let Some(dir) = line.strip_prefix("StoreDir: ") {
            if dir != c.opts.store_dir {
                return Err(HttpError(
                    StatusCode::CONFLICT,
                    format!("this cache serves {}, not {dir}", c.opts.store_dir),
                ));
            }
        }
    }
    Ok(StatusCode::OK)
}

/// The hash part of `<hash>.narinfo`, if it is one.
fn narinfo_hash(file: &str) -> Option<&str> {
    let hash = file.strip_suffix(".narinfo")?;
    (hash.len() == HASH_PART_LEN && hash.bytes().all(is_nix32_char)).then_some(hash)
}

async fn get_file(
    State(c): State<Arc<BinaryCache>>,
    method: Method,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    let Some(hash) = narinfo_hash(&file) else {
        return Err(HttpError::not_found(format!("{file}: not in this cache")));
    };
    let Some(name) = c.name_by_hash(hash).await? else {
        return Err(HttpError::not_found(format!("{hash}: no such store path")));
    };
    let nix = match c.store.roots.get(&name).await? {
        Some(RootRecord { nix: Some(nix), .. }) => nix,
        _ => {
            c.index.forget(&name).await;
            return Err(HttpError::not_found(format!("{hash}: no such store path")));
        }
    };
    let text = c.render_narinfo(&name, &nix)?;
    Ok(text_response(&method, "text/x-nix-narinfo", text))
}

/// A single `Range: bytes=...` as a half-open window, `Ok(None)` for no (or an ignored
/// multi-part) range, `Err` for one that cannot be satisfied.
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let Some(spec) = v.to_str().ok().and_then(|s| s.strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multi-part ranges are optional; the whole body is a valid answer.
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(())?;
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size)
        }
        (false, _) => {
            let s: u64 = a.parse().map_err(|_| ())?;
            let e = if b.is_empty() {
                size
            } else {
                let last: u64 = b.parse().map_err(|_| ())?;
                if last < s {
                    return Err(());
                }
                last.saturating_add(1).min(size)
            };
            (s, e)
        }
        (true, true) => return Err(()),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn get_nar(
    State(c): State<Arc<BinaryCache>>,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Result<Response, HttpError> {
    if method == Method::HEAD {
        // Nix asks before uploading whether the file is already there.
        if let Some(p) = c.pending().get(&format!("nar/{file}")) {
            let mut r = Response::new(Body::empty());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(p.file_size));
            return Ok(r);
        }
    }
    let not_found = || HttpError::not_found(format!("nar/{file}: not in this cache"));
    let uploaded_xz = c.uploaded().get(&file).copied();
    let Some(want) = uploaded_xz.or_else(|| {
        file.strip_suffix(".nar")
            .and_then(nix32_decode::<32>)
            .map(NarHash)
    }) else {
        return Err(not_found());
    };
    let Some(name) = c.index.by_nar(&c.store, &want).await? else {
        return Err(not_found());
    };
    let (node, nix) = match c.store.roots.get(&name).await? {
        Some(RootRecord {
            node,
            nix: Some(nix),
            ..
        }) if nix.nar_sha256[..] == want.0 => (node, nix),
        _ => {
            c.index.forget(&name).await;
            return Err(not_found());
        }
    };
    let size = nix.nar_size;
    let summary = NarSummary {
        nar_size: size,
        nar_sha256: want,
    };
    if uploaded_xz.is_some() {
        // Nix does not check FileHash when it downloads, only the NarHash of what it
        // decompresses, so a fresh (fast) xz rendering of the same NAR serves.
        let body = if method == Method::HEAD {
            Body::empty()
        } else {
            let nar = StreamReader::new(nar_stream(c.store.clone(), node, summary, None, name));
            let xz = async_compression::tokio::bufread::XzEncoder::with_quality(
                nar,
                async_compression::Level::Fastest,
            );
            Body::from_stream(ReaderStream::with_capacity(xz, 256 << 10))
        };
        let mut r = Response::new(body);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-nix-nar"),
        );
        return Ok(r);
    }
    let range = parse_range(&headers, size).map_err(|()| {
        HttpError(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("nar/{file}: range not satisfiable (size {size})"),
        )
    })?;
    let (status, len) = match range {
        None => (StatusCode::OK, size),
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, e - s),
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(nar_stream(c.store.clone(), node, summary, range, name))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some((s, e)) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{}/{size}", e - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(r)
}

/// Bytes of rendered NAR in flight between the writer task and the connection.
const PIPE_BYTES: usize = 1 << 20;

/// The NAR of `node` (or the `window` of it), rendered by a task as the client reads. The
/// last piece is held until the writer has finished and its size and hash check out.
fn nar_stream(
    store: Store,
    node: Node,
    want: NarSummary,
    window: Option<(u64, u64)>,
    name: String,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let (w, r) = tokio::io::duplex(PIPE_BYTES);
    let task = tokio::spawn(async move {
        match window {
            None => {
                let mut w = w;
                let got = write_nar(&store, &node, &mut w)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                if got != want {
                    return Err(format!(
                        "{name}: NAR rendered as {} ({} bytes), the root records {} ({} bytes)",
                        got.nar_sha256, got.nar_size, want.nar_sha256, want.nar_size
                    ));
                }
                Ok(())
            }
            Some((start, end)) => {
                let mut win = Window {
                    inner: w,
                    pos: 0,
                    start,
                    end,
                };
                match write_nar(&store, &node, &mut win).await {
                    Ok(got) if got.nar_size >= end => Ok(()),
                    Ok(got) => Err(format!(
                        "{name}: NAR rendered as {} bytes, the root records {}",
                        got.nar_size, want.nar_size
                    )),
                    Err(_) if win.pos >= win.end => Ok(()),
                    Err(e) => Err(format!("{name}: {e}")),
                }
            }
        }
    });
    struct St {
        chunks: ReaderStream<tokio::io::DuplexStream>,
        held: Option<Bytes>,
        task: Option<tokio::task::JoinHandle<Result<(), String>>>,
    }
    let st = St {
        chunks: ReaderStream::with_capacity(r, 256 << 10),
        held: None,
        task: Some(task),
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            match st.chunks.next().await {
                Some(Ok(b)) => {
                    if let Some(prev) = st.held.replace(b) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.task = None;
                    return Some((Err(e), st));
                }
                None => {
                    let task = st.task.take()?;
                    let verdict = match task.await {
                        Ok(v) => v,
                        Err(e) => Err(format!("NAR writer task failed: {e}")),
                    };
                    return match verdict {
                        Ok(()) => st.held.take().map(|last| (Ok(last), st)),
                        Err(e) => {
                            tracing::warn!("serving NAR: {e}; cutting the transfer short");
                            Some((Err(io::Error::other(e)), st))
                        }
                    };
                }
            }
        }
    })
}

/// Passes on only the bytes in `[start, end)` of what is written; fails once past `end` so
/// the writer stops rendering what nobody asked for.
struct Window<W> {
    inner: W,
    pos: u64,
    start: u64,
    end: u64,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Window<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.pos >= me.end {
            return Poll::Ready(Err(io::Error::other("range complete")));
        }
        let len = buf.len() as u64;
        if me.pos + len <= me.start {
            me.pos += len;
            return Poll::Ready(Ok(buf.len()));
        }
        let skip = me.start.saturating_sub(me.pos);
        let take = (len - skip).min(me.end - (me.pos + skip));
        let part = &buf[skip as usize..(skip + take) as usize];
        match Pin::new(&mut me.inner).poll_write(cx, part) {
            Poll::Ready(Ok(n)) => {
                me.pos += skip + n as u64;
                Poll::Ready(Ok(skip as usize + n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads a small request body whole, refusing one over `limit` bytes.
async fn read_limited(body: Body, limit: usize) -> Result<String, HttpError> {
    let mut out = Vec::new();
    let mut s = body.into_data_stream();
    while let Some(piece) = s.next().await {
        let piece = piece.map_err(|e| HttpError::bad(format!("reading the request: {e}")))?;
        if out.len() + piece.len() > limit {
            return Err(HttpError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {limit} bytes"),
            ));
        }
        out.extend_from_slice(&piece);
    }
    String::from_utf8(out).map_err(|_| HttpError::bad("request body is not UTF-8"))
}

/// Counts and hashes the file bytes of an upload on their way to the decompressor.
struct FileTap<R> {
    inner: R,
    sha: Sha256,
    size: u64,
    limit: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for FileTap<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        match Pin::new(&mut me.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                me.sha.update(new);
                me.size += new.len() as u64;
                if me.size > me.limit {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "upload is over the limit of {} bytes",
                        me.limit
                    ))));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

fn nar_status(e: &NarError) -> StatusCode {
    match e {
        NarError::Invalid { .. } | NarError::Read { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn put_nar(
    State(c): State<Arc<BinaryCache>>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let (stem, xz) = if let Some(s) = file.strip_suffix(".nar") {
        (s, false)
    } else if let Some(s) = file.strip_suffix(".nar.xz") {
        (s, true)
    } else {
        return Err(HttpError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "nar/{file}: granary takes .nar and .nar.xz uploads \
                 (use ?compression=none or ?compression=xz in the store URL)"
            ),
        ));
    };
    let stream = body.into_data_stream().map_err(io::Error::other);
    let mut tap = FileTap {
        inner: StreamReader::new(stream),
        sha: Sha256::new(),
        size: 0,
        limit: c.opts.max_upload,
    };
    let imported = if xz {
        let mut dec = async_compression::tokio::bufread::XzDecoder::new(
            tokio::io::BufReader::with_capacity(256 << 10, &mut tap),
        );
        import_nar(&c.store, &mut dec).await
    } else {
        import_nar(&c.store, &mut tap).await
    };
    let import = imported.map_err(|e| HttpError(nar_status(&e), format!("nar/{file}: {e}")))?;
    // Whatever follows the compressed stream still counts towards the file hash.
    tokio::io::copy(&mut tap, &mut tokio::io::sink())
        .await
        .map_err(|e| HttpError::bad(format!("nar/{file}: reading the upload: {e}")))?;
    let file_hash = NarHash(tap.sha.finalize().into());
    if let Some(named) = nix32_decode::<32>(stem).map(NarHash) {
        if named != file_hash {
            return Err(HttpError::bad(format!(
                "nar/{file}: the upload hashes to {file_hash}, not the hash in its name; \
                 nothing recorded"
            )));
        }
    }
    tracing::info!(
        "nar/{file}: received {} bytes, NAR {} ({} bytes); waiting for its narinfo",
        tap.size,
        import.nar_sha256,
        import.nar_size
    );
    c.add_pending(
        format!("nar/{file}"),
        Pending {
            import,
            file_hash,
            file_size: tap.size,
            at: Instant::now(),
        },
    );
    Ok(StatusCode::OK)
}

async fn put_file(
    State(c): State<Arc<BinaryCache>>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, HttpError> {
    let Some(hash) = narinfo_hash(&file) else {
        if file.ends_with(".ls") {
            // NAR listings are derived from the tree; nothing to keep.
            return Ok(StatusCode::OK);
        }
        return Err(HttpError::bad(format!(
            "{file}: granary takes only narinfo and NAR uploads"
        )));
    };
    let text = read_limited(body, narinfo::MAX_NARINFO_BYTES).await?;
    let info = narinfo::parse(&text, &c.opts.store_dir)
        .map_err(|e| HttpError::bad(format!("{file}: {e}")))?;
    let name = info.basename.clone();
    if !name.starts_with(hash) {
        return Err(HttpError::bad(format!(
            "{file}: StorePath {name} does not have hash part {hash}"
        )));
    }
    let reject = |why: String| HttpError::bad(format!("{file}: {why}; {name} not recorded"));
    let pending = c.pending().remove(&info.url);
    let upload_file = pending.as_ref().and_then(|_| {
        info.url
            .strip_prefix("nar/")
            .filter(|f| f.ends_with(".nar.xz"))
            .map(str::to_string)
    });
    let node = match pending {
        Some(p) => {
            let got = &p.import;
            if got.nar_sha256 != info.nar_hash || got.nar_size != info.nar_size {
                return Err(reject(format!(
                    "narinfo says NAR {} ({} bytes), {} held {} ({} bytes)",
                    info.nar_hash, info.nar_size, info.url, got.nar_sha256, got.nar_size
                )));
            }
            if info.file_hash.is_some_and(|h| h != p.file_hash)
                || info.file_size.is_some_and(|s| s != p.file_size)
            {
                return Err(reject(format!(
                    "FileHash/FileSize do not match the {} bytes uploaded to {}",
                    p.file_size, info.url
                )));
            }
            got.node.clone()
        }
        None => {
            // The same NAR may be held already under another store path (Nix skips the
            // upload when the file exists).
            let existing = match c.index.by_nar(&c.store, &info.nar_hash).await? {
                Some(other) => c.store.roots.get(&other).await?,
                None => None,
            };
            match existing {
                Some(RootRecord {
                    node, nix: Some(n), ..
                }) if n.nar_sha256[..] == info.nar_hash.0 && n.nar_size == info.nar_size => node,
                _ => {
                    return Err(reject(format!(
                        "its NAR {} was not uploaded (PUT it first)",
                        info.url
                    )))
                }
            }
        }
    };
    if let Some(old) = c.store.roots.get(&name).await? {
        let same = old
            .nix
            .as_ref()
            .is_some_and(|n| n.nar_sha256[..] == info.nar_hash.0);
        if !same {
            return Err(HttpError(
                StatusCode::CONFLICT,
                format!("{file}: {name} is already recorded with different contents"),
            ));
        }
    }
    let root = RootRecord {
        name: name.clone(),
        node,
        nix: Some(NixInfo {
            nar_size: info.nar_size,
            nar_sha256: Bytes::copy_from_slice(&info.nar_hash.0),
            references: info.references,
            deriver: info.deriver,
            signatures: info.signatures,
            ca: info.ca,
        }),
    };
    c.store.roots.put(&root).await?;
    c.index.insert(&name, info.nar_hash).await;
    if let Some(f) = upload_file {
        let mut up = c.uploaded();
        if up.len() >= MAX_UPLOADED {
            up.clear();
        }
        up.insert(f, info.nar_hash);
    }
    tracing::info!("recorded {name} ({} NAR bytes)", info.nar_size);
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut m = HeaderMap::new();
        m.insert(header::RANGE, HeaderValue::from_str(h).unwrap());
        parse_range(&m, size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=-5", 100), Ok(Some((95, 100))));
        assert_eq!(range("bytes=-500", 100), Ok(Some((0, 100))));
        assert_eq!(range("bytes=50-500", 100), Ok(Some((50, 100))));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert!(range("bytes=100-", 100).is_err());
        assert!(range("bytes=5-2", 100).is_err());
        assert!(range("bytes=-0", 100).is_err());
        assert!(range("bytes=x-", 100).is_err());
        assert!(range("bytes=-", 100).is_err());
    }

    #[tokio::test]
    async fn window_passes_only_its_bytes() {
        use tokio::io::AsyncWriteExt;
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        for (s, e) in [(0, 5000), (0, 1), (4999, 5000), (100, 4000), (1023, 1025)] {
            let mut w = Window {
                inner: Vec::new(),
                pos: 0,
                start: s,
                end: e,
            };
            for piece in data.chunks(333) {
                if w.write_all(piece).await.is_err() {
                    break;
                }
            }
            assert_eq!(w.inner, &data[s as usize..e as usize], "{s}..{e}");
        }
    }

    #[test]
    fn token_headers() {
        let mut m = HeaderMap::new();
        assert!(!carries_token(&m, "sekrit"));
        m.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sekrit"),
        );
        assert!(carries_token(&m, "sekrit"));
        assert!(!carries_token(&m, "other"));
        let basic = format!("Basic {}", data_encoding::BASE64.encode(b"nix:sekrit"));
        m.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&basic).unwrap(),
        );
        assert!(carries_token(&m, "sekrit"));
        m.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert!(!carries_token(&m, "sekrit"));
    }
}
