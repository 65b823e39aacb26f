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
use tokio::io::AsyncWrite;
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

mod auth;
mod get;
mod put;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use auth::*;
#[allow(unused_imports)]
pub use get::*;
#[allow(unused_imports)]
pub use put::*;
