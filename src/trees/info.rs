//! What a store holds, for `granary info`: roots, objects, logical bytes (what plain copies of
//! every root would take), unique chunk bytes and stored bytes, and the backend's counters.

use serde::Serialize;

use crate::store::{Result, Store, Usage};

/// The chunking parameters, as `info` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// A store's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StoreInfo {
    pub store: String,
    pub chunking: Chunking,
    pub roots: usize,
    pub chunks: u64,
    pub blob_indexes: u64,
    pub directories: u64,
    pub logical_bytes: u64,
    pub unique_chunk_bytes: u64,
    pub stored_bytes: u64,
    /// Logical bytes over unique chunk bytes (1 for an empty store).
    pub dedup_ratio: f64,
    /// Whether the backend could count its objects (the object figures are 0 if not).
    #[serde(skip)]
    pub counted: bool,
    /// Service counters (a daemon's requests, bytes, ...).
    #[serde(skip)]
    pub counters: Vec<(&'static str, u64)>,
}

/// Gathers the figures of `store`: every root's logical size (shared subtrees walked once),
/// and the backend's own counts.
pub async fn store_info(store: &Store) -> Result<StoreInfo> {
    let mut memo = std::collections::HashMap::new();
    let mut logical = 0u64;
    let names = store.roots.list().await?;
    for name in &names {
        let r = super::get_root(store, name).await?;
        logical += super::logical_size(store, &r.node, &mut memo).await?;
    }
    let (usage, counted) = match &store.maintenance {
        Some(m) => (m.usage().await?, true),
        None => (Usage::default(), false),
    };
    let counters = match &store.maintenance {
        Some(m) => m.counters().await?,
        None => Vec::new(),
    };
    let p = store.params();
    Ok(StoreInfo {
        store: store.url.clone(),
        chunking: Chunking {
            min: p.min,
            avg: p.avg,
            max: p.max,
        },
        roots: names.len(),
        chunks: usage.chunks,
        blob_indexes: usage.blob_indexes,
        directories: usage.directories,
        logical_bytes: logical,
        unique_chunk_bytes: usage.chunk_bytes,
        stored_bytes: usage.stored_bytes,
        dedup_ratio: if usage.chunk_bytes == 0 {
            1.0
        } else {
            logical as f64 / usage.chunk_bytes as f64
        },
        counted,
        counters,
    })
}
