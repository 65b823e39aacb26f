//! `granary serve-cache` against the real Nix client (Debian `nix-bin`): `nix store ls/cat`
//! read what granary holds, `nix copy --from` fetches it (with signature checking on), `nix
//! copy --to` fills it, and uploads that do not match their narinfo are refused with nothing
//! recorded. Local Nix stores live in temp dirs (chroot stores), the server is the real
//! binary on a loopback port it picks itself. Skips loudly without Nix unless
//! GRANARY_REQUIRE_NIX=1.

mod binary_cache_common;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use binary_cache_common::{have_nix, http, nix_hash, real, Nix, Server};
use common::{gen_tree, write, TestStore};

fn header<'a>(hs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    hs.iter().find(|(h, _)| h == k).map(|(_, v)| v.as_str())
}

fn roots(ts: &TestStore) -> Vec<String> {
    String::from_utf8(ts.ok(&["roots"]).stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Two store paths in a chroot store, `dep` referring to `lib`, imported into granary.
struct Fixture {
    nix: Nix,
    src_store: PathBuf,
    lib: String,
    dep: String,
    ts: TestStore,
}

fn fixture() -> Fixture {
    let nix = Nix::new();
    let work = nix.dir.path().join("src");
    gen_tree(&work.join("lib"), 0);
    let src_store = nix.chroot("src-store");
    let lib = nix.add(&src_store, &work.join("lib"));
    write(
        &work.join("dep/bin/run"),
        format!("#!/bin/sh\nexec {lib}/bin/tool\n").as_bytes(),
        true,
    );
    let dep = nix.add(&src_store, &work.join("dep"));
    let ts = TestStore::new();
    ts.ok(&[
        "import-store",
        real(&src_store, "/nix/store").to_str().unwrap(),
        // `nix-store --add` registers no references; scanning finds dep -> lib, which is the
        // closure these tests copy.
        "--no-db",
    ]);
    Fixture {
        nix,
        src_store,
        lib,
        dep,
        ts,
    }
}

#[test]
fn nix_reads_and_copies_from_the_cache() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let keys = f.nix.dir.path();
    let (sk, pk) = (keys.join("sk"), keys.join("pk"));
    let (sk2, pk2) = (keys.join("sk2"), keys.join("pk2"));
    f.nix.ok(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "granary-test-1",
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    f.nix.ok(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            "granary-test-1",
            sk2.to_str().unwrap(),
            pk2.to_str().unwrap(),
        ],
    );
    let server = Server::start(&f.ts, &["--sign-key", sk.to_str().unwrap()]);
    let url = server.url();

    // The cache's advertisement, and a fast 404 for a path it does not have.
    let (st, _, body) = http(server.port, "GET", "/nix-cache-info", &[], b"");
    assert_eq!(st, 200);
    let info = String::from_utf8(body).unwrap();
    assert!(
        info.contains("StoreDir: /nix/store\n") && info.contains("WantMassQuery: 1\n"),
        "{info}"
    );
    let (st, _, _) = http(
        server.port,
        "GET",
        &format!("/{}.narinfo", "0".repeat(32)),
        &[],
        b"",
    );
    assert_eq!(st, 404);

    // ls and cat print what the source store holds (Nix reading its own store is the oracle).
    let src = f.src_store.to_str().unwrap();
    for p in [&f.lib, &f.dep] {
        let ours = f.nix.ok("nix", &["store", "ls", "--store", &url, "-lR", p]);
        let theirs = f.nix.ok("nix", &["store", "ls", "--store", src, "-lR", p]);
        assert_eq!(ours, theirs, "nix store ls of {p}");
        assert!(ours.contains("./multi/two-meg") || p == &f.dep, "{ours}");
    }
    for file in ["hello.txt", "bin/tool", "a/b/c/d/deep.txt"] {
        let p = format!("{}/{file}", f.lib);
        let ours = f.nix.ok("nix", &["store", "cat", "--store", &url, &p]);
        let theirs = std::fs::read_to_string(real(&f.src_store, &p)).unwrap();
        assert_eq!(ours, theirs, "nix store cat {p}");
    }

    // HEAD and Range on the NAR the narinfo points at, against nix-store --dump.
    let hash = &f.lib["/nix/store/".len()..][..32];
    let (st, _, body) = http(server.port, "GET", &format!("/{hash}.narinfo"), &[], b"");
    assert_eq!(st, 200);
    let narinfo = String::from_utf8(body).unwrap();
    assert!(narinfo.contains("Sig: granary-test-1:"), "{narinfo}");
    let nar_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL line")
        .to_string();
    let dump = Command::new("nix-store")
        .arg("--dump")
        .arg(real(&f.src_store, &f.lib))
        .output()
        .unwrap()
        .stdout;
    let (st, hs, body) = http(server.port, "HEAD", &format!("/{nar_url}"), &[], b"");
    assert_eq!(st, 200);
    assert_eq!(
        header(&hs, "content-length"),
        Some(dump.len().to_string().as_str())
    );
    assert!(body.is_empty());
    let (st, _, body) = http(server.port, "GET", &format!("/{nar_url}"), &[], b"");
    assert_eq!((st, body.len()), (200, dump.len()));
    assert!(body == dump, "served NAR differs from nix-store --dump");
    let (a, b) = (1000usize, 70_000usize);
    let range = format!("bytes={a}-{b}");
    let (st, hs, body) = http(
        server.port,
        "GET",
        &format!("/{nar_url}"),
        &[("Range", &range)],
        b"",
    );
    assert_eq!(st, 206);
    assert_eq!(
        header(&hs, "content-range"),
        Some(format!("bytes {a}-{b}/{}", dump.len()).as_str())
    );
    assert!(body == dump[a..=b], "range {a}-{b} differs");
    let range = format!("bytes={}-", dump.len());
    let (st, _, _) = http(
        server.port,
        "GET",
        &format!("/{nar_url}"),
        &[("Range", &range)],
        b"",
    );
    assert_eq!(st, 416);

    // nix copy the closure with signature checking on: the right key succeeds and the copy
    // hashes like the original; a key of the same name but other secret fails.
    let copy = |pk: &Path, dest: &Path| {
        let trusted = std::fs::read_to_string(pk).unwrap();
        f.nix.run(
            "nix",
            &[
                "copy",
                "--option",
                "require-sigs",
                "true",
                "--option",
                "trusted-public-keys",
                trusted.trim(),
                "--from",
                &url,
                "--to",
                dest.to_str().unwrap(),
                &f.dep,
            ],
        )
    };
    let dest = f.nix.chroot("dest-store");
    let out = copy(&pk, &dest);
    assert!(
        out.status.success(),
        "nix copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in [&f.lib, &f.dep] {
        assert_eq!(
            nix_hash(&real(&dest, p)),
            nix_hash(&real(&f.src_store, p)),
            "{p}"
        );
    }
    let bad_dest = f.nix.chroot("bad-dest");
    let out = copy(&pk2, &bad_dest);
    assert!(!out.status.success(), "nix copy accepted a wrong key");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signature"), "{err}");
    assert!(!real(&bad_dest, &f.lib).exists());

    // And into a file:// binary cache.
    let file_cache = f.nix.dir.path().join("file-cache");
    let to = format!("file://{}", file_cache.display());
    f.nix
        .ok("nix", &["copy", "--from", &url, "--to", &to, &f.lib]);
    assert!(file_cache.join(format!("{hash}.narinfo")).exists());
}

#[test]
fn nix_copy_to_fills_the_store() {
    if !have_nix() {
        return;
    }
    let nix = Nix::new();
    let work = nix.dir.path().join("src");
    gen_tree(&work.join("one"), 0);
    write(&work.join("two/file"), b"second path\n", false);
    let src_store = nix.chroot("src-store");
    let one = nix.add(&src_store, &work.join("one"));
    let two = nix.add(&src_store, &work.join("two"));
    let ts = TestStore::new();
    let server = Server::start(&ts, &[]);
    let src = src_store.to_str().unwrap();
    // Nix's default (xz) and uncompressed uploads.
    nix.ok("nix", &["copy", "--from", src, "--to", &server.url(), &one]);
    let none = format!("{}?compression=none", server.url());
    nix.ok("nix", &["copy", "--from", src, "--to", &none, &two]);

    let names = roots(&ts);
    for p in [&one, &two] {
        let base = &p["/nix/store/".len()..];
        assert!(names.iter().any(|n| n == base), "{base} not in {names:?}");
        // The stored tree renders the NAR Nix hashed.
        let info = String::from_utf8(ts.ok(&["narinfo", base]).stdout).unwrap();
        let want = format!("NarHash: sha256:{}\n", nix_hash(&real(&src_store, p)));
        assert!(info.contains(&want), "{info}");
        let exported = ts.dir.path().join(format!("export-{base}"));
        ts.ok(&["export", base, exported.to_str().unwrap()]);
        assert_eq!(nix_hash(&exported), nix_hash(&real(&src_store, p)));
    }
    // Served back to Nix right away.
    let back = nix.chroot("back");
    nix.ok(
        "nix",
        &[
            "copy",
            "--no-check-sigs",
            "--from",
            &server.url(),
            "--to",
            back.to_str().unwrap(),
            &one,
        ],
    );
    assert_eq!(
        nix_hash(&real(&back, &one)),
        nix_hash(&real(&src_store, &one))
    );
}

fn nix32_sha256_of(path: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256", "--flat", "--base32"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn mismatched_uploads_are_refused_and_record_nothing() {
    if !have_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    gen_tree(&work.path().join("t"), 0);
    let nar = Command::new("nix-store")
        .arg("--dump")
        .arg(work.path().join("t"))
        .output()
        .unwrap()
        .stdout;
    let nar_file = work.path().join("t.nar");
    std::fs::write(&nar_file, &nar).unwrap();
    let h = nix32_sha256_of(&nar_file);
    let mut other = nar.clone();
    let at = other.len() - 200;
    other[at] ^= 1; // inside file contents near the end: still a valid NAR
    let other_file = work.path().join("other.nar");
    std::fs::write(&other_file, &other).unwrap();
    let h_other = nix32_sha256_of(&other_file);

    let ts = TestStore::new();
    let server = Server::start(&ts, &[]);
    let port = server.port;
    let base = "0123456789abcdfghijklmnpqrsvwxyz-upload";
    let narinfo = |nar_hash: &str, size: usize, url_hash: &str| {
        format!(
            "StorePath: /nix/store/{base}\nURL: nar/{url_hash}.nar\nCompression: none\n\
             NarHash: sha256:{nar_hash}\nNarSize: {size}\nReferences: \n"
        )
    };
    let put_info = |text: String| {
        http(
            port,
            "PUT",
            "/0123456789abcdfghijklmnpqrsvwxyz.narinfo",
            &[],
            text.as_bytes(),
        )
    };

    // A NAR whose content does not match the hash in its name.
    let (st, _, body) = http(port, "PUT", &format!("/nar/{h}.nar"), &[], &other);
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    // Not a NAR at all.
    let (st, _, _) = http(port, "PUT", &format!("/nar/{h}.nar"), &[], b"not a nar");
    assert_eq!(st, 400);
    // A narinfo whose NAR never arrived.
    let (st, _, _) = put_info(narinfo(&h, nar.len(), &h));
    assert_eq!(st, 400);

    // The NAR arrives; a narinfo claiming another NarHash, then another NarSize, is refused.
    let (st, _, _) = http(port, "PUT", &format!("/nar/{h}.nar"), &[], &nar);
    assert_eq!(st, 200);
    let (st, _, body) = put_info(narinfo(&h_other, nar.len(), &h));
    assert_eq!(st, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not recorded"));
    let (st, _, _) = http(port, "PUT", &format!("/nar/{h}.nar"), &[], &nar);
    assert_eq!(st, 200);
    let (st, _, _) = put_info(narinfo(&h, nar.len() + 8, &h));
    assert_eq!(st, 400);
    assert!(
        roots(&ts).is_empty(),
        "a root was recorded: {:?}",
        roots(&ts)
    );
    let (st, _, _) = http(
        port,
        "GET",
        "/0123456789abcdfghijklmnpqrsvwxyz.narinfo",
        &[],
        b"",
    );
    assert_eq!(st, 404);

    // The matching pair is accepted, which shows the refusals above were about the mismatch.
    let (st, _, _) = http(port, "PUT", &format!("/nar/{h}.nar"), &[], &nar);
    assert_eq!(st, 200);
    let (st, _, body) = put_info(narinfo(&h, nar.len(), &h));
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(roots(&ts), vec![base.to_string()]);
    let (st, _, body) = http(port, "GET", &format!("/nar/{h}.nar"), &[], b"");
    assert_eq!(st, 200);
    assert!(body == nar);
}

#[test]
fn token_guards_the_cache() {
    if !have_nix() {
        return;
    }
    let f = fixture();
    let token_file = f.nix.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let tf = token_file.to_str().unwrap();
    let hash = &f.lib["/nix/store/".len()..][..32];
    let narinfo = format!("/{hash}.narinfo");

    // Non-loopback without a token: refused before binding.
    let out =
        f.ts.cmd()
            .args(["serve-cache", "--listen", "0.0.0.0:0"])
            .output()
            .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --token-file"));

    let server = Server::start(&f.ts, &["--token-file", tf]);
    let (st, hs, _) = http(server.port, "GET", &narinfo, &[], b"");
    assert_eq!(st, 401);
    assert!(header(&hs, "www-authenticate").is_some());
    let (st, _, _) = http(
        server.port,
        "GET",
        &narinfo,
        &[("Authorization", "Bearer wrong")],
        b"",
    );
    assert_eq!(st, 401);
    let (st, _, _) = http(
        server.port,
        "GET",
        &narinfo,
        &[("Authorization", "Bearer s3cret-token")],
        b"",
    );
    assert_eq!(st, 200);
    // Nix sends the token as a netrc password.
    let netrc = f.nix.dir.path().join("netrc");
    std::fs::write(
        &netrc,
        "machine 127.0.0.1 login nix password s3cret-token\n",
    )
    .unwrap();
    let out = f.nix.ok(
        "nix",
        &[
            "store",
            "cat",
            "--option",
            "netrc-file",
            netrc.to_str().unwrap(),
            "--store",
            &server.url(),
            &format!("{}/hello.txt", f.lib),
        ],
    );
    assert_eq!(out, "hello\n");
    drop(server);

    // --read-only refuses uploads whatever the credentials.
    let server = Server::start(&f.ts, &["--read-only"]);
    let (st, _, _) = http(server.port, "PUT", "/nar/x.nar", &[], b"junk");
    assert_eq!(st, 403);
    let (st, _, _) = http(server.port, "GET", &narinfo, &[], b"");
    assert_eq!(st, 200);
    drop(server);

    // Anonymous reads, token-only writes.
    let server = Server::start(&f.ts, &["--token-file", tf, "--anonymous-read"]);
    let (st, _, _) = http(server.port, "GET", &narinfo, &[], b"");
    assert_eq!(st, 200);
    let (st, _, _) = http(server.port, "PUT", "/nar/x.nar", &[], b"junk");
    assert_eq!(st, 401);
    let (st, _, _) = http(
        server.port,
        "PUT",
        "/nar/x.nar",
        &[("Authorization", "Bearer s3cret-token")],
        b"junk",
    );
    assert_eq!(st, 400);
}

#[test]
fn corrupt_store_cuts_the_transfer_short() {
    if !have_nix() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let base = "0123456789abcdfghijklmnpqrsvwxyz-victim";
    let victim = common::noise(10_000, 5); // one chunk
    write(&work.path().join(base).join("victim.bin"), &victim, false);
    let ts = TestStore::new();
    ts.ok(&["import-store", work.path().to_str().unwrap()]);
    let hex = blake3::hash(&victim).to_hex().to_string();
    ts.tamper("chunks", &hex, |raw| {
        let mid = raw.len() / 2;
        for b in &mut raw[mid..mid + 16] {
            *b ^= 0xa5;
        }
    });

    let server = Server::start(&ts, &[]);
    let (st, _, info) = http(
        server.port,
        "GET",
        "/0123456789abcdfghijklmnpqrsvwxyz.narinfo",
        &[],
        b"",
    );
    assert_eq!(st, 200);
    let info = String::from_utf8(info).unwrap();
    let url = info.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    let size: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("NarSize: "))
        .unwrap()
        .parse()
        .unwrap();
    // Read what comes until the server closes (or resets) the connection.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET /{url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers")
        + 4;
    let body = &raw[end..];
    assert!(
        body.len() < size,
        "a corrupt store served the whole NAR ({size} bytes)"
    );
}
