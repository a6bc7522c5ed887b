//! The events appender (`--events`): one task per node that appends what its users did to
//! the events stream (`P:events`, or `P:events:<k>` by user with `--events-shards`), for the
//! application's backend to read with a consumer group. It takes every event queued since
//! its last round trip and appends them in one pipeline (one plain `XADD` each), so the cost
//! per event is one `XADD` whatever the load; a session waiting on its event is told once
//! Redis has it. Events leave in the order they were queued, so one session's (queued one at
//! a time) are appended in the order they happened.
//!
//! The streams are trimmed to about `--events-maxlen` once a second ([`TRIM_EVERY`]: one
//! `XTRIM ... MAXLEN ~` per stream written since), not on every append: `MAXLEN ~` on each
//! `XADD` cost Redis 0.3–0.6 µs more per event (redis-benchmark, pipelined, 2026-12-07), a
//! third of the event's cost. A stream may so pass its cap by one second of events.
//!
//! The append cannot share the bus writer's inbox pipeline: a pipeline is not atomic, and an
//! event must be in Redis before anything it concerns is delivered (here or on another node).

use std::collections::BTreeSet;
use std::sync::Arc;

use redis::{RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::node::{EventRequest, Node};
use crate::redis::RedisConn;
use crate::wire::event::Field;

/// Most events appended in one pipeline.
const BATCH: usize = 1024;

/// How often the streams written to are trimmed to about `--events-maxlen`.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the appender until `drain` is cancelled and its queue is empty.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<EventRequest>, drain: CancellationToken) {
    let mut appender = Appender {
        node,
        conn: None,
        written: BTreeSet::new(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut trim = tokio::time::interval(TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = trim.tick() => {
                appender.trim().await;
                continue;
            }
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            _ = drain.cancelled() => {
                rx.close();
                while let Ok(event) = rx.try_recv() {
                    batch.push(event);
                }
                if !batch.is_empty() {
                    appender.append(&mut batch).await;
                }
                appender.trim().await;
                return;
            }
        }
        appender.append(&mut batch).await;
    }
}

struct Appender {
    node: Arc<Node>,
    /// Held across batches: a pool checkout costs a PING round trip.
    conn: Option<RedisConn>,
    /// The streams appended to since the last trim.
    written: BTreeSet<String>,
}

impl Appender {
    /// Appends `batch` and tells each waiter whether its event is in Redis.
    async fn append(&mut self, batch: &mut Vec<EventRequest>) {
        let node = Arc::clone(&self.node);
        let config = &node.config;
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        pipe.ignore_errors();
        for (event, _) in batch.iter() {
            let stream = node.keys.events_for(&event.user, config.events_shards);
            let cmd = pipe.cmd("XADD").arg(&stream).arg("*");
            self.written.insert(stream);
            for (name, value) in event.entry(&node.id) {
                cmd.arg(name);
                match value {
                    Field::Text(text) => cmd.arg(text),
                    Field::Number(n) => cmd.arg(n),
                };
            }
        }
        let started = std::time::Instant::now();
        let results = self.query(&pipe).await;
        metrics::histogram!("wsbus_events_append_seconds").record(started.elapsed().as_secs_f64());
        let (mut appended, mut failed) = (0u64, 0u64);
        for (i, (event, done)) in batch.drain(..).enumerate() {
            let ok = match &results {
                Ok(results) => matches!(results.get(i), Some(Ok(_))),
                Err(_) => false,
            };
            appended += u64::from(ok);
            if !ok {
                failed += 1;
                if done.is_none() {
                    tracing::warn!(kind = event.kind.as_str(), user = %event.user, "event not appended");
                }
            }
            if let Some(done) = done {
                // The session may have gone meanwhile; nothing to tell then.
                let _ = done.send(ok);
            }
        }
        metrics::counter!("wsbus_events_total", "result" => "appended").increment(appended);
        if failed > 0 {
            metrics::counter!("wsbus_events_total", "result" => "failed").increment(failed);
            if let Err(e) = &results {
                tracing::warn!(error = %e, events = failed, "events append failed");
            }
        }
    }

    /// Trims every stream appended to since the last trim to about `--events-maxlen`
    /// (`XTRIM ... MAXLEN ~`, one pipeline). A failed trim is retried at the next tick.
    async fn trim(&mut self) {
        if self.written.is_empty() {
            return;
        }
        let mut pipe = redis::Pipeline::with_capacity(self.written.len());
        for stream in &self.written {
            pipe.cmd("XTRIM")
                .arg(stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.node.config.events_maxlen)
                .ignore();
        }
        match self.query(&pipe).await {
            Ok(_) => self.written.clear(),
            Err(e) => {
                tracing::warn!(error = %e, "events streams not trimmed; retrying in a second")
            }
        }
    }

    /// Sends `pipe` on the held connection (or a new one); one result per command.
    async fn query(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> Result<Vec<RedisResult<Value>>, crate::redis::RedisError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.node.redis.conn().await?,
        };
        let results: Result<Vec<RedisResult<Value>>, _> = pipe
            .query_async(&mut conn)
            .await
            .map_err(crate::redis::RedisError::from);
        if !matches!(&results, Err(e) if crate::redis::is_connection_error(e)) {
            self.conn = Some(conn);
        }
        results
    }
}

