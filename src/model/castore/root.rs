//! Named roots: `name -> (node, optional Nix metadata)`.

use bytes::Bytes;
use prost::Message;

use crate::model::times::{self, TimesRef};
use crate::model::trace::TraceRef;

use super::{
    decode_bounded, directory::validate_target, proto, show, validate_name, B3Digest,
    DirectoryEntry, FileEntry, ModelError, SymlinkEntry,
};

pub use proto::NixInfo;

/// What a root (or any directory entry) points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Directory {
        digest: B3Digest,
        size: u64,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Bytes,
    },
}

impl Node {
    pub fn digest(&self) -> Option<B3Digest> {
        match self {
            Node::Directory { digest, .. } | Node::File { digest, .. } => Some(*digest),
            Node::Symlink { .. } => None,
        }
    }
}

impl TryFrom<&DirectoryEntry> for Node {
    type Error = ModelError;
    fn try_from(e: &DirectoryEntry) -> Result<Self, ModelError> {
        Ok(Node::Directory {
            digest: B3Digest::try_from(&e.digest[..])?,
            size: e.size,
        })
    }
}

impl TryFrom<&FileEntry> for Node {
    type Error = ModelError;
    fn try_from(e: &FileEntry) -> Result<Self, ModelError> {
        Ok(Node::File {
            digest: B3Digest::try_from(&e.digest[..])?,
            size: e.size,
            executable: e.executable,
        })
    }
}

impl From<&SymlinkEntry> for Node {
    fn from(e: &SymlinkEntry) -> Self {
        Node::Symlink {
            target: e.target.clone(),
        }
    }
}

/// Root names are entry names (they appear as top-level entries of a mount and as files
/// under `roots/`), so the same rules apply.
pub fn validate_root_name(name: &str) -> Result<(), ModelError> {
    validate_name(name.as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    pub name: String,
    pub node: Node,
    pub nix: Option<NixInfo>,
    /// The tree's recorded modification times, if its import recorded them.
    pub times: Option<TimesRef>,
    /// The first records of `times` ([`crate::model::times::head`]); empty without a table
    /// or where the writer kept none. Only ever a prefix of the table (`granary verify`
    /// checks it).
    pub times_head: Vec<i64>,
    /// Recorded read orders of jobs on the tree, replayed as prefetch by mounts.
    pub traces: Vec<TraceRef>,
}

impl RootRecord {
    pub fn encode(&self) -> Vec<u8> {
        let name = Bytes::copy_from_slice(self.name.as_bytes());
        let node = match &self.node {
            Node::Directory { digest, size } => proto::root::Node::Directory(DirectoryEntry {
                name: name.clone(),
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size: *size,
            }),
            Node::File {
                digest,
                size,
                executable,
            } => proto::root::Node::File(FileEntry {
                name: name.clone(),
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => proto::root::Node::Symlink(SymlinkEntry {
                name: name.clone(),
                target: target.clone(),
            }),
        };
        proto::Root {
            name,
            node: Some(node),
            nix: self.nix.clone(),
            times: self.times.map(|t| proto::Times {
                digest: Bytes::copy_from_slice(t.digest.as_bytes()),
                size: t.size,
                head: self
                    .times_head
                    .iter()
                    .flat_map(|r| r.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            }),
            traces: self.traces.iter().map(TraceRef::to_proto).collect(),
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.is_empty() {
            return Err(ModelError::Root("empty record (0 bytes)".into()));
        }
        let r: proto::Root = decode_bounded("root", bytes)?;
        let name = String::from_utf8(r.name.to_vec())
            .map_err(|_| ModelError::Root(format!("name {:?} is not UTF-8", show(&r.name))))?;
        validate_root_name(&name)?;
        let node = match r.node {
            Some(proto::root::Node::Directory(d)) => Node::try_from(&d)?,
            Some(proto::root::Node::File(f)) => Node::try_from(&f)?,
            Some(proto::root::Node::Symlink(s)) => {
                validate_target(&s.name, &s.target)?;
                Node::from(&s)
            }
            None => return Err(ModelError::Root(format!("{name}: no node"))),
        };
        if let Some(nix) = &r.nix {
            if !nix.nar_sha256.is_empty() && nix.nar_sha256.len() != 32 {
                return Err(ModelError::Root(format!(
                    "{name}: NAR sha256 is not 32 bytes"
                )));
            }
        }
        let (times, times_head) = match r.times {
            Some(t) => {
                let table = TimesRef {
                    digest: B3Digest::try_from(&t.digest[..])?,
                    size: t.size,
                };
                let records = t.head.len() / times::RECORD as usize;
                if t.head.len() % times::RECORD as usize != 0
                    || records > 1 + times::HEAD_ENTRIES_MAX
                    || times::offset_of(records as u64) > t.size
                {
                    return Err(ModelError::Root(format!(
                        "{name}: head of times table {} is {} bytes: not whole records \
                         of a {}-byte table, or more than {} of them",
                        table.digest,
                        t.head.len(),
                        t.size,
                        1 + times::HEAD_ENTRIES_MAX
                    )));
                }
                (Some(table), times::decode_records(&t.head))
            }
            None => (None, Vec::new()),
        };
        let traces = r
            .traces
            .iter()
            .map(TraceRef::from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ModelError::Root(format!("{name}: trace: {e}")))?;
        Ok(RootRecord {
            name,
            node,
            nix: r.nix,
            times,
            times_head,
            traces,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_round_trip_and_rejects() {
        for node in [
            Node::Directory {
                digest: B3Digest::of(b"d"),
                size: 3,
            },
            Node::File {
                digest: B3Digest::of(b"f"),
                size: 9,
                executable: true,
            },
            Node::Symlink {
                target: Bytes::from_static(b"/x"),
            },
        ] {
            let r = RootRecord {
                name: "abc".into(),
                node,
                nix: None,
                times: None,
                times_head: Vec::new(),
                traces: Vec::new(),
            };
            assert_eq!(RootRecord::decode(&r.encode()).unwrap(), r);
            let timed = RootRecord {
                times: Some(TimesRef {
                    digest: B3Digest::of(b"t"),
                    size: 24,
                }),
                times_head: vec![-7],
                ..r
            };
            assert_eq!(RootRecord::decode(&timed.encode()).unwrap(), timed);
            // A head longer than its table (24 bytes: one record) is refused.
            let long = RootRecord {
                times_head: vec![1, 2],
                ..timed.clone()
            };
            let e = RootRecord::decode(&long.encode()).unwrap_err().to_string();
            assert!(e.contains("head of times table"), "{e}");
            // So is one that is not whole records.
            let mut p = proto::Root::decode(&timed.encode()[..]).unwrap();
            if let Some(t) = &mut p.times {
                t.head = Bytes::from_static(&[1, 2, 3]);
            }
            assert!(RootRecord::decode(&p.encode_to_vec()).is_err());
        }
        let bad = RootRecord {
            name: "a/b".into(),
            node: Node::Symlink {
                target: Bytes::from_static(b"x"),
            },
            nix: None,
            times: None,
            times_head: Vec::new(),
            traces: Vec::new(),
        };
        assert!(RootRecord::decode(&bad.encode()).is_err());
        assert!(RootRecord::decode(&[0xff, 0xff]).is_err());
    }
}
