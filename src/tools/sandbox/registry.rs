//! Running `granary mount`s announce themselves in `RUNTIME/mounts/PID.json` so a sandbox can
//! reuse one of the same store instead of starting its own FUSE server. An entry counts only
//! while its process lives and its mount point is still mounted; the tree found there is
//! checked by digest and by its table of times (xattrs), so a root replaced since does not
//! slip in.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::castore::B3Digest;
use crate::views::fs::{XATTR_DIGEST, XATTR_TIMES};

/// How long a digest check on a registered mount may take before the mount is passed over.
const CHECK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    pid: u32,
    store: String,
    mountpoint: PathBuf,
    /// The tree's digest when the mount shows one tree; none when it lists named roots.
    tree: Option<String>,
}

/// A mount's entry; removed on drop.
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Announces this process's mount of `store_url` at `mountpoint`.
pub fn register(
    runtime: &Path,
    store_url: &str,
    mountpoint: &Path,
    tree: Option<&B3Digest>,
) -> std::io::Result<Registration> {
    let dir = runtime.join("mounts");
    std::fs::create_dir_all(&dir)?;
    let pid = std::process::id();
    let entry = Entry {
        pid,
        store: store_url.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        tree: tree.map(B3Digest::to_hex),
    };
    let path = dir.join(format!("{pid}.json"));
    let tmp = dir.join(format!(".{pid}.json.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&entry).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(Registration { path })
}

/// A directory of a running `granary mount` of `store_url` showing tree `digest` with the
/// times of table `times` (reached by `name` if the mount lists named roots).
pub fn find(
    runtime: &Path,
    store_url: &str,
    digest: &B3Digest,
    times: Option<&B3Digest>,
    name: &str,
) -> Option<PathBuf> {
    let want = digest.to_hex();
    let want_times = times.map(B3Digest::to_hex);
    let entries = std::fs::read_dir(runtime.join("mounts")).ok()?;
    for e in entries.flatten() {
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
            continue;
        };
        if !Path::new(&format!("/proc/{}", entry.pid)).exists() {
            // Its mount was killed before it could clean up.
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        if entry.store != store_url {
            continue;
        }
        if crate::views::fs::mount_device(&entry.mountpoint).is_none() {
            continue;
        }
        let candidate = match &entry.tree {
            Some(t) if *t == want => entry.mountpoint.clone(),
            Some(_) => continue,
            None => entry.mountpoint.join(name),
        };
        let Some((d, t)) = xattrs_of(candidate.clone()) else {
            continue;
        };
        if d.as_deref() == Some(want.as_str()) && t == want_times {
            return Some(candidate);
        }
    }
    None
}

/// The digest and times xattrs of `path`, read on a thread so a stalled mount cannot stall
/// us; `None` if that took too long.
type Xattrs = (Option<String>, Option<String>);
fn xattrs_of(path: PathBuf) -> Option<Xattrs> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send((
            read_xattr(&path, XATTR_DIGEST),
            read_xattr(&path, XATTR_TIMES),
        ));
    });
    rx.recv_timeout(CHECK_WAIT).ok()
}

fn read_xattr(path: &Path, name: &str) -> Option<String> {
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = [0u8; 256];
    // SAFETY: valid strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    String::from_utf8(buf.get(..len)?.to_vec()).ok()
}
