//! NAR hashes and their spellings: Nix's own base32 ("nix32", as `nix-hash --base32` prints),
//! `sha256:<nix32>` as in `.narinfo` files, and SRI `sha256-<base64>`.
//!
//! Nix's base32 is not RFC 4648: its alphabet omits `e o u t`, and it reads the hash from the
//! last 5-bit group to the first, so it has its own small codec here.

use std::fmt;

use data_encoding::BASE64;

/// Nix's base32 alphabet.
pub const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Whether `c` is one of Nix's base32 characters.
pub fn is_nix32_char(c: u8) -> bool {
    NIX32_TABLE[c as usize] != 0xff
}

const NIX32_TABLE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        t[NIX32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Length of the nix32 spelling of `n` bytes.
pub const fn nix32_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Encodes bytes the way Nix prints hashes in base32.
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = nix32_len(bytes.len());
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            // j is at most 7, so the shift is in range for u16.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        s.push(NIX32_ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    s
}

/// Decodes a nix32 string into `N` bytes; `None` if it is not exactly that.
pub fn nix32_decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != nix32_len(N) {
        return None;
    }
    let mut out = [0u8; N];
    for n in 0..s.len() {
        let digit = NIX32_TABLE[s[s.len() - n - 1] as usize];
        if digit == 0xff {
            return None;
        }
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= ((digit as u16) << j) as u8;
        let carry = ((digit as u16) << j) >> 8;
        if i + 1 < N {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// The SHA-256 of a NAR serialisation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarHash(pub [u8; 32]);

impl NarHash {
    /// `nix-hash --type sha256 --base32` spelling (52 chars).
    pub fn to_nix32(&self) -> String {
        nix32_encode(&self.0)
    }
    /// `sha256:<nix32>`, as in `.narinfo` files.
    pub fn to_typed_nix32(&self) -> String {
        format!("sha256:{}", self.to_nix32())
    }
    /// `sha256-<base64>` (Subresource Integrity).
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", BASE64.encode(&self.0))
    }
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// Parses any of the spellings Nix uses: `sha256:<nix32|hex|base64>`, `sha256-<base64>`,
    /// or a bare nix32 / hex string.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(b64) = s.strip_prefix("sha256-") {
            return BASE64
                .decode(b64.as_bytes())
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .map(NarHash);
        }
        let body = s.strip_prefix("sha256:").unwrap_or(s);
        if let Some(h) = nix32_decode::<32>(body) {
            return Some(NarHash(h));
        }
        if body.len() == 64 {
            return data_encoding::HEXLOWER_PERMISSIVE
                .decode(body.as_bytes())
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .map(NarHash);
        }
        BASE64
            .decode(body.as_bytes())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .map(NarHash)
    }
}

impl TryFrom<&[u8]> for NarHash {
    type Error = usize;
    fn try_from(b: &[u8]) -> Result<Self, usize> {
        <[u8; 32]>::try_from(b).map(NarHash).map_err(|_| b.len())
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_typed_nix32())
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarHash({})", self.to_typed_nix32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn known_vectors() {
        // `nix-hash --type sha256 --to-base32` of sha256("") and sha256("abc"), as printed by
        // Nix (and by `nix hash to-base32`).
        let empty: [u8; 32] = sha2::Sha256::digest(b"").into();
        assert_eq!(
            nix32_encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        let abc: [u8; 32] = sha2::Sha256::digest(b"abc").into();
        assert_eq!(
            nix32_encode(&abc),
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        // 20-byte (sha1-sized, store path hash part) length: 32 chars.
        assert_eq!(nix32_encode(&[0u8; 20]).len(), 32);
        assert_eq!(nix32_len(32), 52);
    }

    #[test]
    fn round_trip_and_rejects() {
        let mut state = 7u64;
        for _ in 0..200 {
            let mut h = [0u8; 32];
            for b in &mut h {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (state >> 56) as u8;
            }
            let s = nix32_encode(&h);
            assert_eq!(nix32_decode::<32>(&s), Some(h));
            let n = NarHash(h);
            assert_eq!(NarHash::parse(&n.to_sri()), Some(n));
            assert_eq!(NarHash::parse(&n.to_typed_nix32()), Some(n));
            assert_eq!(NarHash::parse(&n.to_hex()), Some(n));
        }
        // Wrong length, bad characters, and a top digit whose high bits fall off the end.
        assert_eq!(nix32_decode::<32>("abc"), None);
        assert_eq!(nix32_decode::<32>(&"e".repeat(52)), None);
        assert_eq!(nix32_decode::<32>(&format!("z{}", "0".repeat(51))), None);
        assert_eq!(NarHash::parse("sha256-AAAA"), None);
    }
}
