//! `granary daemon` end to end: the real binary serves a store on loopback TCP and a Unix
//! socket in a temp dir; clients are the real binary or the library's remote store.
//! Every daemon runs under a guard that kills it on drop, even when a test fails.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_same_tree, free_port, gen_tree, granary_bin, noise, write, write_big, Daemon};
use granary::model::castore::{
    B3Digest, Directory, DirectoryEntry, FileEntry, Node, RootRecord, SymlinkEntry,
};
use granary::store::{self, BlobService, DirectoryService, RootService, Store};

fn granary(url: &str, args: &[&str]) -> Output {
    Command::new(granary_bin())
        .arg("--store")
        .arg(url)
        .args(args)
        .env_remove("GRANARY_TOKEN_FILE")
        .output()
        .expect("run granary")
}

fn ok(url: &str, args: &[&str]) -> Output {
    let out = granary(url, args);
    assert!(
        out.status.success(),
        "granary {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
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

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn round_trip_through_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 3 << 20);
    let d = Daemon::start(tmp.path(), &[]);

    let out = ok(
        &d.unix_url(),
        &["import", "--name", "tree", src.to_str().unwrap()],
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = printed.split('\t').next().unwrap().to_string();
    assert_eq!(digest.len(), 64, "{printed}");

    // The daemon's store holds it: read it through the daemon and directly.
    let roots = ok(&d.tcp_url(), &["roots"]);
    assert_eq!(String::from_utf8_lossy(&roots.stdout), "tree\n");
    let direct = ok(&d.store_url, &["ls", "tree"]);
    let remote = ok(&d.tcp_url(), &["ls", "tree"]);
    assert_eq!(direct.stdout, remote.stdout);
    assert!(String::from_utf8_lossy(&remote.stdout).contains("hello.txt"));
    let long = ok(&d.unix_url(), &["ls", "-l", &digest]);
    assert!(String::from_utf8_lossy(&long.stdout).contains("sizes"));

    let cat = ok(&d.tcp_url(), &["cat", "tree/sizes/f65536+0"]);
    assert_eq!(
        cat.stdout,
        std::fs::read(src.join("sizes/f65536+0")).unwrap()
    );

    for (i, url) in [d.unix_url(), d.tcp_url()].iter().enumerate() {
        let dest = tmp.path().join(format!("out{i}"));
        ok(url, &["export", "tree", dest.to_str().unwrap()]);
        assert_same_tree(&src, &dest);
        let diff = Command::new("diff")
            .args(["-r", "--no-dereference"])
            .arg(&src)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            diff.status.success(),
            "{}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }

    // The same tree again dedups to the same digest; info reports the daemon's counters.
    let again = ok(&d.tcp_url(), &["import", src.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&again.stdout).starts_with(&digest));
    let info = ok(&d.unix_url(), &["info"]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("daemon requests"), "{info}");
    assert!(info.contains("sessions done      2"), "{info}");

    // Errors are one line naming the thing.
    let e = fails(&d.unix_url(), &["cat", "tree/nope"]);
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn library_store_over_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &[]);
    rt().block_on(async {
        let s = store::open(&d.tcp_url()).await.unwrap();
        // A chunk put sends bytes; the daemon's digest must match.
        let data = bytes::Bytes::from(noise(100_000, 7));
        let dg = B3Digest::of(&data);
        s.blobs.put_chunk(dg, data.clone()).await.unwrap();
        assert_eq!(s.blobs.read_chunk(&dg).await.unwrap().unwrap(), data);
        // A wrong digest is refused, and nothing is stored under it.
        let wrong = B3Digest::of(b"something else");
        let e = s.blobs.put_chunk(wrong, data.clone()).await.unwrap_err();
        assert!(e.to_string().contains("daemon computed"), "{e}");
        assert!(s.blobs.read_chunk(&wrong).await.unwrap().is_none());
        // A blob index whose chunks do not hash to the claimed blob digest is refused.
        let meta = s.blobs.stat(&dg).await.unwrap().unwrap();
        let mut idx = meta.to_index();
        idx.chunks.push(idx.chunks[0].clone());
        idx.size *= 2;
        let e = s.blobs.put_blob_index(wrong, &idx).await.unwrap_err();
        assert!(e.to_string().contains("hash"), "{e}");
        assert!(s.blobs.stat(&wrong).await.unwrap().is_none());
        // A root pointing at nothing stored is refused.
        let e = s
            .roots
            .put(&RootRecord {
                name: "ghost".into(),
                node: Node::Directory {
                    digest: wrong,
                    size: 0,
                },
                nix: None,
                times: None,
                times_head: Vec::new(),
                traces: Vec::new(),
            })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not stored"), "{e}");
        assert!(s.roots.list().await.unwrap().is_empty());
        // A closure is checked as a graph before anything of it is stored.
        let remote = granary::store::remote::RemoteStore::connect(&d.unix_url())
            .await
            .unwrap();
        let child = Directory {
            files: vec![FileEntry {
                name: "f".into(),
                digest: dg.as_bytes().to_vec().into(),
                size: 100_000,
                executable: false,
            }],
            ..Default::default()
        };
        let parent = Directory {
            directories: vec![DirectoryEntry {
                name: "c".into(),
                digest: child.digest().as_bytes().to_vec().into(),
                size: 1,
            }],
            ..Default::default()
        };
        let stray = Directory {
            symlinks: vec![SymlinkEntry {
                name: "s".into(),
                target: "t".into(),
            }],
            ..Default::default()
        };
        let e = remote
            .put_closure(vec![parent.clone(), child.clone()])
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("neither sent before it nor stored"),
            "{e}"
        );
        let e = remote
            .put_closure(vec![child.clone(), stray.clone(), parent.clone()])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not reachable"), "{e}");
        let mut bad_size = parent.clone();
        bad_size.directories[0].size = 5;
        assert!(remote
            .put_closure(vec![child.clone(), bad_size])
            .await
            .is_err());
        for dir in [&child, &parent, &stray] {
            assert!(s.dirs.get(&dir.digest()).await.unwrap().is_none());
        }
        assert_eq!(
            remote
                .put_closure(vec![child.clone(), parent.clone()])
                .await
                .unwrap(),
            parent.digest()
        );
        assert_eq!(s.dirs.get(&child.digest()).await.unwrap().unwrap(), child);

        // A small blob comes inline with its stat: the read that follows costs no call.
        let small = bytes::Bytes::from(noise(1000, 8));
        let sd = B3Digest::of(&small);
        remote.put_chunk(sd, small.clone()).await.unwrap();
        let before = remote.stats().await.unwrap().requests;
        assert_eq!(remote.stat(&sd).await.unwrap().unwrap().size, 1000);
        assert_eq!(remote.read_chunk(&sd).await.unwrap().unwrap(), small);
        let after = remote.stats().await.unwrap().requests;
        assert_eq!(after - before, 2, "stat and this stats call only");

        // Absent things are absent, not errors.
        assert!(s.dirs.get(&wrong).await.unwrap().is_none());
        assert!(s.roots.get("nothing").await.unwrap().is_none());
    });
}

