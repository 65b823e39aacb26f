//! The store contract as one executable suite, written once and run against every backend and
//! layer (`tests/conformance.rs`: memory, local with packs and loose, the disk cache over a
//! store, a daemon over a local store, S3 against moto). Each check names what it found.
//!
//! What it checks: absent vs empty; one-chunk and multi-chunk blobs, any range of them;
//! idempotent and concurrent identical puts; directories refused until their children are
//! stored and agree with their sizes; batched reads answering every item once; closures
//! root first and put leaves first; roots put, replaced, listed sorted, deleted; the blob
//! writer; and, where the caller can damage a stored object, an error naming it and never
//! wrong bytes.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::blob_writer::write_all;
use super::{BlobReader, ChunkRef, ChunkSink, ObjectKind, Store, StoreError};
use crate::model::castore::{B3Digest, Directory, DirectoryEntry, FileEntry, Node, RootRecord};

/// Damages one stored object of a backend (flips bytes where it keeps them), for the
/// corruption checks; `None` where the test cannot reach a backend's storage.
pub type Corrupt<'a> = &'a (dyn Fn(ObjectKind, &B3Digest) + Sync);

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

fn ok<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Deterministic incompressible bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
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

/// Runs every check against `store`; the first failure, described. `corrupt` (if the caller
/// can damage this backend's stored objects) enables the corruption checks, which run last.
pub async fn check(store: &Store, corrupt: Option<Corrupt<'_>>) -> Result<(), String> {
    // Absent and empty.
    let missing = B3Digest::of(b"never stored");
    ensure!(
        ok("stat of an absent blob", store.blobs.stat(&missing).await)?.is_none(),
        "an absent blob stats as present"
    );
    ensure!(
        ok(
            "read of an absent chunk",
            store.blobs.read_chunk(&missing).await
        )?
        .is_none(),
        "an absent chunk reads as present"
    );
    ensure!(
        ok("get of an absent directory", store.dirs.get(&missing).await)?.is_none(),
        "an absent directory reads as present"
    );
    let empty = ok(
        "stat of the empty blob",
        store.blobs.stat(&B3Digest::of(b"")).await,
    )?;
    ensure!(
        empty
            .as_ref()
            .is_some_and(|m| m.size == 0 && m.chunks.is_empty()),
        "the empty blob is not present-and-empty: {empty:?}"
    );

    // Blobs through the one blob writer: one chunk, several, any range, idempotent.
    let small = b"small blob".to_vec();
    let d_small = ok("writing a small blob", write_all(store, &small).await)?.digest;
    let st = ok("stat", store.blobs.stat(&d_small).await)?.ok_or("small blob missing")?;
    ensure!(
        st.size == small.len() as u64 && st.chunks.len() == 1 && st.chunks[0].digest == d_small,
        "a one-chunk blob is not its own chunk: {st:?}"
    );
    let big = noise(1_500_000, 3);
    let w = ok("writing a large blob", write_all(store, &big).await)?;
    let d_big = w.digest;
    ensure!(w.chunks > 2, "1.5 MB cut into {} chunks", w.chunks);
    let again = ok("writing it again", write_all(store, &big).await)?;
    ensure!(again.digest == d_big, "a second put gives another digest");
    let st = ok("stat", store.blobs.stat(&d_big).await)?.ok_or("large blob missing")?;
    ensure!(
        st.chunks.len() == w.chunks && !st.outboard.is_empty(),
        "a multi-chunk blob stats as {} chunks, outboard {} bytes",
        st.chunks.len(),
        st.outboard.len()
    );
    let r = ok(
        "opening the large blob",
        BlobReader::open(store.blobs.clone(), d_big).await,
    )?;
    for (off, len) in [
        (0u64, 10usize),
        (65_530, 200_000),
        (1_499_990, 100),
        (2_000_000, 5),
    ] {
        let got = ok("read_at", r.read_at(off, len).await)?;
        let end = (off as usize + len).min(big.len());
        let want = if (off as usize) < big.len() {
            &big[off as usize..end]
        } else {
            &[][..]
        };
        ensure!(&got[..] == want, "read_at({off}, {len}) gave other bytes");
    }

    // Concurrent identical puts: all succeed.
    let same = Bytes::from(noise(40_000, 9));
    let d_same = B3Digest::of(&same);
    let puts = (0..8).map(|_| store.blobs.put_chunk(d_same, same.clone()));
    for r in futures::future::join_all(puts).await {
        ok("concurrent identical chunk put", r)?;
    }
    ok("flush", store.flush().await)?;
    let back = ok("reading it", store.blobs.read_chunk(&d_same).await)?;
    ensure!(
        back.as_deref() == Some(&same[..]),
        "concurrently put chunk reads back wrong"
    );

    // Directories: children first, sizes checked.
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
    ensure!(
        store.dirs.put(&parent(1)).await.is_err(),
        "a directory was stored before its child"
    );
    let d_leaf = ok("putting a leaf", store.dirs.put(&leaf).await)?;
    ensure!(
        d_leaf == leaf.digest(),
        "a leaf stored under another digest"
    );
    ensure!(
        store.dirs.put(&parent(5)).await.is_err(),
        "a child's wrong size was accepted"
    );
    let p1 = parent(1);
    let dirs = (0..4).map(|_| store.dirs.put(&p1));
    let mut d_parent = missing;
    for r in futures::future::join_all(dirs).await {
        d_parent = ok("concurrent identical directory put", r)?;
    }
    ensure!(
        ok("get", store.dirs.get(&d_parent).await)?.as_ref() == Some(&parent(1)),
        "a directory reads back different"
    );
    ensure!(
        ok("has", store.dirs.has(&d_leaf).await)?,
        "has says a stored leaf is absent"
    );
    let many: Vec<Option<Directory>> = store
        .dirs
        .get_many(vec![d_parent, missing, d_leaf])
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("get_many: {e}"))?;
    ensure!(
        many == vec![Some(parent(1)), None, Some(leaf.clone())],
        "get_many answers out of order or wrong"
    );
    // Closures: root first, each after a directory naming it; put back leaves first.
    let closure = ok("get_closure", store.dirs.get_closure(&d_parent).await)?;
    ensure!(
        closure.iter().map(Directory::digest).collect::<Vec<_>>() == vec![d_parent, d_leaf],
        "closure is not root first"
    );
    ensure!(
        ok(
            "get_closure of an absent root",
            store.dirs.get_closure(&missing).await
        )?
        .is_empty(),
        "the closure of an absent directory is not empty"
    );
    let top = ok(
        "put_closure",
        store
            .dirs
            .put_closure(closure.into_iter().rev().collect())
            .await,
    )?;
    ensure!(top == d_parent, "put_closure returned {top}, not its root");

    // Batched chunk reads, both ways (read around, read exactly): every chunk answered once,
    // absent ones as absent.
    for exact in [false, true] {
        let how = if exact { "exact batch" } else { "batch" };
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink: ChunkSink = {
            let got = got.clone();
            Arc::new(move |d, r| {
                if let Ok(mut g) = got.lock() {
                    g.push((d, r));
                }
            })
        };
        let mut chunks = st.chunks.clone();
        chunks.push(ChunkRef {
            digest: missing,
            size: 1,
        });
        if exact {
            store.blobs.read_chunks_exact(chunks.clone(), sink).await;
        } else {
            store.blobs.read_chunks(chunks.clone(), sink).await;
        }
        let mut got = std::mem::take(&mut *got.lock().map_err(|_| "sink lock poisoned")?);
        ensure!(
            got.len() == chunks.len(),
            "a {how} of {} chunks got {} answers",
            chunks.len(),
            got.len()
        );
        got.sort_by_key(|(d, _)| chunks.iter().position(|c| c.digest == *d));
        let mut joined = Vec::new();
        for (d, r) in &got[..got.len() - 1] {
            match r {
                Ok(Some(b)) => joined.extend_from_slice(b),
                other => return Err(format!("{how} read of chunk {d}: {other:?}")),
            }
        }
        ensure!(joined == big, "{how} chunks are not the blob's bytes");
        ensure!(
            matches!(got.last(), Some((_, Ok(None)))),
            "an absent chunk in a {how} is not answered absent"
        );
    }

    // Roots: put, replace, list sorted, delete.
    let rec = |name: &str, size| RootRecord {
        name: name.into(),
        node: Node::Directory {
            digest: d_parent,
            size,
        },
        nix: None,
        times: None,
        times_head: Vec::new(),
        traces: Vec::new(),
    };
    for r in [rec("b", 2), rec("a", 2), rec("a", 3)] {
        ok("root put", store.roots.put(&r).await)?;
    }
    let names = ok("root list", store.roots.list().await)?;
    ensure!(names == ["a", "b"], "roots listed as {names:?}");
    ensure!(
        ok("root get", store.roots.get("a").await)? == Some(rec("a", 3)),
        "a replaced root reads back old"
    );
    // Everything a record holds comes back: its times table and the head of it included.
    let timed = RootRecord {
        times: Some(crate::model::times::TimesRef {
            digest: d_parent,
            size: crate::model::times::offset_of(3),
        }),
        times_head: vec![-5, 1_700_000_000_123_456_789],
        ..rec("timed", 2)
    };
    ok("root put", store.roots.put(&timed).await)?;
    ensure!(
        ok("root get", store.roots.get("timed").await)? == Some(timed),
        "a root record with times reads back otherwise"
    );
    ok("root delete", store.roots.delete("timed").await)?;
    ensure!(
        ok("root delete", store.roots.delete("a").await)?,
        "delete found no root"
    );
    ensure!(
        !ok("second delete", store.roots.delete("a").await)?,
        "a deleted root was deleted again"
    );
    ensure!(
        ok("root get", store.roots.get("a").await)?.is_none(),
        "a deleted root reads back"
    );
    ensure!(
        store.roots.put(&rec("bad/name", 1)).await.is_err(),
        "a root named with '/' was accepted"
    );

    if let Some(corrupt) = corrupt {
        check_corruption(store, corrupt).await?;
    }
    Ok(())
}

