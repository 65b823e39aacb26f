//! `granary mount` end to end: real FUSE mounts of real stores, checked against the source
//! trees with diff, stat, readlink, getfattr and pread.

mod common;

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The foundation's round-trip tree plus 10 000 small files in one directory and a path 20
/// directories deep.
fn gen_wide_deep_tree(root: &Path) {
    gen_tree(root, 0);
    let many = root.join("many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..10_000 {
        std::fs::write(many.join(format!("f{i:05}")), format!("small file {i}\n")).unwrap();
    }
    let mut deep = root.join("deep");
    for i in 0..20 {
        deep = deep.join(format!("level{i:02}"));
    }
    write(&deep.join("bottom.txt"), b"twenty levels down\n", false);
    // Identical content at two paths: must not look like a hard link.
    write(&root.join("twin-a"), b"twin", false);
    write(&root.join("twin-b"), b"twin", false);
}

fn import_named(store: &TestStore, src: &Path, name: &str) -> String {
    let out = store.ok(&["import", "--name", name, src.to_str().unwrap()]);
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string()
}

fn getfattr_digest(path: &Path) -> String {
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", "user.granary.digest"])
        .arg(path)
        .output()
        .expect("run getfattr (package attr)");
    assert!(
        out.status.success(),
        "getfattr {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn walk_all(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn mounted_tree_matches_source() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    gen_wide_deep_tree(&src);
    let digest = import_named(&store, &src, "tree");
    let m = Mount::start(&store.url(), &[]);
    let mnt = m.path().join("tree");
    assert_same_tree(&src, &mnt);

    // stat: type, size, exec bit, modes; readlink; digests from getfattr.
    let mut inodes = HashSet::new();
    for p in walk_all(&src) {
        let rel = p.strip_prefix(&src).unwrap();
        let (a, b) = (
            std::fs::symlink_metadata(&p).unwrap(),
            std::fs::symlink_metadata(mnt.join(rel)).unwrap(),
        );
        assert_eq!(a.file_type(), b.file_type(), "{rel:?}");
        // Recorded at import (the default): the source's mtime to the nanosecond.
        assert_eq!(
            (b.mtime(), b.mtime_nsec(), b.ctime()),
            (a.mtime(), a.mtime_nsec(), a.mtime()),
            "{rel:?}"
        );
        assert!(
            inodes.insert(b.ino()),
            "inode {} shown twice ({rel:?})",
            b.ino()
        );
        let mode = b.permissions().mode() & 0o7777;
        if a.is_file() {
            assert_eq!(a.len(), b.len(), "{rel:?}");
            assert_eq!(b.blocks(), b.len().div_ceil(512), "{rel:?}");
            assert_eq!(b.nlink(), 1);
            let exec = a.permissions().mode() & 0o100 != 0;
            assert_eq!(mode, if exec { 0o555 } else { 0o444 }, "{rel:?}");
            if rel.starts_with("sizes") || rel.starts_with("multi") || rel == Path::new("hello.txt")
            {
                let want = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                assert_eq!(getfattr_digest(&mnt.join(rel)), want, "{rel:?}");
            }
        } else if a.is_dir() {
            assert_eq!(mode, 0o555);
            let subdirs = std::fs::read_dir(&p)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
                .count() as u64;
            assert_eq!(b.nlink(), 2 + subdirs, "{rel:?}");
        } else {
            assert_eq!(mode, 0o777);
            assert_eq!(
                std::fs::read_link(&p).unwrap(),
                std::fs::read_link(mnt.join(rel)).unwrap()
            );
            assert_eq!(
                b.len(),
                std::fs::read_link(&p).unwrap().as_os_str().len() as u64
            );
        }
    }
    assert_eq!(
        getfattr_digest(&mnt),
        digest,
        "directory digest of the root"
    );
    let many = std::fs::read_dir(mnt.join("many")).unwrap().count();
    assert_eq!(many, 10_000);
    let deep: std::path::PathBuf = (0..20).map(|i| format!("level{i:02}")).collect();
    assert_eq!(
        std::fs::read(mnt.join("deep").join(&deep).join("bottom.txt")).unwrap(),
        b"twenty levels down\n"
    );
    let (ta, tb) = (
        std::fs::metadata(mnt.join("twin-a")).unwrap(),
        std::fs::metadata(mnt.join("twin-b")).unwrap(),
    );
    assert_ne!(ta.ino(), tb.ino(), "identical files are not hard links");
    drop(m);

    // The same tree mounted alone, by digest.
    let m = Mount::start(&store.url(), &["--root", &digest]);
    assert_same_tree(&src, m.path());
}

#[test]
fn big_file_random_reads_and_concurrent_readers() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    // 300 MiB, as the issue asks: ~4800 chunks, every boundary case many times over.
    let big = 300usize << 20;
    write_big(&src.join("big.bin"), big, 9);
    for i in 0..40 {
        write(
            &src.join(format!("small/s{i}")),
            &noise(1000 + i * 4099, i as u64),
            false,
        );
    }
    import_named(&store, &src, "b");
    let m = Mount::start(&store.url(), &["--cache-size", "64M"]);
    let mnt = m.path().join("b");
    let want = std::fs::File::open(src.join("big.bin")).unwrap();
    let got = std::fs::File::open(mnt.join("big.bin")).unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..1000 {
        let off = next() % big as u64;
        let len = (next() % (600 << 10)) as usize + 1;
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        let na = want.read_at(&mut a, off).unwrap();
        let nb = got.read_at(&mut b, off).unwrap();
        assert_eq!(na, nb, "length at {off}+{len}");
        assert!(a[..na] == b[..nb], "bytes differ at {off}+{len}");
    }
    // Reads at and past the end.
    let mut buf = [0u8; 16];
    assert_eq!(got.read_at(&mut buf, big as u64).unwrap(), 0);
    assert_eq!(got.read_at(&mut buf, big as u64 - 3).unwrap(), 3);

    // 16 threads reading different and the same files for a bounded time.
    let deadline = Instant::now() + Duration::from_secs(6);
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let (src, mnt) = (src.clone(), mnt.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while Instant::now() < deadline {
                    let name = if t % 2 == 0 {
                        "small/s0".to_string()
                    } else {
                        format!("small/s{}", (t * 7 + rounds) % 40)
                    };
                    assert_eq!(
                        std::fs::read(mnt.join(&name)).unwrap(),
                        std::fs::read(src.join(&name)).unwrap(),
                        "{name}"
                    );
                    let off = ((t as u64 * 7919 + rounds as u64 * 104_729) << 10) % big as u64;
                    let (a, b) = (
                        std::fs::File::open(src.join("big.bin")).unwrap(),
                        std::fs::File::open(mnt.join("big.bin")).unwrap(),
                    );
                    let (mut x, mut y) = (vec![0u8; 256 << 10], vec![0u8; 256 << 10]);
                    let nx = a.read_at(&mut x, off).unwrap();
                    let ny = b.read_at(&mut y, off).unwrap();
                    assert!(nx == ny && x[..nx] == y[..ny], "big.bin at {off}");
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    for h in handles {
        let rounds = h.join().expect("reader thread failed");
        assert!(rounds > 0);
    }
    assert!(
        Instant::now() < deadline + Duration::from_secs(30),
        "readers hung"
    );
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn writes_fail_with_erofs() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    gen_tree(&src, 0);
    import_named(&store, &src, "t");
    let m = Mount::start(&store.url(), &[]);
    let t = m.path().join("t");
    let erofs = Some(libc::EROFS);
    let f = t.join("hello.txt");
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().write(true).open(&f)),
        erofs,
        "open for write"
    );
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().append(true).open(&f)),
        erofs,
        "append"
    );
    assert_eq!(
        errno_of(std::fs::write(t.join("new"), b"x")),
        erofs,
        "create"
    );
    assert_eq!(errno_of(std::fs::remove_file(&f)), erofs, "unlink");
    assert_eq!(
        errno_of(std::fs::rename(&f, t.join("renamed"))),
        erofs,
        "rename"
    );
    assert_eq!(
        errno_of(std::fs::set_permissions(
            &f,
            std::fs::Permissions::from_mode(0o777)
        )),
        erofs,
        "chmod"
    );
    assert_eq!(errno_of(std::fs::create_dir(t.join("d"))), erofs, "mkdir");
    assert_eq!(
        errno_of(std::fs::remove_dir(t.join("empty-dir"))),
        erofs,
        "rmdir"
    );
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("x", t.join("l"))),
        erofs,
        "symlink"
    );
    assert_eq!(errno_of(std::fs::hard_link(&f, t.join("h"))), erofs, "link");
    let c = std::ffi::CString::new(f.as_os_str().as_bytes()).unwrap();
    let name = c"user.test";
    // SAFETY: valid NUL-terminated strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        erofs,
        "setxattr"
    );
    // SAFETY: valid NUL-terminated string.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        erofs,
        "truncate"
    );
    // And nothing changed.
    assert_same_tree(&src, &t);
}

