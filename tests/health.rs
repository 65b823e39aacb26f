//! Store health: rm + gc frees exactly what is unshared, gc is safe beside imports, verify
//! finds every injected fault and repairs from a second store, SIGKILLed imports leave a
//! store that verifies.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// (objects, stored bytes) per object kind, loose files and packed entries alike.
fn census(s: &TestStore) -> Vec<(usize, u64)> {
    let packed = packed_entries(&s.path());
    ["chunks", "blobs", "dirs"]
        .iter()
        .enumerate()
        .map(|(code, k)| {
            let files: Vec<PathBuf> = walk_files(&s.path().join(k))
                .into_iter()
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
                .collect();
            let mut bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
            let mut n = files.len();
            let mut seen = std::collections::HashSet::new();
            let groups = group_plain(&packed);
            for (p, e) in packed.iter().filter(|(_, e)| e.kind as usize == code) {
                if seen.insert(e.hex.clone()) {
                    n += 1;
                    bytes += e.share(&groups, p);
                }
            }
            (n, bytes)
        })
        .collect()
}

/// Bytes of pack files beyond the objects they index (headers, and anything a gc failed to
/// cut out).
fn pack_slack(s: &TestStore) -> u64 {
    let mut on_disk = 0;
    let mut packs = 0;
    for f in walk_files(&s.path().join("packs")) {
        if f.extension().is_some_and(|e| e == "pack") {
            on_disk += f.metadata().unwrap().len();
            packs += 1;
        }
    }
    // A group's frame is counted once, however many objects it holds.
    let frames: std::collections::HashSet<(PathBuf, usize, usize)> = packed_entries(&s.path())
        .into_iter()
        .map(|(p, e)| (p, e.offset, e.len))
        .collect();
    let indexed: u64 = frames.iter().map(|f| f.2 as u64).sum();
    on_disk - indexed - 8 * packs
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn two_trees(base: &Path) -> (PathBuf, PathBuf) {
    let a = base.join("a");
    gen_tree(&a, 0);
    write_big(&a.join("shared.bin"), 4 << 20, 1);
    let b = base.join("b");
    gen_tree(&b, 0);
    write_big(&b.join("shared.bin"), 4 << 20, 1);
    write_big(&b.join("only-b.bin"), 3 << 20, 2);
    write(&b.join("hello.txt"), b"changed in b\n", false);
    (a, b)
}

#[test]
fn gc_frees_exactly_the_unshared_objects() {
    let s = TestStore::new();
    let (a, b) = two_trees(s.dir.path());
    // What A alone needs, measured in a store of its own.
    let alone = TestStore::new();
    alone.ok(&["import", "--name", "a", a.to_str().unwrap()]);
    let want = census(&alone);

    s.ok(&["import", "--name", "a", a.to_str().unwrap()]);
    s.ok(&["import", "--name", "b", b.to_str().unwrap()]);
    let before = census(&s);
    assert!(before[0].0 > want[0].0, "b adds chunks");

    // Nothing unreachable yet: gc deletes nothing.
    let out = stdout(&s.ok(&["gc", "--grace", "0s"]));
    assert!(out.starts_with("deleted 0 objects"), "{out}");

    s.ok(&["rm", "b"]);
    let e = s.fails(&["rm", "b"]);
    assert!(e.contains("no such root"), "{e}");
    let dry = stdout(&s.ok(&["gc", "--dry-run", "--grace", "0s"]));
    assert_eq!(census(&s), before, "dry run deletes nothing");
    // With the default grace (1h) everything just written is protected.
    let out = stdout(&s.ok(&["gc"]));
    assert!(out.starts_with("deleted 0 objects"), "{out}");

    let out = stdout(&s.ok(&["gc", "--grace", "0s"]));
    let after = census(&s);
    // Exactly the objects a alone needs; their bytes within a hair of a's own store (gc
    // moves the survivors of a compression group into new groups, whose frames differ by a
    // few bytes from those of an import of a alone: on a metadata group of a few KiB, the
    // order of its members alone moves its frame by a few hundred bytes).
    let near = |x: u64, y: u64| x.abs_diff(y) <= y / 200 + 512;
    for (got, w) in after.iter().zip(&want) {
        assert!(
            got.0 == w.0 && near(got.1, w.1),
            "gc left {after:?}, a alone needs {want:?}"
        );
    }
    // The garbage is gone from the disk too, not just from the indexes.
    assert_eq!(pack_slack(&s), 0);
    assert!(
        !walk_files(&s.path().join("packs")).is_empty(),
        "the store is packed"
    );
    let freed_objects: usize =
        before.iter().map(|c| c.0).sum::<usize>() - want.iter().map(|c| c.0).sum::<usize>();
    let freed_bytes: u64 =
        before.iter().map(|c| c.1).sum::<u64>() - want.iter().map(|c| c.1).sum::<u64>();
    // "deleted N objects (B bytes)": N exact, B the freed objects' share of what was stored.
    let said = |text: &str, verb: &str| -> (usize, u64) {
        let rest = text.strip_prefix(verb).unwrap_or_else(|| panic!("{text}"));
        let mut w = rest.split_whitespace();
        let n = w.next().unwrap().parse().unwrap();
        let b = w.nth(1).unwrap().trim_start_matches('(').parse().unwrap();
        (n, b)
    };
    for (text, verb) in [(&out, "deleted "), (&dry, "would delete ")] {
        let (n, b) = said(text, verb);
        assert!(
            n == freed_objects && near(b, freed_bytes),
            "{text} vs {freed_objects} objects ({freed_bytes} bytes)"
        );
    }

    let dest = s.dir.path().join("out");
    s.ok(&["export", "a", dest.to_str().unwrap()]);
    assert_same_tree(&a, &dest);
    assert!(stdout(&s.ok(&["verify"])).contains("ok: no problems"));
}

#[test]
fn gc_beside_a_loop_of_imports_never_breaks_a_root() {
    let s = TestStore::new();
    let base = s.dir.path().join("garbage");
    gen_tree(&base, 0);
    write_big(&base.join("g.bin"), 2 << 20, 5);
    s.ok(&["import", "--name", "g", base.to_str().unwrap()]);
    s.ok(&["rm", "g"]);
    // Let the garbage age past the grace period used below.
    std::thread::sleep(Duration::from_millis(2500));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc_loop = {
        let (stop, url) = (stop.clone(), s.url());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let st = Command::new(granary_bin())
                    .args(["--store", &url, "gc", "--grace", "2s"])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap();
                assert!(st.success());
                runs += 1;
            }
            runs
        })
    };
    // Each import reuses the aged garbage (same content) plus something new.
    for i in 0..12 {
        let t = s.dir.path().join(format!("t{i}"));
        Command::new("cp")
            .arg("-a")
            .arg(&base)
            .arg(&t)
            .status()
            .unwrap();
        write(&t.join("new.txt"), format!("import {i}").as_bytes(), false);
        s.ok(&["import", "--name", &format!("r{i}"), t.to_str().unwrap()]);
        let v = s.cmd().args(["verify", &format!("r{i}")]).output().unwrap();
        assert!(v.status.success(), "root r{i} broken: {}", stdout(&v));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc_loop.join().unwrap();
    assert!(runs >= 2, "gc ran {runs} times");
    // Every root still exports intact after the last gc.
    s.ok(&["gc", "--grace", "2s"]);
    for i in 0..12 {
        let d = s.dir.path().join(format!("out{i}"));
        s.ok(&["export", &format!("r{i}"), d.to_str().unwrap()]);
        assert_same_tree(&s.dir.path().join(format!("t{i}")), &d);
    }
}

