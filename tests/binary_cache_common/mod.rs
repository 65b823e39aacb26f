//! Helpers for tests of `granary serve-cache` with the real Nix client, shared by
//! `tests/binary_cache.rs` and the mounting test in `fuse-tests/`: a kill-on-drop server
//! guard, a private Nix environment, and a one-shot HTTP/1.1 exchange.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{have_nix_tool, TestStore};

pub fn have_nix() -> bool {
    have_nix_tool("nix", "binary cache test")
}

/// A running `granary serve-cache`, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(ts: &TestStore, extra: &[&str]) -> Server {
        Self::try_start(ts, extra).unwrap_or_else(|e| panic!("serve-cache did not start: {e}"))
    }

    pub fn try_start(ts: &TestStore, extra: &[&str]) -> Result<Server, String> {
        let mut child = ts
            .cmd()
            .args(["serve-cache", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn granary serve-cache");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve-cache] {line}");
                let _ = tx.send(line);
            }
        });
        let mut seen = String::new();
        let port = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    if let Some(addr) = line.split("listening on http://").nth(1) {
                        break addr.rsplit(':').next().and_then(|p| p.parse().ok());
                    }
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => break None,
            }
        };
        match port {
            Some(port) => Ok(Server { child, port }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(seen)
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Nix environment of its own: state, caches and config in a temp dir, no substituters.
pub struct Nix {
    pub dir: tempfile::TempDir,
}

impl Nix {
    pub fn new() -> Nix {
        Nix {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `nix`-family command `prog` under a time limit (`timeout` from coreutils).
    pub fn cmd(&self, prog: &str) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "180", prog]);
        c.env("HOME", d.join("home"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("NIX_STATE_DIR", d.join("state"))
            .env("NIX_LOG_DIR", d.join("log"))
            .env(
                "NIX_CONFIG",
                "experimental-features = nix-command\nsubstituters =\nsandbox = false\n\
                 connect-timeout = 10\n",
            )
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, prog: &str, args: &[&str]) -> Output {
        self.cmd(prog).args(args).output().expect("run nix")
    }

    pub fn ok(&self, prog: &str, args: &[&str]) -> String {
        let out = self.run(prog, args);
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A chroot store under the temp dir.
    pub fn chroot(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Adds `src` to the chroot store `store`; returns the store path (`/nix/store/...`).
    pub fn add(&self, store: &Path, src: &Path) -> String {
        let s = store.to_str().unwrap();
        self.ok("nix-store", &["--store", s, "--add", src.to_str().unwrap()])
            .trim()
            .to_string()
    }
}

pub fn nix_hash(path: &Path) -> String {
    let out = Command::new("nix-hash")
        .args(["--type", "sha256", "--base32"])
        .arg(path)
        .output()
        .expect("run nix-hash");
    assert!(out.status.success(), "nix-hash {path:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn real(store: &Path, store_path: &str) -> PathBuf {
    store.join(store_path.trim_start_matches('/'))
}

/// One HTTP/1.1 exchange over a fresh connection: status, headers (lower-cased), body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let hs = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    (status, hs, raw[end + 4..].to_vec())
}