/// Imports a tree through the local store and returns its blobs' chunk digests.
async fn seed_store(url: &str, src: &Path) -> (Node, Vec<B3Digest>, Vec<B3Digest>) {
    let s = store::open(url).await.unwrap();
    let node =
        granary::trees::import::import_path(&s, src, &Default::default(), Default::default())
            .await
            .unwrap()
            .node;
    // Staged objects become visible to other processes (the daemon) once flushed.
    s.flush().await.unwrap();
    let mut blobs = Vec::new();
    let mut chunks = Vec::new();
    let Node::Directory { digest, .. } = node.clone() else {
        panic!("not a dir")
    };
    let mut stack = vec![digest];
    while let Some(d) = stack.pop() {
        let dir = s.dirs.get(&d).await.unwrap().unwrap();
        for e in &dir.directories {
            stack.push(B3Digest::try_from(&e.digest[..]).unwrap());
        }
        for f in &dir.files {
            let b = B3Digest::try_from(&f.digest[..]).unwrap();
            blobs.push(b);
            for c in s.blobs.stat(&b).await.unwrap().unwrap().chunks {
                chunks.push(c.digest);
            }
        }
    }
    (node, blobs, chunks)
}

/// A directory larger than gRPC's default 4 MiB message crosses the wire both ways.
#[test]
fn large_directories_cross_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &[]);
    let empty = B3Digest::of(b"");
    let dir = Directory {
        files: (0..150_000)
            .map(|i| FileEntry {
                name: format!("file-{i:07}").into(),
                digest: bytes::Bytes::copy_from_slice(empty.as_bytes()),
                size: 0,
                executable: false,
            })
            .collect(),
        ..Default::default()
    };
    let encoded = dir.encode_canonical().len();
    assert!(
        encoded > 4 << 20,
        "only {encoded} bytes: not past the default limit"
    );
    rt().block_on(async {
        let s = store::open(&d.unix_url()).await.unwrap();
        let digest = s.dirs.put(&dir).await.unwrap();
        assert_eq!(s.dirs.get(&digest).await.unwrap().unwrap(), dir);
        s.roots
            .put(&RootRecord {
                name: "wide".into(),
                node: Node::Directory {
                    digest,
                    size: dir.size().unwrap(),
                },
                nix: None,
                times: None,
                times_head: Vec::new(),
                traces: Vec::new(),
            })
            .await
            .unwrap();
    });
    // And through the CLI over TCP, from a fresh process.
    let out = ok(&d.tcp_url(), &["ls", "wide"]);
    let listed = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(listed, 150_000);
}

