//! room-fanout / room-churn: messages into rooms whose members are spread over the nodes.
//!
//! `--users` members are laid out room by room (`--rooms` rooms of `ceil(users / rooms)`
//! members), and member `i` connects to node `i % nodes`, so every room has members on
//! every node. Each member joins its room, then sends room messages, open loop (`--rate`
//! room messages per second in total, from the members in turn, interleaved across rooms)
//! or closed loop (`--in-flight` messages per member, a message done when every other
//! member has it). The text carries sender, sequence number and send time, as in dm-*, so
//! every receipt is checked per (sender, receiver) pair: lost, duplicated, out of order,
//! latency from the (intended) send time. A *delivery* is one (room message, receiver) pair:
//! the report's `messages` counts deliveries, `rooms` counts room messages.
//!
//! room-churn adds `--churners` users that join a random room, stay a moment, leave, at
//! `--join-rate` cycles per second in total, while the members' messages flow. The server
//! takes a session out of the room before it answers `left`, and one session's frames are
//! ordered, so any room message a churner receives after its `left` (and before its next
//! `join`) is a violation. The members, who stay, must still get every message.
//!
//! With `--redis` the sending phase's Redis calls are counted from `INFO commandstats`:
//! room-fanout fails unless it made exactly one `XADD` per room message and other node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Ws};
use crate::report::{ConnectStats, Counts, Latency, MessageStats, Report, ShardedHist};
use crate::servers::Probe;
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

/// Most room messages a member writes before it reads again (more, if `--frames-per-write`
/// is larger).
const MAX_BATCH: u32 = 64;

/// A churner stays in a room for a time drawn uniformly from zero to twice this.
const DWELL: Duration = Duration::from_millis(100);

/// How long to wait, after every member joined, for the presence events of those joins to
/// arrive (so that they do not queue before the first measured messages).
const SETTLE: Duration = Duration::from_secs(5);

/// Room-scenario statistics (the deliveries themselves are in the report's `messages`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomStats {
    /// Rooms.
    pub rooms: u64,
    /// Members per room (the last room may have fewer).
    pub members_per_room: u64,
    /// Members that joined their room.
    pub joined: u64,
    /// Join → `joined` of the members, µs.
    pub join_latency_us: Latency,
    /// Room messages written to the sockets.
    pub room_messages: u64,
    /// Room messages per second of sending phase.
    pub room_messages_per_sec: f64,
    /// Presence `join` events the members received (the joins of the others).
    pub presence_events: u64,
    /// Room messages that reached a session that should not get them: its own message, a
    /// room it is not in, or an unknown sender.
    pub misrouted: u64,
    /// room-churn: the join/leave cycles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<RoomChurnStats>,
    /// With `--redis`: what the sending phase (and drain) cost Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisCost>,
}

/// room-churn: users joining and leaving while messages flow.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoomChurnStats {
    /// Users doing the cycles.
    pub churners: u64,
    /// Cycles (join, stay, leave) started.
    pub started: u64,
    /// Cycles that got `left`.
    pub completed: u64,
    /// Cycles not started because every churner was busy.
    pub skipped: u64,
    /// Join sent → `joined`, µs.
    pub join_latency_us: Latency,
    /// Leave sent → `left`, µs.
    pub leave_latency_us: Latency,
    /// Room messages the churners received while in a room.
    pub deliveries: u64,
    /// Of those, older than one already received from the same sender (duplicated or
    /// reordered; a churner misses messages while out, so it cannot tell which).
    pub stale: u64,
    /// Room messages received after `left` (or before any `join`): must be 0.
    pub after_left: u64,
    /// Error frames and broken cycles, by kind.
    pub failures: BTreeMap<String, u64>,
}

/// Redis commands of the sending phase, from `INFO commandstats` before and after.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisCost {
    /// Calls per command.
    pub calls: BTreeMap<String, u64>,
    /// Calls per command per room message.
    pub per_room_message: BTreeMap<String, f64>,
    /// `XADD`s per room message.
    pub xadd_per_room_message: f64,
    /// What the design promises per room message at most: one per other node with members
    /// (with every room on every node: nodes − 1), fewer when a bus batch packs several
    /// messages for a node into one entry.
    pub xadd_expected: f64,
    /// The same, in calls for all the room messages sent.
    pub xadd_expected_calls: u64,
}

impl RoomStats {
    /// Adds this run's failures to `problems`.
    pub(crate) fn problems(&self, scenario: &str, problems: &mut Vec<String>) {
        if self.misrouted > 0 {
            problems.push(format!("{} room messages misrouted", self.misrouted));
        }
        if let Some(c) = &self.churn {
            if c.after_left > 0 {
                problems.push(format!(
                    "{} room messages received after `left`",
                    c.after_left
                ));
            }
            if c.stale > 0 {
                problems.push(format!(
                    "{} room messages to churners duplicated or reordered",
                    c.stale
                ));
            }
            let failed: u64 = c.failures.values().sum();
            if failed > 0 {
                problems.push(format!("{failed} churn cycles failed: {:?}", c.failures));
            }
            if c.completed == 0 {
                problems.push("no join/leave cycle completed".to_owned());
            }
        }
        // Joins and leaves send presence events (one entry per other node too), so the
        // count is exact only without churn.
        if let Some(r) = &self.redis
            && scenario == "room-fanout"
        {
            // What one bus batch sends one node shares an entry: at most one per message.
            let got = r.calls.get("xadd").copied().unwrap_or(0);
            if got > r.xadd_expected_calls || (got == 0 && self.room_messages > 0) {
                problems.push(format!(
                    "{got} XADDs for {} room messages: {:.3} per message, expected at most {}",
                    self.room_messages, r.xadd_per_room_message, r.xadd_expected
                ));
            }
        }
    }

