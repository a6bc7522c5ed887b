//! drops: direct and room messages at a fixed open-loop rate while the network path of a
//! third of the clients is cut for `--cut-for` every `--cut-every`, and one node is killed
//! and restarted mid-run. Needs nodes started with `--history`.
//!
//! Layout: user `i` has home node `i % nodes`; every third user of each node (`(i / nodes) % 3
//! == 0`) connects through a [`Proxy`] in front of its node, whose path is cut: a cut resets
//! every connection through the proxies and refuses new ones until it ends. User `i` is in
//! room `(i / (3 × nodes)) % rooms` (so each room has users on every node, cut and not, once
//! there are 9 × rooms users or more). Each user sends, at `--rate / users` per second,
//! alternately a direct message to a random other user and a message to its room. The text
//! carries sender, a per-sender sequence number and the send time.
//!
//! A client that loses its connection (a cut, the node killed) reconnects every 100–150 ms,
//! trying its home node first and then the next ones (a dead node's refusal moves it on), with
//! `?since=<offset>&epoch=<epoch>` of the last user-stream frame it received, then re-joins its
//! room with the room stream's `since`/`epoch`. Frames that arrive between the reconnect and
//! `recovered` (user stream), or between the `join` and `joined` (room), are replays; their
//! latency is kept apart, both from the send and from the reconnect.
//!
//! What counts: the node answers nothing to a message that it accepted, so a message counts as
//! *sent* only once the node answered a later request of the same connection: each client
//! sends a checkpoint `{"action":"history","data":{"limit":0}}` every 250 ms while it has
//! unconfirmed messages, and a node handles one connection's frames in order. Messages whose
//! connection broke before their checkpoint's reply are *in doubt* (the node may or may not
//! have read them): not sent, not lost, but still checked for duplicates and order when they
//! arrive. A tick that falls while the client is disconnected (or, for a room message, before
//! its re-join's `joined`) is *not sent* and counted as such; nothing is retried. A batch in
//! which an error frame came back is in doubt as well (the error does not say which message
//! it was for). At the end every sent message must have reached its recipient (direct) or
//! every other member of the room exactly once, and each receiver must have got each
//! (sender, stream)'s messages in sequence order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Target, Ws};
use crate::dm::Phase;
use crate::proxy::Proxy;
use crate::report::{Counts, Latency, MessageStats, Report, ShardedHist};
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

/// Settings of the drops scenario (the rest comes from [`Config`]: users, rate, rooms, run
/// time, grace).
#[derive(Debug, Clone)]
pub struct Drops {
    /// A cut starts every this long (the first half a period into the sending phase).
    pub cut_every: Duration,
    /// How long each cut lasts.
    pub cut_for: Duration,
    /// Shell command (`sh -c`) that kills a node mid-run; `None`: no node is killed.
    pub kill_cmd: Option<String>,
    /// Shell command that starts the killed node again (it must return at once, leaving the
    /// node running).
    pub restart_cmd: Option<String>,
    /// Which `--node` the commands kill and restart (0-based; default: the last): watched for
    /// when it listens again.
    pub kill_node: Option<usize>,
    /// When the kill comes, after the sending phase started (default 40 % of the run time).
    pub kill_at: Option<Duration>,
    /// How long the node stays down before the restart command runs.
    pub down_for: Duration,
}

impl Default for Drops {
    fn default() -> Self {
        Self {
            cut_every: Duration::from_secs(10),
            cut_for: Duration::from_secs(2),
            kill_cmd: None,
            restart_cmd: None,
            kill_node: None,
            kill_at: None,
            down_for: Duration::from_secs(3),
        }
    }
}

/// How often a client with unconfirmed messages asks for a checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// A reconnect attempt follows a failed one (or a drop) after this, plus up to half again.
const RETRY: Duration = Duration::from_millis(100);

/// Timeout of one reconnect attempt (connect and upgrade).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long deliveries must stay still, once every client is settled, to end the drain.
const QUIET: Duration = Duration::from_millis(500);

/// Lost messages listed in the report, at most.
const MAX_LOST_LISTED: usize = 50;

/// What the drops run saw, beside the report's `messages` (which counts deliveries of sent
/// messages: one per direct message, one per other room member per room message).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DropsStats {
    /// Nodes.
    pub nodes: u64,
    /// Users.
    pub users: u64,
    /// Users connected through the cut path.
    pub cut_users: u64,
    /// Rooms.
    pub rooms: u64,
    /// Direct messages the node confirmed (a later checkpoint was answered).
    pub sent_direct: u64,
    /// Room messages the node confirmed.
    pub sent_room: u64,
    /// Messages written whose connection broke before their checkpoint's reply, or in a batch
    /// an error frame came back for: neither sent nor lost.
    pub in_doubt: u64,
    /// Deliveries of in-doubt messages that did arrive (checked for duplicates and order too).
    pub in_doubt_delivered: u64,
    /// Ticks that fell while the client was disconnected (nothing written).
    pub not_sent_offline: u64,
    /// Room-message ticks between a reconnect and the re-join's `joined`.
    pub not_sent_rejoining: u64,
    /// Deliveries that arrived as replay (before `recovered` or the re-join's `joined`).
    pub replayed: u64,
    /// Replayed deliveries, send → receive, µs (includes the time the client was away).
    pub replay_latency_us: Latency,
    /// Replayed deliveries, reconnect (WebSocket open) → receive, µs: what the node's
    /// recovery itself takes.
    pub replay_after_reconnect_us: Latency,
    /// Deliveries that arrived live, send → receive, µs.
    pub live_latency_us: Latency,
    /// Cuts made.
    pub cuts: u64,
    /// Connections the proxies reset during cuts (open ones and attempts).
    pub proxy_resets: u64,
    /// Connections lost, by kind (`eof`, `io ConnectionReset`, `close 4001`, ...).
    pub disconnects: BTreeMap<String, u64>,
    /// Sessions that came back (a `recovered` frame after a reconnect), and failed connect
    /// attempts by kind (attempts refused after the upgrade, e.g. `not unique session` then
    /// close 4001, are in `disconnects`).
    pub reconnects: u64,
    /// Connect attempts that failed before the upgrade, by kind.
    pub reconnect_failures: BTreeMap<String, u64>,
    /// Session lost → `recovered` on the next session, µs.
    pub outage_us: Latency,
    /// `recovered` frames with `recovered: true`.
    pub recovered: u64,
    /// `recovered` frames with `recovered: false`, by reason.
    pub not_recovered: BTreeMap<String, u64>,
    /// Re-joins answered `joined` with `recovered: true`.
    pub rejoined: u64,
    /// Re-joins answered with `recovered: false`, by reason.
    pub rejoin_not_recovered: BTreeMap<String, u64>,
    /// Sum of the `count`s of `recovered` and re-join `joined` frames, against `replayed`.
    pub replay_count_claimed: u64,
    /// Direct-message frames whose offset was not the previous one + 1 in the same epoch
    /// (room streams are not checked: a member's own room messages take offsets it never
    /// receives live).
    pub offset_gaps: u64,
    /// The client's own room messages received (in a room replay).
    pub own_room_messages: u64,
    /// Receipts that match no message written to that receiver.
    pub misrouted: u64,
    /// Error frames by text.
    pub errors: BTreeMap<String, u64>,
    /// Clients not settled when the drain ended: not reconnected, not recovered, or with
    /// messages unconfirmed.
    pub unsettled: u64,
    /// The node kill, when a `--kill-cmd` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill: Option<KillStats>,
    /// Lost deliveries (also in the report's `messages.lost`) to a receiver whose stream a
    /// node answered `recovered: false` at some point during the run (the node said it
    /// could not replay: `too_many`, `trimmed`, ...).
    pub lost_announced: u64,
    /// Lost deliveries to receivers that came back and were never told: the node's fault.
    pub lost_silent: u64,
    /// Lost deliveries to receivers that had not come back by the end of the drain (counted
    /// here, not in the two above).
    pub lost_absent: u64,
    /// Up to 50 lost deliveries, for diagnosis.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<LostDelivery>,
}

