//! api-publish: a backend publishing to random online users, over the HTTP API
//! (`POST /api/publish`, `--batch` publishes per request, 1 = single) or through the ingress
//! stream (`--via ingress`: pipelined `XADD`s of `--batch` entries to the first `--redis`).
//! The `--users` receivers are spread over the nodes; each frame carries its send time, so
//! the report gives deliveries per second and publish → socket latency, plus the request
//! (or pipeline) round-trip percentiles in the notes.
//!
//! `--rate` is the total publishes per second (open loop, spread over `--connections`
//! HTTP/Redis connections); without it each connection keeps one request in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Ws};
use crate::report::{Counts, Latency, MessageStats, Report, ShardedHist};
use crate::timeline::Timeline;
use crate::token::Minter;
use crate::{Config, ConnSpec};

/// How publishes reach the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// `POST /api/publish` on the nodes (round robin).
    Http,
    /// `XADD <prefix>:ingress` on the first `--redis` address.
    Ingress,
}

struct Shared {
    epoch: Instant,
    run_prefix: String,
    users: usize,
    /// Every publish's sequence number → received yet (duplicates are counted).
    seen: Vec<AtomicBool>,
    next_seq: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    latency: ShardedHist,
    requests: ShardedHist,
}

pub(crate) async fn run(cfg: &Config, hard: Instant, tl: &Arc<Timeline>) -> Result<Report> {
    let nodes = crate::resolve_nodes(cfg).await?;
    let key = cfg.api_key.clone().context("api-publish needs --api-key")?;
    if cfg.via == Via::Ingress && cfg.redis.is_empty() {
        bail!("--via ingress needs --redis host:port");
    }
    let batch = cfg.batch.max(1);
    let n = cfg.users;
    let run_prefix = conn::run_prefix();
    // Enough slots for the run at the target rate (or 1M/s without one), capped.
    let per_sec = cfg.rate.unwrap_or(1_000_000.0);
    let slots = ((per_sec * (cfg.run_time.as_secs_f64() + 1.0)) as usize).clamp(1 << 16, 1 << 27);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        run_prefix: run_prefix.clone(),
        users: n,
        seen: (0..slots).map(|_| AtomicBool::new(false)).collect(),
        next_seq: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        duplicated: AtomicU64::new(0),
        latency: ShardedHist::new(16),
        requests: ShardedHist::new(16),
    });
    let k = crate::source_count(cfg, n);
    let auth = Minter::for_run(cfg.jwt_secret.as_deref(), Vec::new());
    let specs = (0..n)
        .map(|i| {
            let target = nodes[i % nodes.len()].clone();
            ConnSpec {
                source: target.source_addr(i, k),
                target,
                id: format!("{run_prefix}-{i}"),
                auth: auth.clone(),
            }
        })
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let disconnects = Arc::new(Counts::default());
    let body = {
        let (shared, tl, d) = (shared.clone(), tl.clone(), disconnects.clone());
        move |i: usize, ws: Ws| {
            receive(
                i,
                ws,
                shared.clone(),
                tl.clone(),
                d.clone(),
                stop_rx.clone(),
            )
        }
    };
    let mut tasks = JoinSet::new();
    let hatched = crate::hatch(cfg, specs, 4096, &mut tasks, hard, tl, false, body).await;
    let connections = cfg.connections.max(1);
    let send_start = Instant::now();
    let send_end = (send_start + cfg.run_time).min(hard - Duration::from_secs(5) - cfg.grace);
    let mut senders = JoinSet::new();
    for c in 0..connections {
        let shared = shared.clone();
        let tl = tl.clone();
        let key = key.clone();
        let via = cfg.via;
        let addr = match via {
            Via::Http => nodes[c % nodes.len()].addr.to_string(),
            Via::Ingress => cfg.redis[0].clone(),
        };
        let interval = cfg
            .rate
            .map(|r| Duration::from_secs_f64(batch as f64 * connections as f64 / r));
        senders.spawn(async move {
            if let Err(e) = send(via, &addr, &key, batch, interval, send_end, &shared, &tl).await {
                eprintln!("sender {c}: {e:#}");
            }
        });
    }
    while senders.join_next().await.is_some() {}
    let send_secs = send_start.elapsed().as_secs_f64();
    // Wait for what is in flight.
    let sent = shared.sent.load(Relaxed);
    let grace_end = Instant::now() + cfg.grace;
    while shared.delivered.load(Relaxed) < sent && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    crate::join_all(&mut tasks, Duration::from_secs(5)).await;

    let delivered = shared.delivered.load(Relaxed);
    let failed = shared.failed.load(Relaxed);
    let requests = Latency::from_hist(&shared.requests.merged());
    let what = match cfg.via {
        Via::Http if batch == 1 => "HTTP request (single publish)".to_owned(),
        Via::Http => format!("HTTP request (batch of {batch})"),
        Via::Ingress => format!("ingress XADD pipeline ({batch} entries)"),
    };
    let mut notes = vec![format!(
        "{what} round trip, µs: p50 {} p90 {} p99 {} p99.9 {} max {} ({} requests, {:.0}/s over {connections} connections)",
        requests.p50,
        requests.p90,
        requests.p99,
        requests.p999,
        requests.max,
        requests.count,
        requests.count as f64 / send_secs.max(1e-9),
    )];
    if shared.next_seq.load(Relaxed) as usize >= shared.seen.len() {
        notes
            .push("sequence slots ran out: later publishes were not checked for duplicates".into());
    }
    Ok(Report {
        mode: if cfg.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        }
        .to_owned(),
        run_prefix,
        users: n as u64,
        target_rate: cfg.rate,
        connect: hatched.stats,
        messages: Some(MessageStats {
            sent,
            delivered,
            errored: failed,
            lost: sent.saturating_sub(delivered),
            duplicated: shared.duplicated.load(Relaxed),
            out_of_order: 0,
            send_secs,
            sent_per_sec: sent as f64 / send_secs.max(1e-9),
            delivered_per_sec: delivered as f64 / send_secs.max(1e-9),
            latency_us: Latency::from_hist(&shared.latency.merged()),
        }),
        disconnects: disconnects.take(),
        notes,
        ..Report::default()
    })
}

