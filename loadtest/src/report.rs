//! The report produced by every scenario, and its human rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Number of samples.
    pub count: u64,
    /// Smallest sample.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// 50th percentile.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Latency {
    pub(crate) fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min: h.min(),
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A new latency histogram: 1 µs .. 1 h, 3 significant digits.
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Histograms sharded to keep lock contention negligible.
pub(crate) struct ShardedHist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl ShardedHist {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    pub(crate) fn record(&self, shard: usize, micros: u64) {
        let mut h = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.max(1));
    }

    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut out = new_hist();
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|e| e.into_inner());
            let _ = out.add(&*h);
        }
        out
    }
}

/// Counter map keyed by a short description (error text, close code, ...).
#[derive(Default)]
pub(crate) struct Counts(Mutex<BTreeMap<String, u64>>);

impl Counts {
    pub(crate) fn add(&self, key: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(key) {
            Some(v) => *v += 1,
            None => {
                m.insert(key.to_owned(), 1);
            }
        }
    }

    pub(crate) fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Connection phase statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectStats {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections established.
    pub connected: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by kind (`http 503`, `io ConnectionRefused`, `timeout`, ...).
    pub failures: BTreeMap<String, u64>,
    /// Duration of the connect phase in seconds.
    pub secs: f64,
    /// Established connections per second during the connect phase.
    pub per_sec: f64,
    /// Time to establish one connection (TCP + upgrade), µs.
    pub latency_us: Latency,
}

/// Message statistics (dm scenarios; churn reuses it for its one message per cycle).
/// dm-multi counts deliveries: every message written counts once per session it must
/// reach ([`Fanout::deliveries_per_message`]), in `sent` and `errored` alike.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MessageStats {
    /// Messages written to the sockets.
    pub sent: u64,
    /// Distinct messages received by their recipient.
    pub delivered: u64,
    /// Messages answered with an error frame instead.
    pub errored: u64,
    /// `sent - delivered - errored` after the grace period.
    pub lost: u64,
    /// Messages received more than once.
    pub duplicated: u64,
    /// Messages received after a later message of the same sender→recipient pair.
    pub out_of_order: u64,
    /// Length of the sending phase in seconds.
    pub send_secs: f64,
    /// Sent messages per second of sending phase.
    pub sent_per_sec: f64,
    /// Delivered messages per second of sending phase.
    pub delivered_per_sec: f64,
    /// Send → receive latency, µs (open loop: from the intended send time).
    pub latency_us: Latency,
}

/// dm-multi: the messages written and their deliveries by kind of receiving session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fanout {
    /// Messages written by the sending sessions.
    pub messages: u64,
    /// Of those, answered with an error frame (they reach no session).
    pub errored: u64,
    /// Sessions each message must reach: every session of the recipient and every other
    /// session of the sender.
    pub deliveries_per_message: u64,
    /// Per kind: the recipient's session on the sending node, the recipient's sessions on
    /// the other nodes, the sender's other sessions.
    pub kinds: Vec<DeliveryKind>,
}

/// Deliveries of one kind (dm-multi). Order is checked per sender→recipient pair within
/// each receiving session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryKind {
    /// Which sessions (`recipient, sending node`, `recipient, other node`,
    /// `sender's other session`).
    pub kind: String,
    /// Deliveries due: messages not errored × sessions of this kind.
    pub expected: u64,
    /// Distinct deliveries received.
    pub delivered: u64,
    /// `expected − delivered`.
    pub lost: u64,
    /// Deliveries received more than once by the same session.
    pub duplicated: u64,
    /// Deliveries received after a later message of the same pair, by the same session.
    pub out_of_order: u64,
    /// Send → receive latency, µs.
    pub latency_us: Latency,
}

/// Churn cycle statistics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnStats {
    /// Cycles started.
    pub started: u64,
    /// Cycles that connected, delivered their message and closed cleanly.
    pub completed: u64,
    /// Cycles not started because too many were still in flight.
    pub skipped: u64,
    /// Failed cycles by kind (`connect http 503`, `error: ...`, `delivery timeout`, ...).
    pub failures: BTreeMap<String, u64>,
    /// Completed sessions per second of the run.
    pub sessions_per_sec: f64,
    /// Full cycle latency (intended start → closed), µs.
    pub cycle_latency_us: Latency,
}

