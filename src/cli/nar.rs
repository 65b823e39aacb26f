//! The Nix subcommands: `import-nar`, `export-nar`, `import-store`, `narinfo`. Thin: parse,
//! call into [`crate::views::nar`], print.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;

use crate::model::castore::{NixInfo, RootRecord};
use crate::store::Store;
use crate::trees;
use crate::views::nar::store_dir::{import_store_dir, StoreDirProgress};
use crate::views::nar::store_path::{parse_basename, to_basename, DEFAULT_STORE_DIR};
use crate::views::nar::{import_nar, narinfo, write_nar, NarHash, NarImport};

/// Nix metadata given on the command line for `import-nar`.
pub struct NixArgs {
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub signatures: Vec<String>,
    pub ca: Option<String>,
    pub nar_hash: Option<String>,
}

fn summary_line(name: &str, imp: &NarImport) -> String {
    format!(
        "{name}\t{}\t{}\t{}",
        imp.nar_size,
        imp.nar_sha256.to_typed_nix32(),
        imp.nar_sha256.to_sri()
    )
}

pub async fn cmd_import_nar(
    store: &Store,
    file: &str,
    name: &str,
    args: NixArgs,
) -> Result<ExitCode> {
    parse_basename(name).context("--name")?;
    let mut references = Vec::new();
    for r in &args.references {
        references.push(
            to_basename(r, DEFAULT_STORE_DIR)
                .context("--references")?
                .to_string(),
        );
    }
    references.sort();
    references.dedup();
    let deriver = match &args.deriver {
        Some(d) => to_basename(d, DEFAULT_STORE_DIR)
            .context("--deriver")?
            .to_string(),
        None => String::new(),
    };
    let want = match &args.nar_hash {
        Some(h) => Some(
            NarHash::parse(h).with_context(|| format!("--nar-hash {h:?}: not a sha256 hash"))?,
        ),
        None => None,
    };
    let imp = if file == "-" {
        import_nar(store, tokio::io::stdin()).await
    } else {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {file}"))?;
        import_nar(store, f).await
    }
    .with_context(|| format!("importing {}", if file == "-" { "stdin" } else { file }))?;
    if let Some(want) = want {
        if want != imp.nar_sha256 {
            bail!(
                "NAR hash mismatch: got {}, --nar-hash says {}; no root recorded",
                imp.nar_sha256,
                want
            );
        }
    }
    let root = RootRecord {
        name: name.to_string(),
        node: imp.node.clone(),
        nix: Some(NixInfo {
            nar_size: imp.nar_size,
            nar_sha256: Bytes::copy_from_slice(&imp.nar_sha256.0),
            references,
            deriver,
            signatures: args.signatures,
            ca: args.ca.unwrap_or_default(),
        }),
        times: None,
        times_head: Vec::new(),
        traces: Vec::new(),
    };
    store
        .roots
        .put(&root)
        .await
        .with_context(|| format!("recording root {name:?}"))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", summary_line(name, &imp))?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub async fn cmd_export_nar(store: &Store, root: &str, output: Option<&Path>) -> Result<ExitCode> {
    let node = trees::resolve_root(store, root).await?;
    let recorded = store
        .roots
        .get(root)
        .await
        .ok()
        .flatten()
        .and_then(|r| r.nix);
    let check = |got: &crate::views::nar::NarSummary| -> Result<()> {
        if let Some(nix) = &recorded {
            if nix.nar_sha256[..] != got.nar_sha256.0 || nix.nar_size != got.nar_size {
                bail!(
                    "{root}: NAR rendered as {} ({} bytes), but the root records {} ({} bytes)",
                    got.nar_sha256,
                    got.nar_size,
                    NarHash::try_from(&nix.nar_sha256[..])
                        .map_or_else(|_| "an invalid hash".to_string(), |h| h.to_string()),
                    nix.nar_size
                );
            }
        }
        Ok(())
    };
    match output {
        None => {
            let mut out = tokio::io::stdout();
            let got = write_nar(store, &node, &mut out)
                .await
                .with_context(|| format!("exporting {root}"))?;
            check(&got)?;
        }
        Some(path) => {
            // Written beside the destination and renamed once complete and checked.
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a temp file in {}", dir.display()))?;
            let f = tokio::fs::File::from_std(
                tmp.reopen()
                    .with_context(|| format!("opening {}", tmp.path().display()))?,
            );
            let mut w = tokio::io::BufWriter::with_capacity(1 << 20, f);
            let got = write_nar(store, &node, &mut w)
                .await
                .with_context(|| format!("exporting {root}"))?;
            check(&got)?;
            tmp.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Which Nix database `import-store` takes metadata from.
pub enum DbChoice {
    /// Given with --db: must be readable.
    Given(std::path::PathBuf),
    /// Found beside the store directory.
    Found(std::path::PathBuf),
    None,
}

impl DbChoice {
    pub fn pick(dir: &Path, given: Option<std::path::PathBuf>, no_db: bool) -> Self {
        match (given, no_db) {
            (Some(p), _) => DbChoice::Given(p),
            (None, true) => DbChoice::None,
            (None, false) => {
                crate::views::nar::nix_db::find_db(dir).map_or(DbChoice::None, DbChoice::Found)
            }
        }
    }
}

pub async fn cmd_import_store(
    store: &Store,
    dir: &Path,
    jobs: Option<usize>,
    db: DbChoice,
    store_dir: &str,
) -> Result<ExitCode> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let db = match db {
        DbChoice::Given(p) | DbChoice::Found(p) => {
            let sd = store_dir.trim_end_matches('/').to_string();
            let path = p.clone();
            let read =
                tokio::task::spawn_blocking(move || crate::views::nar::nix_db::read_db(&path, &sd))
                    .await
                    .context("reading Nix's database")??;
            eprintln!(
                "granary: taking metadata of {} paths from {}",
                read.len(),
                p.display()
            );
            Some(Arc::new(read))
        }
        DbChoice::None => None,
    };
    let progress = Arc::new(StoreDirProgress::default());
    let bar = spawn_progress(progress.clone());
    let report = import_store_dir(store, dir, jobs.unwrap_or(cores), db, progress.clone()).await;
    drop(progress);
    if let Some(b) = bar {
        let _ = b.await;
    }
    let report = report?;
    for (name, why) in &report.skipped {
        eprintln!("granary: skipping {name}: not a store path ({why})");
    }
    let mut out = std::io::stdout().lock();
    for (name, imp, _) in &report.imported {
        writeln!(out, "{}", summary_line(name, imp))?;
    }
    for (name, e) in &report.failed {
        eprintln!("granary: error: {name}: {e}");
    }
    eprintln!(
        "granary: imported {} store paths from {}, skipped {}, failed {}",
        report.imported.len(),
        dir.display(),
        report.skipped.len(),
        report.failed.len()
    );
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn cmd_nix_db(store: &Store, roots: &[String], store_dir: &str) -> Result<ExitCode> {
    use crate::views::nar::registration;
    let paths = registration::closure(store, roots).await?;
    let text = registration::render(&paths, store_dir.trim_end_matches('/'))?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    eprintln!("granary: {} Nix paths", paths.len());
    Ok(ExitCode::SUCCESS)
}

pub async fn cmd_narinfo(store: &Store, root: &str, store_dir: &str) -> Result<ExitCode> {
    let r = trees::get_root(store, root).await?;
    let Some(nix) = &r.nix else {
        bail!("{root}: root has no Nix metadata (import it with import-nar or import-store)");
    };
    let text = narinfo::render(&r.name, nix, store_dir.trim_end_matches('/'))
        .map_err(anyhow::Error::msg)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The store import's bar: store paths and NAR bytes.
fn spawn_progress(progress: Arc<StoreDirProgress>) -> Option<tokio::task::JoinHandle<()>> {
    super::spawn_bar(
        progress,
        "import-store",
        "{spinner} [{elapsed_precise}] {pos}/{len} store paths {msg}",
        |bar, p| {
            bar.set_length(p.entries_total.load(Ordering::Relaxed));
            bar.set_position(p.entries_done.load(Ordering::Relaxed));
            bar.set_message(format!(
                "({} of NAR)",
                indicatif::HumanBytes(p.nar_bytes.load(Ordering::Relaxed))
            ));
        },
    )
}
