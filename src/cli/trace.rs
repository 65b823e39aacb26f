//! `granary trace`: save recorded traces into a root (merging runs), list and remove them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::model::trace::{EntryKind, Trace, DEFAULT_NAME};
use crate::store::Store;
use crate::trees::trace;

#[derive(clap::Subcommand, Debug)]
#[command(
    after_help = "A trace is the order in which a job first read a tree: record one with \
    `granary mount --root ROOT --record-trace FILE` (run the job, then unmount), save it with \
    `granary trace save ROOT FILE`, and every later mount or sandbox of ROOT, on any machine, \
    fetches what the trace names ahead of the job (in large batches, never in the job's way; \
    see `getfattr -n user.granary.trace MOUNT`). Saving again merges the runs."
)]
pub enum TraceCommand {
    /// Save recorded traces (files written by --record-trace) as a trace of ROOT, merged
    /// into the trace of that name if ROOT has one.
    Save {
        /// A named root.
        root: String,
        /// Recorded traces; several are merged in order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The trace's name (a root may keep several; a mount replays the newest unless
        /// told which with --trace NAME).
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// Replace the trace of that name instead of merging into it.
        #[arg(long)]
        replace: bool,
    },
    /// List ROOT's traces: name, entries, runs merged, chunk bytes, when saved, digest.
    List {
        root: String,
        /// Also print every entry of each trace, in order: kind, digest, size.
        #[arg(long)]
        entries: bool,
    },
    /// Remove trace NAME from ROOT (its object goes at the next gc).
    Rm { root: String, name: String },
}

/// Where `--record-trace FILE` writes: FILE made absolute (the writer may run elsewhere), its
/// directory checked now rather than when the recording is written and would be lost.
pub(super) fn record_path(f: &Path) -> Result<PathBuf> {
    let name = f
        .file_name()
        .with_context(|| format!("--record-trace {}: not a file name", f.display()))?;
    let dir = match f.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("--record-trace {}", f.display()))?;
    if !dir.is_dir() {
        anyhow::bail!(
            "--record-trace {}: {} is not a directory",
            f.display(),
            dir.display()
        );
    }
    Ok(dir.join(name))
}

fn kind(k: EntryKind) -> &'static str {
    match k {
        EntryKind::Chunk => "chunk",
        EntryKind::Blob => "blob",
        EntryKind::Dir => "dir",
    }
}

pub async fn run(store: &Store, cmd: TraceCommand) -> Result<ExitCode> {
    match cmd {
        TraceCommand::Save {
            root,
            files,
            name,
            replace,
        } => {
            let mut merged: Option<Trace> = None;
            for f in &files {
                let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
                let t = Trace::decode(&bytes)
                    .with_context(|| format!("{}: not a recorded trace", f.display()))?;
                merged = Some(match merged {
                    Some(m) => m.merge(&t),
                    None => t,
                });
            }
            let Some(recorded) = merged else {
                return Ok(ExitCode::SUCCESS);
            };
            let saved = trace::save(store, &root, &name, &recorded, replace).await?;
            println!(
                "{root}: trace {name} {}: {} entries, {} runs, {} chunk bytes",
                saved.trace.digest, saved.entries, saved.runs, saved.chunk_bytes
            );
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::List { root, entries } => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let mut bad = 0;
            for (t, loaded) in trace::list(store, &root).await? {
                match loaded {
                    Ok(tr) => {
                        writeln!(
                            out,
                            "{}\t{} entries\t{} runs\t{} chunk bytes\tsaved {}\t{}",
                            t.name,
                            tr.entries.len(),
                            tr.runs,
                            tr.chunk_bytes(),
                            t.saved,
                            t.digest
                        )?;
                        if entries {
                            for e in &tr.entries {
                                writeln!(out, "  {} {} {}", kind(e.kind), e.digest, e.size)?;
                            }
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        eprintln!("granary: error: {root}: {e}");
                    }
                }
            }
            Ok(if bad > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        TraceCommand::Rm { root, name } => {
            if !trace::remove(store, &root, &name).await? {
                anyhow::bail!("{root}: no trace named {name:?}");
            }
            println!("{root}: removed trace {name}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
