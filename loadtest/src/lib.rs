//! `wsbus-loadtest`: a small goose-shaped load-test harness for wsbus clusters.
//!
//! Scenarios ([`Scenario`]) are run with [`run`] against node URLs given in a
//! [`Config`] and produce a [`Report`]. The binary `wsbus-loadtest` is a thin
//! CLI around this library; `tests/smoke.rs` calls it directly.

mod api_publish;
mod churn;
mod cmdstats;
mod conn;
mod dm;
mod drops;
mod events_check;
mod html;
mod idle;
mod noise;
mod proxy;
mod report;
mod room;
mod servers;
mod slowloris;
mod timeline;
mod token;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use api_publish::Via;
pub use drops::{Drops, DropsStats, KillStats, LostDelivery};
pub use events_check::EventsCheck;
pub use html::render as render_html;
pub use noise::NoiseStats;
pub use report::{
    ChurnStats, ConnectStats, DeliveryKind, Fanout, Latency, MemoryFit, MemorySample, MessageStats,
    ProcMemory, Report, SlowMessage,
};
pub use room::{RedisCost, RoomChurnStats, RoomStats};
pub use servers::ServerStats;
pub use timeline::{Bucket, Machine, Second};

use conn::{Target, Ws};
use timeline::Timeline;
use token::Minter;

/// A load-test scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Direct messages between users on different nodes.
    DmCross,
    /// Direct messages between users on the same node.
    DmLocal,
    /// Every user holds one session on every node (start the nodes with
    /// `--max-sessions-per-user` ≥ the node count) and sends from one; every session of
    /// the recipient and the sender's other sessions must get each message.
    DmMulti,
    /// Many idle connections to the first node; connect rate and server memory.
    IdleConnections,
    /// Connect, send one message to a held user on another node, close; at a rate.
    Churn,
    /// No server: how late this machine wakes a thread that slept 100 µs (the noise
    /// floor under every latency above).
    SchedNoise,
    /// Stalled and oversized request heads against the first node while real clients
    /// connect and message (see `slowloris.rs` for its settings).
    Slowloris,
    /// Room messages into `--rooms` rooms whose members are spread over the nodes.
    RoomFanout,
    /// room-fanout's messages while `--churners` users join and leave rooms at `--join-rate`.
    RoomChurn,
    /// A backend publishing to random online users over the HTTP API (`--batch` per
    /// request) or the ingress stream (`--via ingress`); needs `--api-key`.
    ApiPublish,
    /// Direct and room messages at `--rate` over the nodes (started with `--history`) while
    /// a third of the clients lose their network path for `--cut-for` every `--cut-every`
    /// and one node is killed and restarted (`--kill-cmd`, `--restart-cmd`); clients recover
    /// with `since`/`epoch`, and every message must arrive exactly once, in order.
    Drops,
}

impl Scenario {
    /// The scenario's CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::DmCross => "dm-cross",
            Self::DmLocal => "dm-local",
            Self::DmMulti => "dm-multi",
            Self::IdleConnections => "idle-connections",
            Self::Churn => "churn",
            Self::SchedNoise => "sched-noise",
            Self::Slowloris => "slowloris",
            Self::RoomFanout => "room-fanout",
            Self::RoomChurn => "room-churn",
            Self::ApiPublish => "api-publish",
            Self::Drops => "drops",
        }
    }
}