#[test]
fn corrupt_chunk_fails_only_its_range() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    let size = 16usize << 20;
    write_big(&src.join("victim.bin"), size, 77);
    write(&src.join("fine.txt"), b"still fine\n", false);
    write_big(&src.join("other.bin"), 2 << 20, 78);
    import_named(&store, &src, "c");
    // Find a chunk in the middle of victim.bin from its blob index and damage it on disk.
    let blob = blake3::hash(&std::fs::read(src.join("victim.bin")).unwrap());
    let hex = blob.to_hex().to_string();
    let idx_bytes = store.object("blobs", &hex);
    let idx = granary::model::castore::BlobIndex::decode_valid(&idx_bytes).unwrap();
    let k = idx.chunks.len() / 2;
    let start: u64 = idx.chunks[..k].iter().map(|c| c.size).sum();
    let len = idx.chunks[k].size;
    let chex = data_encoding::HEXLOWER.encode(&idx.chunks[k].digest);
    store.tamper("chunks", &chex, |raw| {
        let mid = raw.len() / 2;
        for b in &mut raw[mid..mid + 16] {
            *b ^= 0xa5;
        }
    });

    let m = Mount::start(&store.url(), &[]);
    let mnt = m.path().join("c");
    let f = std::fs::File::open(mnt.join("victim.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = f.read_at(&mut buf, start + len / 2).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EIO),
        "read of the corrupt chunk"
    );
    // Far from the damage, the same file still reads right.
    let want = std::fs::read(src.join("victim.bin")).unwrap();
    for off in [0u64, size as u64 - 4096] {
        let n = f.read_at(&mut buf, off).unwrap();
        assert_eq!(&buf[..n], &want[off as usize..off as usize + n], "at {off}");
    }
    assert_eq!(
        std::fs::read(mnt.join("fine.txt")).unwrap(),
        b"still fine\n"
    );
    assert_eq!(
        std::fs::read(mnt.join("other.bin")).unwrap(),
        std::fs::read(src.join("other.bin")).unwrap()
    );
    assert!(
        m.stderr().contains(&chex),
        "the log names the chunk: {}",
        m.stderr()
    );
}