#[test]
fn many_concurrent_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 2 << 20);
    let store_url = format!("file://{}", tmp.path().join("store").display());
    let rt = rt();
    let (node, blobs, chunks) = rt.block_on(seed_store(&store_url, &src));
    let Node::Directory { digest: top, .. } = node.clone() else {
        panic!()
    };
    let d = Daemon::start(tmp.path(), &[]);
    let (threads0, fds0) = d.threads_and_fds();
    // Overlapping data every client puts: 16 shared pieces.
    let shared: Arc<Vec<bytes::Bytes>> = Arc::new(
        (0..16)
            .map(|i| bytes::Bytes::from(noise(20_000 + i * 1000, 1000 + i as u64)))
            .collect(),
    );
    let (blobs, chunks) = (Arc::new(blobs), Arc::new(chunks));
    let urls = [d.unix_url(), d.tcp_url()];
    let t0 = Instant::now();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..32usize {
            let url = urls[client % 2].clone();
            let (blobs, chunks, shared) = (blobs.clone(), chunks.clone(), shared.clone());
            let node = node.clone();
            tasks.spawn(async move {
                let s = granary::store::remote::RemoteStore::connect(&url)
                    .await
                    .unwrap();
                for i in 0..200usize {
                    let k = client * 7 + i;
                    match i % 5 {
                        0 => {
                            let b = blobs[k % blobs.len()];
                            assert!(s.stat(&b).await.unwrap().is_some());
                        }
                        1 => {
                            let c = chunks[k % chunks.len()];
                            let data = s.read_chunk(&c).await.unwrap().unwrap();
                            assert_eq!(B3Digest::of(&data), c);
                        }
                        2 => {
                            let want: Vec<B3Digest> =
                                (0..8).map(|j| chunks[(k + j) % chunks.len()]).collect();
                            let got = Arc::new(std::sync::Mutex::new(Vec::new()));
                            let sink: granary::store::ChunkSink = {
                                let got = got.clone();
                                Arc::new(move |d, r| got.lock().unwrap().push((d, r)))
                            };
                            let refs = want
                                .iter()
                                .map(|&digest| granary::store::ChunkRef { digest, size: 0 })
                                .collect();
                            s.read_chunks(refs, sink).await;
                            let got = std::mem::take(&mut *got.lock().unwrap());
                            assert_eq!(got.len(), want.len());
                            for (d, r) in got {
                                assert_eq!(B3Digest::of(&r.unwrap().unwrap()), d);
                            }
                        }
                        3 => {
                            let closure = s.get_closure(&top).await.unwrap();
                            assert!(closure.len() > 5);
                            assert_eq!(closure[0].digest(), top);
                            if i % 2 == 1 {
                                // Everyone puts the same directories back, leaves first.
                                let leaves_first: Vec<_> = closure.into_iter().rev().collect();
                                assert_eq!(s.put_closure(leaves_first).await.unwrap(), top);
                            }
                        }
                        _ => {
                            let data = shared[k % shared.len()].clone();
                            s.put_chunk(B3Digest::of(&data), data).await.unwrap();
                            RootService::put(
                                &s,
                                &RootRecord {
                                    name: "shared".into(),
                                    node: node.clone(),
                                    nix: None,
                                    times: None,
                                    times_head: Vec::new(),
                                    traces: Vec::new(),
                                },
                            )
                            .await
                            .unwrap();
                        }
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("client task");
        }
    });
    eprintln!("32 x 200 requests in {:?}", t0.elapsed());

    // One copy of each shared piece, loose or packed; the root is there once.
    let chunk_files = common::walk_files(&tmp.path().join("store/chunks"));
    let packed = common::packed_entries(&tmp.path().join("store"));
    for piece in shared.iter() {
        let hex = B3Digest::of(piece).to_hex();
        let n = chunk_files
            .iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy() == hex)
            .count()
            + packed
                .iter()
                .filter(|(_, e)| e.kind == 0 && e.hex == hex)
                .count();
        assert_eq!(n, 1, "chunk {hex}");
    }
    assert!(!chunk_files.iter().any(|p| p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".tmp")));
    assert_eq!(
        String::from_utf8_lossy(&ok(&d.unix_url(), &["roots"]).stdout),
        "shared\n"
    );

    // Still prompt, and nothing leaked: connections closed, threads back near the start.
    let t = Instant::now();
    ok(&d.tcp_url(), &["ls", "shared"]);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (threads, fds) = d.threads_and_fds();
        // Blocking-pool threads linger for a while after a burst; bound them, not zero them.
        if fds <= fds0 + 4 && threads <= threads0 + 512 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "daemon holds {fds} fds (started with {fds0}), {threads} threads (started with {threads0})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = rt.block_on(async {
        let s = granary::store::remote::RemoteStore::connect(&d.unix_url())
            .await
            .unwrap();
        s.stats().await.unwrap()
    });
    assert!(stats.requests >= 32 * 200, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.in_flight, 0, "{stats:?}");
}

