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
    let old_entries = w.entries().to_vec();
    let old = w.commit(".tmp-").unwrap();
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
        assert_eq!(got, vec![want, i as u8], "object {i}");
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
    assert_eq!(w.read(&b).unwrap(), b"world!");
    let id = w.commit(".tmp-").unwrap();
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
