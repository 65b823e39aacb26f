//! Throughput of `granary dedup` with the default strategy set, in MB/s, as a ratio to plain
//! BLAKE3 hashing of the same files (what `b3sum` does) measured in the same run.
//!
//! `cargo bench --bench dedup_throughput [-- DIR...]` (default: the docs corpus built by
//! `../shared/bench/corpus.sh`). Both sides read the same files from a warm page cache (one
//! untimed warm-up pass first) on the same number of threads; runs alternate, and the
//! medians of `GRANARY_BENCH_REPS` (default 3) runs are reported, since the machine is noisy.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            files_under(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

/// b3sum-style: every file hashed with BLAKE3 (SIMD, one file per thread), `threads` at once.
fn hash_all(files: &[PathBuf], threads: usize) -> u64 {
    let next = AtomicUsize::new(0);
    let total = Mutex::new(0u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 256 << 10];
                let mut mine = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = files.get(i) else { break };
                    let Ok(mut f) = std::fs::File::open(p) else {
                        continue;
                    };
                    let mut h = blake3::Hasher::new();
                    while let Ok(n) = f.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                        mine += n as u64;
                    }
                    std::hint::black_box(h.finalize());
                }
                *total.lock().unwrap() += mine;
            });
        }
    });
    total.into_inner().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("dedup_throughput: run with `cargo bench --bench dedup_throughput`");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let dirs: Vec<PathBuf> = if args.is_empty() {
        vec![PathBuf::from("/tmp/granary-bench/corpus/docs")]
    } else {
        args.iter().map(PathBuf::from).collect()
    };
    for d in &dirs {
        if !d.is_dir() {
            eprintln!(
                "{}: not a directory (build the corpora with ../shared/bench/corpus.sh)",
                d.display()
            );
            std::process::exit(1);
        }
    }
    let reps: usize = std::env::var("GRANARY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut files = Vec::new();
    for d in &dirs {
        files_under(d, &mut files);
    }
    let bytes = hash_all(&files, threads); // warm-up, untimed
    let store = tempfile::tempdir().expect("temp dir");
    let granary = env!("CARGO_BIN_EXE_granary");
    let dedup = |extra: &[&str]| {
        let t = Instant::now();
        let out = Command::new(granary)
            .arg("--store")
            .arg(store.path().join("none"))
            .args(["dedup", "--format", "json"])
            .args(extra)
            .args(&dirs)
            .output()
            .expect("run granary");
        assert!(
            out.status.success(),
            "granary dedup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64()
    };
    let (mut hash_s, mut dedup_s, mut sampled_s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(hash_all(&files, threads));
        hash_s.push(t.elapsed().as_secs_f64());
        dedup_s.push(dedup(&[]));
        sampled_s.push(dedup(&["--exact"]));
    }
    let (h, d, ds) = (
        median(hash_s.clone()),
        median(dedup_s.clone()),
        median(sampled_s.clone()),
    );
    let mbs = |s: f64| bytes as f64 / 1e6 / s;
    println!(
        "corpus {} ({} files, {:.1} MB), {threads} threads, {reps} runs (medians)",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        files.len(),
        bytes as f64 / 1e6
    );
    println!(
        "blake3 hash (b3sum-style)        {h:8.3} s  {:8.1} MB/s  runs {hash_s:.3?}",
        mbs(h)
    );
    println!(
        "granary dedup (default, 1 in 16)  {d:6.3} s  {:8.1} MB/s  runs {dedup_s:.3?}",
        mbs(d)
    );
    println!(
        "  with --exact (every chunk)      {ds:6.3} s  {:8.1} MB/s  runs {sampled_s:.3?}",
        mbs(ds)
    );
    println!(
        "dedup / hash throughput ratio     {:.3} (default), {:.3} (--exact)",
        h / d,
        h / ds
    );
}
