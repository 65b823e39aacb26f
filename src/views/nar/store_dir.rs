//! `granary import-store`: every `<hash>-<name>` entry of a Nix-store-like directory becomes a
//! named root carrying its NAR size, NAR hash and references.
//!
//! Each entry is dumped as a NAR on a blocking thread and piped into the NAR reader, so every
//! file is read once and the stored tree, the NAR hash and the reference scan all come from the
//! same bytes. Entries run in parallel; a failed entry is reported and the others go on.
//!
//! Where Nix's database is at hand (see [`super::nix_db`]), the metadata comes from it:
//! references, deriver, signatures and CA as Nix registered them, and its NAR hash is checked
//! against the NAR rendered here. Without one, references are found by scanning each NAR for
//! the other entries' hash parts, except for a `.drv`, whose references are its inputs (its
//! own outputs appear in its text but are not references).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::StreamExt;
use tokio_util::io::SyncIoBridge;

use super::dump::dump_path;
use super::nix_db::DbPath;
use super::refs::RefScanner;
use super::store_path::{parse_basename, HASH_PART_LEN};
use super::{import_nar, NarError, NarImport};
use crate::model::castore::{NixInfo, RootRecord};
use crate::store::Store;

/// Counters for progress display.
#[derive(Debug, Default)]
pub struct StoreDirProgress {
    pub entries_total: AtomicU64,
    pub entries_done: AtomicU64,
    pub nar_bytes: AtomicU64,
}

/// What happened to each entry of the directory.
#[derive(Debug, Default)]
pub struct StoreDirReport {
    /// Imported and recorded as roots, sorted by name.
    pub imported: Vec<(String, NarImport, Vec<String>)>,
    /// Entries that are not store paths: name and why.
    pub skipped: Vec<(String, String)>,
    /// Store paths whose import failed: name and error.
    pub failed: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct StoreDirError {
    pub path: PathBuf,
    pub reason: String,
}

/// A `Write` that scans for references and counts bytes on the way to the pipe.
struct Tap<W> {
    inner: W,
    scanner: RefScanner,
    progress: Arc<StoreDirProgress>,
}

impl<W: Write> Write for Tap<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scanner.update(&buf[..n]);
        self.progress
            .nar_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Nix's own bookkeeping inside a store directory, skipped without a word.
const NIX_LINKS: &str = ".links";

/// Imports every store path in `dir`, `jobs` at a time, recording each as a root. With `db`
/// (Nix's database, read by [`super::nix_db::read_db`]), only paths it registers are
/// imported, with its metadata.
pub async fn import_store_dir(
    store: &Store,
    dir: &Path,
    jobs: usize,
    db: Option<Arc<HashMap<String, DbPath>>>,
    progress: Arc<StoreDirProgress>,
) -> Result<StoreDirReport, StoreDirError> {
    let derr = |reason: String| StoreDirError {
        path: dir.to_path_buf(),
        reason,
    };
    let mut report = StoreDirReport::default();
    let mut paths: Vec<String> = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| derr(format!("cannot read directory: {e}")))?;
    for e in rd {
        let e = e.map_err(|e| derr(format!("cannot read directory: {e}")))?;
        let name = e.file_name();
        if name == NIX_LINKS {
            continue;
        }
        let Some(name) = name.to_str() else {
            report.skipped.push((
                name.to_string_lossy().into_owned(),
                "name is not UTF-8".into(),
            ));
            continue;
        };
        match (parse_basename(name), &db) {
            (Err(e), _) => report.skipped.push((name.to_string(), e.reason)),
            (Ok(_), Some(db)) if !db.contains_key(name) => report
                .skipped
                .push((name.to_string(), "not valid in Nix's database".into())),
            (Ok(_), _) => paths.push(name.to_string()),
        }
    }
    paths.sort();
    report.skipped.sort();
    progress
        .entries_total
        .store(paths.len() as u64, Ordering::Relaxed);

    // Hash part -> basename, for turning scanned hashes back into references.
    let by_hash: Arc<HashMap<[u8; HASH_PART_LEN], String>> = Arc::new(
        paths
            .iter()
            .filter_map(|p| {
                let mut h = [0u8; HASH_PART_LEN];
                h.copy_from_slice(p.as_bytes().get(..HASH_PART_LEN)?);
                Some((h, p.clone()))
            })
            .collect(),
    );

    let mut results = futures::stream::iter(paths)
        .map(|name| {
            let (store, by_hash, progress) = (store.clone(), by_hash.clone(), progress.clone());
            let path = dir.join(&name);
            let registered = db.as_ref().and_then(|db| db.get(&name).cloned());
            async move {
                let res = tokio::spawn(import_one(
                    store,
                    path,
                    name.clone(),
                    by_hash,
                    registered,
                    progress.clone(),
                ))
                .await
                .unwrap_or_else(|e| Err(format!("import task failed: {e}")));
                progress.entries_done.fetch_add(1, Ordering::Relaxed);
                (name, res)
            }
        })
        .buffer_unordered(jobs.max(1));
    let mut batch: Vec<(String, NarImport, Vec<String>, RootRecord)> = Vec::new();
    loop {
        let next = results.next().await;
        let end = next.is_none();
        match next {
            Some((name, Ok((imp, refs, root)))) => batch.push((name, imp, refs, root)),
            Some((name, Err(e))) => report.failed.push((name, e)),
            None => {}
        }
        if batch.len() >= ROOT_BATCH || (end && !batch.is_empty()) {
            let roots: Vec<RootRecord> = batch.iter().map(|b| b.3.clone()).collect();
            let put = store.roots.put_many(&roots).await;
            for ((name, imp, refs, _), r) in batch.drain(..).zip(put) {
                match r {
                    Ok(()) => report.imported.push((name, imp, refs)),
                    Err(e) => report.failed.push((name, format!("recording root: {e}"))),
                }
            }
        }
        if end {
            break;
        }
    }
    report.imported.sort_by(|a, b| a.0.cmp(&b.0));
    report.failed.sort();
    Ok(report)
}

