//! Unit tests of pack indexes and the pack writer.

use super::*;

fn entries() -> Vec<IndexEntry> {
    (0..3u8)
        .map(|i| IndexEntry {
            kind: [
                ObjectKind::Chunk,
                ObjectKind::BlobIndex,
                ObjectKind::Directory,
            ][i as usize],
            digest: B3Digest::of(&[i]),
            offset: 8 + 10 * i as u64,
            len: 10,
            member: None,
        })
        .collect()
}

#[test]
fn index_round_trips() {
    let e = entries();
    assert_eq!(decode_index("p", &encode_index(&e), 38).unwrap(), e);
    assert!(decode_index("p", &encode_index(&[]), 8).unwrap().is_empty());
}

#[test]
fn bad_indexes_are_refused_with_their_reason() {
    let good = encode_index(&entries());
    let err = |raw: &[u8], pack_len| decode_index("p1", raw, pack_len).unwrap_err().to_string();
    assert!(err(b"short", 38).contains("not a granary pack index"));
    let mut flipped = good.clone();
    flipped[20] ^= 1;
    assert!(err(&flipped, 38).contains("checksum mismatch"));
    // An entry reaching past the end of the pack.
    assert!(
        err(&good, 37).contains("outside the pack"),
        "{}",
        err(&good, 37)
    );
    // A count that disagrees with the bytes (checksum recomputed so only the count is wrong).
    let mut body = good[..good.len() - 32].to_vec();
    body[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    assert!(
        err(&body, 38).contains("entries but holds"),
        "{}",
        err(&body, 38)
    );
    // An unknown kind.
    let mut body = good[..good.len() - 32].to_vec();
    body[16] = 9;
    let sum = blake3::hash(&body);
    body.extend_from_slice(sum.as_bytes());
    assert!(err(&body, 38).contains("unknown kind 9"));
}

#[test]
fn lookups_find_the_newest_copy_in_any_index_order() {
    let d = tempfile::tempdir().unwrap();
    let set = PackSet::new(d.path().to_path_buf());
    let objs: Vec<B3Digest> = (0..50u8).map(|i| B3Digest::of(&[i])).collect();
    // An old pack holding every object, its index in write order (as an index from
    // before sorting was introduced would be).
    let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
    for (i, o) in objs.iter().enumerate() {
        w.append(ObjectKind::Chunk, *o, &[b'a', i as u8]).unwrap();
    }
    let (old, old_entries) = w.commit(".tmp-").unwrap();
    let raw = encode_entries_as_given(&old_entries);
    assert!(
        raw != encode_index(&old_entries),
        "written out of index order"
    );
    std::fs::write(d.path().join(format!("{old}.idx")), raw).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    // A newer pack holding a second copy of every other object.
    let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
    for (i, o) in objs.iter().enumerate().step_by(2) {
        w.append(ObjectKind::Chunk, *o, &[b'b', i as u8]).unwrap();
    }
    w.commit(".tmp-").unwrap();
    for (i, o) in objs.iter().enumerate() {
        let got = set.read(ObjectKind::Chunk, o, None).unwrap().unwrap();
        let want = if i % 2 == 0 { b'b' } else { b'a' };
        assert_eq!(got, Stored::Alone(vec![want, i as u8]), "object {i}");
        assert!(!set.contains(ObjectKind::Directory, o));
    }
    assert_eq!(set.objects(ObjectKind::Chunk).len(), objs.len());
}

#[test]
fn writer_commits_a_pack_and_its_index() {
    let d = tempfile::tempdir().unwrap();
    let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
    let a = w
        .append(ObjectKind::Chunk, B3Digest::of(b"a"), b"hello")
        .unwrap();
    let b = w
        .append(ObjectKind::Directory, B3Digest::of(b"b"), b"world!")
        .unwrap();
    assert_eq!(
        w.read(ObjectKind::Directory, &B3Digest::of(b"b")).unwrap(),
        Some(Stored::Alone(b"world!".to_vec()))
    );
    let (id, _) = w.commit(".tmp-").unwrap();
    assert!(is_id(&id), "{id}");
    let pack = d.path().join(format!("{id}.pack"));
    let raw = std::fs::read(d.path().join(format!("{id}.idx"))).unwrap();
    let len = std::fs::metadata(&pack).unwrap().len();
    // The index lists entries by digest, whatever the order they were written in.
    let mut want = vec![a, b];
    want.sort_by(order);
    assert_eq!(decode_index(&id, &raw, len).unwrap(), want);
    let f = std::fs::File::open(&pack).unwrap();
    assert_eq!(read_at(&f, &pack, &a).unwrap(), b"hello");
    // Nothing but the pack and its index is left behind.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
}

/// Small objects of every kind, each with distinct bytes.
fn small_objects(n: usize) -> Vec<(ObjectKind, B3Digest, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let kind = [
                ObjectKind::Chunk,
                ObjectKind::Directory,
                ObjectKind::BlobIndex,
            ][i % 3];
            let bytes = format!("object {i} ").repeat(20 + i % 7).into_bytes();
            (kind, B3Digest::of(&bytes), bytes)
        })
        .collect()
}

