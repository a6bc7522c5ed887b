//! The bus writer: one task per node that sends what [`crate::dispatch`] hands it to other
//! nodes. It takes a batch, looks up where the recipients (and, with several sessions per user,
//! the senders) are in one pipeline, and appends one entry per destination node in another
//! (`XADD NOMKSTREAM`), so a batch costs two round trips whatever its size, and one writer
//! keeps each sender's messages in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{BusConn, BusError};
use crate::dispatch::{Dispatch, Origin, Plan, Target};
use crate::hub::Outbound;
use crate::node::Node;
use crate::protocol::{ClientError, encode_message};
use crate::wire::{Body, ENVELOPE_FIELD, Envelope, MAX_HOPS};

/// Runs the bus writer until `drain` is cancelled and the queue is empty.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Dispatch>, drain: CancellationToken) {
    let mut writer = Writer {
        routes: RouteCache {
            map: HashMap::new(),
            ttl: node.config.heartbeat_interval,
            capacity: 65_536,
            // With several sessions per user a cached route would miss a session that
            // connected on a new node since; lookups are then made on every batch.
            enabled: !node.config.multi_session(),
        },
        node,
        conn: None,
        env_buf: Vec::with_capacity(256),
        key_buf: String::new(),
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

/// The nodes a user has sessions on.
type Nodes = Arc<[Arc<str>]>;

/// Recently looked-up users → the nodes holding their sessions, so steady traffic skips the
/// lookup round trip (one session per user only). A stale entry is harmless: the old node
/// forwards the entry to the user's new node or answers `not found` to the sender (see
/// `inbox`), and liveness is still checked on every send. Entries live one heartbeat
/// interval; the map is cleared when full.
struct RouteCache {
    map: HashMap<Box<str>, (Nodes, Instant)>,
    ttl: Duration,
    capacity: usize,
    enabled: bool,
}

impl RouteCache {
    fn get(&self, user: &str, now: Instant) -> Option<&Nodes> {
        self.map
            .get(user)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(nodes, _)| nodes)
    }

    fn insert(&mut self, user: &str, nodes: Nodes, now: Instant) {
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(user.into(), (nodes, now));
    }
}

/// What became of one message of a batch.
#[derive(Default)]
struct Outcome {
    /// Some session of the recipient has it (here, or a node that already had it).
    reached: bool,
    /// An append for the recipient failed (so the answer is `bus unavailable`).
    failed: bool,
}