/// Memory of one server process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcMemory {
    /// Process id.
    pub pid: u32,
    /// VmRSS before connecting, KiB.
    pub rss_before_kib: u64,
    /// VmRSS after all connections were established, KiB.
    pub rss_after_kib: u64,
    /// (after − before) / connections, KiB.
    pub per_conn_kib: f64,
}

/// Server RSS (all `--server-pid`s) with this many connections held.
#[derive(Debug, Clone, Serialize)]
pub struct MemorySample {
    /// Connections the load tester holds.
    pub connections: u64,
    /// Open file descriptors of the server processes (their sockets).
    pub server_fds: u64,
    pub rss_kib: u64,
}

/// RSS ≈ `base_kib` + `kib_per_conn` × connections, fitted by least squares, where the
/// connections are the server's open descriptors less those it had at the first sample.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFit {
    /// Samples fitted.
    pub samples: usize,
    /// Most connections sampled (the fit says nothing beyond its range but a projection).
    pub max_connections: u64,
    /// Slope: memory per connection, KiB.
    pub kib_per_conn: f64,
    /// Intercept: RSS with no connection, KiB.
    pub base_kib: f64,
    /// Coefficient of determination (1 = the samples lie on the line).
    pub r2: f64,
    /// The line at 100,000 connections, MiB: a projection when `max_connections` is
    /// smaller (e.g. capped by the open-file limit).
    pub at_100k_mib: f64,
}

impl MemoryFit {
    /// The fit of `curve`, if it has at least 3 samples at different connection counts.
    pub fn of(curve: &[MemorySample]) -> Option<Self> {
        let n = curve.len() as f64;
        let base_fds = curve.first()?.server_fds;
        let conns = |s: &MemorySample| s.server_fds.saturating_sub(base_fds);
        let xs = || curve.iter().map(|s| conns(s) as f64);
        let ys = || curve.iter().map(|s| s.rss_kib as f64);
        let (mx, my) = (xs().sum::<f64>() / n, ys().sum::<f64>() / n);
        let sxx: f64 = xs().map(|x| (x - mx).powi(2)).sum();
        let syy: f64 = ys().map(|y| (y - my).powi(2)).sum();
        let sxy: f64 = xs().zip(ys()).map(|(x, y)| (x - mx) * (y - my)).sum();
        let distinct = curve
            .windows(2)
            .filter(|w| conns(&w[0]) != conns(&w[1]))
            .count();
        if curve.len() < 3 || distinct < 2 || sxx == 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        let base = my - slope * mx;
        let r2 = if syy == 0.0 {
            1.0
        } else {
            sxy * sxy / (sxx * syy)
        };
        let round = |v: f64, k: f64| (v * k).round() / k;
        Some(Self {
            samples: curve.len(),
            max_connections: curve.iter().map(conns).max().unwrap_or(0),
            kib_per_conn: round(slope, 100.0),
            base_kib: round(base, 1.0),
            r2: round(r2, 10_000.0),
            at_100k_mib: round((base + slope * 100_000.0) / 1024.0, 10.0),
        })
    }
}

/// One message slower than `--slow-us`.
#[derive(Debug, Clone, Serialize)]
pub struct SlowMessage {
    /// When it was (due to be) sent, ms after the measuring phase started.
    pub sent_at_ms: f64,
    /// Send → receive, µs.
    pub latency_us: u64,
    /// Sender and recipient user indexes.
    pub from: u32,
    pub to: u32,
}

