//! `granary dedup` on generated data with known answers, and against what `granary import`
//! then really stores. Runs the real binary.

mod common;

use std::path::Path;

use common::{gen_tree, noise, write, write_big, TestStore};
use serde_json::Value;

/// Runs `granary dedup ARGS --format json` against `ts` and parses the report.
fn dedup_json(ts: &TestStore, args: &[&str]) -> Value {
    let mut all = vec!["dedup", "--format", "json"];
    all.extend_from_slice(args);
    let out = ts.ok(&all);
    serde_json::from_slice(&out.stdout).expect("dedup --format json prints JSON")
}

fn strategy<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["strategies"]
        .as_array()
        .expect("strategies")
        .iter()
        .find(|s| s["strategy"] == name)
        .unwrap_or_else(|| panic!("no strategy {name} in {report}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// A tree of distinct pseudo-random files (so no chunk repeats inside it), with an empty
/// file and an empty directory.
fn distinct_tree(root: &Path, seed: u64) {
    for (i, size) in [0usize, 1, 100, 5000, 70_000, 300_000, 1 << 20, 3 << 20]
        .into_iter()
        .enumerate()
    {
        write(
            &root.join(format!("d{}/f{i}", i % 3)),
            &noise(size, seed * 100 + 2 * i as u64),
            i % 2 == 0,
        );
    }
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
}

#[test]
fn two_identical_trees_dedup_to_exactly_half() {
    let ts = TestStore::new();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    distinct_tree(&a, 1);
    distinct_tree(&b, 1);
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let one = dedup_json(&ts, &[a_s]);
    let two = dedup_json(&ts, &[a_s, b_s]);
    // Nothing was written: not even an empty store.
    assert!(!ts.path().exists(), "dedup created a store");
    let logical_one = u(&one, "logical_bytes");
    assert_eq!(u(&two, "logical_bytes"), 2 * logical_one);
    let names: Vec<String> = two["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["strategy"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "whole-file",
            "fixed:64K",
            "fastcdc:4K/16K/64K",
            "fastcdc:16K/64K/256K",
            "fastcdc:64K/256K/1M",
            "fastcdc:256K/1M/4M"
        ]
    );
    for name in &names {
        let (s1, s2) = (strategy(&one, name), strategy(&two, name));
        // Every chunk of one tree is distinct, so unique == logical of one tree == half of two.
        assert_eq!(u(s1, "unique_bytes"), logical_one, "{name}");
        assert_eq!(
            u(s2, "unique_bytes") * 2,
            u(&two, "logical_bytes"),
            "{name}"
        );
        assert_eq!(s2["dedup_ratio"].as_f64(), Some(2.0), "{name}");
        for key in [
            "unique_chunks",
            "zstd_bytes",
            "metadata_bytes",
            "stored_bytes",
        ] {
            assert_eq!(u(s1, key), u(s2, key), "{name} {key}");
        }
        let m = s2["marginal"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(u(&m[0], "unique_bytes"), logical_one, "{name}");
        for key in ["unique_bytes", "unique_chunks", "stored_bytes"] {
            assert_eq!(u(&m[1], key), 0, "{name}: second tree adds {key}");
        }
    }
    // Whole-file: 7 non-empty distinct files; the empty one is never a chunk.
    assert_eq!(u(strategy(&two, "whole-file"), "unique_chunks"), 7);
    assert_eq!(u(&two, "files"), 16);
    assert_eq!(u(&two, "symlinks"), 2);
}

#[test]
fn one_byte_inserted_cdc_recovers_fixed_does_not() {
    let ts = TestStore::new();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let big = 8usize << 20;
    distinct_tree(&a, 2);
    // One noise stream (write_big repeats its 4 MiB blocks, which would hide the shift).
    let data = noise(big, 11);
    write(&a.join("big.bin"), &data, false);
    distinct_tree(&b, 2);
    let mut shifted = vec![0x5a];
    shifted.extend_from_slice(&data);
    write(&b.join("big.bin"), &shifted, false);
    let r = dedup_json(
        &ts,
        &[
            "--strategy",
            "whole-file",
            "--strategy",
            "fixed:64K",
            "--strategy",
            "fastcdc:16K/64K/256K",
            "--strategy",
            "store",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let added = |name: &str| u(&strategy(&r, name)["marginal"][1], "unique_bytes");
    let big = big as u64;
    // Whole-file: exactly the changed file is new.
    assert_eq!(added("whole-file"), big + 1);
    // Fixed-size: every block after the insertion shifts, so almost all of it is new.
    assert!(
        added("fixed:64K") > big * 95 / 100,
        "fixed added {}",
        added("fixed:64K")
    );
    // Content-defined: the cut points resynchronise after the first chunk or two.
    for cdc in ["fastcdc:16K/64K/256K", "store"] {
        assert!(added(cdc) < big * 5 / 100, "{cdc} added {}", added(cdc));
        assert!(
            added(cdc) > 0,
            "{cdc}: the inserted byte must cost something"
        );
    }
    assert!(added("fixed:64K") > 20 * added("store"));
}

#[test]
fn whole_file_counts_duplicates_exactly() {
    let ts = TestStore::new();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    let (a, b, c) = (noise(1000, 1), noise(70_000, 4), noise(300_001, 6));
    for i in 0..5 {
        write(&t.join(format!("x/a{i}")), &a, false);
    }
    for i in 0..3 {
        write(&t.join(format!("y{i}/b")), &b, i == 0);
    }
    write(&t.join("c"), &c, false);
    write(&t.join("e1"), b"", false);
    write(&t.join("x/e2"), b"", false);
    let r = dedup_json(&ts, &["--strategy", "whole-file", t.to_str().unwrap()]);
    let s = strategy(&r, "whole-file");
    assert_eq!(u(&r, "files"), 11);
    assert_eq!(u(s, "logical_bytes"), 5 * 1000 + 3 * 70_000 + 300_001);
    assert_eq!(u(s, "unique_chunks"), 3);
    assert_eq!(u(s, "unique_bytes"), 1000 + 70_000 + 300_001);
    assert_eq!(u(s, "median_chunk"), 70_000);
    assert_eq!(u(s, "p99_chunk"), 300_001);
    assert_eq!(u(s, "blob_indexes"), 0);
    // The same data as fixed:1000 blocks: a (1 block), b (70 blocks), c (300 full + 1 byte).
    let r = dedup_json(&ts, &["--strategy", "fixed:1000", t.to_str().unwrap()]);
    let s = strategy(&r, "fixed:1000");
    assert_eq!(u(s, "unique_chunks"), 1 + 70 + 301);
    assert_eq!(u(s, "blob_indexes"), 2);
}

#[test]
fn store_strategy_equals_what_import_stores() {
    // disk_bytes estimates a store of one file per object (format 1).
    let ts = TestStore::loose();
    // Create the store first so dedup reads its parameters.
    ts.ok(&["info"]);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    gen_tree(&t, 3 << 20);
    // Duplicates inside the tree: a whole copy of a subtree and a repeated big file.
    write_big(&t.join("copy/big.bin"), 3 << 20, 42);
    write(&t.join("copy/hello.txt"), b"hello\n", false);
    // Small files that compress far better together than alone: lines from one pool.
    let pool = common::line_pool(200, 500);
    for i in 0..300usize {
        let body: String = (0..30)
            .map(|k| pool[(i * 3 + k * 11) % 200].as_str())
            .collect();
        write(
            &t.join(format!("small/{}/f{i}", i % 5)),
            body.as_bytes(),
            false,
        );
    }
    let t_s = t.to_str().unwrap();
    let r = dedup_json(
        &ts,
        &[
            "--exact",
            "--strategy",
            "store",
            "--strategy",
            "fixed:64K",
            t_s,
        ],
    );
    let s = strategy(&r, "store");
    assert_eq!(s["chunker"], "fastcdc:16K/64K/256K");
    assert_eq!(r["sample"]["one_in"], 1);

    // dedup estimates content; the times table an import also writes (8 bytes per entry,
    // one small blob) is not part of that estimate.
    ts.ok(&["import", "--no-times", "--name", "t", t_s]);
    assert_eq!(ts.count("chunks") as u64, u(s, "unique_chunks"));
    assert_eq!(ts.count("blobs") as u64, u(s, "blob_indexes"));
    assert_eq!(ts.count("dirs") as u64, u(s, "directories"));
    let out = ts.ok(&["info", "--json", "--dedup"]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&info, "chunks"), u(s, "unique_chunks"));
    assert_eq!(u(&info, "unique_chunk_bytes"), u(s, "unique_bytes"));
    assert_eq!(u(&info, "logical_bytes"), u(s, "logical_bytes"));
    // Same compression, same encodings: the estimate is the store's real size.
    assert_eq!(u(&info, "stored_bytes"), u(s, "stored_bytes"));
    let object_files: u64 = ["chunks", "blobs", "dirs"]
        .iter()
        .flat_map(|d| common::walk_files(&ts.path().join(d)))
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(object_files, u(s, "stored_bytes"));
    // This store has no compression groups: packed is stored.
    assert_eq!(u(s, "packed_bytes"), u(s, "stored_bytes"));
    // A packed store (the default) holds the same objects, and fewer bytes: small objects
    // are compressed together in groups.
    let packed = TestStore::new();
    packed.ok(&["import", "--no-times", "--name", "t", t_s]);
    assert_eq!(packed.count("chunks") as u64, u(s, "unique_chunks"));
    assert_eq!(packed.count("dirs") as u64, u(s, "directories"));
    let out = packed.ok(&["info", "--json"]);
    let pinfo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        u(&pinfo, "stored_bytes") < u(s, "stored_bytes"),
        "grouped {} vs alone {}",
        u(&pinfo, "stored_bytes"),
        u(s, "stored_bytes")
    );
    // dedup with that store's parameters says what its packs hold (the groups it forms
    // differ a little from the import's: files are read in another order) and what they
    // take on disk with their indexes.
    let rp = dedup_json(&packed, &["--exact", "--strategy", "store", t_s]);
    let sp = strategy(&rp, "store");
    // At the loose store's level (new stores compress at another), chunks alone are the
    // loose store's bytes exactly.
    let at_3 = ["--exact", "--strategy", "store", "--zstd-level", "3", t_s];
    let r3 = dedup_json(&packed, &at_3);
    assert_eq!(
        u(strategy(&r3, "store"), "stored_bytes"),
        u(s, "stored_bytes")
    );
    let (est, real) = (u(sp, "packed_bytes"), u(&pinfo, "stored_bytes"));
    assert!(
        est.abs_diff(real) * 20 <= real,
        "packed estimate {est}, the store holds {real}"
    );
    assert!(est < u(sp, "stored_bytes"), "{est}");
    let on_disk: u64 = common::walk_files(&packed.path().join("packs"))
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let disk = u(sp, "disk_bytes");
    assert!(
        disk.abs_diff(on_disk) * 20 <= on_disk,
        "on-disk estimate {disk}, the packs take {on_disk}"
    );
    let d = &info["dedup"];
    for key in [
        "unique_chunks",
        "unique_bytes",
        "mean_chunk",
        "median_chunk",
        "p99_chunk",
        "blob_indexes",
        "blob_index_bytes",
        "directories",
        "directory_bytes",
        "metadata_bytes",
        "logical_bytes",
    ] {
        assert_eq!(u(d, key), u(s, key), "info --dedup {key}");
    }

    // Analysing the store itself gives the same figures for every strategy.
    let from_store = dedup_json(
        &ts,
        &["--exact", "--strategy", "store", "--strategy", "fixed:64K"],
    );
    assert_eq!(from_store["inputs"], serde_json::json!(["t"]));
    for key in ["files", "directories", "symlinks", "logical_bytes"] {
        assert_eq!(from_store[key], r[key], "{key}: tree vs store");
    }
    for name in ["store", "fixed:64K"] {
        let (x, y) = (strategy(&r, name), strategy(&from_store, name));
        for key in [
            "logical_bytes",
            "unique_bytes",
            "unique_chunks",
            "median_chunk",
            "metadata_bytes",
            "zstd_bytes",
            "stored_bytes",
        ] {
            assert_eq!(u(x, key), u(y, key), "{name} {key}: tree vs store");
        }
    }
}

#[test]
fn csv_plot_sampling_and_bad_input() {
    let ts = TestStore::new();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path().join("t");
    distinct_tree(&t, 3);
    let t_s = t.to_str().unwrap();
    let svg = tmp.path().join("plot.svg");
    let out = ts.ok(&[
        "dedup",
        "--format",
        "csv",
        "--plot",
        svg.to_str().unwrap(),
        "--zstd-sample",
        "4",
        t_s,
        t_s,
    ]);
    let csv = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("strategy,chunker,scope,logical_bytes,unique_bytes"));
    // 6 totals + 6 strategies × 2 inputs.
    assert_eq!(lines.len(), 1 + 6 + 12, "{csv}");
    assert!(lines[1].starts_with("whole-file,whole-file,all,"));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "not an SVG");
    for name in [
        "whole-file",
        "fixed:64K",
        "fastcdc:256K/1M/4M",
        "unique bytes",
    ] {
        assert!(svg.contains(name), "plot lacks {name}");
    }
    // A sample is deterministic: the same figures twice. (On one thread: with several, the
    // packed figure's groups form in the order the threads happen to read files, and it may
    // differ by a few bytes from run to run; every other figure is the same.)
    let a = dedup_json(&ts, &["--zstd-sample", "3", "--jobs", "1", t_s]);
    let b = dedup_json(&ts, &["--zstd-sample", "3", "--jobs", "1", t_s]);
    assert_eq!(a, b);
    assert_eq!(a["sample"]["one_in"], 3);
    let strip = |mut r: Value| {
        for s in r["strategies"].as_array_mut().unwrap() {
            s["packed_bytes"] = Value::Null;
            s["disk_bytes"] = Value::Null;
        }
        r
    };
    let c = dedup_json(&ts, &["--zstd-sample", "3", "--jobs", "2", t_s]);
    assert_eq!(strip(a.clone()), strip(c.clone()));
    for (x, y) in a["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["strategies"].as_array().unwrap())
    {
        let (x, y) = (u(x, "packed_bytes"), u(y, "packed_bytes"));
        assert!(
            x.abs_diff(y) * 100 <= x,
            "packed {x} on one thread, {y} on two"
        );
    }

    let e = ts.fails(&["dedup", "/does/not/exist"]);
    assert!(
        e.contains("/does/not/exist") && e.lines().count() == 1,
        "{e}"
    );
    let e = ts.fails(&["dedup", "--strategy", "rabin:64K", t_s]);
    assert!(e.contains("rabin:64K"), "{e}");
    let e = ts.fails(&["dedup", "--strategy", "fastcdc:64K/16K/256K", t_s]);
    assert!(e.contains("min <= avg <= max"), "{e}");
    // A NAR file is analysed as the tree it holds: same figures as the tree itself.
    let other = TestStore::new();
    other.ok(&["import", "--name", "t", t_s]);
    let nar = tmp.path().join("x.nar");
    std::fs::write(&nar, other.ok(&["export-nar", "t"]).stdout).unwrap();
    let from_nar = dedup_json(&ts, &[nar.to_str().unwrap()]);
    let from_tree = dedup_json(&ts, &[t_s]);
    for name in ["whole-file", "fixed:64K", "fastcdc:16K/64K/256K"] {
        for key in [
            "logical_bytes",
            "unique_bytes",
            "unique_chunks",
            "stored_bytes",
        ] {
            assert_eq!(
                u(strategy(&from_nar, name), key),
                u(strategy(&from_tree, name), key),
                "{name} {key}"
            );
        }
    }
    // A broken NAR is a one-line error naming it.
    let bad = tmp.path().join("bad.nar");
    let mut bytes = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&bad, bytes).unwrap();
    let e = ts.fails(&["dedup", bad.to_str().unwrap()]);
    assert!(e.contains("bad.nar") && e.contains("bad NAR"), "{e}");
    // No PATH and no store there: an error, and no store is created.
    let e = ts.fails(&["dedup"]);
    assert!(e.contains("no granary store"), "{e}");
    assert!(!ts.path().exists());
}
