//! The root service: named roots. This file is the contract every backend keeps.
//!
//! - A root is a name (see [`crate::model::castore::validate_root_name`]) pointing at one node,
//!   with optional Nix metadata. A backend stores and returns the record as given; a record
//!   that cannot be read is an error naming the root, never a silently missing root.
//! - A put makes everything put before it durable first (so a root never points at objects
//!   a crash could lose), then creates or atomically replaces the root.
//! - `list` is sorted; `delete` says whether there was a root.

use async_trait::async_trait;

use super::{Result, StoreError};
use crate::model::castore::RootRecord;

/// Named roots.
#[async_trait]
pub trait RootService: Send + Sync {
    /// The root of that name; `Ok(None)` if there is none.
    async fn get(&self, name: &str) -> Result<Option<RootRecord>>;

    /// Creates or atomically replaces the root of that name, after making everything put
    /// so far durable.
    async fn put(&self, root: &RootRecord) -> Result<()>;

    /// Records several roots, one result each. A local store makes everything they refer to
    /// durable once for the lot (one pack rather than one per root).
    async fn put_many(&self, roots: &[RootRecord]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(roots.len());
        for r in roots {
            out.push(self.put(r).await);
        }
        out
    }

    /// All root names, sorted.
    async fn list(&self) -> Result<Vec<String>>;

    /// Removes a root; `Ok(false)` if there was none.
    async fn delete(&self, name: &str) -> Result<bool>;
}

/// Decodes the record stored for root `name`, refusing one that names another root: the
/// one root-record check every backend applies.
pub fn decode_root(name: &str, raw: &[u8]) -> Result<RootRecord> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "root",
        digest: name.to_string(),
        reason,
    };
    let r = RootRecord::decode(raw).map_err(|e| corrupt(e.to_string()))?;
    if r.name != name {
        return Err(corrupt(format!("record names itself {:?}", r.name)));
    }
    Ok(r)
}