#[test]
fn no_list_root_hides_listing_but_not_names() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    write(&src.join("a"), b"a", false);
    import_named(&store, &src, "visible");
    let m = Mount::start(&store.url(), &["--no-list-root"]);
    assert!(
        std::fs::read_dir(m.path()).is_err(),
        "top level must not list"
    );
    let st = std::fs::metadata(m.path().join("visible")).unwrap();
    assert!(st.is_dir());
    assert_eq!(std::fs::read(m.path().join("visible/a")).unwrap(), b"a");
    assert!(std::fs::metadata(m.path().join("absent")).is_err());
    // A root added while mounted is found by name.
    import_named(&store, &src, "later");
    assert!(std::fs::metadata(m.path().join("later/a")).is_ok());
}

fn live_inodes(mnt: &Path) -> u64 {
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.granary.inodes"])
        .arg(mnt)
        .output()
        .expect("run getfattr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn inode_table_shrinks_after_kernel_forgets() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    gen_tree(&src, 0);
    for d in 0..20 {
        for i in 0..100 {
            write(
                &src.join(format!("d{d}/f{i}")),
                format!("{d}/{i}").as_bytes(),
                false,
            );
        }
    }
    import_named(&store, &src, "w");
    let m = Mount::start(&store.url(), &[]);
    let start = live_inodes(m.path());
    let st = Command::new("find")
        .arg(m.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let walked = live_inodes(m.path());
    assert!(
        walked > start + 2000,
        "after find: {walked} (start {start})"
    );
    let end = Instant::now() + Duration::from_secs(20);
    let mut now = walked;
    while Instant::now() < end {
        std::fs::write("/proc/sys/vm/drop_caches", "2").expect("write drop_caches (needs root)");
        now = live_inodes(m.path());
        if now <= start + 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        now <= start + 5,
        "inode table did not shrink: start {start}, walked {walked}, now {now}"
    );
}

/// The mount's request counts (the root's `user.granary.ops`), as `kind -> count`.
fn ops(mnt: &Path) -> std::collections::HashMap<String, u64> {
    getfattr_value(mnt, "user.granary.ops")
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (kind, n) = (w.next()?, w.next()?.parse().ok()?);
            Some((kind.to_string(), n))
        })
        .collect()
}

#[test]
fn a_walk_costs_one_readdirplus_per_reply_no_lookups_and_no_chunk_reads() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    // One directory far bigger than a kernel readdir reply, and ten small ones.
    for i in 0..3000 {
        write(
            &src.join(format!("big/file-with-a-longish-name-{i:05}")),
            b"x",
            false,
        );
    }
    for d in 0..10 {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + d) as u8).collect();
        write(&src.join(format!("small/d{d}/f")), &content, false);
    }
    import_named(&store, &src, "w");
    let m = Mount::start(&store.url(), &[]);
    let out = Command::new("find")
        .arg(m.path().join("w"))
        .args(["-printf", "%s %m %T@\n"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        out.stdout.split(|&b| b == b'\n').count() - 1,
        3000 + 10 * 2 + 3
    );
    let ops = ops(m.path());
    // Every entry's attributes came with its listing: the only lookups are of `w` itself.
    assert!(ops.get("lookup").copied().unwrap_or(0) <= 1, "{ops:?}");
    assert_eq!(ops.get("readdir"), None, "{ops:?}");
    // 13 directories: one reply each plus an empty one at the end, and `big` in batches.
    let plus = ops.get("readdirplus").copied().unwrap_or(0);
    assert!((26..=26 + 3000 / 20).contains(&plus), "{ops:?}");
    // Listing reads no file contents (1 MB of them); the tree's table of times (8 bytes an
    // entry) is read.
    let cached = ops.get("chunk_cache_bytes").copied().unwrap_or(u64::MAX);
    assert!(cached < 100_000, "{ops:?}");
}

