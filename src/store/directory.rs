//! The directory service: castore directory nodes. This file is the contract every backend
//! keeps.
//!
//! - A directory is stored under `blake3` of its canonical protobuf encoding; whatever a
//!   backend returns decodes, validates (names, order, sizes) and hashes to the digest asked
//!   for, or is an error naming it.
//! - `Ok(None)` means absent. Puts are idempotent and validate: a directory whose child
//!   directories are not stored, or disagree with their recorded sizes, is refused — so a
//!   stored directory's closure is always complete.
//! - A closure (a directory and everything below it) can be fetched and stored as one
//!   operation; backends that can do it in one round trip (a daemon) do.

use std::collections::HashSet;

use async_trait::async_trait;

use super::{Result, StoreError};
use crate::model::castore::{B3Digest, Directory};

/// Directories asked for at once by the default batch and closure reads.
const BATCH_CONCURRENCY: usize = 16;

/// Directory nodes.
#[async_trait]
pub trait DirectoryService: Send + Sync {
    /// A verified, validated directory; `Ok(None)` if absent.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>>;

    /// Validates and stores one directory, returning its digest. Its child directories
    /// must already be stored (leaves first) and agree with their recorded sizes.
    async fn put(&self, dir: &Directory) -> Result<B3Digest>;

    /// Whether a directory is stored.
    async fn has(&self, digest: &B3Digest) -> Result<bool>;

    /// Several directories, in the order asked, each as [`DirectoryService::get`] gives it.
    /// The default asks concurrently; a backend whose reads are short blocking calls reads
    /// them on one thread, saving a thread hand-off per directory.
    async fn get_many(&self, digests: Vec<B3Digest>) -> Vec<Result<Option<Directory>>> {
        use futures::StreamExt;
        futures::stream::iter(digests)
            .map(|d| async move { self.get(&d).await })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await
    }

    /// A directory and every directory below it, each once, root first and every other
    /// after one that names it; empty if the root is absent. A directory below it that is
    /// missing is an error naming it.
    async fn get_closure(&self, root: &B3Digest) -> Result<Vec<Directory>> {
        closure_by_levels(self, root).await
    }

    /// Stores a closure given leaves first (every directory after those it names); returns
    /// the digest of the last, its root. Each directory is validated as a put is; a backend
    /// that can (a daemon) takes it all or nothing.
    async fn put_closure(&self, dirs: Vec<Directory>) -> Result<B3Digest> {
        let mut last = None;
        for d in &dirs {
            last = Some(self.put(d).await?);
        }
        last.ok_or_else(|| StoreError::Backend("put closure: no directories".into()))
    }

    /// Makes every directory put so far durable and visible to other processes (as
    /// [`super::BlobService::flush`]).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A closure read a level at a time through [`DirectoryService::get_many`]: the default of
/// [`DirectoryService::get_closure`], for backends without a better way.
pub async fn closure_by_levels<D: DirectoryService + ?Sized>(
    dirs: &D,
    root: &B3Digest,
) -> Result<Vec<Directory>> {
    let Some(top) = dirs.get(root).await? else {
        return Ok(Vec::new());
    };
    let mut seen = HashSet::from([*root]);
    let mut out = vec![top];
    let mut next = 0;
    while next < out.len() {
        let level: Vec<B3Digest> = out[next..]
            .iter()
            .flat_map(|d| d.directories.iter())
            .filter_map(|e| B3Digest::try_from(&e.digest[..]).ok())
            .filter(|d| seen.insert(*d))
            .collect();
        next = out.len();
        for (d, got) in level.iter().zip(dirs.get_many(level.clone()).await) {
            out.push(got?.ok_or_else(|| StoreError::not_found("directory", d))?);
        }
    }
    Ok(out)
}

/// Checks a directory's child entries against the children already in the store.
pub async fn check_children(dirs: &dyn DirectoryService, dir: &Directory) -> Result<()> {
    for entry in &dir.directories {
        let d = B3Digest::try_from(&entry.digest[..])?;
        let child = dirs
            .get(&d)
            .await?
            .ok_or_else(|| StoreError::not_found("child directory", &d))?;
        Directory::check_child(entry, &child)?;
    }
    Ok(())
}
