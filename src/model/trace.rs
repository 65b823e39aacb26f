//! Traces: the order in which a job first read a tree's directories, blob indexes and chunks,
//! kept as a blob and named in the tree's root record, so that any machine mounting the root
//! can fetch them ahead of the job. Traces of several runs merge. No I/O.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;

use super::castore::{decode_bounded, proto, B3Digest, ModelError};

/// The largest trace blob read (a million entries is about 40 MiB).
pub const MAX_TRACE_BYTES: u64 = 64 << 20;
/// Entries a trace keeps; a merge keeps the earliest-ranked ones.
pub const MAX_ENTRIES: usize = 1 << 20;
/// The name a trace gets when none is given.
pub const DEFAULT_NAME: &str = "default";

/// What one entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A chunk (its size in bytes).
    Chunk,
    /// A blob's index, for blobs whose layout a reader must fetch (the blob's size).
    Blob,
    /// A directory (size 0).
    Dir,
}

impl EntryKind {
    fn code(self) -> u32 {
        match self {
            EntryKind::Chunk => 0,
            EntryKind::Blob => 1,
            EntryKind::Dir => 2,
        }
    }

    fn of(code: u32) -> Option<Self> {
        match code {
            0 => Some(EntryKind::Chunk),
            1 => Some(EntryKind::Blob),
            2 => Some(EntryKind::Dir),
            _ => None,
        }
    }
}

/// One first read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub kind: EntryKind,
    pub digest: B3Digest,
    pub size: u64,
}

/// A recorded read order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// The tree it was (last) recorded on.
    pub tree: Option<B3Digest>,
    /// Recordings merged into it.
    pub runs: u32,
    pub entries: Vec<TraceEntry>,
}

fn trace_error(reason: String) -> ModelError {
    ModelError::Decode {
        what: "trace",
        reason,
    }
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        proto::Trace {
            tree: self
                .tree
                .map(|d| Bytes::copy_from_slice(d.as_bytes()))
                .unwrap_or_default(),
            runs: self.runs,
            entries: self
                .entries
                .iter()
                .map(|e| proto::TraceEntry {
                    kind: e.kind.code(),
                    digest: Bytes::copy_from_slice(e.digest.as_bytes()),
                    size: e.size,
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes and checks a trace: known kinds, whole digests, no entry twice, bounded.
    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.len() as u64 > MAX_TRACE_BYTES {
            return Err(trace_error(format!(
                "{} bytes is over the limit",
                bytes.len()
            )));
        }
        let t: proto::Trace = decode_bounded("trace", bytes)?;
        if t.entries.len() > MAX_ENTRIES {
            return Err(trace_error(format!("{} entries", t.entries.len())));
        }
        let tree = if t.tree.is_empty() {
            None
        } else {
            Some(B3Digest::try_from(&t.tree[..])?)
        };
        let mut seen = std::collections::HashSet::with_capacity(t.entries.len());
        let mut entries = Vec::with_capacity(t.entries.len());
        for (i, e) in t.entries.iter().enumerate() {
            let kind = EntryKind::of(e.kind)
                .ok_or_else(|| trace_error(format!("entry {i}: unknown kind {}", e.kind)))?;
            let digest = B3Digest::try_from(&e.digest[..])
                .map_err(|why| trace_error(format!("entry {i}: {why}")))?;
            if !seen.insert((kind, digest)) {
                return Err(trace_error(format!("entry {i}: {digest} appears twice")));
            }
            entries.push(TraceEntry {
                kind,
                digest,
                size: e.size,
            });
        }
        Ok(Trace {
            tree,
            runs: t.runs,
            entries,
        })
    }

    /// Bytes of chunks the trace names.
    pub fn chunk_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Chunk)
            .map(|e| e.size)
            .sum()
    }

    /// The union of two traces, each entry placed by the earliest relative position it has in
    /// either (so two runs that read the same things in the same order merge into that order,
    /// and what only one run read lands where that run read it); `other`'s tree is kept.
    pub fn merge(&self, other: &Trace) -> Trace {
        let mut rank: HashMap<(EntryKind, B3Digest), (f64, usize, TraceEntry)> = HashMap::new();
        let mut order = 0usize;
        for t in [self, other] {
            let n = t.entries.len().max(1) as f64;
            for (i, e) in t.entries.iter().enumerate() {
                let r = i as f64 / n;
                order += 1;
                rank.entry((e.kind, e.digest))
                    .and_modify(|(best, _, _)| *best = best.min(r))
                    .or_insert((r, order, *e));
            }
        }
        let mut all: Vec<_> = rank.into_values().collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.truncate(MAX_ENTRIES);
        Trace {
            tree: other.tree.or(self.tree),
            runs: self.runs.saturating_add(other.runs),
            entries: all.into_iter().map(|(_, _, e)| e).collect(),
        }
    }
}