impl Writer {
    async fn send(&mut self, batch: &mut Vec<Dispatch>) {
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
                if let Some(env) = self
                    .node
                    .answer_error(&msg.origin, &ClientError::BusUnavailable)
                {
                    // The origin is another node, and the bus is what failed: its sender
                    // cannot be told.
                    tracing::debug!(to = %env.to, "cannot report a bus failure to another node");
                }
            }
        }
        batch.clear();
    }

    /// Where each user of the batch has sessions (every node, liveness not yet checked).
    async fn resolve<'b>(
        &mut self,
        conn: &mut BusConn,
        batch: &'b [Dispatch],
    ) -> Result<HashMap<&'b str, Nodes>, BusError> {
        let now = Instant::now();
        let mut found: HashMap<&'b str, Nodes> = HashMap::with_capacity(batch.len());
        let mut misses: Vec<&'b str> = Vec::new();
        for msg in batch {
            let Target::User(to) = &msg.target;
            let fresh = matches!(msg.origin, Origin::Forward { .. });
            let users = [Some(&**to), msg.echo.then(|| msg.origin.user())];
            for user in users.into_iter().flatten() {
                if found.contains_key(user) || misses.contains(&user) {
                    continue;
                }
                match self
                    .routes
                    .get(user, now)
                    .filter(|_| self.routes.enabled && !fresh)
                {
                    Some(nodes) => {
                        found.insert(user, nodes.clone());
                    }
                    None => misses.push(user),
                }
            }
        }
        if misses.is_empty() {
            return Ok(found);
        }
        let located = self.node.presence.locate(conn, misses.iter()).await?;
        for (user, nodes) in misses.into_iter().zip(located) {
            let nodes: Nodes = nodes.into_iter().map(Arc::from).collect();
            // Never cache this node: the session's own hub check is authoritative.
            if self.routes.enabled && !nodes.iter().any(|n| **n == *self.node.id) {
                self.routes.insert(user, nodes.clone(), now);
            } else {
                self.routes.map.remove(user);
            }
            found.insert(user, nodes);
        }
        Ok(found)
    }

    /// The live nodes among `nodes` (this node counts as live).
    async fn live(
        &self,
        conn: &mut BusConn,
        nodes: &[Arc<str>],
    ) -> Result<Vec<Arc<str>>, BusError> {
        let mut live = Vec::with_capacity(nodes.len());
        for n in nodes {
            if **n == *self.node.id || self.node.live.is_alive(conn, n).await? {
                live.push(n.clone());
            }
        }
        Ok(live)
    }

    async fn try_send(&mut self, conn: &mut BusConn, batch: &[Dispatch]) -> Result<(), BusError> {
        let node = Arc::clone(&self.node);
        let routes = self.resolve(conn, batch).await?;
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        pipe.ignore_errors();
        // Per entry appended: the message it belongs to, and whether it is for the recipient.
        let mut appended: Vec<(usize, bool)> = Vec::with_capacity(batch.len());
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let Target::User(to) = &msg.target;
            let from = msg.origin.user();
            let recipient = self.live(conn, &routes[&**to]).await?;
            let sender = match msg.echo {
                true => self.live(conn, &routes[from]).await?,
                false => Vec::new(),
            };
            let mut outcome = Outcome {
                reached: msg.delivered_here,
                failed: false,
            };
            if !msg.delivered_here && recipient.iter().any(|n| **n == *node.id) {
                // The recipient connected here since its sender's check (or moved here).
                let here = node.hub.deliver_user(to, None, || Outbound {
                    frame: encode_message(from, to, &msg.text).into(),
                    born_us: msg.born_us,
                });
                outcome.reached |= here.found();
            }
            let (tried, hops, id, boot, origin, origin_sid): (&[Box<str>], u8, _, _, &str, u64) =
                match &msg.origin {
                    Origin::Session { sid, .. } => (&[], 0, None, node.boot, &node.id, *sid),
                    Origin::Forward {
                        node: origin,
                        sid,
                        id,
                        boot,
                        hops,
                        tried,
                        ..
                    } => (tried, *hops, Some(*id), *boot, origin, *sid),
                };
            let plan = match hops > MAX_HOPS {
                // Forwarded once already: the recipient keeps moving; give up.
                true => Plan::default(),
                false => Plan::new(&node.id, &recipient, &sender, tried),
            };
            outcome.reached |= plan.recipient_elsewhere
                && recipient
                    .iter()
                    .any(|n| tried.iter().any(|t| **t == **n) && **n != *node.id);
            let multi = node.config.multi_session();
            for (target, to_recipient, to_sender) in &plan.entries {
                let mut all_tried = Vec::new();
                if multi {
                    all_tried.extend(tried.iter().map(|t| (&**t).into()));
                    all_tried.push((&*node.id).into());
                    all_tried.extend(plan.entries.iter().map(|(n, _, _)| (&**n).into()));
                }
                self.env_buf.clear();
                Envelope {
                    id: id.unwrap_or_else(|| node.next_message_id()),
                    boot,
                    origin: origin.into(),
                    from: from.into(),
                    to: (&**to).into(),
                    hops,
                    sent_us: msg.born_us,
                    origin_sid,
                    to_recipient: *to_recipient,
                    to_sender: *to_sender,
                    tried: all_tried,
                    body: Body::Message {
                        text: (&*msg.text).into(),
                    },
                }
                .encode_into(&mut self.env_buf);
                node.keys.inbox_into(target, &mut self.key_buf);
                append_entry(&mut pipe, &self.key_buf, from, to, "message", &self.env_buf);
                appended.push((i, *to_recipient));
            }
            outcomes.push(outcome);
        }
        if !appended.is_empty() {
            let started = std::time::Instant::now();
            let results: Vec<RedisResult<Value>> = pipe.query_async(conn).await?;
            tracing::trace!(?results, "XADD results");
            node.metrics
                .xadd_seconds
                .record(started.elapsed().as_secs_f64());
            node.metrics.to_bus.increment(appended.len() as u64);
            for ((i, for_recipient), result) in appended.into_iter().zip(results) {
                match result {
                    // NOMKSTREAM: the node's inbox is gone (it died or left).
                    Ok(Value::Nil) => {}
                    Ok(_) => outcomes[i].reached |= for_recipient,
                    Err(e) => {
                        tracing::warn!(error = %e, "XADD failed");
                        metrics::counter!("wsbus_bus_errors_total").increment(1);
                        outcomes[i].failed |= for_recipient;
                    }
                }
            }
        }
        let mut errors = Vec::new();
        for (msg, outcome) in batch.iter().zip(outcomes) {
            if !outcome.reached {
                let Target::User(to) = &msg.target;
                let error = match outcome.failed {
                    true => ClientError::BusUnavailable,
                    false => ClientError::UserNotFound(to.to_string()),
                };
                errors.extend(node.answer_error(&msg.origin, &error));
            }
        }
        if !errors.is_empty() {
            let mut pipe = redis::pipe();
            for env in &errors {
                self.env_buf.clear();
                env.encode_into(&mut self.env_buf);
                node.keys.inbox_into(&env.origin, &mut self.key_buf);
                append_entry(
                    &mut pipe,
                    &self.key_buf,
                    &env.from,
                    &env.to,
                    "error",
                    &self.env_buf,
                );
            }
            pipe.query_async::<()>(conn).await?;
        }
        Ok(())
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
