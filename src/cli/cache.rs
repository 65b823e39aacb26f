//! `granary cache stats|clear --cache-dir DIR`: what a disk cache holds and how well it
//! serves, or empty it. The cache itself lives in `store::cache`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};

use crate::store::cache::{self, DiskCache};

#[derive(clap::Subcommand, Debug)]
pub enum CacheCommand {
    /// Entries, bytes, hit rate and evictions (counters summed over every process).
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete every cached object, remembered root and counter.
    Clear,
}

fn check_dir(dir: Option<&Path>) -> Result<PathBuf> {
    let Some(dir) = dir else {
        bail!("granary cache needs --cache-dir DIR");
    };
    if !dir.join("chunks").is_dir() {
        bail!("{}: not a granary cache directory", dir.display());
    }
    Ok(dir.to_path_buf())
}

fn rate(hits: u64, misses: u64) -> f64 {
    if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    }
}

pub async fn run(cmd: &CacheCommand, dir: Option<&Path>, max: u64) -> Result<ExitCode> {
    let dir = check_dir(dir)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        CacheCommand::Stats { json } => {
            let r = cache::report(&dir);
            let s = &r.stats;
            if *json {
                writeln!(out, "{}", serde_json::to_string(&r)?)?;
            } else {
                writeln!(out, "cache dir          {}", dir.display())?;
                writeln!(out, "entries            {}", r.entries)?;
                writeln!(out, "  chunks           {}", r.chunks)?;
                writeln!(out, "  directories      {}", r.directories)?;
                writeln!(out, "  blob layouts     {}", r.blob_layouts)?;
                writeln!(out, "bytes              {}", r.bytes)?;
                writeln!(
                    out,
                    "chunk hits         {} of {} ({:.1}%)",
                    s.chunk_hits,
                    s.chunk_hits + s.chunk_misses,
                    100.0 * rate(s.chunk_hits, s.chunk_misses)
                )?;
                writeln!(
                    out,
                    "metadata hits      {} of {} ({:.1}%)",
                    s.meta_hits,
                    s.meta_hits + s.meta_misses,
                    100.0 * rate(s.meta_hits, s.meta_misses)
                )?;
                writeln!(out, "bytes fetched      {}", s.fetched_bytes)?;
                writeln!(out, "evicted            {}", s.evicted)?;
                writeln!(out, "corrupt, refetched {}", s.corrupt)?;
            }
        }
        CacheCommand::Clear => {
            let d = dir.clone();
            let n =
                tokio::task::spawn_blocking(move || DiskCache::open(&d, max)?.clear()).await??;
            writeln!(out, "removed {n} entries from {}", dir.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
