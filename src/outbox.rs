//! The bus writer: one task per node that sends cross-node messages. It takes what sessions
//! queued, looks the recipients up in one pipeline, and appends to their nodes' inboxes in
//! another (`XADD NOMKSTREAM`), so a batch costs two round trips whatever its size,
//! and one writer keeps each sender's messages in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hub::{Delivery, Outbound};
use redis::{RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusConn, BusError};
use crate::node::Node;
use crate::protocol::{ClientError, encode_error, encode_message};
use crate::user::UserId;
use crate::wire::{Body, ENVELOPE_FIELD, Envelope};

/// A message for a user who is not on this node (as far as the sender's session knew).
#[derive(Debug)]
pub struct Outgoing {
    /// The sender, connected here.
    pub from: UserId,
    /// The recipient's id (validated).
    pub to: Box<str>,
    /// The text.
    pub text: Box<str>,
    /// When the frame reached this node (µs since the epoch).
    pub born_us: u64,
}

/// Runs the bus writer until `drain` is cancelled and the queue is empty.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Outgoing>, drain: CancellationToken) {
    let mut writer = Writer {
        node: node.clone(),
        conn: None,
        env_buf: Vec::with_capacity(256),
        key_buf: String::new(),
        routes: RouteCache {
            map: HashMap::new(),
            ttl: node.config.heartbeat_interval,
            capacity: 65_536,
        },
    };
    let mut batch = Vec::with_capacity(writer.node.config.bus_batch);
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, writer.node.config.bus_batch) => {
                if n == 0 {
                    return;
                }
            }
            _ = drain.cancelled() => {
                while let Ok(msg) = rx.try_recv() {
                    batch.push(msg);
                }
                if !batch.is_empty() {
                    writer.send(&mut batch).await;
                }
                return;
            }
        }
        writer.send(&mut batch).await;
    }
}

struct Writer {
    node: Arc<Node>,
    /// Held across batches: a pool checkout costs a PING round trip.
    conn: Option<BusConn>,
    env_buf: Vec<u8>,
    /// Reused for inbox key names.
    key_buf: String,
    routes: RouteCache,
}

/// Recently looked-up recipients → their node, so steady traffic skips the `HGET` round
/// trip. A stale entry is harmless: the old node forwards the entry to the recipient's new
/// node or answers `not found` to the sender (see `inbox`), and liveness is still checked
/// on every send. Entries live one heartbeat interval; the map is cleared when full.
struct RouteCache {
    map: HashMap<Box<str>, (Arc<str>, Instant)>,
    ttl: Duration,
    capacity: usize,
}

impl RouteCache {
    fn get(&self, user: &str, now: Instant) -> Option<&Arc<str>> {
        self.map
            .get(user)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(node, _)| node)
    }

    fn insert(&mut self, user: &str, node: Arc<str>, now: Instant) {
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(user.into(), (node, now));
    }
}

/// Where one message goes after the lookup.
enum Route {
    Remote(Arc<str>),
    Local,
    NotFound,
}

impl Writer {
    async fn send(&mut self, batch: &mut Vec<Outgoing>) {
        let result = match self.conn.take() {
            Some(conn) => Ok(conn),
            None => self.node.bus.conn().await,
        };
        let result = match result {
            Ok(mut conn) => {
                let sent = self.try_send(&mut conn, batch).await;
                if !matches!(&sent, Err(e) if crate::bus::is_connection_error(e)) {
                    self.conn = Some(conn);
                }
                sent
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, messages = batch.len(), "bus write failed");
            metrics::counter!("wsbus_bus_errors_total").increment(1);
            for msg in batch.iter() {
                self.reply_error(msg, &ClientError::BusUnavailable);
            }
        }
        batch.clear();
    }

