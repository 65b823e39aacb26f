//! Whole trees over a store: importing them, reading them back (resolving, listing,
//! exporting), collecting garbage, verifying and repairing.

pub mod export;
pub mod gc;
pub mod import;
pub mod info;
pub mod read;
pub mod verify;

pub use export::{export, write_blob, EXPORT_CONCURRENCY};
pub use read::*;