/// CPU time (user + system, clock ticks) of process `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A walk of many small directories is a burst of back-to-back requests: the mount polls the
/// kernel for them (`polling_bursts`) unless every CPU is busy (`polling_crowded_out`), lists
/// exactly what a mount that never polls lists, and stops polling once the walk ends (its CPU
/// time stands still). Next to busy threads it never polls; `--no-poll` never does.
#[test]
fn a_walk_is_served_by_polling_which_stops_when_the_walk_ends() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    for d in 0..800 {
        write(&src.join(format!("d{:03}/e{d}/f", d % 40)), b"x", false);
    }
    import_named(&store, &src, "w");
    let walk = |m: &Mount| {
        let out = Command::new("find")
            .arg(m.path().join("w"))
            .args(["-printf", "%P %s %m %y\n"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut lines: Vec<Vec<u8>> = out
            .stdout
            .split(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        lines.sort();
        lines
    };
    let count = |m: &Mount, k: &str| ops(m.path()).get(k).copied().unwrap_or(u64::MAX);
    let plain = Mount::start(&store.url(), &["--no-poll"]);
    let want = walk(&plain);
    assert_eq!(want.len(), 1 + 1 + 40 + 800 * 2, "every entry listed");
    assert_eq!(count(&plain, "polling_bursts"), 0);
    assert_eq!(count(&plain, "polling_crowded_out"), 0);
    drop(plain);

    let m = Mount::start(&store.url(), &[]);
    assert_eq!(
        walk(&m),
        want,
        "polling lists exactly what blocking reads list"
    );
    let (bursts, crowded) = (
        count(&m, "polling_bursts"),
        count(&m, "polling_crowded_out"),
    );
    // Other tests may keep every CPU busy; either way the burst was seen.
    assert!(
        bursts + crowded >= 1,
        "1,680 back-to-back requests: no burst seen"
    );
    // A poller left running would take a whole CPU: ≈ 50 ticks in half a second.
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(m.pid());
    std::thread::sleep(Duration::from_millis(500));
    let spent = cpu_ticks(m.pid()) - before;
    assert!(spent <= 5, "the idle mount used {spent} ticks in 500 ms");
    drop(m);

    // More runnable threads than CPUs: the walk is left to wake-ups.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy: Vec<_> = (0..=cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let m = Mount::start(&store.url(), &[]);
    let got = walk(&m);
    let (bursts, crowded) = (
        count(&m, "polling_bursts"),
        count(&m, "polling_crowded_out"),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    assert_eq!(got, want);
    assert_eq!(bursts, 0, "polled beside {} busy threads", cpus + 1);
    assert!(crowded >= 1, "no burst seen beside busy threads");
}

/// `--cache-size` bounds what a mount keeps: reading four times the budget of distinct
/// content leaves the caches' own figures within it (the store's read memory taken out) and
/// the process's peak memory within the budget plus a fixed margin, not the bytes read.
#[test]
fn reading_far_more_than_the_cache_size_keeps_the_mount_within_its_budget() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    let (files, size) = (96usize, 2usize << 20);
    for i in 0..files {
        // Distinct, incompressible content, generated fast (the XOF is optimised code).
        let mut data = vec![0u8; size];
        blake3::Hasher::new()
            .update(&(i as u64).to_le_bytes())
            .finalize_xof()
            .fill(&mut data);
        write(&src.join(format!("d{}/f{i}", i % 8)), &data, false);
    }
    import_named(&store, &src, "m");
    let budget_flag: u64 = 64 << 20;
    let m = Mount::start(&store.url(), &["--cache-size", "64M"]);
    for i in 0..files {
        let rel = format!("d{}/f{i}", i % 8);
        let got = std::fs::read(m.path().join("m").join(&rel)).unwrap();
        let want = std::fs::read(src.join(&rel)).unwrap();
        assert!(got == want, "{rel} differs");
    }
    let ops = ops(m.path());
    let get = |k: &str| {
        ops.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k}: {ops:?}"))
    };
    let (budget, chunks, listings) = (
        get("cache_budget_bytes"),
        get("chunk_cache_bytes"),
        get("listing_cache_bytes"),
    );
    // The store's read memory (groups, buffers) came out of the flag's 64 MiB.
    assert!(budget < budget_flag && budget >= budget_flag / 4, "{ops:?}");
    assert!(chunks + listings <= budget, "{ops:?}");
    assert!(chunks > budget / 2, "the cache is used: {ops:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!("peak RSS {hwm_kb} KiB; {ops:?}");
    // 192 MiB read; the budget is 64 MiB; the rest (the binary's pages, the runtime, inodes,
    // transient reads) is far less than the difference.
    assert!(
        hwm_kb * 1024 < budget_flag + (96 << 20),
        "peak RSS {hwm_kb} KiB after reading {} MiB with --cache-size 64M",
        (files * size) >> 20
    );
}

/// A store whose root `r` holds one file, `a`, containing "a".
fn store_with_one_file() -> TestStore {
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    write(&src.join("a"), b"a", false);
    import_named(&store, &src, "r");
    store
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    require_fuse!();
    let store = store_with_one_file();
    let mut m = Mount::start(&store.url(), &[]);
    // An open file does not keep the mount alive past SIGTERM.
    let _open = std::fs::File::open(m.path().join("r/a")).unwrap();
    let st = m
        .signal_and_wait(libc::SIGTERM, Duration::from_secs(20))
        .expect("granary did not exit after SIGTERM");
    assert!(st.success(), "exit status {st}: {}", m.stderr());
    assert!(!mounted(m.path()), "mount left behind");
    assert!(
        eventually(|| reapers_of(m.path()).is_empty()),
        "helper outlived a clean exit"
    );
}

/// Helper processes (`granary __reap-mount`) watching the mount at `path`.
fn reapers_of(path: &Path) -> Vec<u32> {
    let mut want = b"__reap-mount\0".to_vec();
    want.extend_from_slice(path.as_os_str().as_bytes());
    want.push(0);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(want.len()).any(|w| w == want))
        })
        .collect()
}

