//! Regression tests for the defects a hostile test of the release binary found (issue 15):
//! wrong bytes through a coherently altered blob index, import races, a verify that must not
//! lie, boundaries of the daemon and the sandbox, and the smaller robustness defects. Each
//! failed on the code before its fix.

mod common;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;
use granary::castore::BlobIndex;

/// Digest (hex) of the one multi-chunk file `name` under root `root`.
fn file_digest(ts: &TestStore, root_and_path: &str) -> String {
    let parent = root_and_path
        .rsplit_once('/')
        .map_or(root_and_path, |p| p.0);
    let name = root_and_path.rsplit('/').next().unwrap();
    let out = String::from_utf8(ts.ok(&["ls", "-l", parent]).stdout).unwrap();
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&name)).then(|| f[3].to_string())
        })
        .unwrap_or_else(|| panic!("{name} not in {out}"))
}

/// Swaps chunk entries `a` and `b` of a stored blob index, keeping its length and sealing it
/// again (as an attacker who knows the format would): every chunk still hashes right, and the
/// index is self-consistent; only the blob digest can tell.
fn swap_index_entries(store: &Path, hex: &str, a: usize, b: usize) {
    tamper(store, "blobs", hex, |raw| {
        let mut idx = BlobIndex::decode_valid(raw).unwrap();
        assert!(
            idx.chunks.len() > b,
            "the blob has {} chunks",
            idx.chunks.len()
        );
        idx.chunks.swap(a, b);
        let sealed = idx.encode_sealed();
        assert_eq!(
            sealed.len(),
            raw.len(),
            "the tampered index keeps its length"
        );
        *raw = sealed;
    });
}

#[test]
fn a_coherently_altered_blob_index_never_yields_wrong_bytes() {
    require_fuse!();
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    let data = noise(3 << 20, 77);
    write(&src.join("big"), &data, false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let hex = file_digest(&ts, "t/big");
    // Entries 2 and 5: the bytes of the first two chunks stay right, the rest of the file is
    // served from the wrong places.
    swap_index_entries(&ts.path(), &hex, 2, 5);

    let check_mount = |m: &Mount, what: &str| {
        let p = m.path().join("t/big");
        let e = std::fs::read(&p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: whole read");
        let f = std::fs::File::open(&p).unwrap();
        // Every 64 KiB window: either an error or exactly the right bytes.
        let mut served = 0;
        for off in (0..data.len()).step_by(64 << 10) {
            let mut buf = vec![0u8; 4096];
            match f.read_at(&mut buf, off as u64) {
                Ok(n) => {
                    assert_eq!(
                        &buf[..n],
                        &data[off..off + n],
                        "{what}: wrong bytes at {off}"
                    );
                    served += 1;
                }
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: at {off}"),
            }
        }
        assert!(served > 0, "{what}: the untouched start is still served");
    };
    let m = Mount::start(&ts.url(), &[]);
    check_mount(&m, "local mount");
    drop(m);

    // `granary cat`: an error, and whatever reached stdout is a prefix of the right bytes.
    let out = ts.cmd().args(["cat", "t/big"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(
        &out.stdout[..],
        &data[..out.stdout.len()],
        "cat printed wrong bytes"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&hex), "{err}");

    // `granary export`: an error, and no file at DEST.
    let dest = ts.dir.path().join("out");
    let err = ts.fails(&["export", "t", dest.to_str().unwrap()]);
    assert!(err.contains(&hex), "{err}");
    assert!(!dest.exists(), "export left {}", dest.display());

    // A mount over a daemon whose store was tampered: the client checks too.
    let d = Daemon::start(ts.dir.path(), &[]);
    let m = Mount::start(&d.unix_url(), &[]);
    check_mount(&m, "mount over a daemon");
}

#[allow(dead_code)]
fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

#[allow(dead_code)]
fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap()
}