/// Reads `load` frames until told to stop: counts each publish once, with its latency.
async fn receive(
    i: usize,
    mut ws: Ws,
    shared: Arc<Shared>,
    tl: Arc<Timeline>,
    disconnects: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
) {
    #[derive(serde::Deserialize)]
    struct Frame {
        action: String,
        #[serde(default)]
        data: Data,
    }
    #[derive(serde::Deserialize, Default)]
    struct Data {
        #[serde(default)]
        s: u64,
        #[serde(default)]
        t: u64,
    }
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return,
            m = ws.next() => m,
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                let Ok(f) = serde_json::from_str::<Frame>(&text) else {
                    continue;
                };
                if f.action != "load" {
                    continue;
                }
                let micros = crate::ns_since(shared.epoch).saturating_sub(f.data.t) / 1000;
                match shared.seen.get(f.data.s as usize) {
                    Some(seen) if seen.swap(true, Relaxed) => {
                        shared.duplicated.fetch_add(1, Relaxed);
                        continue;
                    }
                    _ => {}
                }
                shared.delivered.fetch_add(1, Relaxed);
                shared.latency.record(i, micros);
                tl.delivered(i, micros);
            }
            Some(Ok(Message::Close(frame))) => {
                disconnects.add(&conn::close_kind(frame.as_ref()));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                disconnects.add(&conn::ws_error_kind(&e));
                return;
            }
            None => return,
        }
    }
}