#[test]
fn feature_negotiation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        tmp.path(),
        &[
            "--disable-feature",
            "closure-get",
            "--disable-feature",
            "ingest-sessions",
        ],
    );
    // A client requiring what the daemon lacks is told which feature.
    let url = format!("{}?require=closure-get", d.unix_url());
    let e = fails(&url, &["roots"]);
    assert!(e.contains("closure-get"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let url = format!("{}?require=teleport", d.tcp_url());
    let e = fails(&url, &["roots"]);
    assert!(e.contains("\"teleport\""), "{e}");
    // Without that requirement the same daemon serves normally: import goes object by
    // object (chunks, blob indexes checked by the daemon, directories, root) instead of
    // through an ingest session, and reads walk directory by directory.
    let src = tmp.path().join("src");
    gen_tree(&src, 1 << 20);
    ok(
        &d.unix_url(),
        &["import", "--name", "t", src.to_str().unwrap()],
    );
    let dest = tmp.path().join("out");
    ok(&d.tcp_url(), &["export", "t", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    let e = fails(
        &d.unix_url(),
        &["import", "--no-wait", src.to_str().unwrap()],
    );
    assert!(e.contains("ingest sessions"), "{e}");
    // Unknown features from a client are ignored, and the intersection is returned.
    rt().block_on(async {
        let mut api = granary::store::remote::wire::proto::granary_client::GranaryClient::connect(
            format!("http://{}", d.addr),
        )
        .await
        .unwrap();
        let resp = api
            .handshake(granary::store::remote::wire::proto::HandshakeRequest {
                features: vec![
                    "chunked-read".into(),
                    "x-from-the-future".into(),
                    "closure-get".into(),
                ],
                required: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.features, vec!["chunked-read".to_string()]);
        assert!(!resp.offered.contains(&"closure-get".to_string()));
        // And the missing feature is refused on the call itself.
        let e = api
            .get_closure(granary::store::remote::wire::proto::DigestRequest {
                digest: vec![0u8; 32].into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    });
}

#[test]
fn token_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "guess").unwrap();
    let d = Daemon::start(tmp.path(), &["--token-file", token.to_str().unwrap()]);
    let e = fails(&d.tcp_url(), &["roots"]);
    assert!(e.to_lowercase().contains("unauthenticated"), "{e}");
    let e = fails(
        &format!("{}?token_file={}", d.tcp_url(), wrong.display()),
        &["roots"],
    );
    assert!(e.contains("wrong bearer token"), "{e}");
    ok(
        &format!("{}?token_file={}", d.unix_url(), token.display()),
        &["roots"],
    );
    let out = Command::new(granary_bin())
        .arg("--store")
        .arg(d.tcp_url())
        .arg("roots")
        .env("GRANARY_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A non-loopback listen address without a token refuses to start, binding nothing.
    let port = free_port();
    let t = Instant::now();
    let out = Command::new(granary_bin())
        .arg("--store")
        .arg(format!("file://{}", tmp.path().join("store2").display()))
        .args(["daemon", "--listen", &format!("0.0.0.0:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--token-file"), "{e}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn daemon_killed_then_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_big(&src.join("big"), 8 << 20, 3);
    let mut d = Daemon::start(tmp.path(), &[]);
    ok(
        &d.unix_url(),
        &["import", "--name", "big", src.to_str().unwrap()],
    );
    let timeout = Duration::from_secs(2);
    rt().block_on(async {
        let s = store::open(&format!("{}?timeout=2s", d.tcp_url()))
            .await
            .unwrap();
        let node = s.roots.get("big").await.unwrap().unwrap().node;
        let Node::Directory { digest, .. } = node else {
            panic!()
        };
        let dir = s.dirs.get(&digest).await.unwrap().unwrap();
        let blob = B3Digest::try_from(&dir.files[0].digest[..]).unwrap();
        let chunks = s.blobs.stat(&blob).await.unwrap().unwrap().chunks;
        // A read loop runs while the daemon is killed.
        let reader = {
            let s: Store = s.clone();
            let chunks = chunks.clone();
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                let mut errors = 0;
                let mut i = 0;
                let end = Instant::now() + Duration::from_secs(4);
                while Instant::now() < end {
                    let t = Instant::now();
                    let r = s.blobs.read_chunk(&chunks[i % chunks.len()].digest).await;
                    worst = worst.max(t.elapsed());
                    match r {
                        Ok(Some(b)) => {
                            assert_eq!(B3Digest::of(&b), chunks[i % chunks.len()].digest)
                        }
                        Ok(None) => panic!("chunk vanished"),
                        Err(_) => errors += 1,
                    }
                    i += 1;
                }
                (worst, errors)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        d.kill9();
        let (worst, errors) = reader.await.unwrap();
        assert!(errors > 0, "reads kept succeeding with the daemon dead");
        // Every call ends within its deadline (plus scheduling slack), never hangs.
        assert!(
            worst < timeout + Duration::from_secs(1),
            "a read took {worst:?}"
        );
        let t = Instant::now();
        let e = s.roots.list().await.unwrap_err();
        assert!(t.elapsed() < timeout + Duration::from_secs(1));
        assert!(!e.to_string().is_empty());
        // Restarted: the same client reconnects by itself.
        d.spawn();
        let t = Instant::now();
        let data = s
            .blobs
            .read_chunk(&chunks[0].digest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(B3Digest::of(&data), chunks[0].digest);
        assert!(t.elapsed() < timeout, "{:?}", t.elapsed());
        assert_eq!(s.roots.list().await.unwrap(), vec!["big".to_string()]);
    });
}

/// Faults the proxy injects on each connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every forwarded read waits this long.
    Delay(Duration),
    /// Closes both sides after this many bytes from the daemon.
    DropAfter(usize),
    /// Forwards this many bytes from the client, then silently stops forwarding (the
    /// connection stays open).
    TruncateUpload(usize),
    /// Forwards this many bytes from the daemon, then silently stops forwarding.
    StallAfter(usize),
    /// Accepts and never forwards anything.
    Blackhole,
}

/// A TCP proxy in front of the daemon that injects `fault` on every connection.
async fn fault_proxy(upstream: SocketAddr, fault: Fault) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let lis = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = lis.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = lis.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Fault::Blackhole = fault {
                    let _hold = client;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    let mut sent = 0usize;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if let Fault::Delay(t) = fault {
                            tokio::time::sleep(t).await;
                        }
                        if let Fault::TruncateUpload(limit) = fault {
                            if sent + n > limit {
                                let _ = sw.write_all(&buf[..limit.saturating_sub(sent)]).await;
                                // Stall: keep the connection open, forward nothing more.
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                                return;
                            }
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                });
                let mut buf = vec![0u8; 16 << 10];
                let mut got = 0usize;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Fault::Delay(t) = fault {
                        tokio::time::sleep(t).await;
                    }
                    if let Fault::DropAfter(limit) = fault {
                        if got + n > limit {
                            let _ = cw.write_all(&buf[..limit - got]).await;
                            break;
                        }
                    }
                    if let Fault::StallAfter(limit) = fault {
                        if got + n > limit {
                            let _ = cw.write_all(&buf[..limit - got]).await;
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            break;
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    got += n;
                }
                up.abort();
            });
        }
    });
    addr
}

#[test]
fn fault_injecting_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_big(&src.join("big"), 6 << 20, 9);
    let d = Daemon::start(tmp.path(), &[]);
    ok(
        &d.unix_url(),
        &["import", "--name", "big", src.to_str().unwrap()],
    );
    let want = std::fs::read(src.join("big")).unwrap();
    let blob = B3Digest::of(&want);
    let timeout = Duration::from_millis(1500);
    let slack = Duration::from_millis(1000);
    rt().block_on(async {
        for fault in [
            Fault::Delay(Duration::from_millis(30)),
            Fault::DropAfter(300_000),
            Fault::DropAfter(5_000),
            Fault::StallAfter(400_000),
            Fault::Blackhole,
        ] {
            let proxy = fault_proxy(d.addr, fault).await;
            let url = format!("grpc+tcp://{proxy}?timeout=1500ms&connect_timeout=500ms");
            let t = Instant::now();
            let opened = store::open(&url).await;
            assert!(
                t.elapsed() < timeout + slack,
                "{fault:?}: open took {:?}",
                t.elapsed()
            );
            let s = match opened {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{fault:?}: open failed in {:?}: {e}", t.elapsed());
                    continue;
                }
            };
            for _ in 0..3 {
                let t = Instant::now();
                let mut out = Vec::new();
                let r = granary::trees::write_blob(&s, &blob, want.len() as u64, &mut out).await;
                // Each chunk read has its own deadline; a whole-blob read is several.
                assert!(
                    t.elapsed() < (timeout + slack) * 8,
                    "{fault:?}: whole read took {:?}",
                    t.elapsed()
                );
                eprintln!(
                    "{fault:?}: read in {:?}: {:?}",
                    t.elapsed(),
                    r.as_ref().map_err(|e| e.to_string())
                );
                match r {
                    Ok(n) => {
                        assert_eq!(n as usize, want.len());
                        assert!(out == want, "{fault:?}: wrong bytes");
                    }
                    Err(e) => {
                        // What was written before the error is a correct prefix.
                        assert!(want.starts_with(&out), "{fault:?}: wrong bytes before {e}");
                    }
                }
                let t = Instant::now();
                let _ = s.roots.list().await;
                assert!(
                    t.elapsed() < timeout + slack,
                    "{fault:?}: list took {:?}",
                    t.elapsed()
                );
            }
        }

        // A truncated upload: the daemon never sees the end, so nothing is committed.
        let up = tmp.path().join("up");
        write_big(&up.join("payload"), 3 << 20, 77);
        let payload_digest = B3Digest::of(&std::fs::read(up.join("payload")).unwrap());
        let proxy = fault_proxy(d.addr, Fault::TruncateUpload(1 << 20)).await;
        let url = format!("grpc+tcp://{proxy}?timeout=1500ms");
        let t = Instant::now();
        let out = tokio::process::Command::new(granary_bin())
            .args(["--store", &url, "import", "--name", "truncated"])
            .arg(&up)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "truncated import succeeded");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        // And a truncated blob put through the library.
        if let Ok(s) = store::open(&url).await {
            let data = bytes::Bytes::from(noise(2 << 20, 4242));
            assert!(s.blobs.put_chunk(B3Digest::of(&data), data).await.is_err());
        }
        let direct = store::open(&d.unix_url()).await.unwrap();
        assert_eq!(direct.roots.list().await.unwrap(), vec!["big".to_string()]);
        assert!(direct.blobs.stat(&payload_digest).await.unwrap().is_none());
        let tmp_files: Vec<_> = common::walk_files(&tmp.path().join("store"))
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(tmp_files.is_empty(), "{tmp_files:?}");
    });
}

