//! slowloris: a siege of stalled and oversized request heads against the first node, while
//! real clients keep connecting and messaging. Measures when the node closes each attacker
//! connection, the real clients' connect and message latency, and the node's memory during
//! the siege and after it.
//!
//! Attackers (environment variables, as they belong to this scenario alone):
//! - `SLOWLORIS_SLOW` (5000) connections send part of a request head, then one byte of a
//!   header value every second. Each reconnects when the node closes it (at most once a
//!   second), so the siege keeps its size.
//! - `SLOWLORIS_BIG` (4000) connections send `SLOWLORIS_BIG_KIB` (380) KiB of headers without
//!   the final CRLF and read the answer; each does so again every `SLOWLORIS_BIG_EVERY`
//!   (5) seconds.
//! - `SLOWLORIS_HEADER_TIMEOUT` (10): the node's `--http-header-timeout` in seconds. A slow
//!   connection open longer than that plus 2 s is a problem.
//!
//! Real clients: at `--rate` (20) pairs per second, two users connect, one messages the
//! other, both close. `--run-time` is the siege (attackers ramp up at `--hatch-rate` inside
//! it); `--grace` is how long the node's RSS (`--server-pid`) then has to come back to within
//! 16 MiB of its level before the siege.
//!
//! Problems (non-zero exit): a late slow connection, a real connect failure, lost or refused
//! messages, a real connect p99 over 200 ms, RSS growth over 100 MiB, RSS not back in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::Config;
use crate::conn::{self, Incoming, Target};
use crate::report::{
    ConnectStats, Counts, Latency, MemorySample, MessageStats, ProcMemory, Report, ShardedHist,
};
use crate::token::Minter;

/// Real clients' connect p99 must stay under this during the siege.
const MAX_CONNECT_P99: Duration = Duration::from_millis(200);
/// Node RSS may grow at most this much during the siege, MiB.
const MAX_GROWTH_MIB: u64 = 100;
/// After the siege, RSS must come back within this of its level before, MiB.
const BASELINE_SLACK_MIB: u64 = 16;
/// A slow connection may outlive the header timeout by this much (timer and scheduling).
const LATE_AFTER: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The siege's shape, from the environment.
struct Attack {
    slow: usize,
    big: usize,
    big_head: Arc<Vec<u8>>,
    big_every: Duration,
    header_timeout: Duration,
}

impl Attack {
    fn from_env() -> Result<Self> {
        fn var(name: &str, default: f64) -> Result<f64> {
            match std::env::var(name) {
                Ok(v) => match v.trim().parse::<f64>() {
                    Ok(n) if n >= 0.0 => Ok(n),
                    _ => bail!("{name}={v:?}: expected a non-negative number"),
                },
                Err(_) => Ok(default),
            }
        }
        let kib = var("SLOWLORIS_BIG_KIB", 380.0)? as usize;
        let mut head = b"GET /ws/big HTTP/1.1\r\nHost: siege\r\n".to_vec();
        let mut i = 0;
        while head.len() < kib * 1024 {
            head.extend_from_slice(format!("X-Big-{i:05}: {}\r\n", "b".repeat(1000)).as_bytes());
            i += 1;
        }
        Ok(Self {
            slow: var("SLOWLORIS_SLOW", 5000.0)? as usize,
            big: var("SLOWLORIS_BIG", 4000.0)? as usize,
            big_head: Arc::new(head),
            big_every: Duration::from_secs_f64(var("SLOWLORIS_BIG_EVERY", 5.0)?.max(0.1)),
            header_timeout: Duration::from_secs_f64(var("SLOWLORIS_HEADER_TIMEOUT", 10.0)?),
        })
    }
}

