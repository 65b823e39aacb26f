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
use granary::model::castore::BlobIndex;

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

#[test]
fn one_broken_root_does_not_hide_the_others() {
    require_fuse!();
    let ts = TestStore::loose();
    for name in ["a", "b", "c"] {
        let src = ts.dir.path().join(name);
        write(&src.join("f"), name.as_bytes(), false);
        write(&src.join("sub/g"), b"g", false);
        ts.ok(&["import", "--name", name, src.to_str().unwrap()]);
    }
    // b's top directory is gone.
    let listed = String::from_utf8(ts.ok(&["ls", "-l", "b"]).stdout).unwrap();
    let _ = listed;
    let out = String::from_utf8(ts.cmd().args(["verify", "b"]).output().unwrap().stdout).unwrap();
    assert!(out.contains("ok"), "{out}");
    let b_top = {
        let o = ts
            .ok(&["import", ts.dir.path().join("b").to_str().unwrap()])
            .stdout;
        String::from_utf8(o)
            .unwrap()
            .split('\t')
            .next()
            .unwrap()
            .to_string()
    };
    std::fs::remove_file(ts.path().join("dirs").join(&b_top[..2]).join(&b_top)).unwrap();
    let m = Mount::start(&ts.url(), &[]);
    let mut names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["a", "c"]);
    assert_eq!(std::fs::read(m.path().join("c/f")).unwrap(), b"c");
    let e = std::fs::metadata(m.path().join("b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
}

#[test]
fn two_mounts_of_one_mount_point_at_once_never_stack() {
    require_fuse!();
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    write(&src.join("f"), b"x", false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    for round in 0..8 {
        let mp = ts.dir.path().join(format!("mp{round}"));
        std::fs::create_dir(&mp).unwrap();
        let spawn = || {
            Command::new(granary_bin())
                .args(["--store", &ts.url(), "mount"])
                .arg(&mp)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (mut a, mut b) = (spawn(), spawn());
        std::thread::sleep(std::time::Duration::from_millis(600));
        let count = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
            .count();
        let exited: Vec<bool> = [&mut a, &mut b]
            .iter_mut()
            .map(|c| c.try_wait().unwrap().is_some())
            .collect();
        for c in [&mut a, &mut b] {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let _ = a.wait();
        let _ = b.wait();
        if mounted(&mp) {
            lazy_unmount(&mp);
        }
        assert_eq!(count, 1, "round {round}: {count} mounts stacked");
        assert_eq!(
            exited.iter().filter(|e| **e).count(),
            1,
            "round {round}: one refused"
        );
    }
}

#[test]
fn output_errors_are_errors_not_panics() {
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    write(&src.join("f"), b"x", false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let nar = ts.dir.path().join("x.nar");
    let dump = ts.ok(&["export-nar", "t"]).stdout;
    std::fs::write(&nar, dump).unwrap();
    let name = format!("{}-x", "a".repeat(32));
    ts.ok(&["import-nar", nar.to_str().unwrap(), "--name", &name]);
    for args in [
        vec!["narinfo", name.as_str()],
        vec!["import-nar", nar.to_str().unwrap(), "--name", name.as_str()],
        vec!["gc", "--dry-run"],
        vec!["cat", "t/f"],
        vec!["roots"],
        vec!["ls", "t"],
    ] {
        let out = ts
            .cmd()
            .args(&args)
            .stdout(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            )
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.starts_with("granary: error: "), "{args:?}: {err}");
    }
    // A reader that goes away: quiet, no panic.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --store {} gc --dry-run | true; echo ${{PIPESTATUS[0]}}",
            granary_bin().display(),
            ts.url()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(code == "0" || code == "141", "exit {code}");
}

#[test]
fn export_keeps_holes_and_names_print_escaped() {
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 64 MiB with 4 KiB of data at each end: sparse.
    let sparse = src.join("sparse");
    {
        let f = std::fs::File::create(&sparse).unwrap();
        f.write_at(b"head", 0).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_at(b"tail", (64 << 20) - 4).unwrap();
    }
    // Names a terminal must not interpret, and a name that is not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let evil = std::ffi::OsStr::from_bytes(b"red\x1b[31m\xff");
    write(&src.join(evil), b"named oddly", false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let dest = ts.dir.path().join("out");
    ts.ok(&["export", "t", dest.to_str().unwrap()]);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dest.join("sparse")).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 4 << 20,
        "written in full: {} blocks",
        m.blocks()
    );
    assert!(std::fs::read(dest.join("sparse")).unwrap() == std::fs::read(&sparse).unwrap());
    let listed = ts.ok(&["ls", "t"]).stdout;
    assert!(!listed.contains(&0x1b), "raw escape character printed");
    let shown = String::from_utf8(listed).unwrap();
    let line = shown.lines().find(|l| l.starts_with("red")).unwrap();
    assert_eq!(line, "red\\x1b[31m\\xff");
    assert_eq!(ts.ok(&["cat", &format!("t/{line}")]).stdout, b"named oddly");
}

#[test]
fn a_store_whose_config_was_deleted_is_refused() {
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    write(&src.join("f"), b"x", false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    std::fs::remove_file(ts.path().join("config.toml")).unwrap();
    let err = ts.fails(&["roots"]);
    assert!(err.contains("config.toml is missing"), "{err}");
    assert!(!ts.path().join("config.toml").exists(), "recreated");
}

/// Opens 373 connections to `port` that say nothing; after the first-bytes deadline, every
/// one must have been closed by the server.
fn silent_connections_are_closed(port: u16) {
    let silent: Vec<_> = (0..373)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(silent.len() > 300);
    std::thread::sleep(std::time::Duration::from_secs(12));
    let mut closed = 0;
    for mut s in silent {
        s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        // Whatever the server sent first (its HTTP/2 settings) is read past, to the end.
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break
                }
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(closed, 373, "silent connections still open");
}

/// Runs `granary ARGS` with 256 descriptors (as in the report) until dropped.
struct Server(std::process::Child);
impl Server {
    fn start(args: &[&str], port: u16) -> Server {
        let child = Command::new("prlimit")
            .args(["--nofile=256:256", "--"])
            .arg(granary_bin())
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Server(child)
    }
}
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn silent_connections_do_not_starve_the_servers() {
    let tmp = tempfile::tempdir().unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _daemon = Server::start(
        &[
            "--store",
            &store,
            "daemon",
            "--allow-unauthenticated-tcp",
            "--listen",
            &listen,
        ],
        port,
    );
    silent_connections_are_closed(port);
    let out = Command::new(granary_bin())
        .args(["--store", &format!("grpc+tcp://{listen}"), "roots"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _cache = Server::start(
        &["--store", &store, "serve-cache", "--listen", &listen],
        port,
    );
    silent_connections_are_closed(port);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write;
    s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("StoreDir"),
        "{reply}"
    );
}

#[test]
fn a_stalled_backend_gives_eio_within_one_timeout() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &[]);
    let src = tmp.path().join("src");
    for i in 0..4 {
        write(&src.join(format!("f{i}")), &noise(2 << 20, 40 + i), false);
    }
    let imp = Command::new(granary_bin())
        .args(["--store", &d.unix_url(), "import", "--name", "t"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        imp.status.success(),
        "{}",
        String::from_utf8_lossy(&imp.stderr)
    );
    let url = format!("{}?timeout=30s", d.unix_url());
    let m = Mount::start(&url, &["--timeout", "2", "--readahead", "0"]);
    assert_eq!(
        std::fs::read(m.path().join("t/f0")).unwrap(),
        noise(2 << 20, 40)
    );
    // The daemon stops answering (but keeps its connections open).
    unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) };
    let t0 = std::time::Instant::now();
    let r = std::fs::read(m.path().join("t/f3"));
    let took = t0.elapsed();
    unsafe { libc::kill(d.pid() as i32, libc::SIGCONT) };
    let e = r.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        took < std::time::Duration::from_millis(3500),
        "EIO after {took:?} with --timeout 2"
    );
}
