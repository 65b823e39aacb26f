//! Nix's narinfo signatures: ed25519 over a path's fingerprint, with keys in the format
//! `nix-store --generate-binary-cache-key` writes (`NAME:base64(64-byte secret)`, where the
//! 64 bytes are libsodium's seed followed by the public key) and signatures spelt
//! `NAME:base64(64-byte signature)`.

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use crate::model::castore::NixInfo;
use crate::views::nar::NarHash;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("signing key: {0}")]
pub struct KeyError(String);

/// A named ed25519 secret key, as Nix writes them.
pub struct NixSigningKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NixSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "NixSigningKey({})", self.name)
    }
}

impl NixSigningKey {
    /// Parses `NAME:base64(seed || public)`; the public half must match the seed.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let (name, b64) = text.split_once(':').ok_or_else(|| {
            KeyError("want NAME:BASE64 (from nix-store --generate-binary-cache-key)".into())
        })?;
        if name.is_empty() {
            return Err(KeyError("the key name before ':' is empty".into()));
        }
        let bytes = BASE64
            .decode(b64.as_bytes())
            .map_err(|e| KeyError(format!("secret is not base64: {e}")))?;
        let pair: [u8; 64] = bytes.as_slice().try_into().map_err(|_| {
            KeyError(format!(
                "secret is {} bytes, want 64 (is this the public key?)",
                bytes.len()
            ))
        })?;
        let key = SigningKey::from_keypair_bytes(&pair)
            .map_err(|_| KeyError("the public half does not match the secret seed".into()))?;
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key as `trusted-public-keys` wants it: `NAME:base64(32 bytes)`.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// `NAME:base64(signature)` over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, BASE64.encode(&sig.to_bytes()))
    }
}

/// What Nix signs for a store path:
/// `1;<store>/<path>;sha256:<nix32>;<nar size>;<sorted full reference paths, comma-separated>`.
pub fn fingerprint(store_dir: &str, basename: &str, nix: &NixInfo) -> Option<String> {
    let hash = NarHash::try_from(&nix.nar_sha256[..]).ok()?;
    let mut refs: Vec<String> = nix
        .references
        .iter()
        .map(|r| format!("{store_dir}/{r}"))
        .collect();
    refs.sort();
    Some(format!(
        "1;{store_dir}/{basename};{};{};{}",
        hash.to_typed_nix32(),
        nix.nar_size,
        refs.join(",")
    ))
}

/// Checks `NAME:base64(sig)` against a public key `NAME:base64(pk)`; used by tests and to
/// report which stored signatures a key vouches for.
pub fn verify(public: &str, fingerprint: &str, sig: &str) -> bool {
    let (Some((pname, pk)), Some((sname, s))) = (public.split_once(':'), sig.split_once(':'))
    else {
        return false;
    };
    if pname != sname {
        return false;
    }
    let (Ok(pk), Ok(s)) = (BASE64.decode(pk.as_bytes()), BASE64.decode(s.as_bytes())) else {
        return false;
    };
    let (Ok(pk), Ok(s)) = (<[u8; 32]>::try_from(pk), <[u8; 64]>::try_from(s)) else {
        return false;
    };
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    vk.verify(
        fingerprint.as_bytes(),
        &ed25519_dalek::Signature::from_bytes(&s),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip_and_rejects() {
        let seed = [7u8; 32];
        let sk = SigningKey::from_bytes(&seed);
        let text = format!("cache-1:{}", BASE64.encode(&sk.to_keypair_bytes()));
        let key = NixSigningKey::parse(&text).unwrap();
        assert_eq!(key.name(), "cache-1");
        let sig = key.sign("1;/nix/store/x;sha256:y;1;");
        assert!(verify(&key.public(), "1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!verify(&key.public(), "1;/nix/store/x;sha256:y;2;", &sig));

        // Public half not matching the seed, the public key alone, no name, not base64.
        let mut bad = sk.to_keypair_bytes();
        bad[40] ^= 1;
        for t in [
            format!("k:{}", BASE64.encode(&bad)),
            format!("k:{}", BASE64.encode(sk.verifying_key().as_bytes())),
            format!(":{}", BASE64.encode(&sk.to_keypair_bytes())),
            "k:!!!".to_string(),
            "no-colon".to_string(),
        ] {
            assert!(NixSigningKey::parse(&t).is_err(), "{t}");
        }
    }

    #[test]
    fn fingerprint_is_nix_shaped() {
        let nix = NixInfo {
            nar_size: 872,
            nar_sha256: vec![0u8; 32].into(),
            references: vec!["bbbb-b".into(), "aaaa-a".into()],
            ..Default::default()
        };
        let z = "0".repeat(52);
        assert_eq!(
            fingerprint("/nix/store", "h-x", &nix).unwrap(),
            format!("1;/nix/store/h-x;sha256:{z};872;/nix/store/aaaa-a,/nix/store/bbbb-b")
        );
    }
}
