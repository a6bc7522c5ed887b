//! sched-noise: how late this machine wakes a sleeping thread. Not a server scenario: it
//! measures the floor under every latency the others report. One thread per CPU asks to
//! sleep 100 µs, over and over, and records how much later than that it runs again; a
//! stall of a few ms here (another task holding the CPU, a hypervisor pause) delays any
//! message that needs that CPU at that moment, whatever the server does.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Config;
use crate::report::{Latency, Report, ShardedHist};

/// Requested sleep of each probe.
const SLEEP: Duration = Duration::from_micros(100);

/// What the probe threads saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NoiseStats {
    /// Probe threads (one per available CPU, not pinned).
    pub threads: u32,
    /// Requested sleep, µs.
    pub sleep_us: u64,
    /// Wake-ups measured.
    pub wakeups: u64,
    /// Lateness of a wake-up beyond the requested sleep, µs.
    pub late_us: Latency,
    /// Wake-ups later than 1 ms / 3 ms.
    pub over_1ms: u64,
    pub over_3ms: u64,
    /// Wake-ups later than 1 ms per second of probing, over all threads.
    pub over_1ms_per_sec: f64,
}

pub(crate) async fn run(cfg: &Config) -> anyhow::Result<Report> {
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let run_time = cfg.run_time;
    let hist = Arc::new(ShardedHist::new(threads));
    let stats = tokio::task::spawn_blocking({
        let hist = hist.clone();
        move || probe(threads, run_time, &hist)
    })
    .await?;
    let merged = hist.merged();
    let secs = run_time.as_secs_f64().max(1e-9);
    let noise = NoiseStats {
        threads: threads as u32,
        sleep_us: SLEEP.as_micros() as u64,
        wakeups: merged.len(),
        late_us: Latency::from_hist(&merged),
        over_1ms: stats.0,
        over_3ms: stats.1,
        over_1ms_per_sec: (stats.0 as f64 / secs * 100.0).round() / 100.0,
    };
    Ok(Report {
        mode: "probe".to_owned(),
        noise: Some(noise),
        ..Report::default()
    })
}

/// Runs `threads` probe threads for `run_time`; returns the counts over 1 ms and 3 ms.
fn probe(threads: usize, run_time: Duration, hist: &ShardedHist) -> (u64, u64) {
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (mut over1, mut over3) = (0, 0);
                    let end = Instant::now() + run_time;
                    let mut before = Instant::now();
                    while before < end {
                        thread::sleep(SLEEP);
                        let now = Instant::now();
                        let late = now.duration_since(before).saturating_sub(SLEEP);
                        let late_us = late.as_micros() as u64;
                        hist.record(t, late_us);
                        over1 += u64::from(late_us > 1000);
                        over3 += u64::from(late_us > 3000);
                        before = now;
                    }
                    (over1, over3)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    })
}
