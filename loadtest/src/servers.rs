//! `--server-pid` in the message scenarios (dm-*, room-*): each server process's RSS before
//! the users connect, when sending starts and at the end, and its CPU time (utime + stime from
//! `/proc/<pid>/stat`) over the sending phase and the drain, per delivered message: what
//! `bench.sh` reads around a whole scenario, narrowed to the phase that carries the messages.

use std::time::Instant;

use serde::Serialize;

use crate::conn;

/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 a second on every Linux ABI.
const TICKS_PER_SEC: f64 = 100.0;

/// One server process around the sending phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerStats {
    /// Process id.
    pub pid: u32,
    /// VmRSS before the users connected, KiB.
    pub rss_before_kib: u64,
    /// VmRSS when sending started (every user connected), KiB.
    pub rss_sending_kib: u64,
    /// VmRSS after the drain, KiB.
    pub rss_end_kib: u64,
    /// CPU time over the sending phase and the drain, ms (10 ms resolution).
    pub cpu_ms: f64,
    /// That CPU time over the phase's wall time: cores kept busy.
    pub cpu_cores: f64,
    /// CPU time per delivered message (room-*: per delivery), µs.
    pub cpu_us_per_delivery: Option<f64>,
}

/// Samples taken so far.
pub(crate) struct Probe {
    pids: Vec<u32>,
    rss_before: Vec<u64>,
    /// Ticks and RSS of each pid when sending started, and when that was.
    sending: Option<(Vec<u64>, Vec<u64>, Instant)>,
}

impl Probe {
    /// Reads each pid's RSS before anything connects.
    pub(crate) fn start(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            rss_before: pids.iter().map(|&p| rss(p)).collect(),
            sending: None,
        }
    }

    /// Marks the start of the sending phase.
    pub(crate) fn sending(&mut self) {
        if self.pids.is_empty() {
            return;
        }
        let ticks = self.pids.iter().map(|&p| cpu_ticks(p)).collect();
        let rss = self.pids.iter().map(|&p| rss(p)).collect();
        self.sending = Some((ticks, rss, Instant::now()));
    }

    /// The statistics from the start of sending to now, with `delivered` messages (or
    /// deliveries) in that time; empty without pids. Unreadable values are 0.
    pub(crate) fn finish(&self, delivered: u64) -> Vec<ServerStats> {
        let Some((ticks0, rss_sending, t0)) = &self.sending else {
            return Vec::new();
        };
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        self.pids
            .iter()
            .enumerate()
            .map(|(i, &pid)| {
                let ticks = cpu_ticks(pid).saturating_sub(ticks0[i]) as f64;
                let cpu_secs = ticks / TICKS_PER_SEC;
                ServerStats {
                    pid,
                    rss_before_kib: self.rss_before[i],
                    rss_sending_kib: rss_sending[i],
                    rss_end_kib: rss(pid),
                    cpu_ms: cpu_secs * 1e3,
                    cpu_cores: (cpu_secs / secs * 100.0).round() / 100.0,
                    cpu_us_per_delivery: (delivered > 0)
                        .then(|| (cpu_secs * 1e6 / delivered as f64 * 100.0).round() / 100.0),
                }
            })
            .collect()
    }
}

fn rss(pid: u32) -> u64 {
    conn::rss_kib(pid).unwrap_or(0)
}

/// utime + stime of `pid` in ticks; 0 when unreadable.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_ticks(&s))
        .unwrap_or(0)
}

/// Fields 14 and 15 (utime, stime) of a `/proc/<pid>/stat` line; the command name (field 2)
/// may hold spaces and parentheses, so counting starts after its last `)`.
fn parse_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_from_a_stat_line() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 2318 0 0 0 731 269 0 0 20 0 9 0 1234 0 0";
        assert_eq!(parse_ticks(line), Some(1000));
        assert_eq!(parse_ticks("garbage"), None);
        let me = std::process::id();
        let mut p = Probe::start(&[me]);
        assert!(p.rss_before[0] > 0);
        p.sending();
        let s = p.finish(10);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].pid, me);
        assert!(s[0].rss_end_kib > 0 && s[0].cpu_us_per_delivery.is_some());
        assert!(Probe::start(&[]).finish(1).is_empty());
    }
}
