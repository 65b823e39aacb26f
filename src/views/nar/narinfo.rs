//! `.narinfo` rendering for a root carrying Nix metadata, in the field order Nix writes it.
//! granary serves NARs uncompressed, so `FileHash`/`FileSize` equal `NarHash`/`NarSize`.

use std::fmt::Write;

use super::hash::NarHash;
use crate::model::castore::NixInfo;

/// Renders the `.narinfo` of store path `basename` under `store_dir`.
pub fn render(basename: &str, nix: &NixInfo, store_dir: &str) -> Result<String, String> {
    let hash = NarHash::try_from(&nix.nar_sha256[..])
        .map_err(|n| format!("{basename}: recorded NAR sha256 is {n} bytes, not 32"))?;
    let h = hash.to_nix32();
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "StorePath: {store_dir}/{basename}");
    let _ = writeln!(s, "URL: nar/{h}.nar");
    let _ = writeln!(s, "Compression: none");
    let _ = writeln!(s, "FileHash: sha256:{h}");
    let _ = writeln!(s, "FileSize: {}", nix.nar_size);
    let _ = writeln!(s, "NarHash: sha256:{h}");
    let _ = writeln!(s, "NarSize: {}", nix.nar_size);
    let _ = writeln!(s, "References: {}", nix.references.join(" "));
    if !nix.deriver.is_empty() {
        let _ = writeln!(s, "Deriver: {}", nix.deriver);
    }
    for sig in &nix.signatures {
        let _ = writeln!(s, "Sig: {sig}");
    }
    if !nix.ca.is_empty() {
        let _ = writeln!(s, "CA: {}", nix.ca);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_fields_in_nix_order() {
        let nix = NixInfo {
            nar_size: 120,
            nar_sha256: vec![0u8; 32].into(),
            references: vec!["aaaa-a".into(), "bbbb-b".into()],
            deriver: "cccc-c.drv".into(),
            signatures: vec!["k:sig".into()],
            ca: "fixed:r:sha256:xyz".into(),
        };
        let z = "0".repeat(52);
        let want = format!(
            "StorePath: /nix/store/h-x\nURL: nar/{z}.nar\nCompression: none\nFileHash: sha256:{z}\n\
             FileSize: 120\nNarHash: sha256:{z}\nNarSize: 120\nReferences: aaaa-a bbbb-b\n\
             Deriver: cccc-c.drv\nSig: k:sig\nCA: fixed:r:sha256:xyz\n"
        );
        assert_eq!(render("h-x", &nix, "/nix/store").unwrap(), want);
        let bare = NixInfo {
            nar_sha256: vec![0u8; 32].into(),
            ..Default::default()
        };
        let out = render("h-x", &bare, "/nix/store").unwrap();
        assert!(out.contains("References: \n") && !out.contains("Deriver"));
        assert!(render("h-x", &NixInfo::default(), "/nix/store").is_err());
    }
}