#[test]
fn ingest_session_outlives_client() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 0);
    for i in 0..6 {
        write_big(&src.join(format!("big{i}")), 6 << 20, 50 + i);
    }
    let d = Daemon::start(tmp.path(), &["--session-retention", "3s"]);
    let out = ok(
        &d.unix_url(),
        &[
            "import",
            "--no-wait",
            "--name",
            "later",
            src.to_str().unwrap(),
        ],
    );
    // The client has exited; the session goes on without it.
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = line.split('\t').next().unwrap().trim().to_string();
    assert_eq!(token.len(), 32, "{line}");
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let done = loop {
        let out = granary(&d.tcp_url(), &["ingest-status", &token]);
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{s} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push(s.split(' ').next().unwrap_or("").to_string());
        if s.starts_with("done ") {
            break s;
        }
        assert!(s.starts_with("running "), "{s}");
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("states seen: {seen:?}");
    // The first poll came after the client exited, and the import was still going.
    assert_eq!(seen[0], "running", "{seen:?}");
    let digest = done.trim().strip_prefix("done ").unwrap().to_string();
    let dest = tmp.path().join("out");
    ok(&d.unix_url(), &["export", "later", dest.to_str().unwrap()]);
    assert_same_tree(&src, &dest);
    let ls = ok(&d.unix_url(), &["ls", "-l", &digest]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("big5"));

    // Unknown tokens are a clear error; finished sessions are forgotten after retention.
    let e = fails(
        &d.unix_url(),
        &["ingest-status", "0123456789abcdef0123456789abcdef"],
    );
    assert!(e.contains("no ingest session"), "{e}");
    std::thread::sleep(Duration::from_secs(5));
    let e = fails(&d.unix_url(), &["ingest-status", &token]);
    assert!(e.contains("no ingest session"), "{e}");
}

