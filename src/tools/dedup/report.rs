//! The figures collected into a report, and `analyse_paths`, the whole run over paths.

#[allow(unused_imports)]
use super::*;

/// Collects the figures once every input has been analysed.
pub(super) fn build_report(
    shared: Shared,
    inputs: Vec<String>,
    per_input: Vec<(u64, Vec<Totals>)>,
    counts: (u64, u64, u64, u64),
) -> Report {
    let (files, directories, symlinks, skipped_special) = counts;
    let logical = shared.logical.load(Ordering::Relaxed);
    let final_totals = shared.totals();
    let (dir_count, dir_bytes) = shared.dir_totals();
    let mut strategies = Vec::new();
    for (i, s) in shared.strategies.iter().enumerate() {
        let acc = &shared.accs[i];
        let mut sizes: Vec<u64> = lock(&acc.seen).chunks.values().copied().collect();
        sizes.sort_unstable();
        let t = final_totals[i];
        let pick = |q: f64| -> u64 {
            if sizes.is_empty() {
                return 0;
            }
            // Nearest-rank percentile.
            let rank = ((q * sizes.len() as f64).ceil() as usize).clamp(1, sizes.len());
            sizes[rank - 1]
        };
        let mut marginal = Vec::new();
        let mut prev = Totals::default();
        for (name, (logical_i, tot)) in inputs.iter().zip(&per_input) {
            let now = tot[i];
            let m = Marginal {
                input: name.clone(),
                logical_bytes: *logical_i,
                unique_bytes: now.unique_bytes - prev.unique_bytes,
                unique_chunks: now.unique_chunks - prev.unique_chunks,
                metadata_bytes: now.metadata.saturating_sub(prev.metadata),
                zstd_bytes: now.zstd.saturating_sub(prev.zstd),
                stored_bytes: (now.zstd + now.metadata).saturating_sub(prev.zstd + prev.metadata),
            };
            marginal.push(m);
            prev = now;
        }
        let stored = t.zstd + t.metadata;
        strategies.push(StrategyReport {
            strategy: s.name(),
            chunker: s.describe(),
            logical_bytes: logical,
            unique_bytes: t.unique_bytes,
            dedup_ratio: ratio(logical, t.unique_bytes),
            unique_chunks: t.unique_chunks,
            mean_chunk: if sizes.is_empty() {
                0
            } else {
                t.unique_bytes / sizes.len() as u64
            },
            median_chunk: pick(0.5),
            p99_chunk: pick(0.99),
            blob_indexes: acc.blob_indexes.load(Ordering::Relaxed),
            blob_index_bytes: acc.blob_index_bytes.load(Ordering::Relaxed),
            directories: dir_count,
            directory_bytes: dir_bytes,
            metadata_bytes: t.metadata,
            zstd_bytes: t.zstd,
            stored_bytes: stored,
            stored_ratio: ratio(logical, stored),
            packed_bytes: t.packed,
            disk_bytes: t.pack_disk,
            marginal,
        });
    }
    Report {
        inputs,
        files,
        directories,
        symlinks,
        skipped_special,
        logical_bytes: logical,
        zstd_level: shared.level,
        group_bytes: shared.group_bytes,
        sample: SampleInfo {
            one_in: shared.sample,
            chunks: shared.sampled_chunks.load(Ordering::Relaxed),
            bytes: shared.sampled_bytes.load(Ordering::Relaxed),
        },
        strategies,
    }
}

/// Analyses the trees at `paths` (directories or files), in order; blocking.
pub fn analyse_paths(
    paths: &[PathBuf],
    opts: &DedupOptions,
    progress: &Progress,
) -> Result<Report, DedupError> {
    if opts.strategies.is_empty() {
        return Err(DedupError::Task("no strategy to measure".into()));
    }
    // Walk everything first: bad paths fail before any reading, and progress knows the total.
    let mut walks = Vec::new();
    for p in paths {
        let mut w = Walk::default();
        let top = w.walk(p, true)?;
        progress.bytes_total.fetch_add(w.bytes, Ordering::Relaxed);
        progress
            .files_total
            .fetch_add(w.files.len() as u64, Ordering::Relaxed);
        walks.push((w, top));
    }
    let shared = Shared::new(opts);
    shared.plan_groups(walks.iter().map(|(w, _)| w.bytes).sum());
    let jobs = default_jobs(opts);
    let mut per_input = Vec::new();
    let mut counts = (0, 0, 0, 0);
    for (w, top) in &walks {
        let results = run_parallel(&shared, jobs, w.files.len(), |worker, i| {
            scan_file(worker, &w.files[i].0, progress)
        })?;
        let files: Vec<(B3Digest, u64)> = results
            .into_iter()
            .map(|r| r.ok_or_else(|| DedupError::Task("a file was not analysed".into())))
            .collect::<Result<_, _>>()?;
        let logical: u64 = files.iter().map(|f| f.1).sum();
        shared.logical.fetch_add(logical, Ordering::Relaxed);
        if let Some(top) = top {
            account_tree(&shared, top, &files)?;
        }
        per_input.push((logical, shared.totals()));
        counts.0 += w.files.len() as u64;
        counts.1 += w.dirs;
        counts.2 += w.symlinks;
        counts.3 += w.skipped;
    }
    let inputs = paths.iter().map(|p| p.display().to_string()).collect();
    Ok(build_report(shared, inputs, per_input, counts))
}
