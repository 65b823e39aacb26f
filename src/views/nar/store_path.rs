//! Nix store path basenames: `<32 nix-base32 chars>-<name>`, with the name rules Nix applies
//! (`a-zA-Z0-9+-._?=`, at most 211 bytes, not `.`/`..` or a `.-`/`..-` prefix).

use super::hash::is_nix32_char;

/// Length of the hash part of a store path.
pub const HASH_PART_LEN: usize = 32;
/// Longest name part Nix accepts.
pub const MAX_NAME_LEN: usize = 211;
/// Where Nix keeps store paths, for rendering full paths.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{basename:?} is not a store path basename: {reason}")]
pub struct StorePathError {
    pub basename: String,
    pub reason: String,
}

/// Checks `<hash>-<name>` and returns `(hash part, name part)`.
pub fn parse_basename(basename: &str) -> Result<(&str, &str), StorePathError> {
    let err = |reason: String| StorePathError {
        basename: basename.to_string(),
        reason,
    };
    let b = basename.as_bytes();
    if b.len() < HASH_PART_LEN + 2 {
        return Err(err(format!(
            "too short (want {HASH_PART_LEN} hash chars, '-', a name)"
        )));
    }
    if let Some(&c) = b[..HASH_PART_LEN].iter().find(|&&c| !is_nix32_char(c)) {
        return Err(err(format!(
            "hash part has {:?}, not a nix-base32 character",
            c as char
        )));
    }
    if b[HASH_PART_LEN] != b'-' {
        return Err(err(format!("want '-' after the {HASH_PART_LEN}-char hash")));
    }
    let name = &basename[HASH_PART_LEN + 1..];
    if name.len() > MAX_NAME_LEN {
        return Err(err(format!(
            "name is {} bytes, longer than {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if let Some(c) = name.bytes().find(|&c| {
        !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'='))
    }) {
        return Err(err(format!("name has illegal character {:?}", c as char)));
    }
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Err(err("name is '.' or '..' (or one followed by '-')".into()));
    }
    Ok((&basename[..HASH_PART_LEN], name))
}

/// Accepts a basename or a full path under `store_dir`, returning the basename.
pub fn to_basename<'a>(s: &'a str, store_dir: &str) -> Result<&'a str, StorePathError> {
    let base = match s.strip_prefix(store_dir) {
        Some(rest) if rest.starts_with('/') => &rest[1..],
        _ => s,
    };
    parse_basename(base)?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    #[test]
    fn accepts_real_names() {
        for n in [
            "hello-2.12",
            "python3-3.11.7",
            "a",
            "x+y_z?=.",
            "glibc-2.37-8-dev",
        ] {
            let b = format!("{H}-{n}");
            assert_eq!(parse_basename(&b).unwrap(), (H, n));
        }
        let long = format!("{H}-{}", "a".repeat(211));
        assert!(parse_basename(&long).is_ok());
        assert_eq!(
            to_basename(&format!("/nix/store/{H}-x"), "/nix/store").unwrap(),
            format!("{H}-x")
        );
    }

    #[test]
    fn rejects_bad_names() {
        let cases = [
            "short".to_string(),
            format!("{}-x", &H[..31]),
            format!("{}e-x", &H[..31]), // 'e' is not nix-base32
            format!("{}T-x", &H[..31]), // upper case
            format!("{H}_x"),           // no '-'
            format!("{H}-"),            // empty name
            format!("{H}-a b"),         // space
            format!("{H}-a/b"),         // slash
            format!("{H}-caf\u{e9}"),   // non-ASCII
            format!("{H}-{}", "a".repeat(212)),
            format!("{H}-."),
            format!("{H}-.."),
            format!("{H}-.-x"),
        ];
        for c in &cases {
            assert!(parse_basename(c).is_err(), "{c:?} should be rejected");
        }
    }
}