/// The node killed and restarted mid-run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KillStats {
    /// The node's URL.
    pub node: String,
    /// Seconds into the sending phase of the kill.
    pub killed_at: f64,
    /// Seconds into the sending phase of the restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<f64>,
    /// Restart → the node accepts TCP again, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listening_after: Option<f64>,
    /// Problems running the commands.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// One sent message a receiver never got.
#[derive(Debug, Clone, Serialize)]
pub struct LostDelivery {
    /// Sender's user index.
    pub from: u32,
    /// Its sequence number.
    pub seq: u64,
    /// `user <i>` or `room <r>`.
    pub to: String,
    /// The receiver's user index.
    pub receiver: u32,
    /// When it was (due to be) sent, ms into the sending phase.
    pub sent_at_ms: f64,
    /// The node the sender was connected to.
    pub sender_node: u8,
    /// Whether the sender is on the cut path.
    pub sender_cut: bool,
}

impl DropsStats {
    /// Adds this run's failures to `problems`.
    pub(crate) fn problems(&self, problems: &mut Vec<String>) {
        if self.lost_announced + self.lost_silent + self.lost_absent > 0 {
            problems.push(format!(
                "of the lost deliveries, {} to clients that never came back, {} silently and \
                 {} to a stream a node answered recovered:false for (rejoin {:?}, user stream {:?})",
                self.lost_absent,
                self.lost_silent,
                self.lost_announced,
                self.rejoin_not_recovered,
                self.not_recovered
            ));
        }
        if self.unsettled > 0 {
            problems.push(format!(
                "{} clients had not reconnected and recovered by the end of the drain \
                 (disconnects {:?})",
                self.unsettled, self.disconnects
            ));
        }
        if self.misrouted > 0 {
            problems.push(format!(
                "{} receipts of messages never sent",
                self.misrouted
            ));
        }
        if self.sent_direct == 0 || self.sent_room == 0 {
            problems.push("no direct or no room message was sent".to_owned());
        }
        if self.reconnects == 0 {
            problems.push("no client reconnected: nothing was cut".to_owned());
        }
        if let Some(k) = &self.kill
            && !k.errors.is_empty()
        {
            problems.push(format!("node kill/restart: {}", k.errors.join("; ")));
        }
    }

    /// Appends the human-readable section.
    pub(crate) fn write_human(&self, w: &mut String) {
        let _ = writeln!(w, "\n-- drops");
        let _ = writeln!(
            w,
            "  nodes {}   users {} ({} on the cut path)   rooms {}",
            self.nodes, self.users, self.cut_users, self.rooms
        );
        let _ = writeln!(
            w,
            "  sent: direct {}   room {}   in doubt {} ({} deliveries arrived)   not sent: offline {}, re-joining {}",
            self.sent_direct,
            self.sent_room,
            self.in_doubt,
            self.in_doubt_delivered,
            self.not_sent_offline,
            self.not_sent_rejoining
        );
        let _ = writeln!(
            w,
            "  cuts {}   proxy resets {}   reconnects {}   recovered true {} / false {:?}   re-joins true {} / false {:?}",
            self.cuts,
            self.proxy_resets,
            self.reconnects,
            self.recovered,
            self.not_recovered,
            self.rejoined,
            self.rejoin_not_recovered
        );
        let _ = writeln!(
            w,
            "  lost: {} to clients never back, {} announced (after recovered:false), {} silent\n  replayed {} (servers claimed {})   offset gaps {}   own room messages {}   misrouted {}",
            self.lost_absent,
            self.lost_announced,
            self.lost_silent,
            self.replayed,
            self.replay_count_claimed,
            self.offset_gaps,
            self.own_room_messages,
            self.misrouted
        );
        crate::report::lat_header(w, "  ");
        crate::report::lat_row(w, "  live", &self.live_latency_us);
        crate::report::lat_row(w, "  replay", &self.replay_latency_us);
        crate::report::lat_row(w, "  replay-rc", &self.replay_after_reconnect_us);
        crate::report::lat_row(w, "  outage", &self.outage_us);
        let _ = writeln!(
            w,
            "  (replay: send → receive; replay-rc: reconnect → receive; outage: session lost → recovered)"
        );
        for (k, v) in &self.disconnects {
            let _ = writeln!(w, "  disconnect {k:<37} {v:>10}");
        }
        for (k, v) in &self.reconnect_failures {
            let _ = writeln!(w, "  reconnect failure {k:<30} {v:>10}");
        }
        for (k, v) in &self.errors {
            let _ = writeln!(w, "  error frame {k:<36} {v:>10}");
        }
        if let Some(k) = &self.kill {
            let _ = writeln!(
                w,
                "  killed {} at {:.1}s, restarted at {}, listening {} later {}",
                k.node,
                k.killed_at,
                k.restarted_at
                    .map_or("-".to_owned(), |t| format!("{t:.1}s")),
                k.listening_after
                    .map_or("-".to_owned(), |t| format!("{t:.2}s")),
                k.errors.join("; ")
            );
        }
        for l in self.lost.iter().take(10) {
            let _ = writeln!(
                w,
                "  lost: {}#{} → {} (receiver {}) sent at {:.0} ms via node {}{}",
                l.from,
                l.seq,
                l.to,
                l.receiver,
                l.sent_at_ms,
                l.sender_node,
                if l.sender_cut { " (cut path)" } else { "" }
            );
        }
    }
}