/// Waits up to 10 s for `done`.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A `granary mount` killed outright leaves no dead mount: its helper detaches it and exits.
#[test]
fn sigkill_leaves_no_dead_mount() {
    require_fuse!();
    let store = store_with_one_file();
    let mut m = Mount::start(&store.url(), &[]);
    assert_eq!(std::fs::read(m.path().join("r/a")).unwrap(), b"a");
    // The helper is started just after the mount appears (which is all `Mount::start` waits
    // for), so under load it may not be running yet.
    assert!(
        eventually(|| reapers_of(m.path()).len() == 1),
        "one helper per mount: {:?}",
        reapers_of(m.path())
    );
    let st = m
        .signal_and_wait(libc::SIGKILL, Duration::from_secs(20))
        .expect("granary survived SIGKILL");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    assert!(
        eventually(|| !mounted(m.path())),
        "a dead mount was left behind"
    );
    // The mount point is a plain, usable, empty directory again.
    assert_eq!(std::fs::read_dir(m.path()).unwrap().count(), 0);
    assert!(
        eventually(|| reapers_of(m.path()).is_empty()),
        "helper still running"
    );
}

/// A signal that arrives while the mount is coming up never leaves a dead mount behind.
#[test]
fn sigterm_while_mounting_leaves_no_mount() {
    require_fuse!();
    let store = store_with_one_file();
    let bin = granary_bin();
    // Delays that sweep across start-up (a debug build takes longer to come up); each run
    // has its own mount point.
    for step in 0..100u64 {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut child = Command::new(&bin)
            .args(["--store", &store.url(), "mount"])
            .arg(&mnt)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_micros(step * 500);
        while Instant::now() < deadline {
            std::hint::spin_loop();
        }
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(20);
        let exited = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if Instant::now() > end {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let left = mounted(&mnt);
        if !exited || left {
            lazy_unmount(&mnt);
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            exited,
            "granary still running 20 s after SIGTERM (delay step {step})"
        );
        assert!(
            !left,
            "SIGTERM {} µs after start left a mount behind",
            step * 500
        );
    }
}

#[test]
fn sigint_unmounts_too_and_import_mounts_something() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("project");
    gen_tree(&src, 0);
    let mut m = Mount::start(&store.url(), &["--import", src.to_str().unwrap()]);
    assert_same_tree(&src, &m.path().join("project"));
    let names: Vec<_> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("project")]);
    let st = m
        .signal_and_wait(libc::SIGINT, Duration::from_secs(20))
        .expect("no exit after SIGINT");
    assert!(st.success());
    assert!(!mounted(m.path()));
}

