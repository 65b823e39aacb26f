//! Streaming NAR reader: parses a NAR from any `AsyncRead` straight into the store.
//!
//! File contents go through the [`Chunker`] and into `put_chunk` as they arrive, so memory is
//! bounded by the chunker and the puts in flight, not by the NAR. Directories are put when
//! their closing `)` is read, so children are always stored before their parent. Every
//! length field is checked against its bound before anything is allocated for it, and a
//! problem is reported with the byte offset of the item that is wrong. This module records
//! no roots: the caller does that once the whole NAR has been accepted.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::task::JoinHandle;

use super::{padding, NarError, NarHash, MAGIC, MAX_KEYWORD_LEN};
use crate::model::castore::{
    validate_name, B3Digest, Directory, Node, MAX_DIRECTORY_BYTES, MAX_NAME_LEN, MAX_TARGET_LEN,
};
use crate::store::blob_writer::{BlobWriter, PutQueue};
use crate::store::{Store, StoreError};

/// What a NAR import produced: the top node and the NAR's size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarImport {
    pub node: Node,
    pub nar_size: u64,
    pub nar_sha256: NarHash,
}

/// Chunk puts kept in flight across the whole NAR (bounds memory to this many chunks). Puts
/// are not awaited file by file: a store that syncs every object would otherwise make a NAR
/// of many small files run at one fsync per file.
const PUTS_IN_FLIGHT: usize = 64;

async fn join<T>(at: u64, h: JoinHandle<Result<T, StoreError>>) -> Result<T, NarError> {
    h.await
        .map_err(|e| NarError::Task(format!("store write task failed: {e}")))?
        .map_err(|e| NarError::Store {
            offset: at,
            source: e,
        })
}

/// The input side: counts and hashes every byte consumed.
struct Input<R> {
    r: R,
    offset: u64,
    sha: Sha256,
}

impl<R: AsyncBufRead + Unpin> Input<R> {
    fn truncated(&self, what: &str) -> NarError {
        NarError::invalid(self.offset, format!("truncated: ends inside {what}"))
    }

