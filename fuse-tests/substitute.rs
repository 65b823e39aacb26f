//! Substitution from a Nix binary cache written by real Nix (`nix copy --to file://`, xz, a key
//! from `nix-store --generate-binary-cache-key`), served by a plain HTTP server on loopback:
//! a mount fetches a missing store path on first lookup, verified, deduplicated and once;
//! every kind of bad cache records nothing and leaves the mount serving; `serve-cache` with a
//! substituter is a caching proxy `nix copy` can read from. Nix runs against chroot stores in
//! temp dirs, where nothing is built.

#[path = "../tests/binary_cache_common/mod.rs"]
mod binary_cache_common;
mod common;
#[path = "../tests/file_server/mod.rs"]
mod file_server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use binary_cache_common::{have_nix, nix_hash, real, Nix, Server};
use common::*;
use file_server::{FileServer, Mode};

/// Three store paths in a chroot store and binary caches of them.
struct Fixture {
    nix: Nix,
    src_store: PathBuf,
    /// Full store paths: `b` holds `a`'s files plus one new file; `c` is unrelated.
    a: String,
    b: String,
    c: String,
    /// Size of the file only `b` has.
    b_new: u64,
    /// xz-compressed, signed cache; and the same uncompressed.
    cache: PathBuf,
    cache_none: PathBuf,
    pk: String,
    other_pk: String,
}

