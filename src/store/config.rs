//! `config.toml`: the parameters a store is created with. A store never mixes chunking
//! parameters, and a granary that meets a newer format refuses it rather than misreading it.

use serde::{Deserialize, Serialize};

use crate::chunking::ChunkParams;

/// The store format this build writes and understands.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format_version: u32,
    pub chunking: ChunkParams,
    /// zstd level for stored chunks.
    pub zstd_level: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            format_version: FORMAT_VERSION,
            chunking: ChunkParams::default(),
            zstd_level: 3,
        }
    }
}

impl StoreConfig {
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
            .replace("format_version = 1", "format_version = 2");
        let e = StoreConfig::from_toml(&newer).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        let bad = c.to_toml().replace("min = 16384", "min = 1");
        assert!(StoreConfig::from_toml(&bad).is_err());
    }
}
