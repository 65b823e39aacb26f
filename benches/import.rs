//! Import throughput, and chunking+hashing alone, each as a ratio to plain BLAKE3 hashing
//! (b3sum speed) of the same bytes measured in the same run.
//!
//! Run: `cargo bench --bench import [-- CORPUS_DIR...]` (default: a generated 512 MiB tree and,
//! if present, /tmp/granary-bench/corpus/docs). Medians of 3 runs; the source is read once
//! first so every figure is page-cache warm.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use granary::model::chunking::{ChunkParams, Chunker};

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

fn read_each(files: &[PathBuf], mut f: impl FnMut(&[u8])) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for p in files {
        let mut fh = std::fs::File::open(p).unwrap();
        loop {
            let n = fh.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            f(&buf[..n]);
            total += n as u64;
        }
        f(&[]);
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn generate(dir: &Path) {
    if dir.join(".done").exists() {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    };
    // Four 96 MiB files and 4096 small files of 1..32 KiB: 512 MiB in all.
    for i in 0..4 {
        std::fs::create_dir_all(dir.join("large")).unwrap();
        std::fs::write(dir.join(format!("large/f{i}")), noise(96 << 20)).unwrap();
    }
    for i in 0..4096usize {
        let d = dir.join(format!("small/{}", i % 64));
        std::fs::create_dir_all(&d).unwrap();
        let n = 1024 * (1 + (i * 7919) % 32);
        std::fs::write(d.join(format!("s{i}")), noise(n)).unwrap();
    }
    std::fs::write(dir.join(".done"), b"").unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut corpora: Vec<PathBuf> = args.iter().map(PathBuf::from).collect();
    if corpora.is_empty() {
        let gen = std::env::temp_dir().join("granary-bench-import-gen");
        generate(&gen);
        corpora.push(gen);
        let docs = PathBuf::from("/tmp/granary-bench/corpus/docs");
        if docs.is_dir() {
            corpora.push(docs);
        }
    }
    let bin = env!("CARGO_BIN_EXE_granary");
    let params = ChunkParams::default();
    let runs = 3;
    println!("corpus\tbytes\tfiles\tb3_MBps\tchunk+hash_MBps\tratio\timport_MBps\tratio\timport_s");
    for corpus in &corpora {
        let files = files_under(corpus);
        let bytes = read_each(&files, |_| {});
        let mb = bytes as f64 / 1e6;

        let t_b3 = time(runs, || {
            let mut h = blake3::Hasher::new();
            read_each(&files, |b| {
                h.update(b);
            });
            std::hint::black_box(h.finalize());
        });

        let t_chunk = time(runs, || {
            let mut c = Chunker::new(params);
            let mut whole = blake3::Hasher::new();
            read_each(&files, |b| {
                if b.is_empty() {
                    while let Some(ch) = c.finish_chunk() {
                        std::hint::black_box(blake3::hash(&ch));
                    }
                    std::hint::black_box(whole.finalize());
                    whole = blake3::Hasher::new();
                    return;
                }
                whole.update(b);
                c.push(b);
                while let Some(ch) = c.next_chunk() {
                    std::hint::black_box(blake3::hash(&ch));
                }
            });
        });

        let t_import = time(runs, || {
            let store = tempfile::tempdir().unwrap();
            let st = Command::new(bin)
                .arg("--store")
                .arg(store.path().join("s"))
                .arg("import")
                .arg(corpus)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        });
        println!(
            "{}\t{}\t{}\t{:.0}\t{:.0}\t{:.2}\t{:.0}\t{:.2}\t{:.2}",
            corpus.display(),
            bytes,
            files.len(),
            mb / t_b3,
            mb / t_chunk,
            t_b3 / t_chunk,
            mb / t_import,
            t_b3 / t_import,
            t_import
        );
    }
}