#[test]
fn sigterm_drains_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(tmp.path(), &["--drain-timeout", "3s"]);
    ok(&d.unix_url(), &["roots"]);
    let mut child = d.child.take().unwrap();
    let t = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!d.sock.exists(), "socket left behind");
}

#[test]
fn ingest_rejects_bad_framing() {
    use granary::store::remote::wire::proto::{
        granary_client::GranaryClient, ingest_entry::Kind, ingest_frame::Frame, IngestEnd,
        IngestEntry, IngestFrame, IngestHeader,
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), &[]);
    let entry = |path: &str, kind: Kind, size: u64| {
        Frame::Entry(IngestEntry {
            path: path.as_bytes().to_vec().into(),
            kind: kind as i32,
            executable: false,
            size,
            target: if kind == Kind::Symlink {
                "t".into()
            } else {
                Default::default()
            },
            mtime_ns: None,
        })
    };
    let header = || {
        Frame::Header(IngestHeader {
            root_name: "bad".into(),
        })
    };
    let end = |entries, bytes| Frame::End(IngestEnd { entries, bytes });
    let cases: Vec<(&str, Vec<Frame>)> = vec![
        (
            "first frame must be a header",
            vec![entry("", Kind::Directory, 0)],
        ),
        (
            "parent was not sent",
            vec![
                header(),
                entry("", Kind::Directory, 0),
                entry("a/b", Kind::File, 0),
            ],
        ),
        (
            "beyond the size",
            vec![
                header(),
                entry("", Kind::Directory, 0),
                entry("f", Kind::File, 2),
                Frame::Data(vec![1, 2, 3].into()),
            ],
        ),
        (
            "truncated",
            vec![
                header(),
                entry("", Kind::Directory, 0),
                entry("f", Kind::File, 3),
                Frame::Data(vec![1, 2, 3].into()),
            ],
        ),
        (
            "end frame counts",
            vec![header(), entry("", Kind::Directory, 0), end(5, 0)],
        ),
        (
            "invalid name",
            vec![
                header(),
                entry("", Kind::Directory, 0),
                entry("..", Kind::File, 0),
            ],
        ),
        (
            "sent twice",
            vec![
                header(),
                entry("", Kind::Directory, 0),
                entry("x", Kind::Symlink, 0),
                entry("x", Kind::Symlink, 0),
            ],
        ),
    ];
    rt().block_on(async {
        let mut api = GranaryClient::connect(format!("http://{}", d.addr))
            .await
            .unwrap();
        for (want, frames) in cases {
            let frames: Vec<IngestFrame> = frames
                .into_iter()
                .map(|f| IngestFrame { frame: Some(f) })
                .collect();
            let e = api
                .ingest_start(futures::stream::iter(frames))
                .await
                .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{want}: {e}");
            assert!(e.message().contains(want), "{want}: {}", e.message());
        }
        let stats = api
            .stats(granary::store::remote::wire::proto::StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.sessions_started, 0);
    });
    assert_eq!(
        String::from_utf8_lossy(&ok(&d.unix_url(), &["roots"]).stdout),
        ""
    );
}

