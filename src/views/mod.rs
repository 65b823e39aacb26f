//! Ways a store is shown to the world: the FUSE mount, the daemon's gRPC service, the Nix
//! binary cache over HTTP, and NAR archives; and the guards the servers share.

pub mod binary_cache;
pub mod fs;
pub mod nar;
pub mod net_guard;
pub mod rpc;
