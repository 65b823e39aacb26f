//! The file cache: a bounded directory of whole files named by their BLAKE3 digest, each
//! re-hashed before this process first hands it out, so the mount can give the kernel a local
//! file to read directly (FUSE passthrough) and never one it has not verified.
//!
//! Several mounts may share one directory: files appear by atomic rename, least recently used
//! ones (by mtime, touched on use) are removed to keep the bound, and a file removed while a
//! mount has it open stays readable through that open descriptor.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::model::castore::B3Digest;

/// Where the file cache is and what it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCacheOptions {
    pub dir: PathBuf,
    /// Bytes of files kept; the least recently used go first.
    pub limit: u64,
    /// Files smaller than this are never cached (their reads gain little from passthrough).
    pub min_size: u64,
}

/// The bound and the smallest file of a file cache when not told otherwise.
pub const DEFAULT_LIMIT: u64 = 4 << 30;
pub const DEFAULT_MIN_SIZE: u64 = 256 << 10;

impl FileCacheOptions {
    /// A cache in `dir` with the default bound and smallest size.
    pub fn at(dir: PathBuf) -> Self {
        Self {
            dir,
            limit: DEFAULT_LIMIT,
            min_size: DEFAULT_MIN_SIZE,
        }
    }
}

/// Temporary files of a writer that died are removed after this long.
const STALE_TMP: Duration = Duration::from_secs(600);
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Default)]
pub struct FileCacheStats {
    /// Files written (whole, verified) into the cache by this process.
    pub filled: AtomicU64,
    /// Files found that did not hash to their name, and removed.
    pub rejected: AtomicU64,
}

pub struct FileCache {
    opts: FileCacheOptions,
    /// Files this process has verified, held open.
    verified: Mutex<HashMap<B3Digest, Arc<File>>>,
    /// Files being written by this process.
    filling: Mutex<HashSet<B3Digest>>,
    pub stats: FileCacheStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The BLAKE3 digest of everything `file` holds, and its length (wherever its offset is).
fn hash_file(file: &File) -> io::Result<(B3Digest, u64)> {
    use std::os::unix::fs::FileExt;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok((B3Digest::from(*hasher.finalize().as_bytes()), at))
}

impl FileCache {
    /// Opens (creating it, mode 0700) the cache directory, removing temporary files left by
    /// writers that died.
    pub fn open(opts: FileCacheOptions) -> io::Result<Self> {
        std::fs::create_dir_all(&opts.dir)?;
        std::fs::set_permissions(&opts.dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(&opts.dir)?.flatten() {
            let stale = entry.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_TMP);
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            opts,
            verified: Mutex::default(),
            filling: Mutex::default(),
            stats: FileCacheStats::default(),
        })
    }

    pub fn options(&self) -> &FileCacheOptions {
        &self.opts
    }

    /// Whether a file of `size` bytes belongs in the cache.
    pub fn wants(&self, size: u64) -> bool {
        size >= self.opts.min_size && size <= self.opts.limit / 2
    }

    fn path_of(&self, digest: &B3Digest) -> PathBuf {
        self.opts.dir.join(digest.to_hex())
    }

    /// The cached file with this content, verified (hashed) the first time this process uses
    /// it; a file that does not hash to its name is removed and `None` returned. Blocking.
    pub fn get(&self, digest: &B3Digest, size: u64) -> Option<Arc<File>> {
        if let Some(f) = lock(&self.verified).get(digest) {
            return Some(f.clone());
        }
        let path = self.path_of(digest);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok()?;
        let meta = file.metadata().ok()?;
        let good = meta.is_file()
            && meta.len() == size
            && hash_file(&file).is_ok_and(|(d, n)| d == *digest && n == size);
        if !good {
            tracing::warn!(
                "file cache: {} does not hold the content it is named after; removed",
                path.display()
            );
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // Its mtime is its last use, for eviction by whichever process needs room.
        let _ = file.set_modified(SystemTime::now());
        let file = Arc::new(file);
        lock(&self.verified).insert(*digest, file.clone());
        Some(file)
    }

    /// Claims the right to fill `digest` (false if it is being filled or already verified).
    pub fn start_fill(&self, digest: &B3Digest) -> bool {
        !lock(&self.verified).contains_key(digest) && lock(&self.filling).insert(*digest)
    }

    fn tmp_path(&self, digest: &B3Digest) -> PathBuf {
        self.opts.dir.join(format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            digest.to_hex()
        ))
    }

