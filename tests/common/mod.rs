//! Shared helpers for integration tests: run the real `granary` binary against a store in a
//! temp dir, and generate trees with known shapes.
#![allow(dead_code)]

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn granary_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_granary"))
}

/// A store in a temp dir and a way to run `granary --store file://...` against it.
pub struct TestStore {
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("store")
    }
    pub fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(granary_bin());
        c.arg("--store").arg(self.url());
        c
    }
    /// Runs granary with `args`; panics with its stderr if it fails.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.cmd().args(args).output().expect("run granary");
        assert!(
            out.status.success(),
            "granary {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
    /// Runs granary with `args`, expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run granary");
        assert!(
            !out.status.success(),
            "granary {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
    /// A store written one file per object (format 1), for tests that remove or replace
    /// object files.
    pub fn loose() -> Self {
        let s = Self::new();
        std::fs::create_dir_all(s.path()).unwrap();
        let config = "format_version = 1\nzstd_level = 3\n\n[chunking]\nmin = 16384\navg = 65536\nmax = 262144\n";
        std::fs::write(s.path().join("config.toml"), config).unwrap();
        s
    }
    /// A store with packs and no compression groups (format 2), as written before groups.
    pub fn format_2() -> Self {
        let s = Self::new();
        std::fs::create_dir_all(s.path()).unwrap();
        std::fs::write(s.path().join("config.toml"), FORMAT_2_CONFIG).unwrap();
        s
    }
    /// Number of distinct objects of a kind (`chunks`, `blobs`, `dirs`), loose or packed;
    /// for `roots`, the number of root files.
    pub fn count(&self, sub: &str) -> usize {
        let mut seen: std::collections::HashSet<String> = walk_files(&self.path().join(sub))
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .filter(|n| !n.starts_with(".tmp-"))
            .collect();
        if let Some(code) = kind_code(sub) {
            for (_, e) in packed_entries(&self.path()) {
                if e.kind == code {
                    seen.insert(e.hex);
                }
            }
        }
        seen.len()
    }
    /// Objects as written, copies included: loose object files plus packed entries.
    pub fn entries(&self) -> usize {
        let loose: usize = ["chunks", "blobs", "dirs"]
            .iter()
            .map(|sub| walk_files(&self.path().join(sub)).len())
            .sum();
        loose + packed_entries(&self.path()).len()
    }
    /// An object's stored bytes, loose or packed.
    pub fn object(&self, sub: &str, hex: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.tamper(sub, hex, |raw| out = raw.clone());
        out
    }
    /// Rewrites an object's stored bytes in place, loose or packed (same length for a packed
    /// one). `sub` is `chunks`, `blobs` or `dirs`.
    pub fn tamper(&self, sub: &str, hex: &str, f: impl FnOnce(&mut Vec<u8>)) {
        tamper(&self.path(), sub, hex, f)
    }
}

/// config.toml of a format-2 store (packs, no compression groups).
pub const FORMAT_2_CONFIG: &str = "format_version = 2\nzstd_level = 3\npacks = true\n\n[chunking]\nmin = 16384\navg = 65536\nmax = 262144\n";

/// [`TestStore::tamper`] for a store at any path (a daemon's, say).
pub fn tamper(store: &Path, sub: &str, hex: &str, f: impl FnOnce(&mut Vec<u8>)) {
    {
        let loose = store.join(sub).join(&hex[..2]).join(hex);
        if loose.exists() {
            let mut raw = std::fs::read(&loose).unwrap();
            f(&mut raw);
            std::fs::write(&loose, &raw).unwrap();
            return;
        }
        let code = kind_code(sub).expect("an object kind");
        let (pack, e) = packed_entries(store)
            .into_iter()
            .find(|(_, e)| e.kind == code && e.hex == hex)
            .unwrap_or_else(|| panic!("{sub} {hex} is not in the store"));
        let mut raw = std::fs::read(&pack).unwrap();
        let Some((mo, ml)) = e.member else {
            let mut obj = raw[e.offset..e.offset + e.len].to_vec();
            f(&mut obj);
            assert_eq!(obj.len(), e.len, "a packed object keeps its length");
            raw[e.offset..e.offset + e.len].copy_from_slice(&obj);
            std::fs::write(&pack, &raw).unwrap();
            return;
        };
        let frame = &raw[e.offset..e.offset + e.len];
        if let Some(new) = rewrite_member(frame, mo, ml, f) {
            raw[e.offset..e.offset + e.len].copy_from_slice(&new);
            std::fs::write(&pack, &raw).unwrap();
        }
    }
}

/// A compression group's zstd `frame` with the member at `mo..mo + ml` of its plain bytes
/// changed by `f`, compressed again into exactly the old frame's room (padded with a zstd
/// skippable frame) so the pack's index stays right; `None` if `f` changed nothing.
pub fn rewrite_member(
    frame: &[u8],
    mo: usize,
    ml: usize,
    f: impl FnOnce(&mut Vec<u8>),
) -> Option<Vec<u8>> {
    let mut plain = zstd::decode_all(frame).expect("a group decodes");
    let mut obj = plain[mo..mo + ml].to_vec();
    let before = obj.clone();
    f(&mut obj);
    if obj == before {
        return None;
    }
    assert_eq!(obj.len(), ml, "a grouped object keeps its length");
    plain[mo..mo + ml].copy_from_slice(&obj);
    let mut new = [3, 19, 9, 1]
        .iter()
        .map(|l| zstd::bulk::compress(&plain, *l).unwrap())
        .find(|n| n.len() == frame.len() || n.len() + 8 <= frame.len())
        .expect("the changed group fits its old room");
    if new.len() < frame.len() {
        let pad = frame.len() - new.len() - 8;
        new.extend_from_slice(&0x184D2A50u32.to_le_bytes());
        new.extend_from_slice(&(pad as u32).to_le_bytes());
        new.resize(frame.len(), 0);
    }
    Some(new)
}

/// Where in a compression group's zstd `frame` flipping bits (`^= 0x10`) really damages it:
/// the first place from the middle on after which the frame no longer decodes to the same
/// bytes. A flip can be harmless (in a match offset of repetitive text, say, a copy from
/// twice as far back gives the same bytes), and a test that damages a group must damage it.
#[allow(dead_code)]
pub fn harmful_flip(frame: &[u8]) -> usize {
    let plain = zstd::decode_all(frame).expect("a group decodes");
    (frame.len() / 2..frame.len())
        .chain(0..frame.len() / 2)
        .find(|&at| {
            let mut bad = frame.to_vec();
            bad[at] ^= 0x10;
            zstd::decode_all(&bad[..]).map_or(true, |p| p != plain)
        })
        .expect("some flip damages the group")
}

fn kind_code(sub: &str) -> Option<u8> {
    match sub {
        "chunks" => Some(0),
        "blobs" => Some(1),
        "dirs" => Some(2),
        _ => None,
    }
}

/// One object of a pack, as its index (`packs/<id>.idx`, format in src/store/pack/mod.rs)
/// says: where its bytes are, or for a grouped object its group's frame and its place in the
/// decompressed group.
pub struct PackedEntry {
    pub kind: u8,
    pub hex: String,
    pub offset: usize,
    pub len: usize,
    pub member: Option<(usize, usize)>,
}

impl PackedEntry {
    /// Bytes stored for this object: its own, or its share of its group's frame (`group_plain`:
    /// the plain bytes of all the group's members).
    pub fn share(
        &self,
        group_plain: &std::collections::HashMap<(PathBuf, usize), usize>,
        pack: &Path,
    ) -> u64 {
        match self.member {
            None => self.len as u64,
            Some((_, l)) => {
                (self.len * l / group_plain[&(pack.to_path_buf(), self.offset)].max(1)) as u64
            }
        }
    }
}

/// The plain bytes of each group's members together, by (pack, frame offset).
pub fn group_plain(
    entries: &[(PathBuf, PackedEntry)],
) -> std::collections::HashMap<(PathBuf, usize), usize> {
    let mut out = std::collections::HashMap::new();
    for (p, e) in entries {
        if let Some((_, l)) = e.member {
            *out.entry((p.clone(), e.offset)).or_insert(0) += l;
        }
    }
    out
}

/// Every entry of every committed pack of the store at `store`, read with this test's own
/// parser of the documented format: "GRNIDX01", u64 count, count × (u8 kind, 32-byte digest,
/// u64 offset, u32 len), blake3 of the rest; or "GRNIDX02", each entry with two more u32 (the
/// object's offset and length in its decompressed group, both u32::MAX for one alone).
pub fn packed_entries(store: &Path) -> Vec<(PathBuf, PackedEntry)> {
    let mut out = Vec::new();
    for idx in walk_files(&store.join("packs")) {
        if idx.extension().and_then(|e| e.to_str()) != Some("idx") {
            continue;
        }
        let raw = std::fs::read(&idx).unwrap();
        let size = match &raw[..8] {
            b"GRNIDX01" => 45,
            b"GRNIDX02" => 53,
            m => panic!("{}: magic {m:?}", idx.display()),
        };
        let (body, sum) = raw.split_at(raw.len() - 32);
        assert_eq!(
            blake3::hash(body).as_bytes(),
            sum,
            "{} checksum",
            idx.display()
        );
        let count = u64::from_le_bytes(body[8..16].try_into().unwrap()) as usize;
        assert_eq!(body.len(), 16 + count * size);
        for rec in body[16..].chunks_exact(size) {
            let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap());
            let member = (size == 53 && u32_at(49) != u32::MAX)
                .then(|| (u32_at(45) as usize, u32_at(49) as usize));
            out.push((
                idx.with_extension("pack"),
                PackedEntry {
                    kind: rec[0],
                    hex: rec[1..33].iter().map(|b| format!("{b:02x}")).collect(),
                    offset: u64::from_le_bytes(rec[33..41].try_into().unwrap()) as usize,
                    len: u32_at(41) as usize,
                    member,
                },
            ));
        }
    }
    out
}