/// One entry read from an events stream (by `wsbus events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventEntry {
    /// The stream it is in.
    pub stream: String,
    /// Its entry id.
    pub id: String,
    /// Its fields, in order.
    pub fields: Vec<(String, String)>,
}

impl EventEntry {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// One line for a terminal: time (UTC), type, `user@node#session`, the other fields.
    pub fn pretty(&self) -> String {
        let time = self
            .get("ts")
            .and_then(|ts| ts.parse::<u64>().ok())
            .map_or_else(|| "--:--:--.---".to_owned(), clock_of_day);
        let who = match (self.get("user"), self.get("node"), self.get("session")) {
            (Some(user), Some(node), Some(sid)) => format!("{user}@{node}#{sid}"),
            (Some(user), Some(node), None) => format!("{user}@{node}"),
            (None, Some(node), _) => format!("@{node}"),
            (user, _, _) => user.unwrap_or("-").to_owned(),
        };
        let mut line = format!("{time}  {:<15} {who:<28}", self.get("type").unwrap_or("?"));
        for (name, value) in &self.fields {
            if !matches!(name.as_str(), "type" | "user" | "node" | "session" | "ts") {
                line.push_str(&format!(" {name}={value}"));
            }
        }
        line
    }

    /// The entry as a JSON object: `stream`, `id` and its fields.
    pub fn json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"stream": self.stream, "id": self.id});
        for (name, value) in &self.fields {
            v[name] = serde_json::Value::String(value.clone());
        }
        v
    }
}

/// `HH:MM:SS.mmm` (UTC) of a time in ms since the epoch.
fn clock_of_day(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// An entry as `XREAD` returns it: id and field/value pairs.
type RawEntry = (String, Vec<(String, String)>);

/// Reads the events streams as they grow (`wsbus events`): from their end (or start), or as
/// a member of a consumer group, acknowledging what it has read.
pub struct Follower {
    /// The streams, with the last id read from each (plain reads).
    streams: Vec<(String, String)>,
    /// The consumer group and consumer name.
    group: Option<(String, String)>,
}

impl Follower {
    /// Follows `streams` from their start (`from_start`) or end; with `group`, as consumer
    /// `group.1` of group `group.0` (created where missing, at the start or end likewise).
    pub async fn new(
        conn: &mut RedisConn,
        streams: Vec<String>,
        from_start: bool,
        group: Option<(String, String)>,
    ) -> Result<Self, crate::redis::RedisError> {
        let start = if from_start { "0" } else { "$" };
        let mut with_ids = Vec::with_capacity(streams.len());
        for stream in streams {
            let mut last = start.to_owned();
            if let Some((name, _)) = &group {
                let created: RedisResult<()> = redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&stream)
                    .arg(name)
                    .arg(start)
                    .arg("MKSTREAM")
                    .query_async(conn)
                    .await;
                match created {
                    Err(e) if e.code() == Some("BUSYGROUP") => {}
                    other => other?,
                }
            } else if !from_start {
                // `$` means "after the last entry when the read starts": pin it now, so
                // that nothing appended between two reads is missed.
                let info: Vec<(String, Value)> = redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(conn)
                    .await?;
                last = info.first().map_or("0".to_owned(), |(id, _)| id.clone());
            }
            with_ids.push((stream, last));
        }
        Ok(Self {
            streams: with_ids,
            group,
        })
    }

    /// The next entries, at most `max` (waiting up to about `block` for some), every stream
    /// read on its own (a cluster's shards live on different nodes).
    pub async fn next(
        &mut self,
        conn: &mut RedisConn,
        block: std::time::Duration,
        max: usize,
    ) -> Result<Vec<EventEntry>, crate::redis::RedisError> {
        // One stream: a blocking read; several: a round of plain reads.
        let wait = (self.streams.len() == 1).then_some(block.as_millis() as u64);
        let mut out = Vec::new();
        for (stream, last) in &mut self.streams {
            if out.len() >= max {
                break;
            }
            let mut cmd = match &self.group {
                Some((group, consumer)) => {
                    let mut cmd = redis::cmd("XREADGROUP");
                    cmd.arg("GROUP").arg(group).arg(consumer);
                    cmd
                }
                None => redis::cmd("XREAD"),
            };
            cmd.arg("COUNT").arg((max - out.len()).min(256));
            if let Some(ms) = wait {
                cmd.arg("BLOCK").arg(ms.max(1));
            }
            let from = if self.group.is_some() {
                ">"
            } else {
                last.as_str()
            };
            cmd.arg("STREAMS").arg(&*stream).arg(from);
            let reply: Option<Vec<(String, Vec<RawEntry>)>> = cmd.query_async(conn).await?;
            for (_, entries) in reply.into_iter().flatten() {
                for (id, fields) in entries {
                    *last = id.clone();
                    out.push(EventEntry {
                        stream: stream.clone(),
                        id,
                        fields,
                    });
                }
            }
        }
        if let Some((group, _)) = &self.group {
            for entry in &out {
                redis::cmd("XACK")
                    .arg(&entry.stream)
                    .arg(group)
                    .arg(&entry.id)
                    .query_async::<()>(conn)
                    .await?;
            }
        }
        if out.is_empty() && wait.is_none() {
            tokio::time::sleep(block.min(std::time::Duration::from_millis(200))).await;
        }
        Ok(out)
    }
}
