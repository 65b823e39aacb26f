//! NAR writer: renders any stored node as a NAR stream, byte-identical to `nix-store --dump`
//! of the same tree, counting and hashing (SHA-256) the bytes as they go out.
//!
//! Directory entries come out in byte order of their names (the order [`Directory::entries`]
//! gives and Nix uses). File contents are verified chunk by chunk and as whole blobs, so a
//! corrupt store makes the writer fail, never lie. A tree walk runs ahead of the writer and
//! small files are fetched a bounded number ahead, so many small files do not cost one store
//! round trip each in sequence; large files are streamed chunk by chunk.

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{padding, NarError, NarHash, MAGIC};
use crate::model::castore::{B3Digest, Directory, Node};
use crate::store::{BlobReader, Store, StoreError};
use crate::trees::entry_node;

/// Size and SHA-256 of a NAR that was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_size: u64,
    pub nar_sha256: NarHash,
}

/// Appends a NAR string: length, bytes, zero padding.
pub(crate) fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s);
    buf.extend_from_slice(&[0u8; 8][..padding(s.len() as u64)]);
}

/// Appends the tokens that open a node of kind `kind` (`regular`, `symlink`, `directory`).
pub(crate) fn put_node_start(buf: &mut Vec<u8>, kind: &[u8]) {
    put_str(buf, b"(");
    put_str(buf, b"type");
    put_str(buf, kind);
}

/// Appends the header of a regular file up to its contents (whose length comes next).
pub(crate) fn put_file_header(buf: &mut Vec<u8>, executable: bool, len: u64) {
    put_node_start(buf, b"regular");
    if executable {
        put_str(buf, b"executable");
        put_str(buf, b"");
    }
    put_str(buf, b"contents");
    buf.extend_from_slice(&len.to_le_bytes());
}

pub(crate) fn put_symlink(buf: &mut Vec<u8>, target: &[u8]) {
    put_node_start(buf, b"symlink");
    put_str(buf, b"target");
    put_str(buf, target);
    put_str(buf, b")");
}

pub(crate) fn put_entry_start(buf: &mut Vec<u8>, name: &[u8]) {
    put_str(buf, b"entry");
    put_str(buf, b"(");
    put_str(buf, b"name");
    put_str(buf, name);
    put_str(buf, b"node");
}

/// Small items are gathered here and written in one go.
const BUF_LIMIT: usize = 256 << 10;

struct Out<'a, W> {
    w: &'a mut W,
    buf: Vec<u8>,
    sha: Sha256,
    size: u64,
}

impl<W: AsyncWrite + Unpin> Out<'_, W> {
    async fn flush(&mut self) -> Result<(), NarError> {
        if !self.buf.is_empty() {
            self.sha.update(&self.buf);
            self.size += self.buf.len() as u64;
            self.w.write_all(&self.buf).await.map_err(NarError::Write)?;
            self.buf.clear();
        }
        Ok(())
    }

    async fn maybe_flush(&mut self) -> Result<(), NarError> {
        if self.buf.len() >= BUF_LIMIT {
            self.flush().await?;
        }
        Ok(())
    }

    async fn data(&mut self, data: &[u8]) -> Result<(), NarError> {
        if self.buf.len() + data.len() <= BUF_LIMIT {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        self.flush().await?;
        self.sha.update(data);
        self.size += data.len() as u64;
        self.w.write_all(data).await.map_err(NarError::Write)
    }
}

enum Step {
    Node(Node),
    Entry(Bytes, Node),
    Close,
}

fn store_err(e: StoreError) -> NarError {
    NarError::Tree(e)
}

/// What the tree walk yields, in NAR order: runs of framing tokens, and files to fetch.
enum Piece {
    Tokens(Vec<u8>),
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
}

/// A piece with its file content fetched (small files) or opened for streaming (large ones).
enum Fetched {
    Tokens(Vec<u8>),
    Whole {
        executable: bool,
        size: u64,
        data: Vec<Bytes>,
    },
    Streamed {
        executable: bool,
        reader: BlobReader,
    },
}

/// Files up to this size are fetched whole, ahead of the writer.
const PREFETCH_FILE_MAX: u64 = 1 << 20;
/// Pieces fetched ahead of the writer (so at most this many small files are held).
const PREFETCH_PIECES: usize = 32;

