//! `--events-check` (dm-*): while messages flow, consume the nodes' events stream (`--events`
//! on the nodes) with a consumer group, as a backend would, and check that every message the
//! generator sent appears in it exactly once (by the generator's sequence numbers in the
//! text: `<sender>:<seq>:...`), reporting how far the consumer lagged behind.
//!
//! Speaks RESP over a plain TCP connection to the first `--redis` address (one Redis, not a
//! Cluster): no Redis client needed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// What the consumer found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EventsCheck {
    /// Streams read (`wsbus:events` or its shards).
    pub streams: Vec<String>,
    /// Messages the generator sent.
    pub sent: u64,
    /// Distinct messages of this run found in the stream.
    pub found: u64,
    /// Sent messages not found (`sent - found`, when the nodes refused none).
    pub missing: u64,
    /// Messages found more than once.
    pub duplicated: u64,
    /// `message` events of this run whose text the check could not read.
    pub unreadable: u64,
    /// Events read in all (every type, this run's and others').
    pub events_read: u64,
    /// Consumer lag: how old (ms, by the entry id's time) the events were when read.
    pub lag_ms_max: u64,
    /// Mean lag (ms) over the events read.
    pub lag_ms_mean: f64,
    /// Events still unread when sending stopped.
    pub behind_at_send_end: u64,
    /// Seconds the consumer took, after sending stopped, to read everything.
    pub catch_up_secs: f64,
}

/// The running consumer.
pub(crate) struct Checker {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<State>>,
    addr: String,
    streams: Vec<String>,
}

/// Per (sender, recipient): how often each sequence number was seen.
#[derive(Default)]
struct State {
    seen: HashMap<(u32, String), Vec<u8>>,
    unreadable: u64,
    events_read: u64,
    lag_sum_ms: u128,
    lag_max_ms: u64,
}

const GROUP: &str = "wsbus-loadtest";

