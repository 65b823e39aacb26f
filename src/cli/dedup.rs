//! `granary dedup`: argument handling and presentation (table, JSON, CSV, SVG plot) of the
//! report computed by [`crate::tools::dedup`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use indicatif::{BinaryBytes, DecimalBytes};

use crate::store::{self, StoreConfig};
use crate::tools::dedup::{self, DedupOptions, Report, Strategy, StrategyReport};
use crate::trees::import::Progress;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct DedupArgs {
    /// Directories or files to analyse, in this order (each one's marginal gain is measured
    /// given the ones before it). Without PATH, the roots of the store (--store) are analysed.
    paths: Vec<PathBuf>,
    /// A chunking strategy to measure; repeat for several, all in one pass over the data.
    /// whole-file | fixed:SIZE | fastcdc:MIN/AVG/MAX | fastcdc:AVG (min=avg/4, max=avg*4) |
    /// store (the store's parameters). Default: whole-file, fixed:64K, fastcdc:16K, fastcdc:64K,
    /// fastcdc:256K, fastcdc:1M, plus store if its parameters are not among them.
    #[arg(long = "strategy", value_name = "SPEC")]
    strategies: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Also write an SVG chart of unique and stored bytes per strategy.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Also write the JSON report to this file (whatever --format says).
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
    /// Estimate zstd size from one unique chunk in N (chosen by digest, so the same chunks
    /// every run; whole files by their first bytes); 1 compresses every unique chunk and
    /// gives exact figures (as --exact), at a fraction of the speed.
    #[arg(long, value_name = "N", default_value_t = dedup::DEFAULT_SAMPLE)]
    zstd_sample: u64,
    /// Compress every unique chunk: exact stored-size figures (--zstd-sample 1).
    #[arg(long, conflicts_with = "zstd_sample")]
    exact: bool,
    /// zstd level for the stored-size estimate (default: the store's level, else the default for new stores).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: Option<i32>,
    /// Files analysed at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
}

/// The local path of a `file://` (or bare path) store URL.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(p) = url.strip_prefix("file://") {
        Some(PathBuf::from(p))
    } else if url.contains("://") {
        None
    } else {
        Some(PathBuf::from(url))
    }
}

/// The configuration of the store at `url` if one exists there, without creating one.
async fn existing_config(url: &str) -> Result<Option<StoreConfig>> {
    match local_path(url) {
        Some(p) if p.join("config.toml").is_file() => {
            let s = store::open(url)
                .await
                .with_context(|| format!("opening store {url}"))?;
            Ok(Some(s.config))
        }
        _ => Ok(None),
    }
}