/// One entry's import, its references and the root to record, or why it failed.
type EntryResult = Result<(NarImport, Vec<String>, RootRecord), String>;

/// Roots recorded together: one flush (one pack) for the lot instead of one per store path.
const ROOT_BATCH: usize = 64;

async fn import_one(
    store: Store,
    path: PathBuf,
    name: String,
    by_hash: Arc<HashMap<[u8; HASH_PART_LEN], String>>,
    registered: Option<DbPath>,
    progress: Arc<StoreDirProgress>,
) -> EntryResult {
    // A derivation's references are its inputs; read them before the dump.
    let drv_refs = if registered.is_none() && name.ends_with(".drv") {
        drv_references(&path, &by_hash).await?
    } else {
        None
    };
    let (tx, rx) = tokio::io::duplex(1 << 20);
    let scanner = RefScanner::new(by_hash.keys().copied());
    let dump_path_buf = path.clone();
    let dumper = tokio::task::spawn_blocking(move || {
        let mut tap = Tap {
            inner: SyncIoBridge::new(tx),
            scanner,
            progress,
        };
        dump_path(&dump_path_buf, &mut tap).map(|()| tap.scanner)
        // Dropping the bridge closes the pipe: the reader sees the end of the NAR.
    });
    let imported = import_nar(&store, rx).await;
    let dumped = dumper.await.map_err(|e| format!("dump task failed: {e}"))?;
    let (imp, scanner) = match (imported, dumped) {
        (Ok(imp), Ok(scanner)) => (imp, scanner),
        // A dump that failed midway shows up in the reader as a truncated NAR: the dump's
        // error is the real reason.
        (Err(NarError::Invalid { reason, .. }), Err(d)) if reason.starts_with("truncated") => {
            return Err(d.to_string())
        }
        (Err(e), _) => return Err(e.to_string()),
        (Ok(_), Err(d)) => return Err(d.to_string()),
    };
    let nix = match registered {
        Some(db) => {
            if db.nar_hash != imp.nar_sha256 || (db.nar_size != 0 && db.nar_size != imp.nar_size) {
                return Err(format!(
                    "Nix's database records NAR {} ({} bytes), but the path renders as {} ({} \
                     bytes): it changed since Nix registered it",
                    db.nar_hash, db.nar_size, imp.nar_sha256, imp.nar_size
                ));
            }
            NixInfo {
                nar_size: imp.nar_size,
                nar_sha256: bytes::Bytes::copy_from_slice(&imp.nar_sha256.0),
                references: db.references,
                deriver: db.deriver,
                signatures: db.signatures,
                ca: db.ca,
            }
        }
        None => {
            let mut references: Vec<String> = match drv_refs {
                Some(r) => r,
                None => scanner
                    .found()
                    .filter_map(|h| by_hash.get(h).cloned())
                    .collect(),
            };
            references.sort();
            references.dedup();
            NixInfo {
                nar_size: imp.nar_size,
                nar_sha256: bytes::Bytes::copy_from_slice(&imp.nar_sha256.0),
                references,
                ..Default::default()
            }
        }
    };
    let references = nix.references.clone();
    let root = RootRecord {
        name: name.clone(),
        node: imp.node.clone(),
        nix: Some(nix),
        times: None,
        times_head: Vec::new(),
        traces: Vec::new(),
    };
    Ok((imp, references, root))
}

/// The inputs of the derivation at `path` that are entries of the directory being imported.
async fn drv_references(
    path: &Path,
    by_hash: &HashMap<[u8; HASH_PART_LEN], String>,
) -> Result<Option<Vec<String>>, String> {
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| format!("reading the derivation: {e}"))?;
    if !meta.is_file() {
        // Not a derivation file after all (a directory named *.drv): scan it like the rest.
        return Ok(None);
    }
    if meta.len() > super::drv::MAX_DRV_BYTES as u64 {
        return Err(format!(
            "derivation is over {} bytes",
            super::drv::MAX_DRV_BYTES
        ));
    }
    let text = tokio::fs::read(path)
        .await
        .map_err(|e| format!("reading the derivation: {e}"))?;
    let drv = super::drv::parse(&text)?;
    Ok(Some(
        drv.inputs()
            .filter_map(|p| {
                let base = p.rsplit('/').next()?;
                let mut h = [0u8; HASH_PART_LEN];
                h.copy_from_slice(base.as_bytes().get(..HASH_PART_LEN)?);
                by_hash.get(&h).filter(|n| n.as_str() == base).cloned()
            })
            .collect(),
    ))
}
