//! The run second by second: what the HTML report plots. Every scenario records its headline
//! latency (dm-* and churn: send → receive; idle-connections: connect), sends, deliveries,
//! errors and open connections into one-second slots counted from the start of the run
//! (connect phase included), so a stall, a ramp or a burst of errors shows where it happened.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::report::new_hist;

/// Latency histograms per slot are sharded like [`crate::report::ShardedHist`], so that
/// recording from many connection tasks does not contend on one lock.
const SHARDS: usize = 8;

/// One second of the run.
struct Slot {
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    /// Most connections open at once during this second (sampled).
    connections: AtomicU64,
    /// Created on first use: most seconds of an idle run have no latency sample.
    /// Two significant digits (1%) are plenty for a chart and keep each one ~26 KiB.
    hists: [Mutex<Option<Histogram<u64>>>; SHARDS],
}

impl Slot {
    fn new() -> Self {
        Self {
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            hists: std::array::from_fn(|_| Mutex::new(None)),
        }
    }
}

/// Per-second counters of one run, shared by all its tasks.
pub(crate) struct Timeline {
    start: Instant,
    slots: Vec<Slot>,
    /// Connections open right now (connected and not yet closed).
    open: AtomicI64,
}

impl Timeline {
    /// A timeline of `len` (the run's hard deadline, rounded up) starting now.
    pub(crate) fn new(len: Duration) -> Self {
        let n = len.as_secs() as usize + 2;
        Self {
            start: Instant::now(),
            slots: (0..n).map(|_| Slot::new()).collect(),
            open: AtomicI64::new(0),
        }
    }

    /// Seconds since the run started.
    pub(crate) fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64()
    }

    fn slot(&self) -> &Slot {
        let i = self.start.elapsed().as_secs() as usize;
        &self.slots[i.min(self.slots.len() - 1)]
    }

    /// One message sent.
    pub(crate) fn sent(&self) {
        self.sent_n(1);
    }

    /// `n` deliveries due from one message sent (dm-multi expects several per message).
    pub(crate) fn sent_n(&self, n: u64) {
        self.slot().sent.fetch_add(n, Relaxed);
    }

    /// One message delivered (or, for idle-connections, one connection made) after `micros`.
    /// `shard` spreads the lock (a user or cycle index).
    pub(crate) fn delivered(&self, shard: usize, micros: u64) {
        let slot = self.slot();
        slot.delivered.fetch_add(1, Relaxed);
        let mut h = slot.hists[shard % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.get_or_insert_with(|| {
            Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
        })
        .saturating_record(micros.max(1));
    }

    /// One error of any kind (error frame, failed connect or cycle, dropped connection).
    pub(crate) fn error(&self) {
        self.slot().errors.fetch_add(1, Relaxed);
    }

    /// A connection opened; it counts as open until the returned guard drops.
    pub(crate) fn opened(&self) -> OpenConn<'_> {
        let now = self.open.fetch_add(1, Relaxed) + 1;
        self.slot().connections.fetch_max(now as u64, Relaxed);
        OpenConn(self)
    }

    /// Records the connections open now; called periodically so that seconds without a
    /// connect or close still show how many were held.
    pub(crate) fn sample_connections(&self) {
        let now = self.open.load(Relaxed).max(0) as u64;
        self.slot().connections.fetch_max(now, Relaxed);
    }

    /// The seconds from the start to now, and the histogram of all latencies recorded.
    pub(crate) fn finish(&self) -> (Vec<Second>, Histogram<u64>) {
        let upto = (self.start.elapsed().as_secs() as usize + 1).min(self.slots.len());
        let mut all = new_hist();
        let seconds = self.slots[..upto]
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let mut merged: Option<Histogram<u64>> = None;
                for h in &s.hists {
                    if let Some(h) = &*h.lock().unwrap_or_else(|e| e.into_inner()) {
                        let _ = all.add(h);
                        match &mut merged {
                            Some(m) => {
                                let _ = m.add(h);
                            }
                            None => merged = Some(h.clone()),
                        }
                    }
                }
                let q = |p: f64| merged.as_ref().map(|h| h.value_at_quantile(p));
                Second {
                    t: t as u32,
                    sent: s.sent.load(Relaxed),
                    delivered: s.delivered.load(Relaxed),
                    errors: s.errors.load(Relaxed),
                    connections: s.connections.load(Relaxed),
                    p50_us: q(0.5),
                    p99_us: q(0.99),
                    p999_us: q(0.999),
                }
            })
            .collect();
        (seconds, all)
    }
}

/// An open connection in the [`Timeline`]'s count.
pub(crate) struct OpenConn<'a>(&'a Timeline);

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// One second of the run, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the run started (connect phase included).
    pub t: u32,
    /// Messages sent in this second.
    pub sent: u64,
    /// Messages delivered (idle-connections: connections made) in this second.
    pub delivered: u64,
    /// Errors of any kind in this second.
    pub errors: u64,
    /// Most connections open at once in this second.
    pub connections: u64,
    /// Latency percentiles of what was delivered in this second, µs (none if nothing was).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
}

/// A bucket of the latency histogram: `count` samples in (previous `le_us`, `le_us`].
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Upper bound, µs.
    pub le_us: u64,
    /// Samples in the bucket.
    pub count: u64,
}

/// Buckets growing by 25% from the smallest sample to the largest: fine enough to show the
/// shape of a sub-millisecond body and its tail on one log axis.
pub(crate) fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    let first = (h.min() as f64 * 0.8).max(1.0) as u64;
    h.iter_log(first, 1.25)
        .map(|v| Bucket {
            le_us: v.value_iterated_to(),
            count: v.count_since_last_iteration(),
        })
        .collect()
}

/// Everything the load tester needs from `/proc` to say what machine it ran on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    /// Host name.
    pub host: String,
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// CPUs available to this process.
    pub cpus: usize,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Open-file limit of the load tester (soft, hard) after raising it.
    pub nofile: (u64, u64),
}

impl Machine {
    /// Reads the machine's description; fields that cannot be read stay empty.
    pub(crate) fn read() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        Self {
            host: read("/proc/sys/kernel/hostname").trim().to_owned(),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            nofile: rlimit::Resource::NOFILE.get().unwrap_or((0, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn seconds_keep_their_own_counts_and_percentiles() {
        let tl = Timeline::new(Duration::from_secs(10));
        let conn = tl.opened();
        tl.sent();
        tl.delivered(0, 100);
        tokio::time::advance(Duration::from_millis(1500)).await;
        tl.sample_connections();
        for i in 0..1000 {
            tl.delivered(i, 1000 + i as u64);
        }
        tl.error();
        drop(conn);
        tokio::time::advance(Duration::from_secs(1)).await;
        tl.sample_connections();
        let (secs, all) = tl.finish();
        assert_eq!(secs.len(), 3);
        assert_eq!((secs[0].sent, secs[0].delivered, secs[0].errors), (1, 1, 0));
        assert_eq!(secs[0].p50_us, Some(100));
        assert_eq!((secs[1].delivered, secs[1].errors), (1000, 1));
        let p99 = secs[1].p99_us.expect("p99");
        assert!((1980..=2000).contains(&p99), "{p99}");
        assert_eq!(
            secs.iter().map(|s| s.connections).collect::<Vec<_>>(),
            [1, 1, 0]
        );
        assert_eq!(secs[2].p50_us, None);
        assert_eq!(all.len(), 1001);
        let b = buckets(&all);
        assert_eq!(b.iter().map(|b| b.count).sum::<u64>(), 1001);
        assert!(b.windows(2).all(|w| w[0].le_us < w[1].le_us));
    }
}
