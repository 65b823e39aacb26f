//! Whole trees over a store: importing them, reading them back (resolving, listing,
//! exporting), collecting garbage, verifying and repairing.

pub mod export;
pub mod gc;
pub mod import;
pub mod info;
pub mod read;
pub mod trace;
pub mod verify;

pub use export::{export, write_blob, EXPORT_CONCURRENCY};
pub use read::*;

/// Counters a long whole-store operation (gc, verify) updates as it goes, for progress
/// display: what it is doing, and how far.
#[derive(Debug, Default)]
pub struct Steps {
    phase: std::sync::Mutex<&'static str>,
    pub done: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
}

impl Steps {
    /// Starts a phase of `total` steps (0 if not known).
    pub fn start(&self, phase: &'static str, total: u64) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
        self.total
            .store(total, std::sync::atomic::Ordering::Relaxed);
        self.done.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn step(&self) {
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn phase(&self) -> &'static str {
        self.phase.lock().map(|p| *p).unwrap_or("")
    }
}
