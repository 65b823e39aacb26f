//! The store (DESIGN.md §3): three services whose traits are the whole contract, one file
//! each — [`blob`], [`directory`], [`root`], plus whole-store [`maintenance`] and
//! [`ingest`] sessions — the backends behind them, chosen by URL in [`open`], and what every
//! backend shares: the one blob writer, blob layouts and outboards, the chunk codec.
//!
//! Nothing outside this module names a backend type: callers hold a [`Store`], whose
//! services are `Arc<dyn …>`.
//!
//! Contracts, for every backend:
//! - Everything a service returns has been verified: chunk bytes hash to their digest,
//!   directories decode, validate and hash to their digest. Corruption is
//!   [`StoreError::Corrupt`], never wrong data.
//! - `Ok(None)` means absent; an error means the backend could not answer.
//! - Puts are idempotent: putting an object that exists succeeds and stores one copy.

use std::sync::Arc;

use crate::model::castore::{B3Digest, ModelError};
use crate::model::chunking::ChunkParams;

pub mod blob;
pub mod blob_writer;
pub mod cache;
pub mod codec;
pub mod config;
pub mod directory;
pub mod ingest;
pub mod layout;
pub mod local;
pub mod maintenance;
pub mod memory;
pub mod outboard;
pub mod pack;
pub mod reader;
pub mod remote;
pub mod root;
pub mod s3;

pub use blob::{empty_blob, BlobMeta, BlobService, ChunkRef, ChunkSink};
pub use config::StoreConfig;
pub use directory::{check_children, DirectoryService};
pub use ingest::{IngestOptions, IngestService, IngestStatus};
pub use maintenance::{Maintenance, ObjectInfo, ObjectKind, Repacked, Usage};
pub use reader::BlobReader;
pub use root::{decode_root, RootService};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {digest}: corrupt: {reason}")]
    Corrupt {
        what: &'static str,
        digest: String,
        reason: String,
    },
    #[error("{what} {digest} not found")]
    NotFound { what: &'static str, digest: String },
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store {url}: {reason}")]
    Config { url: String, reason: String },
    #[error("{0}")]
    Backend(String),
    #[error("{what} timed out after {secs:.1}s")]
    Timeout { what: String, secs: f64 },
}

impl StoreError {
    /// The same failure again, for each of several objects one request served (timeouts stay
    /// timeouts; the rest keep their message).
    pub fn duplicate(&self) -> Self {
        match self {
            StoreError::Timeout { what, secs } => StoreError::Timeout {
                what: what.clone(),
                secs: *secs,
            },
            e => StoreError::Backend(e.to_string()),
        }
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
    pub fn corrupt(what: &'static str, digest: &B3Digest, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what,
            digest: digest.to_hex(),
            reason: reason.into(),
        }
    }
    pub fn not_found(what: &'static str, digest: &B3Digest) -> Self {
        StoreError::NotFound {
            what,
            digest: digest.to_hex(),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A whole store: the three services and the parameters it was created with.
#[derive(Clone)]
pub struct Store {
    pub url: String,
    pub config: StoreConfig,
    pub blobs: Arc<dyn BlobService>,
    pub dirs: Arc<dyn DirectoryService>,
    pub roots: Arc<dyn RootService>,
    /// Whole-store operations, where the backend can list its objects.
    pub maintenance: Option<Arc<dyn Maintenance>>,
    /// Uploads of whole trees, where the backend takes them (a daemon).
    pub ingest: Option<Arc<dyn IngestService>>,
}

impl Store {
    pub fn params(&self) -> ChunkParams {
        self.config.chunking
    }

    /// Makes everything put so far durable (see [`BlobService::flush`]).
    pub async fn flush(&self) -> Result<()> {
        self.blobs.flush().await?;
        self.dirs.flush().await
    }
}

/// The default store location: `$GRANARY_STORE`, else `$XDG_DATA_HOME/granary`, else
/// `~/.local/share/granary`.
pub fn default_url() -> String {
    if let Ok(s) = std::env::var("GRANARY_STORE") {
        if !s.is_empty() {
            return if s.contains("://") {
                s
            } else {
                format!("file://{s}")
            };
        }
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    format!("file://{}", base.join("granary").display())
}

/// Requests this process made to remote object storage (`s3://`), by kind; empty if none.
pub fn request_counts() -> Vec<(&'static str, u64)> {
    if s3::any_requests() {
        s3::request_counts()
    } else {
        Vec::new()
    }
}

/// Opens the store a URL names, creating a `file://` store on first use.
pub async fn open(url: &str) -> Result<Store> {
    let bad = |reason: &str| StoreError::Config {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err(bad("file:// needs a path"));
        }
        local::LocalStore::open(url, std::path::Path::new(path)).await
    } else if url == "memory://" || url.starts_with("memory://") {
        Ok(memory::MemoryStore::new_store(url, StoreConfig::default()))
    } else if url.starts_with("grpc+tcp://") || url.starts_with("grpc+unix://") {
        remote::RemoteStore::open(url).await
    } else if url.starts_with("s3://") {
        s3::S3Store::open(url).await
    } else if url.contains("://") {
        Err(bad(
            "unsupported scheme (want file://, memory://, s3://, grpc+tcp:// or grpc+unix://)",
        ))
    } else {
        // A bare path is a local store.
        local::LocalStore::open(&format!("file://{url}"), std::path::Path::new(url)).await
    }
}

pub mod conformance;
