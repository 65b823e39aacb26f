//! The remote protocol's wire (DESIGN.md §5): generated gRPC code and what the daemon's
//! server and this client share (features, frame sizes, conversions). The server
//! (`crate::views::rpc`) sits above the store and uses these; the client sits here, below it.

use bytes::Bytes;
use prost::Message;

use crate::model::castore::{self, B3Digest, Node, RootRecord};

/// The generated messages and service (`proto/granary/v1/granary.proto`).
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/granary.v1.rs"));
}

/// Protocol features. A feature is a name, never a version: both sides use the intersection.
pub mod feature {
    pub const CHUNKED_READ: &str = "chunked-read";
    pub const BATCH_READ: &str = "batch-read";
    pub const BLOB_PUT: &str = "blob-put";
    pub const CLOSURE_GET: &str = "closure-get";
    pub const CLOSURE_PUT: &str = "closure-put";
    pub const INGEST_SESSIONS: &str = "ingest-sessions";
    pub const STATS: &str = "stats";
    pub const STAT_INLINE: &str = "stat-inline";
    pub const MAINTENANCE: &str = "maintenance";

    /// Everything this build implements, on both sides.
    pub const ALL: &[&str] = &[
        CHUNKED_READ,
        BATCH_READ,
        BLOB_PUT,
        CLOSURE_GET,
        CLOSURE_PUT,
        INGEST_SESSIONS,
        STATS,
        STAT_INLINE,
        MAINTENANCE,
    ];

    /// What a client cannot work without: reading chunks and putting blobs.
    pub const REQUIRED: &[&str] = &[CHUNKED_READ, BLOB_PUT];
}

/// Largest payload of one data frame. Far below tonic's 4 MiB default message limit, so a
/// frame with its envelope always fits.
pub const FRAME_BYTES: usize = 1 << 20;

/// Largest gRPC message either side accepts: the largest directory the model allows plus
/// room for its envelope (tonic's 4 MiB default would refuse large directories).
pub const MAX_MESSAGE: usize = crate::model::castore::MAX_DIRECTORY_BYTES + (1 << 20);

/// Largest blob whose bytes a stat answer carries inline.
pub const MAX_INLINE: u64 = 64 << 10;

/// Most chunks one batched read may ask for.
pub const MAX_BATCH: usize = 1024;

/// Converts a root record to its wire message (the same message the local store writes).
pub fn root_to_proto(r: &RootRecord) -> castore::proto::Root {
    // Decoding what we just encoded cannot fail; an empty message is the fallback anyway.
    castore::proto::Root::decode(&r.encode()[..]).unwrap_or_default()
}

/// Converts and validates a root from the wire.
pub fn root_from_proto(r: &castore::proto::Root) -> Result<RootRecord, castore::ModelError> {
    RootRecord::decode(&r.encode_to_vec())
}

/// The node of a wire root, without requiring a valid name (an unnamed ingest result).
pub fn node_from_proto(r: &castore::proto::Root) -> Result<Node, castore::ModelError> {
    let mut named = r.clone();
    named.name = Bytes::from_static(b"x");
    Ok(root_from_proto(&named)?.node)
}

pub fn digest_bytes(d: &B3Digest) -> Bytes {
    Bytes::copy_from_slice(d.as_bytes())
}

/// Wire form of an object kind.
pub fn kind_to_proto(k: crate::store::ObjectKind) -> proto::ObjectKind {
    use crate::store::ObjectKind as K;
    match k {
        K::Chunk => proto::ObjectKind::Chunk,
        K::BlobIndex => proto::ObjectKind::BlobIndex,
        K::Directory => proto::ObjectKind::Directory,
    }
}

pub fn kind_from_proto(k: proto::ObjectKind) -> crate::store::ObjectKind {
    use crate::store::ObjectKind as K;
    match k {
        proto::ObjectKind::Chunk => K::Chunk,
        proto::ObjectKind::BlobIndex => K::BlobIndex,
        proto::ObjectKind::Directory => K::Directory,
    }
}

/// A time as nanoseconds since the epoch (0 for times before it), and back.
pub fn to_nanos(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn from_nanos(n: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(n)
}
