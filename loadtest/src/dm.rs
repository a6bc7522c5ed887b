//! dm-cross / dm-local / dm-multi: direct messages between held users, open or closed loop.
//!
//! dm-multi gives every user one session on every node; a user sends from its session on
//! its home node, and each message must reach every session of the recipient and every
//! other session of the sender (the server's copy). Each receiving session tracks order per
//! sender→recipient pair on its own, so a session that misses, repeats or reorders what its
//! sibling got shows up.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Incoming, Ws};
use crate::report::{
    Counts, DeliveryKind, Fanout, Latency, MessageStats, Report, ShardedHist, SlowMessage,
};
use crate::servers::Probe;
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

/// Who talks to whom, over how many sessions per user.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// One session per user; recipients on other nodes.
    Cross,
    /// One session per user; recipients on the sender's node.
    Local,
    /// One session per user on every node; recipients anywhere (each has a session on
    /// every node); the sender's other sessions receive a copy.
    Multi,
}

/// The sessions a dm-multi delivery can reach, as counted in [`Fanout`].
#[derive(Clone, Copy)]
enum Kind {
    /// The recipient's session on the node the message was sent to.
    SameNode,
    /// A recipient's session on another node.
    OtherNode,
    /// A session of the sender other than the one that sent (on another node).
    SenderCopy,
}

impl Kind {
    const ALL: [Self; 3] = [Self::SameNode, Self::OtherNode, Self::SenderCopy];

    fn name(self) -> &'static str {
        match self {
            Self::SameNode => "recipient, sending node",
            Self::OtherNode => "recipient, other node",
            Self::SenderCopy => "sender's other session",
        }
    }

    /// Deliveries of this kind per message with `nodes` nodes (one session on each).
    fn per_message(self, nodes: u64) -> u64 {
        match self {
            Self::SameNode => 1,
            Self::OtherNode | Self::SenderCopy => nodes - 1,
        }
    }
}

/// Receive-side counters of one [`Kind`].
struct KindCounters {
    delivered: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    hist: ShardedHist,
}

impl KindCounters {
    fn new() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            hist: ShardedHist::new(16),
        }
    }
}

/// Where a run is: connecting its users, sending (since when), waiting for what is in
/// flight, stopped.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Phase {
    Connecting,
    Sending(Instant),
    Draining,
    Stop,
}

/// Who a user sends to, fixed when the sending phase starts.
struct Plan {
    /// Candidate recipients per node index.
    targets: Vec<Vec<u32>>,
    /// Position of each user among the connected ones (open-loop stagger).
    slot: Vec<u32>,
    /// Number of connected users.
    live: u32,
    /// Open loop: total rate (messages/s).
    rate: Option<f64>,
    /// User index of each slot (open-loop pacer).
    by_slot: Vec<u32>,
}

impl Plan {
    /// Intended time of global open-loop send number `j` (user slot `j % live`).
    fn due(&self, start: Instant, j: u64, rate: f64) -> Instant {
        start + Duration::from_secs_f64(j as f64 / rate)
    }
}

struct Shared {
    epoch: Instant,
    ids: Vec<String>,
    /// Each user's home node: where its (only) sending session is.
    node_of: Vec<usize>,
    shape: Shape,
    /// Sessions per user (dm-multi: one per node; else 1). Connection `c` belongs to user
    /// `c / sessions`.
    sessions: usize,
    /// dm-multi: counters per [`Kind`], indexed like [`Kind::ALL`]; empty otherwise.
    kinds: Vec<KindCounters>,
    closed_loop: bool,
    /// Most frames written at once (`--frames-per-write`).
    frames_per_write: u32,
    plan: OnceLock<Plan>,
    /// Open loop: the pacer thread wakes a user when its next send is due.
    wake: Vec<Notify>,
    /// Closed loop: free in-flight slots per sender.
    permits: Vec<Semaphore>,
    /// Messages written (dm-multi: each is expected [`Shared::per_message`] times).
    sent: AtomicU64,
    /// Distinct deliveries, all receiving sessions together.
    delivered: AtomicU64,
    errored: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    hist: ShardedHist,
    errors: Counts,
    disconnects: Counts,
    /// `--slow-us`: the threshold and what crossed it (bounded).
    slow_us: Option<u64>,
    slow: std::sync::Mutex<Vec<SlowMessage>>,
    /// Start of the measuring phase, ns after `epoch`.
    send_start_ns: AtomicU64,
    /// The run second by second (for the HTML report).
    tl: Arc<Timeline>,
}