/// Walks the tree in NAR order. Directories are fetched here, files are left to the fetch
/// stage, so the walk runs ahead of the writer and file reads overlap.
fn walk(store: Store, node: Node) -> impl Stream<Item = Result<Piece, NarError>> {
    let mut magic = Vec::new();
    put_str(&mut magic, MAGIC);
    futures::stream::try_unfold(
        (vec![Step::Node(node)], store, magic),
        |(mut work, store, mut buf)| async move {
            while let Some(step) = work.pop() {
                match step {
                    Step::Close => put_str(&mut buf, b")"),
                    Step::Entry(name, node) => {
                        put_entry_start(&mut buf, &name);
                        work.push(Step::Close);
                        work.push(Step::Node(node));
                    }
                    Step::Node(Node::Symlink { target }) => put_symlink(&mut buf, &target),
                    Step::Node(Node::File {
                        digest,
                        size,
                        executable,
                    }) => {
                        if !buf.is_empty() {
                            // Tokens first; the file comes on the next call.
                            work.push(Step::Node(Node::File {
                                digest,
                                size,
                                executable,
                            }));
                            return Ok(Some((Piece::Tokens(buf), (work, store, Vec::new()))));
                        }
                        let file = Piece::File {
                            digest,
                            size,
                            executable,
                        };
                        return Ok(Some((file, (work, store, buf))));
                    }
                    Step::Node(Node::Directory { digest, .. }) => {
                        let dir: Directory = crate::trees::get_dir(&store, &digest)
                            .await
                            .map_err(store_err)?;
                        put_node_start(&mut buf, b"directory");
                        work.push(Step::Close);
                        let entries: Vec<_> = dir.entries().collect();
                        for e in entries.into_iter().rev() {
                            let node = entry_node(e).map_err(store_err)?;
                            work.push(Step::Entry(e.name().clone(), node));
                        }
                    }
                }
                if buf.len() >= BUF_LIMIT {
                    return Ok(Some((Piece::Tokens(buf), (work, store, Vec::new()))));
                }
            }
            if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some((Piece::Tokens(buf), (work, store, Vec::new()))))
            }
        },
    )
}

async fn fetch(store: Store, piece: Piece) -> Result<Fetched, NarError> {
    let (digest, size, executable) = match piece {
        Piece::Tokens(t) => return Ok(Fetched::Tokens(t)),
        Piece::File {
            digest,
            size,
            executable,
        } => (digest, size, executable),
    };
    let reader = BlobReader::open(store.blobs.clone(), digest)
        .await
        .map_err(store_err)?;
    if reader.size() != size {
        return Err(store_err(StoreError::corrupt(
            "blob",
            &digest,
            format!("is {} bytes, the directory says {size}", reader.size()),
        )));
    }
    if size > PREFETCH_FILE_MAX {
        return Ok(Fetched::Streamed { executable, reader });
    }
    let data: Vec<Bytes> = reader.stream().try_collect().await.map_err(store_err)?;
    Ok(Fetched::Whole {
        executable,
        size,
        data,
    })
}

/// Writes the NAR of `node` to `w` (flushed at the end) and returns its size and hash.
pub async fn write_nar<W: AsyncWrite + Unpin>(
    store: &Store,
    node: &Node,
    w: &mut W,
) -> Result<NarSummary, NarError> {
    let mut out = Out {
        w,
        buf: Vec::with_capacity(BUF_LIMIT * 2),
        sha: Sha256::new(),
        size: 0,
    };
    let fetch_store = store.clone();
    let mut pieces = Box::pin(
        walk(store.clone(), node.clone())
            .map_ok(move |p| fetch(fetch_store.clone(), p))
            .try_buffered(PREFETCH_PIECES),
    );
    while let Some(piece) = pieces.try_next().await? {
        match piece {
            Fetched::Tokens(t) => out.data(&t).await?,
            Fetched::Whole {
                executable,
                size,
                data,
            } => {
                put_file_header(&mut out.buf, executable, size);
                for d in &data {
                    out.data(d).await?;
                }
                out.buf.extend_from_slice(&[0u8; 8][..padding(size)]);
                put_str(&mut out.buf, b")");
            }
            Fetched::Streamed { executable, reader } => {
                let size = reader.size();
                put_file_header(&mut out.buf, executable, size);
                let mut chunks = Box::pin(reader.stream());
                while let Some(chunk) = chunks.next().await {
                    out.data(&chunk.map_err(store_err)?).await?;
                }
                out.buf.extend_from_slice(&[0u8; 8][..padding(size)]);
                put_str(&mut out.buf, b")");
            }
        }
        out.maybe_flush().await?;
    }
    out.flush().await?;
    out.w.flush().await.map_err(NarError::Write)?;
    Ok(NarSummary {
        nar_size: out.size,
        nar_sha256: NarHash(out.sha.finalize().into()),
    })
}

/// The NAR size and hash of a node, without keeping the NAR.
pub async fn nar_summary(store: &Store, node: &Node) -> Result<NarSummary, NarError> {
    write_nar(store, node, &mut tokio::io::sink()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_or_lying_content_is_an_error_not_a_nar() {
        let store = crate::store::open("memory://").await.unwrap();
        let missing = Node::File {
            digest: B3Digest::of(b"never stored"),
            size: 12,
            executable: false,
        };
        let mut out = Vec::new();
        let e = write_nar(&store, &missing, &mut out).await.unwrap_err();
        assert!(matches!(e, NarError::Tree(_)), "{e}");

        let data = Bytes::from_static(b"abc");
        store
            .blobs
            .put_chunk(B3Digest::of(&data), data.clone())
            .await
            .unwrap();
        let lying = Node::File {
            digest: B3Digest::of(&data),
            size: 4,
            executable: false,
        };
        let e = write_nar(&store, &lying, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("the directory says 4"), "{e}");

        let dir = Node::Directory {
            digest: B3Digest::of(b"no such directory"),
            size: 0,
        };
        assert!(write_nar(&store, &dir, &mut Vec::new()).await.is_err());
    }
}
