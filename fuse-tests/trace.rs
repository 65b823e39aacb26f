//! Traces (issue 20): a mount records what a job first reads; `granary trace save` keeps it
//! in the root; a later mount replays it as prefetch — over a daemon, traced reads then cost
//! the daemon nothing, a read outside the trace does not wait behind the replay, a trace of
//! chunks that are gone is harmless, and a corrupt trace is named while the mount works.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The root's `user.granary.trace`, as `key -> value`.
fn trace_state(mnt: &Path) -> std::collections::HashMap<String, String> {
    let out = Command::new("getfattr")
        .args(["--only-values", "-h", "-n", "user.granary.trace"])
        .arg(mnt)
        .output()
        .expect("run getfattr (package attr)");
    assert!(out.status.success(), "getfattr user.granary.trace");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn figure(state: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    state
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {state:?}"))
}

/// Waits (bounded) until the replay has ended; returns its final state.
fn replay_ended(mnt: &Path, limit: Duration) -> std::collections::HashMap<String, String> {
    let t0 = Instant::now();
    loop {
        let s = trace_state(mnt);
        let st = s.get("state").cloned().unwrap_or_default();
        if st == "done" || st.starts_with("stopped") || st.starts_with("failed") {
            return s;
        }
        assert!(t0.elapsed() < limit, "replay still {st:?} after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The entries of `root`'s trace `name` as `trace list --entries` prints them: (kind, digest).
fn listed_entries(
    run: impl Fn(&[&str]) -> String,
    root: &str,
    name: &str,
) -> Vec<(String, String)> {
    let text = run(&["trace", "list", root, "--entries"]);
    let mut out = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        if !l.starts_with("  ") {
            inside = l.split('\t').next() == Some(name);
            continue;
        }
        if inside {
            let mut f = l.split_whitespace();
            out.push((f.next().unwrap().to_string(), f.next().unwrap().to_string()));
        }
    }
    out
}

/// `granary --store URL ARGS`, which must succeed; its stdout.
fn granary_ok(url: &str, args: &[&str]) -> String {
    let out = Command::new(granary_bin())
        .args(["--store", url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Mounts `url` with `args`, runs `job` on the mount, unmounts (which writes the recording).
fn record(url: &str, root: &str, rec: &Path, job: impl FnOnce(&Path)) {
    let mut m = Mount::start(
        url,
        &["--root", root, "--record-trace", rec.to_str().unwrap()],
    );
    job(m.path());
    let st = m.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{}", m.stderr());
    assert!(rec.is_file(), "no recording at unmount: {}", m.stderr());
}

#[test]
fn a_recorded_trace_round_trips_through_the_store_and_outlives_gc_and_reimport() {
    require_fuse!();
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    let small = noise(10_000, 1);
    let big = noise(2 << 20, 2);
    let untouched = noise(10_000, 3);
    write(&src.join("a"), &small, false);
    write(&src.join("d/b"), &big, false);
    write(&src.join("c"), &untouched, false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);

    let rec = ts.dir.path().join("rec");
    record(&ts.url(), "t", &rec, |m| {
        assert_eq!(std::fs::read(m.join("d/b")).unwrap(), big);
        assert_eq!(std::fs::read(m.join("a")).unwrap(), small);
    });
    let run = |args: &[&str]| String::from_utf8(ts.ok(args).stdout).unwrap();
    let saved = run(&["trace", "save", "t", rec.to_str().unwrap()]);
    assert!(saved.contains("1 runs"), "{saved}");

    // In read order: d's directory, b's blob index and chunks, then a; c never read.
    let entries = listed_entries(run, "t", "default");
    let at = |kind: &str, digest: &str| {
        entries
            .iter()
            .position(|(k, d)| k == kind && d == digest)
            .unwrap_or_else(|| panic!("no {kind} {digest} in {entries:?}"))
    };
    let blob_b = at("blob", &hex(&big));
    let chunk_a = at("chunk", &hex(&small));
    assert!(blob_b < chunk_a, "b was read before a: {entries:?}");
    let chunks_of_b = entries[blob_b + 1..chunk_a]
        .iter()
        .filter(|(k, _)| k == "chunk")
        .count();
    assert!(chunks_of_b >= 8, "b's chunks between: {entries:?}");
    assert!(entries.iter().any(|(k, _)| k == "dir"), "{entries:?}");
    assert!(
        !entries.iter().any(|(_, d)| *d == hex(&untouched)),
        "c was never read"
    );

    // Saving the same run again merges: two runs, the same entries in the same order.
    let saved = run(&["trace", "save", "t", rec.to_str().unwrap()]);
    assert!(saved.contains("2 runs"), "{saved}");
    assert_eq!(listed_entries(run, "t", "default"), entries);

    // gc keeps the trace (it is reachable from the root), and a new version of the tree
    // keeps the old version's traces.
    ts.ok(&["gc", "--grace", "0s"]);
    assert_eq!(listed_entries(run, "t", "default"), entries);
    write(&src.join("c"), b"changed", false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    assert_eq!(listed_entries(run, "t", "default"), entries);
    ts.ok(&["gc", "--grace", "0s"]);
    ts.ok(&["verify"]);

    // A second name; a mount asked for a trace the root lacks refuses, naming it.
    let saved = run(&[
        "trace",
        "save",
        "t",
        "--name",
        "other",
        rec.to_str().unwrap(),
    ]);
    assert!(saved.contains("trace other"), "{saved}");
    assert_eq!(run(&["trace", "list", "t"]).lines().count(), 2);
    let e = Mount::try_start(
        &ts.url(),
        &["--root", "t", "--trace", "nope"],
        DEFAULT_LIMIT,
    )
    .err()
    .expect("a mount with a trace the root lacks");
    assert!(e.contains("nope"), "{e}");
    run(&["trace", "rm", "t", "other"]);
    assert_eq!(run(&["trace", "list", "t"]).lines().count(), 1);
    let e = ts.fails(&["trace", "rm", "t", "other"]);
    assert!(e.contains("other"), "{e}");
    // Not a recording: refused, naming the file.
    let junk = ts.dir.path().join("junk");
    std::fs::write(&junk, b"\xff\xff\xff not a trace").unwrap();
    let e = ts.fails(&["trace", "save", "t", junk.to_str().unwrap()]);
    assert!(
        e.contains("junk") && e.contains("not a recorded trace"),
        "{e}"
    );
}

#[test]
fn a_replaying_mount_over_a_daemon_serves_traced_reads_without_asking_the_daemon() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    for i in 0..6u64 {
        write(
            &src.join(format!("lib/f{i}")),
            &noise(1_500_000, 40 + i),
            false,
        );
        write(&src.join(format!("etc/s{i}")), &noise(9_000, 60 + i), false);
    }
    write(&src.join("untraced"), &noise(3_000_000, 99), false);
    let d = Daemon::start(tmp.path(), &[]);
    let url = d.unix_url();
    let cli = |args: &[&str]| granary_ok(&url, args);
    cli(&["import", "--name", "t", src.to_str().unwrap()]);
    // The job: the small files, then the libraries, in an order no listing gives.
    let job = |m: &Path| {
        for i in (0..6u64).rev() {
            assert_eq!(
                std::fs::read(m.join(format!("etc/s{i}"))).unwrap(),
                noise(9_000, 60 + i)
            );
            assert_eq!(
                std::fs::read(m.join(format!("lib/f{i}"))).unwrap(),
                noise(1_500_000, 40 + i)
            );
        }
    };
    let rec = tmp.path().join("rec");
    record(&url, "t", &rec, job);
    cli(&["trace", "save", "t", rec.to_str().unwrap()]);

    let daemon_chunks = || {
        let info = cli(&["info"]);
        info.lines()
            .find_map(|l| l.trim().strip_prefix("daemon chunks read"))
            .and_then(|r| r.trim_start_matches([':', ' ']).split_whitespace().next())
            .and_then(|n| n.replace(',', "").parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no daemon chunks read in {info}"))
    };

    // A fresh mount (empty cache) replays the trace by itself...
    let m = Mount::start(&url, &["--root", "t"]);
    let done = replay_ended(m.path(), Duration::from_secs(60));
    assert_eq!(done["state"], "done", "{done:?}");
    let prefetched = figure(&done, "prefetched_chunks");
    assert!(prefetched >= 6 * 10, "{done:?}");
    assert_eq!(figure(&done, "failed"), 0, "{done:?}");
    // ...and then the job's reads cost the daemon nothing: every chunk is in the cache.
    let before = daemon_chunks();
    job(m.path());
    let after = daemon_chunks();
    assert_eq!(after, before, "the traced job asked the daemon for chunks");
    let used = trace_state(m.path());
    assert_eq!(figure(&used, "hits"), prefetched, "{used:?}");
    assert_eq!(figure(&used, "outside"), 0, "{used:?}");
    // A read outside the trace goes to the daemon as usual.
    assert_eq!(
        std::fs::read(m.path().join("untraced")).unwrap(),
        noise(3_000_000, 99)
    );
    assert!(daemon_chunks() > after);
    assert!(figure(&trace_state(m.path()), "outside") > 0);
    drop(m);

    // --no-trace: nothing is replayed (no trace xattr), and the job reads from the daemon.
    let m = Mount::start(&url, &["--root", "t", "--no-trace"]);
    let out = Command::new("getfattr")
        .args(["--only-values", "-n", "user.granary.trace"])
        .arg(m.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a trace xattr without a replay");
    let before = daemon_chunks();
    job(m.path());
    assert!(daemon_chunks() >= before + prefetched);
}

/// A loopback TCP proxy adding `delay_ms` each way (benches/latency_proxy.py); killed on drop.
struct Proxy(Child, u16);

impl Proxy {
    fn start(upstream: u16, delay_ms: u32) -> Proxy {
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/latency_proxy.py");
        let child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(upstream.to_string())
            .arg(delay_ms.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "proxy did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Proxy(child, port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_read_outside_the_trace_does_not_wait_behind_a_large_replay() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let big = noise(160 << 20, 7);
    write(&src.join("big"), &big, false);
    write(&src.join("other"), &noise(40_000, 8), false);
    let store_url = format!("file://{}", tmp.path().join("store").display());
    let cli = |args: &[&str]| granary_ok(&store_url, args);
    cli(&["import", "--name", "t", src.to_str().unwrap()]);
    let rec = tmp.path().join("rec");
    record(&store_url, "t", &rec, |m| {
        assert_eq!(std::fs::read(m.join("big")).unwrap().len(), big.len());
    });
    cli(&["trace", "save", "t", rec.to_str().unwrap()]);

    // The daemon behind 100 ms round trips: the replay of 160 MiB takes many of them.
    let d = Daemon::start(tmp.path(), &[]);
    let proxy = Proxy::start(d.addr.port(), 50);
    let url = format!("grpc+tcp://127.0.0.1:{}", proxy.1);
    let m = Mount::start(&url, &["--root", "t", "--cache-size", "1G"]);
    let t0 = Instant::now();
    // Once the replay has batches in flight (it first reads the trace itself)...
    loop {
        let s = trace_state(m.path());
        if s.get("batches").is_some_and(|b| b != "0") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "replay never started: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...a read of a file the trace does not name.
    let t1 = Instant::now();
    let other = std::fs::read(m.path().join("other")).unwrap();
    let took = t1.elapsed();
    let during = trace_state(m.path());
    assert_eq!(other, noise(40_000, 8));
    let total = figure(&during, "trace_chunk_bytes");
    let fetched = figure(&during, "prefetched_bytes");
    eprintln!("read outside the trace: {took:?}; replay then at {fetched} of {total} bytes");
    assert!(
        during["state"] == "running" && fetched < total,
        "the replay should still be going: {during:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "a read outside the trace took {took:?} while the replay ran"
    );
    let done = replay_ended(m.path(), Duration::from_secs(180));
    let replay_took = t1.elapsed();
    eprintln!("replay of {total} bytes took {replay_took:?}: {done:?}");
    assert_eq!(done["state"], "done", "{done:?}");
    assert!(replay_took > took * 3, "{replay_took:?} vs {took:?}");
    assert_eq!(std::fs::read(m.path().join("big")).unwrap(), big);
}

#[test]
fn a_trace_of_gone_chunks_is_harmless_and_a_corrupt_trace_is_named_while_the_mount_works() {
    require_fuse!();
    let ts = TestStore::new();
    let src = ts.dir.path().join("src");
    write(&src.join("f"), &noise(1 << 20, 11), false);
    write(&src.join("g"), &noise(5_000, 12), false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    let rec = ts.dir.path().join("rec");
    record(&ts.url(), "t", &rec, |m| {
        std::fs::read(m.join("f")).unwrap();
        std::fs::read(m.join("g")).unwrap();
    });
    ts.ok(&["trace", "save", "t", rec.to_str().unwrap()]);
    // A new version of the tree, and a gc: the trace now names chunks the store lacks.
    write(&src.join("f"), &noise(1 << 20, 13), false);
    ts.ok(&["import", "--name", "t", src.to_str().unwrap()]);
    ts.ok(&["gc", "--grace", "0s"]);

    let m = Mount::start(&ts.url(), &["--root", "t"]);
    let done = replay_ended(m.path(), Duration::from_secs(60));
    assert_eq!(done["state"], "done", "{done:?}");
    assert!(figure(&done, "failed") >= 10, "the gone chunks: {done:?}");
    assert!(
        figure(&done, "prefetched_chunks") >= 1,
        "g is still there: {done:?}"
    );
    assert_eq!(
        std::fs::read(m.path().join("f")).unwrap(),
        noise(1 << 20, 13)
    );
    assert_eq!(std::fs::read(m.path().join("g")).unwrap(), noise(5_000, 12));
    let log = m.stderr();
    assert!(
        !log.contains("ERROR"),
        "gone traced chunks are not errors: {log}"
    );
    drop(m);

    // A trace whose object does not decode: named by `trace list`, and a mount warns and
    // works without it.
    let garbage = b"this is no trace at all, just bytes".repeat(10);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bad = rt.block_on(async {
        let store = granary::store::open(&ts.url()).await.unwrap();
        let w = granary::store::blob_writer::write_all(&store, &garbage)
            .await
            .unwrap();
        store.flush().await.unwrap();
        let mut rec = store.roots.get("t").await.unwrap().unwrap();
        rec.traces.push(granary::model::trace::TraceRef {
            name: "bad".into(),
            digest: w.digest,
            size: w.size,
            saved: u64::MAX,
        });
        store.roots.put(&rec).await.unwrap();
        w.digest.to_hex()
    });
    let out = ts.cmd().args(["trace", "list", "t"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trace bad") && err.contains(&bad) && err.contains("corrupt"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The newest trace is the bad one: the mount still works, and says why it has no trace.
    let m = Mount::start(&ts.url(), &["--root", "t"]);
    let done = replay_ended(m.path(), Duration::from_secs(30));
    assert!(
        done["state"].starts_with("failed") && done["state"].contains(&bad),
        "{done:?}"
    );
    assert_eq!(std::fs::read(m.path().join("g")).unwrap(), noise(5_000, 12));
    let log = m.stderr();
    assert!(
        log.contains("trace bad") && log.contains("goes on without it"),
        "{log}"
    );
}
