//! The events appender (`--events`): one task per node that appends what its users did to
//! the events stream (`P:events`, or `P:events:<k>` by user with `--events-shards`), for the
//! application's backend to read with a consumer group. It takes every event queued since
//! its last round trip and appends them in one pipeline (`XADD ... MAXLEN ~`), so the cost
//! per event is one `XADD` whatever the load; a session waiting on its event is told once
//! Redis has it. Events leave in the order they were queued, so one session's (queued one at
//! a time) are appended in the order they happened.
//!
//! The append cannot share the bus writer's inbox pipeline: a pipeline is not atomic, and an
//! event must be in Redis before anything it concerns is delivered (here or on another node).

use std::sync::Arc;

use redis::{RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::node::{EventRequest, Node};
use crate::redis::RedisConn;
use crate::wire::event::Field;

/// Most events appended in one pipeline.
const BATCH: usize = 1024;

/// Runs the appender until `drain` is cancelled and its queue is empty.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<EventRequest>, drain: CancellationToken) {
    let mut appender = Appender { node, conn: None };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            biased;
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
}

impl Appender {
    /// Appends `batch` and tells each waiter whether its event is in Redis.
    async fn append(&mut self, batch: &mut Vec<EventRequest>) {
        let node = Arc::clone(&self.node);
        let config = &node.config;
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        pipe.ignore_errors();
        for (event, _) in batch.iter() {
            let cmd = pipe
                .cmd("XADD")
                .arg(node.keys.events_for(&event.user, config.events_shards))
                .arg("MAXLEN")
                .arg("~")
                .arg(config.events_maxlen)
                .arg("*");
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
