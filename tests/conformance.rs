//! The one store contract suite (`granary::store::conformance::check`) run against every
//! backend and layer, each opened by URL as a user would: `memory://`, a local store with
//! packs and one with loose objects, the disk cache in front of a local store, an in-process daemon
//! (`views::rpc::serve`) over a Unix socket, and `s3://` against a real moto server. Where the test can reach the
//! backend's storage it damages objects behind the store's back and the suite checks that
//! reads fail naming the object.

mod common;
mod moto;

use std::path::Path;

use common::*;
use granary::model::castore::B3Digest;
use granary::store::{self, conformance, ObjectKind, StoreConfig};

/// The damage every backend's objects get: one byte flipped in the middle.
fn flip_middle(raw: &mut [u8]) {
    let mid = raw.len() / 2;
    raw[mid] ^= 0x5a;
}

/// Flips one byte in the middle of a stored object of the local store at `dir`.
fn damage_local(dir: &Path, kind: ObjectKind, d: &B3Digest) {
    tamper(dir, kind.dir(), &d.to_hex(), |raw| flip_middle(raw));
}

fn run(store: &store::Store, corrupt: Option<conformance::Corrupt<'_>>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(conformance::check(store, corrupt)) {
        panic!("{}: {e}", store.url);
    }
}

fn open(url: &str) -> store::Store {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(store::open(url))
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[test]
fn memory() {
    run(&open("memory://"), None);
}

#[test]
fn local_with_packs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let s = open(&format!("file://{}", path.display()));
    assert!(s.config.packs, "a new local store packs its objects");
    run(&s, Some(&|k, d| damage_local(&path, k, d)));
    assert!(
        !packed_entries(&path).is_empty(),
        "the suite's objects went into packs"
    );
}

#[test]
fn local_loose() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("config.toml"), StoreConfig::loose().to_toml()).unwrap();
    let s = open(&format!("file://{}", path.display()));
    assert!(!s.config.packs);
    run(&s, Some(&|k, d| damage_local(&path, k, d)));
    assert!(
        walk_files(&path.join("chunks")).len() > 3,
        "the suite's chunks are loose files"
    );
}

#[test]
fn disk_cache_over_local() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let url = format!("file://{}", path.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt
        .block_on(store::cache::open(
            &url,
            &dir.path().join("cache"),
            64 << 20,
        ))
        .unwrap();
    drop(rt);
    // Damage both copies: the cache's (it drops it and refetches) and the store's.
    let cache = dir.path().join("cache");
    run(
        &s,
        Some(&|k, d| {
            damage_local(&path, k, d);
            let hex = d.to_hex();
            let entry = cache.join(k.dir()).join(&hex[..2]).join(&hex);
            if let Ok(mut raw) = std::fs::read(&entry) {
                flip_middle(&mut raw);
                std::fs::write(&entry, raw).unwrap();
            }
        }),
    );
}