    async fn try_send(&mut self, conn: &mut BusConn, batch: &[Outgoing]) -> Result<(), BusError> {
        let node = Arc::clone(&self.node);
        let now = Instant::now();
        let mut found: Vec<Option<Arc<str>>> = batch
            .iter()
            .map(|m| self.routes.get(&m.to, now).cloned())
            .collect();
        let misses: Vec<usize> = (0..batch.len()).filter(|&i| found[i].is_none()).collect();
        if !misses.is_empty() {
            let located = node
                .presence
                .locate(conn, misses.iter().map(|&i| &*batch[i].to))
                .await?;
            for (&i, at) in misses.iter().zip(located) {
                let at: Option<Arc<str>> = at.map(Into::into);
                match &at {
                    // Never cache this node: the session's own hub check is authoritative.
                    Some(n) if **n != *node.id => self.routes.insert(&batch[i].to, n.clone(), now),
                    _ => {
                        self.routes.map.remove(&*batch[i].to);
                    }
                }
                found[i] = at;
            }
        }
        let mut routes = Vec::with_capacity(batch.len());
        for at in found {
            routes.push(match at {
                None => Route::NotFound,
                Some(n) if *n == *node.id => Route::Local,
                Some(n) => {
                    if node.live.is_alive(conn, &n).await? {
                        Route::Remote(n)
                    } else {
                        Route::NotFound
                    }
                }
            });
        }
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(batch.len());
        for (msg, route) in batch.iter().zip(&routes) {
            match route {
                Route::Remote(target) => {
                    let id = node.next_message_id();
                    self.env_buf.clear();
                    Envelope {
                        id,
                        boot: node.boot,
                        origin: (&*node.id).into(),
                        from: msg.from.as_str().into(),
                        to: (&*msg.to).into(),
                        hops: 0,
                        sent_us: msg.born_us,
                        body: Body::Message {
                            text: (&*msg.text).into(),
                        },
                    }
                    .encode_into(&mut self.env_buf);
                    node.keys.inbox_into(target, &mut self.key_buf);
                    append_entry(
                        &mut pipe,
                        &self.key_buf,
                        msg.from.as_str(),
                        &msg.to,
                        "message",
                        &self.env_buf,
                    );
                    sent.push(msg);
                }
                Route::Local => self.deliver_here(msg),
                Route::NotFound => self.reply_not_found(msg),
            }
        }
        if sent.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let results: Vec<RedisResult<Value>> = pipe.query_async(conn).await?;
        tracing::trace!(?results, "XADD results");
        node.metrics
            .xadd_seconds
            .record(started.elapsed().as_secs_f64());
        node.metrics.to_bus.increment(sent.len() as u64);
        for (msg, result) in sent.into_iter().zip(results) {
            match result {
                Ok(Value::Nil) => self.reply_not_found(msg),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "XADD failed");
                    self.reply_error(msg, &ClientError::BusUnavailable);
                }
            }
        }
        Ok(())
    }

    /// The recipient turned out to be on this node (it connected meanwhile).
    fn deliver_here(&self, msg: &Outgoing) {
        let frame = Outbound {
            frame: encode_message(msg.from.as_str(), &msg.to, &msg.text).into(),
            born_us: msg.born_us,
        };
        match self.node.hub.deliver(&msg.to, frame) {
            Delivery::Queued => {}
            Delivery::NotHere => self.reply_not_found(msg),
            Delivery::SlowConsumer => {
                self.reply_error(msg, &ClientError::RecipientTooSlow(msg.to.to_string()));
            }
        }
    }

    fn reply_not_found(&self, msg: &Outgoing) {
        self.reply_error(msg, &ClientError::UserNotFound(msg.to.to_string()));
    }

    fn reply_error(&self, msg: &Outgoing, error: &ClientError) {
        error.count();
        let frame = Outbound::unmeasured(encode_error(msg.from.as_str(), &error.to_string()));
        self.node.hub.deliver(msg.from.as_str(), frame);
    }
}

/// Adds `XADD <inbox> NOMKSTREAM * from .. to .. action .. env ..` to `pipe`. (The length
/// cap is applied by the inbox owner's heartbeat, not per entry.)
pub fn append_entry(
    pipe: &mut redis::Pipeline,
    inbox: &str,
    from: &str,
    to: &str,
    action: &str,
    env: &[u8],
) {
    // Sized up front: a command grown arg by arg reallocates about ten times.
    const ARGS: usize = 12;
    let data = 24 + inbox.len() + from.len() + to.len() + action.len() + env.len();
    let mut cmd = redis::Cmd::with_capacity(ARGS, data);
    cmd.arg("XADD")
        .arg(inbox)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("from")
        .arg(from)
        .arg("to")
        .arg(to)
        .arg("action")
        .arg(action)
        .arg(ENVELOPE_FIELD)
        .arg(env);
    pipe.add_command(cmd);
}
