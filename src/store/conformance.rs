//! One suite of contract checks, run against every backend that can be built in-process.

use bytes::Bytes;

use super::{open, BlobReader, Store, StoreError};
use crate::model::castore::{B3Digest, Directory, DirectoryEntry, FileEntry, Node, RootRecord};
use crate::model::chunking::chunk_all;
use crate::trees::import::{import_path, ImportOptions};

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

async fn put_blob(store: &Store, data: &[u8]) -> B3Digest {
    let chunks = chunk_all(store.params(), data);
    let mut metas = Vec::new();
    for c in &chunks {
        let d = B3Digest::of(c);
        store.blobs.put_chunk(d, c.clone()).await.unwrap();
        metas.push(super::ChunkRef {
            digest: d,
            size: c.len() as u64,
        });
    }
    let mut tree = super::outboard::TreeHasher::new();
    tree.update(data);
    let (digest, outboard) = tree.finish();
    if chunks.len() > 1 {
        let meta = super::BlobMeta {
            size: data.len() as u64,
            chunks: metas,
            outboard: outboard.into(),
        };
        store
            .blobs
            .put_blob_index(digest, &meta.to_index())
            .await
            .unwrap();
    }
    digest
}

async fn suite(store: Store) {
    // Blobs: absent, single chunk, multi chunk, random access, idempotent puts.
    let missing = B3Digest::of(b"never stored");
    assert!(store.blobs.stat(&missing).await.unwrap().is_none());
    assert!(store.blobs.read_chunk(&missing).await.unwrap().is_none());
    let empty = store.blobs.stat(&B3Digest::of(b"")).await.unwrap().unwrap();
    assert_eq!(empty.size, 0);

    let small = b"small blob".to_vec();
    let d_small = put_blob(&store, &small).await;
    let st = store.blobs.stat(&d_small).await.unwrap().unwrap();
    assert_eq!((st.size, st.chunks.len()), (small.len() as u64, 1));
    assert_eq!(
        st.chunks[0].digest, d_small,
        "single-chunk blob is its chunk"
    );

    let big = noise(1_500_000, 3);
    let d_big = put_blob(&store, &big).await;
    assert_eq!(put_blob(&store, &big).await, d_big, "idempotent");
    let st = store.blobs.stat(&d_big).await.unwrap().unwrap();
    assert!(st.chunks.len() > 2);
    let r = BlobReader::open(store.blobs.clone(), d_big).await.unwrap();
    for (off, len) in [(0, 10), (65_530, 200_000), (1_499_990, 100), (2_000_000, 5)] {
        let got = r.read_at(off, len).await.unwrap();
        let end = (off as usize + len).min(big.len());
        let want = if (off as usize) < big.len() {
            &big[off as usize..end]
        } else {
            &[][..]
        };
        assert_eq!(&got[..], want, "read_at({off}, {len})");
    }

    // Directories: children must exist first and agree with their sizes.
    let leaf = Directory {
        files: vec![FileEntry {
            name: Bytes::from_static(b"f"),
            digest: Bytes::copy_from_slice(d_small.as_bytes()),
            size: small.len() as u64,
            executable: false,
        }],
        ..Default::default()
    };
    let parent = |size| Directory {
        directories: vec![DirectoryEntry {
            name: Bytes::from_static(b"sub"),
            digest: Bytes::copy_from_slice(leaf.digest().as_bytes()),
            size,
        }],
        ..Default::default()
    };
    assert!(matches!(
        store.dirs.put(&parent(1)).await,
        Err(StoreError::NotFound { .. })
    ));
    let d_leaf = store.dirs.put(&leaf).await.unwrap();
    assert_eq!(d_leaf, leaf.digest());
    assert!(store.dirs.put(&parent(5)).await.is_err(), "size mismatch");
    let d_parent = store.dirs.put(&parent(1)).await.unwrap();
    assert_eq!(store.dirs.get(&d_parent).await.unwrap().unwrap(), parent(1));
    assert!(store.dirs.has(&d_leaf).await.unwrap());
    // Batches answer in the order asked, absent ones as None.
    let many = store
        .dirs
        .get_many(vec![d_parent, missing, d_leaf])
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>();
    assert_eq!(many, vec![Some(parent(1)), None, Some(leaf.clone())]);
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink: super::ChunkSink = {
        let got = got.clone();
        std::sync::Arc::new(move |d, r| got.lock().unwrap().push((d, r.unwrap())))
    };
    let mut chunks = st.chunks.clone();
    chunks.push(super::ChunkRef {
        digest: missing,
        size: 1,
    });
    store.blobs.read_chunks(chunks.clone(), sink).await;
    let mut got = std::mem::take(&mut *got.lock().unwrap());
    assert_eq!(got.len(), chunks.len(), "every chunk answered once");
    got.sort_by_key(|(d, _)| chunks.iter().position(|c| c.digest == *d));
    let mut joined = Vec::new();
    for (d, r) in &got[..got.len() - 1] {
        let b = r.as_ref().unwrap_or_else(|| panic!("chunk {d} missing"));
        joined.extend_from_slice(b);
    }
    assert_eq!(joined, big, "batch chunks are the blob's bytes");
    assert!(got.last().unwrap().1.is_none());

    // Roots: put, replace, list sorted, delete.
    let rec = |name: &str, size| RootRecord {
        name: name.into(),
        node: Node::Directory {
            digest: d_parent,
            size,
        },
        nix: None,
    };
    store.roots.put(&rec("b", 2)).await.unwrap();
    store.roots.put(&rec("a", 2)).await.unwrap();
    store.roots.put(&rec("a", 3)).await.unwrap();
    assert_eq!(store.roots.list().await.unwrap(), ["a", "b"]);
    assert_eq!(store.roots.get("a").await.unwrap().unwrap(), rec("a", 3));
    assert!(store.roots.delete("a").await.unwrap());
    assert!(!store.roots.delete("a").await.unwrap());
    assert!(store.roots.get("a").await.unwrap().is_none());
    assert!(store.roots.put(&rec("bad/name", 1)).await.is_err());

    // Import through the services.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), &big).unwrap();
    let node = import_path(
        &store,
        dir.path(),
        &ImportOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    store.flush().await.unwrap();
    let Node::Directory { digest, size: 1 } = node else {
        panic!("{node:?}")
    };
    let got = store.dirs.get(&digest).await.unwrap().unwrap();
    assert_eq!(got.files[0].digest[..], d_big.as_bytes()[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_backend() {
    suite(open("memory://").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    suite(open(&url).await.unwrap()).await;
    // A second handle (as another process would have) sees what the first flushed.
    let again = open(&url).await.unwrap();
    assert_eq!(again.roots.list().await.unwrap(), ["b"]);
}
