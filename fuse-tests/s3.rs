//! The `s3://` backend and the disk cache, against a real S3-compatible server (`moto_server`,
//! from PyPI `moto[server]`) started on loopback by each test and killed on drop.
//!
//! Covers: import, roots, ls, cat, export, export-nar and a FUSE mount over `s3://` (clean
//! `diff -r`); a `file://` store copied object by object into a bucket is a valid `s3://`
//! store; a second process sees the roots the first wrote; a missing bucket, a dead endpoint
//! and a stalled endpoint give a one-line error in bounded time. Disk cache: a cold read fills
//! it; with the server killed, cached files are still served (CLI and mount) and uncached
//! chunks fail cleanly (EIO in the mount); the cache stays under --cache-max while reading a
//! corpus several times larger; a corrupt entry is dropped and refetched; two processes
//! sharing a cache dir read concurrently and both get right bytes.

mod common;
#[path = "../tests/moto/mod.rs"]
mod moto;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use moto::{set_credentials, Moto};

fn granary(url: &str, args: &[&str]) -> Output {
    let mut c = Command::new(granary_bin());
    c.arg("--store").arg(url).args(args).stdin(Stdio::null());
    run_bounded(c, Duration::from_secs(120))
}

/// Runs a command, killing it if it outlives `limit` (then the output says so).
fn run_bounded(mut c: Command, limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    c.stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap());
    let mut child = c.spawn().expect("spawn granary");
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let st = child.wait().unwrap();
            let mut err = std::fs::read(&e).unwrap();
            err.extend_from_slice(format!("\n[killed after {limit:?}]").as_bytes());
            return Output {
                status: st,
                stdout: std::fs::read(&o).unwrap(),
                stderr: err,
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&o).unwrap(),
        stderr: std::fs::read(&e).unwrap(),
    }
}