    /// Appends the human-readable section.
    pub(crate) fn write_human(&self, w: &mut String) {
        let _ = writeln!(w, "\n-- rooms");
        let _ = writeln!(
            w,
            "  rooms {}   members/room {}   joined {}   room messages {} ({:.0}/s)   presence events {}   misrouted {}",
            self.rooms,
            self.members_per_room,
            self.joined,
            self.room_messages,
            self.room_messages_per_sec,
            self.presence_events,
            self.misrouted
        );
        crate::report::lat_header(w, "  ");
        crate::report::lat_row(w, "  join", &self.join_latency_us);
        if let Some(c) = &self.churn {
            let _ = writeln!(
                w,
                "  churners {}   cycles started {}   completed {}   skipped {}   received {}   stale {}   after left {}",
                c.churners, c.started, c.completed, c.skipped, c.deliveries, c.stale, c.after_left
            );
            crate::report::lat_row(w, "  churn join", &c.join_latency_us);
            crate::report::lat_row(w, "  churn leave", &c.leave_latency_us);
            for (k, v) in &c.failures {
                let _ = writeln!(w, "  failure {k:<40} {v:>10}");
            }
        }
        if let Some(r) = &self.redis {
            let _ = write!(
                w,
                "  Redis per room message: XADD {:.3} (at most {})",
                r.xadd_per_room_message, r.xadd_expected
            );
            for (k, v) in &r.per_room_message {
                if k != "xadd" && *v >= 0.001 {
                    let _ = write!(w, "   {k} {v:.3}");
                }
            }
            let _ = writeln!(w);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Joining,
    Sending(Instant),
    Draining,
    Stop,
}

/// Who sends when, fixed once every member has joined.
struct Plan {
    /// Per room: members that joined, less one (the receivers of each message).
    receivers: Vec<u32>,
    /// Per room: nodes with members, less one (the inbox entries of each message).
    other_nodes: Vec<u32>,
    /// Position of each member in the open-loop send order.
    slot: Vec<u32>,
    /// Member of each slot (the pacer's order: rooms interleaved).
    by_slot: Vec<u32>,
    /// Members in the send order.
    live: u32,
}

struct Shared {
    epoch: Instant,
    /// Per-second counts for the HTML report.
    tl: Arc<Timeline>,
    ids: Vec<String>,
    room_ids: Vec<String>,
    /// Room of each member, and its position in the room.
    room_of: Vec<u32>,
    pos: Vec<u32>,
    /// Members of each room.
    room_len: Vec<u32>,
    /// Members per room (the last room may have fewer).
    per_room: usize,
    /// Nodes; member `i` is on node `i % nodes`.
    nodes: usize,
    /// Random prefix of this run's user and room ids.
    prefix: String,
    rate: Option<f64>,
    in_flight: u32,
    /// Most frames a member writes at once (`--frames-per-write`).
    frames_per_write: u32,
    plan: OnceLock<Plan>,
    joined: Vec<AtomicBool>,
    joined_count: AtomicU64,
    join_hist: ShardedHist,
    /// Open loop: the pacer thread wakes a member when its next send is due.
    wake: Vec<Notify>,
    /// Closed loop: free in-flight slots per member.
    permits: Vec<Semaphore>,
    /// Closed loop: receipts still owed, per member and in-flight slot (`seq % in_flight`;
    /// receipts of one sender arrive in order, so its messages complete in order).
    owed: Vec<Box<[AtomicU32]>>,
    room_messages: AtomicU64,
    /// `XADD`s the room messages sent should cost: one per other node with members.
    xadd_owed: AtomicU64,
    /// Deliveries owed for the room messages sent.
    expected: AtomicU64,
    delivered: AtomicU64,
    errored: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    misrouted: AtomicU64,
    presence: AtomicU64,
    hist: ShardedHist,
    errors: Counts,
    disconnects: Counts,
    churn: Option<ChurnShared>,
}

struct ChurnShared {
    ids: Vec<String>,
    /// One permit per cycle due; an idle churner takes one and starts a cycle.
    tickets: Semaphore,
    started: AtomicU64,
    completed: AtomicU64,
    deliveries: AtomicU64,
    stale: AtomicU64,
    after_left: AtomicU64,
    join_hist: ShardedHist,
    leave_hist: ShardedHist,
    failures: Counts,
}

pub(crate) async fn run(
    cfg: &Config,
    churn: bool,
    hard: Instant,
    tl: &Arc<Timeline>,
) -> Result<Report> {
    let nodes = crate::resolve_nodes(cfg).await?;
    if cfg.users < 2 * cfg.rooms.max(1) {
        bail!("rooms need at least two members each (--users >= 2 × --rooms)");
    }
    if churn && cfg.rate.is_none() {
        bail!("room-churn needs --rate (room messages per second)");
    }
    let join_rate = cfg.join_rate.unwrap_or(50.0);
    if churn && (join_rate.is_nan() || join_rate <= 0.0 || cfg.churners == 0) {
        bail!("room-churn needs a positive --join-rate and --churners");
    }
    let sh = Arc::new(Shared::new(cfg, nodes.len(), churn, tl.clone()));
    let (phase_tx, phase_rx) = watch::channel(Phase::Joining);
    let mut tasks = JoinSet::new();
    let mut notes = Vec::new();

    let k = crate::source_count(cfg, cfg.users.div_ceil(nodes.len()));
    // Every room of the run, members' and churners' alike, is `<prefix>-r<n>`.
    let auth = Minter::for_run(cfg.jwt_secret.as_deref(), vec![format!("{}-r*", sh.prefix)]);
    let specs = (0..cfg.users)
        .map(|i| {
            let node = i % nodes.len();
            ConnSpec {
                target: nodes[node].clone(),
                source: nodes[node].source_addr(i / nodes.len(), k),
                id: sh.ids[i].clone(),
                auth: auth.clone(),
            }
        })
        .collect();
    let body = {
        let (sh, rx) = (sh.clone(), phase_rx.clone());
        move |i: usize, ws: Ws| member(sh.clone(), i as u32, ws, rx.clone())
    };
    let mut probe = Probe::start(&cfg.server_pids);
    let mut connect = crate::hatch(cfg, specs, 16 * 1024, &mut tasks, hard, tl, false, body)
        .await
        .stats;
    let members = connect.connected;
    wait_for_joins(&sh, members, hard).await;
    let plan = Plan::of_joined(&sh);
    notes.extend(wait_for_presence(&sh, &plan).await);
    let live = plan.live;
    let _ = sh.plan.set(plan);
    let churners = match &sh.churn {
        Some(ch) => {
            let specs = (0..ch.ids.len())
                .map(|c| ConnSpec {
                    target: nodes[c % nodes.len()].clone(),
                    source: None,
                    id: ch.ids[c].clone(),
                    auth: auth.clone(),
                })
                .collect();
            let body = {
                let (sh, rx) = (sh.clone(), phase_rx.clone());
                move |c: usize, ws: Ws| churner(sh.clone(), c, ws, rx.clone())
            };
            let h = crate::hatch(cfg, specs, 16 * 1024, &mut tasks, hard, tl, false, body).await;
            merge_connect(&mut connect, h.stats)
        }
        None => 0,
    };

    // Measuring phase.
    let redis_before = redis_calls(cfg, &mut notes).await;
    probe.sending();
    let send_start = Instant::now();
    let _ = phase_tx.send(Phase::Sending(send_start));
    let pacer_stop = Arc::new(AtomicBool::new(false));
    if let Some(rate) = cfg.rate {
        let (sh, stop) = (sh.clone(), pacer_stop.clone());
        std::thread::spawn(move || pacer(&sh, send_start.into_std(), rate, &stop));
    }
    let send_end = (send_start + cfg.run_time).min(hard - cfg.grace - Duration::from_secs(5));
    let skipped = match &sh.churn {
        Some(ch) => pace_churn(ch, send_start, send_end, join_rate, churners).await,
        None => 0,
    };
    tokio::time::sleep_until(send_end).await;
    pacer_stop.store(true, Relaxed);
    let _ = phase_tx.send(Phase::Draining);
    let send_secs = send_start.elapsed().as_secs_f64();
    drain(&sh, cfg.grace).await;
    let servers = probe.finish(sh.delivered.load(Relaxed));
    let redis_after = redis_calls(cfg, &mut notes).await;
    let _ = phase_tx.send(Phase::Stop);
    crate::join_all(&mut tasks, Duration::from_secs(3)).await;

    let redis = match (redis_before, redis_after) {
        (Some(before), Some(after)) => Some(sh.redis_cost(crate::cmdstats::delta(&before, &after))),
        _ => None,
    };
    let mut report = sh.report(cfg, connect, send_secs, churners, skipped, redis);
    report.notes = notes;
    report.servers = servers;
    if u64::from(live) < members {
        report.problems.push(format!(
            "{} of {members} connected members did not join their room",
            members - u64::from(live)
        ));
    }
    Ok(report)
}

/// Adds the churners' connect phase to the members'; returns the churners connected.
fn merge_connect(total: &mut ConnectStats, churners: ConnectStats) -> u64 {
    total.attempted += churners.attempted;
    total.connected += churners.connected;
    total.failed += churners.failed;
    for (k, v) in churners.failures {
        *total.failures.entry(k).or_default() += v;
    }
    churners.connected
}

/// Waits for the `joined` of every connected member (30 s at most).
async fn wait_for_joins(sh: &Shared, members: u64, hard: Instant) {
    let deadline = Instant::now() + Duration::from_secs(30).min(hard - Instant::now());
    while sh.joined_count.load(Relaxed) < members && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the presence events of the members' joins (a room of j members sends
/// j(j − 1)/2), at most [`SETTLE`]; says how many were missing, if any.
async fn wait_for_presence(sh: &Shared, plan: &Plan) -> Option<String> {
    let due: u64 = plan
        .receivers
        .iter()
        .map(|&r| u64::from(r) * u64::from(r + 1) / 2)
        .sum();
    let end = Instant::now() + SETTLE;
    while sh.presence.load(Relaxed) < due && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = sh.presence.load(Relaxed);
    (got < due)
        .then(|| format!("{got} of {due} presence events of the joins arrived before sending"))
}

/// Hands out one join/leave ticket per 1 / `rate` s until `end` (a ticket is skipped when
/// every churner is busy already); returns the tickets skipped.
async fn pace_churn(
    ch: &ChurnShared,
    start: Instant,
    end: Instant,
    rate: f64,
    churners: u64,
) -> u64 {
    let mut skipped = 0;
    for k in 0u64.. {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        if ch.tickets.available_permits() as u64 >= churners {
            skipped += 1;
        } else {
            ch.tickets.add_permits(1);
        }
    }
    skipped
}

/// Waits until every owed delivery arrived, or `grace` ends.
async fn drain(sh: &Shared, grace: Duration) {
    let end = Instant::now() + grace;
    // Let the members see the phase change before `expected` is read.
    tokio::time::sleep(Duration::from_millis(20)).await;
    while Instant::now() < end {
        let done = sh.delivered.load(Relaxed) + sh.errored.load(Relaxed);
        if done >= sh.expected.load(Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Redis's calls per command so far, when `--redis` is given and readable.
async fn redis_calls(cfg: &Config, notes: &mut Vec<String>) -> Option<BTreeMap<String, u64>> {
    if cfg.redis.is_empty() {
        return None;
    }
    crate::cmdstats::snapshot(&cfg.redis)
        .await
        .map_err(|e| notes.push(format!("Redis commandstats not read: {e:#}")))
        .ok()
}

impl Plan {
    /// The plan for the members that joined.
    fn of_joined(sh: &Shared) -> Self {
        let rooms = sh.room_ids.len();
        let mut receivers = vec![0u32; rooms];
        let mut on_node = vec![vec![false; sh.nodes]; rooms];
        let mut joined = Vec::new();
        for (i, j) in sh.joined.iter().enumerate() {
            if j.load(Relaxed) {
                let r = sh.room_of[i] as usize;
                receivers[r] += 1;
                on_node[r][i % sh.nodes] = true;
                joined.push(i);
            }
        }
        for r in &mut receivers {
            *r = r.saturating_sub(1);
        }
        // Interleave the rooms in the send order: one member of each room in turn.
        joined.sort_by_key(|&i| (sh.pos[i], sh.room_of[i]));
        let mut slot = vec![0u32; sh.ids.len()];
        for (s, &i) in joined.iter().enumerate() {
            slot[i] = s as u32;
        }
        Self {
            receivers,
            other_nodes: on_node
                .iter()
                .map(|n| (n.iter().filter(|&&b| b).count() as u32).saturating_sub(1))
                .collect(),
            slot,
            live: joined.len() as u32,
            by_slot: joined.into_iter().map(|i| i as u32).collect(),
        }
    }
}

impl Shared {
    fn new(cfg: &Config, nodes: usize, churn: bool, tl: Arc<Timeline>) -> Self {
        let n = cfg.users;
        let per_room = n.div_ceil(cfg.rooms.max(1));
        let rooms = n.div_ceil(per_room);
        let prefix = conn::run_prefix();
        let in_flight = cfg.in_flight.max(1);
        Self {
            epoch: Instant::now(),
            tl,
            ids: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            room_ids: (0..rooms).map(|r| format!("{prefix}-r{r}")).collect(),
            room_of: (0..n).map(|i| (i / per_room) as u32).collect(),
            pos: (0..n).map(|i| (i % per_room) as u32).collect(),
            room_len: (0..rooms)
                .map(|r| (n - r * per_room).min(per_room) as u32)
                .collect(),
            per_room,
            nodes,
            rate: cfg.rate,
            in_flight,
            frames_per_write: cfg.frames_per_write.max(1),
            plan: OnceLock::new(),
            joined: (0..n).map(|_| AtomicBool::new(false)).collect(),
            joined_count: AtomicU64::new(0),
            join_hist: ShardedHist::new(16),
            wake: (0..n).map(|_| Notify::new()).collect(),
            permits: (0..n).map(|_| Semaphore::new(in_flight as usize)).collect(),
            owed: (0..n)
                .map(|_| (0..in_flight).map(|_| AtomicU32::new(0)).collect())
                .collect(),
            room_messages: AtomicU64::new(0),
            xadd_owed: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errored: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            presence: AtomicU64::new(0),
            hist: ShardedHist::new(64),
            errors: Counts::default(),
            disconnects: Counts::default(),
            churn: churn.then(|| ChurnShared {
                ids: (0..cfg.churners)
                    .map(|c| format!("{prefix}-c{c}"))
                    .collect(),
                tickets: Semaphore::new(0),
                started: AtomicU64::new(0),
                completed: AtomicU64::new(0),
                deliveries: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                after_left: AtomicU64::new(0),
                join_hist: ShardedHist::new(8),
                leave_hist: ShardedHist::new(8),
                failures: Counts::default(),
            }),
            prefix,
        }
    }

    /// The sending phase's Redis calls against what the room messages sent should cost.
    fn redis_cost(&self, calls: BTreeMap<String, u64>) -> RedisCost {
        let msgs = self.room_messages.load(Relaxed).max(1) as f64;
        let xadd_expected_calls = self.xadd_owed.load(Relaxed);
        RedisCost {
            per_room_message: calls
                .iter()
                .map(|(k, &v)| (k.clone(), v as f64 / msgs))
                .collect(),
            xadd_per_room_message: calls.get("xadd").copied().unwrap_or(0) as f64 / msgs,
            xadd_expected: xadd_expected_calls as f64 / msgs,
            xadd_expected_calls,
            calls,
        }
    }

    fn report(
        &self,
        cfg: &Config,
        connect: ConnectStats,
        send_secs: f64,
        churners: u64,
        skipped: u64,
        redis: Option<RedisCost>,
    ) -> Report {
        let room_messages = self.room_messages.load(Relaxed);
        let expected = self.expected.load(Relaxed);
        let delivered = self.delivered.load(Relaxed);
        let errored = self.errored.load(Relaxed);
        let closed_loop = cfg.rate.is_none();
        Report {
            mode: if closed_loop {
                "closed-loop"
            } else {
                "open-loop"
            }
            .to_owned(),
            run_prefix: self.prefix.clone(),
            users: cfg.users as u64,
            target_rate: cfg.rate,
            in_flight: closed_loop.then_some(self.in_flight),
            frames_per_write: Some(self.frames_per_write),
            connect,
            messages: Some(MessageStats {
                sent: expected,
                delivered,
                errored,
                lost: expected.saturating_sub(delivered + errored),
                duplicated: self.duplicated.load(Relaxed),
                out_of_order: self.out_of_order.load(Relaxed),
                send_secs,
                sent_per_sec: expected as f64 / send_secs,
                delivered_per_sec: delivered as f64 / send_secs,
                latency_us: Latency::from_hist(&self.hist.merged()),
            }),
            rooms: Some(RoomStats {
                rooms: self.room_ids.len() as u64,
                members_per_room: self.per_room as u64,
                joined: self.plan.get().map_or(0, |p| u64::from(p.live)),
                join_latency_us: Latency::from_hist(&self.join_hist.merged()),
                room_messages,
                room_messages_per_sec: room_messages as f64 / send_secs,
                presence_events: self.presence.load(Relaxed),
                misrouted: self.misrouted.load(Relaxed),
                churn: self.churn.as_ref().map(|ch| RoomChurnStats {
                    churners,
                    started: ch.started.load(Relaxed),
                    completed: ch.completed.load(Relaxed),
                    skipped,
                    join_latency_us: Latency::from_hist(&ch.join_hist.merged()),
                    leave_latency_us: Latency::from_hist(&ch.leave_hist.merged()),
                    deliveries: ch.deliveries.load(Relaxed),
                    stale: ch.stale.load(Relaxed),
                    after_left: ch.after_left.load(Relaxed),
                    failures: ch.failures.take(),
                }),
                redis,
            }),
            error_frames: self.errors.take(),
            disconnects: self.disconnects.take(),
            ..Report::default()
        }
    }
}

/// A server frame, as much of it as the room scenarios read.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    action: &'a str,
    #[serde(borrow, default)]
    data: Option<FrameData<'a>>,
}

#[derive(Deserialize, Default)]
struct FrameData<'a> {
    #[serde(borrow, default)]
    room: Option<&'a str>,
    #[serde(borrow, default)]
    text: Option<&'a str>,
    #[serde(borrow, default)]
    error: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<&'a str>,
}

enum In<'a> {
    RoomMessage { room: &'a str, text: &'a str },
    Joined(&'a str),
    Left(&'a str),
    Presence,
    Error(String),
    Other,
}

/// Room ids and message texts are plain ASCII without escapes, so they borrow from the frame.
fn parse(frame: &str) -> In<'_> {
    let Ok(f) = serde_json::from_str::<Frame<'_>>(frame) else {
        return In::Other;
    };
    let d = f.data.unwrap_or_default();
    match (f.action, d.room) {
        ("room_message", Some(room)) => match d.text {
            Some(text) => In::RoomMessage { room, text },
            None => In::Other,
        },
        ("joined", Some(room)) => In::Joined(room),
        ("left", Some(room)) => In::Left(room),
        // Joins only: leave events of members that finish first arrive at shutdown.
        ("presence", _) if d.event == Some("join") => In::Presence,
        ("error", _) => {
            In::Error(conn::error_key(d.error.as_deref().unwrap_or("(no error text)")).into_owned())
        }
        _ => In::Other,
    }
}

/// Appends a frame `{"action":ACTION,"data":{"room":ROOM}}`.
fn encode_room_op(buf: &mut String, action: &str, room: &str) {
    buf.clear();
    let _ = write!(buf, r#"{{"action":"{action}","data":{{"room":"{room}"}}}}"#);
}

/// Appends a `room_message` frame whose text is `header` padded with `.` to
/// [`conn::TEXT_LEN`] bytes (plain ASCII, as in dm-*).
pub(crate) fn encode_room_message(buf: &mut String, room: &str, header: std::fmt::Arguments<'_>) {
    buf.clear();
    buf.push_str(r#"{"action":"room_message","data":{"room":""#);
    buf.push_str(room);
    buf.push_str(r#"","text":""#);
    let start = buf.len();
    let _ = buf.write_fmt(header);
    for _ in buf.len() - start..conn::TEXT_LEN {
        buf.push('.');
    }
    buf.push_str(r#""}}"#);
}

/// Receive-side sequence tracking of one sender→receiver pair.
#[derive(Default)]
struct RxPair {
    next: u64,
    missing: BTreeSet<u64>,
}

/// Gaps larger than this are not tracked seq by seq (they would be loss anyway).
const MAX_GAP: u64 = 100_000;

enum Seen {
    New,
    Late,
    Again,
}

impl RxPair {
    fn see(&mut self, seq: u64) -> Seen {
        if seq >= self.next {
            if seq - self.next <= MAX_GAP {
                self.missing.extend(self.next..seq);
            }
            self.next = seq + 1;
            Seen::New
        } else if self.missing.remove(&seq) {
            Seen::Late
        } else {
            Seen::Again
        }
    }
}

enum Ev {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Phase(bool),
    Send,
}

/// A member: joins its room, sends when its turn comes (or a slot frees), checks receipts.
async fn member(sh: Arc<Shared>, me: u32, mut ws: Ws, mut phase_rx: watch::Receiver<Phase>) {
    let room = sh.room_of[me as usize] as usize;
    let room_id = sh.room_ids[room].as_str();
    let mut buf = String::with_capacity(192);
    encode_room_op(&mut buf, "join", room_id);
    let join_sent = Instant::now();
    if let Err(e) = ws.send(Message::text(buf.as_str())).await {
        sh.disconnects
            .add(&format!("send {}", conn::ws_error_kind(&e)));
        return;
    }
    let mut rx: Vec<RxPair> = (0..sh.room_len[room]).map(|_| RxPair::default()).collect();
    let mut phase = Phase::Joining;
    let mut sending = false;
    let mut seq = 0u64;
    let open = sh.rate.is_some();
    // Open loop: this member's sends are global sends j = slot + m × live.
    let (mut start, mut j, mut step, rate) = (Instant::now(), 0u64, 1u64, sh.rate.unwrap_or(1.0));
    let my_wake = &sh.wake[me as usize];
    let my_permits = &sh.permits[me as usize];
    loop {
        let ev = tokio::select! {
            biased;
            f = ws.next() => Ev::Frame(f),
            r = phase_rx.changed() => Ev::Phase(r.is_ok()),
            () = my_wake.notified(), if sending && open => Ev::Send,
            Ok(p) = my_permits.acquire(), if sending && !open => { p.forget(); Ev::Send }
        };
        match ev {
            Ev::Phase(alive) => {
                if !alive {
                    break;
                }
                phase = *phase_rx.borrow_and_update();
                match phase {
                    Phase::Sending(s) => {
                        let plan = sh.plan.get().expect("plan is set before sending");
                        sending = sh.joined[me as usize].load(Relaxed) && plan.receivers[room] > 0;
                        start = s;
                        j = u64::from(plan.slot[me as usize]);
                        step = u64::from(plan.live.max(1));
                    }
                    Phase::Draining | Phase::Joining => sending = false,
                    Phase::Stop => break,
                }
            }
            Ev::Send => {
                let plan = sh.plan.get().expect("plan is set before sending");
                let receivers = plan.receivers[room];
                let other_nodes = u64::from(plan.other_nodes[room]);
                let now = Instant::now();
                let mut batch = 0;
                // Frames fed since the last flush, and a flush that failed.
                let mut unflushed = 0;
                let mut broken = None;
                let max_batch = MAX_BATCH.max(sh.frames_per_write);
                loop {
                    let due = start + Duration::from_secs_f64(j as f64 / rate);
                    if open && due > now {
                        break;
                    }
                    let send_ns = if open {
                        due.duration_since(sh.epoch).as_nanos() as u64
                    } else {
                        sh.owed[me as usize][(seq % u64::from(sh.in_flight)) as usize]
                            .store(receivers, Relaxed);
                        crate::ns_since(sh.epoch)
                    };
                    encode_room_message(&mut buf, room_id, format_args!("{me}:{seq}:{send_ns}:"));
                    seq += 1;
                    if ws.feed(Message::text(buf.as_str())).await.is_err() {
                        break;
                    }
                    sh.room_messages.fetch_add(1, Relaxed);
                    sh.expected.fetch_add(u64::from(receivers), Relaxed);
                    sh.tl.sent_n(u64::from(receivers));
                    sh.xadd_owed.fetch_add(other_nodes, Relaxed);
                    batch += 1;
                    unflushed += 1;
                    if open {
                        j += step;
                    }
                    if unflushed >= sh.frames_per_write {
                        unflushed = 0;
                        if let Err(e) = ws.flush().await {
                            broken = Some(e);
                            break;
                        }
                    }
                    if batch >= max_batch {
                        break;
                    }
                    if !open {
                        match my_permits.try_acquire() {
                            Ok(p) => p.forget(),
                            Err(_) => break,
                        }
                    }
                }
                if open && batch >= max_batch {
                    my_wake.notify_one();
                }
                if broken.is_none()
                    && unflushed > 0
                    && let Err(e) = ws.flush().await
                {
                    broken = Some(e);
                }
                if let Some(e) = broken {
                    sh.disconnects
                        .add(&format!("send {}", conn::ws_error_kind(&e)));
                    break;
                }
            }
            Ev::Frame(None) => {
                sh.disconnects.add("eof");
                break;
            }
            Ev::Frame(Some(Err(e))) => {
                sh.disconnects.add(&conn::ws_error_kind(&e));
                break;
            }
            Ev::Frame(Some(Ok(Message::Text(t)))) => match parse(t.as_str()) {
                In::RoomMessage { room: r, text } => {
                    on_room_message(&sh, me, room, r, text, &mut rx);
                }
                In::Presence => {
                    sh.presence.fetch_add(1, Relaxed);
                }
                In::Joined(r) if r == room_id && phase == Phase::Joining => {
                    sh.join_hist
                        .record(me as usize, join_sent.elapsed().as_micros() as u64);
                    sh.joined[me as usize].store(true, Relaxed);
                    sh.joined_count.fetch_add(1, Relaxed);
                }
                In::Error(e) => {
                    sh.errors.add(&e);
                    if phase != Phase::Joining {
                        sh.errored.fetch_add(1, Relaxed);
                    }
                }
                In::Joined(_) | In::Left(_) | In::Other => {}
            },
            Ev::Frame(Some(Ok(Message::Close(f)))) => {
                if phase != Phase::Stop {
                    sh.disconnects.add(&conn::close_kind(f.as_ref()));
                }
                break;
            }
            Ev::Frame(Some(Ok(_))) => {}
        }
    }
    if *phase_rx.borrow() == Phase::Stop || phase == Phase::Stop {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}

/// A member's receipt of a room message in `in_room` (its room, `room`).
fn on_room_message(
    sh: &Shared,
    me: u32,
    room: usize,
    in_room: &str,
    text: &str,
    rx: &mut [RxPair],
) {
    let now_ns = crate::ns_since(sh.epoch);
    let Some((from, seq, send_ns)) = conn::decode_text(text) else {
        sh.errors.add("unparsable room message text");
        return;
    };
    let from = from as usize;
    if from >= sh.ids.len()
        || from == me as usize
        || sh.room_of[from] as usize != room
        || in_room != sh.room_ids[room]
    {
        sh.misrouted.fetch_add(1, Relaxed);
        return;
    }
    match rx[sh.pos[from] as usize].see(seq) {
        Seen::Again => {
            sh.duplicated.fetch_add(1, Relaxed);
            return;
        }
        Seen::Late => {
            sh.out_of_order.fetch_add(1, Relaxed);
        }
        Seen::New => {}
    }
    sh.delivered.fetch_add(1, Relaxed);
    let latency_us = now_ns.saturating_sub(send_ns) / 1000;
    sh.hist.record(me as usize, latency_us);
    sh.tl.delivered(me as usize, latency_us);
    if sh.rate.is_none() {
        let slot = &sh.owed[from][(seq % u64::from(sh.in_flight)) as usize];
        if slot.fetch_sub(1, Relaxed) == 1 {
            sh.permits[from].add_permits(1);
        }
    }
}

/// Where a churner is.
#[derive(Clone, Copy, PartialEq)]
enum Where {
    /// In no room (after `left`, or before the first join).
    Out,
    Joining(usize, Instant),
    In(usize, Instant),
    Leaving(usize, Instant),
}

/// A churner: waits for a ticket, joins a random room, stays, leaves; checks that nothing of
/// the room arrives after `left`.
async fn churner(sh: Arc<Shared>, c: usize, mut ws: Ws, mut phase_rx: watch::Receiver<Phase>) {
    let ch = sh.churn.as_ref().expect("churners only run in room-churn");
    let mut rng = fastrand::Rng::new();
    let mut buf = String::with_capacity(128);
    // Next sequence number expected from each member (a churner misses what is sent while
    // it is out, so only going backwards is an error).
    let mut next = vec![0u64; sh.ids.len()];
    let mut at = Where::Out;
    let mut sending = false;
    let mut phase = Phase::Joining;
    loop {
        let dwell_end = match at {
            Where::In(_, t) => t,
            _ => Instant::now() + Duration::from_secs(3600),
        };
        let op = tokio::select! {
            biased;
            f = ws.next() => Ev::Frame(f),
            r = phase_rx.changed() => Ev::Phase(r.is_ok()),
            Ok(p) = ch.tickets.acquire(), if sending && at == Where::Out => {
                p.forget();
                let r = rng.usize(..sh.room_ids.len());
                encode_room_op(&mut buf, "join", &sh.room_ids[r]);
                at = Where::Joining(r, Instant::now());
                ch.started.fetch_add(1, Relaxed);
                Ev::Send
            }
            () = tokio::time::sleep_until(dwell_end), if matches!(at, Where::In(..)) => {
                let Where::In(r, _) = at else { unreachable!("guarded") };
                encode_room_op(&mut buf, "leave", &sh.room_ids[r]);
                at = Where::Leaving(r, Instant::now());
                Ev::Send
            }
        };
        match op {
            Ev::Send => {
                if let Err(e) = ws.send(Message::text(buf.as_str())).await {
                    sh.disconnects
                        .add(&format!("send {}", conn::ws_error_kind(&e)));
                    break;
                }
            }
            Ev::Phase(alive) => {
                if !alive {
                    break;
                }
                phase = *phase_rx.borrow_and_update();
                match phase {
                    Phase::Sending(_) => sending = true,
                    Phase::Joining | Phase::Draining => sending = false,
                    Phase::Stop => break,
                }
            }
            Ev::Frame(None) => {
                sh.disconnects.add("eof");
                break;
            }
            Ev::Frame(Some(Err(e))) => {
                sh.disconnects.add(&conn::ws_error_kind(&e));
                break;
            }
            Ev::Frame(Some(Ok(Message::Text(t)))) => match parse(t.as_str()) {
                In::RoomMessage { room, text } => {
                    let current = match at {
                        Where::Out => None,
                        Where::Joining(r, _) | Where::In(r, _) | Where::Leaving(r, _) => Some(r),
                    };
                    match current {
                        None => {
                            ch.after_left.fetch_add(1, Relaxed);
                        }
                        Some(r) if room != sh.room_ids[r] => {
                            sh.misrouted.fetch_add(1, Relaxed);
                        }
                        Some(_) => match conn::decode_text(text) {
                            Some((from, seq, _)) if (from as usize) < next.len() => {
                                let n = &mut next[from as usize];
                                if seq < *n {
                                    ch.stale.fetch_add(1, Relaxed);
                                } else {
                                    *n = seq + 1;
                                    ch.deliveries.fetch_add(1, Relaxed);
                                }
                            }
                            _ => {
                                sh.misrouted.fetch_add(1, Relaxed);
                            }
                        },
                    }
                }
                In::Joined(room) => match at {
                    Where::Joining(r, t0) if room == sh.room_ids[r] => {
                        ch.join_hist.record(c, t0.elapsed().as_micros() as u64);
                        let stay = DWELL.mul_f64(2.0 * rng.f64());
                        at = Where::In(r, Instant::now() + stay);
                    }
                    _ => ch.failures.add("unexpected `joined`"),
                },
                In::Left(room) => match at {
                    Where::Leaving(r, t0) if room == sh.room_ids[r] => {
                        ch.leave_hist.record(c, t0.elapsed().as_micros() as u64);
                        ch.completed.fetch_add(1, Relaxed);
                        at = Where::Out;
                    }
                    _ => ch.failures.add("unexpected `left`"),
                },
                In::Error(e) => {
                    ch.failures.add(&format!("error: {e}"));
                    at = Where::Out;
                }
                In::Presence | In::Other => {}
            },
            Ev::Frame(Some(Ok(Message::Close(f)))) => {
                if phase != Phase::Stop {
                    sh.disconnects.add(&conn::close_kind(f.as_ref()));
                }
                break;
            }
            Ev::Frame(Some(Ok(_))) => {}
        }
    }
    if *phase_rx.borrow() == Phase::Stop || phase == Phase::Stop {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}

/// Open-loop pacer: a dedicated thread (precise sleeps, unlike the 1 ms tokio timer wheel)
/// that wakes each member when its next send is due.
fn pacer(sh: &Shared, start: std::time::Instant, rate: f64, stop: &AtomicBool) {
    let Some(plan) = sh.plan.get() else { return };
    let live = u64::from(plan.live);
    if live == 0 {
        return;
    }
    let mut j = 0u64;
    while !stop.load(Relaxed) {
        let due = start + Duration::from_secs_f64(j as f64 / rate);
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        sh.wake[plan.by_slot[(j % live) as usize] as usize].notify_one();
        j += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = String::new();
        encode_room_message(&mut buf, "lt-r1", format_args!("{}:{}:{}:", 3, 9, 77));
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["action"], "room_message");
        let text = v["data"]["text"].as_str().unwrap();
        assert_eq!(text.len(), conn::TEXT_LEN);
        let echoed = format!(
            r#"{{"from":"lt-3","action":"room_message","data":{{"room":"lt-r1","text":"{text}"}}}}"#
        );
        assert!(
            matches!(parse(&echoed), In::RoomMessage { room: "lt-r1", text: t } if conn::decode_text(t) == Some((3, 9, 77)))
        );
        encode_room_op(&mut buf, "leave", "lt-r1");
        assert_eq!(buf, r#"{"action":"leave","data":{"room":"lt-r1"}}"#);
        let joined = r#"{"from":"a","action":"joined","data":{"room":"lt-r1","members":4}}"#;
        assert!(matches!(parse(joined), In::Joined("lt-r1")));
        let e = r#"{"from":"a","action":"error","data":{"error":"not in room 'x'"}}"#;
        assert!(matches!(parse(e), In::Error(k) if k == "not in room '*'"));
    }

    #[test]
    fn pairs_tell_new_late_and_again() {
        let mut p = RxPair::default();
        assert!(matches!(p.see(0), Seen::New));
        assert!(matches!(p.see(2), Seen::New));
        assert!(matches!(p.see(1), Seen::Late));
        assert!(matches!(p.see(1), Seen::Again));
        assert!(matches!(p.see(2), Seen::Again));
    }
}