/// State of one message in its sender's log.
#[derive(Clone, Copy, PartialEq)]
enum Fate {
    /// Written; no checkpoint answered yet.
    Pending,
    /// A later checkpoint was answered: the node read it.
    Sent,
    /// The connection broke first, or an error frame came back in its batch.
    InDoubt,
}

/// Where a message went.
#[derive(Clone, Copy)]
enum To {
    User(u32),
    Room(u32),
}

impl To {
    /// The receiver-side stream key: 0 for the user stream, 1 + room for a room.
    fn stream(self) -> u32 {
        match self {
            To::User(_) => 0,
            To::Room(r) => 1 + r,
        }
    }
}

/// One message in its sender's log (its sequence number is its index).
struct Sent {
    to: To,
    send_ns: u64,
    fate: Fate,
    node: u8,
}

/// What a user's task leaves for the final count.
#[derive(Default)]
struct UserLog {
    sent: Vec<Sent>,
    /// Sequence numbers received per (sender, stream), sorted.
    rx: HashMap<(u32, u32), Vec<u64>>,
    /// Streams (0: the user's, 1 + r: room r) for which a node answered `recovered: false`:
    /// the node said messages were gone, so their losses are announced, not silent.
    given_up: Vec<u32>,
}

/// Fixed once the connect phase is over.
struct Plan {
    /// Users connected at the start (the only ones messages are sent to).
    live: Vec<u32>,
    /// Live members of each room.
    members: Vec<Vec<u32>>,
}

struct Shared {
    epoch: Instant,
    ids: Vec<String>,
    room_ids: Vec<String>,
    /// Mints each user's token (`--jwt-secret`), at every reconnect too.
    auth: Option<Arc<Minter>>,
    room_of: Vec<u32>,
    home: Vec<usize>,
    cut_path: Vec<bool>,
    direct: Vec<Arc<Target>>,
    via_proxy: Vec<Arc<Target>>,
    /// Seconds between two sends of one user.
    period: f64,
    plan: OnceLock<Plan>,
    /// Users that know their user-stream position and joined their room.
    ready: AtomicU64,
    /// Per user: connected, recovered, re-joined, every message confirmed or in doubt.
    settled: Vec<AtomicBool>,
    /// Set when a node answered `history is off`.
    history_off: AtomicBool,
    logs: Vec<Mutex<Option<UserLog>>>,
    send_start_ns: AtomicU64,
    written_direct: AtomicU64,
    written_room: AtomicU64,
    not_sent_offline: AtomicU64,
    not_sent_rejoining: AtomicU64,
    deliveries: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    replayed: AtomicU64,
    reconnects: AtomicU64,
    recovered: AtomicU64,
    rejoined: AtomicU64,
    claimed: AtomicU64,
    offset_gaps: AtomicU64,
    own_room: AtomicU64,
    live_hist: ShardedHist,
    replay_hist: ShardedHist,
    replay_rc_hist: ShardedHist,
    outage_hist: ShardedHist,
    disconnects: Counts,
    reconnect_failures: Counts,
    not_recovered: Counts,
    rejoin_not_recovered: Counts,
    errors: Counts,
    tl: Arc<Timeline>,
}

pub(crate) async fn run(cfg: &Config, hard: Instant, tl: &Arc<Timeline>) -> Result<Report> {
    let d = &cfg.drops;
    let nodes = crate::resolve_nodes(cfg).await?;
    let (rate, kill_node) = check(cfg, nodes.len())?;
    let mut proxies = Vec::new();
    let mut via_proxy = Vec::new();
    for t in &nodes {
        let p = Proxy::start(t.addr).await?;
        via_proxy.push(Arc::new(
            Target::resolve(&format!("ws://{}", p.addr())).await?,
        ));
        proxies.push(p);
    }
    let prefix = conn::run_prefix();
    let sh = Arc::new(Shared::new(cfg, &prefix, &nodes, via_proxy, rate, tl));
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);

    let specs = (0..cfg.users)
        .map(|i| ConnSpec {
            target: sh.target(i, sh.home[i]),
            source: None,
            id: sh.ids[i].clone(),
            auth: sh.auth.clone(),
        })
        .collect();
    let mut tasks = JoinSet::new();
    let body = {
        let (sh, rx) = (sh.clone(), phase_rx.clone());
        move |i: usize, ws: Ws| user_task(sh.clone(), i as u32, ws, rx.clone())
    };
    let hatched = crate::hatch(cfg, specs, 16 * 1024, &mut tasks, hard, tl, false, body).await;
    let live: Vec<u32> = (0..cfg.users as u32)
        .filter(|&i| hatched.connected[i as usize])
        .collect();
    let mut members = vec![Vec::new(); sh.room_ids.len()];
    for &i in &live {
        members[sh.room_of[i as usize] as usize].push(i);
    }
    let _ = sh.plan.set(Plan {
        live: live.clone(),
        members,
    });
    let notes = wait_ready(&sh, &live).await?.into_iter().collect();

    let send_start = Instant::now();
    sh.send_start_ns.store(
        send_start.duration_since(sh.epoch).as_nanos() as u64,
        Relaxed,
    );
    let _ = phase_tx.send(Phase::Sending(send_start));
    let send_end = (send_start + cfg.run_time).min(hard - Duration::from_secs(15));
    let kill = async {
        match &d.kill_cmd {
            Some(cmd) => {
                let at = d.kill_at.unwrap_or(cfg.run_time.mul_f64(0.4));
                Some(kill_and_restart(cmd, d, &nodes[kill_node], send_start, at).await)
            }
            None => None,
        }
    };
    let (cuts, kill) = tokio::join!(cut_schedule(&proxies, d, send_start, send_end), kill);
    tokio::time::sleep_until(send_end).await;
    let _ = phase_tx.send(Phase::Draining);
    let send_secs = send_start.elapsed().as_secs_f64();
    let measuring = (tl.secs(send_start), tl.secs(Instant::now()));
    let drain_end = (Instant::now() + cfg.grace.max(Duration::from_secs(10)))
        .min(hard - Duration::from_secs(4));
    let unsettled = drain(&sh, &live, drain_end).await;
    let _ = phase_tx.send(Phase::Stop);
    crate::join_all(&mut tasks, Duration::from_secs(3)).await;
    let proxy_resets = proxies.iter().map(Proxy::resets).sum();
    drop(proxies);

    let mut count = sh.count(&live, cfg.users, nodes.len());
    let st = &mut count.stats;
    st.cuts = cuts;
    st.proxy_resets = proxy_resets;
    st.kill = kill;
    st.unsettled = unsettled as u64;
    let mut report = Report {
        mode: "open-loop".to_owned(),
        users: cfg.users as u64,
        target_rate: Some(rate),
        connect: hatched.stats,
        messages: Some(sh.messages(&count, send_secs)),
        run_prefix: prefix,
        measuring: Some(measuring),
        notes,
        ..Report::default()
    };
    let p99 = count.stats.replay_after_reconnect_us.p99;
    if count.stats.replayed > 0 {
        report.notes.push(format!(
            "replay p99 after reconnect {:.3} s: {} the 1 s target",
            p99 as f64 / 1e6,
            if p99 <= 1_000_000 { "meets" } else { "misses" }
        ));
    }
    report.drops = Some(count.stats);
    Ok(report)
}