/// A named trace of a root: the blob holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRef {
    pub name: String,
    pub digest: B3Digest,
    pub size: u64,
    /// When it was last saved (Unix seconds).
    pub saved: u64,
}

impl TraceRef {
    pub(crate) fn to_proto(&self) -> proto::TraceRef {
        proto::TraceRef {
            name: self.name.clone(),
            digest: Bytes::copy_from_slice(self.digest.as_bytes()),
            size: self.size,
            saved: self.saved,
        }
    }

    pub(crate) fn from_proto(t: &proto::TraceRef) -> Result<Self, ModelError> {
        super::castore::validate_root_name(&t.name)?;
        Ok(TraceRef {
            name: t.name.clone(),
            digest: B3Digest::try_from(&t.digest[..])?,
            size: t.size,
            saved: t.saved,
        })
    }
}

/// The trace of `traces` called `name`, or the newest when `name` is `None`.
pub fn pick<'a>(traces: &'a [TraceRef], name: Option<&str>) -> Option<&'a TraceRef> {
    match name {
        Some(n) => traces.iter().find(|t| t.name == n),
        None => traces.iter().max_by_key(|t| t.saved),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &str) -> TraceEntry {
        TraceEntry {
            kind: EntryKind::Chunk,
            digest: B3Digest::of(s.as_bytes()),
            size: s.len() as u64,
        }
    }

    #[test]
    fn traces_round_trip_and_reject_bad_input() {
        let t = Trace {
            tree: Some(B3Digest::of(b"tree")),
            runs: 1,
            entries: vec![
                chunk("a"),
                TraceEntry {
                    kind: EntryKind::Dir,
                    digest: B3Digest::of(b"d"),
                    size: 0,
                },
                chunk("bb"),
            ],
        };
        assert_eq!(Trace::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.chunk_bytes(), 3);
        let mut twice = t.clone();
        twice.entries.push(chunk("a"));
        assert!(Trace::decode(&twice.encode())
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let mut p = proto::Trace::decode(&t.encode()[..]).unwrap();
        p.entries[0].kind = 9;
        assert!(Trace::decode(&p.encode_to_vec()).is_err());
        p.entries[0].kind = 0;
        p.entries[0].digest = Bytes::from_static(b"short");
        assert!(Trace::decode(&p.encode_to_vec()).is_err());
        assert!(Trace::decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn merging_keeps_a_shared_order_and_places_the_rest_where_it_was_read() {
        let a = Trace {
            tree: None,
            runs: 1,
            entries: vec![chunk("1"), chunk("2"), chunk("3"), chunk("4")],
        };
        let b = Trace {
            tree: Some(B3Digest::of(b"t")),
            runs: 2,
            entries: vec![chunk("1"), chunk("x"), chunk("3"), chunk("4")],
        };
        let m = a.merge(&b);
        assert_eq!(m.runs, 3);
        assert_eq!(m.tree, b.tree);
        let names: Vec<_> = m.entries.iter().map(|e| e.digest).collect();
        let want: Vec<_> = ["1", "2", "x", "3", "4"]
            .iter()
            .map(|s| B3Digest::of(s.as_bytes()))
            .collect();
        assert_eq!(names, want);
        assert_eq!(
            a.merge(&a).entries,
            a.entries,
            "merging a run with itself changes nothing"
        );
    }
}