/// The report of one scenario run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Mode (`open-loop`, `closed-loop`, `hold`, `cycles`).
    pub mode: String,
    /// Random prefix of all user ids of this run.
    pub run_prefix: String,
    /// Node URLs.
    pub nodes: Vec<String>,
    /// Simulated (held) users.
    pub users: u64,
    /// Open-loop target rate (messages or cycles per second), if any.
    pub target_rate: Option<f64>,
    /// Closed-loop messages in flight per user, if any.
    pub in_flight: Option<u32>,
    /// dm-*, room-*: most frames a sender writes at once (`--frames-per-write`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_per_write: Option<u32>,
    /// Requested measuring time in seconds.
    pub run_time_secs: f64,
    /// Connect ramp, users per second.
    pub hatch_rate: f64,
    /// Wait for outstanding messages after sending stopped, seconds.
    pub grace_secs: f64,
    /// When the run started (UTC, ISO 8601).
    pub started_at: String,
    /// The command line that ran it (set by the CLI).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// What it ran on.
    pub machine: crate::Machine,
    /// Wall time of the whole run in seconds.
    pub elapsed_secs: f64,
    /// The measuring phase, in seconds since the run started (the timeline's axis).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measuring: Option<(f64, f64)>,
    /// What the timeline's latency measures (`send → receive`, `connect`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub timeline_latency: String,
    /// The run second by second, from the start of the connect phase.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<crate::Second>,
    /// Histogram of every latency in the timeline (buckets 25% apart).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency_histogram: Vec<crate::Bucket>,
    /// Connect phase.
    pub connect: ConnectStats,
    /// Messages (dm-*, churn).
    pub messages: Option<MessageStats>,
    /// dm-multi: deliveries by kind of receiving session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<Fanout>,
    /// Churn cycles.
    pub churn: Option<ChurnStats>,
    /// room-*: rooms, room messages, churn cycles, Redis calls per room message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<crate::RoomStats>,
    /// drops: cuts, reconnects, recovery and replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<crate::DropsStats>,
    /// sched-noise: the machine's wake-up lateness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<crate::NoiseStats>,
    /// Error frames by error text.
    pub error_frames: BTreeMap<String, u64>,
    /// Held connections closed by the server or broken during the run, by kind.
    pub disconnects: BTreeMap<String, u64>,
    /// Server memory (idle-connections with `--server-pid`).
    pub memory: Vec<ProcMemory>,
    /// Total server RSS after connecting, KiB (sum over pids).
    pub total_rss_kib: Option<u64>,
    /// idle-connections: total server RSS against connections held, during the ramp.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub memory_curve: Vec<MemorySample>,
    /// idle-connections: the least-squares line through `memory_curve`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_fit: Option<MemoryFit>,
    /// dm-*, room-* with `--server-pid`: each server's RSS and its CPU time over the sending
    /// phase and drain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<crate::ServerStats>,
    /// dm-* with `--slow-us`: the slowest-path messages, in arrival order (at most 1,000).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub slow: Vec<SlowMessage>,
    /// Notes (e.g. file-descriptor limits).
    pub notes: Vec<String>,
    /// Problems that make the run fail (non-zero exit).
    pub problems: Vec<String>,
    /// `problems.is_empty()`.
    pub ok: bool,
}

impl Report {
    /// Fills `problems` and `ok` from the counters.
    pub(crate) fn finish(&mut self) {
        if self.connect.failed > 0 {
            self.problems
                .push(format!("{} connections failed", self.connect.failed));
        }
        if let Some(m) = &self.messages {
            for (n, what) in [
                (m.lost, "lost"),
                (m.duplicated, "duplicated"),
                (m.out_of_order, "out-of-order"),
            ] {
                if n > 0 {
                    self.problems.push(format!("{n} messages {what}"));
                }
            }
            if m.sent == 0 {
                self.problems.push("no message was sent".to_owned());
            } else if m.delivered == 0 {
                self.problems.push("no message was delivered".to_owned());
            }
            if m.errored > 0 {
                self.problems.push(format!(
                    "{} messages answered with an error frame",
                    m.errored
                ));
            }
        }
        if let Some(c) = &self.churn {
            let failed: u64 = c.failures.values().sum();
            if failed > 0 {
                self.problems.push(format!("{failed} churn cycles failed"));
            }
        }
        if let Some(r) = &self.rooms {
            r.problems(&self.scenario, &mut self.problems);
        }
        if let Some(d) = &self.drops {
            d.problems(&mut self.problems);
        }
        let dropped: u64 = self.disconnects.values().sum();
        if dropped > 0 {
            self.problems
                .push(format!("{dropped} held connections dropped during the run"));
        }
        self.ok = self.problems.is_empty();
    }