fn object(s: &TestStore, kind: &str, digest: &str) -> PathBuf {
    s.path().join(kind).join(&digest[..2]).join(digest)
}

fn root_digest(s: &TestStore, root: &str) -> String {
    stdout(&s.ok(&["ls", "-l", root]))
        .lines()
        .map(|l| l.to_string())
        .next()
        .unwrap_or_default()
}

#[test]
fn verify_finds_each_fault_and_repairs_from_a_second_store() {
    // A format-1 store, where objects can also be removed or truncated ...
    verify_faults(TestStore::loose(), true);
    // ... and a packed one, where faults keep the object's length.
    verify_faults(TestStore::new(), false);
}

fn verify_faults(s: TestStore, loose: bool) {
    let donor = TestStore::new();
    let src = s.dir.path().join("src");
    gen_tree(&src, 0);
    write_big(&src.join("big.bin"), 3 << 20, 11);
    for st in [&s, &donor] {
        st.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    }
    let ok = stdout(&s.ok(&["verify"]));
    assert!(ok.contains("ok: no problems"), "{ok}");
    let _ = root_digest(&s, "t");

    let big_digest = blake3::hash(&std::fs::read(src.join("big.bin")).unwrap())
        .to_hex()
        .to_string();
    let index = prost_free_index_chunks(&s.object("blobs", &big_digest));
    assert!(index.len() >= 4, "big.bin has several chunks");
    let hello = blake3::hash(b"hello\n").to_hex().to_string();
    let tool = blake3::hash(b"#!/bin/sh\necho tool\n").to_hex().to_string();

    type Fault<'a> = (&'a str, Box<dyn Fn() + 'a>, String);
    let mut faults: Vec<Fault> = vec![
        (
            "flipped byte",
            Box::new(|| {
                // big.bin is noise, stored as raw zstd blocks: the frame still decodes, to
                // other bytes.
                s.tamper("chunks", &index[0], |raw| {
                    let n = raw.len();
                    raw[n / 2] ^= 1;
                })
            }),
            index[0].clone(),
        ),
        (
            "lying blob index",
            Box::new(|| {
                // Swap two chunk entries: structurally valid, but the content no longer
                // hashes to the blob digest.
                s.tamper("blobs", &big_digest, |raw| {
                    *raw = swap_first_two_entries(raw)
                });
            }),
            big_digest.clone(),
        ),
        (
            "corrupt directory",
            Box::new(|| {
                let d = dir_containing(&s, "tool");
                s.tamper("dirs", &d, |raw| {
                    let n = raw.len();
                    raw[n - 1] ^= 0x40;
                });
            }),
            String::new(),
        ),
    ];
    let loose_faults: Vec<Fault> = vec![
        (
            "truncated chunk",
            Box::new(|| {
                let p = object(&s, "chunks", &index[1]);
                let raw = std::fs::read(&p).unwrap();
                std::fs::write(&p, &raw[..raw.len() / 2]).unwrap();
            }),
            index[1].clone(),
        ),
        (
            "missing chunk",
            Box::new(|| {
                std::fs::remove_file(object(&s, "chunks", &hello)).unwrap();
            }),
            hello.clone(),
        ),
    ];
    if loose {
        faults.extend(loose_faults);
    }
    let _ = tool;
    for (what, inject, digest) in &faults {
        inject();
        let out = s.cmd().arg("verify").output().unwrap();
        let text = stdout(&out);
        assert!(!out.status.success(), "{what}: verify passed:\n{text}");
        assert!(
            digest.is_empty() || text.contains(digest.as_str()),
            "{what}: {text}"
        );
        assert!(
            text.contains("roots: t"),
            "{what}: affected root named: {text}"
        );
        let fixed = s
            .cmd()
            .args(["verify", "--repair-from", &donor.url()])
            .output()
            .unwrap();
        assert!(
            fixed.status.success(),
            "{what}: repair failed: {}",
            stdout(&fixed)
        );
        assert!(
            stdout(&s.ok(&["verify"])).contains("ok: no problems"),
            "{what}"
        );
    }

    if loose {
        // A root pointing at a missing directory.
        let top = stdout(&s.ok(&["import", src.to_str().unwrap()]));
        let top = top.split('\t').next().unwrap().to_string();
        std::fs::remove_file(object(&s, "dirs", &top)).unwrap();
        let text = stdout(&s.cmd().arg("verify").output().unwrap());
        assert!(
            text.contains(&format!("directory {top}: missing (roots: t)")),
            "{text}"
        );
        s.ok(&["verify", "--repair-from", &donor.url()]);
    }

    let dest = s.dir.path().join("out");
    s.ok(&["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

/// The digest (hex) of the stored directory that has an entry named `name`.
fn dir_containing(s: &TestStore, name: &str) -> String {
    let loose = walk_files(&s.path().join("dirs"))
        .into_iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned());
    let packed = packed_entries(&s.path())
        .into_iter()
        .filter(|(_, e)| e.kind == 2)
        .map(|(_, e)| e.hex);
    for hex in loose.chain(packed) {
        let raw = s.object("dirs", &hex);
        if raw.windows(name.len()).any(|w| w == name.as_bytes()) {
            return hex;
        }
    }
    panic!("no directory holds {name}");
}

// Minimal protobuf reading for BlobIndex { repeated Chunk chunks = 1 { bytes digest = 1; uint64 size = 2 } }.
fn varint(b: &[u8], i: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

fn index_entries(raw: &[u8]) -> Vec<(usize, usize)> {
    let mut i = 0;
    let mut out = Vec::new();
    while i < raw.len() {
        let start = i;
        let tag = varint(raw, &mut i);
        if tag & 7 == 2 {
            let len = varint(raw, &mut i) as usize;
            i += len;
            if tag >> 3 == 1 {
                out.push((start, i));
            }
        } else {
            let _ = varint(raw, &mut i);
        }
    }
    out
}

fn prost_free_index_chunks(raw: &[u8]) -> Vec<String> {
    index_entries(raw)
        .into_iter()
        .map(|(s, e)| {
            let body = &raw[s..e];
            let pos = body.windows(2).position(|w| w == [0x0a, 0x20]).unwrap();
            body[pos + 2..pos + 34]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect()
}

fn swap_first_two_entries(raw: &[u8]) -> Vec<u8> {
    let e = index_entries(raw);
    let (a, b) = (e[0], e[1]);
    let mut out = raw[..a.0].to_vec();
    out.extend_from_slice(&raw[b.0..b.1]);
    out.extend_from_slice(&raw[a.0..a.1]);
    out.extend_from_slice(&raw[b.1..]);
    out
}

#[test]
fn sigkilled_imports_leave_a_store_that_verifies() {
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    gen_tree(&src, 0);
    for i in 0..3 {
        write_big(&src.join(format!("big{i}.bin")), 64 << 20, 20 + i);
    }
    for i in 0..400 {
        write(
            &src.join(format!("many/{}/f{i}", i % 20)),
            &noise(4096 + i * 37, i as u64),
            false,
        );
    }
    // How long a full import takes here, so kills land at random points inside one.
    let t = Instant::now();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let full = t.elapsed().as_millis() as u64;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut killed = 0;
    for run in 0..20u64 {
        // New content in one large file each run, so every import has real work to do.
        write_big(
            &src.join(format!("big{}.bin", run % 3)),
            64 << 20,
            100 + run,
        );
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // One file of three is new, so an import takes about a third of the first.
        let delay = Duration::from_millis(full / 50 + rng % (full / 4).max(1));
        let mut child = s
            .cmd()
            .args(["import", "--name", "t"])
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while t.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        let v = s.cmd().arg("verify").output().unwrap();
        assert!(
            v.status.success(),
            "run {run}: verify after kill: {}",
            stdout(&v)
        );
        // A re-run completes, with the digest an import into an empty store gives.
        let again = stdout(&s.ok(&["import", "--name", "t", src.to_str().unwrap()]));
        let fresh = stdout(
            &Command::new(granary_bin())
                .args(["--store", "memory://", "import"])
                .arg(&src)
                .output()
                .unwrap(),
        );
        assert_eq!(again, fresh, "run {run}");
        // Drop what the superseded versions left, so the store (and verify) stays small.
        s.ok(&["gc", "--grace", "0s"]);
    }
    assert!(
        killed >= 10,
        "only {killed} of 20 imports were killed mid-way"
    );
    s.ok(&["gc", "--grace", "0s"]);
    assert!(stdout(&s.ok(&["verify"])).contains("ok: no problems"));
}

/// Flips one byte in each of the first `n` packed objects of kind `kind` (0 chunk, 1 blob
/// index) larger than `min_len`; returns their digests.
fn flip_packed(s: &TestStore, kind: u8, n: usize, min_len: usize) -> Vec<String> {
    let mut done = Vec::new();
    for (pack, e) in packed_entries(&s.path()) {
        if done.len() == n || e.kind != kind || e.len <= min_len {
            continue;
        }
        if e.member.is_some() {
            // Inside its group: the object's own bytes, so only it is damaged.
            if e.member.is_some_and(|(_, l)| l <= min_len) {
                continue;
            }
            let sub = ["chunks", "blobs", "dirs"][kind as usize];
            tamper(&s.path(), sub, &e.hex, |raw| {
                let n = raw.len();
                raw[n / 2] ^= 1;
            });
        } else {
            let mut raw = std::fs::read(&pack).unwrap();
            raw[e.offset + e.len / 2] ^= 1;
            std::fs::write(&pack, &raw).unwrap();
        }
        done.push(e.hex);
    }
    assert_eq!(done.len(), n, "not enough objects to damage");
    done
}

fn verify_out(s: &TestStore, args: &[&str]) -> (bool, Vec<String>) {
    let out = s.cmd().arg("verify").args(args).output().unwrap();
    let lines = stdout(&out).lines().map(str::to_string).collect();
    (out.status.success(), lines)
}

#[test]
fn verify_names_every_kind_of_damage() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    gen_tree(&src, 0);
    write_big(&src.join("big.bin"), 3 << 20, 11);
    let big = blake3::hash(&std::fs::read(src.join("big.bin")).unwrap())
        .to_hex()
        .to_string();
    let fresh = || {
        let s = TestStore::new();
        s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
        s
    };

    // Root records that cannot be read are problems, not log lines; nothing is "ok".
    let s = fresh();
    for (name, bytes, why) in [
        (
            "empty",
            &b""[..],
            "root empty: cannot be read: root: empty record (0 bytes)",
        ),
        (
            "garbage",
            &b"\xff\xff\xff\xff garbage"[..],
            "root garbage: cannot be read: cannot decode root:",
        ),
    ] {
        std::fs::write(s.path().join("roots").join(name), bytes).unwrap();
        let (ok, lines) = verify_out(&s, &[]);
        assert!(!ok && lines.iter().any(|l| l.starts_with(why)), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("ok: no problems")));
        let (ok, lines) = verify_out(&s, &[name]);
        assert!(!ok && lines.iter().any(|l| l.starts_with(why)), "{lines:?}");
        std::fs::remove_file(s.path().join("roots").join(name)).unwrap();
    }
    // A truncated one.
    let rec = std::fs::read(s.path().join("roots/t")).unwrap();
    std::fs::write(s.path().join("roots/cut"), &rec[..rec.len() / 2]).unwrap();
    let (ok, lines) = verify_out(&s, &["cut"]);
    assert!(
        !ok && lines[0].starts_with("root cut: cannot be read: "),
        "{lines:?}"
    );
    std::fs::remove_file(s.path().join("roots/cut")).unwrap();

    // A FIFO and a symlink in roots/ are refused without being opened: no hang, no follow.
    let fifo = s.path().join("roots/fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::os::unix::fs::symlink("/etc/hostname", s.path().join("roots/link")).unwrap();
    for args in [&["verify"][..], &["gc"][..], &["ls", "fifo"][..]] {
        let t0 = Instant::now();
        let out = Command::new("timeout")
            .args(["10"])
            .arg(granary_bin())
            .args(["--store", &s.url()])
            .args(args)
            .output()
            .unwrap();
        assert_ne!(
            out.status.code(),
            Some(124),
            "{args:?} hung on a FIFO in roots/"
        );
        assert!(!out.status.success(), "{args:?}");
        assert!(t0.elapsed() < Duration::from_secs(9));
    }
    let (_, lines) = verify_out(&s, &[]);
    let f = format!(
        "root fifo: cannot be read: {}: not a regular file, not a root record",
        fifo.display()
    );
    assert!(lines.contains(&f), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("root link: cannot be read:")
                && l.ends_with("a symbolic link, not a root record")),
        "{lines:?}"
    );
    std::fs::remove_file(&fifo).unwrap();
    std::fs::remove_file(s.path().join("roots/link")).unwrap();

    // A bit flip in a blob index is the blob index's fault, named by its digest.
    let s = fresh();
    let flipped = flip_packed(&s, 1, 1, 0);
    assert_eq!(flipped, vec![big.clone()]);
    let (ok, lines) = verify_out(&s, &["t"]);
    assert!(!ok);
    assert_eq!(
        lines[0],
        format!("blob index {big}: corrupt: blob index: checksum mismatch: the stored index is damaged (roots: t)")
    );

    // Twenty damaged chunks: all twenty, each with the root that reaches it, whether the
    // root or the whole store is verified.
    let s = fresh();
    let chunks = flip_packed(&s, 0, 20, 20_000);
    for args in [&["t"][..], &[][..]] {
        let (ok, lines) = verify_out(&s, args);
        assert!(!ok);
        for c in &chunks {
            let line = lines
                .iter()
                .find(|l| l.starts_with(&format!("chunk {c}: corrupt: digest mismatch")))
                .unwrap_or_else(|| panic!("chunk {c} not reported: {lines:?}"));
            assert!(line.ends_with("(roots: t)"), "{line}");
        }
        assert_eq!(lines.last().unwrap(), "20 problems", "{lines:?}");
    }

    // A lost blob index (one file per object) is a missing blob index, not a missing blob.
    let s = TestStore::loose();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    std::fs::remove_file(s.path().join("blobs").join(&big[..2]).join(&big)).unwrap();
    let (ok, lines) = verify_out(&s, &[]);
    assert!(!ok);
    assert_eq!(lines[0], format!("blob index {big}: missing (roots: t)"));
    let donor = fresh();
    s.ok(&["verify", "--repair-from", &donor.url()]);
    assert!(verify_out(&s, &[]).0);
}

#[test]
fn a_size_that_disagrees_with_its_blob_is_refused_everywhere() {
    use granary::model::castore::{Directory, FileEntry, Node, RootRecord};
    let s = TestStore::new();
    let hello = b"hello\n";
    let hex = blake3::hash(hello).to_hex().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, recorded) in [("small", 2u64), ("huge", 1_000_000_000_000u64)] {
        rt.block_on(async {
            let store = granary::store::open(&s.url()).await.unwrap();
            let d = granary::model::castore::B3Digest::of(hello);
            store
                .blobs
                .put_chunk(d, bytes::Bytes::from_static(hello))
                .await
                .unwrap();
            let dir = Directory {
                files: vec![FileEntry {
                    name: bytes::Bytes::from_static(b"f"),
                    digest: bytes::Bytes::copy_from_slice(d.as_bytes()),
                    size: recorded,
                    executable: false,
                }],
                ..Default::default()
            };
            let digest = store.dirs.put(&dir).await.unwrap();
            let root = RootRecord {
                name: name.into(),
                node: Node::Directory { digest, size: 1 },
                nix: None,
                times: None,
                times_head: Vec::new(),
                traces: Vec::new(),
            };
            store.roots.put(&root).await.unwrap();
        });
        let err = s.fails(&["cat", &format!("{name}/f")]);
        assert!(
            err.contains(&format!("is 6 bytes, its directory entry says {recorded}")),
            "{err}"
        );
        let dest = s.dir.path().join(format!("out-{name}"));
        s.fails(&["export", name, dest.to_str().unwrap()]);
        assert!(!dest.exists());
        let (ok, lines) = verify_out(&s, &[name]);
        assert!(!ok);
        assert_eq!(
            lines[0],
            format!(
                "blob {hex}: is 6 bytes, its directory entry records {recorded} (roots: {name})"
            )
        );
    }
}

#[test]
fn repair_rebuilds_lost_and_damaged_packs_and_walks_below_what_it_restores() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    gen_tree(&src, 0);
    write_big(&src.join("big.bin"), 3 << 20, 11);
    let donor = TestStore::new();
    donor.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let top = stdout(&donor.ok(&["import", src.to_str().unwrap()]))
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    type Damage = (&'static str, fn(&Path, &str), &'static str);
    let damages: [Damage; 3] = [
        (
            "lost pack",
            |packs, id| std::fs::remove_file(packs.join(format!("{id}.pack"))).unwrap(),
            "its pack file is missing (",
        ),
        (
            "truncated pack",
            |packs, id| {
                let p = packs.join(format!("{id}.pack"));
                let n = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(n / 2)
                    .unwrap();
            },
            "its index is damaged (",
        ),
        (
            "truncated index",
            |packs, id| {
                let p = packs.join(format!("{id}.idx"));
                let n = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(n / 2)
                    .unwrap();
            },
            "its index is damaged (",
        ),
    ];
    for (what, damage, why) in damages {
        let s = TestStore::new();
        s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
        let packs = s.path().join("packs");
        let ids: Vec<String> = walk_files(&packs)
            .iter()
            .filter_map(|p| {
                p.to_str()?
                    .strip_suffix(".idx")
                    .map(|x| x.rsplit('/').next().unwrap().to_string())
            })
            .collect();
        assert_eq!(ids.len(), 1, "{what}: one pack");
        damage(&packs, &ids[0]);
        let (ok, lines) = verify_out(&s, &[]);
        assert!(!ok, "{what}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("pack {}: {why}", ids[0]))),
            "{what}: {lines:?}"
        );
        // The whole tree went with the pack: only its top is seen, and repair restores what
        // is below it too.
        assert!(
            lines.contains(&format!("directory {top}: missing (roots: t)")),
            "{what}: {lines:?}"
        );
        let out = s
            .cmd()
            .args(["verify", "--repair-from", &donor.url()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("; 0 remain"),
            "{what}: {}",
            stdout(&out)
        );
        assert!(verify_out(&s, &[]).0, "{what}: verify after repair");
        let dest = s.dir.path().join("out");
        s.ok(&["export", "t", dest.to_str().unwrap()]);
        assert_same_tree(&src, &dest);
    }

    // What cannot be repaired says why.
    let s = TestStore::new();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let empty = TestStore::new();
    empty.ok(&["roots"]);
    for p in walk_files(&s.path().join("packs")) {
        if p.extension().is_some_and(|e| e == "pack") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let out = s
        .cmd()
        .args(["verify", "--repair-from", &empty.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "directory {top}: missing (roots: t): not repaired: {} does not have it",
            empty.url()
        )),
        "{text}"
    );
}

#[test]
fn long_runs_print_progress_lines_when_stderr_is_not_a_terminal() {
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    gen_tree(&src, 3 << 20);
    let run = |args: &[&str], secs: &str| {
        let out = s
            .cmd()
            .args(args)
            .env("GRANARY_PROGRESS_SECS", secs)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A tiny interval stands for "a long run": every command reports, in single lines.
    let err = run(&["import", "--name", "t", src.to_str().unwrap()], "0.001");
    let last = err
        .lines()
        .rev()
        .find(|l| l.starts_with("granary: import: "))
        .unwrap_or_else(|| panic!("no progress line: {err:?}"));
    assert!(
        last.ends_with("(done)") && last.contains("(100%)"),
        "{last}"
    );
    let err = run(&["verify"], "0.001");
    assert!(
        err.lines()
            .any(|l| l.starts_with("granary: verify: roots 1/1")),
        "{err:?}"
    );
    let err = run(&["gc"], "0.001");
    assert!(
        err.lines().any(|l| l.starts_with("granary: gc: ")),
        "{err:?}"
    );
    // The default interval keeps short runs quiet, and 0 turns progress off.
    assert_eq!(run(&["import", src.to_str().unwrap()], "10"), "");
    assert_eq!(run(&["verify"], "0"), "");
}

/// Small text files that compress together: many per compression group.
fn small_files(root: &Path, n: usize) {
    for i in 0..n {
        let body = format!("# module {i}\n").repeat(40 + i % 50);
        write(
            &root.join(format!("d{}/m{i}.py", i % 7)),
            body.as_bytes(),
            false,
        );
    }
}

#[test]
fn a_damaged_compression_group_names_the_objects_it_holds_and_gives_no_wrong_bytes() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    small_files(&src, 3000);
    let s = TestStore::new();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let entries = packed_entries(&s.path());
    // The chunk group with the most members.
    let ((pack, off, len), members) = largest_chunk_group(&entries);
    assert!(members.len() > 20, "{} members", members.len());
    // Stored far smaller than alone: 3000 files of ~1 KiB.
    let stored: u64 = walk_files(&s.path().join("packs"))
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    let plain: u64 = walk_files(&src)
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum();
    assert!(stored * 5 < plain, "{stored} bytes stored for {plain}");

    let mut raw = std::fs::read(&pack).unwrap();
    let at = off + harmful_flip(&raw[off..off + len]);
    raw[at] ^= 0x10;
    std::fs::write(&pack, &raw).unwrap();
    let (ok, lines) = verify_out(&s, &[]);
    assert!(!ok, "{lines:?}");
    let named: Vec<&String> = members
        .iter()
        .filter(|m| {
            lines
                .iter()
                .any(|l| l.starts_with(&format!("chunk {m}: corrupt")))
        })
        .collect();
    assert!(!named.is_empty(), "{lines:?}");
    for l in lines.iter().filter(|l| l.starts_with("chunk ")) {
        assert!(
            members.iter().any(|m| l.starts_with(&format!("chunk {m}"))),
            "only objects of the damaged group are at fault: {l}"
        );
        assert!(l.ends_with("(roots: t)"), "{l}");
    }
    // Every file reads right or fails: never other bytes.
    let failed = cat_all_right_or_failing(&src, |rel| {
        s.cmd().args(["cat", &format!("t/{rel}")]).output().unwrap()
    });
    assert_eq!(failed, named.len(), "one file per damaged small chunk");
}

#[test]
fn a_format_2_store_is_read_and_written_without_groups() {
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    small_files(&src, 200);
    let s = TestStore::format_2();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let entries = packed_entries(&s.path());
    assert!(entries.iter().all(|(_, e)| e.member.is_none()));
    for idx in walk_files(&s.path().join("packs")) {
        if idx.extension().is_some_and(|e| e == "idx") {
            assert_eq!(&std::fs::read(&idx).unwrap()[..8], b"GRNIDX01");
        }
    }
    assert_eq!(
        std::fs::read_to_string(s.path().join("config.toml")).unwrap(),
        FORMAT_2_CONFIG
    );
    let dst = src_dir.path().join("out");
    s.ok(&["export", "t", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    let (ok, lines) = verify_out(&s, &[]);
    assert!(ok, "{lines:?}");
}

/// Nanoseconds since the epoch of a path's mtime (links not followed).
fn mtime_ns(p: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

#[test]
fn a_root_record_keeps_the_head_of_its_times_and_verify_says_when_it_disagrees() {
    use granary::model::castore::RootRecord;
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("src");
    for f in ["b", "a/x", "c/y"] {
        let p = src.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, f).unwrap();
    }
    let s = TestStore::new();
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let record_path = s.path().join("roots").join("t");
    let rec = RootRecord::decode(&std::fs::read(&record_path).unwrap()).unwrap();
    // The top's time, then its entries' in name order.
    let want: Vec<i64> = ["", "a", "b", "c"]
        .iter()
        .map(|e| mtime_ns(&src.join(e)))
        .collect();
    assert_eq!(rec.times_head, want);
    assert!(verify_out(&s, &[]).0);

    // A head that disagrees with its table is named, with the first record that differs.
    let mut bad = rec.clone();
    bad.times_head[2] += 1;
    std::fs::write(&record_path, bad.encode()).unwrap();
    let (ok, lines) = verify_out(&s, &[]);
    assert!(!ok);
    let table = rec.times.unwrap().digest;
    assert_eq!(
        lines[0],
        format!(
            "root t: the head of times table {table} it keeps disagrees with the table at record 2"
        )
    );
    std::fs::write(&record_path, rec.encode()).unwrap();
    assert!(verify_out(&s, &[]).0);

    // A top with more entries than a head holds: the head is its own time alone.
    let wide = src_dir.path().join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    for i in 0..=granary::model::times::HEAD_ENTRIES_MAX {
        std::fs::write(wide.join(format!("f{i}")), b"").unwrap();
    }
    s.ok(&["import", "--name", "wide", wide.to_str().unwrap()]);
    let rec = RootRecord::decode(&std::fs::read(s.path().join("roots/wide")).unwrap()).unwrap();
    assert_eq!(rec.times_head, vec![mtime_ns(&wide)]);
    assert!(verify_out(&s, &["wide"]).0);
}
