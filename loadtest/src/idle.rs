//! idle-connections: hold many connections to the first node; connect rate and
//! server memory per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Ws};
use crate::report::{Counts, MemoryFit, MemorySample, ProcMemory, Report};
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

/// How often server RSS is sampled during the ramp, and the most samples kept.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const MAX_SAMPLES: usize = 4096;

pub(crate) async fn run(cfg: &Config, hard: Instant, tl: &Arc<Timeline>) -> Result<Report> {
    let nodes = crate::resolve_nodes(cfg).await?;
    let target = nodes[0].clone();
    let n = cfg.users;
    let prefix = conn::run_prefix();
    let k = crate::source_count(cfg, n);
    let before: Vec<(u32, Option<u64>)> = cfg
        .server_pids
        .iter()
        .map(|&p| (p, conn::rss_kib(p)))
        .collect();

    let auth = Minter::for_run(cfg.jwt_secret.as_deref(), Vec::new());
    let specs = (0..n)
        .map(|i| ConnSpec {
            target: target.clone(),
            source: target.source_addr(i, k),
            id: format!("{prefix}-{i}"),
            auth: auth.clone(),
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let disconnects = Arc::new(Counts::default());
    let held = Arc::new(AtomicU64::new(0));
    let body = {
        let (d, held, tl) = (disconnects.clone(), held.clone(), tl.clone());
        move |_i: usize, ws: Ws| {
            held.fetch_add(1, Relaxed);
            hold(ws, stop_rx.clone(), d.clone(), tl.clone())
        }
    };
    // Server RSS against the server's open sockets, sampled during the ramp: the slope is
    // the memory per connection, and its fit says how far it may be extrapolated. (The
    // server's count, not ours: under load the client lags behind the server.)
    // A thread, not a task: reading /proc/<pid>/fd with 100k entries blocks for a while.
    let pids = cfg.server_pids.clone();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = (!pids.is_empty()).then(|| {
        let (held, stop) = (held.clone(), stop_sampling.clone());
        std::thread::spawn(move || {
            let mut curve = Vec::new();
            while !stop.load(Relaxed) && curve.len() < MAX_SAMPLES {
                curve.push(MemorySample {
                    connections: held.load(Relaxed),
                    server_fds: pids.iter().filter_map(|&p| conn::open_fds(p)).sum(),
                    rss_kib: pids.iter().filter_map(|&p| conn::rss_kib(p)).sum(),
                });
                std::thread::sleep(SAMPLE_EVERY);
            }
            curve
        })
    });
    let mut tasks = JoinSet::new();
    let hatched = crate::hatch(cfg, specs, 4096, &mut tasks, hard, tl, true, body).await;
    // Let the server settle (allocations after the upgrade) before sampling.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_sampling.store(true, Relaxed);
    let memory_curve = match sampler {
        Some(s) => tokio::task::spawn_blocking(move || s.join().unwrap_or_default())
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let memory_fit = MemoryFit::of(&memory_curve);
    let connected = hatched.stats.connected.max(1) as f64;
    let memory: Vec<ProcMemory> = before
        .iter()
        .map(|&(pid, b)| {
            let before = b.unwrap_or(0);
            let after = conn::rss_kib(pid).unwrap_or(0);
            ProcMemory {
                pid,
                rss_before_kib: before,
                rss_after_kib: after,
                per_conn_kib: ((after as f64 - before as f64) / connected * 100.0).round() / 100.0,
            }
        })
        .collect();
    let mut notes = Vec::new();
    for (pid, b) in &before {
        if b.is_none() {
            notes.push(format!("could not read /proc/{pid}/status"));
        }
    }
    if k > 1 {
        notes.push(format!(
            "client sockets spread over {k} loopback source addresses"
        ));
    }
    let hold_start = Instant::now();
    let hold_end = (hold_start + cfg.run_time).min(hard - Duration::from_secs(5));
    tokio::time::sleep_until(hold_end).await;
    let _ = stop_tx.send(true);
    crate::join_all(&mut tasks, Duration::from_secs(5)).await;

    Ok(Report {
        mode: "hold".to_owned(),
        run_prefix: prefix,
        users: n as u64,
        connect: hatched.stats,
        total_rss_kib: (!memory.is_empty()).then(|| memory.iter().map(|m| m.rss_after_kib).sum()),
        memory,
        memory_curve,
        memory_fit,
        disconnects: disconnects.take(),
        notes,
        measuring: Some((tl.secs(hold_start), tl.secs(hold_end))),
        ..Report::default()
    })
}

/// Holds one connection (answering pings) until stopped.
async fn hold(
    mut ws: Ws,
    mut stop: watch::Receiver<bool>,
    disconnects: Arc<Counts>,
    tl: Arc<Timeline>,
) {
    let dropped = |kind: &str| {
        disconnects.add(kind);
        tl.error();
    };
    loop {
        tokio::select! {
            f = ws.next() => match f {
                Some(Ok(Message::Close(f))) => {
                    dropped(&conn::close_kind(f.as_ref()));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    dropped(&conn::ws_error_kind(&e));
                    return;
                }
                None => {
                    dropped("eof");
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
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}