#[test]
fn bad_mount_points_are_refused_clearly() {
    require_fuse!();
    let store = TestStore::new();
    let dir = store.dir.path();
    let missing = dir.join("missing");
    let err = store.fails(&["mount", missing.to_str().unwrap()]);
    assert!(
        err.contains("does not exist") && err.lines().count() == 1,
        "{err}"
    );
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = store.fails(&["mount", file.to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");
    let full = dir.join("full");
    write(&full.join("x"), b"x", false);
    let err = store.fails(&["mount", full.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
    let m = Mount::start(&store.url(), &[]);
    let err = store.fails(&["mount", m.path().to_str().unwrap()]);
    assert!(err.contains("already a mount point"), "{err}");
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = store.fails(&["mount", empty.to_str().unwrap(), "--root", "nosuchroot"]);
    assert!(err.contains("nosuchroot"), "{err}");
    assert!(!mounted(&empty));
}

#[test]
fn nonempty_mount_points_need_the_option() {
    require_fuse!();
    let store = store_with_one_file();
    let put_file = |p: &Path| std::fs::write(p.join("hidden"), b"under the mount").unwrap();
    let err = match Mount::try_start_prepared(&store.url(), &[], DEFAULT_LIMIT, put_file) {
        Ok(_) => panic!("mounted over a non-empty directory without --nonempty"),
        Err(e) => e,
    };
    assert!(
        err.contains("not empty") && err.contains("--nonempty"),
        "{err}"
    );
    let m =
        Mount::try_start_prepared(&store.url(), &["--nonempty"], DEFAULT_LIMIT, put_file).unwrap();
    assert!(
        !m.path().join("hidden").exists(),
        "the mount hides what was there"
    );
    assert_eq!(std::fs::read_dir(m.path()).unwrap().count(), 1);
}

#[test]
fn nix_mount_shows_what_nix_expects_of_its_store_directory() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    write(&src.join("bin/tool"), b"#!/bin/sh\necho tool\n", true);
    let path_name = format!("{}-tool-1.0", "a".repeat(32));
    import_named(&store, &src, &path_name);
    import_named(&store, &src, "rootfs");
    let m = Mount::start(&store.url(), &["--nix", "--nix-group", "root"]);
    let meta = std::fs::metadata(m.path()).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0o1775)
    );
    let mut names: Vec<String> = std::fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![".links".to_string(), path_name.clone()]);
    assert_eq!(
        std::fs::read_dir(m.path().join(".links")).unwrap().count(),
        0
    );
    // Roots that are not store paths are not there, even by name.
    let e = std::fs::metadata(m.path().join("rootfs")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(
        std::fs::read(m.path().join(&path_name).join("bin/tool")).unwrap(),
        b"#!/bin/sh\necho tool\n"
    );
    // Still read-only.
    let e = std::fs::create_dir(m.path().join(".links/x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

/// Sets a path's mtime (and atime) to `ns` nanoseconds since the epoch, links not followed.
fn set_mtime(p: &Path, ns: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn mtime_of(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

#[test]
fn recorded_times_round_trip_without_changing_digests_or_dedup() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    // Files, directories and symlinks at distinct times (one before 1970, one with ns).
    write(&src.join("d/f"), b"file in d", false);
    write(&src.join("d/sub/g"), b"deeper", true);
    write(&src.join("x"), b"top file", true);
    std::fs::create_dir_all(src.join("e")).unwrap();
    std::os::unix::fs::symlink("d/f", src.join("l")).unwrap();
    let paths = ["d/f", "d/sub/g", "d/sub", "d", "x", "e", "l", ""];
    let base: i64 = 1_600_000_000_000_000_000;
    for (i, rel) in paths.iter().enumerate() {
        let ns = if *rel == "x" {
            -86_400_000_000_000 + 123
        } else {
            base + i as i64 * 86_400_000_000_000 + 987_654_321
        };
        set_mtime(&src.join(rel), ns);
    }
    let want: Vec<(&str, (i64, i64))> =
        paths.iter().map(|r| (*r, mtime_of(&src.join(r)))).collect();

    let timed = import_named(&store, &src, "timed");
    let plain = store.ok(&[
        "import",
        "--no-times",
        "--name",
        "plain",
        src.to_str().unwrap(),
    ]);
    let plain = String::from_utf8(plain.stdout).unwrap();
    assert!(
        plain.starts_with(&timed),
        "the digest depends on recorded times: {timed} vs {plain}"
    );
    let before: HashSet<String> = packed_entries(&store.path())
        .into_iter()
        .map(|(_, e)| e.hex)
        .collect();

    // The same tree with every time changed: a second import shares every chunk and
    // directory; the only new object is its table of times.
    for (i, rel) in paths.iter().enumerate() {
        set_mtime(&src.join(rel), base / 2 + i as i64);
    }
    assert_eq!(import_named(&store, &src, "retimed"), timed);
    let new: Vec<(u8, String)> = packed_entries(&store.path())
        .into_iter()
        .filter(|(_, e)| !before.contains(&e.hex))
        .map(|(_, e)| (e.kind, e.hex))
        .collect();

    // An independent digest of the same tree: Nix's own NAR of it, imported.
    let nar_name = "0123456789abcdfghijklmnpqrsvwxyz-src";
    let nix = have_nix_tool("nix-store", "the NAR digest check");
    if nix {
        let dump = Command::new("nix-store")
            .arg("--dump")
            .arg(&src)
            .output()
            .unwrap();
        assert!(dump.status.success());
        let nar = store.dir.path().join("src.nar");
        std::fs::write(&nar, &dump.stdout).unwrap();
        store.ok(&["import-nar", "--name", nar_name, nar.to_str().unwrap()]);
    }

    let m = Mount::start(&store.url(), &[]);
    // A fresh mount answers the lookups of a root and of its top's entries from the head of
    // the table its record keeps, without reading the table; deeper ones read it.
    let ops_counter = |name: &str| -> u64 {
        let ops = getfattr_value(m.path(), "user.granary.ops");
        ops.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {ops}"))
            .parse()
            .unwrap()
    };
    for i in [7, 3, 4, 6] {
        let (rel, t) = want[i];
        assert_eq!(mtime_of(&m.path().join("timed").join(rel)), t, "{rel:?}");
    }
    assert_eq!(ops_counter("times_read"), 0);
    assert!(ops_counter("times_from_head") >= 2);
    assert_eq!(mtime_of(&m.path().join("timed/d/sub")), want[2].1);
    assert!(ops_counter("times_read") >= 1);
    let retimed_table = getfattr_value(&m.path().join("retimed"), "user.granary.times");
    assert_eq!(
        new,
        vec![(0u8, retimed_table.clone())],
        "a re-import with other times stored more than its table of times"
    );
    assert_ne!(
        getfattr_value(&m.path().join("timed"), "user.granary.times"),
        retimed_table
    );
    for (rel, t) in &want {
        let p = m.path().join("timed").join(rel);
        assert_eq!(mtime_of(&p), *t, "mounted {rel:?}");
        let meta = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!((meta.ctime(), meta.ctime_nsec()), *t, "ctime of {rel:?}");
        let plain = std::fs::symlink_metadata(m.path().join("plain").join(rel)).unwrap();
        assert_eq!(
            (plain.mtime(), plain.mtime_nsec()),
            (1, 0),
            "untimed {rel:?}"
        );
    }
    assert_eq!(getfattr_digest(&m.path().join("timed")), timed);
    if nix {
        assert_eq!(getfattr_digest(&m.path().join(nar_name)), timed);
        let nar_top = std::fs::metadata(m.path().join(nar_name)).unwrap();
        assert_eq!(nar_top.mtime(), 1, "a NAR import records no times");
    }
    drop(m);

    // export restores them, for the whole tree and for a subtree.
    let out = store.dir.path().join("out");
    store.ok(&["export", "timed", out.to_str().unwrap()]);
    for (rel, t) in &want {
        assert_eq!(mtime_of(&out.join(rel)), *t, "exported {rel:?}");
    }
    let sub = store.dir.path().join("sub");
    store.ok(&["export", "timed/d", sub.to_str().unwrap()]);
    assert_eq!(mtime_of(&sub), want[3].1);
    assert_eq!(mtime_of(&sub.join("sub/g")), want[1].1);
    // A mount of one root with --root shows its times too.
    let m = Mount::start(&store.url(), &["--root", "timed"]);
    assert_eq!(mtime_of(&m.path().join("d/sub/g")), want[1].1);
    assert_eq!(mtime_of(m.path()), want[7].1);
}

fn getfattr_value(path: &Path, name: &str) -> String {
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", name])
        .arg(path)
        .output()
        .expect("run getfattr (package attr)");
    assert!(out.status.success(), "getfattr {name} {}", path.display());
    String::from_utf8(out.stdout).unwrap()
}

/// The files of the file-cache tests: two above the cache's smallest size, one below.
fn store_for_file_cache() -> (TestStore, std::path::PathBuf) {
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    write_big(&src.join("big"), 3 << 20, 7);
    write_big(&src.join("mid"), 600 << 10, 8);
    write_big(&src.join("small"), 10 << 10, 9);
    import_named(&store, &src, "t");
    (store, src)
}

/// The file's bytes as seen through a shared read-only mapping.
fn mapped(path: &Path) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a private read-only mapping of a file we hold open, read within its length and
    // unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap {}", path.display());
        let out = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        out
    }
}

#[test]
fn cached_files_are_passed_through_identical_after_a_remount_and_never_when_tampered() {
    require_fuse!();
    let (store, src) = store_for_file_cache();
    let cache = store.dir.path().join("file-cache");
    let cache_arg = cache.to_str().unwrap();
    let args = ["--file-cache", cache_arg, "--file-cache-min", "256K"];
    let names = ["big", "mid", "small"];
    let want: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(src.join(n)).unwrap())
        .collect();
    let cached_files = || {
        std::fs::read_dir(&cache)
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    };
    {
        let m = Mount::start(&store.url(), &args);
        for (n, w) in names.iter().zip(&want) {
            assert!(
                std::fs::read(m.path().join("t").join(n)).unwrap() == *w,
                "{n}"
            );
        }
        // The two files above the smallest size are copied in, the small one is not.
        assert!(eventually(|| cached_files() == 2), "{:?}", ops(m.path()));
        for (n, w) in names.iter().zip(&want) {
            let p = m.path().join("t").join(n);
            assert!(std::fs::read(&p).unwrap() == *w, "{n} passed through");
            assert!(mapped(&p) == *w, "{n} mapped");
        }
        let o = ops(m.path());
        assert!(o["passthrough_opens"] >= 4, "{o:?}");
        assert_eq!(o["file_cache_filled"], 2, "{o:?}");
    }
    // A remount (a new process) re-verifies and passes the cached files through.
    {
        let m = Mount::start(&store.url(), &args);
        for (n, w) in names.iter().zip(&want) {
            let p = m.path().join("t").join(n);
            assert!(std::fs::read(&p).unwrap() == *w, "{n} after remount");
            assert!(mapped(&p) == *w, "{n} mapped after remount");
        }
        let o = ops(m.path());
        assert!(o["passthrough_opens"] >= 2, "{o:?}");
        assert_eq!(o["file_cache_rejected"], 0, "{o:?}");
    }
    // A byte changed in a cached file: never served, removed, and copied in again.
    let victim = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).unwrap().len() == 3 << 20)
        .expect("big is cached");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.write_all_at(&[want[0][12345] ^ 0x40], 12345).unwrap();
    drop(f);
    let m = Mount::start(&store.url(), &args);
    let p = m.path().join("t/big");
    assert!(
        std::fs::read(&p).unwrap() == want[0],
        "tampered cache file served"
    );
    assert!(mapped(&p) == want[0], "tampered cache file mapped");
    assert_eq!(ops(m.path())["file_cache_rejected"], 1);
    assert!(
        eventually(|| std::fs::read(&victim).is_ok_and(|b| b == want[0])),
        "not refilled"
    );
}