/// Parameters of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node URLs (`ws://host:port`).
    pub nodes: Vec<String>,
    /// Simulated users (dm-*: all send and receive; idle: connections; churn: held partners).
    pub users: usize,
    /// Connect ramp, users per second.
    pub hatch_rate: f64,
    /// Measuring phase after all users are connected.
    pub run_time: Duration,
    /// Open-loop total rate (messages/s for dm-*, room messages/s for room-*, cycles/s for
    /// churn). For dm-* and room-fanout,
    /// `None` means closed loop with [`Config::in_flight`].
    pub rate: Option<f64>,
    /// Closed-loop messages in flight per user.
    pub in_flight: u32,
    /// dm-*, room-*: frames a sender hands to the socket in one write (a flush) when it has
    /// that many to send. 1 is what browsers and phones do (one `send` per message); larger
    /// values coalesce what is due at once (the tool's behaviour before this knob was 64).
    pub frames_per_write: u32,
    /// Server pids sampled: VmRSS during the ramp (idle-connections); RSS and CPU time
    /// around the sending phase (dm-*, room-*).
    pub server_pids: Vec<u32>,
    /// How long to wait for outstanding messages after sending stops.
    pub grace: Duration,
    /// Number of loopback source addresses (127.0.0.1..=127.0.0.K); `None` = auto
    /// (one per 25,000 connections).
    pub source_addrs: Option<usize>,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Hard deadline of the whole run; `None` = derived from the other values.
    pub deadline: Option<Duration>,
    /// Maximum churn cycles in flight at once.
    pub max_cycles_in_flight: usize,
    /// dm-*: list messages slower than this (µs) in the report, with when they were sent
    /// (to tell periodic stalls from random ones).
    pub slow_us: Option<u64>,
    /// room-*: rooms the `users` members are spread over.
    pub rooms: usize,
    /// room-churn: join/leave cycles per second (default 50).
    pub join_rate: Option<f64>,
    /// room-churn: users doing the join/leave cycles (besides the `users` members).
    pub churners: usize,
    /// Redis addresses (`host:port`, every shard of a cluster) whose `INFO commandstats` a
    /// room scenario reads around its sending phase.
    pub redis: Vec<String>,
    /// api-publish: an API key of the nodes.
    pub api_key: Option<String>,
    /// api-publish: publishes per request (1 = single publishes) or per `XADD` pipeline.
    pub batch: usize,
    /// api-publish: HTTP API or ingress stream.
    pub via: Via,
    /// api-publish: concurrent HTTP (or Redis) connections publishing.
    pub connections: usize,
    /// drops: the cuts and the node kill.
    pub drops: Drops,
    /// dm-*: consume the events stream (nodes with `--events`) on the first `--redis` while
    /// messages flow, and check every message sent is in it exactly once.
    pub events_check: bool,
    /// `--events-check`: the nodes' `--events-shards`.
    pub events_shards: u32,
    /// dm-*: once connected, wait until this wall-clock time (Unix seconds) before sending, so
    /// that several load-tester processes send together (and the servers can be measured idle
    /// before); a run connected later than this starts at once and says so.
    pub start_at: Option<f64>,
    /// HS256 secret of the nodes: every connection carries a token minted with it
    /// (`?token=`); `None` for nodes started with `--insecure`.
    pub jwt_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nodes: vec!["ws://127.0.0.1:8080".to_owned()],
            users: 100,
            hatch_rate: 1000.0,
            run_time: Duration::from_secs(10),
            rate: None,
            in_flight: 8,
            frames_per_write: 1,
            server_pids: Vec::new(),
            grace: Duration::from_secs(2),
            source_addrs: None,
            connect_timeout: Duration::from_secs(10),
            deadline: None,
            max_cycles_in_flight: 2000,
            slow_us: None,
            rooms: 1,
            join_rate: None,
            churners: 20,
            redis: Vec::new(),
            api_key: None,
            batch: 100,
            via: Via::Http,
            connections: 4,
            drops: Drops::default(),
            events_check: false,
            events_shards: 1,
            start_at: None,
            jwt_secret: None,
        }
    }
}

impl Config {
    /// The hard deadline used when [`Config::deadline`] is `None`:
    /// twice the ramp time + run time + grace + 30 s.
    pub fn effective_deadline(&self) -> Duration {
        self.deadline.unwrap_or_else(|| {
            let ramp = self.users as f64 / self.hatch_rate.max(0.001);
            Duration::from_secs_f64(ramp * 2.0)
                + self.run_time
                + self.grace
                + Duration::from_secs(30)
        })
    }
}