impl Checker {
    /// Creates the group on every stream at its end (`$`) and starts reading; run it before
    /// the first message is sent.
    pub(crate) async fn start(addr: &str, shards: u32, run_prefix: &str) -> Result<Checker> {
        let streams: Vec<String> = match shards {
            0 | 1 => vec!["wsbus:events".to_owned()],
            n => (0..n).map(|k| format!("wsbus:events:{k}")).collect(),
        };
        let mut conn = Resp::connect(addr).await?;
        for s in &streams {
            // A group left by an earlier run is recreated at the end.
            conn.call(&["XGROUP", "DESTROY", s, GROUP]).await?;
            let created = conn
                .call(&["XGROUP", "CREATE", s, GROUP, "$", "MKSTREAM"])
                .await?;
            if let Value::Error(e) = created {
                bail!("XGROUP CREATE {s}: {e}");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(consume(
            conn,
            streams.clone(),
            format!("{run_prefix}-"),
            stop.clone(),
        ));
        Ok(Checker {
            stop,
            task,
            addr: addr.to_owned(),
            streams,
        })
    }

    /// Sending has stopped with `sent` messages written: reads on until the group has read
    /// everything (or `grace` passes) and reports.
    pub(crate) async fn finish(self, sent: u64, grace: Duration) -> Result<EventsCheck> {
        let started = std::time::Instant::now();
        let mut conn = Resp::connect(&self.addr).await?;
        let behind = self.behind(&mut conn).await?;
        while self.behind(&mut conn).await? > 0 && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let catch_up_secs = started.elapsed().as_secs_f64();
        self.stop.store(true, Relaxed);
        let state = self.task.await??;
        let (mut found, mut duplicated) = (0u64, 0u64);
        for counts in state.seen.values() {
            for &c in counts {
                found += u64::from(c > 0);
                duplicated += u64::from(c > 1);
            }
        }
        Ok(EventsCheck {
            streams: self.streams,
            sent,
            found,
            missing: sent.saturating_sub(found),
            duplicated,
            unreadable: state.unreadable,
            events_read: state.events_read,
            lag_ms_max: state.lag_max_ms,
            lag_ms_mean: state.lag_sum_ms as f64 / state.events_read.max(1) as f64,
            behind_at_send_end: behind,
            catch_up_secs,
        })
    }

    /// Entries not yet delivered to the group, over every stream (`XINFO GROUPS` `lag`).
    async fn behind(&self, conn: &mut Resp) -> Result<u64> {
        let mut total = 0;
        for s in &self.streams {
            let Value::Array(groups) = conn.call(&["XINFO", "GROUPS", s]).await? else {
                bail!("XINFO GROUPS {s}: unexpected reply");
            };
            for g in groups {
                let Value::Array(fields) = g else { continue };
                let mut it = fields.chunks(2);
                let is_ours = it
                    .clone()
                    .any(|kv| kv[0].text() == "name" && kv[1].text() == GROUP);
                if is_ours && let Some(kv) = it.find(|kv| kv[0].text() == "lag") {
                    total += kv[1].int().unwrap_or(0);
                }
            }
        }
        Ok(total)
    }
}

async fn consume(
    mut conn: Resp,
    streams: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> Result<State> {
    let mut state = State::default();
    while !stop.load(Relaxed) {
        let mut got = 0;
        for s in &streams {
            let mut args = vec!["XREADGROUP", "GROUP", GROUP, "lt", "COUNT", "1000"];
            if streams.len() == 1 {
                args.extend(["BLOCK", "100"]);
            }
            args.extend(["STREAMS", s, ">"]);
            let reply = conn.call(&args).await?;
            let ids = read_entries(&reply, &prefix, &mut state);
            got += ids.len();
            if !ids.is_empty() {
                let mut ack = vec!["XACK", s.as_str(), GROUP];
                ack.extend(ids.iter().map(String::as_str));
                conn.call(&ack).await?;
            }
        }
        if got == 0 && streams.len() > 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(state)
}

/// Records the `message` events of this run in an `XREADGROUP` reply; returns the entry ids.
fn read_entries(reply: &Value, prefix: &str, state: &mut State) -> Vec<String> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut ids = Vec::new();
    let Value::Array(streams) = reply else {
        return ids;
    };
    for stream in streams {
        let Value::Array(pair) = stream else { continue };
        let Some(Value::Array(entries)) = pair.get(1) else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let id = id.text();
            let at: u64 = id
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(now_ms);
            let lag = now_ms.saturating_sub(at);
            state.events_read += 1;
            state.lag_sum_ms += u128::from(lag);
            state.lag_max_ms = state.lag_max_ms.max(lag);
            record(fields, prefix, state);
            ids.push(id.to_owned());
        }
    }
    ids
}

/// One event's fields: a `message` of this run counts its (sender, recipient, seq).
fn record(fields: &[Value], prefix: &str, state: &mut State) {
    let get = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && kv[0].text() == name)
            .map(|kv| kv[1].text())
    };
    if get("type") != Some("message") || !get("user").is_some_and(|u| u.starts_with(prefix)) {
        return;
    }
    let parsed = get("data").and_then(|data| {
        let v: serde_json::Value = serde_json::from_str(data).ok()?;
        let to = v["to"].as_str()?.to_owned();
        let mut parts = v["text"].as_str()?.split(':');
        let from: u32 = parts.next()?.parse().ok()?;
        let seq: usize = parts.next()?.parse().ok()?;
        Some((from, to, seq))
    });
    let Some((from, to, seq)) = parsed else {
        state.unreadable += 1;
        return;
    };
    let counts = state.seen.entry((from, to)).or_default();
    if counts.len() <= seq {
        counts.resize(seq + 1, 0);
    }
    counts[seq] = counts[seq].saturating_add(1);
}

/// A RESP reply.
#[derive(Debug)]
enum Value {
    Nil,
    Int(i64),
    Text(String),
    Error(String),
    Array(Vec<Value>),
}

impl Value {
    fn text(&self) -> &str {
        match self {
            Value::Text(t) => t,
            _ => "",
        }
    }

    fn int(&self) -> Option<u64> {
        match self {
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        }
    }
}

/// A plain RESP2 connection.
struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    async fn connect(addr: &str) -> Result<Resp> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to Redis at {addr}"))?;
        Ok(Resp {
            stream: BufReader::new(stream),
        })
    }

    async fn call(&mut self, args: &[&str]) -> Result<Value> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.stream.get_mut().write_all(out.as_bytes()).await?;
        self.read().await
    }

    async fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            bail!("Redis closed the connection");
        }
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1);
        Ok(match kind {
            "+" => Value::Text(rest.to_owned()),
            "-" => Value::Error(rest.to_owned()),
            ":" => Value::Int(rest.parse()?),
            "$" if rest == "-1" => Value::Nil,
            "$" => {
                let mut buf = vec![0; rest.parse::<usize>()? + 2];
                self.stream.read_exact(&mut buf).await?;
                buf.truncate(buf.len() - 2);
                Value::Text(String::from_utf8_lossy(&buf).into_owned())
            }
            "*" if rest == "-1" => Value::Nil,
            "*" => {
                let n: usize = rest.parse()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(Box::pin(self.read()).await?);
                }
                Value::Array(items)
            }
            _ => bail!("unexpected RESP reply {line:?}"),
        })
    }
}