#[test]
fn the_file_cache_keeps_its_bound_and_the_mount_works_without_passthrough() {
    require_fuse!();
    let store = TestStore::new();
    let src = store.dir.path().join("src");
    for i in 0..6 {
        write_big(&src.join(format!("f{i}")), 700 << 10, 20 + i);
    }
    import_named(&store, &src, "t");
    let cache = store.dir.path().join("file-cache");
    let cache_arg = cache.to_str().unwrap();
    let bound = 2u64 << 20;
    {
        let m = Mount::start(
            &store.url(),
            &[
                "--file-cache",
                cache_arg,
                "--file-cache-size",
                "2M",
                "--file-cache-min",
                "100K",
            ],
        );
        for i in 0..6 {
            let name = format!("f{i}");
            let got = std::fs::read(m.path().join("t").join(&name)).unwrap();
            assert!(got == std::fs::read(src.join(&name)).unwrap(), "{name}");
            // Let this file's copy finish before the next, so each one meets a full cache.
            assert!(eventually(|| ops(m.path())["file_cache_filled"] == i + 1));
            let held: u64 = std::fs::read_dir(&cache)
                .unwrap()
                .flatten()
                .map(|e| e.metadata().unwrap().len())
                .sum();
            assert!(held <= bound, "{held} bytes in a cache of {bound}");
        }
    }
    // Forced off (as on a kernel without passthrough): reads still right, nothing passed through.
    let empty = store.dir.path().join("cache-2");
    let m = Mount::start(
        &store.url(),
        &["--file-cache", empty.to_str().unwrap(), "--no-passthrough"],
    );
    for i in 0..6 {
        let name = format!("f{i}");
        let p = m.path().join("t").join(&name);
        let want = std::fs::read(src.join(&name)).unwrap();
        assert!(
            std::fs::read(&p).unwrap() == want && mapped(&p) == want,
            "{name}"
        );
    }
    assert_eq!(ops(m.path())["passthrough_opens"], 0);
    drop(m);
    // A cache directory that cannot be made is refused in one line naming it.
    let bad = src.join("f0").join("cache");
    let err = Mount::try_start(
        &store.url(),
        &["--file-cache", bad.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .err()
    .expect("a file as the cache's parent is refused");
    assert!(
        err.contains("file cache") && err.contains("f0/cache"),
        "{err}"
    );
}

/// The bytes of the `.pack` and `.idx` files of a store.
fn pack_bytes(store: &TestStore) -> u64 {
    walk_files(&store.path().join("packs"))
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum()
}

#[test]
fn repack_beside_a_mount_reading_and_an_import_writing_loses_nothing() {
    require_fuse!();
    // A store from before compression groups (format 2): repack switches it to them.
    let store = TestStore::format_2();
    let (a, b) = (store.dir.path().join("a"), store.dir.path().join("b"));
    gen_tree(&a, 2 << 20);
    for i in 0..2000 {
        let body = format!("def f{i}():\n    return {i}\n").repeat(20 + i % 30);
        write(
            &a.join(format!("py/m{}/f{i}.py", i % 9)),
            body.as_bytes(),
            false,
        );
    }
    gen_tree(&b, 1 << 20);
    write(&b.join("only-in-b.txt"), b"b\n", false);
    import_named(&store, &a, "a");
    let before = pack_bytes(&store);

    let m = Mount::start(&store.url(), &[]);
    let mnt = m.path().join("a");
    let files: Vec<std::path::PathBuf> = walk_files(&a)
        .into_iter()
        .filter(|f| f.symlink_metadata().unwrap().is_file())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, mnt, a, files) = (stop.clone(), mnt.clone(), a.clone(), files.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while rounds < 2 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for f in &files {
                    let rel = f.strip_prefix(&a).unwrap();
                    let got = std::fs::read(mnt.join(rel))
                        .unwrap_or_else(|e| panic!("reading {rel:?} through the mount: {e}"));
                    assert!(got == std::fs::read(f).unwrap(), "{rel:?}: other bytes");
                }
                rounds += 1;
            }
            rounds
        })
    };
    let importer = {
        let (url, b) = (store.url(), b.clone());
        std::thread::spawn(move || {
            Command::new(granary_bin())
                .args([
                    "--store",
                    &url,
                    "import",
                    "--name",
                    "b",
                    b.to_str().unwrap(),
                ])
                .output()
                .unwrap()
        })
    };
    let out = store.ok(&["repack", "--level", "9"]);
    let said = String::from_utf8(out.stdout).unwrap();
    assert!(said.starts_with("repacked "), "{said}");
    let imported = importer.join().unwrap();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = reader.join().expect("the reader saw only right bytes");
    assert!(rounds >= 2);
    drop(m);

    // Nothing lost, everything verified, both trees whole.
    let v = store.ok(&["verify"]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("ok: no problems"));
    for (name, src) in [("a", &a), ("b", &b)] {
        let dest = store.dir.path().join(format!("out-{name}"));
        store.ok(&["export", name, dest.to_str().unwrap()]);
        assert_same_tree(src, &dest);
    }
    // Switched to groups, and smaller for the same objects.
    let now = std::fs::read_to_string(store.path().join("config.toml")).unwrap();
    assert!(
        now.contains("format_version = 3")
            && now.contains(&format!(
                "group_bytes = {}",
                granary::store::config::DEFAULT_GROUP_BYTES
            )),
        "{now}"
    );
    let grouped = packed_entries(&store.path())
        .iter()
        .filter(|(_, e)| e.member.is_some())
        .count();
    assert!(grouped > 2000, "{grouped} objects in groups");
    // A second repack (nothing imports now) leaves one pack of everything.
    let out = store.ok(&["repack"]);
    let said = String::from_utf8(out.stdout).unwrap();
    let sizes: Vec<u64> = said
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(sizes.len(), 4, "{said}");
    assert_eq!(sizes[1], 1, "{said}");
    store.ok(&["verify"]);
    // With b gone, a's objects take fewer bytes than before groups.
    store.ok(&["rm", "b"]);
    store.ok(&["gc", "--grace", "0s"]);
    let after = pack_bytes(&store);
    assert!(after < before, "{after} bytes after, {before} before");
    let dest = store.dir.path().join("out-a-again");
    store.ok(&["export", "a", dest.to_str().unwrap()]);
    assert_same_tree(&a, &dest);
}
