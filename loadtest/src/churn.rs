//! churn: short sessions (connect, one message to a held user on another node,
//! wait for delivery, close) started at a fixed rate.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Incoming, Target, Ws};
use crate::report::{ChurnStats, Counts, Latency, MessageStats, Report, ShardedHist};
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

#[derive(Default)]
struct Waiters {
    pending: HashMap<u64, oneshot::Sender<()>>,
    delivered: HashSet<u64>,
}

struct Shared {
    epoch: Instant,
    prefix: String,
    /// Mints each user's token (`--jwt-secret`), anchors' and cycles' alike.
    auth: Option<Arc<Minter>>,
    waiters: Mutex<Waiters>,
    sent: AtomicU64,
    delivered: AtomicU64,
    errored: AtomicU64,
    duplicated: AtomicU64,
    in_flight: AtomicUsize,
    msg_hist: ShardedHist,
    cycle_hist: ShardedHist,
    errors: Counts,
    failures: Counts,
    disconnects: Counts,
    completed: AtomicU64,
    /// The run second by second (for the HTML report).
    tl: Arc<Timeline>,
}

pub(crate) async fn run(cfg: &Config, hard: Instant, tl: &Arc<Timeline>) -> Result<Report> {
    let nodes = crate::resolve_nodes(cfg).await?;
    let Some(rate) = cfg.rate else {
        bail!("churn needs --rate (cycles per second)");
    };
    let prefix = conn::run_prefix();
    let sh = Arc::new(Shared {
        epoch: Instant::now(),
        prefix: prefix.clone(),
        auth: Minter::for_run(cfg.jwt_secret.as_deref(), Vec::new()),
        waiters: Mutex::new(Waiters::default()),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        errored: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        msg_hist: ShardedHist::new(8),
        cycle_hist: ShardedHist::new(8),
        errors: Counts::default(),
        failures: Counts::default(),
        disconnects: Counts::default(),
        completed: AtomicU64::new(0),
        tl: tl.clone(),
    });

    // Held partner users ("anchors"), round-robin over the nodes.
    let n = cfg.users;
    let specs = (0..n)
        .map(|i| ConnSpec {
            target: nodes[i % nodes.len()].clone(),
            source: None,
            id: format!("{prefix}-a{i}"),
            auth: sh.auth.clone(),
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut anchors = JoinSet::new();
    let body = {
        let sh = sh.clone();
        move |_i: usize, ws: Ws| anchor(sh.clone(), ws, stop_rx.clone())
    };
    let hatched = crate::hatch(cfg, specs, 4096, &mut anchors, hard, tl, false, body).await;
    // Anchors reachable from each node: those on other nodes (any with one node).
    let by_node: Vec<Arc<Vec<String>>> = (0..nodes.len())
        .map(|node| {
            Arc::new(
                (0..n)
                    .filter(|&i| {
                        hatched.connected[i] && (nodes.len() == 1 || i % nodes.len() != node)
                    })
                    .map(|i| format!("{prefix}-a{i}"))
                    .collect(),
            )
        })
        .collect();
    if by_node.iter().any(|v| v.is_empty()) {
        bail!("churn: no connected partner user for some node");
    }

    let start = Instant::now();
    let end = (start + cfg.run_time).min(hard - Duration::from_secs(20));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut cycles = JoinSet::new();
    let mut started = 0u64;
    let mut skipped = 0u64;
    let mut k = 0u64;
    loop {
        let due = start + interval.mul_f64(k as f64);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        while cycles.try_join_next().is_some() {}
        if sh.in_flight.load(Relaxed) >= cfg.max_cycles_in_flight {
            skipped += 1;
        } else {
            started += 1;
            sh.in_flight.fetch_add(1, Relaxed);
            let node = (k as usize) % nodes.len();
            cycles.spawn(cycle(
                sh.clone(),
                k,
                due,
                nodes[node].clone(),
                by_node[node].clone(),
                cfg.connect_timeout,
            ));
        }
        k += 1;
    }
    let run_secs = start.elapsed().as_secs_f64();
    let measuring = (tl.secs(start), tl.secs(Instant::now()));
    let wait = (cfg.connect_timeout + Duration::from_secs(8)).min(
        hard.saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_secs(5)),
    );
    crate::join_all(&mut cycles, wait).await;
    let _ = stop_tx.send(true);
    crate::join_all(&mut anchors, Duration::from_secs(3)).await;

    let completed = sh.completed.load(Relaxed);
    let sent = sh.sent.load(Relaxed);
    let delivered = sh.delivered.load(Relaxed);
    let errored = sh.errored.load(Relaxed);
    let mut failures = sh.failures.take();
    let unfinished = started.saturating_sub(completed + failures.values().sum::<u64>());
    if unfinished > 0 {
        failures.insert("unfinished at end".to_owned(), unfinished);
    }
    Ok(Report {
        mode: "cycles".to_owned(),
        run_prefix: prefix,
        users: n as u64,
        target_rate: Some(rate),
        connect: hatched.stats,
        messages: Some(MessageStats {
            sent,
            delivered,
            errored,
            lost: sent.saturating_sub(delivered + errored),
            duplicated: sh.duplicated.load(Relaxed),
            out_of_order: 0,
            send_secs: run_secs,
            sent_per_sec: sent as f64 / run_secs,
            delivered_per_sec: delivered as f64 / run_secs,
            latency_us: Latency::from_hist(&sh.msg_hist.merged()),
        }),
        churn: Some(ChurnStats {
            started,
            completed,
            skipped,
            failures,
            sessions_per_sec: completed as f64 / run_secs,
            cycle_latency_us: Latency::from_hist(&sh.cycle_hist.merged()),
        }),
        error_frames: sh.errors.take(),
        disconnects: sh.disconnects.take(),
        measuring: Some(measuring),
        ..Report::default()
    })
}

/// A held partner: receives churn messages and wakes the waiting cycle.
async fn anchor(sh: Arc<Shared>, mut ws: Ws, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            f = ws.next() => match f {
                Some(Ok(Message::Text(t))) => match conn::parse(t.as_str()) {
                    Incoming::Message(text) => on_anchor_message(&sh, &text),
                    Incoming::Error(e) => {
                        sh.errors.add(&conn::error_key(&e));
                        sh.tl.error();
                    }
                    Incoming::Other => {}
                },
                Some(Ok(Message::Close(f))) => {
                    sh.disconnects.add(&conn::close_kind(f.as_ref()));
                    sh.tl.error();
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    sh.disconnects.add(&conn::ws_error_kind(&e));
                    sh.tl.error();
                    return;
                }
                None => {
                    sh.disconnects.add("eof");
                    sh.tl.error();
                    return;
                }
            },
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

fn on_anchor_message(sh: &Shared, text: &str) {
    let now_ns = crate::ns_since(sh.epoch);
    let Some((k, _, send_ns)) = conn::decode_text(text) else {
        sh.errors.add("unparsable message text");
        return;
    };
    let mut w = sh.waiters.lock().unwrap_or_else(|e| e.into_inner());
    if !w.delivered.insert(k) {
        sh.duplicated.fetch_add(1, Relaxed);
        return;
    }
    sh.delivered.fetch_add(1, Relaxed);
    let latency_us = now_ns.saturating_sub(send_ns) / 1000;
    sh.msg_hist.record(k as usize, latency_us);
    sh.tl.delivered(k as usize, latency_us);
    if let Some(tx) = w.pending.remove(&k) {
        let _ = tx.send(());
    }
}

struct InFlightGuard<'a>(&'a AtomicUsize);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn cycle(
    sh: Arc<Shared>,
    k: u64,
    intended: Instant,
    target: Arc<Target>,
    partners: Arc<Vec<String>>,
    connect_timeout: Duration,
) {
    let _guard = InFlightGuard(&sh.in_flight);
    match cycle_inner(&sh, k, &target, &partners, connect_timeout).await {
        Ok(()) => {
            sh.completed.fetch_add(1, Relaxed);
            sh.cycle_hist
                .record(k as usize, intended.elapsed().as_micros() as u64);
        }
        Err(kind) => {
            sh.failures.add(&kind);
            sh.tl.error();
        }
    }
    sh.waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pending
        .remove(&k);
}

async fn cycle_inner(
    sh: &Shared,
    k: u64,
    target: &Target,
    partners: &[String],
    connect_timeout: Duration,
) -> Result<(), String> {
    let id = format!("{}-c{k}", sh.prefix);
    let mut ws = conn::connect(target, &id, sh.auth.as_deref(), None, 4096, connect_timeout)
        .await
        .map_err(|e| format!("connect {e}"))?;
    let _open = sh.tl.opened();
    let to = &partners[fastrand::usize(..partners.len())];
    let (tx, mut rx) = oneshot::channel();
    sh.waiters
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pending
        .insert(k, tx);
    let mut buf = String::with_capacity(160);
    let send_ns = crate::ns_since(sh.epoch);
    conn::encode_message(&mut buf, to, format_args!("c{k}:0:{send_ns}:"));
    ws.send(Message::text(buf))
        .await
        .map_err(|e| format!("send {}", conn::ws_error_kind(&e)))?;
    sh.sent.fetch_add(1, Relaxed);
    sh.tl.sent();
    let wait = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut rx => break,
            f = ws.next() => match f {
                Some(Ok(Message::Text(t))) => {
                    if let Incoming::Error(e) = conn::parse(t.as_str()) {
                        sh.errors.add(&conn::error_key(&e));
                        sh.errored.fetch_add(1, Relaxed);
                        return Err(format!("error frame: {}", conn::error_key(&e)));
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(conn::close_kind(f.as_ref())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(conn::ws_error_kind(&e)),
                None => return Err("eof before delivery".to_owned()),
            },
            () = &mut wait => return Err("delivery timeout".to_owned()),
        }
    }
    // Clean close handshake: send our close, read until the server's close/EOF.
    let closing = async {
        ws.close(None)
            .await
            .map_err(|e| format!("close {}", conn::ws_error_kind(&e)))?;
        while let Some(f) = ws.next().await {
            if f.is_err() {
                break;
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), closing).await {
        Ok(r) => r,
        Err(_) => Err("close timeout".to_owned()),
    }
}