#[derive(Default)]
struct Shared {
    /// Attacker connections open right now (for the memory curve).
    open: AtomicI64,
    attack_connect_failed: AtomicU64,
    slow_opened: AtomicU64,
    slow_closed: AtomicU64,
    slow_late: AtomicU64,
    big_opened: AtomicU64,
    big_431: AtomicU64,
    big_other: Counts,
    /// Bytes a big-header connection got written before the node closed it.
    big_written: AtomicU64,
    // Real clients.
    /// Mints each real client's token (`--jwt-secret`).
    auth: Option<Arc<Minter>>,
    in_flight: AtomicUsize,
    connect_failures: Counts,
    sent: AtomicU64,
    delivered: AtomicU64,
    errored: AtomicU64,
}

pub(crate) async fn run(cfg: &Config, hard: Instant) -> Result<Report> {
    let attack = Arc::new(Attack::from_env()?);
    let nodes = crate::resolve_nodes(cfg).await?;
    let target = nodes[0].clone();
    let rate = cfg.rate.unwrap_or(20.0);
    let attackers = attack.slow + attack.big;
    let mut notes = Vec::new();
    if let Some(n) = crate::raise_nofile((attackers + 2 * cfg.max_cycles_in_flight + 256) as u64) {
        notes.push(n);
    }
    let pid = cfg.server_pids.first().copied();
    let baseline = pid.and_then(conn::rss_kib);
    let sh = Arc::new(Shared {
        auth: Minter::for_run(cfg.jwt_secret.as_deref(), Vec::new()),
        ..Shared::default()
    });
    let connect_hist = Arc::new(ShardedHist::new(8));
    let msg_hist = Arc::new(ShardedHist::new(8));
    let slow_close_hist = Arc::new(ShardedHist::new(8));
    let prefix = conn::run_prefix();
    let siege_end = (Instant::now() + cfg.run_time).min(hard - cfg.grace - Duration::from_secs(10));

    let sampler = pid.map(|pid| {
        let (sh, stop) = (
            sh.clone(),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut curve = Vec::new();
                while !stop.load(Relaxed) && curve.len() < 4096 {
                    curve.push(MemorySample {
                        connections: sh.open.load(Relaxed).max(0) as u64,
                        server_fds: conn::open_fds(pid).unwrap_or(0),
                        rss_kib: conn::rss_kib(pid).unwrap_or(0),
                    });
                    std::thread::sleep(SAMPLE_EVERY);
                }
                curve
            })
        };
        (stop, thread)
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    // Real clients from the first moment of the siege to its end.
    let clients = {
        let (sh, target, prefix) = (sh.clone(), target.clone(), prefix.clone());
        let (connect_hist, msg_hist) = (connect_hist.clone(), msg_hist.clone());
        let max_in_flight = cfg.max_cycles_in_flight;
        let timeout = cfg.connect_timeout;
        tokio::spawn(async move {
            let mut cycles = JoinSet::new();
            let every = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut due = Instant::now();
            let mut n = 0u64;
            while due < siege_end {
                tokio::time::sleep_until(due).await;
                due += every;
                if sh.in_flight.load(Relaxed) >= max_in_flight {
                    continue;
                }
                sh.in_flight.fetch_add(1, Relaxed);
                let (sh, target) = (sh.clone(), target.clone());
                let (connect_hist, msg_hist) = (connect_hist.clone(), msg_hist.clone());
                let ids = (format!("{prefix}-a{n}"), format!("{prefix}-b{n}"));
                n += 1;
                cycles.spawn(async move {
                    pair(&target, ids, timeout, &sh, &connect_hist, &msg_hist).await;
                    sh.in_flight.fetch_sub(1, Relaxed);
                });
            }
            while cycles.join_next().await.is_some() {}
        })
    };
    // Attackers, interleaved at random, ramped at the hatch rate.
    let mut kinds: Vec<bool> = (0..attackers).map(|i| i < attack.big).collect();
    fastrand::shuffle(&mut kinds);
    let k = crate::source_count(cfg, attackers);
    let interval = Duration::from_secs_f64(1.0 / cfg.hatch_rate);
    let ramp_start = Instant::now();
    for (i, big) in kinds.into_iter().enumerate() {
        let due = ramp_start + interval * i as u32;
        if due >= siege_end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let (target, sh, attack, stop) =
            (target.clone(), sh.clone(), attack.clone(), stop_rx.clone());
        let source = target.source_addr(i, k);
        if big {
            tasks.spawn(async move { big_head(&target, source, &sh, &attack, stop).await });
        } else {
            let hist = slow_close_hist.clone();
            tasks.spawn(async move { slow_head(&target, source, &sh, &attack, &hist, stop).await });
        }
    }
    tokio::time::sleep_until(siege_end).await;
    let _ = stop_tx.send(true);
    let _ = clients.await;
    crate::join_all(&mut tasks, Duration::from_secs(5)).await;
    let siege_secs = ramp_start.elapsed().as_secs_f64();

    // Recovery: how long until the node's RSS is back near where it was.
    let stopped = Instant::now();
    let mut recovered_after = None;
    if let (Some(pid), Some(base)) = (pid, baseline) {
        // Watch the whole grace period: the end of it is reported too.
        let recovery_end = stopped + cfg.grace;
        while Instant::now() < recovery_end {
            if recovered_after.is_none()
                && conn::rss_kib(pid).is_some_and(|r| r <= base + BASELINE_SLACK_MIB * 1024)
            {
                recovered_after = Some(stopped.elapsed());
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }
    let memory_curve = match sampler {
        Some((stop, thread)) => {
            stop.store(true, Relaxed);
            tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
                .await
                .unwrap_or_default()
        }
        None => Vec::new(),
    };

    let mut problems = Vec::new();
    let slow_close = Latency::from_hist(&slow_close_hist.merged());
    let ms = |us: u64| us as f64 / 1000.0;
    notes.push(format!(
        "slow heads: {} connections, {} closed by the node after p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (header timeout {:.0} ms); {} open longer than that + 2 s",
        sh.slow_opened.load(Relaxed),
        sh.slow_closed.load(Relaxed),
        ms(slow_close.p50),
        ms(slow_close.p99),
        ms(slow_close.max),
        attack.header_timeout.as_secs_f64() * 1000.0,
        sh.slow_late.load(Relaxed),
    ));
    let big_opened = sh.big_opened.load(Relaxed);
    let big_other = sh.big_other.take();
    notes.push(format!(
        "big heads ({} KiB): {big_opened} connections, {} answered 431, {} KiB written per connection before the close on average; otherwise {big_other:?}",
        attack.big_head.len() / 1024,
        sh.big_431.load(Relaxed),
        sh.big_written.load(Relaxed) / big_opened.max(1) / 1024,
    ));
    let failed = sh.attack_connect_failed.load(Relaxed);
    notes.push(format!("attacker connects that failed: {failed}"));
    if sh.slow_late.load(Relaxed) > 0 {
        problems.push(format!(
            "{} slow connections outlived the header timeout",
            sh.slow_late.load(Relaxed)
        ));
    }
    let connect = {
        let h = connect_hist.merged();
        let failures = sh.connect_failures.take();
        let failed: u64 = failures.values().sum();
        ConnectStats {
            attempted: h.len() + failed,
            connected: h.len(),
            failed,
            failures,
            secs: siege_secs,
            per_sec: h.len() as f64 / siege_secs.max(1e-9),
            latency_us: Latency::from_hist(&h),
        }
    };
    if Duration::from_micros(connect.latency_us.p99) > MAX_CONNECT_P99 {
        problems.push(format!(
            "real clients' connect p99 {:.1} ms is over {} ms",
            ms(connect.latency_us.p99),
            MAX_CONNECT_P99.as_millis()
        ));
    }
    let (sent, delivered, errored) = (
        sh.sent.load(Relaxed),
        sh.delivered.load(Relaxed),
        sh.errored.load(Relaxed),
    );
    let messages = MessageStats {
        sent,
        delivered,
        errored,
        lost: sent.saturating_sub(delivered + errored),
        send_secs: siege_secs,
        sent_per_sec: sent as f64 / siege_secs.max(1e-9),
        delivered_per_sec: delivered as f64 / siege_secs.max(1e-9),
        latency_us: Latency::from_hist(&msg_hist.merged()),
        ..MessageStats::default()
    };
    let mut memory = Vec::new();
    let mut final_rss = None;
    if let (Some(pid), Some(base)) = (pid, baseline) {
        let peak = memory_curve
            .iter()
            .map(|s| s.rss_kib)
            .max()
            .unwrap_or(base)
            .max(base);
        let peak_fds = memory_curve.iter().map(|s| s.server_fds).max().unwrap_or(0);
        let now = conn::rss_kib(pid).unwrap_or(0);
        final_rss = Some(now);
        memory.push(ProcMemory {
            pid,
            rss_before_kib: base,
            rss_after_kib: peak,
            per_conn_kib: ((peak - base) as f64 / attackers.max(1) as f64 * 100.0).round() / 100.0,
        });
        let mib = |kib: u64| kib as f64 / 1024.0;
        notes.push(format!(
            "node RSS: {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB), {:.1} MiB {:.0} s after the siege; back within {BASELINE_SLACK_MIB} MiB of before {}; peak open files {peak_fds}",
            mib(base),
            mib(peak),
            mib(peak - base),
            mib(now),
            cfg.grace.as_secs_f64(),
            match recovered_after {
                Some(d) => format!("{:.1} s after the siege", d.as_secs_f64()),
                None => format!("not within {:.0} s", cfg.grace.as_secs_f64()),
            },
        ));
        if peak - base > MAX_GROWTH_MIB * 1024 {
            problems.push(format!(
                "node RSS grew {:.1} MiB (limit {MAX_GROWTH_MIB})",
                mib(peak - base)
            ));
        }
        if recovered_after.is_none() {
            problems.push("node RSS did not come back to its level before the siege".to_owned());
        }
    } else {
        notes.push("no --server-pid: node memory not measured".to_owned());
    }
    Ok(Report {
        mode: "siege".to_owned(),
        run_prefix: prefix,
        users: attackers as u64,
        target_rate: Some(rate),
        connect,
        messages: Some(messages),
        memory,
        total_rss_kib: final_rss,
        memory_curve,
        notes,
        problems,
        ..Report::default()
    })
}

/// A plain TCP connection to `target`, from `source` if given.
async fn connect_raw(
    target: &Target,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let sock = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    if let Some(ip) = source {
        sock.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    let connect = sock.connect(target.addr);
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Waits until `at`, or returns `false` if the siege ended first.
async fn wait_until(at: Instant, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(at) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

/// One slowloris connection after another: part of a head, then a byte a second.
async fn slow_head(
    target: &Target,
    source: Option<std::net::IpAddr>,
    sh: &Shared,
    attack: &Attack,
    hist: &ShardedHist,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = Instant::now();
    while wait_until(next, &mut stop).await {
        next = Instant::now() + Duration::from_secs(1);
        let Ok(stream) = connect_raw(target, source).await else {
            sh.attack_connect_failed.fetch_add(1, Relaxed);
            continue;
        };
        sh.slow_opened.fetch_add(1, Relaxed);
        sh.open.fetch_add(1, Relaxed);
        let opened = Instant::now();
        let (mut rd, mut wr) = stream.into_split();
        let mut closed = wr
            .write_all(b"GET /ws/slow HTTP/1.1\r\nHost: siege\r\nX-Slow: ")
            .await
            .is_err();
        let mut tick =
            tokio::time::interval_at(opened + Duration::from_secs(1), Duration::from_secs(1));
        let mut buf = [0u8; 256];
        while !closed {
            tokio::select! {
                r = rd.read(&mut buf) => closed = matches!(r, Ok(0) | Err(_)),
                _ = tick.tick() => closed = wr.write_all(b"s").await.is_err(),
                _ = stop.changed() => break,
            }
        }
        sh.open.fetch_sub(1, Relaxed);
        let held = opened.elapsed();
        if held > attack.header_timeout + LATE_AFTER {
            sh.slow_late.fetch_add(1, Relaxed);
        }
        if !closed {
            return;
        }
        sh.slow_closed.fetch_add(1, Relaxed);
        hist.record(fastrand::usize(..), held.as_micros() as u64);
    }
}

/// One oversized head after another: write it all (or until the node closes), read the
/// answer.
async fn big_head(
    target: &Target,
    source: Option<std::net::IpAddr>,
    sh: &Shared,
    attack: &Attack,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = Instant::now();
    while wait_until(next, &mut stop).await {
        next = Instant::now() + attack.big_every;
        let Ok(stream) = connect_raw(target, source).await else {
            sh.attack_connect_failed.fetch_add(1, Relaxed);
            continue;
        };
        sh.big_opened.fetch_add(1, Relaxed);
        sh.open.fetch_add(1, Relaxed);
        let (mut rd, mut wr) = stream.into_split();
        let write = async {
            let mut written = 0;
            for chunk in attack.big_head.chunks(16 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    break;
                }
                written += chunk.len();
            }
            written
        };
        let read = async {
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return answer,
                    Ok(n) if answer.len() < 64 => answer.extend_from_slice(&buf[..n]),
                    Ok(_) => {}
                }
            }
        };
        let limit = attack.header_timeout + LATE_AFTER;
        let outcome = tokio::time::timeout(limit, async { tokio::join!(write, read) }).await;
        sh.open.fetch_sub(1, Relaxed);
        match outcome {
            Ok((written, answer)) => {
                sh.big_written.fetch_add(written as u64, Relaxed);
                if answer.starts_with(b"HTTP/1.1 431 ") {
                    sh.big_431.fetch_add(1, Relaxed);
                } else {
                    let head =
                        String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned();
                    sh.big_other.add(&format!("answer {head:?}"));
                }
            }
            Err(_) => sh.big_other.add("still open after the header timeout"),
        }
    }
}

/// A real client pair: both connect, one messages the other, both close.
async fn pair(
    target: &Target,
    (a_id, b_id): (String, String),
    timeout: Duration,
    sh: &Shared,
    connect_hist: &ShardedHist,
    msg_hist: &ShardedHist,
) {
    let connect = |id: String| async move {
        let t = Instant::now();
        match conn::connect(target, &id, sh.auth.as_deref(), None, 4096, timeout).await {
            Ok(ws) => {
                connect_hist.record(id.len(), t.elapsed().as_micros() as u64);
                Some(ws)
            }
            Err(kind) => {
                sh.connect_failures.add(&kind);
                None
            }
        }
    };
    let (Some(mut a), Some(mut b)) = (connect(a_id).await, connect(b_id.clone()).await) else {
        return;
    };
    let mut frame = String::new();
    conn::encode_message(&mut frame, &b_id, format_args!("0:0:0:"));
    let sent = Instant::now();
    if a.send(Message::text(frame)).await.is_err() {
        sh.connect_failures.add("send failed");
        return;
    }
    sh.sent.fetch_add(1, Relaxed);
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match b.next().await {
                Some(Ok(Message::Text(t))) => match conn::parse(&t) {
                    Incoming::Message(_) => return Some(true),
                    Incoming::Error(_) => return Some(false),
                    Incoming::Other => {}
                },
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await;
    match got {
        Ok(Some(true)) => {
            sh.delivered.fetch_add(1, Relaxed);
            msg_hist.record(0, sent.elapsed().as_micros() as u64);
        }
        Ok(Some(false)) => {
            sh.errored.fetch_add(1, Relaxed);
        }
        _ => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), a.close(None)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), b.close(None)).await;
}
