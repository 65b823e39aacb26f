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

/// Runs `script` with bash as uid/gid 65534 (nobody), in the background.
fn spawn_as_nobody(script: &str) -> std::process::Child {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "bash",
            "-c",
        ])
        .arg(script)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("setpriv (util-linux)")
}

/// A directory nobody (uid 65534) owns, under a temp dir everyone can traverse.
fn nobody_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::os::unix::fs::chown(&tree, Some(65534), Some(65534)).unwrap();
    (tmp, tree)
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_symlink_swapped_in_during_import_never_stores_what_it_points_at() {
    let ts = TestStore::new();
    let (tmp, tree) = nobody_dir();
    // A secret only root can read, of recognisable content.
    let secret = tmp.path().join("secret");
    let secret_data = noise(5000, 999);
    std::fs::write(&secret, &secret_data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret_hex = blake3::hash(&secret_data).to_hex().to_string();
    // The user's tree: a few files, one of which they keep swapping for a link to the secret.
    let script = format!(
        "cd {t}; for i in $(seq 20); do echo file $i > f$i; done; echo mine > victim; \
         while true; do ln -sf {s} victim.new; mv -f victim.new victim; echo mine > victim.tmp; \
         mv -f victim.tmp victim; done",
        t = tree.display(),
        s = secret.display()
    );
    let _swapper = Killed(spawn_as_nobody(&script));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..50 {
        let out = ts.cmd().arg("import").arg(&tree).output().unwrap();
        if out.status.success() {
            ok += 1;
        } else {
            refused += 1;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("victim"), "an unexpected failure: {err}");
        }
    }
    drop(_swapper);
    eprintln!("{ok} imports stored the tree, {refused} refused a file that changed");
    // The secret's bytes are nowhere in the store.
    let out = ts.cmd().args(["cat", &secret_hex]).output().unwrap();
    assert!(!out.status.success(), "the secret was stored");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_fifo_swapped_in_during_import_never_hangs_it() {
    let ts = TestStore::new();
    let (_tmp, tree) = nobody_dir();
    let script = format!(
        "cd {t}; for i in $(seq 20); do echo file $i > f$i; done; echo data > victim; \
         while true; do rm -f victim.p; mkfifo victim.p; mv -f victim.p victim; \
         echo data > victim.tmp; mv -f victim.tmp victim; done",
        t = tree.display()
    );
    let _swapper = Killed(spawn_as_nobody(&script));
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..60 {
        let t0 = std::time::Instant::now();
        let out = Command::new("timeout")
            .args(["-k", "2", "20"])
            .arg(granary_bin())
            .args(["--store", &ts.url(), "import", "--skip-special"])
            .arg(&tree)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(124), "an import hung on a fifo");
        assert!(t0.elapsed() < std::time::Duration::from_secs(15));
    }
}

#[test]
fn a_file_growing_during_import_is_imported_as_it_was_at_open() {
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let grow = src.join("grow");
    std::fs::write(&grow, noise(64 << 20, 5)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, grow) = (stop.clone(), grow.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(grow).unwrap();
            let block = noise(1 << 20, 6);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                f.write_all(&block).unwrap();
            }
        })
    };
    ts.ok(&["import", "--name", "g", src.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let listed = String::from_utf8(ts.ok(&["ls", "-l", "g"]).stdout).unwrap();
    let size: usize = listed.split_whitespace().nth(1).unwrap().parse().unwrap();
    let stored = ts.ok(&["cat", "g/grow"]).stdout;
    assert_eq!(stored.len(), size, "the directory entry and the blob agree");
    let now = std::fs::read(&grow).unwrap();
    assert!(
        now.len() > size,
        "the file kept growing after it was opened"
    );
    assert!(
        stored == now[..size],
        "the stored file is the file as it was"
    );
    ts.ok(&["verify"]);
}
