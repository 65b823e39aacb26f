//! `s3://BUCKET[/PREFIX]?endpoint=URL&region=R[&allow_http=true][&timeout=30s]`: the store kept
//! in an S3-compatible object store, through the `object_store` crate.
//!
//! The key layout is the `file://` store's (config.toml, `packs/<id>.pack` + `.idx`, roots/<name>;
//! stores from before packs also hold loose chunks/ab/<hex>, blobs/ab/<hex>, dirs/ab/<hex>),
//! under PREFIX, so a `file://` store copied into a bucket with any S3 tool is a valid `s3://`
//! store, and the other way round. Credentials come from the usual AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, ...).
//!
//! - Puts are gathered into packs of [`packs::PACK_TARGET`] bytes, uploaded whole (pack, then
//!   its index as the commit point; a root put commits first), with no HEAD per object: what
//!   is stored is known from the bucket's pack indexes, listed once and again at most every
//!   [`PACK_RESCAN`] on a miss. Pack names (creation time and 32 random bits) never collide,
//!   so any number of machines import into one bucket at once.
//! - Reads look in the pack being filled, then the known packs, then under the object's own
//!   key (only where the bucket holds loose objects), then in packs listed since. Packs are
//!   read in aligned extents of [`packs::EXTENT`] kept in memory, one GET each however many
//!   readers want it, so a batch of chunks (readahead, prefetch) or directories costs one GET
//!   per extent it touches; at most [`MAX_GETS`] GETs are in flight.
//! - Root puts are conditional (`If-Match` on the version seen, `If-None-Match: *` for a new
//!   root) where the server supports it, so a put never silently replaces a version it did not
//!   see; on servers without conditional puts they are last-writer-wins per root.
//! - Every call has a deadline (`timeout`, default 30 s, with a 5 s connect timeout and a few
//!   retries inside it): a missing bucket, wrong credentials or a dead endpoint give a one-line
//!   error, never a hang.
//! - gc rewrites packs holding garbage and moves loose objects into packs in two halves a
//!   grace period apart, safe beside imports on other machines (see [`gc`]): the space of a
//!   pack is freed by the first gc that runs a grace period after the one that found it.
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

use super::codec::{decode_chunk, decode_group, plain_as_frame, verify_stored, Stored};
use super::pack::{self, IndexEntry};
use super::{
    check_children, empty_blob, BlobMeta, BlobService, ChunkRef, ChunkSink, DirectoryService,
    Maintenance, ObjectInfo, ObjectKind as Kind, Result, RootService, Store, StoreConfig,
    StoreError, Usage,
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
static PUT_BYTES: AtomicU64 = AtomicU64::new(0);

/// `(name, count)` of the S3 requests this process made so far.
pub fn request_counts() -> Vec<(&'static str, u64)> {
    vec![
        ("s3 GET requests", GETS.load(Ordering::Relaxed)),
        ("s3 GET bytes", GET_BYTES.load(Ordering::Relaxed)),
        ("s3 HEAD requests", HEADS.load(Ordering::Relaxed)),
        ("s3 PUT requests", PUTS.load(Ordering::Relaxed)),
        ("s3 PUT bytes", PUT_BYTES.load(Ordering::Relaxed)),
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
    /// Chunks fetched whole by `stat` (of a single-chunk blob), kept for the read that
    /// usually follows, so a small file costs one GET instead of three.
    stash: Arc<Mutex<lru::LruCache<B3Digest, Bytes>>>,
    packs: Arc<tokio::sync::Mutex<S3Packs>>,
    /// Puts not yet in a committed pack.
    staged: Arc<Mutex<packs::Staged>>,
    /// Held while sealed packs are uploaded (see `upload_sealed`).
    upload: Arc<tokio::sync::Mutex<()>>,
    /// Where pack indexes read from the bucket are kept (a disk cache's), so another process
    /// needs no GET for them: an index never changes once written.
    index_dir: Option<Arc<std::path::PathBuf>>,
    /// Pack extents in memory (see `packs::Extents`), and the packs' lengths as last listed.
    extents: Arc<Mutex<packs::Extents>>,
    pack_sizes: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    /// Bounds the GETs this store has in flight at once.
    gets: Arc<tokio::sync::Semaphore>,
    /// Packed objects the running gc found dead, with its cutoff (see `maintenance`).
    pending: Arc<Mutex<std::collections::HashMap<(Kind, B3Digest), SystemTime>>>,
    /// Compression groups decompressed lately (see `packs::Groups`).
    groups: Arc<packs::Groups>,
}

/// GETs in flight at once per store (a cold mount's readers and prefetch together).
const MAX_GETS: usize = 32;

/// Keep markers: objects imports reused from packs already there (see `maintenance`).
pub(super) const KEEP_DIR: &str = "packs/keep";
/// gc records: packs and loose keys to delete a grace period later (see `maintenance`).
pub(super) const DOOMED_DIR: &str = "packs/doomed";

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
    /// Packs a gc record names: not reused by puts, read only where nothing else has a copy.
    doomed: HashSet<String>,
    /// gc records (key, LastModified, what they name), as last listed.
    records: Vec<(Key, SystemTime, packs::Doomed)>,
    /// Keep markers (key, LastModified), as last listed.
    keeps: Vec<(Key, SystemTime)>,
    /// Whether the bucket held loose objects at the last listing (`None`: not listed yet).
    has_loose: Option<bool>,
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

mod gc;
mod maintenance;
mod objects;
mod packs;
mod requests;
mod roots;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use maintenance::*;
#[allow(unused_imports)]
pub use objects::*;
#[allow(unused_imports)]
pub use requests::*;
#[allow(unused_imports)]
pub use roots::*;
impl S3Store {
    /// Opens the store a URL names, creating its config.toml (default parameters) if the
    /// bucket holds none under the prefix.
    pub async fn open(url: &str) -> Result<Store> {
        Self::open_with(url, StoreConfig::default(), None, None).await
    }

    /// As [`S3Store::open`]; a new store is created with `create_with`. With `offline`, a
    /// config.toml that cannot be read because the endpoint is unreachable is replaced by that
    /// config (a cache in front of the store remembered it), so cached objects stay readable.
    pub async fn open_with(
        url: &str,
        create_with: StoreConfig,
        offline: Option<StoreConfig>,
        index_dir: Option<std::path::PathBuf>,
    ) -> Result<Store> {
        let mut s3 = Self::connect(url)?;
        s3.index_dir = index_dir.map(Arc::new);
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
            stash: Arc::new(Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(STASH).unwrap_or(std::num::NonZeroUsize::MIN),
            ))),
            packs: Arc::default(),
            staged: Arc::default(),
            upload: Arc::default(),
            index_dir: None,
            extents: Arc::default(),
            pack_sizes: Arc::default(),
            gets: Arc::new(tokio::sync::Semaphore::new(MAX_GETS)),
            pending: Arc::default(),
            groups: Arc::default(),
        })
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
}
