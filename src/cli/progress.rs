//! Progress on stderr for long commands: a bar on a terminal, a line every few seconds in a
//! log (`GRANARY_PROGRESS_SECS`).

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::trees::import::Progress;

/// Progress on stderr, fed from `progress` by `update` until the caller drops its reference:
/// a bar redrawn every 100 ms on a terminal; elsewhere (CI logs) one line every
/// `GRANARY_PROGRESS_SECS` seconds (default 10; 0: none), so a long run is never silent.
pub(crate) fn spawn_bar<T: Send + Sync + 'static>(
    progress: Arc<T>,
    what: &'static str,
    template: &str,
    update: fn(&indicatif::ProgressBar, &T),
) -> Option<tokio::task::JoinHandle<()>> {
    let bytes = template.contains("{bytes}");
    if !std::io::stderr().is_terminal() {
        let every = std::env::var("GRANARY_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(10.0);
        if !(every > 0.0 && every.is_finite()) {
            return None;
        }
        let every = Duration::from_secs_f64(every);
        let bar = indicatif::ProgressBar::hidden();
        return Some(tokio::spawn(async move {
            let mut next = tokio::time::Instant::now() + every;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let done = Arc::strong_count(&progress) == 1;
                if tokio::time::Instant::now() >= next || (done && bar.elapsed() >= every) {
                    update(&bar, &progress);
                    eprintln!("{}", progress_line(what, &bar, bytes, done));
                    next += every;
                }
                if done {
                    return;
                }
            }
        }));
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(tokio::spawn(async move {
        loop {
            update(&bar, &progress);
            tokio::time::sleep(Duration::from_millis(100)).await;
            if Arc::strong_count(&progress) == 1 {
                bar.finish_and_clear();
                return;
            }
        }
    }))
}

/// One line of progress for a log: `granary: import: 1.2 GiB of 5.0 GiB (24%), 1200/9000 files, 40 s`.
fn progress_line(what: &str, bar: &indicatif::ProgressBar, bytes: bool, done: bool) -> String {
    let (pos, len) = (bar.position(), bar.length().unwrap_or(0));
    let amount = match (bytes, len) {
        (true, 0) => format!("{}", indicatif::HumanBytes(pos)),
        (true, _) => format!(
            "{} of {} ({}%)",
            indicatif::HumanBytes(pos),
            indicatif::HumanBytes(len),
            pos * 100 / len.max(1)
        ),
        (false, 0) => pos.to_string(),
        (false, _) => format!("{pos}/{len} ({}%)", pos * 100 / len.max(1)),
    };
    let msg = bar.message();
    let msg = if msg.is_empty() {
        String::new()
    } else {
        format!(", {msg}")
    };
    let state = if done { " (done)" } else { "" };
    let secs = bar.elapsed().as_secs();
    if bytes {
        format!("granary: {what}: {amount}{msg}, {secs} s{state}")
    } else {
        // Counted steps read better after the phase: "verify: roots 10/40 (25%)".
        let phase = bar.message();
        format!("granary: {what}: {phase} {amount}, {secs} s{state}")
    }
}

/// The bar of an import (or a dedup scan, `what`): bytes and files.
pub(crate) fn spawn_progress(
    progress: Arc<Progress>,
    what: &'static str,
) -> Option<tokio::task::JoinHandle<()>> {
    spawn_bar(
        progress,
        what,
        "{spinner} [{elapsed_precise}] {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
        |bar, p| {
            bar.set_length(p.bytes_total.load(Ordering::Relaxed));
            bar.set_position(p.bytes_done.load(Ordering::Relaxed));
            bar.set_message(format!(
                "{}/{} files",
                p.files_done.load(Ordering::Relaxed),
                p.files_total.load(Ordering::Relaxed)
            ));
        },
    )
}

/// The bar of a whole-store operation (`gc`, `verify`): its phase and steps.
pub(crate) fn spawn_steps(
    steps: Arc<crate::trees::Steps>,
    what: &'static str,
) -> Option<tokio::task::JoinHandle<()>> {
    spawn_bar(
        steps,
        what,
        "{spinner} [{elapsed_precise}] {msg} {pos}/{len}",
        |bar, s| {
            bar.set_message(s.phase());
            bar.set_length(s.total.load(Ordering::Relaxed));
            bar.set_position(s.done.load(Ordering::Relaxed));
        },
    )
}
