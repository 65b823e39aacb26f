//! The embedded `file://` store (DESIGN.md §3):
//!
//! ```text
//! config.toml        chunking parameters, compression, format version
//! packs/<id>.pack    objects written together (format 2; see [`super::pack`])
//! packs/<id>.idx     where each object of the pack is
//! chunks/ab/abcd..   zstd-compressed chunk, named by blake3 of the uncompressed bytes
//! blobs/ab/abcd..    blob index (multi-chunk blobs only)
//! dirs/ab/abcd..     directory protobuf
//! roots/<name>       root record
//! ```
//!
//! A store created with `packs = true` (the default since format 2) writes new objects into
//! pack files; a format-1 store writes one file per object. Both are read either way.
//! Objects are immutable: written to a temp file in the target directory, made durable, then
//! renamed into place, so a crash never leaves a partial object under a final name, and two
//! processes writing the same object both succeed. Disk I/O runs on tokio's blocking pool.
//!
//! An fsync per object costs milliseconds, which dominates an import of many small files. So
//! objects are *staged*: written to temp files, then made durable together by one `syncfs`
//! and renamed into place ([`LocalStore::flush`]), before any root can refer to them (a root
//! put flushes first) and whenever the staged set grows large. Staged objects are visible to
//! this process (reads fall back to the temp file) but not to others until flushed.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::codec::{decode_group, encode_chunk};
use super::pack::{self, PackSet, PackWriter};
pub use super::ObjectKind as Kind;
use super::{
    check_children, empty_blob, BlobMeta, BlobService, ChunkRef, ChunkSink, DirectoryService,
    Maintenance, ObjectInfo, Result, RootService, Store, StoreConfig, StoreError, Usage,
};
use crate::model::castore::{validate_root_name, B3Digest, BlobIndex, Directory, RootRecord};

/// Largest chunk we will decompress: FastCDC's largest allowed maximum.
pub use crate::model::chunking::MAX_CHUNK;

const TMP_PREFIX: &str = ".tmp-";

/// First read buffer for an object: most compressed chunks and directories fit.
const OBJECT_READ_BUF: usize = 64 << 10;

/// How long after a store is opened its pack indexes start being read whole in the
/// background (see `LocalStore::open`).
const INDEX_CHECK_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Bytes of a chunk batch read on one thread (see `read_chunks`).
const BATCH_GROUP_BYTES: u64 = 1 << 20;

/// gc merges packs smaller than this once there are `MERGE_AT` of them.
const MERGE_BELOW: u64 = 64 << 20;
const MERGE_AT: usize = 16;

/// Staged objects are flushed once they hold this many bytes or objects.
const STAGE_MAX_BYTES: u64 = 512 << 20;
const STAGE_MAX_OBJECTS: usize = 50_000;

/// Objects written to temp files, awaiting one `syncfs` and their rename into place.
#[derive(Default)]
struct Staged {
    objects: HashMap<PathBuf, tempfile::TempPath>,
    /// The pack being written (packed stores), and what it holds so far.
    pack: Option<PackWriter>,
    packed: std::collections::HashSet<(Kind, B3Digest)>,
    bytes: u64,
    /// Whether this process ever staged an object (a reader never does, so it can trust a
    /// first "not found").
    ever: bool,
}

/// The on-disk store. Cheap to clone (all state is shared).
#[derive(Clone)]
pub struct LocalStore {
    root: Arc<PathBuf>,
    config: StoreConfig,
    staged: Arc<Mutex<Staged>>,
    packs: Arc<PackSet>,
    /// Packed objects a gc found collectable, with that gc's cutoff; removed by repacking at
    /// the sweep that ends the same gc.
    pending: Arc<Mutex<HashMap<(Kind, B3Digest), SystemTime>>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .finish()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
}

mod maintenance;
mod objects;
mod roots;
mod staging;
#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use maintenance::*;
#[allow(unused_imports)]
pub use objects::*;
#[allow(unused_imports)]
pub use roots::*;
#[allow(unused_imports)]
pub use staging::*;
impl LocalStore {
    /// Opens the store at `path`, creating it (with default parameters) if it does not exist.
    pub async fn open(url: &str, path: &Path) -> Result<Store> {
        Self::open_with(url, path, StoreConfig::default()).await
    }