#[test]
fn gc_and_verify_through_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    gen_tree(&a, 0);
    gen_tree(&b, 0);
    common::write(&b.join("only-b.bin"), &noise(900_000, 77), false);
    let d = Daemon::start(tmp.path(), &[]);
    let url = d.unix_url();
    ok(&url, &["import", "--name", "a", a.to_str().unwrap()]);
    ok(&url, &["import", "--name", "b", b.to_str().unwrap()]);
    ok(&url, &["rm", "b"]);
    let out = ok(&url, &["gc", "--grace", "0s"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!text.starts_with("deleted 0 objects"), "{text}");
    // Nothing is left for a gc run on the store itself, and everything still verifies.
    let local = d.store_url.clone();
    let again = String::from_utf8_lossy(&ok(&local, &["gc", "--grace", "0s"]).stdout).into_owned();
    assert!(again.starts_with("deleted 0 objects"), "{again}");
    assert!(String::from_utf8_lossy(&ok(&url, &["verify"]).stdout).contains("ok: no problems"));
    let dest = tmp.path().join("out");
    ok(&url, &["export", "a", dest.to_str().unwrap()]);
    assert_same_tree(&a, &dest);

    // A corrupt chunk is found through the daemon, with the root it affects.
    let hello = blake3::hash(b"hello\n").to_hex().to_string();
    // "hello\n" is stored as a raw zstd block: flip its first letter into "jello\n".
    common::tamper(&tmp.path().join("store"), "chunks", &hello, |raw| {
        let at = raw.windows(6).position(|w| w == b"hello\n").unwrap();
        raw[at] = b'j';
    });
    let v = granary(&url, &["verify"]);
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{text}");
    assert!(text.contains(&hello) && text.contains("roots: a"), "{text}");
}

