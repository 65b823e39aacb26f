//! How a chunk is stored, everywhere (local files and packs, S3 objects, the disk cache): one
//! zstd frame that carries its content size. Decoding never allocates more than
//! [`MAX_CHUNK`] and checks the digest. Also the check of any stored object's bytes.

use std::io::Read;

use bytes::Bytes;

use super::{ObjectKind, Result, StoreError};
use crate::model::castore::{B3Digest, BlobIndex, Directory};
use crate::model::chunking::MAX_CHUNK;

/// Decompresses a stored chunk, never allocating more than [`MAX_CHUNK`], and checks its digest.
pub fn decode_chunk(digest: &B3Digest, compressed: &[u8]) -> Result<Bytes> {
    let out = decompress_bounded(compressed, MAX_CHUNK)
        .map_err(|why| StoreError::corrupt("chunk", digest, why))?;
    check_chunk(digest, out)
}

/// Checks a chunk's plain bytes against its digest.
pub fn check_chunk(digest: &B3Digest, plain: Vec<u8>) -> Result<Bytes> {
    check_digest(ObjectKind::Chunk, digest, &plain)?;
    Ok(Bytes::from(plain))
}

/// Most plain bytes a compression group may hold (a store's group size is at most half).
pub const GROUP_PLAIN_MAX: usize = 16 << 20;

/// Decompresses a compression group's frame, never allocating more than [`GROUP_PLAIN_MAX`].
pub fn decode_group(frame: &[u8]) -> std::result::Result<Vec<u8>, String> {
    decode_group_into(frame, Vec::new())
}

/// [`decode_group`] into `buf` (emptied first; its allocation reused where it is big enough).
pub fn decode_group_into(frame: &[u8], buf: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    decompress_bounded_into(frame, GROUP_PLAIN_MAX, buf)
}

/// Decompresses one zstd frame of at most `max` bytes; the reason if it cannot.
fn decompress_bounded(compressed: &[u8], max: usize) -> std::result::Result<Vec<u8>, String> {
    decompress_bounded_into(compressed, max, Vec::new())
}

/// [`decompress_bounded`] into `out`, emptied first.
fn decompress_bounded_into(
    compressed: &[u8],
    max: usize,
    mut out: Vec<u8>,
) -> std::result::Result<Vec<u8>, String> {
    out.clear();
    // Frames we write carry their content size: decompress in one call into a buffer of
    // exactly that size, with a per-thread context (creating one costs more than a small
    // chunk's decompression). Frames without it take the bounded streaming path.
    match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(size)) if size > max as u64 => Err(format!("larger than {max} bytes")),
        Ok(Some(size)) => {
            out.reserve_exact(size as usize);
            DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let dctx = match &mut *d {
                    Some(dctx) => dctx,
                    None => {
                        d.insert(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?)
                    }
                };
                dctx.decompress_to_buffer(compressed, &mut out)
                    .map_err(|e| format!("zstd: {e}"))
            })?;
            if out.len() as u64 != size {
                return Err(format!(
                    "zstd: {} bytes where the frame header says {size}",
                    out.len()
                ));
            }
            Ok(out)
        }
        _ => {
            let mut dec = zstd::stream::read::Decoder::new(compressed)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame()
                .take(max as u64 + 1);
            dec.read_to_end(&mut out)
                .map_err(|e| format!("zstd: {e}"))?;
            if out.len() > max {
                return Err(format!("larger than {max} bytes"));
            }
            Ok(out)
        }
    }
}

