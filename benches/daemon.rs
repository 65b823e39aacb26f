//! Daemon benchmark (run with `cargo bench --bench daemon`):
//! 1. read throughput of a whole corpus via `granary export` from the local `file://` store,
//!    and from the same store served by `granary daemon` over `grpc+unix://` and
//!    `grpc+tcp://127.0.0.1`, as ratios to the local read, measured in one run;
//! 2. chunk-read requests per second from 32 concurrent clients over each transport.
//!
//! Corpus: `$GRANARY_BENCH_CORPUS` or /tmp/granary-bench/corpus/docs (built by
//! `bash /work/shared/bench/corpus.sh`). Rounds: `$GRANARY_BENCH_ROUNDS` (default 3), medians.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary::model::castore::B3Digest;
use granary::store::remote::RemoteStore;
use granary::store::BlobService;

const BIN: &str = env!("CARGO_BIN_EXE_granary");

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(store: &str, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(BIN)
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run granary");
    assert!(
        out.status.success(),
        "granary {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn all_chunks(store: &Path) -> Vec<B3Digest> {
    let mut out = Vec::new();
    let mut stack = vec![store.join("chunks")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(Ok(dg)) = p.file_name().and_then(|n| n.to_str()).map(str::parse) {
                out.push(dg);
            }
        }
    }
    out
}

fn main() {
    // `cargo test --all-targets` runs bench programs too, without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let corpus = std::env::var_os("GRANARY_BENCH_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/granary-bench/corpus/docs"));
    if !corpus.is_dir() {
        eprintln!(
            "no corpus at {} (run bash /work/shared/bench/corpus.sh); skipping",
            corpus.display()
        );
        return;
    }
    let rounds: usize = std::env::var("GRANARY_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    let file_url = format!("file://{}", store.display());
    run(
        &file_url,
        &["import", "--name", "corpus", corpus.to_str().unwrap_or(".")],
    );

    let sock = tmp.path().join("d.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let _daemon = Guard(
        Command::new(BIN)
            .args(["--store", &file_url, "daemon", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--allow-unauthenticated-tcp",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let unix_url = format!("grpc+unix://{}", sock.display());
    let tcp_url = format!("grpc+tcp://127.0.0.1:{port}");
    let bytes: u64 = walk_size(&corpus);

    // Interleaved rounds, so drift in machine load hits every variant alike.
    let variants = [
        ("file://", &file_url),
        ("grpc+unix", &unix_url),
        ("grpc+tcp", &tcp_url),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..rounds {
        for (i, (_, url)) in variants.iter().enumerate() {
            let dest = tmp.path().join(format!("out-{r}-{i}"));
            let t = run(url, &["export", "corpus", dest.to_str().unwrap_or("x")]);
            times[i].push(t.as_secs_f64());
            let _ = std::fs::remove_dir_all(&dest);
        }
    }
    println!(
        "export of {} ({:.1} MB), median of {rounds}:",
        corpus.display(),
        bytes as f64 / 1e6
    );
    let base = median(times[0].clone());
    for (i, (name, _)) in variants.iter().enumerate() {
        let m = median(times[i].clone());
        println!(
            "  {name:<10} {m:>7.3} s  {:>7.1} MB/s  time ratio to file:// {:.2}x",
            bytes as f64 / 1e6 / m,
            m / base
        );
    }

    // Chunk reads from 32 concurrent clients, each with its own connection pool.
    let chunks = Arc::new(all_chunks(&store));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let secs = 4.0;
    for (name, url) in [("grpc+unix", &unix_url), ("grpc+tcp", &tcp_url)] {
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let done = Arc::new(AtomicU64::new(0));
            rt.block_on(async {
                let mut tasks = tokio::task::JoinSet::new();
                let end = Instant::now() + Duration::from_secs_f64(secs);
                for c in 0..32usize {
                    let (url, chunks, done) = (url.to_string(), chunks.clone(), done.clone());
                    tasks.spawn(async move {
                        let s = RemoteStore::connect(&format!("{url}?pool=1"))
                            .await
                            .expect("connect");
                        let mut i = c * 7919;
                        while Instant::now() < end {
                            let d = chunks[i % chunks.len()];
                            let data = s.read_chunk(&d).await.expect("read").expect("present");
                            assert_eq!(B3Digest::of(&data), d);
                            done.fetch_add(1, Ordering::Relaxed);
                            i += 1;
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
            rates.push(done.load(Ordering::Relaxed) as f64 / secs);
        }
        println!(
            "chunk reads, 32 clients, {name:<9}: {:>8.0} requests/s (median of {rounds}; {} distinct chunks, avg {:.0} KiB stored)",
            median(rates),
            chunks.len(),
            walk_size(&store.join("chunks")) as f64 / chunks.len().max(1) as f64 / 1024.0
        );
    }
}

fn walk_size(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                n += m.len();
            }
        }
    }
    n
}