    /// Calls `f` on the next `n` bytes as they arrive, in pieces.
    async fn take(
        &mut self,
        mut n: u64,
        what: &str,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), NarError> {
        while n > 0 {
            let buf = self.r.fill_buf().await.map_err(|e| NarError::Read {
                offset: self.offset,
                source: e,
            })?;
            if buf.is_empty() {
                return Err(self.truncated(what));
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.sha.update(&buf[..k]);
            f(&buf[..k]);
            self.r.consume(k);
            self.offset += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    async fn read_u64(&mut self, what: &str) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        let mut at = 0;
        self.take(8, what, |p| {
            b[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        })
        .await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn read_padding(&mut self, len: u64, what: &str) -> Result<(), NarError> {
        let start = self.offset;
        let mut nonzero = false;
        self.take(padding(len) as u64, what, |p| {
            nonzero |= p.iter().any(|&b| b != 0);
        })
        .await?;
        if nonzero {
            return Err(NarError::invalid(
                start,
                format!("non-zero padding after {what}"),
            ));
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes; the bound is checked before allocating.
    async fn read_str(&mut self, max: u64, what: &str) -> Result<Vec<u8>, NarError> {
        let start = self.offset;
        let len = self.read_u64(what).await?;
        if len > max {
            return Err(NarError::invalid(
                start,
                format!("{what} is {len} bytes long, over the limit of {max}"),
            ));
        }
        // len <= max, and every max is small.
        let mut v = Vec::with_capacity(len as usize);
        self.take(len, what, |p| v.extend_from_slice(p)).await?;
        self.read_padding(len, what).await?;
        Ok(v)
    }

    /// Reads a keyword and checks it is `want`.
    async fn expect(&mut self, want: &[u8]) -> Result<(), NarError> {
        let start = self.offset;
        let what = format!("{:?}", String::from_utf8_lossy(want));
        let got = self.read_str(MAX_KEYWORD_LEN, &what).await?;
        if got != want {
            return Err(NarError::invalid(
                start,
                format!("expected {what}, found {:?}", String::from_utf8_lossy(&got)),
            ));
        }
        Ok(())
    }

    async fn keyword(&mut self, what: &str) -> Result<(u64, Vec<u8>), NarError> {
        let start = self.offset;
        Ok((start, self.read_str(MAX_KEYWORD_LEN, what).await?))
    }

    /// Checks that the input ends here.
    async fn expect_eof(&mut self) -> Result<(), NarError> {
        let buf = self.r.fill_buf().await.map_err(|e| NarError::Read {
            offset: self.offset,
            source: e,
        })?;
        if !buf.is_empty() {
            return Err(NarError::invalid(
                self.offset,
                "trailing bytes after the NAR",
            ));
        }
        Ok(())
    }
}

/// A directory being read: its entries so far and the entry whose node is being read.
struct Frame {
    dir: Directory,
    /// Name of the previous entry, for the sort check.
    last: Option<Bytes>,
    /// Name of the entry whose node is being read.
    current: Option<Bytes>,
    /// Rough encoded size, to refuse a directory the store would refuse, before holding it.
    encoded: usize,
    /// Puts of child directories under way; all must finish before this one is put.
    child_puts: Vec<(u64, JoinHandle<Result<B3Digest, StoreError>>)>,
}

/// Reads a NAR from `input` into `store` and returns the top node with the NAR's size and hash.
/// On error, chunks and directories already written stay (unreferenced); no root is touched.
pub async fn import_nar<R: AsyncRead + Unpin>(
    store: &Store,
    input: R,
) -> Result<NarImport, NarError> {
    let mut inp = Input {
        r: BufReader::with_capacity(1 << 20, input),
        offset: 0,
        sha: Sha256::new(),
    };
    let start = inp.offset;
    let magic = inp.read_str(MAX_KEYWORD_LEN, "magic").await.map_err(|e| {
        // A wrong magic is the likely mistake: say so plainly rather than "too long".
        match e {
            NarError::Invalid { reason, .. } if reason.contains("over the limit") => {
                NarError::invalid(start, "not a NAR (bad magic)")
            }
            other => other,
        }
    })?;
    if magic != MAGIC {
        return Err(NarError::invalid(
            start,
            format!(
                "not a NAR: magic is {:?}, want \"nix-archive-1\"",
                String::from_utf8_lossy(&magic)
            ),
        ));
    }

    let mut uploads = PutQueue::new(PUTS_IN_FLIGHT);
    let mut stack: Vec<Frame> = Vec::new();
    let top = 'outer: loop {
        // A node starts here.
        inp.expect(b"(").await?;
        inp.expect(b"type").await?;
        let (at, kind) = inp.keyword("node type").await?;
        let mut done: Option<Node> = match &kind[..] {
            b"regular" => Some(read_regular(store, &mut inp, &mut uploads).await?),
            b"symlink" => {
                inp.expect(b"target").await?;
                let t_at = inp.offset;
                let target = inp
                    .read_str(MAX_TARGET_LEN as u64, "symlink target")
                    .await?;
                if target.is_empty() {
                    return Err(NarError::invalid(t_at, "empty symlink target"));
                }
                if target.contains(&0) {
                    return Err(NarError::invalid(t_at, "symlink target contains NUL"));
                }
                inp.expect(b")").await?;
                Some(Node::Symlink {
                    target: Bytes::from(target),
                })
            }
            b"directory" => {
                stack.push(Frame {
                    dir: Directory::default(),
                    last: None,
                    current: None,
                    encoded: 0,
                    child_puts: Vec::new(),
                });
                None
            }
            other => {
                return Err(NarError::invalid(
                    at,
                    format!("unknown node type {:?}", String::from_utf8_lossy(other)),
                ))
            }
        };
        // Attach finished nodes to their parents and close directories until the next node.
        loop {
            if let Some(node) = done.take() {
                let Some(parent) = stack.last_mut() else {
                    break 'outer node;
                };
                let name = parent.current.take().ok_or_else(|| {
                    NarError::Task("internal: a finished node has no entry name".into())
                })?;
                parent.encoded += name.len() + 64;
                if parent.encoded > MAX_DIRECTORY_BYTES {
                    return Err(NarError::invalid(
                        inp.offset,
                        "directory has too many entries for the store",
                    ));
                }
                parent.dir.add(name, &node);
                // Closes the "entry (".
                inp.expect(b")").await?;
            }
            let (at, tok) = inp.keyword("directory entry").await?;
            match &tok[..] {
                b")" => {
                    let Some(frame) = stack.pop() else {
                        return Err(NarError::Task("internal: directory stack empty".into()));
                    };
                    let size = frame
                        .dir
                        .size()
                        .map_err(|e| NarError::invalid(at, e.to_string()))?;
                    // Children first: the store checks a directory's children exist.
                    for (child_at, h) in frame.child_puts {
                        join(child_at, h).await?;
                    }
                    let digest = frame.dir.digest();
                    let dirs = store.dirs.clone();
                    let put = tokio::spawn(async move { dirs.put(&frame.dir).await });
                    match stack.last_mut() {
                        Some(parent) => parent.child_puts.push((at, put)),
                        None => {
                            let stored = join(at, put).await?;
                            if stored != digest {
                                return Err(NarError::Task(format!(
                                    "store returned digest {stored} for directory {digest}"
                                )));
                            }
                        }
                    }
                    done = Some(Node::Directory { digest, size });
                }
                b"entry" => {
                    inp.expect(b"(").await?;
                    inp.expect(b"name").await?;
                    let name_at = inp.offset;
                    let name = inp.read_str(MAX_NAME_LEN as u64, "entry name").await?;
                    validate_name(&name).map_err(|e| NarError::invalid(name_at, e.to_string()))?;
                    let Some(frame) = stack.last_mut() else {
                        return Err(NarError::Task("internal: entry outside a directory".into()));
                    };
                    if let Some(prev) = &frame.last {
                        if prev[..] >= name[..] {
                            let why = if prev[..] == name[..] {
                                "duplicate entry"
                            } else {
                                "entries not sorted"
                            };
                            return Err(NarError::invalid(
                                name_at,
                                format!(
                                    "{why}: {:?} after {:?}",
                                    String::from_utf8_lossy(&name),
                                    String::from_utf8_lossy(prev)
                                ),
                            ));
                        }
                    }
                    let name = Bytes::from(name);
                    frame.last = Some(name.clone());
                    frame.current = Some(name);
                    inp.expect(b"node").await?;
                    continue 'outer;
                }
                other => {
                    return Err(NarError::invalid(
                        at,
                        format!(
                            "expected \"entry\" or \")\", found {:?}",
                            String::from_utf8_lossy(other)
                        ),
                    ))
                }
            }
        }
    };
    inp.expect_eof().await?;
    // Every chunk is stored before the caller may record a root pointing at them.
    let end = inp.offset;
    uploads.drain().await.map_err(|e| NarError::Store {
        offset: end,
        source: e,
    })?;
    let nar_size = inp.offset;
    let nar_sha256 = NarHash(inp.sha.finalize().into());
    Ok(NarImport {
        node: top,
        nar_size,
        nar_sha256,
    })
}

/// Reads the rest of a regular file node (after `"type" "regular"`) through its `)`.
async fn read_regular<R: AsyncBufRead + Unpin>(
    store: &Store,
    inp: &mut Input<R>,
    uploads: &mut PutQueue,
) -> Result<Node, NarError> {
    let (at, mut tok) = inp.keyword("regular file").await?;
    let mut executable = false;
    if tok == b"executable" {
        executable = true;
        let e_at = inp.offset;
        let v = inp.read_str(0, "executable marker").await?;
        if !v.is_empty() {
            return Err(NarError::invalid(e_at, "executable marker is not empty"));
        }
        tok = inp.keyword("regular file").await?.1;
    }
    if tok != b"contents" {
        return Err(NarError::invalid(
            at,
            format!(
                "expected \"contents\", found {:?}",
                String::from_utf8_lossy(&tok)
            ),
        ));
    }
    let len_at = inp.offset;
    let len = inp.read_u64("file length").await?;
    let (digest, size) = stream_contents(store, inp, uploads, len, len_at).await?;
    inp.read_padding(len, "file contents").await?;
    inp.expect(b")").await?;
    Ok(Node::File {
        digest,
        size,
        executable,
    })
}

/// Streams `len` bytes of file contents into the store; its chunk puts join the NAR's queue.
async fn stream_contents<R: AsyncBufRead + Unpin>(
    store: &Store,
    inp: &mut Input<R>,
    uploads: &mut PutQueue,
    len: u64,
    at: u64,
) -> Result<(B3Digest, u64), NarError> {
    let store_err = |e: StoreError| NarError::Store {
        offset: at,
        source: e,
    };
    let mut w = BlobWriter::on_queue(store, uploads);
    let mut left = len;
    let mut piece = Vec::new();
    while left > 0 {
        let step = left.min(1 << 20);
        piece.clear();
        inp.take(step, "file contents", |p| piece.extend_from_slice(p))
            .await?;
        w.write(&piece).await.map_err(store_err)?;
        left -= step;
    }
    let done = w.finish().await.map_err(store_err)?;
    Ok((done.digest, done.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::nar::write_nar;

    /// A NAR string, built independently of the writer.
    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = (b.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(b);
        v.resize(v.len() + (8 - b.len() % 8) % 8, 0);
        v
    }
    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.iter().flat_map(|p| s(p)).collect()
    }
    fn file(contents: &[u8], exec: bool) -> Vec<u8> {
        let mut v = cat(&[b"(", b"type", b"regular"]);
        if exec {
            v.extend(cat(&[b"executable", b""]));
        }
        v.extend(cat(&[b"contents", contents, b")"]));
        v
    }
    fn entry(name: &[u8], node: Vec<u8>) -> Vec<u8> {
        let mut v = cat(&[b"entry", b"(", b"name", name, b"node"]);
        v.extend(node);
        v.extend(s(b")"));
        v
    }
    fn dir(entries: Vec<Vec<u8>>) -> Vec<u8> {
        let mut v = cat(&[b"(", b"type", b"directory"]);
        for e in entries {
            v.extend(e);
        }
        v.extend(s(b")"));
        v
    }
    fn nar(node: Vec<u8>) -> Vec<u8> {
        let mut v = s(MAGIC);
        v.extend(node);
        v
    }
    /// A small NAR with every kind of node, nesting and an executable.
    fn sample() -> Vec<u8> {
        nar(dir(vec![
            entry(b"a", file(b"hello", false)),
            entry(
                b"bin",
                dir(vec![entry(b"tool", file(b"#!/bin/sh\n", true))]),
            ),
            entry(b"empty", dir(vec![])),
            entry(
                b"link",
                cat(&[b"(", b"type", b"symlink", b"target", b"../a", b")"]),
            ),
        ]))
    }

    async fn store() -> Store {
        crate::store::open("memory://").await.unwrap()
    }

    async fn import(bytes: &[u8]) -> Result<NarImport, NarError> {
        import_nar(&store().await, bytes).await
    }

    async fn bad(bytes: &[u8]) -> (u64, String) {
        match import(bytes).await {
            Err(NarError::Invalid { offset, reason }) => (offset, reason),
            other => panic!("expected an invalid-NAR error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn round_trips_byte_for_byte() {
        let st = store().await;
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for input in [
            sample(),
            nar(file(b"", false)),
            nar(file(b"x", true)),
            nar(file(&big, false)),
            nar(cat(&[b"(", b"type", b"symlink", b"target", b"/abs", b")"])),
            nar(dir(vec![])),
        ] {
            let imp = import_nar(&st, &input[..]).await.unwrap();
            assert_eq!(imp.nar_size, input.len() as u64);
            let want: [u8; 32] = Sha256::digest(&input).into();
            assert_eq!(imp.nar_sha256.0, want);
            let mut out = Vec::new();
            let sum = write_nar(&st, &imp.node, &mut out).await.unwrap();
            assert!(out == input, "re-rendered NAR differs");
            assert_eq!(
                (sum.nar_size, sum.nar_sha256),
                (imp.nar_size, imp.nar_sha256)
            );
        }
    }

    #[tokio::test]
    async fn every_truncation_is_an_error() {
        let input = sample();
        for n in 0..input.len() {
            let (offset, reason) = bad(&input[..n]).await;
            assert!(reason.starts_with("truncated"), "cut at {n}: {reason}");
            assert_eq!(offset, n as u64, "cut at {n}");
        }
    }

    #[tokio::test]
    async fn rejects_bad_nars_with_offsets() {
        // Wrong magic, same length and too long.
        let mut m = sample();
        m[8] = b'N';
        assert_eq!(bad(&m).await.0, 0);
        assert!(bad(&nar(file(b"", false))[8..]).await.1.contains("magic"));
        // Non-zero padding after the 13-byte magic.
        let mut p = sample();
        p[8 + 13] = 1;
        let (off, why) = bad(&p).await;
        assert_eq!((off, why.as_str()), (21, "non-zero padding after magic"));
        // Unsorted and duplicate entries.
        let unsorted = nar(dir(vec![
            entry(b"b", file(b"", false)),
            entry(b"a", file(b"", false)),
        ]));
        assert!(bad(&unsorted).await.1.contains("not sorted"));
        let dup = nar(dir(vec![
            entry(b"a", file(b"", false)),
            entry(b"a", dir(vec![])),
        ]));
        assert!(bad(&dup).await.1.contains("duplicate"));
        // Names the model refuses.
        for name in [&b".."[..], b".", b"a/b", b"a\0b", b"", &[b'x'; 256]] {
            let n = nar(dir(vec![entry(name, file(b"", false))]));
            bad(&n).await;
        }
        // Length fields of 2^62 for every kind of string: refused or truncated, never allocated.
        let huge = (1u64 << 62).to_le_bytes();
        let prefix_name = [
            &s(MAGIC)[..],
            &cat(&[b"(", b"type", b"directory", b"entry", b"(", b"name"]),
        ]
        .concat();
        for prefix in [
            Vec::new(),
            s(MAGIC),
            prefix_name,
            [
                &s(MAGIC)[..],
                &cat(&[b"(", b"type", b"regular", b"contents"]),
            ]
            .concat(),
            [&s(MAGIC)[..], &cat(&[b"(", b"type", b"symlink", b"target"])].concat(),
        ] {
            let mut v = prefix.clone();
            v.extend_from_slice(&huge);
            v.extend_from_slice(&[0u8; 64]);
            let (off, _) = bad(&v).await;
            assert!(off >= prefix.len() as u64);
        }
        // Other malformations.
        for (input, want) in [
            (
                nar(cat(&[b"(", b"type", b"fifo", b")"])),
                "unknown node type",
            ),
            (
                nar(cat(&[
                    b"(",
                    b"type",
                    b"regular",
                    b"executable",
                    b"x",
                    b"contents",
                    b"",
                    b")",
                ])),
                "over the limit of 0",
            ),
            (
                nar(cat(&[b"(", b"type", b"symlink", b"target", b"", b")"])),
                "empty symlink",
            ),
            (
                nar(cat(&[b"(", b"type", b"symlink", b"target", b"a\0", b")"])),
                "NUL",
            ),
            ([sample(), vec![0]].concat(), "trailing bytes"),
            (
                nar(cat(&[b"(", b"type", b"regular", b")"])),
                "expected \"contents\"",
            ),
            (
                nar(cat(&[b"(", b"type", b"directory", b"entri"])),
                "expected \"entry\"",
            ),
        ] {
            let (_, why) = bad(&input).await;
            assert!(why.contains(want), "{why:?} should contain {want:?}");
        }
        // Non-zero padding after file contents: offset is where the padding starts.
        let mut f = nar(file(b"abc", false));
        let at = f.len() - 16 - 5; // before the 16-byte ")" and within the 5 padding bytes
        f[at] = 9;
        assert_eq!(
            bad(&f).await,
            (at as u64, "non-zero padding after file contents".into())
        );
    }

    #[tokio::test]
    async fn mutations_never_panic_and_accepted_ones_round_trip() {
        let st = store().await;
        let input = sample();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..3000 {
            let mut m = input.clone();
            for _ in 0..1 + (state % 3) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % m.len() as u64) as usize;
                m[i] = (state >> 40) as u8;
            }
            if let Ok(imp) = import_nar(&st, &m[..]).await {
                let mut out = Vec::new();
                write_nar(&st, &imp.node, &mut out).await.unwrap();
                assert!(out == m, "an accepted NAR must render back identically");
            }
        }
    }
}