pub async fn cmd_dedup(store_url: Option<&str>, args: &DedupArgs) -> Result<ExitCode> {
    let url = store_url.map_or_else(store::default_url, str::to_string);
    let analyse_store = args.paths.is_empty();
    let config = if analyse_store {
        if local_path(&url).is_some_and(|p| !p.join("config.toml").is_file()) {
            bail!("store {url}: no granary store there (give PATHs to analyse trees instead)");
        }
        None
    } else {
        existing_config(&url).await?
    };
    let store = if analyse_store {
        Some(
            store::open(&url)
                .await
                .with_context(|| format!("opening store {url}"))?,
        )
    } else {
        None
    };
    let config = store
        .as_ref()
        .map(|s| s.config)
        .or(config)
        .unwrap_or_default();
    let strategies = if args.strategies.is_empty() {
        let mut v = dedup::default_strategies();
        if !v.contains(&Strategy::FastCdc(config.chunking)) {
            v.push(Strategy::Store(config.chunking));
        }
        v
    } else {
        let mut v = Vec::new();
        for spec in &args.strategies {
            let s = Strategy::parse(spec, config.chunking)?;
            if !v.contains(&s) {
                v.push(s);
            }
        }
        v
    };
    if args.zstd_sample == 0 {
        bail!("--zstd-sample 0: want 1 (every chunk) or more");
    }
    let opts = DedupOptions {
        strategies,
        zstd_level: args.zstd_level.unwrap_or(config.zstd_level),
        sample: if args.exact { 1 } else { args.zstd_sample },
        jobs: args.jobs,
        group_bytes: config.group_bytes,
    };
    let progress = Arc::new(Progress::default());
    let bar = super::spawn_progress(progress.clone(), "dedup");
    let report = match &store {
        Some(s) => dedup::analyse_store(s, &opts, progress.clone()).await,
        None => {
            let (paths, _unpacked) = unpack_nars(&args.paths).await?;
            let (opts, p) = (opts.clone(), progress.clone());
            tokio::task::spawn_blocking(move || dedup::analyse_paths(&paths, &opts, &p))
                .await
                .context("dedup task")?
        }
    };
    drop(progress);
    if let Some(b) = bar {
        let _ = b.await;
    }
    let report = report?;
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Table => write_table(&mut out, &report)?,
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        Format::Csv => write_csv(&mut out, &report)?,
    }
    if let Some(path) = &args.json {
        let f =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(std::io::BufWriter::new(f), &report)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot(path, &report).with_context(|| format!("writing plot {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_table(out: &mut impl Write, r: &Report) -> Result<()> {
    writeln!(
        out,
        "{} input(s): {} files, {} directories, {} symlinks; {} logical ({} bytes)",
        r.inputs.len(),
        r.files,
        r.directories,
        r.symlinks,
        DecimalBytes(r.logical_bytes),
        r.logical_bytes
    )?;
    if r.skipped_special > 0 {
        writeln!(out, "{} special files left out", r.skipped_special)?;
    }
    if r.sample.one_in <= 1 {
        writeln!(
            out,
            "zstd level {}: every unique chunk compressed (exact)",
            r.zstd_level
        )?;
    } else {
        writeln!(
            out,
            "zstd level {}: estimated from 1 in {} unique chunks by digest ({} chunks, {}); whole-file compresses every file",
            r.zstd_level,
            r.sample.one_in,
            r.sample.chunks,
            DecimalBytes(r.sample.bytes)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<22} {:>11} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>7} {:>11} {:>11}",
        "strategy",
        "unique",
        "dedup",
        "chunks",
        "mean",
        "median",
        "p99",
        "metadata",
        "zstd",
        "stored",
        "log/st",
        "packed",
        "on disk"
    )?;
    for s in &r.strategies {
        let name = if s.strategy == s.chunker {
            s.strategy.clone()
        } else {
            format!(
                "{} ({})",
                s.strategy,
                s.chunker.trim_start_matches("fastcdc:")
            )
        };
        writeln!(
            out,
            "{:<22} {:>11} {:>6.2}x {:>9} {:>10} {:>10} {:>10} {:>10} {:>11} {:>11} {:>6.2}x {:>11} {:>11}",
            name,
            DecimalBytes(s.unique_bytes).to_string(),
            s.dedup_ratio,
            s.unique_chunks,
            BinaryBytes(s.mean_chunk).to_string(),
            BinaryBytes(s.median_chunk).to_string(),
            BinaryBytes(s.p99_chunk).to_string(),
            DecimalBytes(s.metadata_bytes).to_string(),
            DecimalBytes(s.zstd_bytes).to_string(),
            DecimalBytes(s.stored_bytes).to_string(),
            s.stored_ratio,
            DecimalBytes(s.packed_bytes).to_string(),
            DecimalBytes(s.disk_bytes).to_string()
        )?;
    }
    writeln!(
        out,
        "(stored = each chunk compressed alone + blob indexes + directories, as a format-2 store; packed = {}, as a format-3 store; on disk = packed + the packs' index entries)",
        if r.group_bytes > 0 {
            format!(
                "chunks up to {} and directories compressed together in groups of {}",
                BinaryBytes(
                    (r.group_bytes as u64 / 2).min(crate::store::pack::GROUPED_MAX as u64)
                ),
                BinaryBytes(r.group_bytes as u64)
            )
        } else {
            "the same (this store has no compression groups)".to_string()
        }
    )?;
    if r.inputs.len() > 1 {
        writeln!(out)?;
        writeln!(
            out,
            "marginal stored bytes: what each input adds given the ones before it (% of its logical size)"
        )?;
        write!(out, "{:<40}", "input")?;
        for s in &r.strategies {
            write!(out, " {:>20}", s.strategy)?;
        }
        writeln!(out)?;
        for (k, input) in r.inputs.iter().enumerate() {
            let shown: String = if input.chars().count() > 40 {
                let tail: Vec<char> = input.chars().rev().take(39).collect();
                format!("…{}", tail.into_iter().rev().collect::<String>())
            } else {
                input.clone()
            };
            write!(out, "{shown:<40}")?;
            for s in &r.strategies {
                let m = &s.marginal[k];
                let pct = 100.0 * m.stored_bytes as f64 / m.logical_bytes.max(1) as f64;
                write!(
                    out,
                    " {:>20}",
                    format!("{} ({pct:.0}%)", DecimalBytes(m.stored_bytes))
                )?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row per strategy (scope `all`), then one per strategy and input with that input's
/// marginal figures (ratios and chunk sizes left empty there).
fn write_csv(out: &mut impl Write, r: &Report) -> Result<()> {
    writeln!(out, "strategy,chunker,scope,logical_bytes,unique_bytes,dedup_ratio,unique_chunks,mean_chunk,median_chunk,p99_chunk,metadata_bytes,zstd_bytes,stored_bytes,stored_ratio,packed_bytes,disk_bytes")?;
    for s in &r.strategies {
        writeln!(
            out,
            "{},{},all,{},{},{:.4},{},{},{},{},{},{},{},{:.4},{},{}",
            csv_field(&s.strategy),
            csv_field(&s.chunker),
            s.logical_bytes,
            s.unique_bytes,
            s.dedup_ratio,
            s.unique_chunks,
            s.mean_chunk,
            s.median_chunk,
            s.p99_chunk,
            s.metadata_bytes,
            s.zstd_bytes,
            s.stored_bytes,
            s.stored_ratio,
            s.packed_bytes,
            s.disk_bytes
        )?;
    }
    for s in &r.strategies {
        for m in &s.marginal {
            writeln!(
                out,
                "{},{},{},{},{},,{},,,,{},{},{},,,",
                csv_field(&s.strategy),
                csv_field(&s.chunker),
                csv_field(&m.input),
                m.logical_bytes,
                m.unique_bytes,
                m.unique_chunks,
                m.metadata_bytes,
                m.zstd_bytes,
                m.stored_bytes
            )?;
        }
    }
    Ok(())
}

/// A grouped bar chart: unique, stored (zstd + metadata) and on-disk (packed) bytes per strategy,
/// with the logical size as a line.
fn plot(path: &Path, r: &Report) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let n = r.strategies.len();
    let mb = |b: u64| b as f64 / 1e6;
    let ymax = r
        .strategies
        .iter()
        .map(|s| mb(s.unique_bytes.max(s.stored_bytes).max(s.disk_bytes)))
        .fold(mb(r.logical_bytes), f64::max)
        * 1.3
        + 1e-6;
    let labels: Vec<String> = r.strategies.iter().map(|s| s.strategy.clone()).collect();
    let root = SVGBackend::new(path, (140 * n as u32 + 220, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "granary dedup: {} logical, {} input(s)",
                DecimalBytes(r.logical_bytes),
                r.inputs.len()
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("MB")
        .x_labels(0)
        .draw()?;
    // Strategy names under their bars, placed in pixels (plotters' own key points for an
    // f64 axis do not land on bar centres).
    for (i, label) in labels.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            label.clone(),
            (px, py + 8),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    let unique_color = RGBColor(70, 110, 190);
    let stored_color = RGBColor(230, 140, 40);
    chart
        .draw_series(r.strategies.iter().enumerate().map(|(i, s)| {
            let x = i as f64;
            Rectangle::new(
                [(x + 0.08, 0.0), (x + 0.35, mb(s.unique_bytes))],
                unique_color.filled(),
            )
        }))?
        .label("unique bytes")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], unique_color.filled()));
    chart
        .draw_series(r.strategies.iter().enumerate().map(|(i, s)| {
            let x = i as f64;
            Rectangle::new(
                [(x + 0.37, 0.0), (x + 0.64, mb(s.stored_bytes))],
                stored_color.filled(),
            )
        }))?
        .label(format!("stored (zstd {} + metadata)", r.zstd_level))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], stored_color.filled()));
    let disk_color = RGBColor(150, 150, 150);
    chart
        .draw_series(r.strategies.iter().enumerate().map(|(i, s)| {
            let x = i as f64;
            Rectangle::new(
                [(x + 0.66, 0.0), (x + 0.93, mb(s.disk_bytes))],
                disk_color.filled(),
            )
        }))?
        .label("on disk (packs with groups, and their indexes)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], disk_color.filled()));
    chart
        .draw_series(LineSeries::new(
            [(0.0, mb(r.logical_bytes)), (n as f64, mb(r.logical_bytes))],
            BLACK.stroke_width(2),
        ))?
        .label("logical bytes")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `granary info --dedup`: the store's own figures, as `granary dedup` computes them for
/// the `store` strategy, from its metadata.
pub async fn info_figures(store: &store::Store) -> Result<StrategyReport> {
    Ok(dedup::store_figures(store).await?)
}

/// NAR inputs are unpacked into a temporary directory (through a temporary local store, so
/// memory stays bounded by the chunker) and analysed like the tree they hold. Returns the
/// paths to analyse and the temporary directory that must outlive the analysis.
async fn unpack_nars(
    paths: &[std::path::PathBuf],
) -> Result<(Vec<std::path::PathBuf>, Option<tempfile::TempDir>)> {
    let mut out = Vec::with_capacity(paths.len());
    let mut tmp: Option<(tempfile::TempDir, crate::store::Store)> = None;
    for (i, p) in paths.iter().enumerate() {
        if !(p.is_file() && dedup::is_nar(p)?) {
            out.push(p.clone());
            continue;
        }
        if tmp.is_none() {
            let dir = tempfile::Builder::new()
                .prefix("granary-dedup-")
                .tempdir()
                .context("temporary directory for NAR input")?;
            let url = format!("file://{}", dir.path().join("store").display());
            let store = crate::store::open(&url).await?;
            tmp = Some((dir, store));
        }
        let Some((dir, store)) = &tmp else {
            unreachable!("created above")
        };
        let file = tokio::fs::File::open(p)
            .await
            .with_context(|| format!("{}: cannot open", p.display()))?;
        let imported = crate::views::nar::reader::import_nar(store, file)
            .await
            .with_context(|| p.display().to_string())?;
        // Named after the NAR (its input name in the report), numbered to stay unique.
        let stem = p
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".nar").to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "nar".into());
        let dest = dir.path().join(format!("{i}")).join(stem);
        std::fs::create_dir_all(dest.parent().unwrap_or(dir.path()))
            .with_context(|| format!("unpacking {}", p.display()))?;
        crate::trees::export(store, &imported.node, None, &dest)
            .await
            .with_context(|| format!("unpacking {}", p.display()))?;
        out.push(dest);
    }
    Ok((out, tmp.map(|(d, _)| d)))
}
