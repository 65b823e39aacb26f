//! Unit tests of the disk cache and the layer over a store.

use super::*;
use crate::store::memory::MemoryStore;

#[tokio::test]
async fn bounded_verified_and_repairing() {
    let tmp = tempfile::tempdir().unwrap();
    let inner = MemoryStore::new_store("memory://", StoreConfig::default());
    let mut digests = Vec::new();
    for i in 0..40u8 {
        let data = Bytes::from(vec![i; 10_000]);
        let d = B3Digest::of(&data);
        inner.blobs.put_chunk(d, data).await.unwrap();
        digests.push(d);
    }
    let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
    let store = wrap(inner, cache.clone(), tmp.path().join("stores/x"));
    for d in &digests {
        let b = store.blobs.read_chunk(d).await.unwrap().unwrap();
        assert_eq!(B3Digest::of(&b), *d);
        let r = report(tmp.path());
        assert!(r.bytes <= 100_000, "{} bytes cached", r.bytes);
    }
    // The last one is cached: corrupt it; the next read refetches right bytes.
    let last = digests[39];
    let path = cache.entry_path(Kind::Chunk, &last);
    std::fs::write(&path, b"garbage").unwrap();
    let b = store.blobs.read_chunk(&last).await.unwrap().unwrap();
    assert_eq!(B3Digest::of(&b), last);
    assert_eq!(std::fs::read(&path).unwrap(), b.to_vec());
    cache.flush_stats().unwrap();
    let s = read_stats(tmp.path());
    assert_eq!(s.corrupt, 1);
    assert!(s.evicted > 0);
    assert_eq!(s.chunk_misses, 41);
}

#[test]
fn writers_at_once_never_take_the_cache_over_its_bound() {
    // Many threads writing while the cache is full: each must find room for itself, not for
    // another thread's entry too, and a sweep must not forget an entry being written.
    for round in 0..20u8 {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 100_000).unwrap();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let cache = cache.clone();
                s.spawn(move || {
                    for i in 0..10u8 {
                        let data = vec![round ^ t ^ i; 9_000 + t as usize * 100 + i as usize];
                        let d = B3Digest::of(&data);
                        cache.write_entry(&cache.entry_path(Kind::Chunk, &d), &data);
                    }
                });
            }
        });
        let r = report(tmp.path());
        assert!(
            r.bytes <= 100_000,
            "round {round}: {} bytes cached",
            r.bytes
        );
    }
}