/// Damaged objects give an error naming them, never other bytes.
async fn check_corruption(store: &Store, corrupt: Corrupt<'_>) -> Result<(), String> {
    let data = Bytes::from(noise(50_000, 77));
    let d = B3Digest::of(&data);
    ok("chunk put", store.blobs.put_chunk(d, data).await)?;
    let dir = Directory {
        symlinks: vec![crate::model::castore::SymlinkEntry {
            name: Bytes::from_static(b"l"),
            target: Bytes::from_static(b"/somewhere/to/be/damaged"),
        }],
        ..Default::default()
    };
    let dd = ok("directory put", store.dirs.put(&dir).await)?;
    ok("flush", store.flush().await)?;
    corrupt(ObjectKind::Chunk, &d);
    corrupt(ObjectKind::Directory, &dd);
    match store.blobs.read_chunk(&d).await {
        Ok(Some(_)) => return Err(format!("damaged chunk {d} read back as bytes")),
        Ok(None) => return Err(format!("damaged chunk {d} read back as absent")),
        Err(e) => ensure!(
            e.to_string().contains(&d.to_hex()),
            "error for damaged chunk {d} does not name it: {e}"
        ),
    }
    match store.dirs.get(&dd).await {
        Ok(Some(_)) => return Err(format!("damaged directory {dd} read back")),
        Ok(None) => return Err(format!("damaged directory {dd} read back as absent")),
        Err(StoreError::Corrupt { digest, .. }) if digest == dd.to_hex() => {}
        Err(e) => ensure!(
            e.to_string().contains(&dd.to_hex()),
            "error for damaged directory {dd} does not name it: {e}"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread")]
    async fn memory_backend_keeps_the_contract() {
        let store = super::super::open("memory://").await.unwrap();
        super::check(&store, None).await.unwrap();
    }
}
