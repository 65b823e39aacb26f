//! Nix compatibility (DESIGN.md §6): NAR archives in and out of the store, NAR hashes in Nix's
//! spellings, store path names, and `.narinfo` rendering.
//!
//! The NAR format, every item a length-prefixed string padded with zeros to 8 bytes:
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( "regular" ["executable" ""] "contents" BYTES
//!                        | "symlink" "target" BYTES
//!                        | "directory" { "entry" "(" "name" NAME "node" node ")" } ) ")"
//! ```
//!
//! A NAR is canonical: entries strictly sorted by name bytes, padding zero, one way to spell
//! each tree. So a NAR the reader accepts is rendered back by the writer byte for byte.

pub mod drv;
pub mod dump;
pub mod hash;
pub mod narinfo;
pub mod nix_db;
pub mod reader;
pub mod refs;
pub mod registration;
pub mod store_dir;
pub mod store_path;
pub mod writer;

pub use hash::NarHash;
pub use reader::{import_nar, NarImport};
pub use writer::{write_nar, NarSummary};

use crate::store::StoreError;

/// The first string of every NAR.
pub const MAGIC: &[u8] = b"nix-archive-1";

/// Longest keyword of the format (`"nix-archive-1"`); bounds every keyword read.
pub(crate) const MAX_KEYWORD_LEN: u64 = 16;

/// Bytes of zero padding after a string of `len` bytes.
pub(crate) fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Why a NAR could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The input is not a valid NAR; `offset` is where the bad item starts.
    #[error("bad NAR at byte {offset}: {reason}")]
    Invalid { offset: u64, reason: String },
    #[error("reading NAR at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing NAR: {0}")]
    Write(#[source] std::io::Error),
    #[error("NAR at byte {offset}: store: {source}")]
    Store {
        offset: u64,
        #[source]
        source: StoreError,
    },
    /// The store could not give the writer what a node names.
    #[error("reading the tree from the store: {0}")]
    Tree(#[source] StoreError),
    #[error("{0}")]
    Task(String),
}

impl NarError {
    pub fn invalid(offset: u64, reason: impl Into<String>) -> Self {
        NarError::Invalid {
            offset,
            reason: reason.into(),
        }
    }
}
