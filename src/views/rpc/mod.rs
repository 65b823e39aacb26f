//! The daemon's side of the remote protocol (DESIGN.md §5): the gRPC service over a store,
//! and ingest sessions. The wire types and the client live below the store, in
//! [`crate::store::remote`].

pub mod ingest;
pub mod serve;
pub mod server;
