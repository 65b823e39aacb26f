//! The foundation issue's claims, proven against the real `granary` binary and a `file://`
//! store in a temp dir: round trip, dedup, corruption, bad input, concurrency.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn digest_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .split('\t')
        .next()
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn round_trip_generated_tree_with_300mib_file() {
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    gen_tree(&src, 300 << 20);
    let out = s.ok(&["import", "--name", "tree", src.to_str().unwrap()]);
    let digest = digest_of(&out);
    assert_eq!(digest.len(), 64);

    let dest = s.dir.path().join("out");
    s.ok(&["export", "tree", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    // Exporting by digest gives the same tree.
    let dest2 = s.dir.path().join("out2");
    s.ok(&["export", &digest, dest2.to_str().unwrap()]);
    assert_same_tree(&src, &dest2);
    // cat of the big file streams the right bytes.
    let cat = s.ok(&["cat", "tree/big.bin"]);
    assert_eq!(cat.stdout.len(), 300 << 20);
    assert!(cat.stdout == std::fs::read(src.join("big.bin")).unwrap());
    // Refuses to export over an existing path.
    let e = s.fails(&["export", "tree", dest.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    // ls shows the entries, non-UTF-8 names included.
    let ls = String::from_utf8_lossy(&s.ok(&["ls", "tree"]).stdout).into_owned();
    for name in ["abs-link", "big.bin", "dangling", "empty-dir", "with space"] {
        assert!(
            ls.lines().any(|l| l == name),
            "{name} missing from ls: {ls}"
        );
    }
}

#[test]
fn dedup_same_tree_adds_nothing_and_small_change_adds_few_chunks() {
    let s = TestStore::new();
    let a = s.dir.path().join("a");
    gen_tree(&a, 0);
    write_big(&a.join("large.bin"), 32 << 20, 9);
    s.ok(&["import", "--name", "a", a.to_str().unwrap()]);
    let chunks = s.count("chunks");
    let dirs = s.count("dirs");
    assert!(chunks > 100, "expected many chunks, got {chunks}");

    // The same content at another path: nothing new.
    let b = s.dir.path().join("b");
    Command::new("cp")
        .arg("-a")
        .arg(&a)
        .arg(&b)
        .status()
        .unwrap();
    let entries = s.entries();
    s.ok(&["import", "--name", "b", b.to_str().unwrap()]);
    assert_eq!(s.count("chunks"), chunks);
    assert_eq!(s.count("dirs"), dirs);
    assert_eq!(s.entries(), entries, "nothing written again");

    // One byte changed in the middle of the large file: only the chunks around it are new.
    let mut big = std::fs::read(b.join("large.bin")).unwrap();
    big[16 << 20] ^= 0xff;
    std::fs::write(b.join("large.bin"), &big).unwrap();
    s.ok(&["import", "--name", "b2", b.to_str().unwrap()]);
    let added = s.count("chunks") - chunks;
    assert!(
        (1..=3).contains(&added),
        "one changed byte added {added} chunks"
    );
    // One new blob index for the changed file, and new dirs only along its path (the top).
    assert_eq!(s.count("dirs") - dirs, 1);
}

#[test]
fn corrupted_chunk_is_an_error_never_wrong_bytes() {
    // One file per object (format 1): the chunk's file is replaced outright.
    let s = TestStore::loose();
    let src = s.dir.path().join("src");
    let data = noise(1 << 20, 5);
    write(&src.join("f"), &data, false);
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    // Re-write one stored chunk with valid zstd of different content (a silent bit flip
    // inside the payload), and another way: raw garbage.
    // Only the file's chunks: the import's times table is a small chunk of its own that
    // `cat` never reads (which one sits in the middle of a listing varies from run to run).
    let chunks: Vec<_> = walk_files(&s.path().join("chunks"))
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 1000))
        .collect();
    assert!(chunks.len() > 2);
    let victim = &chunks[chunks.len() / 2];
    let orig = zstd::decode_all(&std::fs::read(victim).unwrap()[..]).unwrap();
    let mut flipped = orig.clone();
    flipped[orig.len() / 2] ^= 1;
    std::fs::write(victim, zstd::encode_all(&flipped[..], 3).unwrap()).unwrap();

    let out = s.cmd().args(["cat", "t/f"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains("digest mismatch") && err.contains(name),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    // Whatever was printed is a true prefix of the file: never wrong bytes.
    assert!(out.stdout.len() < data.len());
    assert_eq!(&data[..out.stdout.len()], &out.stdout[..]);

    std::fs::write(victim, b"garbage").unwrap();
    let e = s.fails(&["cat", "t/f"]);
    assert!(e.contains(name) && e.contains("corrupt"), "{e}");
    // Export fails too, rather than writing a wrong file.
    let e = s.fails(&["export", "t", s.dir.path().join("x").to_str().unwrap()]);
    assert!(e.contains(name), "{e}");
    assert!(
        !s.path().join("packs").exists(),
        "a format-1 store stays loose"
    );
}

#[test]
fn corrupted_packed_chunk_is_an_error_never_wrong_bytes() {
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    let data = noise(1 << 20, 6);
    write(&src.join("f"), &data, false);
    write(&src.join("g"), b"another file, intact\n", false);
    s.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    assert!(
        walk_files(&s.path().join("chunks")).is_empty(),
        "objects are packed"
    );
    // Only the chunks of f, by their own size: a grouped chunk's entry gives its group's frame
    // length, so g's chunk and the import's times table (small chunks `cat t/f` never reads)
    // would pass a test of the entry's length whenever they share a group with f's.
    let chunks: Vec<String> = packed_entries(&s.path())
        .into_iter()
        .filter(|(_, e)| e.kind == 0 && e.member.map_or(e.len, |(_, len)| len) > 1000)
        .map(|(_, e)| e.hex)
        .collect();
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    let victim = &chunks[chunks.len() / 2];
    // Noise is stored as raw zstd blocks: a flipped payload byte still decompresses, to
    // the wrong bytes.
    s.tamper("chunks", victim, |raw| {
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
    });
    let out = s.cmd().args(["cat", "t/f"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("digest mismatch") && err.contains(victim.as_str()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    assert!(out.stdout.len() < data.len());
    assert_eq!(&data[..out.stdout.len()], &out.stdout[..]);
    // The other file of the same pack still reads.
    assert_eq!(s.ok(&["cat", "t/g"]).stdout, b"another file, intact\n");
    let e = s.fails(&["export", "t", s.dir.path().join("x").to_str().unwrap()]);
    assert!(e.contains(victim.as_str()), "{e}");
    // verify names it.
    let v = s.cmd().arg("verify").output().unwrap();
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(
        !v.status.success() && text.contains(victim.as_str()),
        "{text}"
    );
}

#[test]
fn special_files_fail_cleanly_unless_skipped() {
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    write(&src.join("ok"), b"ok", false);
    let fifo = src.join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let e = s.fails(&["import", "--name", "t", src.to_str().unwrap()]);
    assert!(e.contains("pipe") && e.contains("fifo"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(s.ok(&["roots"]).stdout.is_empty(), "no root recorded");

    let out = s
        .cmd()
        .args(["import", "--skip-special", "--name", "t"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping"));
    let ls = s.ok(&["ls", "t"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout), "ok\n");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let s = TestStore::new();
    let e = s.fails(&["import", "/nonexistent/path/x"]);
    assert!(
        e.contains("/nonexistent/path/x") && e.contains("cannot stat"),
        "{e}"
    );
    let e = s.fails(&["cat", "nosuchroot/file"]);
    assert!(e.contains("nosuchroot"), "{e}");
    let e = s.fails(&["import", "--name", "a/b", "/etc/hostname"]);
    assert!(e.contains("a/b"), "{e}");
    // A store from the future is refused, not misread.
    s.ok(&["roots"]);
    let cfg = s.path().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            &format!(
                "format_version = {}",
                granary::store::config::FORMAT_VERSION
            ),
            "format_version = 99",
        ),
    )
    .unwrap();
    let e = s.fails(&["roots"]);
    assert!(e.contains("newer"), "{e}");
    // A non-empty directory that is not a store is not taken over.
    let e = TestStore::new();
    std::fs::create_dir_all(e.path()).unwrap();
    std::fs::write(e.path().join("precious"), b"x").unwrap();
    let msg = e.fails(&["roots"]);
    assert!(msg.contains("not a granary store"), "{msg}");
}

#[test]
fn eight_concurrent_imports_of_overlapping_trees() {
    let s = TestStore::new();
    let base = s.dir.path().join("base");
    gen_tree(&base, 0);
    write_big(&base.join("shared.bin"), 8 << 20, 3);
    // Trees overlap: each is the base plus a private file.
    let mut trees = Vec::new();
    for i in 0..8 {
        let t = s.dir.path().join(format!("t{i}"));
        Command::new("cp")
            .arg("-a")
            .arg(&base)
            .arg(&t)
            .status()
            .unwrap();
        if i % 2 == 1 {
            write(&t.join("own.bin"), &noise(300_000, i), false);
        }
        trees.push(t);
    }
    s.ok(&["roots"]); // create the store first; concurrent creation is tested below
    let children: Vec<_> = trees
        .iter()
        .enumerate()
        .map(|(i, t)| {
            s.cmd()
                .args(["import", "--name", &format!("r{i}")])
                .arg(t)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            digest_of(&out)
        })
        .collect();
    // The digests must be what a sequential import into a fresh store gives.
    let fresh = TestStore::new();
    for (i, t) in trees.iter().enumerate() {
        assert_eq!(
            digest_of(&fresh.ok(&["import", t.to_str().unwrap()])),
            digests[i]
        );
    }
    assert_eq!(s.count("chunks"), fresh.count("chunks"));
    assert_eq!(
        s.ok(&["roots"])
            .stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        8
    );
    // Every tree exports intact.
    for (i, t) in trees.iter().enumerate() {
        let d = s.dir.path().join(format!("out{i}"));
        s.ok(&["export", &format!("r{i}"), d.to_str().unwrap()]);
        assert_same_tree(t, &d);
    }
}

#[test]
fn concurrent_creation_of_a_new_store() {
    let s = TestStore::new();
    let src = Path::new("/etc/hostname");
    let children: Vec<_> = (0..8)
        .map(|_| {
            s.cmd()
                .args(["import"])
                .arg(src)
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(s.path().join("config.toml").is_file());
}

#[test]
fn unreadable_file_fails_cleanly_with_no_root() {
    // Root reads everything, so run granary as an unprivileged user for this one.
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv not installed");
        return;
    }
    let s = TestStore::new();
    let src = s.dir.path().join("src");
    write(&src.join("ok"), b"ok", false);
    write(&src.join("secret"), b"secret", false);
    let chmod = |p: &Path, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    };
    chmod(s.dir.path(), 0o777);
    chmod(&src, 0o755);
    chmod(&src.join("secret"), 0o000);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(granary_bin())
        .arg("--store")
        .arg(s.url())
        .args(["import", "--name", "t"])
        .arg(&src)
        .env("HOME", s.dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "import of an unreadable file succeeded"
    );
    assert!(
        err.contains("secret") && err.contains("Permission denied"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!s.path().join("roots/t").exists(), "no root recorded");
}
