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
    let r = crate::gc::gc(store, grace, dry_run).await?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!(
        "{verb} {} objects ({} bytes); kept {} reachable, {} unreachable but younger than the grace period; {} temp files removed",
        r.deleted, r.deleted_bytes, r.kept, r.young, r.temp_files
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(
    store: &Store,
    roots: &[String],
    repair_from: Option<&str>,
) -> Result<ExitCode> {
    let problems = crate::verify::verify(store, roots).await?;
    let mut out = std::io::stdout().lock();
    for p in &problems {
        let affected = if p.roots.is_empty() {
            "no root".to_string()
        } else {
            p.roots.iter().cloned().collect::<Vec<_>>().join(",")
        };
        writeln!(
            out,
            "{} {}: {} (roots: {affected})",
            p.kind.what(),
            p.digest,
            p.reason
        )?;
    }
    if problems.is_empty() {
        writeln!(out, "ok: no problems found")?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(url) = repair_from else {
        writeln!(out, "{} problems", problems.len())?;
        return Ok(ExitCode::FAILURE);
    };
    let donor = crate::store::open(url)
        .await
        .with_context(|| format!("opening repair source {url}"))?;
    let left = crate::verify::repair(store, &donor, &problems).await?;
    let again = crate::verify::verify(store, roots).await?;
    writeln!(
        out,
        "repaired {} of {} problems from {url}; {} remain",
        problems.len() - left.len(),
        problems.len(),
        again.len()
    )?;
    Ok(if again.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