/// The chunk compression group with the most members among `entries`: (pack, frame offset,
/// frame length) and the digests (hex) of its chunks.
#[allow(dead_code)]
pub fn largest_chunk_group(
    entries: &[(PathBuf, PackedEntry)],
) -> ((PathBuf, usize, usize), Vec<String>) {
    let mut groups: std::collections::HashMap<(PathBuf, usize, usize), Vec<String>> =
        Default::default();
    for (p, e) in entries {
        if e.kind == 0 && e.member.is_some() {
            groups
                .entry((p.clone(), e.offset, e.len))
                .or_default()
                .push(e.hex.clone());
        }
    }
    groups
        .into_iter()
        .max_by_key(|(_, m)| m.len())
        .expect("some chunks are grouped")
}

/// `n` lines of random hex (60 characters), the same for the same `seed`: files made of lines
/// drawn from one pool compress little alone and far better together.
#[allow(dead_code)]
pub fn line_pool(n: u64, seed: u64) -> Vec<String> {
    (0..n)
        .map(|k| {
            noise(30, seed + k)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                + "\n"
        })
        .collect()
}

/// Reads every file under `src` with `cat` (which runs `granary cat ROOT/REL` and returns its
/// output): each must read exactly as the source or fail with a one-line error naming a
/// chunk, never give other bytes. Returns how many failed.
#[allow(dead_code)]
pub fn cat_all_right_or_failing(src: &Path, cat: impl Fn(&str) -> Output) -> usize {
    let mut failed = 0;
    for f in walk_files(src) {
        let rel = f.strip_prefix(src).unwrap().to_str().unwrap();
        let out = cat(rel);
        if out.status.success() {
            assert_eq!(out.stdout, std::fs::read(&f).unwrap(), "{rel}");
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.lines().count() == 1 && err.contains("chunk"), "{err}");
            failed += 1;
        }
    }
    failed
}

pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so tests are reproducible.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    // splitmix64 of the seed: distinct seeds give distinct streams (`seed | 1` did not).
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut s = (z ^ (z >> 31)) | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(n);
    v
}

pub fn write(path: &Path, data: &[u8], exec: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    let mode = if exec { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The round-trip tree of the foundation issue: nested dirs, empty files and dirs, files of
/// exactly min/avg/max chunk size ±1, executables, symlinks (relative, absolute, dangling),
/// names with spaces and non-UTF-8 bytes, and (if `big` > 0) one large file of `big` bytes.
pub fn gen_tree(root: &Path, big: usize) {
    std::fs::create_dir_all(root).unwrap();
    write(&root.join("empty"), b"", false);
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    write(&root.join("hello.txt"), b"hello\n", false);
    write(&root.join("bin/tool"), b"#!/bin/sh\necho tool\n", true);
    write(&root.join("a/b/c/d/deep.txt"), b"deep", false);
    write(&root.join("with space/file name.txt"), b"spaces", false);
    let odd = std::ffi::OsStr::from_bytes(b"latin1-\xe9\xff");
    write(&root.join(odd), b"not utf-8 name", false);
    for (i, base) in [16usize << 10, 64 << 10, 256 << 10].into_iter().enumerate() {
        for (j, delta) in [-1isize, 0, 1].into_iter().enumerate() {
            let n = (base as isize + delta) as usize;
            write(
                &root.join(format!("sizes/f{base}{delta:+}")),
                &noise(n, (i * 3 + j) as u64 + 100),
                j == 1,
            );
        }
    }
    write(&root.join("multi/two-meg"), &noise(2 << 20, 7), false);
    std::os::unix::fs::symlink("hello.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("bin/up-link")).unwrap();
    if big > 0 {
        write_big(&root.join("big.bin"), big, 42);
    }
}

/// Writes a large pseudo-random file without holding it all in memory.
pub fn write_big(path: &Path, size: usize, seed: u64) {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block = 4 << 20;
    let mut left = size;
    let mut k = 0;
    while left > 0 {
        let n = left.min(block);
        f.write_all(&noise(n, seed.wrapping_mul(1000) + k)).unwrap();
        left -= n;
        k += 1;
    }
}

/// Compares two trees with `diff -r --no-dereference` and checks exec bits.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("run diff");
    assert!(
        out.status.success(),
        "trees differ:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for f in walk_files(a) {
        let rel = f.strip_prefix(a).unwrap();
        let ma = std::fs::symlink_metadata(&f).unwrap();
        let mb = std::fs::symlink_metadata(b.join(rel)).unwrap();
        assert_eq!(
            ma.file_type().is_symlink(),
            mb.file_type().is_symlink(),
            "{rel:?}"
        );
        if ma.file_type().is_file() {
            assert_eq!(
                ma.permissions().mode() & 0o100,
                mb.permissions().mode() & 0o100,
                "exec bit of {rel:?}"
            );
        } else if ma.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&f).unwrap(),
                std::fs::read_link(b.join(rel)).unwrap()
            );
        }
    }
}