/// One connection's publishing loop until `end`.
#[allow(clippy::too_many_arguments)]
async fn send(
    via: Via,
    addr: &str,
    key: &str,
    batch: usize,
    interval: Option<Duration>,
    end: Instant,
    shared: &Shared,
    tl: &Timeline,
) -> Result<()> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let mut buf = String::with_capacity(128 * batch + 256);
    let mut next = Instant::now();
    let mut i = 0usize;
    while Instant::now() < end {
        if let Some(interval) = interval {
            tokio::time::sleep_until(next).await;
            next += interval;
        }
        buf.clear();
        let t = crate::ns_since(shared.epoch);
        let mut seqs = Vec::with_capacity(batch);
        for _ in 0..batch {
            seqs.push(shared.next_seq.fetch_add(1, Relaxed));
        }
        let started = Instant::now();
        let ok = match via {
            Via::Http => http_publish(&mut stream, &mut buf, addr, key, &seqs, t, shared).await?,
            Via::Ingress => ingress_publish(&mut stream, &mut buf, &seqs, t, shared).await?,
        };
        shared
            .requests
            .record(i, started.elapsed().as_micros() as u64);
        i += 1;
        let n = batch as u64;
        if ok {
            shared.sent.fetch_add(n, Relaxed);
            tl.sent_n(n);
        } else {
            shared.failed.fetch_add(n, Relaxed);
            tl.error();
        }
    }
    Ok(())
}

fn recipient(shared: &Shared) -> String {
    format!("{}-{}", shared.run_prefix, fastrand::usize(..shared.users))
}

async fn http_publish(
    stream: &mut BufReader<TcpStream>,
    buf: &mut String,
    addr: &str,
    key: &str,
    seqs: &[u64],
    t: u64,
    shared: &Shared,
) -> Result<bool> {
    use std::fmt::Write as _;
    let mut body = String::with_capacity(96 * seqs.len() + 2);
    if seqs.len() > 1 {
        body.push('[');
    }
    for (j, s) in seqs.iter().enumerate() {
        if j > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"to":["{}"],"action":"load","data":{{"s":{s},"t":{t}}}}}"#,
            recipient(shared)
        );
    }
    if seqs.len() > 1 {
        body.push(']');
    }
    let _ = write!(
        buf,
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.get_mut().write_all(buf.as_bytes()).await?;
    // Status line and headers, then Content-Length bytes of body.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            bail!("connection closed by the node");
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .context("no Content-Length")?;
    let mut reply = vec![0u8; len];
    stream.read_exact(&mut reply).await?;
    if status != 200 {
        eprintln!("HTTP {status}: {}", String::from_utf8_lossy(&reply));
    }
    Ok(status == 200)
}

async fn ingress_publish(
    stream: &mut BufReader<TcpStream>,
    buf: &mut String,
    seqs: &[u64],
    t: u64,
    shared: &Shared,
) -> Result<bool> {
    use std::fmt::Write as _;
    for s in seqs {
        let to = recipient(shared);
        let data = format!(r#"{{"s":{s},"t":{t}}}"#);
        let args = [
            "XADD",
            "wsbus:ingress",
            "*",
            "to",
            &to,
            "action",
            "load",
            "data",
            &data,
        ];
        let _ = write!(buf, "*{}\r\n", args.len());
        for a in args {
            let _ = write!(buf, "${}\r\n{a}\r\n", a.len());
        }
    }
    stream.get_mut().write_all(buf.as_bytes()).await?;
    let mut ok = true;
    let mut line = String::new();
    for _ in seqs {
        line.clear();
        read_line(stream, &mut line).await?;
        match line.as_bytes().first() {
            Some(b'$') => {
                line.clear();
                read_line(stream, &mut line).await?;
            }
            _ => ok = false,
        }
    }
    Ok(ok)
}

async fn read_line(stream: &mut BufReader<TcpStream>, line: &mut String) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    if stream.read_line(line).await? == 0 {
        bail!("Redis closed the connection");
    }
    Ok(())
}