/// A pack writer in `d` grouping by 4 KiB, holding `objs` (all small enough to be grouped).
fn grouping_writer(d: &Path, objs: &[(ObjectKind, B3Digest, Vec<u8>)]) -> PackWriter {
    let mut w = PackWriter::new(d, ".tmp-").unwrap().with_groups(4096, 3);
    for (k, dg, b) in objs {
        assert!(grouped(4096, b.len()));
        w.add_grouped(*k, *dg, b).unwrap();
    }
    w
}

#[test]
fn grouped_objects_are_each_read_alone_before_and_after_commit() {
    let d = tempfile::tempdir().unwrap();
    let objs = small_objects(60);
    let mut w = grouping_writer(d.path(), &objs);
    // One big object alone, between groups.
    let big = vec![7u8; 5000];
    let big_d = B3Digest::of(&big);
    assert!(!grouped(4096, big.len()));
    w.append(ObjectKind::Chunk, big_d, &big).unwrap();
    // Read back unflushed: sealed groups and the open one alike.
    for (k, dg, b) in &objs {
        assert_eq!(w.read(*k, dg).unwrap(), Some(Stored::Plain(b.clone())));
    }
    let (id, entries) = w.commit(".tmp-").unwrap();
    let groups = group_plain_sizes(&entries);
    assert!(
        groups.len() > 3,
        "60 objects of ~200 bytes fill several 4 KiB groups"
    );
    // The index round-trips in its second format, members included.
    let raw = std::fs::read(d.path().join(format!("{id}.idx"))).unwrap();
    assert_eq!(&raw[..8], b"GRNIDX02");
    let len = std::fs::metadata(d.path().join(format!("{id}.pack")))
        .unwrap()
        .len();
    let mut want = entries.clone();
    want.sort_by(order);
    assert_eq!(decode_index(&id, &raw, len).unwrap(), want);
    // Stored far smaller than the objects' bytes: they compress together.
    let plain: usize = objs.iter().map(|o| o.2.len()).sum();
    assert!(
        len < plain as u64 / 4 + 5100,
        "pack {len} bytes for {plain} plain"
    );
    let set = PackSet::new(d.path().to_path_buf());
    for (k, dg, b) in &objs {
        let got = set.read(*k, dg, None).unwrap().unwrap();
        assert_eq!(got, Stored::Plain(b.clone()));
        got.verify(*k, dg).unwrap_or_else(|e| {
            // Directories and blob indexes here are not valid protobufs: only chunks verify.
            assert_ne!(*k, ObjectKind::Chunk, "{e}");
        });
    }
    assert_eq!(
        set.read(ObjectKind::Chunk, &big_d, None).unwrap(),
        Some(Stored::Alone(big))
    );
    // A pack without groups keeps the first index format.
    let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
    w.append(ObjectKind::Chunk, B3Digest::of(b"x"), b"x")
        .unwrap();
    let (plain_id, _) = w.commit(".tmp-").unwrap();
    let raw = std::fs::read(d.path().join(format!("{plain_id}.idx"))).unwrap();
    assert_eq!(&raw[..8], b"GRNIDX01");
}

