//! Mount checks that span features: Nix's own hash of store paths read through the mount,
//! and the mount served by a remote daemon (round trip, daemon killed mid-read, restarted).

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn have_nix() -> bool {
    have_nix_tool("nix-hash", "nix-hash through the mount")
}

/// A name in Nix's store-path alphabet, stable per seed.
fn store_name(seed: &str, name: &str) -> String {
    let h = blake3::hash(seed.as_bytes());
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let part: String = h.as_bytes()[..32]
        .iter()
        .map(|b| alphabet[(*b as usize) % 32] as char)
        .collect();
    format!("{part}-{name}")
}

#[test]
fn nix_hash_of_mounted_store_paths_equals_recorded_nar_hash() {
    require_fuse!();
    if !have_nix() {
        return;
    }
    let ts = TestStore::new();
    let sd = ts.dir.path().join("nixstore");
    gen_tree(&sd.join(store_name("gen", "gen")), 3 << 20);
    write(
        &sd.join(store_name("file", "script.sh")),
        b"#!/bin/sh\necho hi\n",
        true,
    );
    std::os::unix::fs::symlink("/nix/store/elsewhere", sd.join(store_name("l", "link"))).unwrap();
    // A real tree from this machine.
    let real = sd.join(store_name("docs", "docs"));
    std::fs::create_dir_all(&real).unwrap();
    let mut copied = 0;
    for e in std::fs::read_dir("/usr/share/doc")
        .unwrap()
        .flatten()
        .take(40)
    {
        let st = Command::new("cp")
            .arg("-a")
            .arg(e.path())
            .arg(&real)
            .status()
            .unwrap();
        copied += st.success() as usize;
    }
    assert!(copied > 0);
    ts.ok(&["import-store", sd.to_str().unwrap()]);
    let roots: Vec<String> = String::from_utf8(ts.ok(&["roots"]).stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(roots.len(), 4);

    let m = Mount::start(&ts.url(), &[]);
    for name in &roots {
        let info = String::from_utf8(ts.ok(&["narinfo", name]).stdout).unwrap();
        let recorded = info
            .lines()
            .find_map(|l| l.strip_prefix("NarHash: sha256:"))
            .unwrap_or_else(|| panic!("no NarHash in {info}"))
            .to_string();
        let out = Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(m.path().join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let through_mount = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(through_mount, recorded, "{name}");
        // And Nix agrees with the source too.
        let src = Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(sd.join(name))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(src.stdout).unwrap().trim(), recorded);
    }
}

#[test]
fn mount_over_daemon_round_trip_kill_and_restart() {
    require_fuse!();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    gen_tree(&src, 0);
    for i in 0..12u64 {
        write(
            &src.join(format!("flat/f{i}")),
            &noise(700_000, 500 + i),
            false,
        );
    }
    let mut d = Daemon::start(tmp.path(), &[]);
    let imp = Command::new(granary_bin())
        .args(["--store", &d.unix_url(), "import", "--name", "t"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        imp.status.success(),
        "{}",
        String::from_utf8_lossy(&imp.stderr)
    );

    let m = Mount::start(&d.unix_url(), &["--root", "t"]);
    assert_same_tree(&src, m.path());
    drop(m);
    // The mount fetched file contents in batches: many chunks per ReadChunks call.
    let info = Command::new(granary_bin())
        .args(["--store", &d.unix_url(), "info"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    let figure = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| {
                rest.trim_start_matches([':', ' '])
                    .split_whitespace()
                    .next()
            })
            .and_then(|n| n.replace(',', "").parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in {info}"))
    };
    let (calls, chunks) = (
        figure("daemon chunk read calls"),
        figure("daemon chunks read"),
    );
    eprintln!("batching: {chunks} chunks in {calls} ReadChunks calls");
    assert!(
        chunks >= 100 && chunks >= 4 * calls,
        "{chunks} chunks in {calls} ReadChunks calls: not batched"
    );

    // A fresh mount (empty chunk cache) for the failure part.
    let m = Mount::start(&d.unix_url(), &["--root", "t", "--timeout", "3"]);

    // Kill the daemon while reads go on: reads of content not yet cached fail with EIO
    // within the deadline; the mount stays up.
    let flat = m.path().join("flat");
    let names: Vec<_> = std::fs::read_dir(&flat)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(names.len(), 12);
    d.kill9();
    let t0 = Instant::now();
    let f = std::fs::File::open(flat.join("f3")).unwrap();
    let mut buf = vec![0u8; 4096];
    let r = f.read_at(&mut buf, 300_000);
    let took = t0.elapsed();
    let err = r.expect_err("read with the daemon dead succeeded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(15), "EIO took {took:?}");
    assert!(mounted(m.path()), "mount went away");

    // After a restart the same mount serves again, without remounting.
    d.spawn();
    let want = noise(700_000, 503);
    let t0 = Instant::now();
    loop {
        match f.read_at(&mut buf, 300_000) {
            Ok(n) => {
                assert_eq!(&buf[..n], &want[300_000..300_000 + n]);
                break;
            }
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "never recovered: {e}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert_eq!(std::fs::read(flat.join("f7")).unwrap(), noise(700_000, 507));
}