/// A chunk's plain bytes as a stored chunk (a zstd frame carrying its content size) without
/// compressing them: raw blocks, a copy. For a reader that hands on stored chunks (S3 over a
/// copied local store whose chunks sit in compression groups).
pub fn plain_as_frame(plain: &[u8]) -> Vec<u8> {
    const MAGIC: u32 = 0xFD2F_B528;
    const BLOCK: usize = 128 << 10;
    let mut out = Vec::with_capacity(plain.len() + 13 + 3 * (plain.len() / BLOCK + 1));
    out.extend_from_slice(&MAGIC.to_le_bytes());
    // Frame header: an 8-byte content size, single segment (no window descriptor), no
    // checksum, no dictionary.
    out.push(0b1110_0000);
    out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    let mut blocks = plain.chunks(BLOCK).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&1u32.to_le_bytes()[..3]); // one last, empty, raw block
    }
    while let Some(b) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // Block header: last flag, type 0 (raw), size.
        let header = last | ((b.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
    out
}

/// An object's bytes as a store read them: as stored alone (a chunk's zstd frame, a
/// directory's or blob index's protobuf), or plain, cut from its decompressed compression
/// group. Either way not yet verified.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Alone(Vec<u8>),
    Plain(Vec<u8>),
}

impl Stored {
    /// A chunk's verified plain bytes.
    pub fn into_chunk(self, digest: &B3Digest) -> Result<Bytes> {
        match self {
            Stored::Alone(raw) => decode_chunk(digest, &raw),
            Stored::Plain(plain) => check_chunk(digest, plain),
        }
    }

    /// A directory's or blob index's protobuf (the same bytes either way; not yet checked).
    pub fn into_protobuf(self) -> Vec<u8> {
        match self {
            Stored::Alone(b) | Stored::Plain(b) => b,
        }
    }

    /// Verifies the object as a read would (before copying it elsewhere).
    pub fn verify(&self, kind: ObjectKind, digest: &B3Digest) -> Result<()> {
        match (self, kind) {
            (Stored::Plain(plain), ObjectKind::Chunk) => check_digest(kind, digest, plain),
            (Stored::Alone(raw), _) | (Stored::Plain(raw), _) => verify_stored(kind, digest, raw),
        }
    }
}

thread_local! {
    /// One zstd decompression context per thread, made on first use.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// One compression context per thread, with the level it was made for.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses a chunk as stored (one zstd frame carrying its content size), with a per-thread
/// context: making a context per chunk costs more than compressing a small chunk.
pub fn encode_chunk(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let cctx = match &mut *c {
            Some((l, cctx)) if *l == level => cctx,
            _ => &mut c.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        cctx.compress(data)
    })
}

/// Checks that encoded object bytes hash to the digest they are stored under.
pub fn check_digest(kind: ObjectKind, digest: &B3Digest, bytes: &[u8]) -> Result<()> {
    let actual = B3Digest::of(bytes);
    if actual != *digest {
        return Err(StoreError::corrupt(
            kind.what(),
            digest,
            format!("digest mismatch (content hashes to {actual})"),
        ));
    }
    Ok(())
}

/// Checks an object's stored bytes as a read would (used before copying one elsewhere).
pub fn verify_stored(kind: ObjectKind, digest: &B3Digest, raw: &[u8]) -> Result<()> {
    match kind {
        ObjectKind::Chunk => decode_chunk(digest, raw).map(drop),
        ObjectKind::Directory => {
            check_digest(kind, digest, raw)?;
            Directory::decode_valid(raw)
                .map(drop)
                .map_err(|e| StoreError::corrupt("directory", digest, e.to_string()))
        }
        ObjectKind::BlobIndex => BlobIndex::decode_valid(raw)
            .map(drop)
            .map_err(|e| StoreError::corrupt("blob index", digest, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_as_a_frame_decode_as_a_stored_chunk() {
        for len in [0usize, 1, 5000, 128 << 10, (128 << 10) + 1, 300_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let d = B3Digest::of(&plain);
            let frame = plain_as_frame(&plain);
            assert!(matches!(
                zstd::zstd_safe::get_frame_content_size(&frame),
                Ok(Some(n)) if n == len as u64
            ));
            assert_eq!(&decode_chunk(&d, &frame).unwrap()[..], &plain[..], "{len}");
            assert_eq!(zstd::decode_all(&frame[..]).unwrap(), plain, "{len}");
        }
    }
}