#[test]
fn metadata_is_grouped_smaller_than_chunks() {
    let d = tempfile::tempdir().unwrap();
    let group = 4 * METADATA_GROUP_BYTES as u32;
    let mut w = PackWriter::new(d.path(), ".tmp-")
        .unwrap()
        .with_groups(group, 3);
    // 3 MiB of each kind in objects of 20 KiB (each distinct).
    let mut objs = Vec::new();
    for i in 0..3 * 52 {
        for kind in [ObjectKind::Chunk, ObjectKind::Directory] {
            let bytes = format!("{kind:?} {i} ").repeat(20 << 10).into_bytes()[..20 << 10].to_vec();
            let digest = B3Digest::of(&bytes);
            w.add_grouped(kind, digest, &bytes).unwrap();
            objs.push((kind, digest, bytes));
        }
    }
    let (_, entries) = w.commit(".tmp-").unwrap();
    let sizes = group_plain_sizes(&entries);
    let biggest = |kind| {
        entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| sizes[&e.offset])
            .max()
            .unwrap()
    };
    // Sealed once full: at most one object beyond the size.
    let meta = biggest(ObjectKind::Directory);
    assert!(
        meta >= METADATA_GROUP_BYTES as u64 && meta < (METADATA_GROUP_BYTES + (20 << 10)) as u64,
        "{meta}"
    );
    let chunks = biggest(ObjectKind::Chunk);
    assert!(chunks >= group as u64, "{chunks}");
    // Every object reads back.
    let set = PackSet::new(d.path().to_path_buf());
    for (k, dg, b) in &objs {
        assert_eq!(
            set.read(*k, dg, None).unwrap(),
            Some(Stored::Plain(b.clone()))
        );
    }
}

