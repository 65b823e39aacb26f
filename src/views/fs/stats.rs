//! Counters of the mount's work: kernel requests by kind, how many had to wait for the store and
//! for how long, and directory loads. Read as the root's `user.granary.ops` xattr (benchmarks,
//! debugging); each count is one relaxed atomic add, cheap enough to leave on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::spin::Spinner;

/// The kinds of kernel request counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Readlink,
    Open,
    Read,
    Opendir,
    Readdir,
    Readdirplus,
    Forget,
    Statfs,
    Xattr,
    Access,
}

const OPS: [(&str, Op); 12] = [
    ("lookup", Op::Lookup),
    ("getattr", Op::Getattr),
    ("readlink", Op::Readlink),
    ("open", Op::Open),
    ("read", Op::Read),
    ("opendir", Op::Opendir),
    ("readdir", Op::Readdir),
    ("readdirplus", Op::Readdirplus),
    ("forget", Op::Forget),
    ("statfs", Op::Statfs),
    ("xattr", Op::Xattr),
    ("access", Op::Access),
];

#[derive(Default)]
pub(crate) struct Stats {
    count: [AtomicU64; 12],
    /// Requests that could not be answered from memory at once.
    waited: [AtomicU64; 12],
    /// Microseconds those waited, summed.
    waited_us: [AtomicU64; 12],
    /// Backend calls for directories the kernel asked about, and directories they returned.
    pub dir_calls: AtomicU64,
    pub dirs_loaded: AtomicU64,
    /// Background batches of directories loaded ahead of a walk, and directories they loaded.
    pub prefetch_calls: AtomicU64,
    pub dirs_prefetched: AtomicU64,
    /// Opens answered with FUSE passthrough to a cached file.
    pub passthrough_opens: AtomicU64,
    /// Reads of times answered from a root record's head, and reads of a table.
    pub times_from_head: AtomicU64,
    pub times_read: AtomicU64,
    /// Polls the channel while metadata requests come back to back; fed by `count`.
    pub spin: Spinner,
}

impl Stats {
    /// Counters, and a spinner that polls the channel during bursts if `poll`.
    pub(crate) fn with_polling(poll: bool) -> Self {
        Self {
            spin: Spinner::new(poll),
            ..Self::default()
        }
    }

    pub(crate) fn count(&self, op: Op) {
        self.count[op as usize].fetch_add(1, Ordering::Relaxed);
        match op {
            // Data is flowing: its decompression needs the CPU a poller would take.
            Op::Read => self.spin.pause(),
            Op::Forget | Op::Statfs => {}
            _ => self.spin.note(),
        }
    }

    pub(crate) fn waited(&self, op: Op, since: Instant) {
        self.waited[op as usize].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.waited_us[op as usize].fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// One line per kind with requests, `kind count [waited N for T ms]`, then directory loads
    /// and the bytes in the chunk cache.
    pub(crate) fn render(&self, cached_bytes: usize, extra: &[(&str, u64)]) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, op) in OPS {
            let i = op as usize;
            let n = get(&self.count[i]);
            if n == 0 {
                continue;
            }
            out.push_str(&format!("{name} {n}"));
            let w = get(&self.waited[i]);
            if w > 0 {
                let ms = get(&self.waited_us[i]) as f64 / 1000.0;
                out.push_str(&format!(" waited {w} for {ms:.1} ms"));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "directory loads {} in {} calls, prefetched {} in {} calls\n",
            get(&self.dirs_loaded),
            get(&self.dir_calls),
            get(&self.dirs_prefetched),
            get(&self.prefetch_calls)
        ));
        out.push_str(&format!("chunk_cache_bytes {cached_bytes}\n"));
        out.push_str(&format!(
            "passthrough_opens {}\n",
            get(&self.passthrough_opens)
        ));
        out.push_str(&format!(
            "times_from_head {}\ntimes_read {}\n",
            get(&self.times_from_head),
            get(&self.times_read)
        ));
        out.push_str(&format!(
            "polling_bursts {}\npolling_crowded_out {}\n",
            get(&self.spin.engaged),
            get(&self.spin.crowded)
        ));
        for (name, n) in extra {
            out.push_str(&format!("{name} {n}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_only_kinds_seen_and_their_waits() {
        let s = Stats::default();
        s.count(Op::Lookup);
        s.count(Op::Lookup);
        s.count(Op::Read);
        s.waited(Op::Read, Instant::now());
        Stats::add(&s.dirs_loaded, 3);
        Stats::add(&s.dir_calls, 1);
        let text = s.render(7, &[("extra", 9)]);
        assert!(text.contains("lookup 2\n"), "{text}");
        assert!(text.contains("read 1 waited 1 for"), "{text}");
        assert!(!text.contains("getattr"), "{text}");
        assert!(text.contains("directory loads 3 in 1 calls"), "{text}");
        assert!(text.contains("chunk_cache_bytes 7\n"), "{text}");
        assert!(text.ends_with("extra 9\n"), "{text}");
    }
}
