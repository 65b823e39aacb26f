//! Unit tests of the local store: packs across processes, races, gc rewrites and merges, damaged indexes.

use super::*;
use std::time::Duration;

fn open(dir: &Path) -> LocalStore {
    LocalStore::open_blocking("file://test", dir, StoreConfig::default()).unwrap()
}

fn put(s: &LocalStore, data: &[u8]) -> B3Digest {
    let d = B3Digest::of(data);
    s.put_chunk_blocking(&d, data).unwrap();
    d
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join(pack::PACK_DIR))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_pack_committed_by_another_process_is_found() {
    let d = tempfile::tempdir().unwrap();
    let reader = open(d.path());
    let writer = open(d.path());
    let c = put(&writer, b"written after the reader opened");
    // Unflushed: only the writer sees it.
    assert!(writer.read_chunk_blocking(&c).unwrap().is_some());
    assert!(reader.read_chunk_blocking(&c).unwrap().is_none());
    writer.flush_blocking().unwrap();
    assert_eq!(
        &reader.read_chunk_blocking(&c).unwrap().unwrap()[..],
        b"written after the reader opened"
    );
    assert_eq!(pack_files(d.path()).len(), 1);
    assert!(!d.path().join("chunks").exists(), "nothing loose");
}

#[test]
fn concurrent_puts_flushes_and_rescans_never_lose_an_object() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let other = open(d.path());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rescanner = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.packs.refresh(true).unwrap();
            }
        })
    };
    let workers: Vec<_> = (0..6u32)
        .map(|t| {
            let (s, other) = (s.clone(), other.clone());
            std::thread::spawn(move || {
                for i in 0..300u32 {
                    let data = format!("thread {t} object {i}");
                    // Half the writers go through a second store handle, as a second
                    // process would.
                    let w = if i % 2 == 0 { &s } else { &other };
                    let c = put(w, data.as_bytes());
                    assert!(s.object_exists(Kind::Chunk, &c).unwrap() || i % 2 == 1);
                    if i % 37 == 0 {
                        w.flush_blocking().unwrap();
                    }
                    let got = w.read_chunk_blocking(&c).unwrap();
                    assert_eq!(got.as_deref(), Some(data.as_bytes()), "{data}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rescanner.join().unwrap();
    s.flush_blocking().unwrap();
    other.flush_blocking().unwrap();
    let fresh = open(d.path());
    for t in 0..6u32 {
        for i in 0..300u32 {
            let data = format!("thread {t} object {i}");
            let c = B3Digest::of(data.as_bytes());
            assert!(fresh.read_chunk_blocking(&c).unwrap().is_some(), "{data}");
        }
    }
}

#[test]
fn gc_rewrites_a_pack_without_its_garbage_unless_it_was_reused() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let keep = put(&s, &[7u8; 5000]);
    let noise: Vec<u8> = (0..20_000).map(|_| rand::random::<u8>()).collect();
    let junk = put(&s, &noise);
    s.flush_blocking().unwrap();
    let before = std::fs::metadata(&pack_files(d.path())[0]).unwrap().len();

    // A pack reused after the gc's cutoff is left whole.
    let cutoff = SystemTime::now() - Duration::from_secs(60);
    assert!(!s
        .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
        .unwrap());
    s.sweep_temp_blocking(cutoff).unwrap();
    assert!(s.read_chunk_blocking(&junk).unwrap().is_some());

    // An old pack loses exactly its garbage; what stays reads through a reader that
    // opened before the rewrite.
    let reader = open(d.path());
    let cutoff = SystemTime::now() + Duration::from_secs(60);
    assert!(s
        .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
        .unwrap());
    // An interrupted gc's marks are not acted on by another gc's sweep.
    s.sweep_temp_blocking(cutoff + Duration::from_secs(1))
        .unwrap();
    assert!(s.read_chunk_blocking(&junk).unwrap().is_some());
    assert!(s
        .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
        .unwrap());
    s.sweep_temp_blocking(cutoff).unwrap();
    assert!(s.read_chunk_blocking(&junk).unwrap().is_none());
    assert!(reader.read_chunk_blocking(&keep).unwrap().is_some());
    let packs = pack_files(d.path());
    assert_eq!(packs.len(), 1);
    let after = std::fs::metadata(&packs[0]).unwrap().len();
    assert!(after < before - 15_000, "{before} -> {after}");
    let listed = s.list_blocking(Kind::Chunk).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].digest, keep);

    // Repair's remove drops one object at once, whatever its age.
    s.repack(&[(Kind::Chunk, keep)].into_iter().collect(), None)
        .unwrap();
    assert!(s.read_chunk_blocking(&keep).unwrap().is_none());
}

#[test]
fn gc_merges_many_small_packs_into_one() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    let mut all = Vec::new();
    for i in 0..(MERGE_AT + 4) {
        all.push(put(&s, format!("object {i}").as_bytes()));
        s.flush_blocking().unwrap();
    }
    assert_eq!(pack_files(d.path()).len(), MERGE_AT + 4);
    // Packs younger than the cutoff are not merged.
    s.sweep_temp_blocking(SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    assert_eq!(pack_files(d.path()).len(), MERGE_AT + 4);
    let reader = open(d.path());
    s.sweep_temp_blocking(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    assert_eq!(pack_files(d.path()).len(), 1);
    for c in &all {
        assert!(s.read_chunk_blocking(c).unwrap().is_some());
        // A reader that indexed the old packs finds them gone and rescans.
        assert!(reader.read_chunk_blocking(c).unwrap().is_some());
    }
    assert_eq!(s.list_blocking(Kind::Chunk).unwrap().len(), all.len());
}

#[test]
fn a_corrupt_pack_index_is_reported_by_name() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path());
    put(&s, b"x");
    s.flush_blocking().unwrap();
    let idx = pack_files(d.path())[0].with_extension("idx");
    let mut raw = std::fs::read(&idx).unwrap();
    raw[20] ^= 1;
    std::fs::write(&idx, raw).unwrap();
    let e = open(d.path())
        .list_blocking(Kind::Chunk)
        .unwrap_err()
        .to_string();
    let id = idx.file_stem().unwrap().to_str().unwrap();
    assert!(e.contains(id) && e.contains("checksum mismatch"), "{e}");
}

#[test]
fn a_put_through_a_handle_that_indexed_a_pack_gc_removed_stores_the_object_again() {
    let d = tempfile::tempdir().unwrap();
    let gc = open(d.path());
    let noise: Vec<u8> = (0..20_000).map(|_| rand::random::<u8>()).collect();
    let junk = put(&gc, &noise);
    gc.flush_blocking().unwrap();
    // An importer opens the store (and indexes the pack) before the gc removes it.
    let importer = open(d.path());
    assert!(importer.object_exists(Kind::Chunk, &junk).unwrap());
    let cutoff = SystemTime::now() + Duration::from_secs(60);
    assert!(gc
        .delete_if_older_blocking(Kind::Chunk, &junk, cutoff)
        .unwrap());
    gc.sweep_temp_blocking(cutoff).unwrap();
    assert!(pack_files(d.path()).is_empty());
    // The importer's put finds the pack gone and must write the object, not trust its
    // stale index.
    put(&importer, &noise);
    importer.flush_blocking().unwrap();
    let got = importer.read_chunk_blocking(&junk).unwrap();
    assert!(got.as_deref() == Some(&noise[..]), "the object was lost");
    assert!(open(d.path()).read_chunk_blocking(&junk).unwrap().is_some());
}
