//! `memory://`: an in-process store for unit tests. Same contracts as the others; it
//! re-hashes what it is given, so it also catches callers that pass a wrong digest.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_children, empty_blob, BlobMeta, BlobService, ChunkRef, DirectoryService, Maintenance,
    ObjectInfo, ObjectKind, Result, RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};

#[derive(Default)]
pub struct MemoryStore {
    chunks: RwLock<HashMap<B3Digest, Bytes>>,
    indexes: RwLock<HashMap<B3Digest, BlobIndex>>,
    dirs: RwLock<HashMap<B3Digest, Directory>>,
    roots: RwLock<BTreeMap<String, RootRecord>>,
}

fn poisoned() -> StoreError {
    StoreError::Backend("memory store lock poisoned".into())
}

impl MemoryStore {
    pub fn new_store(url: &str, config: StoreConfig) -> Store {
        let m = Arc::new(MemoryStore::default());
        Store {
            url: url.to_string(),
            config,
            blobs: m.clone(),
            dirs: m.clone(),
            roots: m.clone(),
            maintenance: Some(m),
            ingest: None,
        }
    }
}

#[async_trait]
impl BlobService for MemoryStore {
    async fn stat(&self, blob: &B3Digest) -> Result<Option<BlobMeta>> {
        if *blob == empty_blob() {
            return Ok(Some(BlobMeta::default()));
        }
        if let Some(idx) = self.indexes.read().map_err(|_| poisoned())?.get(blob) {
            return BlobMeta::from_index(idx).map(Some);
        }
        Ok(self
            .chunks
            .read()
            .map_err(|_| poisoned())?
            .get(blob)
            .map(|c| BlobMeta {
                size: c.len() as u64,
                chunks: vec![ChunkRef {
                    digest: *blob,
                    size: c.len() as u64,
                }],
                outboard: Bytes::new(),
            }))
    }

    async fn read_chunk(&self, chunk: &B3Digest) -> Result<Option<Bytes>> {
        Ok(self
            .chunks
            .read()
            .map_err(|_| poisoned())?
            .get(chunk)
            .cloned())
    }

    async fn has_chunk(&self, chunk: &B3Digest) -> Result<bool> {
        Ok(self
            .chunks
            .read()
            .map_err(|_| poisoned())?
            .contains_key(chunk))
    }

    async fn put_chunk(&self, digest: B3Digest, data: Bytes) -> Result<()> {
        let actual = B3Digest::of(&data);
        if actual != digest {
            return Err(StoreError::corrupt(
                "chunk",
                &digest,
                format!("put with content hashing to {actual}"),
            ));
        }
        self.chunks
            .write()
            .map_err(|_| poisoned())?
            .entry(digest)
            .or_insert(data);
        Ok(())
    }

    async fn put_blob_index(&self, blob: B3Digest, index: &BlobIndex) -> Result<()> {
        index.validate()?;
        self.indexes
            .write()
            .map_err(|_| poisoned())?
            .entry(blob)
            .or_insert_with(|| index.clone());
        Ok(())
    }
}

#[async_trait]
impl DirectoryService for MemoryStore {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>> {
        Ok(self
            .dirs
            .read()
            .map_err(|_| poisoned())?
            .get(digest)
            .cloned())
    }

    async fn put(&self, dir: &Directory) -> Result<B3Digest> {
        dir.validate()?;
        check_children(self, dir).await?;
        let digest = dir.digest();
        self.dirs
            .write()
            .map_err(|_| poisoned())?
            .entry(digest)
            .or_insert_with(|| dir.clone());
        Ok(digest)
    }

    async fn has(&self, digest: &B3Digest) -> Result<bool> {
        Ok(self
            .dirs
            .read()
            .map_err(|_| poisoned())?
            .contains_key(digest))
    }
}

#[async_trait]
impl RootService for MemoryStore {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        Ok(self
            .roots
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned())
    }

    async fn put(&self, root: &RootRecord) -> Result<()> {
        validate_root_name(&root.name)?;
        self.roots
            .write()
            .map_err(|_| poisoned())?
            .insert(root.name.clone(), root.clone());
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        Ok(self
            .roots
            .read()
            .map_err(|_| poisoned())?
            .keys()
            .cloned()
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        Ok(self
            .roots
            .write()
            .map_err(|_| poisoned())?
            .remove(name)
            .is_some())
    }
}

#[async_trait]
impl Maintenance for MemoryStore {
    async fn usage(&self) -> Result<Usage> {
        let chunks = self.chunks.read().map_err(|_| poisoned())?;
        let chunk_bytes: u64 = chunks.values().map(|c| c.len() as u64).sum();
        Ok(Usage {
            chunks: chunks.len() as u64,
            blob_indexes: self.indexes.read().map_err(|_| poisoned())?.len() as u64,
            directories: self.dirs.read().map_err(|_| poisoned())?.len() as u64,
            roots: self.roots.read().map_err(|_| poisoned())?.len() as u64,
            chunk_bytes,
            stored_bytes: chunk_bytes,
        })
    }

    async fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        // Memory objects carry no times: all look old, which is right for tests of gc.
        let info = |digest: &B3Digest, stored_bytes: u64| ObjectInfo {
            kind,
            digest: *digest,
            stored_bytes,
            modified: std::time::SystemTime::UNIX_EPOCH,
        };
        Ok(match kind {
            ObjectKind::Chunk => self
                .chunks
                .read()
                .map_err(|_| poisoned())?
                .iter()
                .map(|(d, c)| info(d, c.len() as u64))
                .collect(),
            ObjectKind::BlobIndex => self
                .indexes
                .read()
                .map_err(|_| poisoned())?
                .keys()
                .map(|d| info(d, 0))
                .collect(),
            ObjectKind::Directory => self
                .dirs
                .read()
                .map_err(|_| poisoned())?
                .keys()
                .map(|d| info(d, 0))
                .collect(),
        })
    }

    async fn delete_if_older(
        &self,
        kind: ObjectKind,
        digest: &B3Digest,
        _cutoff: std::time::SystemTime,
    ) -> Result<bool> {
        let existed = Maintenance::list(self, kind)
            .await?
            .iter()
            .any(|o| o.digest == *digest);
        self.remove(kind, digest).await?;
        Ok(existed)
    }

    async fn remove(&self, kind: ObjectKind, digest: &B3Digest) -> Result<()> {
        match kind {
            ObjectKind::Chunk => {
                self.chunks.write().map_err(|_| poisoned())?.remove(digest);
            }
            ObjectKind::BlobIndex => {
                self.indexes.write().map_err(|_| poisoned())?.remove(digest);
            }
            ObjectKind::Directory => {
                self.dirs.write().map_err(|_| poisoned())?.remove(digest);
            }
        }
        Ok(())
    }

    async fn sweep_temp(&self, _cutoff: std::time::SystemTime) -> Result<u64> {
        Ok(0)
    }
}
