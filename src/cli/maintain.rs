//! `granary rm`, `gc` and `verify`: keeping a store healthy.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::store::Store;

pub async fn rm(store: &Store, roots: &[String]) -> Result<ExitCode> {
    let mut missing = Vec::new();
    for r in roots {
        if !store
            .roots
            .delete(r)
            .await
            .with_context(|| format!("removing root {r:?}"))?
        {
            missing.push(r.as_str());
        }
    }
    if !missing.is_empty() {
        bail!("no such root: {}", missing.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn gc(store: &Store, grace: Duration, dry_run: bool) -> Result<ExitCode> {
    let steps = std::sync::Arc::new(crate::trees::Steps::default());
    let bar = super::spawn_steps(steps.clone(), "gc");
    let r = crate::trees::gc::gc_with(store, grace, dry_run, &steps).await;
    drop(steps);
    if let Some(b) = bar {
        let _ = b.await;
    }
    let r = r?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{verb} {} objects ({} bytes); kept {} reachable, {} unreachable but younger than the grace period; {} temp files removed",
        r.deleted, r.deleted_bytes, r.kept, r.young, r.temp_files
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub async fn repack(store: &Store, level: Option<i32>) -> Result<ExitCode> {
    let Some(m) = &store.maintenance else {
        anyhow::bail!(
            "{}: this store cannot be repacked (only a local store with packs can)",
            store.url
        );
    };
    let r = m.repack(level).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "repacked {} packs into {}: {} -> {} bytes",
        r.packs_before, r.packs_after, r.bytes_before, r.bytes_after
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Repair passes at most: each pass can reveal one more level of a tree whose directories
/// were missing.
const MAX_REPAIR_PASSES: usize = 64;

pub async fn verify(
    store: &Store,
    roots: &[String],
    repair_from: Option<&str>,
) -> Result<ExitCode> {
    let steps = std::sync::Arc::new(crate::trees::Steps::default());
    let bar = super::spawn_steps(steps.clone(), "verify");
    let problems = crate::trees::verify::verify_with(store, roots, &steps).await;
    drop(steps);
    if let Some(b) = bar {
        let _ = b.await;
    }
    let mut problems = problems?;
    let mut out = std::io::stdout().lock();
    for p in &problems {
        writeln!(out, "{p}")?;
    }
    if problems.is_empty() {
        writeln!(out, "ok: no problems found")?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(url) = repair_from else {
        writeln!(out, "{} problems", problems.len())?;
        out.flush()?;
        return Ok(ExitCode::FAILURE);
    };
    let donor = crate::store::open(url)
        .await
        .with_context(|| format!("opening repair source {url}"))?;
    let found = problems.len();
    let mut fixed = 0;
    let mut reasons = Vec::new();
    for _ in 0..MAX_REPAIR_PASSES {
        let pass = crate::trees::verify::repair(store, &donor, &problems).await?;
        fixed += pass.fixed;
        reasons = pass.left;
        let again = crate::trees::verify::verify(store, roots).await?;
        let progress = pass.fixed > 0;
        problems = again;
        if problems.is_empty() || !progress {
            break;
        }
        // What the restored objects revealed below them is repaired in the next pass.
        for p in &problems {
            if !reasons.iter().any(|(q, _)| q.subject == p.subject) {
                writeln!(out, "{p}")?;
            }
        }
    }
    writeln!(
        out,
        "repaired {fixed} problems from {url} ({found} found at first); {} remain",
        problems.len()
    )?;
    for p in &problems {
        let why = reasons
            .iter()
            .find(|(q, _)| q.subject == p.subject)
            .map_or("not repaired", |(_, w)| w.as_str());
        writeln!(out, "  {p}: not repaired: {why}")?;
    }
    out.flush()?;
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
