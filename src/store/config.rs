//! `config.toml`: the parameters a store is created with. A store never mixes chunking
//! parameters, and a granary that meets a newer format refuses it rather than misreading it.

use serde::{Deserialize, Serialize};

use crate::model::chunking::ChunkParams;

/// The store format this build writes and understands: 1 = one file per object, 2 = objects
/// may also be in pack files (`packs/`), which a format-1 granary would not see, 3 = small
/// objects may be compressed together in groups (pack index "GRNIDX02"), which a format-2
/// granary could not read.
pub const FORMAT_VERSION: u32 = 3;

/// Plain bytes of a compression group in a new store (format 3), chosen by measurement. On
/// pystore (1.81 GB of unique chunks; squashfs stores it in 568 MB): every chunk compressed
/// alone 648 MB; objects up to 128 KiB in groups of 512 KiB 519 MB, of 1 MiB 505 MB, with the
/// same cold walk and read-all times as chunks alone. On toolchains (squashfs 558 MB), at
/// level 3: 1 MiB 517 MB, 2 MiB 509 MB, 4 MiB 505 MB; 2 MiB at level 4 (the default level)
/// 500 MB, the lightest setting under 0.9× squashfs (a big file's first read ≈ 8% slower
/// than with 1 MiB groups: more of its small chunks wait for one group's decompression).
pub const DEFAULT_GROUP_BYTES: u32 = 2 << 20;

/// zstd level of a new store's imports: level 4 stores toolchains in 510 MB where level 3
/// takes 517 MB, and imports as fast (zstd's levels 3 and 4 share a match finder); level 5
/// (497 MB) imported 1.4× slower. `granary repack --level N` compresses harder later.
pub const DEFAULT_ZSTD_LEVEL: i32 = 4;

/// The largest group size a store may ask for (a reader decompresses at most twice this).
pub const MAX_GROUP_BYTES: u32 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format_version: u32,
    pub chunking: ChunkParams,
    /// zstd level for stored chunks.
    pub zstd_level: i32,
    /// Whether a local store writes new objects into pack files (format 2) rather than one
    /// file per object (format 1; absent in format-1 configs).
    #[serde(default)]
    pub packs: bool,
    /// Plain bytes of a compression group of small objects (format 3; 0 = every object
    /// compressed alone, as in formats 1 and 2, whose configs lack the key).
    #[serde(default)]
    pub group_bytes: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            format_version: FORMAT_VERSION,
            chunking: ChunkParams::default(),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            packs: true,
            group_bytes: DEFAULT_GROUP_BYTES,
        }
    }
}

impl StoreConfig {
    /// One file per object (format 1), as stores made before packs existed.
    pub fn loose() -> Self {
        Self {
            format_version: 1,
            packs: false,
            group_bytes: 0,
            ..Self::default()
        }
    }

    /// The same parameters without compression groups, at the lowest format that describes
    /// them (2 with packs, else 1): what an `s3://` store converted from format 1 by gc
    /// records, so granaries from before groups keep using it.
    pub fn without_groups(self) -> Self {
        Self {
            format_version: if self.packs { 2 } else { 1 },
            group_bytes: 0,
            ..self
        }
    }

    pub fn to_toml(&self) -> String {
        // Serializing plain integers cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version = toml::from_str(text).map_err(|e| format!("unreadable: {e}"))?;
        if v.format_version > FORMAT_VERSION {
            return Err(format!(
                "format version {} is newer than this granary understands ({FORMAT_VERSION}); upgrade granary",
                v.format_version
            ));
        }
        let c: StoreConfig = toml::from_str(text).map_err(|e| format!("unreadable: {e}"))?;
        c.chunking.validate().map_err(|e| e.to_string())?;
        if c.packs && c.format_version < 2 {
            return Err("packs need format version 2".into());
        }
        if c.group_bytes > 0 && (!c.packs || c.format_version < 3) {
            return Err("compression groups need packs and format version 3".into());
        }
        if c.group_bytes > MAX_GROUP_BYTES {
            return Err(format!(
                "group_bytes {} is larger than {MAX_GROUP_BYTES}",
                c.group_bytes
            ));
        }
        if !(1..=22).contains(&c.zstd_level) {
            return Err(format!("zstd_level {} is not in 1..=22", c.zstd_level));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_newer_format_refused() {
        let c = StoreConfig::default();
        assert_eq!(StoreConfig::from_toml(&c.to_toml()).unwrap(), c);
        let newer = c
            .to_toml()
            .replace("format_version = 3", "format_version = 4");
        let e = StoreConfig::from_toml(&newer).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        let bad = c.to_toml().replace("min = 16384", "min = 1");
        assert!(StoreConfig::from_toml(&bad).is_err());
        // A format-1 config (no `packs` key) reads as a loose store.
        let old = StoreConfig::loose()
            .to_toml()
            .replace("packs = false\n", "");
        assert!(!old.contains("packs"));
        assert_eq!(StoreConfig::from_toml(&old).unwrap(), StoreConfig::loose());
        let e = StoreConfig::from_toml(&old.replace("zstd_level", "packs = true\nzstd_level"));
        assert!(e.unwrap_err().contains("format version 2"));
        // A format-2 config (packs, no groups) reads as such.
        let two = StoreConfig {
            format_version: 2,
            group_bytes: 0,
            ..StoreConfig::default()
        };
        let text = two.to_toml().replace("group_bytes = 0\n", "");
        assert!(!text.contains("group_bytes"));
        assert_eq!(StoreConfig::from_toml(&text).unwrap(), two);
        let e = StoreConfig::from_toml(
            &text.replace("packs = true", "packs = true\ngroup_bytes = 65536"),
        );
        assert!(e.unwrap_err().contains("format version 3"));
        assert_eq!(StoreConfig::default().without_groups(), two);
        assert_eq!(StoreConfig::loose().without_groups(), StoreConfig::loose());
    }
}