/// The open-loop rate and the index of the node to kill, or why the settings cannot run.
fn check(cfg: &Config, nodes: usize) -> Result<(f64, usize)> {
    let d = &cfg.drops;
    let Some(rate) = cfg.rate else {
        bail!("drops needs --rate (messages/s in total, open loop)");
    };
    if cfg.users < 2 * cfg.rooms.max(1) {
        bail!("drops needs at least two users per room");
    }
    if d.cut_for.is_zero() || d.cut_every <= d.cut_for {
        bail!("--cut-every must be longer than --cut-for, and --cut-for positive");
    }
    let kill_node = d.kill_node.unwrap_or(nodes - 1);
    if d.kill_cmd.is_some() && kill_node >= nodes {
        bail!("--kill-node {kill_node}: there are {nodes} nodes");
    }
    Ok((rate, kill_node))
}

/// Waits (15 s at most) until every live user knows where its streams stand: nothing can be
/// recovered before. Returns a note when some did not.
async fn wait_ready(sh: &Shared, live: &[u32]) -> Result<Option<String>> {
    let ready_by = Instant::now() + Duration::from_secs(15);
    while sh.ready.load(Relaxed) < live.len() as u64 && Instant::now() < ready_by {
        if sh.history_off.load(Relaxed) {
            bail!("the nodes answered `history is off`: start them with --history N");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = sh.ready.load(Relaxed);
    Ok((ready < live.len() as u64).then(|| {
        format!(
            "{} of {} users did not get their position and room before sending",
            live.len() as u64 - ready,
            live.len()
        )
    }))
}

/// Waits until every client is settled (reconnected, recovered, its last messages
/// confirmed) and no delivery came for [`QUIET`], or `until`. Returns the clients not
/// settled.
async fn drain(sh: &Shared, live: &[u32], until: Instant) -> usize {
    let mut last = (sh.deliveries.load(Relaxed), Instant::now());
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = sh.deliveries.load(Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        let settled = live.iter().all(|&i| sh.settled[i as usize].load(Relaxed));
        if settled && last.1.elapsed() >= QUIET {
            break;
        }
    }
    live.iter()
        .filter(|&&i| !sh.settled[i as usize].load(Relaxed))
        .count()
}

/// Cuts every proxy for `cut_for` every `cut_every`, the first half a period in; no cut
/// outlasts the sending phase. Returns the number of cuts.
async fn cut_schedule(proxies: &[Proxy], d: &Drops, start: Instant, end: Instant) -> u64 {
    let mut cuts = 0;
    let mut at = start + d.cut_every / 2;
    while at + d.cut_for <= end {
        tokio::time::sleep_until(at).await;
        for p in proxies {
            p.set_cut(true);
        }
        cuts += 1;
        tokio::time::sleep_until(at + d.cut_for).await;
        for p in proxies {
            p.set_cut(false);
        }
        at += d.cut_every;
    }
    cuts
}

/// Runs the kill command at `start + at`, the restart command `down_for` later, and waits
/// (20 s at most) for the node to accept TCP again.
async fn kill_and_restart(
    kill_cmd: &str,
    d: &Drops,
    node: &Target,
    start: Instant,
    at: Duration,
) -> KillStats {
    let mut k = KillStats {
        node: node.base.clone(),
        ..KillStats::default()
    };
    tokio::time::sleep_until(start + at).await;
    k.killed_at = start.elapsed().as_secs_f64();
    if let Err(e) = shell(kill_cmd).await {
        k.errors.push(format!("kill: {e}"));
    }
    let Some(restart) = &d.restart_cmd else {
        return k;
    };
    tokio::time::sleep_until(start + at + d.down_for).await;
    k.restarted_at = Some(start.elapsed().as_secs_f64());
    let t0 = Instant::now();
    if let Err(e) = shell(restart).await {
        k.errors.push(format!("restart: {e}"));
        return k;
    }
    while t0.elapsed() < Duration::from_secs(20) {
        if tokio::net::TcpStream::connect(node.addr).await.is_ok() {
            k.listening_after = Some(t0.elapsed().as_secs_f64());
            return k;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    k.errors
        .push("the restarted node did not listen within 20 s".to_owned());
    k
}

async fn shell(cmd: &str) -> Result<()> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("`{cmd}` exited with {status}");
    }
    Ok(())
}

/// The final count: [`DropsStats`] and the deliveries of sent messages.
struct Count {
    stats: DropsStats,
    expected: u64,
    delivered: u64,
}

impl Shared {
    fn new(
        cfg: &Config,
        prefix: &str,
        nodes: &[Arc<Target>],
        via_proxy: Vec<Arc<Target>>,
        rate: f64,
        tl: &Arc<Timeline>,
    ) -> Self {
        let (n, nn, rooms) = (cfg.users, nodes.len(), cfg.rooms.max(1));
        Self {
            epoch: Instant::now(),
            ids: (0..n).map(|i| format!("{prefix}-{i}")).collect(),
            room_ids: (0..rooms).map(|r| format!("{prefix}-r{r}")).collect(),
            auth: Minter::for_run(cfg.jwt_secret.as_deref(), vec![format!("{prefix}-r*")]),
            room_of: (0..n).map(|i| ((i / (3 * nn)) % rooms) as u32).collect(),
            home: (0..n).map(|i| i % nn).collect(),
            cut_path: (0..n).map(|i| (i / nn) % 3 == 0).collect(),
            direct: nodes.to_vec(),
            via_proxy,
            period: n as f64 / rate,
            plan: OnceLock::new(),
            ready: AtomicU64::new(0),
            settled: (0..n).map(|_| AtomicBool::new(false)).collect(),
            history_off: AtomicBool::new(false),
            logs: (0..n).map(|_| Mutex::new(None)).collect(),
            send_start_ns: AtomicU64::new(0),
            written_direct: AtomicU64::new(0),
            written_room: AtomicU64::new(0),
            not_sent_offline: AtomicU64::new(0),
            not_sent_rejoining: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            rejoined: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            offset_gaps: AtomicU64::new(0),
            own_room: AtomicU64::new(0),
            live_hist: ShardedHist::new(16),
            replay_hist: ShardedHist::new(16),
            replay_rc_hist: ShardedHist::new(16),
            outage_hist: ShardedHist::new(4),
            disconnects: Counts::default(),
            reconnect_failures: Counts::default(),
            not_recovered: Counts::default(),
            rejoin_not_recovered: Counts::default(),
            errors: Counts::default(),
            tl: tl.clone(),
        }
    }

    /// The report's `messages`: deliveries of sent messages; the latency is of every
    /// delivery, live and replayed, in-doubt messages' included.
    fn messages(&self, count: &Count, send_secs: f64) -> MessageStats {
        let (expected, delivered) = (count.expected, count.delivered);
        let mut latency = self.live_hist.merged();
        let _ = latency.add(self.replay_hist.merged());
        MessageStats {
            sent: expected,
            delivered,
            errored: 0,
            lost: expected - delivered,
            duplicated: self.duplicated.load(Relaxed),
            out_of_order: self.out_of_order.load(Relaxed),
            send_secs,
            sent_per_sec: expected as f64 / send_secs,
            delivered_per_sec: delivered as f64 / send_secs,
            latency_us: Latency::from_hist(&latency),
        }
    }

    /// Where user `i` connects to reach node `node`.
    fn target(&self, i: usize, node: usize) -> Arc<Target> {
        if self.cut_path[i] {
            self.via_proxy[node].clone()
        } else {
            self.direct[node].clone()
        }
    }

    /// Checks every sender's log against every receiver's receipts.
    fn count(&self, live: &[u32], n: usize, nodes: usize) -> Count {
        let logs: Vec<UserLog> = self
            .logs
            .iter()
            .map(|l| {
                l.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_default()
            })
            .collect();
        let plan = self.plan.get().expect("plan set before counting");
        let send_start = self.send_start_ns.load(Relaxed);
        let mut st = DropsStats {
            nodes: nodes as u64,
            users: n as u64,
            cut_users: live.iter().filter(|&&i| self.cut_path[i as usize]).count() as u64,
            rooms: self.room_ids.len() as u64,
            ..DropsStats::default()
        };
        let (mut expected, mut delivered, mut matched) = (0u64, 0u64, 0u64);
        for &s in live {
            for (seq, m) in logs[s as usize].sent.iter().enumerate() {
                let seq = seq as u64;
                let receivers: &[u32] = match m.to {
                    To::User(ref t) => std::slice::from_ref(t),
                    To::Room(r) => &plan.members[r as usize],
                };
                match (m.fate, m.to) {
                    (Fate::Sent, To::User(_)) => st.sent_direct += 1,
                    (Fate::Sent, To::Room(_)) => st.sent_room += 1,
                    _ => st.in_doubt += 1,
                }
                for &r in receivers.iter().filter(|&&r| r != s) {
                    let got = logs[r as usize]
                        .rx
                        .get(&(s, m.to.stream()))
                        .is_some_and(|v| v.binary_search(&seq).is_ok());
                    matched += u64::from(got);
                    if m.fate != Fate::Sent {
                        st.in_doubt_delivered += u64::from(got);
                        continue;
                    }
                    expected += 1;
                    if got {
                        delivered += 1;
                        continue;
                    }
                    if !self.settled[r as usize].load(Relaxed) {
                        st.lost_absent += 1;
                    } else if logs[r as usize].given_up.contains(&m.to.stream()) {
                        st.lost_announced += 1;
                    } else {
                        st.lost_silent += 1;
                    }
                    if st.lost.len() < MAX_LOST_LISTED {
                        st.lost.push(LostDelivery {
                            from: s,
                            seq,
                            to: match m.to {
                                To::User(t) => format!("user {t}"),
                                To::Room(r) => format!("room {r}"),
                            },
                            receiver: r,
                            sent_at_ms: m.send_ns.saturating_sub(send_start) as f64 / 1e6,
                            sender_node: m.node,
                            sender_cut: self.cut_path[s as usize],
                        });
                    }
                }
            }
        }
        let received: u64 = logs
            .iter()
            .flat_map(|l| l.rx.values())
            .map(|v| v.len() as u64)
            .sum();
        st.misrouted = received.saturating_sub(matched);
        st.not_sent_offline = self.not_sent_offline.load(Relaxed);
        st.not_sent_rejoining = self.not_sent_rejoining.load(Relaxed);
        st.replayed = self.replayed.load(Relaxed);
        st.replay_latency_us = Latency::from_hist(&self.replay_hist.merged());
        st.replay_after_reconnect_us = Latency::from_hist(&self.replay_rc_hist.merged());
        st.live_latency_us = Latency::from_hist(&self.live_hist.merged());
        st.disconnects = self.disconnects.take();
        st.reconnects = self.reconnects.load(Relaxed);
        st.reconnect_failures = self.reconnect_failures.take();
        st.outage_us = Latency::from_hist(&self.outage_hist.merged());
        st.recovered = self.recovered.load(Relaxed);
        st.not_recovered = self.not_recovered.take();
        st.rejoined = self.rejoined.load(Relaxed);
        st.rejoin_not_recovered = self.rejoin_not_recovered.take();
        st.replay_count_claimed = self.claimed.load(Relaxed);
        st.offset_gaps = self.offset_gaps.load(Relaxed);
        st.own_room_messages = self.own_room.load(Relaxed);
        st.errors = self.errors.take();
        Count {
            stats: st,
            expected,
            delivered,
        }
    }
}

/// A stream's position as the client last saw it.
#[derive(Clone, Default)]
struct Position {
    offset: u64,
    epoch: String,
}

/// A server frame, as far as this scenario reads it.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    action: &'a str,
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct Data<'a> {
    #[serde(borrow, default)]
    text: Option<&'a str>,
    #[serde(borrow, default)]
    room: Option<&'a str>,
    #[serde(borrow, default)]
    error: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(borrow, default)]
    reason: Option<&'a str>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<std::borrow::Cow<'a, str>>,
}