impl Shared {
    /// Deliveries one message must make: 1, or in dm-multi every session of the recipient
    /// and every other session of the sender.
    fn per_message(&self) -> u64 {
        2 * self.sessions as u64 - 1
    }

    /// The user and node of connection `c`.
    fn session_of(&self, c: usize) -> (u32, usize) {
        let user = c / self.sessions;
        let node = if self.sessions > 1 {
            c % self.sessions
        } else {
            self.node_of[user]
        };
        (user as u32, node)
    }
}

/// Most slow messages kept for the report.
const MAX_SLOW: usize = 1000;

/// Most messages a sender writes before it reads again (more, if `--frames-per-write` is
/// larger), so that its receipts do not wait behind a long burst.
const MAX_BATCH: u32 = 64;

pub(crate) async fn run(
    cfg: &Config,
    shape: Shape,
    hard: Instant,
    tl: &Arc<Timeline>,
) -> Result<Report> {
    let nodes = crate::resolve_nodes(cfg).await?;
    let n = cfg.users;
    match shape {
        Shape::Cross if nodes.len() < 2 => bail!("dm-cross needs at least two --node URLs"),
        Shape::Local if n < 2 * nodes.len() => bail!("dm-local needs at least two users per node"),
        Shape::Multi if nodes.len() < 2 || n < 2 => {
            bail!("dm-multi needs at least two --node URLs and two users")
        }
        _ => {}
    }
    let multi = shape == Shape::Multi;
    let sessions = if multi { nodes.len() } else { 1 };
    let prefix = conn::run_prefix();
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let node_of: Vec<usize> = (0..n).map(|i| i % nodes.len()).collect();
    let closed_loop = cfg.rate.is_none();
    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        ids,
        node_of,
        shape,
        sessions,
        kinds: if multi {
            Kind::ALL.iter().map(|_| KindCounters::new()).collect()
        } else {
            Vec::new()
        },
        closed_loop,
        frames_per_write: cfg.frames_per_write.max(1),
        plan: OnceLock::new(),
        wake: (0..n).map(|_| Notify::new()).collect(),
        permits: (0..n)
            .map(|_| Semaphore::new(cfg.in_flight.max(1) as usize))
            .collect(),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errored: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        out_of_order: AtomicU64::new(0),
        hist: ShardedHist::new(64),
        errors: Counts::default(),
        disconnects: Counts::default(),
        slow_us: cfg.slow_us,
        slow: std::sync::Mutex::new(Vec::new()),
        send_start_ns: AtomicU64::new(0),
        tl: tl.clone(),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);

    // Per-node source address counters so that each node's connections are spread.
    let conns = n * sessions;
    let k = crate::source_count(cfg, conns.div_ceil(nodes.len()));
    // Direct messages join no room.
    let auth = Minter::for_run(cfg.jwt_secret.as_deref(), Vec::new());
    let specs = (0..conns)
        .map(|c| {
            let (user, node) = sh.session_of(c);
            ConnSpec {
                target: nodes[node].clone(),
                source: nodes[node].source_addr(c / nodes.len(), k),
                id: sh.ids[user as usize].clone(),
                auth: auth.clone(),
            }
        })
        .collect();
    let mut tasks = JoinSet::new();
    let body = {
        let sh = sh.clone();
        move |c: usize, ws: Ws| {
            let (user, node) = sh.session_of(c);
            user_task(sh.clone(), user, node, ws, phase_rx.clone())
        }
    };
    let mut probe = Probe::start(&cfg.server_pids);
    let hatched = crate::hatch(cfg, specs, 16 * 1024, &mut tasks, hard, tl, false, body).await;

    // Build the plan from the users that are actually connected (all their sessions).
    let mut targets = vec![Vec::new(); nodes.len()];
    let mut slot = vec![0u32; n];
    let mut live = 0u32;
    let mut by_slot = Vec::new();
    for (i, sessions_up) in hatched.connected.chunks(sessions).enumerate() {
        if !sessions_up.iter().all(|&ok| ok) {
            continue;
        }
        slot[i] = live;
        by_slot.push(i as u32);
        live += 1;
        for (node, t) in targets.iter_mut().enumerate() {
            let wanted = match shape {
                Shape::Cross => node != sh.node_of[i],
                Shape::Local => node == sh.node_of[i],
                Shape::Multi => true,
            };
            if wanted {
                t.push(i as u32);
            }
        }
    }
    let _ = sh.plan.set(Plan {
        targets,
        slot,
        live,
        rate: cfg.rate,
        by_slot,
    });

    let mut report = Report {
        mode: if closed_loop {
            "closed-loop"
        } else {
            "open-loop"
        }
        .to_owned(),
        users: n as u64,
        target_rate: cfg.rate,
        in_flight: closed_loop.then_some(cfg.in_flight),
        frames_per_write: Some(sh.frames_per_write),
        connect: hatched.stats,
        ..Report::default()
    };

    // --events-check: a consumer of the events stream, from before the first send.
    let checker = match (cfg.events_check, cfg.redis.first()) {
        (false, _) => None,
        (true, None) => bail!("--events-check needs --redis <host:port>"),
        (true, Some(addr)) => {
            Some(crate::events_check::Checker::start(addr, cfg.events_shards, &prefix).await?)
        }
    };

    if let Some(at) = cfg.start_at {
        wait_for_start(at, live).await;
    }

    // Measuring phase.
    probe.sending();
    let send_start = Instant::now();
    sh.send_start_ns.store(
        send_start.duration_since(sh.epoch).as_nanos() as u64,
        Relaxed,
    );
    let _ = phase_tx.send(Phase::Sending(send_start));
    let pacer_stop = Arc::new(AtomicBool::new(false));
    if let Some(rate) = cfg.rate {
        let (sh, stop) = (sh.clone(), pacer_stop.clone());
        std::thread::spawn(move || pacer(&sh, send_start.into_std(), rate, &stop));
    }
    let send_end = (send_start + cfg.run_time).min(hard - cfg.grace - Duration::from_secs(5));
    tokio::time::sleep_until(send_end).await;
    pacer_stop.store(true, Relaxed);
    let _ = phase_tx.send(Phase::Draining);
    let send_secs = send_start.elapsed().as_secs_f64();
    let measuring = (tl.secs(send_start), tl.secs(Instant::now()));

    // Drain: wait until every sent message is accounted for, or the grace period ends.
    let grace_end = Instant::now() + cfg.grace;
    // Let senders observe the phase change before reading `sent`.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let per = sh.per_message();
    while Instant::now() < grace_end {
        let done = sh.delivered.load(Relaxed) + sh.errored.load(Relaxed) * per;
        if done >= sh.sent.load(Relaxed) * per {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report.servers = probe.finish(sh.delivered.load(Relaxed));
    let _ = phase_tx.send(Phase::Stop);
    crate::join_all(&mut tasks, Duration::from_secs(3)).await;
    if let Some(checker) = checker {
        let written = sh.sent.load(Relaxed);
        report.events_check = Some(
            checker
                .finish(written, cfg.grace.max(Duration::from_secs(10)))
                .await?,
        );
    }

    // dm-multi counts deliveries: each message written is expected `per` times.
    let written = sh.sent.load(Relaxed);
    let errored_msgs = sh.errored.load(Relaxed);
    let (sent, errored) = (written * per, errored_msgs * per);
    let delivered = sh.delivered.load(Relaxed);
    if multi {
        let nodes = sessions as u64;
        let kinds = Kind::ALL
            .iter()
            .zip(&sh.kinds)
            .map(|(&kind, c)| {
                let expected = (written - errored_msgs) * kind.per_message(nodes);
                let delivered = c.delivered.load(Relaxed);
                DeliveryKind {
                    kind: kind.name().to_owned(),
                    expected,
                    delivered,
                    lost: expected.saturating_sub(delivered),
                    duplicated: c.duplicated.load(Relaxed),
                    out_of_order: c.out_of_order.load(Relaxed),
                    latency_us: Latency::from_hist(&c.hist.merged()),
                }
            })
            .collect();
        report.fanout = Some(Fanout {
            messages: written,
            errored: errored_msgs,
            deliveries_per_message: per,
            kinds,
        });
    }
    report.messages = Some(MessageStats {
        sent,
        delivered,
        errored,
        lost: sent.saturating_sub(delivered + errored),
        duplicated: sh.duplicated.load(Relaxed),
        out_of_order: sh.out_of_order.load(Relaxed),
        send_secs,
        sent_per_sec: sent as f64 / send_secs,
        delivered_per_sec: delivered as f64 / send_secs,
        latency_us: Latency::from_hist(&sh.hist.merged()),
    });
    report.error_frames = sh.errors.take();
    report.disconnects = sh.disconnects.take();
    report.run_prefix = prefix;
    report.slow = std::mem::take(&mut *sh.slow.lock().unwrap_or_else(|e| e.into_inner()));
    report.measuring = Some(measuring);
    Ok(report)
}

/// Receive-side sequence tracking of one sender→recipient pair.
#[derive(Default)]
struct RxPair {
    next: u64,
    missing: BTreeSet<u64>,
}

/// Gaps larger than this are not tracked seq by seq (they would be loss anyway).
const MAX_GAP: u64 = 100_000;

enum Ev {
    Frame(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Phase(bool),
    Send,
}

/// One session of user `me` on node `node`. Only the session on the user's home node sends.
async fn user_task(
    sh: Arc<Shared>,
    me: u32,
    node: usize,
    mut ws: Ws,
    mut phase_rx: watch::Receiver<Phase>,
) {
    let mut rng = fastrand::Rng::new();
    let mut tx_seq: HashMap<u32, u64> = HashMap::new();
    // Keyed by sender→recipient pair: a session receives its own user's messages to
    // others too (dm-multi copies).
    let mut rx: HashMap<(u32, u32), RxPair> = HashMap::new();
    let sender = node == sh.node_of[me as usize];
    let multi = sh.shape == Shape::Multi;
    let mut buf = String::with_capacity(160);
    let mut phase = Phase::Connecting;
    let mut sending = false;
    // Open loop: this user's sends are global sends j = slot + m * live.
    let mut start = Instant::now();
    let mut j = 0u64;
    let mut step = 1u64;
    let mut rate = 1.0;
    let my_wake = &sh.wake[me as usize];
    let my_permits = &sh.permits[me as usize];
    let open = !sh.closed_loop;
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
                        if let Some(r) = plan.rate {
                            start = s;
                            rate = r;
                            j = u64::from(plan.slot[me as usize]);
                            step = u64::from(plan.live.max(1));
                        }
                        sending = sender;
                    }
                    Phase::Draining | Phase::Connecting => sending = false,
                    Phase::Stop => break,
                }
            }
            Ev::Send => {
                let plan = sh.plan.get().expect("plan is set before sending");
                let cands = &plan.targets[node];
                let mut batch = 0u32;
                // Frames fed since the last flush, and a flush that failed.
                let mut unflushed = 0u32;
                let mut broken = None;
                let now = Instant::now();
                loop {
                    let due = plan.due(start, j, rate);
                    if open && due > now {
                        break;
                    }
                    let to = match pick(&mut rng, cands, me, sh.shape == Shape::Cross) {
                        Some(t) => t,
                        None => {
                            sending = false;
                            break;
                        }
                    };
                    let seq = tx_seq.entry(to).or_insert(0);
                    let send_ns = if open {
                        due.duration_since(sh.epoch).as_nanos() as u64
                    } else {
                        crate::ns_since(sh.epoch)
                    };
                    buf.clear();
                    let to_id = &sh.ids[to as usize];
                    if multi {
                        // Names the recipient too: copies reach the sender's other sessions.
                        let header = format_args!("{me}:{seq}:{send_ns}:{to}:");
                        conn::encode_message(&mut buf, to_id, header);
                    } else {
                        conn::encode_message(
                            &mut buf,
                            to_id,
                            format_args!("{me}:{seq}:{send_ns}:"),
                        );
                    }
                    *seq += 1;
                    if ws.feed(Message::text(buf.as_str())).await.is_err() {
                        break;
                    }
                    sh.sent.fetch_add(1, Relaxed);
                    // The timeline counts deliveries due, as the report's `sent` does.
                    sh.tl.sent_n(sh.per_message());
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
                    if batch >= MAX_BATCH.max(sh.frames_per_write) {
                        break;
                    }
                    if !open {
                        match my_permits.try_acquire() {
                            Ok(p) => p.forget(),
                            Err(_) => break,
                        }
                    }
                }
                if open && batch >= MAX_BATCH.max(sh.frames_per_write) {
                    // More are due: come back after reading.
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
                    sh.tl.error();
                    break;
                }
            }
            Ev::Frame(None) => {
                sh.disconnects.add("eof");
                sh.tl.error();
                break;
            }
            Ev::Frame(Some(Err(e))) => {
                sh.disconnects.add(&conn::ws_error_kind(&e));
                sh.tl.error();
                break;
            }
            Ev::Frame(Some(Ok(msg))) => match msg {
                Message::Text(t) => match conn::parse(t.as_str()) {
                    Incoming::Message(text) => {
                        on_message(&sh, me, node, &mut rx, &text);
                    }
                    Incoming::Error(e) => {
                        sh.errors.add(&conn::error_key(&e));
                        sh.errored.fetch_add(1, Relaxed);
                        sh.tl.error();
                        if !open {
                            my_permits.add_permits(1);
                        }
                    }
                    Incoming::Other => {}
                },
                Message::Close(f) => {
                    if phase != Phase::Stop {
                        sh.disconnects.add(&conn::close_kind(f.as_ref()));
                        sh.tl.error();
                    }
                    break;
                }
                _ => {}
            },
        }
    }
    if *phase_rx.borrow() == Phase::Stop || phase == Phase::Stop {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}

