//! Root records: one file each under `roots/`, read without following links or blocking, replaced atomically.

#[allow(unused_imports)]
use super::*;

/// Largest root record read (a root holds a node and Nix metadata: kilobytes).
pub(super) const MAX_ROOT_BYTES: u64 = 16 << 20;

/// Reads a root record file without following a link or blocking on a FIFO: anything but a
/// regular file under `roots/` is refused without being opened for reading.
pub(super) fn read_root_file(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(StoreError::Backend(format!(
                "{}: a symbolic link, not a root record",
                path.display()
            )))
        }
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let meta = f
        .metadata()
        .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(StoreError::Backend(format!(
            "{}: not a regular file, not a root record",
            path.display()
        )));
    }
    if meta.len() > MAX_ROOT_BYTES {
        return Err(StoreError::Backend(format!(
            "{}: {} bytes, over the {MAX_ROOT_BYTES}-byte limit of a root record",
            path.display(),
            meta.len()
        )));
    }
    let mut raw = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_ROOT_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
    Ok(Some(raw))
}

impl LocalStore {
    pub(super) fn root_path(&self, name: &str) -> Result<PathBuf> {
        validate_root_name(name)?;
        if name.starts_with(TMP_PREFIX) {
            return Err(StoreError::Backend(format!(
                "root name {name:?} starts with {TMP_PREFIX:?}, which the local store reserves"
            )));
        }
        Ok(self.root.join("roots").join(name))
    }
}
#[async_trait]
impl RootService for LocalStore {
    async fn get(&self, name: &str) -> Result<Option<RootRecord>> {
        let path = self.root_path(name)?;
        let name = name.to_string();
        blocking(move || {
            let Some(raw) = read_root_file(&path)? else {
                return Ok(None);
            };
            crate::store::decode_root(&name, &raw).map(Some)
        })
        .await
    }

    async fn put(&self, root: &RootRecord) -> Result<()> {
        let path = self.root_path(&root.name)?;
        let bytes = root.encode();
        let s = self.clone();
        // Everything the root refers to is durable and in place before the root is.
        blocking(move || {
            s.flush_blocking()?;
            write_atomic(&path, &bytes, true)
        })
        .await
    }

    async fn put_many(&self, roots: &[RootRecord]) -> Vec<Result<()>> {
        let s = self.clone();
        let roots = roots.to_vec();
        let n = roots.len();
        let done = blocking(move || {
            s.flush_blocking()?;
            Ok(roots
                .iter()
                .map(|r| write_atomic(&s.root_path(&r.name)?, &r.encode(), true))
                .collect::<Vec<_>>())
        })
        .await;
        match done {
            Ok(v) => v,
            Err(e) => (0..n)
                .map(|_| Err(StoreError::Backend(e.to_string())))
                .collect(),
        }
    }

    async fn list(&self) -> Result<Vec<String>> {
        let dir = self.root.join("roots");
        blocking(move || {
            Ok(read_dir_names(&dir)?
                .into_iter()
                .filter(|n| !n.starts_with(TMP_PREFIX))
                .collect())
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        let path = self.root_path(name)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(format!("removing {}", path.display()), e)),
        })
        .await
    }
}