fn fixture() -> Fixture {
    let nix = Nix::new();
    let d = nix.dir.path();
    let work = d.join("src");
    gen_tree(&work.join("pkg-a"), 1 << 20);
    copy_tree(&work.join("pkg-a"), &work.join("pkg-b"));
    let b_new = 1_500_000;
    write(
        &work.join("pkg-b/share/new.bin"),
        &noise(b_new, 4242),
        false,
    );
    gen_tree(&work.join("pkg-c"), 0);
    write(&work.join("pkg-c/marker"), b"c\n", false);
    let src_store = nix.chroot("src-store");
    let a = nix.add(&src_store, &work.join("pkg-a"));
    let b = nix.add(&src_store, &work.join("pkg-b"));
    let c = nix.add(&src_store, &work.join("pkg-c"));
    let key = |n: &str| {
        let (sk, pk) = (d.join(format!("{n}.sk")), d.join(format!("{n}.pk")));
        nix.ok(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                "granary-test-1",
                sk.to_str().unwrap(),
                pk.to_str().unwrap(),
            ],
        );
        (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
    };
    let (sk, pk) = key("good");
    let (_, other_pk) = key("other");
    let cache = d.join("cache");
    let cache_none = d.join("cache-none");
    for (dir, comp) in [(&cache, "xz"), (&cache_none, "none")] {
        let to = format!(
            "file://{}?compression={comp}&secret-key={}",
            dir.display(),
            sk.display()
        );
        nix.ok(
            "nix",
            &[
                "copy",
                "--from",
                src_store.to_str().unwrap(),
                "--to",
                &to,
                &a,
                &b,
                &c,
            ],
        );
    }
    Fixture {
        nix,
        src_store,
        a,
        b,
        c,
        b_new: b_new as u64,
        cache,
        cache_none,
        pk,
        other_pk,
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap()
}

fn hash_part(p: &str) -> &str {
    &base(p)[..32]
}

/// A field of the narinfo `cache` holds for store path `p`.
fn narinfo_field(cache: &Path, p: &str, key: &str) -> String {
    let text = std::fs::read_to_string(cache.join(format!("{}.narinfo", hash_part(p)))).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .to_string()
}

fn roots(ts: &TestStore) -> Vec<String> {
    String::from_utf8(ts.ok(&["roots"]).stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn unique_chunk_bytes(ts: &TestStore) -> u64 {
    let out = String::from_utf8(ts.ok(&["info", "--json"]).stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["unique_chunk_bytes"].as_u64().unwrap()
}

/// A store holding one ordinary root, "local", to show a mount keeps serving.
fn store_with_local_root() -> TestStore {
    let ts = TestStore::new();
    let src = ts.dir.path().join("local");
    write(&src.join("file"), b"still here\n", false);
    ts.ok(&["import", "--name", "local", src.to_str().unwrap()]);
    ts
}

#[test]
fn a_missing_path_is_substituted_on_first_lookup_deduplicated_and_once() {
    require_fuse!();
    if !have_nix() {
        return;
    }
    let f = fixture();
    let server = FileServer::start(&f.cache);
    let ts = store_with_local_root();
    let m = Mount::start(
        &ts.url(),
        &[
            "--substituter",
            &server.url(),
            "--trusted-public-key",
            &f.pk,
        ],
    );
    assert!(!roots(&ts).contains(&base(&f.a).to_string()));
    // First stat fetches it; the tree hashes as the narinfo says.
    let a_mnt = m.path().join(base(&f.a));
    assert!(std::fs::metadata(&a_mnt).unwrap().is_dir());
    let want = narinfo_field(&f.cache, &f.a, "NarHash");
    assert_eq!(format!("sha256:{}", nix_hash(&a_mnt)), want);
    assert_eq!(nix_hash(&a_mnt), nix_hash(&real(&f.src_store, &f.a)));
    assert!(roots(&ts).contains(&base(&f.a).to_string()));
    // The root carries the cache's metadata (its signature included).
    let info = String::from_utf8(ts.ok(&["narinfo", base(&f.a)]).stdout).unwrap();
    assert!(
        info.contains(&format!("Sig: {}", narinfo_field(&f.cache, &f.a, "Sig"))),
        "{info}"
    );

    // A second path sharing a's files adds only the chunks of its one new file.
    let before = unique_chunk_bytes(&ts);
    let b_mnt = m.path().join(base(&f.b));
    assert_eq!(nix_hash(&b_mnt), nix_hash(&real(&f.src_store, &f.b)));
    let added = unique_chunk_bytes(&ts) - before;
    assert_eq!(added, f.b_new, "b added {added} unique chunk bytes");

    // Eight concurrent first lookups of c: one narinfo request, one NAR download.
    let c_mnt = m.path().join(base(&f.c));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let p = c_mnt.clone();
            std::thread::spawn(move || std::fs::metadata(p).map(|m| m.is_dir()))
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().unwrap());
    }
    let nar = format!("/{}", narinfo_field(&f.cache, &f.c, "URL"));
    assert_eq!(server.hits(&nar), 1, "NAR downloads of c");
    assert_eq!(
        server.hits(&format!("/{}.narinfo", hash_part(&f.c))),
        1,
        "narinfo requests for c"
    );
    // A path no cache has: ENOENT, asked once, then remembered.
    let absent = m.path().join(format!("{}-nothing", "0".repeat(32)));
    for _ in 0..3 {
        let e = std::fs::metadata(&absent).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    assert_eq!(server.hits(&format!("/{}.narinfo", "0".repeat(32))), 1);
}

/// What a bad cache does to a mount: the lookup fails within `bound`, the log says `why`,
/// nothing is recorded, and the mount keeps serving.
fn refused(ts: &TestStore, args: &[&str], path: &str, bound: Duration, why: &str) {
    let m = Mount::start(&ts.url(), args);
    let t0 = Instant::now();
    let r = std::fs::metadata(m.path().join(base(path)));
    let took = t0.elapsed();
    assert!(r.is_err(), "{args:?}: the lookup succeeded");
    assert!(took < bound, "{args:?}: took {took:?}");
    assert!(
        !roots(ts).contains(&base(path).to_string()),
        "{args:?}: recorded"
    );
    assert_eq!(
        std::fs::read(m.path().join("local/file")).unwrap(),
        b"still here\n"
    );
    let log = m.stderr();
    assert!(log.contains(why), "{args:?}: the log lacks {why:?}: {log}");
    drop(m);
}

#[test]
fn bad_caches_record_nothing_and_the_mount_keeps_serving() {
    require_fuse!();
    if !have_nix() {
        return;
    }
    let f = fixture();
    let ts = store_with_local_root();
    let quick = Duration::from_secs(10);
    let variant = |name: &str, from: &Path| -> PathBuf {
        let d = f.nix.dir.path().join(name);
        copy_tree(from, &d);
        d
    };

    // Unknown key.
    let s = FileServer::start(&f.cache);
    let url = s.url();
    refused(
        &ts,
        &["--substituter", &url, "--trusted-public-key", &f.other_pk],
        &f.a,
        quick,
        "no valid signature by a trusted key",
    );

    // A signature that does not verify.
    let bad_sig = variant("bad-sig", &f.cache);
    let ni = bad_sig.join(format!("{}.narinfo", hash_part(&f.a)));
    let text = std::fs::read_to_string(&ni).unwrap();
    let sig = narinfo_field(&f.cache, &f.a, "Sig");
    let mut forged = sig.clone().into_bytes();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    std::fs::write(
        &ni,
        text.replace(&sig, std::str::from_utf8(&forged).unwrap()),
    )
    .unwrap();
    let s = FileServer::start(&bad_sig);
    refused(
        &ts,
        &["--substituter", &s.url(), "--trusted-public-key", &f.pk],
        &f.a,
        quick,
        "no valid signature by a trusted key",
    );

    // A narinfo that names another path (a's narinfo served as c's).
    let other = variant("other-path", &f.cache);
    std::fs::copy(
        other.join(format!("{}.narinfo", hash_part(&f.a))),
        other.join(format!("{}.narinfo", hash_part(&f.c))),
    )
    .unwrap();
    let s = FileServer::start(&other);
    refused(
        &ts,
        &["--substituter", &s.url(), "--trusted-public-key", &f.pk],
        &f.c,
        quick,
        "names",
    );

    // A tampered NAR (uncompressed, so it still parses): NarHash mismatch.
    let tampered = variant("tampered", &f.cache_none);
    let nar = tampered.join(narinfo_field(&f.cache_none, &f.a, "URL"));
    let mut bytes = std::fs::read(&nar).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&nar, &bytes).unwrap();
    let s = FileServer::start(&tampered);
    refused(
        &ts,
        &["--substituter", &s.url(), "--trusted-public-key", &f.pk],
        &f.a,
        quick,
        "the narinfo says",
    );

    // A truncated NAR file.
    let truncated = variant("truncated", &f.cache);
    let nar = truncated.join(narinfo_field(&f.cache, &f.a, "URL"));
    let len = std::fs::metadata(&nar).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&nar)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let s = FileServer::start(&truncated);
    refused(
        &ts,
        &["--substituter", &s.url(), "--trusted-public-key", &f.pk],
        &f.a,
        quick,
        "nothing recorded",
    );

    // A cache that is down.
    let down = format!("http://127.0.0.1:{}", free_port());
    refused(
        &ts,
        &["--substituter", &down, "--trusted-public-key", &f.pk],
        &f.a,
        quick,
        "Connection refused",
    );

    // A cache that stalls in the middle of the NAR: the lookup fails once the stall outlasts
    // --substitute-timeout.
    let s = FileServer::start(&f.cache);
    s.set_mode(Mode::StallNarAfter(1000));
    refused(
        &ts,
        &[
            "--substituter",
            &s.url(),
            "--trusted-public-key",
            &f.pk,
            "--substitute-timeout",
            "2s",
        ],
        &f.a,
        quick,
        "timed out",
    );
    // And signatures are required unless the user says otherwise.
    let mp = ts.dir.path().join("mp");
    std::fs::create_dir_all(&mp).unwrap();
    let out = ts
        .cmd()
        .arg("mount")
        .arg(&mp)
        .args(["--substituter", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trusted-public-key"));
}

#[test]
fn serve_cache_with_a_substituter_is_a_caching_proxy() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let upstream = FileServer::start(&f.cache);
    let ts = TestStore::new();
    let proxy = Server::start(
        &ts,
        &[
            "--substituter",
            &upstream.url(),
            "--trusted-public-key",
            &f.pk,
        ],
    );
    let dest = f.nix.chroot("dest");
    let out = f.nix.run(
        "nix",
        &[
            "copy",
            "--option",
            "require-sigs",
            "true",
            "--option",
            "trusted-public-keys",
            &f.pk,
            "--from",
            &proxy.url(),
            "--to",
            dest.to_str().unwrap(),
            &f.b,
        ],
    );
    assert!(
        out.status.success(),
        "nix copy --from the proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        nix_hash(&real(&dest, &f.b)),
        nix_hash(&real(&f.src_store, &f.b))
    );
    assert!(roots(&ts).contains(&base(&f.b).to_string()));
    // Served from the store from now on: no second download upstream.
    let dest2 = f.nix.chroot("dest2");
    f.nix.ok(
        "nix",
        &[
            "copy",
            "--no-check-sigs",
            "--from",
            &proxy.url(),
            "--to",
            dest2.to_str().unwrap(),
            &f.b,
        ],
    );
    assert_eq!(upstream.hits_under("/nar/"), 1);
}