enum Ev {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Phase(bool),
    Tick(Instant),
    Checkpoint,
    Retry,
}

/// One client: its connection (or none), its streams' positions, its log.
struct Client {
    sh: Arc<Shared>,
    me: u32,
    ws: Option<Ws>,
    /// Node of the current connection, and when it opened.
    node: usize,
    connected_at: Instant,
    /// The connection is a session that recovered (not one refused, e.g. `not unique
    /// session` while the node of its previous session is not yet seen dead).
    up: bool,
    /// Reconnects: when the last session was lost, the next attempt, attempts made.
    lost_at: Instant,
    retry_at: Instant,
    attempt: usize,
    user_pos: Option<Position>,
    room_pos: Option<Position>,
    /// Between a reconnect with `since` and `recovered`.
    recovering: bool,
    /// Between a join and its `joined`.
    joining: bool,
    /// Replays expected before `joined` (a re-join with `since`).
    rejoining: bool,
    log: UserLog,
    /// Log index up to which every message is sent or in doubt.
    decided: usize,
    /// Log lengths at each checkpoint in flight, oldest first.
    checkpoints: VecDeque<usize>,
    /// An error frame came back since the last answered checkpoint.
    errored: bool,
    rng: fastrand::Rng,
    buf: String,
    ticks: u64,
}

