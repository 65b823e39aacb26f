//! Unit tests of the dedup report.

use super::*;
use crate::model::castore::BlobIndex;

#[test]
fn index_length_matches_prost() {
    for sizes in [
        vec![1u64, 2],
        vec![65536, 300_000, 5],
        vec![1 << 40, 7, 128, 16383],
    ] {
        let idx = BlobIndex {
            chunks: sizes
                .iter()
                .map(|&s| crate::model::castore::proto::blob_index::Chunk {
                    digest: Bytes::from(vec![7u8; 32]),
                    size: s,
                })
                .collect(),
            size: sizes.iter().sum(),
            outboard: vec![9u8; crate::store::outboard::outboard_len(sizes.iter().sum()) as usize]
                .into(),
            ..Default::default()
        };
        let entries: u64 = sizes.iter().map(|&s| index_entry_len(s)).sum();
        assert_eq!(
            index_len(entries, idx.size),
            idx.encode_sealed().len() as u64
        );
    }
}

#[test]
fn strategy_specs_parse_and_print() {
    let sp = ChunkParams::default();
    for (spec, name) in [
        ("whole-file", "whole-file"),
        ("fixed:64K", "fixed:64K"),
        ("fixed:1000", "fixed:1000"),
        ("fastcdc:16K/64K/256K", "fastcdc:16K/64K/256K"),
        ("fastcdc:1M", "fastcdc:256K/1M/4M"),
        ("store", "store"),
    ] {
        let s = Strategy::parse(spec, sp).unwrap();
        assert_eq!(s.name(), name);
        if s != Strategy::Store(sp) {
            assert_eq!(Strategy::parse(&s.name(), sp).unwrap(), s);
        }
    }
    for bad in [
        "fixed:0",
        "fixed:x",
        "fastcdc:64K/16K/256K",
        "rabin:64K",
        "fixed",
        "fastcdc:8G",
    ] {
        assert!(Strategy::parse(bad, sp).is_err(), "{bad}");
    }
    assert_eq!(default_strategies().len(), 6);
}

#[test]
fn fixed_chunks_are_cut_the_same_whatever_the_read_sizes() {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let opts = DedupOptions {
        strategies: vec![Strategy::Fixed(1000), Strategy::WholeFile],
        ..Default::default()
    };
    let mut counts = Vec::new();
    for piece in [1usize, 999, 1000, 4096, 300_000] {
        let shared = Shared::new(&opts);
        let mut w = Worker::new(&shared).unwrap();
        let mut scan = w.scan();
        for p in data.chunks(piece) {
            scan.push(p).unwrap();
        }
        let (d, size) = scan.finish().unwrap();
        assert_eq!(d, B3Digest::of(&data));
        assert_eq!(size, data.len() as u64);
        let t = shared.totals();
        counts.push((t[0].unique_bytes, t[0].unique_chunks, t[1].unique_bytes));
    }
    // The data repeats every 251 bytes: 1000-byte chunks repeat with period 251 too.
    assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
    assert_eq!(counts[0].0, counts[0].1 * 1000);
    assert_eq!(counts[0].2, 300_000);
}