fn pick(rng: &mut fastrand::Rng, cands: &[u32], me: u32, cross: bool) -> Option<u32> {
    if cross {
        return (!cands.is_empty()).then(|| cands[rng.usize(..cands.len())]);
    }
    if cands.len() < 2 {
        return None;
    }
    loop {
        let t = cands[rng.usize(..cands.len())];
        if t != me {
            return Some(t);
        }
    }
}

/// Counts one message received by user `me`'s session on `node`.
fn on_message(sh: &Shared, me: u32, node: usize, rx: &mut HashMap<(u32, u32), RxPair>, text: &str) {
    let now_ns = crate::ns_since(sh.epoch);
    let Some((from, seq, send_ns)) = conn::decode_text(text) else {
        sh.errors.add("unparsable message text");
        sh.tl.error();
        return;
    };
    let from = from as u32;
    let (to, kind) = if sh.shape == Shape::Multi {
        match multi_kind(sh, me, node, from, text) {
            Ok(k) => k,
            Err(e) => {
                sh.errors.add(e);
                return;
            }
        }
    } else {
        (me, None)
    };
    let counters = kind.map(|k| &sh.kinds[k as usize]);
    let pair = rx.entry((from, to)).or_default();
    let unique = if seq == pair.next {
        pair.next += 1;
        true
    } else if seq > pair.next {
        if seq - pair.next <= MAX_GAP {
            pair.missing.extend(pair.next..seq);
        }
        pair.next = seq + 1;
        true
    } else if pair.missing.remove(&seq) {
        sh.out_of_order.fetch_add(1, Relaxed);
        if let Some(c) = counters {
            c.out_of_order.fetch_add(1, Relaxed);
        }
        true
    } else {
        sh.duplicated.fetch_add(1, Relaxed);
        if let Some(c) = counters {
            c.duplicated.fetch_add(1, Relaxed);
        }
        false
    };
    if unique {
        sh.delivered.fetch_add(1, Relaxed);
        let latency_us = now_ns.saturating_sub(send_ns) / 1000;
        sh.hist.record(me as usize, latency_us);
        sh.tl.delivered(me as usize, latency_us);
        if let Some(c) = counters {
            c.delivered.fetch_add(1, Relaxed);
            c.hist.record(me as usize, latency_us);
        }
        if sh.slow_us.is_some_and(|t| latency_us > t) {
            let mut slow = sh.slow.lock().unwrap_or_else(|e| e.into_inner());
            if slow.len() < MAX_SLOW {
                let start = sh.send_start_ns.load(Relaxed);
                slow.push(SlowMessage {
                    sent_at_ms: send_ns.saturating_sub(start) as f64 / 1e6,
                    latency_us,
                    from,
                    to: me,
                });
            }
        }
        // dm-multi: one delivery per message gives the permit back, the recipient's on the
        // node after the sender's (the cross-node path, as in dm-cross).
        let returns_permit = match kind {
            None => true,
            Some(Kind::OtherNode) => node == (sh.node_of[from as usize] + 1) % sh.sessions,
            Some(_) => false,
        };
        if sh.closed_loop
            && returns_permit
            && let Some(p) = sh.permits.get(from as usize)
        {
            p.add_permits(1);
        }
    }
}