    /// Renders the report as a human-readable table.
    pub fn to_human(&self) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(
            w,
            "=== wsbus-loadtest: {} ({}) ===",
            self.scenario, self.mode
        );
        let _ = writeln!(
            w,
            "nodes: {}   run prefix: {}",
            self.nodes.join(" "),
            self.run_prefix
        );
        let _ = write!(
            w,
            "users: {}   run time: {:.1}s   elapsed: {:.1}s",
            self.users, self.run_time_secs, self.elapsed_secs
        );
        if let Some(r) = self.target_rate {
            let _ = write!(w, "   target rate: {r}/s");
        }
        if let Some(f) = self.in_flight {
            let _ = write!(w, "   in flight/user: {f}");
        }
        if let Some(f) = self.frames_per_write {
            let _ = write!(w, "   frames/write: {f}");
        }
        let _ = writeln!(w);
        let c = &self.connect;
        if c.attempted > 0 {
            let _ = writeln!(w, "\n-- connections");
            let _ = writeln!(
                w,
                "  attempted {:>10}   connected {:>10}   failed {:>8}   {:.1}s   {:.0} conn/s",
                c.attempted, c.connected, c.failed, c.secs, c.per_sec
            );
            lat_header(w, "  ");
            lat_row(w, "  connect", &c.latency_us);
            for (k, v) in &c.failures {
                let _ = writeln!(w, "  failure {k:<40} {v:>10}");
            }
        }
        if let Some(m) = &self.messages {
            let _ = writeln!(w, "\n-- messages");
            let _ = writeln!(
                w,
                "  sent {:>12}   delivered {:>12}   errored {:>8}   lost {:>8}   duplicated {:>6}   out-of-order {:>6}",
                m.sent, m.delivered, m.errored, m.lost, m.duplicated, m.out_of_order
            );
            let _ = writeln!(
                w,
                "  sending phase {:.2}s   sent {:.0}/s   delivered {:.0}/s",
                m.send_secs, m.sent_per_sec, m.delivered_per_sec
            );
            lat_header(w, "  ");
            lat_row(w, "  send→recv", &m.latency_us);
        }
        if let Some(f) = &self.fanout {
            let _ = writeln!(
                w,
                "\n-- deliveries: {} messages written, {} errored, {} sessions each",
                f.messages, f.errored, f.deliveries_per_message
            );
            for k in &f.kinds {
                let _ = writeln!(
                    w,
                    "  {:<24} expected {:>10}   delivered {:>10}   lost {:>6}   duplicated {:>6}   out-of-order {:>6}",
                    k.kind, k.expected, k.delivered, k.lost, k.duplicated, k.out_of_order
                );
            }
            // The kinds' names are longer than `lat_row`'s column.
            let _ = writeln!(
                w,
                "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   (µs)",
                "latency", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
            );
            for k in &f.kinds {
                let l = &k.latency_us;
                let _ = writeln!(
                    w,
                    "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.0}",
                    k.kind, l.count, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
                );
            }
        }
        if let Some(ch) = &self.churn {
            let _ = writeln!(w, "\n-- churn cycles");
            let _ = writeln!(
                w,
                "  started {:>10}   completed {:>10}   skipped {:>8}   {:.1} sessions/s",
                ch.started, ch.completed, ch.skipped, ch.sessions_per_sec
            );
            lat_header(w, "  ");
            lat_row(w, "  cycle", &ch.cycle_latency_us);
            for (k, v) in &ch.failures {
                let _ = writeln!(w, "  failure {k:<40} {v:>10}");
            }
        }
        if let Some(r) = &self.rooms {
            r.write_human(w);
        }
        if let Some(d) = &self.drops {
            d.write_human(w);
        }
        if let Some(n) = &self.noise {
            let _ = writeln!(w, "\n-- wake-up lateness after a {} µs sleep", n.sleep_us);
            let _ = writeln!(
                w,
                "  threads {}   wake-ups {}   over 1 ms {} ({:.2}/s)   over 3 ms {}",
                n.threads, n.wakeups, n.over_1ms, n.over_1ms_per_sec, n.over_3ms
            );
            lat_header(w, "  ");
            lat_row(w, "  late", &n.late_us);
        }
        if !self.slow.is_empty() {
            let _ = writeln!(
                w,
                "\n-- {} slow messages listed in the JSON report (`slow`)",
                self.slow.len()
            );
        }
        if !self.error_frames.is_empty() {
            let _ = writeln!(w, "\n-- error frames");
            for (k, v) in &self.error_frames {
                let _ = writeln!(w, "  {k:<48} {v:>10}");
            }
        }
        if !self.disconnects.is_empty() {
            let _ = writeln!(w, "\n-- held connections dropped");
            for (k, v) in &self.disconnects {
                let _ = writeln!(w, "  {k:<48} {v:>10}");
            }
        }
        if !self.memory.is_empty() {
            let _ = writeln!(w, "\n-- server memory");
            for m in &self.memory {
                let _ = writeln!(
                    w,
                    "  pid {:<8} rss before {:>9} KiB   after {:>9} KiB   per connection {:>7.2} KiB",
                    m.pid, m.rss_before_kib, m.rss_after_kib, m.per_conn_kib
                );
            }
            if let Some(t) = self.total_rss_kib {
                let _ = writeln!(w, "  total rss after {t} KiB");
            }
            if let Some(f) = &self.memory_fit {
                let _ = writeln!(
                    w,
                    "  fit over {} samples up to {} connections: {:.0} KiB + {:.2} KiB/connection (r² {:.4}); at 100,000: {:.1} MiB",
                    f.samples, f.max_connections, f.base_kib, f.kib_per_conn, f.r2, f.at_100k_mib
                );
            }
        }
        if !self.servers.is_empty() {
            let _ = writeln!(
                w,
                "\n-- servers (--server-pid): CPU over the sending phase and drain; RSS"
            );
            for s in &self.servers {
                let per = s
                    .cpu_us_per_delivery
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
                let _ = writeln!(
                    w,
                    "  pid {:<8} cpu {:>8.0} ms ({:.2} cores)   {:>7} µs/delivery   rss before {} KiB, sending {} KiB, end {} KiB",
                    s.pid,
                    s.cpu_ms,
                    s.cpu_cores,
                    per,
                    s.rss_before_kib,
                    s.rss_sending_kib,
                    s.rss_end_kib
                );
            }
            if self.servers.len() > 1 {
                let total: f64 = self
                    .servers
                    .iter()
                    .filter_map(|s| s.cpu_us_per_delivery)
                    .sum();
                let _ = writeln!(w, "  all servers {total:.2} µs/delivery");
            }
        }
        for n in &self.notes {
            let _ = writeln!(w, "note: {n}");
        }
        if self.ok {
            let _ = writeln!(w, "\nresult: OK");
        } else {
            let _ = writeln!(w, "\nresult: FAILED: {}", self.problems.join("; "));
        }
        o
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (civil date from days since 1970, Howard Hinnant's method).
pub(crate) fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub(crate) fn lat_header(w: &mut String, indent: &str) {
    let _ = writeln!(
        w,
        "{indent}{:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   (µs)",
        "latency", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
}

pub(crate) fn lat_row(w: &mut String, name: &str, l: &Latency) {
    let _ = writeln!(
        w,
        "{name:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.0}",
        l.count, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(fds: u64, rss_kib: u64) -> MemorySample {
        MemorySample {
            connections: 0,
            server_fds: fds,
            rss_kib,
        }
    }

    #[test]
    fn memory_fit_of_a_line() {
        // 20 fds before the run; 1,000 KiB + 8 KiB per socket.
        let curve: Vec<_> = (0..5)
            .map(|i| sample(20 + i * 100, 1000 + i * 800))
            .collect();
        let fit = MemoryFit::of(&curve).expect("fit");
        assert_eq!(fit.kib_per_conn, 8.0);
        assert_eq!(fit.base_kib, 1000.0);
        assert_eq!(fit.r2, 1.0);
        assert_eq!(fit.max_connections, 400);
        assert_eq!(
            fit.at_100k_mib,
            ((1000.0 + 800_000.0) / 1024.0 * 10.0_f64).round() / 10.0
        );
    }

    #[test]
    fn memory_fit_needs_spread() {
        assert!(MemoryFit::of(&[]).is_none());
        assert!(MemoryFit::of(&[sample(1, 10), sample(2, 20)]).is_none());
        assert!(MemoryFit::of(&[sample(5, 10), sample(5, 20), sample(5, 30)]).is_none());
        let noisy = [
            sample(0, 10),
            sample(10, 90),
            sample(20, 30),
            sample(30, 200),
        ];
        let fit = MemoryFit::of(&noisy).expect("fit");
        assert!(fit.r2 > 0.0 && fit.r2 < 1.0, "{fit:?}");
    }
}
