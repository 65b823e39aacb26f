//! granary: a content-addressed, chunk-deduplicating store for file trees, and a read-only
//! FUSE filesystem that exposes it. See DESIGN.md for the architecture.
//!
//! - [`castore`]: the data model (digests, directories, roots), no I/O
//! - [`chunking`]: FastCDC with per-store parameters
//! - [`store`]: the blob, directory and root services and their backends
//! - [`import`] / [`tree`]: trees in and out
//! - [`fs`]: the read-only FUSE mount
//! - [`nar`]: Nix compatibility: NAR in and out, NAR hashes, store paths, narinfo
//! - [`sandbox`]: run a command inside a stored tree (overlayfs, namespaces)
//! - [`binary_cache`]: the store as a Nix binary cache over HTTP
//! - [`dedup`]: what each chunking strategy would save on some data
//! - [`cli`]: the `granary` command, a thin layer over the above

pub mod binary_cache;
pub mod castore;
pub mod chunking;
pub mod cli;
pub mod dedup;
pub mod fs;
pub mod gc;
pub mod import;
pub mod nar;
pub mod net_guard;
pub mod rpc;
pub mod sandbox;
pub mod store;
pub mod tree;
pub mod units;
pub mod verify;
