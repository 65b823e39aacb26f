//! The NAR of a path on disk (what `nix-store --dump` writes), produced on a blocking thread.
//! `import-store` pipes it into the NAR reader, so each file is read once and the stored tree
//! and the recorded NAR hash come from the same bytes.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::writer::{put_entry_start, put_file_header, put_node_start, put_str, put_symlink};
use super::{padding, MAGIC};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct DumpError {
    pub path: PathBuf,
    pub reason: String,
}

/// Maps an I/O error on `path` to a [`DumpError`].
fn io(path: &Path) -> impl Fn(std::io::Error) -> DumpError + '_ {
    move |e| err(path, e.to_string())
}

fn err(path: &Path, reason: impl Into<String>) -> DumpError {
    DumpError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

enum Step {
    Path(PathBuf),
    Entry(Vec<u8>, PathBuf),
    Close,
}

/// Writes the NAR of `path` to `w`. Symlinks are stored, not followed; devices, fifos and
/// sockets are refused, as Nix refuses them. A file that changes size while it is read is an
/// error rather than a NAR that lies.
pub fn dump_path<W: Write>(path: &Path, w: &mut W) -> Result<(), DumpError> {
    let mut buf = Vec::with_capacity(64 << 10);
    put_str(&mut buf, MAGIC);
    let mut work = vec![Step::Path(path.to_path_buf())];
    let mut data = vec![0u8; 1 << 20];
    while let Some(step) = work.pop() {
        match step {
            Step::Close => put_str(&mut buf, b")"),
            Step::Entry(name, p) => {
                put_entry_start(&mut buf, &name);
                work.push(Step::Close);
                work.push(Step::Path(p));
            }
            Step::Path(p) => {
                let meta = std::fs::symlink_metadata(&p).map_err(io(&p))?;
                let ft = meta.file_type();
                if ft.is_symlink() {
                    let t = std::fs::read_link(&p).map_err(io(&p))?;
                    put_symlink(&mut buf, t.as_os_str().as_bytes());
                } else if ft.is_dir() {
                    put_node_start(&mut buf, b"directory");
                    let mut names = Vec::new();
                    for e in std::fs::read_dir(&p).map_err(io(&p))? {
                        let e = e.map_err(io(&p))?;
                        names.push(e.file_name().as_bytes().to_vec());
                    }
                    names.sort_unstable();
                    work.push(Step::Close);
                    for n in names.into_iter().rev() {
                        let child = p.join(std::ffi::OsStr::from_bytes(&n));
                        work.push(Step::Entry(n, child));
                    }
                } else if ft.is_file() {
                    let len = meta.len();
                    let exec = meta.permissions().mode() & 0o100 != 0;
                    put_file_header(&mut buf, exec, len);
                    let mut f = std::fs::File::open(&p).map_err(io(&p))?;
                    let mut left = len;
                    loop {
                        let n = match f.read(&mut data) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(err(&p, e.to_string())),
                        };
                        if n == 0 {
                            break;
                        }
                        if n as u64 > left {
                            return Err(err(&p, "file grew while being read"));
                        }
                        left -= n as u64;
                        if buf.len() + n <= data.len() {
                            buf.extend_from_slice(&data[..n]);
                        } else {
                            w.write_all(&buf).map_err(io(&p))?;
                            buf.clear();
                            w.write_all(&data[..n]).map_err(io(&p))?;
                        }
                    }
                    if left != 0 {
                        return Err(err(&p, "file shrank while being read"));
                    }
                    buf.extend_from_slice(&[0u8; 8][..padding(len)]);
                    put_str(&mut buf, b")");
                } else {
                    return Err(err(
                        &p,
                        "is a device, fifo or socket; a NAR holds only files, directories and symlinks",
                    ));
                }
            }
        }
        if buf.len() >= 64 << 10 {
            w.write_all(&buf).map_err(io(path))?;
            buf.clear();
        }
    }
    w.write_all(&buf).map_err(io(path))?;
    w.flush().map_err(io(path))?;
    Ok(())
}