/// Runs `scenario` and returns its report. Always returns by the hard deadline
/// ([`Config::effective_deadline`]); past it the run is an error.
pub async fn run(scenario: Scenario, cfg: &Config) -> Result<Report> {
    if cfg.nodes.is_empty() && scenario != Scenario::SchedNoise {
        bail!("no node URL given");
    }
    if cfg.users == 0 {
        bail!("--users must be at least 1");
    }
    if cfg.hatch_rate.is_nan() || cfg.hatch_rate <= 0.0 {
        bail!("--hatch-rate must be positive");
    }
    if let Some(r) = cfg.rate
        && (r.is_nan() || r <= 0.0)
    {
        bail!("--rate must be positive");
    }
    if cfg.frames_per_write == 0 {
        bail!("--frames-per-write must be at least 1");
    }
    if let Some(secret) = &cfg.jwt_secret {
        token::check_secret(secret)?;
    }
    let deadline = cfg.effective_deadline();
    let started = Instant::now();
    let started_at = report::utc_now();
    let hard = started + deadline;
    let mut notes = Vec::new();
    let fds = match scenario {
        Scenario::Churn => cfg.users + cfg.max_cycles_in_flight,
        Scenario::DmMulti => cfg.users * cfg.nodes.len(),
        Scenario::RoomChurn => cfg.users + cfg.churners,
        _ => cfg.users,
    };
    if let Some(n) = raise_nofile(fds as u64 + 256) {
        notes.push(n);
    }
    let tl = Arc::new(Timeline::new(deadline));
    // Seconds in which no connection opens or closes still show how many are held.
    let sampler = tokio::spawn({
        let tl = tl.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                tl.sample_connections();
            }
        }
    });
    let fut = async {
        match scenario {
            Scenario::DmCross => dm::run(cfg, dm::Shape::Cross, hard, &tl).await,
            Scenario::DmLocal => dm::run(cfg, dm::Shape::Local, hard, &tl).await,
            Scenario::DmMulti => dm::run(cfg, dm::Shape::Multi, hard, &tl).await,
            Scenario::IdleConnections => idle::run(cfg, hard, &tl).await,
            Scenario::Churn => churn::run(cfg, hard, &tl).await,
            Scenario::SchedNoise => noise::run(cfg).await,
            Scenario::Slowloris => slowloris::run(cfg, hard).await,
            Scenario::RoomFanout => room::run(cfg, false, hard, &tl).await,
            Scenario::RoomChurn => room::run(cfg, true, hard, &tl).await,
            Scenario::ApiPublish => api_publish::run(cfg, hard, &tl).await,
            Scenario::Drops => drops::run(cfg, hard, &tl).await,
        }
    };
    let outcome = tokio::time::timeout(deadline, fut).await;
    sampler.abort();
    let mut report = match outcome {
        Ok(r) => r?,
        Err(_) => bail!("hard deadline of {:.0}s exceeded", deadline.as_secs_f64()),
    };
    report.scenario = scenario.name().to_owned();
    report.nodes = cfg.nodes.clone();
    report.run_time_secs = cfg.run_time.as_secs_f64();
    report.hatch_rate = cfg.hatch_rate;
    report.grace_secs = cfg.grace.as_secs_f64();
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.started_at = started_at;
    report.machine = timeline::Machine::read();
    if scenario != Scenario::SchedNoise {
        let (seconds, all) = tl.finish();
        report.timeline = seconds;
        report.latency_histogram = timeline::buckets(&all);
        report.timeline_latency = match scenario {
            Scenario::IdleConnections => "connect",
            _ => "send → receive",
        }
        .to_owned();
    }
    report.notes.splice(0..0, notes);
    report.finish();
    Ok(report)
}

/// Raises RLIMIT_NOFILE as far as possible (soft to hard; the hard limit too
/// when privileged) and returns a warning if it stays below `needed`.
pub fn raise_nofile(needed: u64) -> Option<String> {
    use rlimit::Resource;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let (soft, _) = Resource::NOFILE.get().unwrap_or((0, 0));
    if soft >= needed {
        return None;
    }
    // Privileged processes may raise the hard limit too.
    let _ = Resource::NOFILE.set(needed, needed);
    let (soft, hard) = Resource::NOFILE.get().unwrap_or((0, 0));
    if soft >= needed {
        return None;
    }
    let msg = format!(
        "open-file limit is {soft} (hard {hard}) but about {needed} are needed; \
         raise it (e.g. `ulimit -n {needed}` as root) or expect connect failures (io Other / EMFILE)"
    );
    eprintln!("warning: {msg}");
    Some(msg)
}

