//! Nix compatibility against the real Nix as the oracle (`nix-store --dump`, `nix-hash`):
//! NARs granary writes are byte-identical to Nix's, recorded NAR hashes agree with
//! `nix-hash`, NARs Nix writes import and come back unchanged, and bad NARs are refused
//! cleanly with nothing recorded. Skips loudly without `nix-store` unless GRANARY_REQUIRE_NIX=1.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{gen_tree, have_nix_tool, write, TestStore};

/// Whether the Nix tools are here; panics if they must be.
fn have_nix() -> bool {
    have_nix_tool("nix-store", "Nix oracle test")
}

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("run nix-store");
    assert!(
        out.status.success(),
        "nix-store --dump {path:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn nix_hash(path: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .expect("run nix-hash");
    assert!(out.status.success(), "nix-hash {path:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A fixed-looking 32-char nix-base32 hash part derived from `seed`.
fn hash_part(seed: &str) -> String {
    const A: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    (0..32)
        .map(|i| {
            for b in seed.bytes().chain([i as u8]) {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
            A[(h >> 59) as usize] as char
        })
        .collect()
}

fn narinfo(ts: &TestStore, root: &str) -> Vec<(String, String)> {
    let out = ts.ok(&["narinfo", root]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap_or((l.trim_end_matches(':'), ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn field(info: &[(String, String)], key: &str) -> String {
    info.iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("narinfo has no {key}: {info:?}"))
        .1
        .clone()
}

fn export_nar(ts: &TestStore, root: &str) -> Vec<u8> {
    ts.ok(&["export-nar", root]).stdout
}

/// For every entry of `store_dir`: export-nar == nix-store --dump, and the narinfo's NarHash
/// and NarSize agree with nix-hash and the dump.
fn check_against_nix(ts: &TestStore, store_dir: &Path, names: &[String]) {
    for name in names {
        let p = store_dir.join(name);
        let want = nix_dump(&p);
        let got = export_nar(ts, name);
        assert!(
            got == want,
            "{name}: export-nar differs from nix-store --dump ({} vs {} bytes)",
            got.len(),
            want.len()
        );
        let info = narinfo(ts, name);
        assert_eq!(
            field(&info, "NarHash"),
            format!("sha256:{}", nix_hash(&p)),
            "{name}"
        );
        assert_eq!(field(&info, "NarSize"), want.len().to_string(), "{name}");
        assert_eq!(field(&info, "StorePath"), format!("/nix/store/{name}"));
        // -o writes the same bytes.
        let out = ts.dir.path().join("out.nar");
        let _ = std::fs::remove_file(&out);
        ts.ok(&["export-nar", name, "-o", out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{name}: export-nar -o differs"
        );
    }
}

/// Imports `dir`'s NAR as written by Nix through a pipe, then checks it comes back unchanged.
fn check_pipe(ts: &TestStore, dir: &Path, name: &str) {
    let script = format!(
        "set -o pipefail; nix-store --dump '{}' | '{}' --store '{}' import-nar - --name '{name}'",
        dir.display(),
        common::granary_bin().display(),
        ts.url()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "pipe import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let cols: Vec<&str> = line.trim().split('\t').collect();
    let want = nix_dump(dir);
    assert_eq!(cols[0], name);
    assert_eq!(cols[1], want.len().to_string());
    assert_eq!(cols[2], format!("sha256:{}", nix_hash(dir)));
    assert!(cols[3].starts_with("sha256-") && cols[3].ends_with('='));
    assert!(
        export_nar(ts, name) == want,
        "{name}: NAR did not come back byte for byte"
    );
}

#[test]
fn generated_tree_matches_nix() {
    if !have_nix() {
        return;
    }
    let ts = TestStore::new();
    let sd = ts.dir.path().join("nixstore");
    let gen = format!("{}-gen", hash_part("gen"));
    let file = format!("{}-script.sh", hash_part("file"));
    let link = format!("{}-link", hash_part("link"));
    let empty = format!("{}-empty", hash_part("empty"));
    gen_tree(&sd.join(&gen), 0);
    // A reference from gen to script.sh, found by scanning as Nix does.
    write(
        &sd.join(&gen).join("uses"),
        format!("exec /nix/store/{file}\n").as_bytes(),
        false,
    );
    write(&sd.join(&file), b"#!/bin/sh\necho hi\n", true);
    std::os::unix::fs::symlink("/nix/store/elsewhere", sd.join(&link)).unwrap();
    std::fs::create_dir(sd.join(&empty)).unwrap();
    // Not store paths: reported and skipped.
    std::fs::create_dir(sd.join("not-a-store-path")).unwrap();
    write(&sd.join(format!("{}-bad name", hash_part("x"))), b"", false);

    let out = ts.ok(&["import-store", sd.to_str().unwrap(), "--jobs", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("skipping not-a-store-path"), "{stderr}");
    assert!(stderr.contains("bad name"), "{stderr}");
    assert!(stderr.contains("imported 4 store paths"), "{stderr}");
    let mut names = vec![gen.clone(), file.clone(), link, empty];
    names.sort();
    let roots = String::from_utf8(ts.ok(&["roots"]).stdout).unwrap();
    assert_eq!(roots.lines().collect::<Vec<_>>(), names);
    check_against_nix(&ts, &sd, &names);
    assert_eq!(field(&narinfo(&ts, &gen), "References"), file);
    assert_eq!(field(&narinfo(&ts, &file), "References"), "");

    // The same tree through a pipe from nix-store --dump.
    let piped = format!("{}-piped", hash_part("piped"));
    check_pipe(&ts, &sd.join(&gen), &piped);
    // References, deriver and signatures given on the command line are rendered.
    let with_meta = format!("{}-meta", hash_part("meta"));
    let nar = ts.dir.path().join("file.nar");
    std::fs::write(&nar, nix_dump(&sd.join(&file))).unwrap();
    let drv = format!("/nix/store/{}-meta.drv", hash_part("drv"));
    ts.ok(&[
        "import-nar",
        nar.to_str().unwrap(),
        "--name",
        &with_meta,
        "--deriver",
        &drv,
        "--sig",
        "cache.example:c2ln",
        "--ca",
        "fixed:r:sha256:abc",
        "--references",
        &format!("/nix/store/{gen}"),
        &file,
    ]);
    let info = narinfo(&ts, &with_meta);
    let mut refs = [gen.clone(), file.clone()];
    refs.sort();
    assert_eq!(field(&info, "References"), refs.join(" "));
    assert_eq!(
        field(&info, "Deriver"),
        drv.trim_start_matches("/nix/store/")
    );
    assert_eq!(field(&info, "Sig"), "cache.example:c2ln");
    assert_eq!(field(&info, "CA"), "fixed:r:sha256:abc");
    // --nar-hash: the right one is accepted, a wrong one refused with no root recorded.
    let h = nix_hash(&sd.join(&file));
    let other = format!("{}-other", hash_part("other"));
    ts.ok(&[
        "import-nar",
        nar.to_str().unwrap(),
        "--name",
        &other,
        "--nar-hash",
        &format!("sha256:{h}"),
    ]);
    let wrong = format!("{}-wrong", hash_part("wrong"));
    let err = ts.fails(&[
        "import-nar",
        nar.to_str().unwrap(),
        "--name",
        &wrong,
        "--nar-hash",
        &"0".repeat(52),
    ]);
    assert!(err.contains("mismatch"), "{err}");
    assert!(!String::from_utf8(ts.ok(&["roots"]).stdout)
        .unwrap()
        .contains(&wrong));
    // A tree imported with plain `granary import` renders the same NAR; it has no narinfo.
    ts.ok(&["import", sd.join(&gen).to_str().unwrap(), "--name", "plain"]);
    assert!(
        export_nar(&ts, "plain") == nix_dump(&sd.join(&gen)),
        "plain import: NAR differs"
    );
    let err = ts.fails(&["narinfo", "plain"]);
    assert!(err.contains("no Nix metadata"), "{err}");
    // An entry that cannot be a NAR (it holds a fifo) fails alone: the others are recorded.
    let sd2 = ts.dir.path().join("nixstore2");
    let good2 = format!("{}-good2", hash_part("good2"));
    let fifo = format!("{}-has-fifo", hash_part("fifo"));
    write(&sd2.join(&good2).join("f"), b"ok", false);
    std::fs::create_dir_all(sd2.join(&fifo)).unwrap();
    let st = Command::new("mkfifo")
        .arg(sd2.join(&fifo).join("pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    let err = ts.fails(&["import-store", sd2.to_str().unwrap()]);
    assert!(
        err.contains(&fifo) && err.contains("fifo") && err.contains("failed 1"),
        "{err}"
    );
    let roots = String::from_utf8(ts.ok(&["roots"]).stdout).unwrap();
    assert!(roots.contains(&good2) && !roots.contains(&fifo), "{roots}");
    // Bad store path names are refused up front.
    let err = ts.fails(&["import-nar", nar.to_str().unwrap(), "--name", "hello"]);
    assert!(err.contains("not a store path basename"), "{err}");
}

/// Copies `src` to `dest` with `cp -a`, so a tree others may change stays fixed during the test.
fn copy(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dest)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {src:?}");
}

/// The newest Python installation under ~/.pyenv/versions, if any.
fn pyenv_python() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let mut versions: Vec<PathBuf> = std::fs::read_dir(Path::new(&home).join(".pyenv/versions"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("bin").is_dir() && !p.is_symlink())
        .collect();
    versions.sort();
    versions.pop()
}

#[test]
fn real_trees_match_nix() {
    if !have_nix() {
        return;
    }
    let ts = TestStore::new();
    let sd = ts.dir.path().join("nixstore");
    let mut names = Vec::new();
    // A subset of /usr/share/doc: every package starting with a-d (a few MB, many small
    // files, gzip files, symlinks between packages).
    let doc = format!("{}-doc", hash_part("doc"));
    let mut picked = 0;
    if let Ok(rd) = std::fs::read_dir("/usr/share/doc") {
        for e in rd.flatten() {
            let n = e.file_name();
            if n.to_str()
                .is_some_and(|s| s.starts_with(['a', 'b', 'c', 'd']))
            {
                copy(&e.path(), &sd.join(&doc).join(&n));
                picked += 1;
            }
        }
    }
    if picked > 0 {
        names.push(doc);
    }
    // A Python installation's bin (symlinks, scripts, binaries) and part of its library.
    if let Some(py) = pyenv_python() {
        let name = format!(
            "{}-python-{}",
            hash_part("py"),
            py.file_name().unwrap().to_str().unwrap()
        );
        copy(&py.join("bin"), &sd.join(&name).join("bin"));
        if let Some(lib) = std::fs::read_dir(py.join("lib")).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .find(|p| p.join("json").is_dir())
        }) {
            for sub in ["json", "email", "importlib"] {
                copy(&lib.join(sub), &sd.join(&name).join("lib").join(sub));
            }
        }
        names.push(name);
    }
    assert!(
        !names.is_empty(),
        "no real tree found (/usr/share/doc or ~/.pyenv)"
    );
    names.sort();
    ts.ok(&["import-store", sd.to_str().unwrap()]);
    check_against_nix(&ts, &sd, &names);
    for n in &names {
        check_pipe(&ts, &sd.join(n), &format!("{}-piped", hash_part(n)));
    }
}

// ---- bad NARs -------------------------------------------------------------------------------

/// A NAR string, written here independently of granary's writer.
fn s(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(b);
    v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
    v
}
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.iter().flat_map(|p| s(p)).collect()
}
fn dir_nar(names: &[&[u8]]) -> Vec<u8> {
    let mut v = cat(&[b"nix-archive-1", b"(", b"type", b"directory"]);
    for n in names {
        v.extend(cat(&[
            b"entry",
            b"(",
            b"name",
            n,
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"x",
            b")",
            b")",
        ]));
    }
    v.extend(s(b")"));
    v
}

/// Runs `import-nar -` on `nar` under a 4 GiB address-space limit; returns (success, stderr).
fn import_stdin(ts: &TestStore, nar: &[u8], name: &str) -> (bool, String) {
    let script = format!(
        "ulimit -v 4194304; exec '{}' --store '{}' import-nar - --name '{name}'",
        common::granary_bin().display(),
        ts.url()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The reader may stop early and close the pipe: a write error is expected then.
    let _ = stdin.write_all(nar);
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean refusal: non-zero exit, one line naming the byte offset, no panic.
fn assert_refused(ts: &TestStore, nar: &[u8], what: &str) -> String {
    let name = format!("{}-bad", hash_part(what));
    let (ok, err) = import_stdin(ts, nar, &name);
    assert!(!ok, "{what}: accepted");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{what}: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: not one line: {err}"
    );
    assert!(err.contains("bad NAR at byte"), "{what}: {err}");
    err
}

#[test]
fn bad_nars_are_refused_and_nothing_is_recorded() {
    if !have_nix() {
        return;
    }
    let ts = TestStore::new();
    // A small NAR written by Nix: a directory, a file, an executable, a symlink, a subdirectory.
    let src = ts.dir.path().join("small");
    write(&src.join("a.txt"), b"hello", false);
    write(&src.join("bin/run"), b"#!/bin/sh\n", true);
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    let good = nix_dump(&src);
    ts.ok(&["roots"]);
    let roots_before = ts.ok(&["roots"]).stdout;

    // Truncated at every token boundary (after each length field and after each padded string).
    let mut boundaries = vec![0usize];
    let mut p = 0;
    while p < good.len() {
        let len = u64::from_le_bytes(good[p..p + 8].try_into().unwrap()) as usize;
        boundaries.push(p + 8);
        p += 8 + len + (8 - len % 8) % 8;
        boundaries.push(p);
    }
    assert_eq!(p, good.len());
    boundaries.pop(); // the whole NAR
    for &b in &boundaries {
        let err = assert_refused(&ts, &good[..b], &format!("cut{b}"));
        assert!(
            err.contains(&format!("bad NAR at byte {b}: truncated")),
            "cut at {b}: {err}"
        );
    }

    let mut wrong_magic = good.clone();
    wrong_magic[8..21].copy_from_slice(b"nix-archive-2");
    assert!(assert_refused(&ts, &wrong_magic, "magic").contains("byte 0"));
    assert_refused(&ts, b"\x0d\0\0\0\0\0\0\0not-a-nar!!!!\0\0\0", "magic2");
    let mut pad = good.clone();
    pad[21] = 0xff; // the magic's padding
    assert!(assert_refused(&ts, &pad, "pad").contains("byte 21: non-zero padding"));
    assert!(assert_refused(&ts, &dir_nar(&[b"b", b"a"]), "unsorted").contains("not sorted"));
    assert!(assert_refused(&ts, &dir_nar(&[b"a", b"a"]), "dup").contains("duplicate"));
    for (what, name) in [
        ("dotdot", &b".."[..]),
        ("dot", b"."),
        ("slash", b"a/b"),
        ("nul", b"a\0b"),
        ("empty", b""),
    ] {
        assert_refused(&ts, &dir_nar(&[name]), what);
    }
    // Length fields of 2^62 and 2^33 (8 GiB, over the address-space limit) where a name, a
    // symlink target, a keyword and file contents go: refused or truncated, never allocated.
    for len in [1u64 << 62, 1 << 33] {
        for (what, prefix) in [
            ("magic", Vec::new()),
            (
                "name",
                cat(&[
                    b"nix-archive-1",
                    b"(",
                    b"type",
                    b"directory",
                    b"entry",
                    b"(",
                    b"name",
                ]),
            ),
            (
                "target",
                cat(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]),
            ),
            (
                "contents",
                cat(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]),
            ),
        ] {
            let mut v = prefix;
            v.extend_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&[b'a'; 4096]);
            assert_refused(&ts, &v, &format!("{what}{len}"));
        }
    }
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 8]);
    assert!(assert_refused(&ts, &trailing, "trailing").contains("trailing bytes"));

    assert_eq!(
        ts.ok(&["roots"]).stdout,
        roots_before,
        "a bad NAR recorded a root"
    );
    // The good NAR is accepted by the same path, so the refusals above are not vacuous.
    let (ok, err) = import_stdin(&ts, &good, &format!("{}-good", hash_part("good")));
    assert!(ok, "{err}");
}

// ---- narinfo read back by Nix -----------------------------------------------------------------

fn nix_cmd(args: &[&str]) -> std::process::Output {
    Command::new("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(args)
        .output()
        .expect("run nix")
}

/// A file:// binary cache built from `granary narinfo` and `export-nar` is read by the real
/// `nix`: `path-info` sees our hash, size and references, `store verify` re-hashes our NARs
/// and agrees, and a NAR corrupted afterwards is caught (so the check is not vacuous).
#[test]
fn nix_reads_narinfo_and_nar_from_a_binary_cache() {
    if !have_nix() {
        return;
    }
    let ts = TestStore::new();
    let sd = ts.dir.path().join("nixstore");
    let lib = format!("{}-lib", hash_part("lib"));
    let app = format!("{}-app", hash_part("app"));
    write(&sd.join(&lib).join("lib.txt"), b"library\n", false);
    write(
        &sd.join(&app).join("bin/app"),
        format!("#!/bin/sh\n/nix/store/{lib}/lib.txt\n").as_bytes(),
        true,
    );
    ts.ok(&["import-store", sd.to_str().unwrap()]);

    let cache = ts.dir.path().join("cache");
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let mut nar_files = Vec::new();
    for name in [&lib, &app] {
        let info = String::from_utf8(ts.ok(&["narinfo", name]).stdout).unwrap();
        std::fs::write(cache.join(format!("{}.narinfo", &name[..32])), &info).unwrap();
        let url = info
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_string();
        ts.ok(&["export-nar", name, "-o", cache.join(&url).to_str().unwrap()]);
        nar_files.push(cache.join(url));
    }
    let store_url = format!("file://{}", cache.display());
    let app_path = format!("/nix/store/{app}");
    let out = nix_cmd(&["path-info", "--json", "--store", &store_url, &app_path]);
    assert!(
        out.status.success(),
        "nix path-info: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    let size_and_sha256 = |name: &str| {
        let nar = nix_dump(&sd.join(name));
        let sum: [u8; 32] = {
            use std::io::Read;
            let mut child = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&nar).unwrap();
            let mut hex = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut hex)
                .unwrap();
            child.wait().unwrap();
            let hex = &hex[..64];
            std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        };
        (nar.len(), sum)
    };
    let (size, sum) = size_and_sha256(&app);
    let sri = format!("sha256-{}", base64(&sum));
    assert!(
        json.contains(&format!("\"narHash\":\"{sri}\"")),
        "{json} lacks {sri}"
    );
    assert!(json.contains(&format!("\"narSize\":{size}")), "{json}");
    assert!(
        json.contains(&format!("\"references\":[\"/nix/store/{lib}\"]")),
        "{json}"
    );

    for name in [&lib, &app] {
        let out = nix_cmd(&[
            "store",
            "verify",
            "--no-trust",
            "--store",
            &store_url,
            &format!("/nix/store/{name}"),
        ]);
        assert!(
            out.status.success(),
            "nix store verify {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Flip one content byte of lib's NAR: Nix must now refuse it.
    let mut nar = std::fs::read(&nar_files[0]).unwrap();
    let at = nar.windows(8).position(|w| w == b"library\n").unwrap();
    nar[at] = b'L';
    std::fs::write(&nar_files[0], nar).unwrap();
    let out = nix_cmd(&[
        "store",
        "verify",
        "--no-trust",
        "--store",
        &store_url,
        &format!("/nix/store/{lib}"),
    ]);
    assert!(
        !out.status.success(),
        "nix accepted a corrupted NAR: the check above is vacuous"
    );
}

/// Standard base64 with padding (for SRI), written here so the test does not trust granary's.
fn base64(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