#[test]
fn other_users_cannot_change_the_store_through_the_default_listeners() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // Directories anyone may traverse: only the daemon's own permissions protect it.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_dir = tmp.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = format!("file://{}", tmp.path().join("store").display());
    let src = tmp.path().join("src");
    write(&src.join("f"), b"mine\n", false);
    ok(&store, &["import", "--name", "t", src.to_str().unwrap()]);
    let mut child = Command::new(granary_bin())
        .args(["--store", &store, "daemon"])
        .env("XDG_RUNTIME_DIR", &run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sock = run_dir.join("granary/daemon.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no socket");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("daemon exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let child = Kill(child);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert_eq!(
        mode(&run_dir.join("granary")),
        0o700,
        "socket directory mode"
    );
    // Its owner uses it.
    let unix = format!("grpc+unix://{}", sock.display());
    ok(&unix, &["roots"]);
    // Nobody else can, and there is no TCP listener to go around it.
    for url in [
        unix.as_str(),
        "grpc+tcp://127.0.0.1:7411?connect_timeout=1s&timeout=2s",
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(granary_bin())
            .args(["--store", url, "rm", "t"])
            .env_remove("GRANARY_TOKEN_FILE")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "uid 65534 removed a root through {url}"
        );
    }
    let roots = String::from_utf8(ok(&unix, &["roots"]).stdout).unwrap();
    assert_eq!(roots.trim(), "t");
    drop(child);

    // TCP, even on loopback, needs a token unless explicitly allowed.
    let port = free_port();
    let out = granary(
        &store,
        &["daemon", "--listen", &format!("127.0.0.1:{port}")],
    );
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--token-file") && e.contains("--allow-unauthenticated-tcp"),
        "{e}"
    );

    // A read-only token reads, and may not write or delete.
    let (full, ro) = (tmp.path().join("full"), tmp.path().join("ro"));
    std::fs::write(&full, "full-token").unwrap();
    std::fs::write(&ro, "read-only-token").unwrap();
    let d = Daemon::start(
        tmp.path(),
        &[
            "--token-file",
            full.to_str().unwrap(),
            "--read-only-token-file",
            ro.to_str().unwrap(),
        ],
    );
    let ro_url = format!("{}?token_file={}", d.tcp_url(), ro.display());
    assert_eq!(
        String::from_utf8(ok(&ro_url, &["cat", "t/f"]).stdout).unwrap(),
        "mine\n"
    );
    for args in [
        &["rm", "t"][..],
        &["gc", "--grace", "0s"][..],
        &["import", src.to_str().unwrap()][..],
    ] {
        let e = fails(&ro_url, args);
        assert!(e.contains("read-only token"), "{args:?}: {e}");
    }
    let full_url = format!("{}?token_file={}", d.tcp_url(), full.display());
    ok(&full_url, &["rm", "t"]);
}

/// Every entry's (mtime s, ns) below `root`, by relative path.
fn mtimes_below(root: &Path) -> Vec<(std::path::PathBuf, (i64, i64))> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((
            p.strip_prefix(root).unwrap().to_path_buf(),
            (m.mtime(), m.mtime_nsec()),
        ));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn import_through_a_daemon_records_times_like_a_local_import() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 0);
    let d = Daemon::start(tmp.path(), &[]);
    let url = d.unix_url();
    ok(&url, &["import", "--name", "timed", src.to_str().unwrap()]);
    ok(
        &url,
        &[
            "import",
            "--no-times",
            "--name",
            "plain",
            src.to_str().unwrap(),
        ],
    );
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&url, &["export", "timed", a.to_str().unwrap()]);
    ok(&url, &["export", "plain", b.to_str().unwrap()]);
    let want = mtimes_below(&src);
    assert_eq!(mtimes_below(&a), want, "times through an ingest session");
    assert!(
        mtimes_below(&b).iter().all(|(_, t)| *t == (1, 0)),
        "--no-times through the daemon recorded times"
    );
    // The same table as a local import of the tree writes (same digest: same records).
    let local = tmp.path().join("local");
    let l = format!("file://{}", local.display());
    ok(&l, &["import", "--name", "timed", src.to_str().unwrap()]);
    let c = tmp.path().join("c");
    ok(&l, &["export", "timed", c.to_str().unwrap()]);
    assert_eq!(mtimes_below(&c), want);
}
