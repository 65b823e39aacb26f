//! Content-defined chunking (FastCDC v2020) with per-store parameters (DESIGN.md §2).
//!
//! [`Chunker`] is push-based so the same code serves a file read in a blocking thread and a
//! stream arriving over the network: bytes go in, whole chunks come out. A chunk's cut point
//! depends only on the `max` bytes after its start, so a chunk is emitted as soon as `max`
//! bytes are buffered and the result equals chunking the whole content at once.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::FastCDC;
use serde::{Deserialize, Serialize};

/// FastCDC parameters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad chunking parameters {min}/{avg}/{max}: {reason}")]
pub struct ParamsError {
    min: u32,
    avg: u32,
    max: u32,
    reason: String,
}

impl ChunkParams {
    /// Checks the bounds FastCDC v2020 accepts and that min <= avg <= max.
    pub fn validate(&self) -> Result<(), ParamsError> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let reason = if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min) {
            format!("min must be in {MINIMUM_MIN}..={MINIMUM_MAX}")
        } else if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg) {
            format!("avg must be in {AVERAGE_MIN}..={AVERAGE_MAX}")
        } else if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max) {
            format!("max must be in {MAXIMUM_MIN}..={MAXIMUM_MAX}")
        } else if !(self.min <= self.avg && self.avg <= self.max) {
            "need min <= avg <= max".into()
        } else {
            return Ok(());
        };
        Err(ParamsError {
            min: self.min,
            avg: self.avg,
            max: self.max,
            reason,
        })
    }

    /// Parses `MIN/AVG/MAX` with optional K/M suffixes, e.g. `16K/64K/256K`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let parts: Vec<&str> = spec.split('/').collect();
        let [min, avg, max] = parts[..] else {
            return Err(format!("{spec:?}: want MIN/AVG/MAX, e.g. 16K/64K/256K"));
        };
        let p = Self {
            min: crate::units::parse_size(min)?,
            avg: crate::units::parse_size(avg)?,
            max: crate::units::parse_size(max)?,
        };
        p.validate().map_err(|e| e.to_string())?;
        Ok(p)
    }
}

/// The largest chunk any store accepts: FastCDC's own maximum. Every length read from
/// storage or the wire is checked against it before anything is allocated.
pub const MAX_CHUNK: usize = fastcdc::v2020::MAXIMUM_MAX as usize;

/// Incremental FastCDC: push bytes, pop finished chunks, then `finish` for the tail.
pub struct Chunker {
    params: ChunkParams,
    buf: BytesMut,
}

impl Chunker {
    pub fn new(params: ChunkParams) -> Self {
        Self {
            params,
            buf: BytesMut::with_capacity(params.max as usize * 2),
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Bytes buffered but not yet emitted.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next chunk whose cut point is certain, if enough bytes are buffered.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.buf.len() < self.params.max as usize {
            return None;
        }
        self.cut()
    }

    /// After the last push: the remaining chunks, one per call, then `None`.
    pub fn finish_chunk(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        self.cut()
    }

    fn cut(&mut self) -> Option<Bytes> {
        let p = self.params;
        let window = &self.buf[..self.buf.len().min(p.max as usize)];
        let len = FastCDC::new(window, p.min, p.avg, p.max)
            .next()
            .map_or(window.len(), |c| c.length);
        Some(self.buf.split_to(len).freeze())
    }
}

/// Chunks a whole in-memory buffer (tests, small blobs).
pub fn chunk_all(params: ChunkParams, data: &[u8]) -> Vec<Bytes> {
    let mut c = Chunker::new(params);
    c.push(data);
    let mut out = Vec::new();
    while let Some(ch) = c.finish_chunk() {
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn incremental_equals_whole_fastcdc() {
        let p = ChunkParams::default();
        let data = noise(3 << 20, 7);
        let whole: Vec<usize> = FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| c.length)
            .collect();
        // Push in odd-sized pieces, draining as we go.
        let mut c = Chunker::new(p);
        let mut got = Vec::new();
        for piece in data.chunks(12_345) {
            c.push(piece);
            while let Some(ch) = c.next_chunk() {
                got.push(ch.len());
            }
        }
        while let Some(ch) = c.finish_chunk() {
            got.push(ch.len());
        }
        assert_eq!(got, whole);
        assert!(got.iter().all(|&l| l <= p.max as usize));
        assert_eq!(got.iter().sum::<usize>(), data.len());
    }

    #[test]
    fn small_and_empty_inputs() {
        let p = ChunkParams::default();
        assert!(chunk_all(p, b"").is_empty());
        assert_eq!(chunk_all(p, b"abc").len(), 1);
        let exact_max = noise(p.max as usize, 1);
        assert_eq!(chunk_all(p, &exact_max).concat(), exact_max);
    }

    #[test]
    fn params_parse_and_validate() {
        assert_eq!(
            ChunkParams::parse("16K/64K/256K").unwrap(),
            ChunkParams::default()
        );
        assert!(ChunkParams::parse("64K/16K/256K").is_err());
        assert!(ChunkParams::parse("1/2").is_err());
        assert!(ChunkParams::parse("16K/64K/1G").is_err());
    }
}