/// dm-multi: the recipient named in `text` and what kind of delivery reached user `me`'s
/// session on `node`; an error text when no session should have received it.
fn multi_kind(
    sh: &Shared,
    me: u32,
    node: usize,
    from: u32,
    text: &str,
) -> Result<(u32, Option<Kind>), &'static str> {
    let to = text
        .split(':')
        .nth(3)
        .and_then(|t| t.parse::<u32>().ok())
        .ok_or("unparsable message text")?;
    let from_node = *sh.node_of.get(from as usize).ok_or("unknown sender")?;
    let kind = if from == me {
        if node == from_node {
            return Err("copy received by the sending session");
        }
        Kind::SenderCopy
    } else if to != me {
        return Err("message for another user");
    } else if node == from_node {
        Kind::SameNode
    } else {
        Kind::OtherNode
    };
    Ok((to, Some(kind)))
}

/// Open-loop pacer: a dedicated thread (precise sleeps, unlike the 1 ms tokio
/// timer wheel) that wakes each user when its next send is due.
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
        let user = plan.by_slot[(j % live) as usize];
        sh.wake[user as usize].notify_one();
        j += 1;
    }
}

/// `--start-at`: waits until the wall-clock time `at` (Unix seconds), telling stderr how many
/// users are connected and how long the wait is (or how late the connects were).
async fn wait_for_start(at: f64, live: u32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let wait = at - now;
    if wait > 0.0 {
        eprintln!("dm: {live} users connected; sending starts in {wait:.1} s");
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    } else {
        eprintln!(
            "dm: {live} users connected {:.1} s after --start-at; sending now",
            -wait
        );
    }
}
