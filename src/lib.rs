//! granary: a content-addressed, chunk-deduplicating store for file trees, and a read-only
//! FUSE filesystem that exposes it. `ARCHITECTURE.md` has the module map; in layers, each
//! using only those before it:
//!
//! - [`model`]: the data model (digests, directories, roots, blob indexes) and chunking
//! - [`store`]: the services whose traits are the contract, and their backends
//! - [`trees`]: whole trees in and out, gc, verify
//! - [`views`]: the FUSE mount, the daemon's service, the Nix binary cache, NARs
//! - [`tools`]: sandboxes and the dedup report
//! - [`cli`]: the `granary` command, a thin layer over the above
//!
//! [`units`] parses sizes and durations for all of them.

pub mod cli;
pub mod model;
pub mod store;
pub mod tools;
pub mod trees;
pub mod units;
pub mod views;