async fn user_task(sh: Arc<Shared>, me: u32, ws: Ws, mut phase_rx: watch::Receiver<Phase>) {
    let now = Instant::now();
    let node = sh.home[me as usize];
    let mut c = Client {
        sh: sh.clone(),
        me,
        ws: Some(ws),
        node,
        connected_at: now,
        up: true,
        lost_at: now,
        retry_at: now,
        attempt: 0,
        user_pos: None,
        room_pos: None,
        recovering: false,
        joining: false,
        rejoining: false,
        log: UserLog::default(),
        decided: 0,
        checkpoints: VecDeque::new(),
        errored: false,
        rng: fastrand::Rng::new(),
        buf: String::with_capacity(192),
        ticks: 0,
    };
    c.opened().await;
    let far = || {
        tokio::time::interval_at(
            Instant::now() + Duration::from_secs(86_400),
            Duration::from_secs(86_400),
        )
    };
    let mut send_tick = far();
    let mut checkpoint = tokio::time::interval(CHECKPOINT_EVERY);
    checkpoint.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut phase = Phase::Connecting;
    loop {
        let sending = matches!(phase, Phase::Sending(_));
        let ev = tokio::select! {
            biased;
            f = async { match c.ws.as_mut() {
                Some(ws) => ws.next().await,
                None => std::future::pending().await,
            } } => Ev::Frame(f),
            r = phase_rx.changed() => Ev::Phase(r.is_ok()),
            t = send_tick.tick(), if sending => Ev::Tick(t),
            _ = checkpoint.tick() => Ev::Checkpoint,
            () = tokio::time::sleep_until(c.retry_at), if c.ws.is_none() => Ev::Retry,
        };
        match ev {
            Ev::Phase(alive) => {
                phase = if alive {
                    *phase_rx.borrow_and_update()
                } else {
                    Phase::Stop
                };
                match phase {
                    Phase::Sending(start) => {
                        let period = Duration::from_secs_f64(sh.period);
                        let first = start + period.mul_f64(c.rng.f64());
                        send_tick = tokio::time::interval_at(first, period);
                    }
                    Phase::Draining => send_tick = far(),
                    Phase::Stop => break,
                    Phase::Connecting => {}
                }
            }
            Ev::Tick(due) => c.tick(due).await,
            Ev::Checkpoint => c.checkpoint().await,
            Ev::Retry => c.reconnect().await,
            Ev::Frame(None) => c.lost("eof".to_owned()),
            Ev::Frame(Some(Err(e))) => c.lost(conn::ws_error_kind(&e)),
            Ev::Frame(Some(Ok(Message::Text(t)))) => c.frame(t.as_str()),
            Ev::Frame(Some(Ok(Message::Close(f)))) => c.lost(conn::close_kind(f.as_ref())),
            Ev::Frame(Some(Ok(_))) => {}
        }
        sh.settled[me as usize].store(c.is_settled(), Relaxed);
    }
    if let Some(mut ws) = c.ws.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    c.mark_in_doubt();
    *sh.logs[me as usize]
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(std::mem::take(&mut c.log));
}

impl Client {
    fn is_settled(&self) -> bool {
        self.ws.is_some()
            && !self.recovering
            && !self.joining
            && self.checkpoints.is_empty()
            && self.decided == self.log.sent.len()
    }