/// Whether the Nix tool `tool` (from Debian's nix-bin) runs here. Without it: panics if
/// `GRANARY_REQUIRE_NIX=1` (CI), else prints loudly that `what` is skipped and returns false.
pub fn have_nix_tool(tool: &str, what: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("GRANARY_REQUIRE_NIX").as_deref() != Ok("1"),
            "{tool} is missing and GRANARY_REQUIRE_NIX=1 (apt-get install nix-bin)"
        );
        eprintln!("\n!!! SKIPPING {what}: {tool} not found (apt-get install nix-bin) !!!\n");
    }
    ok
}

/// A free loopback port (bound, then released for the daemon to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A running daemon; killed (and reaped) on drop.
pub struct Daemon {
    pub child: Option<std::process::Child>,
    pub sock: PathBuf,
    pub addr: std::net::SocketAddr,
    pub store_url: String,
    pub extra: Vec<String>,
}

impl Daemon {
    pub fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let sock = dir.join("d.sock");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut d = Daemon {
            child: None,
            sock,
            addr,
            store_url: format!("file://{}", dir.join("store").display()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    pub fn spawn(&mut self) {
        let child = Command::new(granary_bin())
            .arg("--store")
            .arg(&self.store_url)
            .arg("daemon")
            .arg("--listen")
            .arg(format!("unix:{}", self.sock.display()))
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(&self.extra)
            .args(
                (!self.extra.iter().any(|e| e.contains("token-file")))
                    .then_some("--allow-unauthenticated-tcp"),
            )
            .env("XDG_RUNTIME_DIR", "")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start daemon");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let up = std::os::unix::net::UnixStream::connect(&self.sock).is_ok()
                && std::net::TcpStream::connect(self.addr).is_ok();
            if up {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited at start: {st}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn unix_url(&self) -> String {
        format!("grpc+unix://{}", self.sock.display())
    }

    pub fn tcp_url(&self) -> String {
        format!("grpc+tcp://{}", self.addr)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Threads and open file descriptors of the daemon process.
    pub fn threads_and_fds(&self) -> (usize, usize) {
        let count = |sub: &str| {
            std::fs::read_dir(format!("/proc/{}/{sub}", self.pid()))
                .map(|r| r.count())
                .unwrap_or(0)
        };
        (count("task"), count("fd"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}