    /// A temporary file to fill, in the cache directory (so the final rename is atomic).
    pub fn create_tmp(&self, digest: &B3Digest) -> io::Result<(PathBuf, File)> {
        let tmp = self.tmp_path(digest);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        Ok((tmp, file))
    }

    /// Ends a fill started with [`start_fill`](Self::start_fill): on success the temporary
    /// file, which must hash to `digest`, becomes the cached file after older files make room.
    /// Blocking.
    pub fn finish_fill(&self, digest: &B3Digest, tmp: Option<(PathBuf, File)>) -> io::Result<()> {
        let result = (|| {
            let Some((path, mut file)) = tmp else {
                return Ok(());
            };
            let done = (|| {
                file.flush()?;
                let (got, size) = hash_file(&file)?;
                if got != *digest {
                    return Err(io::Error::other(format!(
                        "written content hashes to {got}, not {digest}"
                    )));
                }
                file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
                self.make_room(size)?;
                std::fs::rename(&path, self.path_of(digest))?;
                self.stats.filled.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })();
            if done.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            done
        })();
        lock(&self.filling).remove(digest);
        result
    }

    /// Removes the least recently used files until `incoming` more bytes fit the bound.
    fn make_room(&self, incoming: u64) -> io::Result<()> {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&self.opts.dir)?.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            if let Ok(m) = entry.metadata() {
                if m.is_file() {
                    let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    files.push((used, m.size(), entry.path()));
                }
            }
        }
        let mut total: u64 = files.iter().map(|f| f.1).sum::<u64>() + incoming;
        files.sort();
        for (_, size, path) in files {
            if total <= self.opts.limit {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
            }
        }
        Ok(())
    }

    /// Bytes of cached files in the directory (for tests and `--help` figures).
    pub fn bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

impl Drop for FileCache {
    /// Copies cut short (the mount is going away) leave no temporary file behind.
    fn drop(&mut self) {
        for digest in lock(&self.filling).iter() {
            let _ = std::fs::remove_file(self.tmp_path(digest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path, limit: u64) -> FileCache {
        FileCache::open(FileCacheOptions {
            dir: dir.to_path_buf(),
            limit,
            min_size: 1,
        })
        .unwrap()
    }

    fn put(c: &FileCache, data: &[u8]) -> B3Digest {
        let d = B3Digest::of(data);
        assert!(c.start_fill(&d));
        let (path, mut f) = c.create_tmp(&d).unwrap();
        f.write_all(data).unwrap();
        c.finish_fill(&d, Some((path, f))).unwrap();
        d
    }

    #[test]
    fn a_filled_file_is_served_and_a_tampered_one_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let c = cache(t.path(), 1 << 20);
        let d = put(&c, b"hello world");
        assert!(c.get(&d, 11).is_some());
        assert!(!c.start_fill(&d), "a verified file is not filled again");
        // A second process (a new cache object) re-verifies, and rejects a changed file.
        let path = t.path().join(d.to_hex());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&path, b"hello World").unwrap();
        let c2 = cache(t.path(), 1 << 20);
        assert!(c2.get(&d, 11).is_none());
        assert!(!path.exists());
        assert_eq!(c2.stats.rejected.load(Ordering::Relaxed), 1);
        // A wrong size is rejected too.
        let d2 = put(&c2, b"abc");
        let c3 = cache(t.path(), 1 << 20);
        assert!(c3.get(&d2, 4).is_none());
    }

    #[test]
    fn a_fill_with_the_wrong_content_is_discarded() {
        let t = tempfile::tempdir().unwrap();
        let c = cache(t.path(), 1 << 20);
        let d = B3Digest::of(b"right");
        assert!(c.start_fill(&d));
        let (path, mut f) = c.create_tmp(&d).unwrap();
        f.write_all(b"wrong").unwrap();
        assert!(c.finish_fill(&d, Some((path.clone(), f))).is_err());
        assert!(!path.exists() && !t.path().join(d.to_hex()).exists());
        assert!(c.start_fill(&d), "a failed fill can be retried");
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_go_first() {
        let t = tempfile::tempdir().unwrap();
        let c = cache(t.path(), 3000);
        let a = put(&c, &[1u8; 1000]);
        let b = put(&c, &[2u8; 1000]);
        // `a` used after `b`: `b` is the least recently used.
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.get(&a, 1000).is_some());
        let _c = put(&c, &[3u8; 1000]);
        let _d = put(&c, &[4u8; 1000]);
        assert!(FileCache::bytes(t.path()) <= 3000);
        assert!(t.path().join(a.to_hex()).exists());
        assert!(!t.path().join(b.to_hex()).exists());
    }
}