    /// A connection opened: ask for the user stream's position (first time) and join the
    /// room (with `since` when the room's position is known).
    async fn opened(&mut self) {
        let room = self.sh.room_of[self.me as usize] as usize;
        let mut frames = Vec::new();
        if self.user_pos.is_none() {
            frames.push(r#"{"action":"history","data":{"limit":0}}"#.to_owned());
            self.checkpoints.push_back(self.log.sent.len());
        }
        let mut join = format!(
            r#"{{"action":"join","data":{{"room":"{}""#,
            self.sh.room_ids[room]
        );
        if let Some(p) = &self.room_pos {
            let _ = write!(
                join,
                r#","since":{},"epoch":{}"#,
                p.offset,
                serde_json::Value::from(p.epoch.as_str())
            );
            self.rejoining = true;
        }
        join.push_str("}}");
        frames.push(join);
        self.joining = true;
        for f in frames {
            if let Err(e) = self.send_text(&f).await {
                self.lost(format!("send {e}"));
                return;
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        let Some(ws) = self.ws.as_mut() else {
            return Err("not connected".to_owned());
        };
        ws.send(Message::text(text))
            .await
            .map_err(|e| conn::ws_error_kind(&e))
    }

    /// The connection is gone: what was not confirmed is in doubt; reconnect soon.
    fn lost(&mut self, kind: String) {
        if self.ws.take().is_none() {
            return;
        }
        self.sh.disconnects.add(&kind);
        self.sh.tl.error();
        self.mark_in_doubt();
        self.checkpoints.clear();
        self.errored = false;
        self.recovering = false;
        self.joining = false;
        self.rejoining = false;
        let now = Instant::now();
        // A lost session is retried at once; a refused one after the usual pause.
        let pause = if std::mem::take(&mut self.up) {
            self.lost_at = now;
            self.attempt = 0;
            Duration::ZERO
        } else {
            RETRY
        };
        self.retry_at = now + pause + RETRY.mul_f64(self.rng.f64() * 0.5);
    }

    fn mark_in_doubt(&mut self) {
        for m in &mut self.log.sent[self.decided..] {
            m.fate = Fate::InDoubt;
        }
        self.decided = self.log.sent.len();
    }

    async fn reconnect(&mut self) {
        let sh = self.sh.clone();
        let nodes = sh.direct.len();
        let node = (sh.home[self.me as usize] + self.attempt) % nodes;
        self.attempt += 1;
        let target = sh.target(self.me as usize, node);
        let mut id = sh.ids[self.me as usize].clone();
        if let Some(p) = &self.user_pos {
            let _ = write!(id, "?since={}&epoch={}", p.offset, url_encode(&p.epoch));
        }
        let auth = sh.auth.as_deref();
        match conn::connect(&target, &id, auth, None, 16 * 1024, RECONNECT_TIMEOUT).await {
            Ok(ws) => {
                let now = Instant::now();
                self.ws = Some(ws);
                self.node = node;
                self.connected_at = now;
                self.recovering = self.user_pos.is_some();
                self.opened().await;
            }
            Err(kind) => {
                sh.reconnect_failures.add(&kind);
                self.retry_at = Instant::now() + RETRY + RETRY.mul_f64(self.rng.f64() * 0.5);
            }
        }
    }

    /// A send tick: a direct message and a room message in turn.
    async fn tick(&mut self, due: Instant) {
        let sh = self.sh.clone();
        let room_turn = self.ticks % 2 == 1;
        self.ticks += 1;
        if self.ws.is_none() || due < self.connected_at {
            sh.not_sent_offline.fetch_add(1, Relaxed);
            return;
        }
        if room_turn && self.joining {
            sh.not_sent_rejoining.fetch_add(1, Relaxed);
            return;
        }
        let plan = sh.plan.get().expect("plan set before sending");
        let to = if room_turn {
            To::Room(sh.room_of[self.me as usize])
        } else {
            loop {
                let t = plan.live[self.rng.usize(..plan.live.len())];
                if t != self.me || plan.live.len() < 2 {
                    break To::User(t);
                }
            }
        };
        let seq = self.log.sent.len();
        let send_ns = due.duration_since(sh.epoch).as_nanos() as u64;
        let me = self.me;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        match to {
            To::User(t) => conn::encode_message(
                &mut buf,
                &sh.ids[t as usize],
                format_args!("{me}:{seq}:{send_ns}:"),
            ),
            To::Room(r) => crate::room::encode_room_message(
                &mut buf,
                &sh.room_ids[r as usize],
                format_args!("{me}:{seq}:{send_ns}:"),
            ),
        }
        self.log.sent.push(Sent {
            to,
            send_ns,
            fate: Fate::Pending,
            node: self.node as u8,
        });
        let due_deliveries = match to {
            To::User(_) => {
                sh.written_direct.fetch_add(1, Relaxed);
                1
            }
            To::Room(r) => {
                sh.written_room.fetch_add(1, Relaxed);
                plan.members[r as usize].len().saturating_sub(1) as u64
            }
        };
        sh.tl.sent_n(due_deliveries);
        let r = self.send_text(&buf).await;
        self.buf = buf;
        if let Err(e) = r {
            self.lost(format!("send {e}"));
        }
    }

    /// Asks for a checkpoint when messages wait for one (one in flight at a time).
    async fn checkpoint(&mut self) {
        if self.ws.is_none() || !self.checkpoints.is_empty() || self.decided == self.log.sent.len()
        {
            return;
        }
        self.checkpoints.push_back(self.log.sent.len());
        if let Err(e) = self
            .send_text(r#"{"action":"history","data":{"limit":0}}"#)
            .await
        {
            self.lost(format!("send {e}"));
        }
    }

    fn frame(&mut self, text: &str) {
        let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
            self.sh.errors.add("unparsable frame");
            return;
        };
        let d = f.data.unwrap_or_default();
        let sh = self.sh.clone();
        match f.action {
            "message" => {
                let Some(body) = d.text else { return };
                let replay = self.recovering;
                if let Some(pos) = &mut self.user_pos
                    && step(pos, &sh, f.offset, f.epoch.as_deref())
                {
                    sh.offset_gaps.fetch_add(1, Relaxed);
                }
                self.receive(body, 0, replay);
            }
            "room_message" => {
                let (Some(body), Some(room)) = (d.text, d.room) else {
                    return;
                };
                let mine = sh.room_of[self.me as usize];
                if room != sh.room_ids[mine as usize] {
                    sh.errors.add("room message from another room");
                    return;
                }
                let replay = self.rejoining;
                if let Some(pos) = &mut self.room_pos {
                    step(pos, &sh, f.offset, f.epoch.as_deref());
                }
                self.receive(body, 1 + mine, replay);
            }
            "recovered" => self.on_recovered(d),
            "joined" => self.on_joined(d),
            "history" => self.on_history(d),
            "error" => {
                let e = d.error.as_deref().unwrap_or("(no error text)");
                if e == "history is off" {
                    sh.history_off.store(true, Relaxed);
                }
                sh.errors.add(&conn::error_key(e));
                sh.tl.error();
                self.errored = true;
            }
            _ => {}
        }
    }

    /// The end of a user-stream replay: the session is back.
    fn on_recovered(&mut self, d: Data<'_>) {
        let sh = &self.sh;
        self.recovering = false;
        self.up = true;
        sh.reconnects.fetch_add(1, Relaxed);
        sh.outage_hist
            .record(self.me as usize, self.lost_at.elapsed().as_micros() as u64);
        if d.recovered == Some(true) {
            sh.recovered.fetch_add(1, Relaxed);
        } else {
            sh.not_recovered.add(d.reason.unwrap_or("(no reason)"));
            self.log.given_up.push(0);
        }
        sh.claimed.fetch_add(d.count.unwrap_or(0), Relaxed);
        if let (Some(offset), Some(epoch)) = (d.offset, d.epoch) {
            self.user_pos = Some(Position {
                offset,
                epoch: epoch.into_owned(),
            });
        }
    }

    /// A join's answer: the room's position, and after a re-join the end of its replay.
    fn on_joined(&mut self, d: Data<'_>) {
        let sh = &self.sh;
        let first = self.room_pos.is_none();
        match d.recovered {
            Some(true) => {
                sh.rejoined.fetch_add(1, Relaxed);
            }
            Some(false) => {
                sh.rejoin_not_recovered
                    .add(d.reason.unwrap_or("(no reason)"));
                self.log.given_up.push(1 + sh.room_of[self.me as usize]);
            }
            None => {}
        }
        sh.claimed.fetch_add(d.count.unwrap_or(0), Relaxed);
        if let (Some(offset), Some(epoch)) = (d.offset, d.epoch) {
            self.room_pos = Some(Position {
                offset,
                epoch: epoch.into_owned(),
            });
        } else {
            sh.errors.add("joined without offset/epoch");
        }
        self.joining = false;
        self.rejoining = false;
        if first && self.user_pos.is_some() {
            sh.ready.fetch_add(1, Relaxed);
        }
    }

    /// A `history` reply: the user stream's position (first one), and a checkpoint: every
    /// message written before its request was read by the node.
    fn on_history(&mut self, d: Data<'_>) {
        let sh = &self.sh;
        if self.user_pos.is_none() {
            if let (Some(offset), Some(epoch)) = (d.offset, d.epoch) {
                self.user_pos = Some(Position {
                    offset,
                    epoch: epoch.into_owned(),
                });
                if self.room_pos.is_some() {
                    sh.ready.fetch_add(1, Relaxed);
                }
            } else {
                sh.errors.add("history reply without offset/epoch");
            }
        }
        let Some(upto) = self.checkpoints.pop_front() else {
            return;
        };
        let fate = if self.errored {
            Fate::InDoubt
        } else {
            Fate::Sent
        };
        let from = self.decided.min(upto);
        for m in &mut self.log.sent[from..upto] {
            m.fate = fate;
        }
        self.decided = self.decided.max(upto);
        self.errored = false;
    }

    /// A message body from `stream` (0: the user's, 1 + r: room r).
    fn receive(&mut self, body: &str, stream: u32, replay: bool) {
        let sh = &self.sh;
        let now_ns = crate::ns_since(sh.epoch);
        let Some((from, seq, send_ns)) = conn::decode_text(body) else {
            sh.errors.add("unparsable message text");
            return;
        };
        let from = from as u32;
        if from == self.me {
            sh.own_room.fetch_add(1, Relaxed);
            return;
        }
        let v = self.log.rx.entry((from, stream)).or_default();
        let unique = match v.last() {
            None => {
                v.push(seq);
                true
            }
            Some(&last) if seq > last => {
                v.push(seq);
                true
            }
            _ => match v.binary_search(&seq) {
                Ok(_) => {
                    sh.duplicated.fetch_add(1, Relaxed);
                    false
                }
                Err(at) => {
                    v.insert(at, seq);
                    sh.out_of_order.fetch_add(1, Relaxed);
                    true
                }
            },
        };
        if !unique {
            return;
        }
        sh.deliveries.fetch_add(1, Relaxed);
        let latency_us = now_ns.saturating_sub(send_ns) / 1000;
        let shard = self.me as usize;
        sh.tl.delivered(shard, latency_us);
        if replay {
            sh.replayed.fetch_add(1, Relaxed);
            sh.replay_hist.record(shard, latency_us);
            let since_open = self.connected_at.elapsed().as_micros() as u64;
            sh.replay_rc_hist.record(shard, since_open);
        } else {
            sh.live_hist.record(shard, latency_us);
        }
    }
}

/// Advances a stream position by a stamped frame; `true` when the frame skipped offsets of
/// the same epoch.
fn step(pos: &mut Position, sh: &Shared, offset: Option<u64>, epoch: Option<&str>) -> bool {
    let (Some(offset), Some(epoch)) = (offset, epoch) else {
        sh.errors.add("stream frame without offset/epoch");
        return false;
    };
    let gap = epoch == pos.epoch && offset != pos.offset + 1;
    pos.offset = offset;
    if epoch != pos.epoch {
        pos.epoch = epoch.to_owned();
    }
    gap
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse() {
        let f: Frame<'_> = serde_json::from_str(
            r#"{"from":"a","action":"message","data":{"to":"b","text":"1:2:3:"},"offset":17,"epoch":"18c3-7f"}"#,
        )
        .unwrap();
        assert_eq!(
            (f.action, f.offset, f.epoch.as_deref()),
            ("message", Some(17), Some("18c3-7f"))
        );
        let f: Frame<'_> = serde_json::from_str(
            r#"{"from":"me","action":"recovered","data":{"recovered":false,"reason":"trimmed","count":0,"offset":9,"epoch":"e"}}"#,
        )
        .unwrap();
        let d = f.data.unwrap();
        assert_eq!(
            (d.recovered, d.reason, d.offset),
            (Some(false), Some("trimmed"), Some(9))
        );
        let f: Frame<'_> = serde_json::from_str(
            r#"{"from":"me","action":"history","data":{"since":0,"offset":0,"epoch":"e","messages":[{"x":1}],"more":false}}"#,
        )
        .unwrap();
        assert_eq!(f.data.unwrap().epoch.as_deref(), Some("e"));
        let f: Frame<'_> = serde_json::from_str(
            r#"{"from":"me","action":"joined","data":{"room":"r","members":3,"offset":4,"epoch":"e","recovered":true,"count":2}}"#,
        )
        .unwrap();
        assert_eq!(f.data.unwrap().count, Some(2));
    }

    #[test]
    fn url_encoding() {
        assert_eq!(url_encode("18c3f0a2b1-7f3a"), "18c3f0a2b1-7f3a");
        assert_eq!(url_encode("a b/c"), "a%20b%2Fc");
    }
}
