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
    pub chunk_read_calls: AtomicU64,
    pub chunks_read: AtomicU64,
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

mod auth;
mod calls;
mod service;

#[allow(unused_imports)]
pub use auth::*;
#[allow(unused_imports)]
pub use calls::*;
#[allow(unused_imports)]
pub use service::*;
impl Daemon {
    fn maintenance(&self) -> Result<&Arc<dyn crate::store::Maintenance>, Status> {
        self.store.maintenance.as_ref().ok_or_else(|| {
            Status::unimplemented("the daemon's store cannot list or delete its objects")
        })
    }
}