/// What to connect for one simulated user.
pub(crate) struct ConnSpec {
    pub(crate) target: Arc<Target>,
    pub(crate) source: Option<IpAddr>,
    pub(crate) id: String,
    /// Mints the user's token (`--jwt-secret`).
    pub(crate) auth: Option<Arc<Minter>>,
}

/// Result of the connect phase.
pub(crate) struct Hatched {
    pub(crate) stats: ConnectStats,
    pub(crate) connected: Vec<bool>,
}

/// Resolves all node URLs.
pub(crate) async fn resolve_nodes(cfg: &Config) -> Result<Vec<Arc<Target>>> {
    let mut out = Vec::new();
    for n in &cfg.nodes {
        out.push(Arc::new(Target::resolve(n).await?));
    }
    Ok(out)
}

/// Number of source addresses to use for `n` connections.
pub(crate) fn source_count(cfg: &Config, n: usize) -> usize {
    cfg.source_addrs.unwrap_or(n.div_ceil(25_000)).max(1)
}

/// Connects `specs` at the hatch rate. Each connection runs in its own task
/// (in `tasks`): it connects, reports, then runs `body(index, ws)`.
///
/// Each connection counts as open in `tl` until its body returns; with `connect_latency`, its
/// connect time is the timeline's latency sample (idle-connections has no messages).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn hatch<F, Fut>(
    cfg: &Config,
    specs: Vec<ConnSpec>,
    read_buf: usize,
    tasks: &mut JoinSet<()>,
    hard: Instant,
    tl: &Arc<Timeline>,
    connect_latency: bool,
    body: F,
) -> Hatched
where
    F: Fn(usize, Ws) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let n = specs.len();
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<Duration, String>)>();
    let start = Instant::now();
    // Leave time at the end of the hard deadline for the rest of the run.
    let connect_deadline = hard - (hard - start) / 4;
    let interval = 1.0 / cfg.hatch_rate;
    let timeout = cfg.connect_timeout;
    let mut spawned = 0;
    for (i, spec) in specs.into_iter().enumerate() {
        let due = start + Duration::from_secs_f64(interval * i as f64);
        if due > connect_deadline {
            break;
        }
        tokio::time::sleep_until(due).await;
        let tx = tx.clone();
        let body = body.clone();
        let tl = tl.clone();
        spawned += 1;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let auth = spec.auth.as_deref();
            match conn::connect(&spec.target, &spec.id, auth, spec.source, read_buf, timeout).await
            {
                Ok(ws) => {
                    let took = t0.elapsed();
                    let _open = tl.opened();
                    if connect_latency {
                        tl.delivered(i, took.as_micros() as u64);
                    }
                    let _ = tx.send((i, Ok(took)));
                    body(i, ws).await;
                }
                Err(e) => {
                    tl.error();
                    let _ = tx.send((i, Err(e)));
                }
            }
        });
    }
    drop(tx);
    let mut stats = ConnectStats {
        attempted: n as u64,
        ..ConnectStats::default()
    };
    let mut connected = vec![false; n];
    let mut hist = report::new_hist();
    let mut got = 0;
    while got < spawned {
        match tokio::time::timeout_at(connect_deadline, rx.recv()).await {
            Ok(Some((i, r))) => {
                got += 1;
                match r {
                    Ok(d) => {
                        connected[i] = true;
                        stats.connected += 1;
                        hist.saturating_record((d.as_micros() as u64).max(1));
                    }
                    Err(kind) => {
                        *stats.failures.entry(kind).or_default() += 1;
                    }
                }
            }
            _ => break,
        }
    }
    let missing = n - got;
    if missing > 0 {
        *stats
            .failures
            .entry("not connected by deadline".to_owned())
            .or_default() += missing as u64;
    }
    stats.failed = n as u64 - stats.connected;
    stats.secs = start.elapsed().as_secs_f64();
    stats.per_sec = stats.connected as f64 / stats.secs.max(1e-9);
    stats.latency_us = Latency::from_hist(&hist);
    Hatched { stats, connected }
}

/// Waits for all tasks up to `limit`, then aborts the rest.
pub(crate) async fn join_all(tasks: &mut JoinSet<()>, limit: Duration) {
    let _ = tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Nanoseconds since `epoch`.
pub(crate) fn ns_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}
