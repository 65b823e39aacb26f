//! NAR download throughput of `granary serve-cache` against two baselines measured in the same
//! run: the same NARs as plain files of a `file://`-style Nix binary cache directory, served by
//! the same HTTP stack (axum + hyper, in this process), and `nix-store --dump` of the source
//! trees to /dev/null. Prints medians of RUNS runs and the ratios.
//!
//! Usage: `cargo bench --bench binary_cache [-- CORPUS_DIR]` (default
//! /tmp/granary-bench/corpus/docs: a directory of `<hash>-<name>` store paths, made by
//! /work/shared/bench/corpus.sh). Env: RUNS (default 5).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Path as UrlPath;
use axum::http::{header, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn granary(store: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_granary"));
    c.arg("--store").arg(store);
    c
}

/// GETs `path`, reads the whole body and returns its bytes (hashing only if asked).
fn get(port: u16, path: &str, keep: bool) -> (u64, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "GET {path}: {line}");
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse::<u64>().ok();
        }
    }
    let mut kept = Vec::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = r.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        if keep {
            kept.extend_from_slice(&buf[..k]);
        }
    }
    assert_eq!(Some(n), len, "GET {path}: body length");
    (n, kept)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The baseline server: files of a directory, streamed with their length.
async fn serve_dir(dir: PathBuf, listener: tokio::net::TcpListener) {
    let app = axum::Router::new().route(
        "/nar/{file}",
        axum::routing::get(move |UrlPath(file): UrlPath<String>| {
            let dir = dir.clone();
            async move {
                let p = dir.join("nar").join(&file);
                let Ok(f) = tokio::fs::File::open(&p).await else {
                    return Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Body::empty())
                        .unwrap();
                };
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                let stream = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10);
                Response::builder()
                    .header(header::CONTENT_LENGTH, len)
                    .header(header::CONTENT_TYPE, "application/x-nix-nar")
                    .body(Body::from_stream(stream))
                    .unwrap()
            }
        }),
    );
    axum::serve(listener, app).await.unwrap();
}

fn main() {
    let corpus = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/granary-bench/corpus/docs"));
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let work = tempfile::tempdir().unwrap();
    let store = format!("file://{}", work.path().join("store").display());

    let t = Instant::now();
    let out = granary(&store)
        .arg("import-store")
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import-store: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    eprintln!(
        "imported {} store paths from {} in {:.2}s",
        paths.len(),
        corpus.display(),
        t.elapsed().as_secs_f64()
    );

    let mut child = granary(&store)
        .args(["serve-cache", "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    let mut line = String::new();
    let port: u16 = loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            panic!("serve-cache exited");
        }
        if let Some(a) = line.trim().split("http://").nth(1) {
            break a.rsplit(':').next().unwrap().parse().unwrap();
        }
    };

    // The file:// cache directory: every NAR as granary serves it, checked against NarHash.
    let cache_dir = work.path().join("file-cache");
    std::fs::create_dir_all(cache_dir.join("nar")).unwrap();
    let mut urls = Vec::new();
    let mut total = 0u64;
    for p in &paths {
        let (_, info) = get(port, &format!("/{}.narinfo", &p[..32]), true);
        let info = String::from_utf8(info).unwrap();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .to_string()
        };
        let url = field("URL: ");
        let (n, nar) = get(port, &format!("/{url}"), true);
        let got = granary::views::nar::NarHash(Sha256::digest(&nar).into());
        assert_eq!(got.to_typed_nix32(), field("NarHash: "), "{p}");
        std::fs::write(cache_dir.join(&url), &nar).unwrap();
        std::fs::write(cache_dir.join(format!("{}.narinfo", &p[..32])), &info).unwrap();
        total += n;
        urls.push(format!("/{url}"));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let static_port = listener.local_addr().unwrap().port();
    rt.spawn(serve_dir(cache_dir.clone(), listener));

    let fetch_all = |port: u16| {
        let t = Instant::now();
        let n: u64 = urls.iter().map(|u| get(port, u, false).0).sum();
        assert_eq!(n, total);
        t.elapsed().as_secs_f64()
    };
    let dump_all = |dir: &Path| {
        let t = Instant::now();
        for p in &paths {
            let st = Command::new("nix-store")
                .arg("--dump")
                .arg(dir.join(p))
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
        }
        t.elapsed().as_secs_f64()
    };
    let have_nix = Command::new("nix-store").arg("--version").output().is_ok();

    // Warm everything once, then alternate.
    fetch_all(port);
    fetch_all(static_port);
    let (mut ours, mut plain, mut dump) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(fetch_all(port));
        plain.push(fetch_all(static_port));
        if have_nix {
            dump.push(dump_all(&corpus));
        }
    }
    let mb = total as f64 / 1e6;
    let (o, p) = (median(ours), median(plain));
    println!(
        "NAR bytes: {total} in {} store paths; medians of {runs} runs",
        paths.len()
    );
    println!("granary serve-cache        {o:.3} s  {:.0} MB/s", mb / o);
    println!(
        "file:// cache, same stack  {p:.3} s  {:.0} MB/s  (granary/plain time ratio {:.2}x)",
        mb / p,
        o / p
    );
    if have_nix {
        let d = median(dump);
        println!(
            "nix-store --dump           {d:.3} s  {:.0} MB/s  (granary/dump time ratio {:.2}x)",
            mb / d,
            o / d
        );
    }
    drop(server);
}
