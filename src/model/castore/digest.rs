//! `B3Digest`: the 32-byte BLAKE3 digest that names every object in the store.
//!
//! Humans see lowercase hex; parsing also accepts the `blake3-<base64>` spelling of the
//! tvix/snix castore.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};

use super::ModelError;

pub const DIGEST_LEN: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; DIGEST_LEN]);

impl B3Digest {
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// The `blake3-<base64>` spelling used by tvix/snix.
    pub fn to_sri(&self) -> String {
        format!("blake3-{}", BASE64.encode(&self.0))
    }
}

impl From<[u8; DIGEST_LEN]> for B3Digest {
    fn from(b: [u8; DIGEST_LEN]) -> Self {
        Self(b)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = ModelError;
    fn try_from(b: &[u8]) -> Result<Self, ModelError> {
        let arr: [u8; DIGEST_LEN] = b
            .try_into()
            .map_err(|_| ModelError::DigestLength(b.len()))?;
        Ok(Self(arr))
    }
}

impl FromStr for B3Digest {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let bad = || ModelError::DigestSyntax(s.chars().take(80).collect());
        let bytes = if let Some(b64) = s.strip_prefix("blake3-") {
            BASE64.decode(b64.as_bytes()).map_err(|_| bad())?
        } else {
            if s.len() != DIGEST_LEN * 2 {
                return Err(bad());
            }
            HEXLOWER_PERMISSIVE
                .decode(s.as_bytes())
                .map_err(|_| bad())?
        };
        B3Digest::try_from(bytes.as_slice()).map_err(|_| bad())
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B3Digest({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sri_round_trip() {
        let d = B3Digest::of(b"hello");
        assert_eq!(d.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(d.to_hex().parse::<B3Digest>().unwrap(), d);
        assert_eq!(d.to_hex().to_uppercase().parse::<B3Digest>().unwrap(), d);
        assert_eq!(d.to_sri().parse::<B3Digest>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_spellings() {
        for s in [
            "",
            "abc",
            &"g".repeat(64),
            &"a".repeat(66),
            "blake3-AAAA",
            "blake3-!!",
        ] {
            assert!(s.parse::<B3Digest>().is_err(), "{s:?} parsed");
        }
        assert!(matches!(
            B3Digest::try_from(&[0u8; 31][..]),
            Err(ModelError::DigestLength(31))
        ));
    }
}
