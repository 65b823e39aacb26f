//! The substitution options shared by `granary mount` and `granary serve-cache`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::store::Store;
use crate::views::binary_cache::substitute::{SubstituteOptions, Substituter};

#[derive(clap::Args, Debug, Clone)]
pub struct SubstituteArgs {
    /// Fetch a store path the store lacks from this Nix binary cache on first lookup
    /// (http://, https:// or file://, as Nix writes them); checked, stored deduplicated and
    /// recorded as a root. Repeatable; tried in order.
    #[arg(long = "substituter", value_name = "URL")]
    pub substituters: Vec<String>,
    /// A public key (NAME:BASE64, from nix-store --generate-binary-cache-key) whose
    /// signatures are trusted. Repeatable. A substituted path needs a signature by one of
    /// them unless --no-check-sigs.
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Accept substituted paths without a trusted signature (hashes are still checked).
    #[arg(long)]
    pub no_check_sigs: bool,
    /// Bound on connecting to a substituter and on each wait for more bytes from it; a
    /// cache that is down or stalls fails the lookup (ENOENT/EIO) instead of hanging it.
    #[arg(long, value_name = "DURATION", default_value = "20s",
          value_parser = crate::units::parse_positive_duration)]
    pub substitute_timeout: Duration,
    /// How long a path no substituter has is remembered as absent.
    #[arg(long, value_name = "DURATION", default_value = "5m",
          value_parser = crate::units::parse_positive_duration)]
    pub negative_ttl: Duration,
}

impl SubstituteArgs {
    /// The substituter these options describe over `store`, if any substituter is given.
    pub fn build(&self, store: &Store, store_dir: &str) -> Result<Option<Arc<Substituter>>> {
        if self.substituters.is_empty() {
            if !self.trusted_public_keys.is_empty() || self.no_check_sigs {
                anyhow::bail!("--trusted-public-key and --no-check-sigs need --substituter URL");
            }
            return Ok(None);
        }
        let sub = Substituter::new(
            store.clone(),
            SubstituteOptions {
                caches: self.substituters.clone(),
                trusted_keys: self.trusted_public_keys.clone(),
                check_sigs: !self.no_check_sigs,
                timeout: self.substitute_timeout,
                negative_ttl: self.negative_ttl,
                store_dir: store_dir.trim_end_matches('/').to_string(),
            },
        )?;
        Ok(Some(sub))
    }
}
