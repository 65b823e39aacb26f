//! Parsing the `.narinfo` files a Nix client uploads (`nix copy --to http://...`). Everything
//! is checked: the store path and its references are store path basenames under the expected
//! store directory, hashes are SHA-256, sizes are numbers, and no field appears twice (except
//! `Sig`). Unknown fields are ignored, as Nix does.

use crate::views::nar::store_path::{parse_basename, to_basename};
use crate::views::nar::NarHash;

/// Largest narinfo accepted (Nix's are a few hundred bytes; a path with thousands of
/// references stays far below this).
pub const MAX_NARINFO_BYTES: usize = 1 << 20;

/// An uploaded narinfo, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedNarInfo {
    /// `<hash>-<name>`, without the store directory.
    pub basename: String,
    /// Where the NAR file was put, relative to the cache root (`nar/<filehash>.nar.xz`).
    pub url: String,
    pub compression: String,
    pub file_hash: Option<NarHash>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// Basenames, sorted and deduplicated.
    pub references: Vec<String>,
    /// Basename or empty.
    pub deriver: String,
    pub signatures: Vec<String>,
    pub ca: String,
}

/// Parses a narinfo; the error says which line is wrong and why.
pub fn parse(text: &str, store_dir: &str) -> Result<UploadedNarInfo, String> {
    let mut fields: Vec<(&str, &str)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once(": ")
            .ok_or_else(|| format!("line {}: want 'Key: value'", i + 1))?;
        if k != "Sig" && fields.iter().any(|(f, _)| *f == k) {
            return Err(format!("line {}: {k} appears twice", i + 1));
        }
        fields.push((k, v));
    }
    let get = |k: &str| fields.iter().find(|(f, _)| *f == k).map(|(_, v)| *v);
    let need = |k: &str| get(k).ok_or_else(|| format!("no {k} field"));
    let hash = |k: &str, v: &str| {
        if !v.starts_with("sha256:") {
            return Err(format!("{k} {v:?}: only sha256 hashes are supported"));
        }
        NarHash::parse(v).ok_or_else(|| format!("{k} {v:?}: not a sha256 hash"))
    };
    let size = |k: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{k} {v:?}: not a size"))
    };

    let store_path = need("StorePath")?;
    let basename = store_path
        .strip_prefix(store_dir)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| format!("StorePath {store_path:?} is not under {store_dir}"))?;
    parse_basename(basename).map_err(|e| format!("StorePath: {e}"))?;

    let url = need("URL")?;
    if url.is_empty() || url.starts_with('/') || url.split('/').any(|c| c == "..") {
        return Err(format!(
            "URL {url:?}: want a relative path inside the cache"
        ));
    }
    let nar_hash = hash("NarHash", need("NarHash")?)?;
    let nar_size = size("NarSize", need("NarSize")?)?;
    let file_hash = get("FileHash").map(|v| hash("FileHash", v)).transpose()?;
    let file_size = get("FileSize").map(|v| size("FileSize", v)).transpose()?;

    let mut references = Vec::new();
    for r in get("References").unwrap_or("").split_ascii_whitespace() {
        references.push(
            to_basename(r, store_dir)
                .map_err(|e| format!("References: {e}"))?
                .to_string(),
        );
    }
    references.sort();
    references.dedup();
    let deriver = match get("Deriver") {
        None | Some("unknown-deriver") => String::new(),
        Some(d) => to_basename(d, store_dir)
            .map_err(|e| format!("Deriver: {e}"))?
            .to_string(),
    };
    let signatures = fields
        .iter()
        .filter(|(k, _)| *k == "Sig")
        .map(|(_, v)| v.to_string())
        .collect();
    Ok(UploadedNarInfo {
        basename: basename.to_string(),
        url: url.to_string(),
        compression: get("Compression").unwrap_or("bzip2").to_string(),
        file_hash,
        file_size,
        nar_hash,
        nar_size,
        references,
        deriver,
        signatures,
        ca: get("CA").unwrap_or("").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "5z27gnnd868waxh653ksyix7hy2g7g8k";
    const N: &str = "1i0gi27ia8bgwpm265dfd04y2ibbizc07asd6mwnkalkbffl7mwc";

    fn sample() -> String {
        // As Nix 2.8 wrote it for `nix copy --to http://...`.
        format!(
            "StorePath: /nix/store/{H}-src\nURL: nar/0abr8vcmvgixy8l6j1viv3n1n5dvpwrr9p98hfxlv4c5sdg5diwx.nar.xz\n\
             Compression: xz\nFileHash: sha256:0abr8vcmvgixy8l6j1viv3n1n5dvpwrr9p98hfxlv4c5sdg5diwx\n\
             FileSize: 236\nNarHash: sha256:{N}\nNarSize: 872\n\
             References: /nix/store/{H}-src {H}-zz\nDeriver: {H}-src.drv\nSig: a:b\nSig: c:d\nCA: fixed:r:sha256:{N}\n"
        )
    }

    #[test]
    fn parses_what_nix_writes() {
        let n = parse(&sample(), "/nix/store").unwrap();
        assert_eq!(n.basename, format!("{H}-src"));
        assert_eq!(n.compression, "xz");
        assert_eq!(n.nar_size, 872);
        assert_eq!(n.nar_hash.to_nix32(), N);
        assert_eq!(n.file_size, Some(236));
        assert_eq!(n.references, vec![format!("{H}-src"), format!("{H}-zz")]);
        assert_eq!(n.deriver, format!("{H}-src.drv"));
        assert_eq!(n.signatures, vec!["a:b".to_string(), "c:d".to_string()]);
    }

    #[test]
    fn rejects_bad_fields() {
        let s = sample();
        let cases = [
            s.replace("/nix/store/5z", "/other/5z"),
            s.replace("NarSize: 872", "NarSize: -1"),
            s.replace("NarHash: sha256:", "NarHash: md5:"),
            s.replace("NarHash: sha256:1i0", "NarHash: sha256:xx"),
            s.replace("URL: nar/", "URL: ../"),
            s.replace("References: /nix/store/", "References: /nix/store/bad "),
            format!("{s}NarSize: 1\n"),
            s.replace("NarSize: 872\n", ""),
            s.replace("StorePath: ", "StorePath:"),
        ];
        for c in &cases {
            assert!(parse(c, "/nix/store").is_err(), "accepted:\n{c}");
        }
    }
}