    /// Opens the store at `path`; a new store is created with `create_with`.
    pub async fn open_with(url: &str, path: &Path, create_with: StoreConfig) -> Result<Store> {
        let url_s = url.to_string();
        let path = path.to_path_buf();
        let local = blocking(move || Self::open_blocking(&url_s, &path, create_with)).await?;
        let local = Arc::new(local);
        Ok(Store {
            url: url.to_string(),
            config: local.config,
            blobs: local.clone(),
            dirs: local.clone(),
            roots: local.clone(),
            maintenance: Some(local),
            ingest: None,
        })
    }

    fn open_blocking(url: &str, path: &Path, create_with: StoreConfig) -> Result<Self> {
        let bad = |reason: String| StoreError::Config {
            url: url.to_string(),
            reason,
        };
        let cfg_path = path.join("config.toml");
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => StoreConfig::from_toml(&text)
                .map_err(|r| bad(format!("{}: {r}", cfg_path.display())))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Refuse to take over a directory holding anything but what a store being
                // created by another process at this moment would hold.
                let foreign = match std::fs::read_dir(path) {
                    Ok(rd) => rd.flatten().any(|e| {
                        let n = e.file_name();
                        let n = n.to_string_lossy();
                        !(n.starts_with(TMP_PREFIX)
                            || [
                                "config.toml",
                                "chunks",
                                "blobs",
                                "dirs",
                                "roots",
                                pack::PACK_DIR,
                            ]
                            .contains(&n.as_ref()))
                    }),
                    Err(_) => false,
                };
                if foreign {
                    return Err(bad(format!(
                        "{} is a non-empty directory without config.toml; not a granary store",
                        path.display()
                    )));
                }
                // A store whose config.toml was deleted: making a new one would silently
                // change how files are cut (other chunking parameters).
                let holds = ["roots", "chunks", "blobs", "dirs", pack::PACK_DIR]
                    .iter()
                    .any(|sub| {
                        std::fs::read_dir(path.join(sub)).is_ok_and(|mut rd| {
                            rd.any(|e| {
                                e.is_ok_and(|e| {
                                    !e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                                })
                            })
                        })
                    });
                if holds {
                    return Err(bad(format!(
                        "{} is missing, but the store holds objects or roots; restore it (it \
                         records the store's chunking parameters and format) rather than let a \
                         new one change them",
                        cfg_path.display()
                    )));
                }
                std::fs::create_dir_all(path)
                    .map_err(|e| bad(format!("cannot create {}: {e}", path.display())))?;
                create_with
                    .chunking
                    .validate()
                    .map_err(|e| bad(e.to_string()))?;
                write_atomic(&cfg_path, create_with.to_toml().as_bytes(), false)?;
                // Another process may have created it first with other parameters: theirs win.
                let text = std::fs::read_to_string(&cfg_path)
                    .map_err(|e| bad(format!("{}: {e}", cfg_path.display())))?;
                StoreConfig::from_toml(&text).map_err(bad)?
            }
            Err(e) => return Err(bad(format!("{}: {e}", cfg_path.display()))),
        };
        let subs: &[&str] = if config.packs {
            &["roots", pack::PACK_DIR]
        } else {
            &["chunks", "blobs", "dirs", "roots"]
        };
        for sub in subs {
            std::fs::create_dir_all(path.join(sub))
                .map_err(|e| bad(format!("cannot create {sub}/: {e}")))?;
        }
        // The pack indexes are opened and then read whole in the background from here; a
        // read's lookup waits only for the opening (it searches them in place meanwhile),
        // anything else for the reading.
        let packs = Arc::new(PackSet::new(path.join(pack::PACK_DIR)));
        {
            let packs = packs.clone();
            std::thread::spawn(move || {
                // Lookups search the opened indexes in place meanwhile, so the reading waits
                // until a fresh mount's first lookups are answered (reading megabytes of
                // indexes beside them made a first `stat` 3–4 ms slower) and then runs at the
                // lowest priority. Whoever needs checked indexes earlier checks them itself
                // (`ensure_checked`). Best effort.
                if packs.ensure_loaded().is_ok() {
                    std::thread::sleep(INDEX_CHECK_DELAY);
                    // SAFETY: setpriority on this thread's own id touches no memory.
                    unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                    }
                }
                if let Err(e) = packs.ensure_checked() {
                    tracing::warn!("{e}");
                }
            });
        }
        Ok(LocalStore {
            root: Arc::new(path.to_path_buf()),
            config,
            staged: Arc::default(),
            packs,
            pending: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, kind: Kind, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(kind.dir()).join(&hex[..2]).join(hex)
    }
}