#[test]
fn a_damaged_group_fails_every_object_in_it_by_name_and_no_other() {
    let d = tempfile::tempdir().unwrap();
    let objs = small_objects(60);
    let (id, entries) = grouping_writer(d.path(), &objs).commit(".tmp-").unwrap();
    // Flip a byte in the middle of the second group's frame.
    let mut frames: Vec<(u64, u32)> = entries.iter().map(|e| (e.offset, e.len)).collect();
    frames.sort();
    frames.dedup();
    let (off, len) = frames[1];
    let path = d.path().join(format!("{id}.pack"));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(off + len as u64 / 2) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let set = PackSet::new(d.path().to_path_buf());
    let mut failed = 0;
    for (_, dg, b) in objs.iter().filter(|o| o.0 == ObjectKind::Chunk) {
        let e = entries.iter().find(|e| e.digest == *dg).unwrap();
        // What a store's chunk read does: the group, the member, the digest check.
        let read = set
            .read(ObjectKind::Chunk, dg, None)
            .and_then(|s| s.expect("still indexed").into_chunk(dg));
        match read {
            Ok(got) => assert_eq!(&got[..], &b[..], "never wrong bytes"),
            Err(err) => {
                assert_eq!(e.offset, off, "only the damaged group fails: {err}");
                let msg = err.to_string();
                assert!(msg.contains(&dg.to_string()), "{msg}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "a flipped byte inside a zstd frame is caught");
}

#[test]
fn groups_compressed_outside_the_writer_are_read_meanwhile_and_never_lost() {
    let d = tempfile::tempdir().unwrap();
    let objs = small_objects(90);
    let mut w = PackWriter::new(d.path(), ".tmp-")
        .unwrap()
        .with_groups(4096, 3);
    let mut jobs = Vec::new();
    for (k, dg, b) in &objs {
        jobs.extend(w.add_grouped_deferred(*k, *dg, b).unwrap());
    }
    assert!(jobs.len() >= 3, "90 objects fill several groups");
    // Out for compression: every object still reads back from its group's plain bytes.
    for (k, dg, b) in &objs {
        assert_eq!(w.read(*k, dg).unwrap(), Some(Stored::Plain(b.clone())));
    }
    // One frame comes back; a frame of another writer is ignored; the rest are left for
    // the commit to compress itself.
    let first = jobs.remove(0);
    w.finish_seal(&first, &first.compress().unwrap()).unwrap();
    let mut other = PackWriter::new(d.path(), ".tmp-")
        .unwrap()
        .with_groups(4096, 3);
    other.finish_seal(&jobs[0], b"not this writer's").unwrap();
    assert!(other.is_empty());
    // Returned twice (a retry): appended once.
    w.finish_seal(&first, &first.compress().unwrap()).unwrap();
    let (_, entries) = w.commit(".tmp-").unwrap();
    assert_eq!(entries.len(), objs.len(), "each object indexed once");
    let set = PackSet::new(d.path().to_path_buf());
    for (k, dg, b) in &objs {
        assert_eq!(
            set.read(*k, dg, None).unwrap(),
            Some(Stored::Plain(b.clone()))
        );
    }
    // A job of a writer already committed changes nothing.
    let late = jobs.pop().unwrap();
    let mut next = PackWriter::new(d.path(), ".tmp-")
        .unwrap()
        .with_groups(4096, 3);
    next.finish_seal(&late, &late.compress().unwrap()).unwrap();
    assert!(next.is_empty());
}

#[test]
fn the_group_cache_holds_its_bytes_whatever_the_group_size() {
    let mut c = GroupCache::default();
    let mb = 1 << 20;
    for i in 0..40u64 {
        let gone = c.put("p".into(), i, i, 2 * mb);
        assert!(c.bytes <= GROUP_CACHE_BYTES, "{} bytes after {i}", c.bytes);
        // What the cache lets go is handed back (for its buffers to be reused).
        let held = GROUP_CACHE_BYTES as u64 / (2 * mb as u64);
        let want: Vec<u64> = if i >= held { vec![i - held] } else { vec![] };
        assert_eq!(gone, want);
    }
    assert_eq!(c.lru.len(), GROUP_CACHE_BYTES / (2 * mb));
    assert_eq!(c.get("p", 39), Some(&39), "the newest stays");
    assert_eq!(c.get("p", 0), None, "the oldest went first");
    // Replacing an entry counts its bytes once; a group over the bound alone still stays.
    c.put("p".into(), 39, 39, 2 * mb);
    assert_eq!(c.bytes, GROUP_CACHE_BYTES);
    c.put("q".into(), 0, 7, GROUP_CACHE_BYTES + 1);
    assert_eq!((c.lru.len(), c.get("q", 0)), (1, Some(&7)));
}

#[test]
fn groups_decoded_into_recycled_buffers_read_right_and_the_buffers_stay_few() {
    let d = tempfile::tempdir().unwrap();
    let group = 256u32 << 10;
    let mut w = PackWriter::new(d.path(), ".tmp-")
        .unwrap()
        .with_groups(group, 1);
    // 24 MiB of distinct objects of varying sizes: far more groups than the group cache
    // holds, so groups are let go, and their buffers reused for groups of other sizes.
    let mut objs = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in 0..400usize {
        let len = 30_000 + (i * 7919) % 60_000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 16) as u8 // compressible, but not to nothing
            })
            .collect();
        assert!(grouped(group, bytes.len()));
        let dg = B3Digest::of(&bytes);
        w.add_grouped(ObjectKind::Chunk, dg, &bytes).unwrap();
        objs.push((dg, bytes));
    }
    w.commit(".tmp-").unwrap();
    let set = PackSet::new(d.path().to_path_buf());
    // Forwards, then backwards, then every third: each time through groups long let go.
    let order = (0..400).chain((0..400).rev()).chain((0..400).step_by(3));
    for i in order {
        let (dg, bytes) = &objs[i];
        let got = set.read(ObjectKind::Chunk, dg, None).unwrap().unwrap();
        assert_eq!(got, Stored::Plain(bytes.clone()), "object {i}");
    }
    let spare = set.spare.lock().unwrap();
    assert!(!spare.is_empty() && spare.len() <= SPARE_BUFFERS);
    assert!(spare.iter().all(|b| b.capacity() <= SPARE_KEPT));
    assert_eq!(set.frames.free.lock().unwrap().len(), DECODERS);
}

#[test]
fn reads_search_indexes_in_place_until_they_are_checked_and_agree_with_them() {
    let d = tempfile::tempdir().unwrap();
    let objs = small_objects(60);
    grouping_writer(d.path(), &objs).commit(".tmp-").unwrap();
    let mut w = PackWriter::new(d.path(), ".tmp-").unwrap();
    let alone = b"stored alone".to_vec();
    w.append(ObjectKind::Chunk, B3Digest::of(&alone), &alone)
        .unwrap();
    w.commit(".tmp-").unwrap();
    let set = PackSet::new(d.path().to_path_buf());
    for (k, dg, b) in &objs {
        assert_eq!(
            set.read(*k, dg, None).unwrap(),
            Some(Stored::Plain(b.clone()))
        );
    }
    assert_eq!(
        set.read(ObjectKind::Chunk, &B3Digest::of(&alone), None)
            .unwrap(),
        Some(Stored::Alone(alone.clone()))
    );
    assert_eq!(set.in_place(), 2, "reads that hit need no index read whole");
    // A miss cannot be trusted from a search in place (an old index may be unsorted): it
    // waits for the indexes to be read whole, then answers.
    let absent = B3Digest::of(b"absent");
    assert_eq!(set.read(ObjectKind::Chunk, &absent, None).unwrap(), None);
    assert_eq!(set.in_place(), 0);
    for (k, dg, b) in &objs {
        assert_eq!(
            set.read(*k, dg, None).unwrap(),
            Some(Stored::Plain(b.clone()))
        );
        assert!(set.contains(*k, dg));
    }
    assert!(set.bad().is_empty());
}

#[test]
fn an_index_damaged_behind_a_sound_shape_never_yields_another_objects_bytes() {
    let d = tempfile::tempdir().unwrap();
    let objs = small_objects(60);
    let (id, _) = grouping_writer(d.path(), &objs).commit(".tmp-").unwrap();
    // Two chunks of the same group: the first one's entry is made to point at the second's
    // bytes. Every field stays in bounds; only the index's checksum tells.
    let chunks: Vec<&(ObjectKind, B3Digest, Vec<u8>)> =
        objs.iter().filter(|o| o.0 == ObjectKind::Chunk).collect();
    let (x, y) = (chunks[0], chunks[1]);
    let path = d.path().join(format!("{id}.idx"));
    let mut raw = std::fs::read(&path).unwrap();
    let rec_of = |raw: &[u8], dg: &B3Digest| {
        (16..raw.len() - 32)
            .step_by(ENTRY_BYTES_GROUPS)
            .find(|&at| raw[at + 1..at + 33] == dg.as_bytes()[..])
            .unwrap()
    };
    let (rx, ry) = (rec_of(&raw, &x.1), rec_of(&raw, &y.1));
    let y_place = raw[ry + 33..ry + ENTRY_BYTES_GROUPS].to_vec();
    raw[rx + 33..rx + ENTRY_BYTES_GROUPS].copy_from_slice(&y_place);
    std::fs::write(&path, &raw).unwrap();
    let set = PackSet::new(d.path().to_path_buf());
    // Searched in place, the entry leads to the other chunk's bytes: they do not hash to the
    // digest asked for, so the index is read whole, found damaged and set aside.
    assert_eq!(set.read(ObjectKind::Chunk, &x.1, None).unwrap(), None);
    assert_eq!(set.in_place(), 0);
    let bad = set.bad();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, id);
    assert!(bad[0].1.contains("checksum mismatch"), "{bad:?}");
    // Nothing of the damaged pack is served any more.
    assert_eq!(set.read(ObjectKind::Chunk, &y.1, None).unwrap(), None);
    assert!(!set.contains(ObjectKind::Chunk, &y.1));
}