#[test]
fn in_process_daemon_over_unix_socket() {
    use granary::views::rpc::serve::{serve, Listen, ServeConfig};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let sock = dir.path().join("d.sock");
    let cfg = ServeConfig {
        listens: vec![Listen::Unix(sock.clone())],
        token: None,
        read_only: None,
        allow_unauthenticated_tcp: false,
        drain: std::time::Duration::from_secs(5),
        session_retention: std::time::Duration::from_secs(60),
        spool_dir: dir.path().to_path_buf(),
        max_ingest: 1 << 30,
        disabled_features: vec![],
    };
    // The daemon runs on a runtime of its own, in this process, until told to stop.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let local = rt
        .block_on(store::open(&format!("file://{}", path.display())))
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let server = rt.spawn(serve(
        local,
        cfg,
        move |addr| {
            let _ = up_tx.send(addr.to_string());
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = up_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("daemon listening");
    assert!(addr.contains("d.sock"), "{addr}");
    let s = open(&format!("grpc+unix://{}", sock.display()));
    assert!(s.ingest.is_some(), "a daemon store takes uploads");
    run(&s, Some(&|k, d| damage_local(&path, k, d)));
    drop(s);
    let _ = stop.send(());
    let (counters, drained) = rt.block_on(server).unwrap().unwrap();
    assert!(drained, "the daemon drained");
    assert!(
        counters
            .chunk_read_calls
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn s3_against_moto() {
    moto::set_credentials();
    let m = moto::Moto::start();
    m.create_bucket("conf");
    let s = open(&m.url("conf/p"));
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("conf")
        .with_endpoint(format!("http://127.0.0.1:{}", m.port))
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .build()
        .unwrap();
    // Damage is done with signed requests of its own, on a thread of its own (the suite calls
    // this from inside its runtime).
    let damage = |k: ObjectKind, d: &B3Digest| {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        std::thread::scope(|t| {
            t.spawn(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    // Puts go into packs: find the object through the packs' indexes.
                    let listed: Vec<_> = bucket
                        .list(Some(&object_store::path::Path::from("p/packs")))
                        .try_collect()
                        .await
                        .unwrap();
                    for m in &listed {
                        let name = m.location.filename().unwrap().to_string();
                        let Some(id) = name.strip_suffix(".idx") else {
                            continue;
                        };
                        let idx = bucket
                            .get(&m.location)
                            .await
                            .unwrap()
                            .bytes()
                            .await
                            .unwrap();
                        let entries = store::pack::decode_index(id, &idx, u64::MAX).unwrap();
                        let Some(e) = entries.iter().find(|e| e.kind == k && e.digest == *d) else {
                            continue;
                        };
                        let key = object_store::path::Path::from(format!("p/packs/{id}.pack"));
                        let mut body = bucket
                            .get(&key)
                            .await
                            .unwrap()
                            .bytes()
                            .await
                            .unwrap()
                            .to_vec();
                        let (off, len) = (e.offset as usize, e.len as usize);
                        match e.member {
                            // Damage the object itself, not whichever neighbour sits
                            // mid-frame.
                            Some(m) => {
                                let frame = &body[off..off + len];
                                let (mo, ml) = (m.offset as usize, m.len as usize);
                                let new =
                                    rewrite_member(frame, mo, ml, |o| flip_middle(o)).unwrap();
                                body[off..off + len].copy_from_slice(&new);
                            }
                            None => flip_middle(&mut body[off..off + len]),
                        }
                        bucket.put(&key, body.into()).await.unwrap();
                        return;
                    }
                    panic!("{} {d} is in no pack", k.what());
                });
            })
            .join()
            .unwrap()
        });
    };
    run(&s, Some(&damage));
}

/// gc on S3 beside an import whose view of the packs is older than gc's record: the import
/// reuses an object gc found dead, and the next gc keeps it (from the import's keep marker)
/// while deleting the rest of the garbage and the old pack.
#[test]
fn s3_gc_keeps_what_an_import_with_an_old_view_reused() {
    use granary::model::castore::{Node, RootRecord};
    moto::set_credentials();
    let m = moto::Moto::start();
    m.create_bucket("gcrace");
    let url = m.url("gcrace");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let root = |name: &str, d: B3Digest, size: u64| RootRecord {
            name: name.into(),
            node: Node::File {
                digest: d,
                size,
                executable: false,
            },
            nix: None,
            times: None,
            times_head: Vec::new(),
            traces: Vec::new(),
        };
        let put = |s: &store::Store, data: Vec<u8>| {
            let s = s.clone();
            async move {
                let d = B3Digest::of(&data);
                s.blobs.put_chunk(d, data.into()).await.unwrap();
                d
            }
        };
        let first = store::open(&url).await.unwrap();
        let (kept, garbage) = (conformance::noise(40_000, 1), conformance::noise(40_000, 2));
        let x = put(&first, kept.clone()).await;
        let y = put(&first, garbage.clone()).await;
        first.roots.put(&root("old", x, 40_000)).await.unwrap();
        first.roots.put(&root("older", y, 40_000)).await.unwrap();
        first.roots.delete("old").await.unwrap();
        first.roots.delete("older").await.unwrap();

        // An importer lists the packs now, before gc records anything.
        let importer = store::open(&url).await.unwrap();
        assert!(importer.blobs.has_chunk(&x).await.unwrap());
        let gc = store::open(&url).await.unwrap();
        let zero = std::time::Duration::ZERO;
        let r = granary::trees::gc::gc(&gc, zero, false).await.unwrap();
        assert!(r.deleted >= 2, "{r:?}");
        // The importer reuses x from the pack gc has doomed, and commits a root to it.
        put(&importer, kept.clone()).await;
        importer.roots.put(&root("new", x, 40_000)).await.unwrap();

        granary::trees::gc::gc(&gc, zero, false).await.unwrap();
        let fresh = store::open(&url).await.unwrap();
        let got = fresh.blobs.read_chunk(&x).await.unwrap();
        assert!(
            got.as_deref() == Some(&kept[..]),
            "a reused object was lost"
        );
        assert!(
            fresh.blobs.read_chunk(&y).await.unwrap().is_none(),
            "garbage is still there"
        );
    });
}