fn ok(url: &str, args: &[&str]) -> Vec<u8> {
    let out = granary(url, args);
    assert!(
        out.status.success(),
        "granary {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn fails(url: &str, args: &[&str]) -> String {
    let out = granary(url, args);
    assert!(
        !out.status.success(),
        "granary {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn round_trip_over_s3_and_a_copied_file_store() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("granary");
    let url = moto.url("granary/some/prefix");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 3 << 20);

    let out = ok(&url, &["import", "--name", "t", src.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out).contains("src"));
    // Second processes see what the first wrote.
    assert_eq!(ok(&url, &["roots"]), b"t\n");
    let ls = String::from_utf8(ok(&url, &["ls", "t"])).unwrap();
    for name in ["hello.txt", "big.bin", "sizes", "rel-link"] {
        assert!(
            ls.lines().any(|l| l == name),
            "{name} missing from ls: {ls}"
        );
    }
    assert_eq!(ok(&url, &["cat", "t/hello.txt"]), b"hello\n");
    assert_eq!(
        ok(&url, &["cat", "t/big.bin"]),
        std::fs::read(src.join("big.bin")).unwrap()
    );
    let dest = tmp.path().join("dest");
    ok(&url, &["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);

    // export-nar from S3 equals export-nar from a local store of the same tree.
    let local = TestStore::new();
    local.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let nar_local = local.ok(&["export-nar", "t"]).stdout;
    let nar_s3 = ok(&url, &["export-nar", "t"]);
    assert!(nar_s3.len() > 3 << 20);
    assert!(
        nar_s3 == nar_local,
        "export-nar differs between s3:// and file://"
    );

    // The objects are where the file:// layout puts them.
    let (status, body) = moto
        .http("GET", "/granary?list-type=2&prefix=some/prefix/roots/", &[])
        .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("some/prefix/roots/t"));

    // A file:// store copied key by key into another bucket is a valid s3:// store.
    moto.create_bucket("copied");
    upload_store(&moto, &local.path(), "copied");
    let copied = moto.url("copied");
    let dest2 = tmp.path().join("dest2");
    ok(&copied, &["export", "t", dest2.to_str().unwrap()]);
    assert_same_tree(&src, &dest2);

    // A FUSE mount over s3:// shows the same tree.
    require_fuse!();
    let m = Mount::start(&url, &["--root", "t", "--timeout", "20"]);
    assert_same_tree(&src, m.path());
    let ls = std::fs::read_dir(m.path()).unwrap().count();
    assert!(ls > 5);
    drop(m);

    // rm and a later root appear to other processes (nothing negative is cached).
    ok(&url, &["rm", "t"]);
    assert_eq!(ok(&url, &["roots"]), b"");
    ok(
        &url,
        &[
            "import",
            "--name",
            "later",
            src.join("bin").to_str().unwrap(),
        ],
    );
    assert_eq!(ok(&url, &["roots"]), b"later\n");

    // gc over s3:// deletes what `t` alone held and keeps what `later` needs.
    let gc = String::from_utf8(ok(&url, &["gc", "--grace", "0s"])).unwrap();
    assert!(
        gc.starts_with("deleted ") && !gc.starts_with("deleted 0 "),
        "{gc}"
    );
    ok(&url, &["verify"]);
    // The next gc deletes the packs the first one emptied (see store::s3::gc).
    let gc = String::from_utf8(ok(&url, &["gc", "--grace", "0s"])).unwrap();
    assert!(!gc.contains(" 0 temp files"), "{gc}");
    ok(&url, &["verify"]);
    let dest3 = tmp.path().join("dest3");
    ok(&url, &["export", "later", dest3.to_str().unwrap()]);
    assert_same_tree(&src.join("bin"), &dest3);
}

#[test]
fn missing_bucket_and_dead_or_stalled_endpoints_fail_clearly() {
    set_credentials();
    let moto = Moto::start();
    let t = Instant::now();
    let e = fails(&moto.url("no-such-bucket"), &["roots"]);
    assert!(
        e.contains("no-such-bucket") && e.contains("does not exist"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));

    // Nothing listens on this port: refused at once, retried briefly, then a clear error.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("s3://b?endpoint=http://127.0.0.1:{dead}&allow_http=true&timeout=5s");
    let t = Instant::now();
    let e = fails(&url, &["roots"]);
    assert!(e.contains("s3://b"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // A server that accepts and never answers: the deadline ends it.
    let stall = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stall.local_addr().unwrap().port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in stall.incoming().flatten() {
            held.push(c);
        }
    });
    let url = format!("s3://b?endpoint=http://127.0.0.1:{port}&allow_http=true&timeout=2s");
    let t = Instant::now();
    let e = fails(&url, &["roots"]);
    assert!(e.to_lowercase().contains("time"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // Bad URLs are refused before any request.
    let e = fails("s3://b?endpoint=http://127.0.0.1:1", &["roots"]);
    assert!(e.contains("allow_http"), "{e}");
    let e = fails("s3://b?color=blue", &["roots"]);
    assert!(e.contains("color"), "{e}");
}

/// Files of a corpus for the cache tests: `n` files of `size` random bytes.
fn corpus(dir: &Path, n: usize, size: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("f{i:02}"));
            write(&p, &noise(size, 1001 + 2 * i as u64), false);
            p
        })
        .collect()
}

fn cache_stats(dir: &Path) -> serde_like::Stats {
    let out = granary(
        "memory://",
        &[
            "cache",
            "stats",
            "--json",
            "--cache-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_like::parse(&String::from_utf8_lossy(&out.stdout))
}

/// Just enough JSON reading for `cache stats --json` (flat numeric fields).
mod serde_like {
    #[derive(Debug, Default)]
    pub struct Stats {
        pub entries: u64,
        pub bytes: u64,
        pub chunk_hits: u64,
        pub chunk_misses: u64,
        pub corrupt: u64,
        pub evicted: u64,
    }
    fn field(s: &str, name: &str) -> u64 {
        let key = format!("\"{name}\":");
        let at = s
            .find(&key)
            .unwrap_or_else(|| panic!("{name} missing in {s}"))
            + key.len();
        s[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect::<String>()
            .parse()
            .unwrap()
    }
    pub fn parse(s: &str) -> Stats {
        Stats {
            entries: field(s, "entries"),
            bytes: field(s, "bytes"),
            chunk_hits: field(s, "chunk_hits"),
            chunk_misses: field(s, "chunk_misses"),
            corrupt: field(s, "corrupt"),
            evicted: field(s, "evicted"),
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    ["chunks", "dirs", "blobs"]
        .iter()
        .flat_map(|s| walk_files(&dir.join(s)))
        .filter_map(|f| std::fs::metadata(f).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[test]
fn disk_cache_serves_offline_and_fails_cleanly_for_the_rest() {
    set_credentials();
    let mut moto = Moto::start();
    moto.create_bucket("cache");
    let url = moto.url("cache");
    let tmp = tempfile::tempdir().unwrap();
    let files = corpus(&tmp.path().join("src"), 6, 700_000);
    // The tree's digest (import prints it first), for a mount by digest.
    let imported = ok(
        &url,
        &[
            "import",
            "--name",
            "t",
            tmp.path().join("src").to_str().unwrap(),
        ],
    );
    let digest = String::from_utf8(imported)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(digest.len(), 64, "{digest}");
    let cache = tmp.path().join("cache");
    let cd = cache.to_str().unwrap();

    // Cold reads of half the files fill the cache.
    for f in &files[..3] {
        let name = format!("t/{}", f.file_name().unwrap().to_str().unwrap());
        assert_eq!(
            ok(&url, &["--cache-dir", cd, "cat", &name]),
            std::fs::read(f).unwrap()
        );
    }
    let s = cache_stats(&cache);
    assert!(s.entries >= 3 && s.bytes >= 3 * 700_000, "{s:?}");
    assert!(s.chunk_misses > 0, "{s:?}");

    // Warm: hits only.
    assert_eq!(
        ok(&url, &["--cache-dir", cd, "cat", "t/f00"]),
        std::fs::read(&files[0]).unwrap()
    );
    let s2 = cache_stats(&cache);
    assert!(
        s2.chunk_hits > 0 && s2.chunk_misses == s.chunk_misses,
        "{s2:?}"
    );

    // The server goes away: cached files are still served, by new processes.
    moto.kill();
    for f in &files[..3] {
        let name = format!("t/{}", f.file_name().unwrap().to_str().unwrap());
        assert_eq!(
            ok(&url, &["--cache-dir", cd, "cat", &name]),
            std::fs::read(f).unwrap()
        );
    }
    let e = fails(&url, &["--cache-dir", cd, "cat", "t/f05"]);
    let errors: Vec<&str> = e
        .lines()
        .filter(|l| l.starts_with("granary: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(errors[0].contains("s3://cache"), "{e}");

    require_fuse!();
    let m = Mount::start(&url, &["--root", "t", "--timeout", "20", "--cache-dir", cd]);
    for f in &files[..3] {
        let got = std::fs::read(m.path().join(f.file_name().unwrap())).unwrap();
        assert!(got == std::fs::read(f).unwrap());
    }
    let err = std::fs::read(m.path().join("f04")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The mount is still fine after the failure.
    let again = std::fs::read(m.path().join("f00")).unwrap();
    assert!(again == std::fs::read(&files[0]).unwrap());
    drop(m);

    // By digest, offline: no root record is asked for.
    let m = Mount::start(
        &url,
        &["--root", &digest, "--timeout", "20", "--cache-dir", cd],
    );
    let got = std::fs::read(m.path().join(files[1].file_name().unwrap())).unwrap();
    assert!(got == std::fs::read(&files[1]).unwrap());
}

#[test]
fn disk_cache_stays_bounded_and_repairs_corrupt_entries() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("cache");
    let url = moto.url("cache");
    let tmp = tempfile::tempdir().unwrap();
    // 12 MB of content through a 2 MiB cache, read twice.
    let files = corpus(&tmp.path().join("src"), 12, 1_000_000);
    ok(
        &url,
        &[
            "import",
            "--name",
            "t",
            tmp.path().join("src").to_str().unwrap(),
        ],
    );
    let cache = tmp.path().join("cache");
    let cd = cache.to_str().unwrap();
    let max = 2u64 << 20;
    for _ in 0..2 {
        for f in &files {
            let name = format!("t/{}", f.file_name().unwrap().to_str().unwrap());
            let got = ok(
                &url,
                &["--cache-dir", cd, "--cache-max", "2M", "cat", &name],
            );
            assert!(got == std::fs::read(f).unwrap());
            let b = dir_bytes(&cache);
            assert!(b <= max, "cache holds {b} bytes, max {max}");
        }
    }
    let s = cache_stats(&cache);
    assert!(s.evicted > 0 && s.bytes <= max, "{s:?}");

    // Corrupt every cached chunk of the last file: the next read detects, drops and refetches.
    let last = files.last().unwrap();
    let name = format!("t/{}", last.file_name().unwrap().to_str().unwrap());
    let mut corrupted = Vec::new();
    for f in walk_files(&cache.join("chunks")) {
        if f.is_file() {
            let mut b = std::fs::read(&f).unwrap();
            b[0] ^= 0xff;
            std::fs::write(&f, &b).unwrap();
            corrupted.push(f);
        }
    }
    assert!(!corrupted.is_empty());
    let got = ok(
        &url,
        &["--cache-dir", cd, "--cache-max", "2M", "cat", &name],
    );
    assert!(got == std::fs::read(last).unwrap());
    let s2 = cache_stats(&cache);
    assert!(s2.corrupt > s.corrupt, "{s2:?}");
    // Reading everything again finds every other corrupt entry still cached.
    for f in &files {
        let name = format!("t/{}", f.file_name().unwrap().to_str().unwrap());
        let got = ok(
            &url,
            &["--cache-dir", cd, "--cache-max", "2M", "cat", &name],
        );
        assert!(got == std::fs::read(f).unwrap());
    }
    // What is in the cache now is right again.
    for f in walk_files(&cache.join("chunks"))
        .into_iter()
        .filter(|f| f.is_file())
    {
        let b = std::fs::read(&f).unwrap();
        let hex = f.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(blake3::hash(&b).to_hex().as_str(), hex, "{}", f.display());
    }

    // `cache clear` empties it.
    let out = granary("memory://", &["cache", "clear", "--cache-dir", cd]);
    assert!(out.status.success());
    assert_eq!(dir_bytes(&cache), 0);
}

#[test]
fn two_processes_share_one_cache_dir() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("cache");
    let url = moto.url("cache");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    corpus(&src, 8, 600_000);
    ok(&url, &["import", "--name", "t", src.to_str().unwrap()]);
    let cache = tmp.path().join("cache");
    let cd = cache.to_str().unwrap().to_string();
    // A cache smaller than the corpus, so the two also race on eviction.
    for round in 0..2 {
        let outs: Vec<PathBuf> = (0..2)
            .map(|i| tmp.path().join(format!("out{round}-{i}")))
            .collect();
        let children: Vec<_> = outs
            .iter()
            .map(|o| {
                let mut c = Command::new(granary_bin());
                c.args([
                    "--store",
                    &url,
                    "--cache-dir",
                    &cd,
                    "--cache-max",
                    "3M",
                    "export",
                    "t",
                ])
                .arg(o);
                std::thread::spawn(move || run_bounded(c, Duration::from_secs(120)))
            })
            .collect();
        for h in children {
            let out = h.join().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for o in &outs {
            assert_same_tree(&src, o);
        }
    }
    // Each process rescans after writing a tenth of the limit, so two together overshoot it
    // by at most about a fifth (see store/cache.rs).
    let s = cache_stats(&cache);
    assert!(s.chunk_hits > 0 && s.bytes <= 4 << 20, "{s:?}");
}

/// Kills a child process on drop.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn daemon_serves_a_bucket_through_a_disk_cache() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("served");
    let url = moto.url("served");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 0);
    ok(&url, &["import", "--name", "t", src.to_str().unwrap()]);
    let sock = tmp.path().join("d.sock");
    let cache = tmp.path().join("cache");
    let mut daemon = Reaper(
        Command::new(granary_bin())
            .args([
                "--store",
                &url,
                "--cache-dir",
                cache.to_str().unwrap(),
                "daemon",
                "--listen",
            ])
            .arg(format!("unix:{}", sock.display()))
            .env("XDG_RUNTIME_DIR", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(daemon.0.try_wait().unwrap().is_none(), "daemon exited");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let grpc = format!("grpc+unix://{}", sock.display());
    let dest = tmp.path().join("dest");
    ok(&grpc, &["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    // The daemon's reads went through its disk cache (its counters reach stats.json every
    // few seconds).
    let t0 = Instant::now();
    loop {
        let s = cache_stats(&cache);
        if s.entries > 0 && s.chunk_misses > 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{s:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A root written through the daemon lands in the bucket.
    ok(
        &grpc,
        &[
            "import",
            "--name",
            "via-daemon",
            src.join("bin").to_str().unwrap(),
        ],
    );
    assert_eq!(ok(&url, &["roots"]), b"t\nvia-daemon\n");
}

#[test]
fn wrong_credentials_fail_clearly() {
    set_credentials(); // keys this moto does not know
    let moto = Moto::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]);
    let t = Instant::now();
    let e = fails(&moto.url("some-bucket"), &["roots"]);
    assert!(
        e.contains("access denied") && e.contains("AWS_ACCESS_KEY_ID"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// Runs granary with `GRANARY_S3_STATS` and returns its output and the request counts it
/// printed (`GET_requests`, `PUT_bytes`, ...).
fn counted(url: &str, args: &[&str]) -> (Output, std::collections::HashMap<String, u64>) {
    let mut c = Command::new(granary_bin());
    c.arg("--store")
        .arg(url)
        .args(args)
        .env("GRANARY_S3_STATS", "1")
        .stdin(Stdio::null());
    let out = run_bounded(c, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "granary {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("granary: s3 requests: "))
        .unwrap_or_else(|| panic!("no request counts in: {err}"));
    let counts = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect();
    (out, counts)
}

/// Keys under `prefix` in a moto bucket.
fn bucket_keys(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let (status, body) = moto
        .http(
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}&max-keys=1000"),
            &[],
        )
        .unwrap();
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    body.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
        .collect()
}

/// A tree of `big` incompressible 1 MiB-ish files and many small ones.
fn packed_tree(dir: &Path, big: usize) {
    for i in 0..big {
        write_big(
            &dir.join(format!("big{i:02}.bin")),
            (1 << 20) + i * 4099,
            70 + i as u64,
        );
    }
    for i in 0..200 {
        write(
            &dir.join(format!("small/{:02}/f{i}.txt", i % 10)),
            format!("small file {i}\n").repeat(i + 1).as_bytes(),
            false,
        );
    }
}

#[test]
fn imports_write_packs_with_few_requests_and_a_second_import_writes_no_data() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("packs");
    let url = moto.url("packs/p");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    packed_tree(&src, 20);

    let (_, first) = counted(&url, &["import", "--name", "a", src.to_str().unwrap()]);
    let stored = first["PUT_bytes"];
    assert!(stored > 20 << 20, "{first:?}");
    // One data PUT per 4 MiB stored at most, plus each pack's index, the config and the
    // root (no keep marker: nothing was reused from packs this import did not write).
    let packs = bucket_keys(&moto, "packs", "p/packs/")
        .iter()
        .filter(|k| k.ends_with(".pack"))
        .count() as u64;
    assert!(
        packs >= 1 && packs <= stored.div_ceil(4 << 20),
        "{packs} packs"
    );
    assert_eq!(first["PUT_requests"], 2 * packs + 2, "{first:?}");
    assert!(bucket_keys(&moto, "packs", "p/packs/keep/").is_empty());
    // No HEAD per object: only the root's conditional put looks first.
    assert!(first["HEAD_requests"] <= 2, "{first:?}");
    assert!(
        bucket_keys(&moto, "packs", "p/chunks/").is_empty(),
        "nothing loose"
    );

    // The same tree again: every object is found in the packs' indexes.
    let (_, second) = counted(&url, &["import", "--name", "b", src.to_str().unwrap()]);
    let packs_after = bucket_keys(&moto, "packs", "p/packs/")
        .iter()
        .filter(|k| k.ends_with(".pack"))
        .count() as u64;
    assert_eq!(packs_after, packs, "a second import wrote a pack");
    // The root, and the keep marker naming what it reused (see store::s3::gc).
    assert!(second["PUT_requests"] <= 2, "{second:?}");
    assert!(second["PUT_bytes"] < 64 << 10, "{second:?}");

    ok(&url, &["verify"]);
    let dest = tmp.path().join("dest");
    ok(&url, &["export", "b", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

#[test]
fn two_processes_import_overlapping_trees_into_one_bucket_at_once() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("both");
    let url = moto.url("both");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    packed_tree(&a, 12);
    packed_tree(&b, 12);
    // Half of b differs from a.
    for i in 0..6 {
        write_big(&b.join(format!("big{i:02}.bin")), 1 << 20, 900 + i as u64);
    }
    let spawn = |name: &str, dir: &Path| {
        Command::new(granary_bin())
            .args(["--store", &url, "import", "--name", name])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (spawn("a", &a), spawn("b", &b));
    for (name, p) in [("a", pa), ("b", pb)] {
        let out = p.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "import {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ok(&url, &["verify"]);
    for (name, dir) in [("a", &a), ("b", &b)] {
        let dest = tmp.path().join(format!("out-{name}"));
        ok(&url, &["export", name, dest.to_str().unwrap()]);
        assert_same_tree(dir, &dest);
    }
}

#[test]
fn a_cold_mount_reads_a_file_of_many_chunks_with_few_gets() {
    require_fuse!();
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("cold");
    let url = moto.url("cold");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_big(&src.join("big.bin"), 24 << 20, 4242);
    ok(&url, &["import", "--name", "t", src.to_str().unwrap()]);

    let m = Mount::start(&url, &["--root", "t", "--timeout", "20"]);
    let got = std::fs::read(m.path().join("big.bin")).unwrap();
    assert!(
        got == std::fs::read(src.join("big.bin")).unwrap(),
        "wrong bytes"
    );
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", "user.granary.ops"])
        .arg(m.path())
        .output()
        .expect("run getfattr (package attr)");
    assert!(out.status.success());
    let ops = String::from_utf8(out.stdout).unwrap();
    let count = |name: &str| -> u64 {
        ops.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {ops}"))
    };
    let gets = count("s3_get_requests");
    // 24 MiB in ≈ 370 chunks of ≈ 64 KiB: at most one GET per MiB (plus the listing's index
    // reads, the config and the root).
    assert!(gets <= 24 + 6, "{gets} GETs for 24 MiB:\n{ops}");
    drop(m);
}

/// Uploads every file of a `file://` store into a bucket, key for key (as any S3 tool would).
fn upload_store(moto: &Moto, store: &Path, bucket: &str) {
    for f in walk_files(store) {
        if !f.is_file() {
            continue;
        }
        let rel = f.strip_prefix(store).unwrap().to_str().unwrap().to_string();
        let (status, _) = moto
            .http(
                "PUT",
                &format!("/{bucket}/{rel}"),
                &std::fs::read(&f).unwrap(),
            )
            .unwrap();
        assert_eq!(status, 200, "uploading {rel}");
    }
}

#[test]
fn a_loose_s3_store_is_read_and_moved_into_packs_by_gc_under_a_mount() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("loose");
    let url = moto.url("loose");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 2 << 20);
    // A store from before packs: one object per key.
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(
        local.join("config.toml"),
        granary::store::StoreConfig::loose().to_toml(),
    )
    .unwrap();
    let local_url = format!("file://{}", local.display());
    ok(
        &local_url,
        &["import", "--name", "t", src.to_str().unwrap()],
    );
    upload_store(&moto, &local, "loose");
    let loose_keys = || {
        ["chunks/", "blobs/", "dirs/"]
            .iter()
            .map(|p| bucket_keys(&moto, "loose", p).len())
            .sum::<usize>()
    };
    assert!(loose_keys() > 5);
    let dest = tmp.path().join("before");
    ok(&url, &["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);

    // A mount reads the tree while gc moves it into packs and deletes the loose keys.
    require_fuse!();
    let m = Mount::start(&url, &["--root", "t", "--timeout", "20"]);
    ok(&url, &["gc", "--grace", "0s"]);
    assert!(
        loose_keys() > 5,
        "loose keys deleted before readers could see the packs"
    );
    std::thread::sleep(Duration::from_secs(11));
    let gc = String::from_utf8(ok(&url, &["gc", "--grace", "0s"])).unwrap();
    assert!(!gc.contains(" 0 temp files"), "{gc}");
    assert_eq!(loose_keys(), 0, "loose objects left after the second gc");
    assert!(bucket_keys(&moto, "loose", "packs/")
        .iter()
        .any(|k| k.ends_with(".idx")));
    assert_same_tree(&src, m.path());
    drop(m);
    ok(&url, &["verify"]);
    let dest = tmp.path().join("after");
    ok(&url, &["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
}

#[test]
fn pack_indexes_are_kept_in_the_cache_dir_for_the_next_process() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("idx");
    let url = moto.url("idx");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    packed_tree(&src, 3);
    ok(&url, &["import", "--name", "t", src.to_str().unwrap()]);
    ok(
        &url,
        &["import", "--name", "u", src.join("small").to_str().unwrap()],
    );
    let cache = tmp.path().join("cache");
    let cd = cache.to_str().unwrap();
    let (_, first) = counted(&url, &["--cache-dir", cd, "cat", "t/big01.bin"]);
    let kept: Vec<PathBuf> = walk_files(&cache)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    let packs = bucket_keys(&moto, "idx", "packs/")
        .iter()
        .filter(|k| k.ends_with(".idx"))
        .count();
    assert_eq!(kept.len(), packs, "{kept:?}");
    // The next process reads them from disk: fewer GETs by at least one per pack.
    let (out, second) = counted(&url, &["--cache-dir", cd, "cat", "t/big01.bin"]);
    assert!(out.stdout == std::fs::read(src.join("big01.bin")).unwrap());
    assert!(
        second["GET_requests"] + packs as u64 <= first["GET_requests"],
        "{first:?} then {second:?}"
    );
    // A damaged copy is refetched, never trusted.
    std::fs::write(&kept[0], b"garbage").unwrap();
    let (out, _) = counted(&url, &["--cache-dir", cd, "cat", "t/big02.bin"]);
    assert!(out.stdout == std::fs::read(src.join("big02.bin")).unwrap());
    assert!(std::fs::read(&kept[0]).unwrap() != b"garbage");
}

/// Copies every key under `prefix` of a moto bucket into `dest` (a `file://` store's layout),
/// so the test's own pack-index parser can read what was uploaded.
fn download_bucket(moto: &Moto, bucket: &str, prefix: &str, dest: &Path) {
    for key in bucket_keys(moto, bucket, &format!("{prefix}/")) {
        let (status, body) = moto
            .signed("GET", &format!("/{bucket}/{key}"), &[])
            .unwrap();
        assert_eq!(status, 200, "GET {key}");
        let path = dest.join(key.strip_prefix(&format!("{prefix}/")).unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
}

/// Small objects written to a bucket share compression groups, as in a local store: the
/// bucket holds far fewer bytes than a format-2 bucket (no groups) of the same tree, which
/// stays format 2; every object reads back, also after gc rewrote a pack whose groups were
/// half garbage; a damaged group is an error naming only objects it holds, never wrong bytes.
#[test]
fn a_bucket_compresses_small_objects_in_groups_and_a_damaged_group_names_them() {
    set_credentials();
    let moto = Moto::start();
    moto.create_bucket("groups");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // Files of lines drawn from one pool of 300 random lines: each file alone compresses
    // little (hex), files together share most of their lines.
    let pool = line_pool(300, 1000);
    for i in 0..400usize {
        let part = if i % 2 == 0 { "kept" } else { "dropped" };
        let body: String = (0..40)
            .map(|k| pool[(i * 7 + k * 13) % 300].as_str())
            .collect();
        write(
            &src.join(format!("{part}/d{}/m{i}.py", i % 7)),
            body.as_bytes(),
            false,
        );
    }
    let (status, _) = moto
        .http("PUT", "/groups/two/config.toml", FORMAT_2_CONFIG.as_bytes())
        .unwrap();
    assert_eq!(status, 200);
    let (three_url, two_url) = (moto.url("groups/three"), moto.url("groups/two"));
    ok(
        &three_url,
        &["import", "--name", "a", src.to_str().unwrap()],
    );
    ok(&two_url, &["import", "--name", "a", src.to_str().unwrap()]);

    let local = tmp.path().join("three");
    download_bucket(&moto, "groups", "three", &local);
    let config = std::fs::read_to_string(local.join("config.toml")).unwrap();
    assert!(config.contains("format_version = 3"), "{config}");
    let entries = packed_entries(&local);
    let grouped = entries.iter().filter(|(_, e)| e.member.is_some()).count();
    assert!(
        grouped >= 300,
        "{grouped} of {} objects grouped",
        entries.len()
    );
    let old = tmp.path().join("two");
    download_bucket(&moto, "groups", "two", &old);
    assert!(std::fs::read_to_string(old.join("config.toml"))
        .unwrap()
        .contains("format_version = 2"));
    assert!(packed_entries(&old).iter().all(|(_, e)| e.member.is_none()));
    let pack_bytes = |store: &Path| -> u64 {
        walk_files(&store.join("packs"))
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "pack"))
            .map(|f| f.metadata().unwrap().len())
            .sum()
    };
    let (grouped_bytes, alone_bytes) = (pack_bytes(&local), pack_bytes(&old));
    assert!(
        grouped_bytes * 3 < alone_bytes,
        "{grouped_bytes} bytes in groups, {alone_bytes} alone"
    );
    for url in [&three_url, &two_url] {
        let dest = tmp.path().join(format!("out{}", url.len()));
        ok(url, &["export", "a", dest.to_str().unwrap()]);
        assert_same_tree(&src, &dest);
    }

    // Half of every group becomes garbage: gc copies the live half into new groups.
    ok(
        &three_url,
        &["import", "--name", "k", src.join("kept").to_str().unwrap()],
    );
    ok(&three_url, &["rm", "a"]);
    ok(&three_url, &["gc", "--grace", "0s"]);
    ok(&three_url, &["gc", "--grace", "0s"]);
    let after = tmp.path().join("after");
    download_bucket(&moto, "groups", "three", &after);
    let entries = packed_entries(&after);
    let packs: std::collections::HashSet<&PathBuf> = entries.iter().map(|(p, _)| p).collect();
    let before: std::collections::HashSet<PathBuf> = packed_entries(&local)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(&local).unwrap().to_path_buf())
        .collect();
    assert!(
        packs
            .iter()
            .all(|p| !before.contains(p.strip_prefix(&after).unwrap())),
        "gc rewrote the import's pack"
    );
    let dest = tmp.path().join("kept");
    ok(&three_url, &["export", "k", dest.to_str().unwrap()]);
    assert_same_tree(&src.join("kept"), &dest);
    ok(&three_url, &["verify"]);

    // The chunk group with the most members, damaged in the bucket.
    let ((pack, off, len), members) = largest_chunk_group(&entries);
    assert!(members.len() > 20, "{} members", members.len());
    let mut raw = std::fs::read(&pack).unwrap();
    let at = off + harmful_flip(&raw[off..off + len]);
    raw[at] ^= 0x10;
    let key = format!("three/{}", pack.strip_prefix(&after).unwrap().display());
    moto.put_object("groups", &key, raw.clone());
    let (_, back) = moto.signed("GET", &format!("/groups/{key}"), &[]).unwrap();
    assert!(back == raw, "the damaged pack is in the bucket");
    let out = granary(&three_url, &["verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let faults: Vec<&str> = text.lines().filter(|l| l.starts_with("chunk ")).collect();
    assert!(!faults.is_empty(), "{text}");
    for l in faults {
        assert!(
            members.iter().any(|m| l.starts_with(&format!("chunk {m}"))),
            "only objects of the damaged group are at fault: {l}"
        );
    }
    // Every file reads right or fails in one line: never other bytes.
    let failed = cat_all_right_or_failing(&src.join("kept"), |rel| {
        granary(&three_url, &["cat", &format!("k/{rel}")])
    });
    assert!(failed > 0, "no file read the damaged group");
}
