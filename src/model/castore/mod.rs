//! The castore data model (DESIGN.md §1): digests, directories, blob indexes and named roots,
//! with the validation every decode and every put goes through. No I/O lives here.

mod digest;
mod directory;
mod root;

pub use digest::{B3Digest, DIGEST_LEN};
pub use directory::{validate_name, Entry};
pub use root::{validate_root_name, NixInfo, Node, RootRecord};

/// The generated protobuf messages (`proto/castore.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/granary.castore.v1.rs"));
}

pub use proto::{BlobIndex, Directory, DirectoryEntry, FileEntry, SymlinkEntry};

/// Longest name of a directory entry, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes.
pub const MAX_TARGET_LEN: usize = 4095;
/// Largest encoded directory we accept from anywhere; bounds allocation on decode.
pub const MAX_DIRECTORY_BYTES: usize = 64 << 20;

/// A violation of the data model, found while decoding or validating.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("digest must be 32 bytes, got {0}")]
    DigestLength(usize),
    #[error("not a digest (want 64 hex chars or blake3-<base64>): {0:?}")]
    DigestSyntax(String),
    #[error("invalid name {name:?}: {reason}")]
    Name { name: String, reason: &'static str },
    #[error("entries not strictly ascending: {prev:?} then {next:?}")]
    Unsorted { prev: String, next: String },
    #[error("name {0:?} appears more than once")]
    Duplicate(String),
    #[error("symlink {name:?}: {reason}")]
    Target { name: String, reason: &'static str },
    #[error("directory size overflows u64")]
    SizeOverflow,
    #[error("child directory {name:?} records size {recorded}, but it has {actual}")]
    SizeMismatch {
        name: String,
        recorded: u64,
        actual: u64,
    },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("blob index: {0}")]
    BlobIndex(String),
    #[error("root: {0}")]
    Root(String),
}

/// Human-readable form of a name that may not be UTF-8.
pub(crate) fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Decodes a protobuf message from untrusted bytes, refusing oversized input first.
pub(crate) fn decode_bounded<M: prost::Message + Default>(
    what: &'static str,
    bytes: &[u8],
) -> Result<M, ModelError> {
    if bytes.len() > MAX_DIRECTORY_BYTES {
        return Err(ModelError::Decode {
            what,
            reason: format!("{} bytes is over the limit", bytes.len()),
        });
    }
    M::decode(bytes).map_err(|e| ModelError::Decode {
        what,
        reason: e.to_string(),
    })
}

/// Bytes of a blob index's checksum.
const INDEX_CHECKSUM_LEN: usize = 16;

impl BlobIndex {
    /// Decodes and checks a blob index: its checksum (when it has one), digests well formed,
    /// sizes sum to the total.
    pub fn decode_valid(bytes: &[u8]) -> Result<Self, ModelError> {
        let idx: BlobIndex = decode_bounded("blob index", bytes)?;
        if !idx.checksum.is_empty() && idx.checksum[..] != idx.compute_checksum()[..] {
            return Err(ModelError::BlobIndex(
                "checksum mismatch: the stored index is damaged".into(),
            ));
        }
        idx.validate()?;
        Ok(idx)
    }

    fn compute_checksum(&self) -> [u8; INDEX_CHECKSUM_LEN] {
        let mut plain = self.clone();
        plain.checksum = bytes::Bytes::new();
        let h = blake3::hash(&prost::Message::encode_to_vec(&plain));
        let mut out = [0u8; INDEX_CHECKSUM_LEN];
        out.copy_from_slice(&h.as_bytes()[..INDEX_CHECKSUM_LEN]);
        out
    }

    /// The bytes to store: the index with its checksum.
    pub fn encode_sealed(&self) -> Vec<u8> {
        let mut sealed = self.clone();
        sealed.checksum = bytes::Bytes::copy_from_slice(&self.compute_checksum());
        prost::Message::encode_to_vec(&sealed)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let mut total: u64 = 0;
        for c in &self.chunks {
            B3Digest::try_from(&c.digest[..])?;
            if c.size == 0 {
                return Err(ModelError::BlobIndex("empty chunk".into()));
            }
            total = total.checked_add(c.size).ok_or(ModelError::SizeOverflow)?;
        }
        if total != self.size {
            return Err(ModelError::BlobIndex(format!(
                "chunk sizes add up to {total}, index says {}",
                self.size
            )));
        }
        Ok(())
    }
}
