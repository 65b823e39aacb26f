//! Whole-store operations: counting, listing, age-checked deletion, damage reports. This file
//! is the contract every backend that can list its objects keeps (a store without it —
//! memory, S3 without listing rights — still serves reads and writes; `gc` and store-wide
//! `verify` need it).
//!
//! Garbage collection relies on one rule every backend keeps: a put that finds its object
//! already stored refreshes the object's `modified` time, so an object an import is about to
//! refer to always looks young to a concurrent gc; and `delete_if_older` checks that time
//! atomically with the deletion.

use async_trait::async_trait;

use super::{Result, StoreError};
use crate::model::castore::B3Digest;

/// The kinds of content-addressed object a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Chunk,
    BlobIndex,
    Directory,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 3] = [Self::Chunk, Self::BlobIndex, Self::Directory];

    /// Directory (or key prefix) holding objects of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Chunk => "chunks",
            Self::BlobIndex => "blobs",
            Self::Directory => "dirs",
        }
    }

    pub fn what(self) -> &'static str {
        match self {
            Self::Chunk => "chunk",
            Self::BlobIndex => "blob index",
            Self::Directory => "directory",
        }
    }
}

/// One stored object, as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub kind: ObjectKind,
    pub digest: B3Digest,
    /// Bytes as stored (compressed, for chunks).
    pub stored_bytes: u64,
    /// Last write or reuse by an import (protects it from a concurrent gc).
    pub modified: std::time::SystemTime,
}

/// Counters a backend can report about itself, for `granary info`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub chunks: u64,
    pub blob_indexes: u64,
    pub directories: u64,
    pub roots: u64,
    /// Uncompressed bytes of all chunks.
    pub chunk_bytes: u64,
    /// Bytes the store's objects occupy where they are kept.
    pub stored_bytes: u64,
}

/// Operations over all objects of a backend (counting now; listing and sweeping for gc).
///
/// Garbage collection relies on one rule every backend keeps: a put that finds its object
/// already stored refreshes the object's `modified` time, so an object an import is about to
/// refer to always looks young to a concurrent gc.
#[async_trait]
pub trait Maintenance: Send + Sync {
    async fn usage(&self) -> Result<Usage>;

    /// Every stored object of one kind.
    async fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;

    /// Deletes an object unless it was modified at or after `cutoff` (checked atomically with
    /// respect to a concurrent put). Returns whether it was deleted.
    async fn delete_if_older(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
        cutoff: std::time::SystemTime,
    ) -> Result<bool>;

    /// Deletes an object unconditionally (to replace a corrupt one during repair).
    async fn remove(&self, kind: ObjectKind, digest: &B3Digest) -> Result<()>;

    /// Removes leftovers of interrupted writes older than `cutoff`; returns how many.
    async fn sweep_temp(&self, cutoff: std::time::SystemTime) -> Result<u64>;
    /// Service counters worth showing in `granary info` (a daemon's requests, bytes, ...).
    async fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }

    /// Storage units damaged as a whole (a pack whose index cannot be read, whose index
    /// lists bytes past its end, or whose pack file is gone), each with why. Their objects
    /// read as absent; `verify` reports both.
    async fn damage(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    /// Moves a damaged storage unit out of the store's view (kept aside, not deleted), once
    /// what it held is restored elsewhere.
    async fn set_aside(&self, unit: &str) -> Result<()> {
        Err(StoreError::Backend(format!(
            "{unit}: this store has no storage units to set aside"
        )))
    }

    /// Rewrites every stored pack with its small objects compressed together in groups
    /// (switching a store written without groups to them) and, with a `level`, everything
    /// compressed again at that zstd level. Every object is verified on the way (a damaged
    /// one is left out and reported by `verify`), copies are durable before an original
    /// goes, and readers and imports may run meanwhile. Stores without packs refuse.
    async fn repack(&self, level: Option<i32>) -> Result<Repacked> {
        let _ = level;
        Err(StoreError::Backend(
            "this store cannot be repacked (only a local store with packs can)".into(),
        ))
    }
}

/// What a repack did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repacked {
    pub packs_before: usize,
    pub packs_after: usize,
    /// Bytes of pack files and their indexes, before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}
