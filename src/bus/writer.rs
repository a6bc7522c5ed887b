//! The bus writer: one task per node that sends what [`crate::delivery::target`] hands it to other
//! nodes. It takes a batch, looks up where the recipients (and, with several sessions per user,
//! the senders) are in one pipeline, and appends the envelopes in another (`XADD NOMKSTREAM`),
//! so a batch costs two round trips whatever its size, and one writer keeps each sender's
//! messages in order.
//!
//! Each message gets one envelope per destination node; the envelopes of a batch for one
//! node are packed into one inbox entry, in batch order (at most `--bus-pack` each; an entry
//! with one envelope keeps the single layout, see [`crate::wire::envelope`]). Redis pays one
//! `XADD` per node per batch instead of one per message. An entry's result is every one of
//! its messages' result: appended, the inbox gone (`NOMKSTREAM`: unreached, as if each had
//! its own entry), or failed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::delivery::target::{Dispatch, Origin, Payload, Plan, Target};
use crate::history::{Appended, Appends, Located, Seq, Stream};
use crate::node::Node;
use crate::redis::keys::Keys;
use crate::redis::{RedisConn, RedisError};
use crate::wire::client::{ClientError, encode_message, encode_room_message};
use crate::wire::envelope::{Body, Envelope, MAX_HOPS, Pack, Stamp, append_entry, append_packed};
use crate::wire::frame::SocketFrame;
use tungstenite::Utf8Bytes;

/// Runs the bus writer until `drain` is cancelled and the queue is empty.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Dispatch>, drain: CancellationToken) {
    let mut writer = Writer {
        routes: RouteCache {
            map: HashMap::new(),
            ttl: node.config.heartbeat_interval,
            capacity: 65_536,
            // With several sessions per user a cached route would miss a session that
            // connected on a new node since; lookups are then made on every batch.
            // With history on, the append that stamps a message says where its target is.
            enabled: !node.config.multi_session() && node.history.is_none(),
        },
        node,
        conn: None,
        env_buf: Vec::with_capacity(256),
        key_buf: String::new(),
        entries: Entries::default(),
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
    conn: Option<RedisConn>,
    env_buf: Vec<u8>,
    /// Reused for inbox key names.
    key_buf: String,
    routes: RouteCache,
    /// Reused batch after batch, for its buffers.
    entries: Entries,
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

/// Where the users and rooms of one batch are.
#[derive(Default)]
struct Routes<'b> {
    users: HashMap<&'b str, Nodes>,
    rooms: HashMap<&'b str, Nodes>,
}

/// What became of one message of a batch.
#[derive(Default)]
struct Outcome {
    /// Some session of the recipient has it (here, or a node that already had it).
    reached: bool,
    /// The recipient's sessions here refused it as slow consumers (and nothing else got it).
    too_slow: bool,
    /// An append for the recipient failed (so the answer is `bus unavailable`).
    failed: bool,
}

/// A message's place in its target's history stream (`--history`).
enum Stamped {
    /// In the stream: the frame as stamped, its place, and (when it was appended just now)
    /// where the target is, from the same call.
    Stored {
        frame: Utf8Bytes,
        seq: Arc<Seq>,
        nodes: Option<Nodes>,
    },
    /// The target has no live stream and no session (a user: `not found`) or member (a
    /// room: no error): nothing stored.
    NoStream,
    /// The append failed: nothing was sent (`bus unavailable`).
    Failed,
}

impl Stamped {
    /// The place a forwarded entry's frame has already (its recipient moved after it was
    /// stamped), from the entry.
    fn forwarded(msg: &Dispatch) -> Option<Stamped> {
        let (stamp, Payload::Frame { frame, .. }) = (msg.stamp.as_ref()?, &msg.payload) else {
            return None;
        };
        Some(Stamped::Stored {
            frame: frame.clone(),
            seq: Arc::new(Seq {
                room: match &msg.target {
                    Target::Room(room) => Some(Arc::from(&**room)),
                    Target::User(_) => None,
                },
                offset: stamp.offset,
                epoch: Arc::from(&*stamp.epoch),
                marker: false,
            }),
            nodes: None,
        })
    }

    /// Records what became of one stream's part of the batch in `stamped` (by message).
    fn record(appended: Appended, stamped: &mut [Option<Stamped>]) {
        match appended {
            Appended::Stored { target, frames } => {
                let nodes: Nodes = match target {
                    Located::Nodes(nodes) => nodes.into_iter().map(Arc::from).collect(),
                    Located::Sessions(fields) => crate::cluster::presence::nodes_of(fields)
                        .into_iter()
                        .map(Arc::from)
                        .collect(),
                };
                for stored in frames {
                    stamped[stored.message] = Some(Stamped::Stored {
                        frame: stored.frame.into(),
                        seq: stored.seq,
                        nodes: Some(nodes.clone()),
                    });
                }
            }
            Appended::NoStream { messages } => {
                for i in messages {
                    stamped[i] = Some(Stamped::NoStream);
                }
            }
            Appended::Failed { messages, error } => {
                tracing::warn!(error = %error, "history append failed");
                metrics::counter!("wsbus_bus_errors_total").increment(1);
                for i in messages {
                    stamped[i] = Some(Stamped::Failed);
                }
            }
        }
    }

    fn stored(&self) -> Option<(&Utf8Bytes, &Arc<Seq>)> {
        match self {
            Stamped::Stored { frame, seq, .. } => Some((frame, seq)),
            _ => None,
        }
    }

    fn nodes(&self) -> Option<&Nodes> {
        match self {
            Stamped::Stored { nodes, .. } => nodes.as_ref(),
            _ => None,
        }
    }
}

impl Writer {
    async fn send(&mut self, batch: &mut Vec<Dispatch>) {
        let result = match self.conn.take() {
            Some(conn) => Ok(conn),
            None => self.node.redis.conn().await,
        };
        let result = match result {
            Ok(mut conn) => {
                let sent = self.try_send(&mut conn, batch).await;
                if !matches!(&sent, Err(e) if crate::redis::is_connection_error(e)) {
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

    /// Where each user (and room) of the batch has sessions: every node, liveness not yet
    /// checked. Users come from the route cache where it is on; the rest is one pipeline.
    async fn resolve<'b>(
        &mut self,
        conn: &mut RedisConn,
        batch: &'b [Dispatch],
        stamped: &[Option<Stamped>],
    ) -> Result<Routes<'b>, RedisError> {
        let now = Instant::now();
        let mut routes = Routes::default();
        let mut users: Vec<&'b str> = Vec::new();
        let mut rooms: Vec<&'b str> = Vec::new();
        for (msg, stamped) in batch.iter().zip(stamped) {
            // Where the target is came with its append.
            let known = stamped.as_ref().is_some_and(|s| s.nodes().is_some())
                || matches!(stamped, Some(Stamped::NoStream | Stamped::Failed));
            match &msg.target {
                Target::Room(room) => {
                    if !known && !rooms.contains(&&**room) {
                        rooms.push(room);
                    }
                }
                Target::User(to) => {
                    let fresh = matches!(msg.origin, Origin::Forward { .. });
                    let wanted = [
                        (!known).then_some(&**to),
                        msg.echo.then(|| msg.origin.user()),
                    ];
                    for user in wanted.into_iter().flatten() {
                        if routes.users.contains_key(user) || users.contains(&user) {
                            continue;
                        }
                        match self
                            .routes
                            .get(user, now)
                            .filter(|_| self.routes.enabled && !fresh)
                        {
                            Some(nodes) => {
                                routes.users.insert(user, nodes.clone());
                            }
                            None => users.push(user),
                        }
                    }
                }
            }
        }
        if users.is_empty() && rooms.is_empty() {
            return Ok(routes);
        }
        let (user_nodes, room_nodes) = self.node.presence.locate(conn, &users, &rooms).await?;
        for (user, nodes) in users.into_iter().zip(user_nodes) {
            let nodes: Nodes = nodes.into_iter().map(Arc::from).collect();
            // Never cache this node: the session's own hub check is authoritative.
            if self.routes.enabled && !nodes.iter().any(|n| **n == *self.node.id) {
                self.routes.insert(user, nodes.clone(), now);
            } else {
                self.routes.map.remove(user);
            }
            routes.users.insert(user, nodes);
        }
        for (room, nodes) in rooms.into_iter().zip(room_nodes) {
            routes
                .rooms
                .insert(room, nodes.into_iter().map(Arc::from).collect());
        }
        Ok(routes)
    }

    /// The live nodes among `nodes` (this node counts as live).
    async fn live(
        &self,
        conn: &mut RedisConn,
        nodes: &[Arc<str>],
    ) -> Result<Vec<Arc<str>>, RedisError> {
        let mut live = Vec::with_capacity(nodes.len());
        for n in nodes {
            if **n == *self.node.id || self.node.live.is_alive(conn, n).await? {
                live.push(n.clone());
            }
        }
        Ok(live)
    }

    /// Sends one batch: gives its messages their places in their streams (history on),
    /// finds where their targets are, delivers here what is for here, appends one entry per
    /// other node (one pipeline), and answers the origin of each message that reached no one.
    async fn try_send(
        &mut self,
        conn: &mut RedisConn,
        batch: &[Dispatch],
    ) -> Result<(), RedisError> {
        let stamped = self.stamp(conn, batch).await?;
        let routes = self.resolve(conn, batch, &stamped).await?;
        // Taken out for the batch (and put back for its buffers), as `self` is borrowed.
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let stamped = stamped[i].as_ref();
            let (plan, outcome) = self.plan(conn, msg, &routes, stamped).await?;
            self.add_entries(&mut entries, i, msg, &plan, stamped);
            outcomes.push(outcome);
        }
        self.append_entries(conn, &mut entries, &mut outcomes)
            .await?;
        self.entries = entries;
        self.answer_unreached(conn, batch, outcomes).await
    }

    /// What to do with one message: its plan (one entry per other node) and what became of
    /// it so far. A message that could not be stored has no entries.
    async fn plan(
        &self,
        conn: &mut RedisConn,
        msg: &Dispatch,
        routes: &Routes<'_>,
        stamped: Option<&Stamped>,
    ) -> Result<(Plan, Outcome), RedisError> {
        match (stamped, &msg.target) {
            (Some(Stamped::NoStream), Target::User(_)) => Ok((Plan::default(), Outcome::default())),
            // A room without members and without a stream: nobody to reach, and (as
            // without history) no error.
            (Some(Stamped::NoStream), Target::Room(_)) => {
                let reached = Outcome {
                    reached: true,
                    ..Outcome::default()
                };
                Ok((Plan::default(), reached))
            }
            (Some(Stamped::Failed), _) => {
                let failed = Outcome {
                    failed: true,
                    ..Outcome::default()
                };
                Ok((Plan::default(), failed))
            }
            (_, Target::User(to)) => self.plan_user(conn, msg, to, routes, stamped).await,
            (_, Target::Room(room)) => self.plan_room(conn, msg, room, routes, stamped).await,
        }
    }

    /// The entries of a room message: one per other live node with members. A stamped one
    /// goes to the members here now. A room message is never answered with `not found`.
    async fn plan_room(
        &self,
        conn: &mut RedisConn,
        msg: &Dispatch,
        room: &str,
        routes: &Routes<'_>,
        stamped: Option<&Stamped>,
    ) -> Result<(Plan, Outcome), RedisError> {
        let nodes = match stamped.and_then(Stamped::nodes) {
            Some(nodes) => nodes,
            None => &routes.rooms[room],
        };
        let nodes = self.live(conn, nodes).await?;
        if let Some((frame, seq)) = stamped.and_then(Stamped::stored) {
            self.deliver_room_here(msg, room, frame, seq);
        }
        let plan = Plan::new(&self.node.id, &nodes, &[], &[]);
        let reached = Outcome {
            reached: true,
            ..Outcome::default()
        };
        Ok((plan, reached))
    }

    /// Adds the envelopes of `msg` (message `i` of the batch) that `plan` says, each to the
    /// entry being packed for its node.
    fn add_entries(
        &self,
        entries: &mut Entries,
        i: usize,
        msg: &Dispatch,
        plan: &Plan,
        stamped: Option<&Stamped>,
    ) {
        let to = match &msg.target {
            Target::User(to) | Target::Room(to) => to,
        };
        let cap = Cap {
            bus_pack: self.node.config.bus_pack,
            live: &self.node.live,
        };
        for (target, to_recipient, to_sender) in &plan.entries {
            let env = self.envelope(msg, plan, *to_recipient, *to_sender, stamped);
            let action = match &msg.payload {
                // People reading the inbox see what a backend published.
                Payload::Frame { action, .. } => &**action,
                _ => plain_action(&msg.payload, &env.body),
            };
            let entry = entries.for_node(target, &cap, &self.node.keys);
            entry.push(&env, msg.origin.user(), to, action);
            entry.messages.push((i, *to_recipient));
        }
    }

    /// Appends the batch's inbox entries (one round trip) and records in `outcomes` which
    /// messages reached a session through them, or failed to: an entry's result is each of
    /// its messages'.
    async fn append_entries(
        &self,
        conn: &mut RedisConn,
        entries: &mut Entries,
        outcomes: &mut [Outcome],
    ) -> Result<(), RedisError> {
        let batch = entries.batch();
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::Pipeline::with_capacity(batch.len());
        pipe.ignore_errors();
        let mut messages = 0;
        for entry in batch.iter_mut() {
            entry.append_to(&mut pipe);
            messages += entry.messages.len();
        }
        let node = &self.node;
        let started = Instant::now();
        let results: Vec<RedisResult<Value>> = pipe.query_async(conn).await?;
        tracing::trace!(?results, "XADD results");
        node.metrics
            .xadd_seconds
            .record(started.elapsed().as_secs_f64());
        node.metrics.to_bus.increment(messages as u64);
        for (entry, result) in batch.iter().zip(results) {
            match result {
                // NOMKSTREAM: the node's inbox is gone (it died or left).
                Ok(Value::Nil) => {}
                Ok(_) => {
                    for &(i, for_recipient) in &entry.messages {
                        outcomes[i].reached |= for_recipient;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, messages = entry.messages.len(), "XADD failed");
                    metrics::counter!("wsbus_bus_errors_total").increment(1);
                    for &(i, for_recipient) in &entry.messages {
                        outcomes[i].failed |= for_recipient;
                    }
                }
            }
        }
        Ok(())
    }

    /// The entries of a direct message: one per other node with sessions of the recipient
    /// or (for copies) of the sender, minus the nodes that already had it.
    async fn plan_user(
        &self,
        conn: &mut RedisConn,
        msg: &Dispatch,
        to: &str,
        routes: &Routes<'_>,
        stamped: Option<&Stamped>,
    ) -> Result<(Plan, Outcome), RedisError> {
        let node = &self.node;
        let from = msg.origin.user();
        let recipient = match stamped.and_then(Stamped::nodes) {
            Some(nodes) => nodes,
            None => &routes.users[to],
        };
        let recipient = self.live(conn, recipient).await?;
        let sender = match msg.echo {
            true => self.live(conn, &routes.users[from]).await?,
            false => Vec::new(),
        };
        let mut outcome = Outcome {
            reached: msg.delivered_here,
            too_slow: false,
            failed: false,
        };
        if let Some((frame, seq)) = stamped.and_then(Stamped::stored) {
            // In the recipient's stream: it gets it here now, elsewhere through the entries
            // below, or on its next reconnect. (A stamped frame is delivered here by the bus
            // writer only: the sender's check had no place to give it.)
            outcome.reached = true;
            let here = node.hub.deliver_user(to, None, || SocketFrame {
                frame: frame.clone(),
                born_us: msg.born_us,
                seq: Some(seq.clone()),
            });
            node.metrics
                .delivered_local
                .increment(u64::from(here.queued));
        } else if !msg.delivered_here && recipient.iter().any(|n| **n == *node.id) {
            // The recipient connected here since its sender's check (or moved here).
            let frame = match &msg.payload {
                Payload::Text(text) => Some(encode_message(from, to, text).into()),
                Payload::Frame { frame, .. } => Some(frame.clone()),
                Payload::Presence(_) => None,
            };
            if let Some(frame) = frame {
                let here = node.hub.deliver_user(to, None, || SocketFrame {
                    frame,
                    born_us: msg.born_us,
                    seq: None,
                });
                outcome.reached |= here.queued > 0;
                outcome.too_slow = here.slow > 0 && here.queued == 0;
            }
        }
        let (tried, hops): (&[Box<str>], u8) = match &msg.origin {
            Origin::Forward { tried, hops, .. } => (tried, *hops),
            _ => (&[], 0),
        };
        let plan = match hops > MAX_HOPS {
            // Forwarded once already: the recipient keeps moving; give up.
            true => Plan::default(),
            false => Plan::new(&node.id, &recipient, &sender, tried),
        };
        // A node that already had the message (before it was forwarded) has it.
        outcome.reached |= recipient
            .iter()
            .any(|n| **n != *node.id && tried.iter().any(|t| **t == **n));
        Ok((plan, outcome))
    }

    /// The envelope of `msg` for one node of `plan`.
    fn envelope<'m>(
        &'m self,
        msg: &'m Dispatch,
        plan: &'m Plan,
        to_recipient: bool,
        to_sender: bool,
        stamped: Option<&'m Stamped>,
    ) -> Envelope<'m> {
        let node = &self.node;
        let first = FirstSent::of(node, &msg.origin);
        let stored = stamped.and_then(Stamped::stored);
        let to = match &msg.target {
            Target::User(to) | Target::Room(to) => to,
        };
        Envelope {
            id: first.id.unwrap_or_else(|| node.next_message_id()),
            boot: first.boot,
            origin: first.node.into(),
            from: msg.origin.user().into(),
            to: (&**to).into(),
            hops: first.hops,
            sent_us: msg.born_us,
            origin_sid: first.sid,
            to_recipient,
            to_sender,
            tried: tried_after(node, msg, plan, first.tried),
            stamp: stored.map(|(_, seq)| Stamp {
                offset: seq.offset,
                epoch: (&*seq.epoch).into(),
            }),
            body: body(msg, stored.map(|(frame, _)| frame)),
        }
    }

    /// Gives every message of the batch that needs one a place in its target's history
    /// stream (history on; not presence events; a forwarded entry keeps its place): one
    /// round trip for the batch, before anything of it is delivered anywhere. One entry per
    /// message, `None` for those without a place.
    async fn stamp(
        &self,
        conn: &mut RedisConn,
        batch: &[Dispatch],
    ) -> Result<Vec<Option<Stamped>>, RedisError> {
        let mut stamped: Vec<Option<Stamped>> = batch.iter().map(Stamped::forwarded).collect();
        let node = &self.node;
        let Some(history) = &node.history else {
            return Ok(stamped);
        };
        let appends = appends_of(batch, &stamped);
        if appends.is_empty() {
            return Ok(stamped);
        }
        let started = Instant::now();
        let replies = history.append(conn, &appends).await?;
        node.metrics
            .history_append_seconds
            .record(started.elapsed().as_secs_f64());
        for appended in appends.place(replies) {
            Stamped::record(appended, &mut stamped);
        }
        Ok(stamped)
    }

    /// Delivers a stamped room message to the room's members here (not the session that
    /// sent it, which gets only its place, so its order of the room's frames has no hole).
    fn deliver_room_here(&self, msg: &Dispatch, room: &str, frame: &Utf8Bytes, seq: &Arc<Seq>) {
        let node = &self.node;
        let sender = match &msg.origin {
            Origin::Session { user, sid, .. } => Some((user, *sid)),
            _ => None,
        };
        let queued = node
            .rooms
            .deliver(room, sender.map(|(_, sid)| sid), None, || SocketFrame {
                frame: frame.clone(),
                born_us: msg.born_us,
                seq: Some(seq.clone()),
            });
        node.metrics
            .room_delivered_local
            .increment(u64::from(queued));
        if let Some((user, sid)) = sender {
            let marker = Seq {
                room: seq.room.clone(),
                offset: seq.offset,
                epoch: seq.epoch.clone(),
                marker: true,
            };
            node.hub.deliver_session(
                user.as_str(),
                sid,
                SocketFrame {
                    frame: Utf8Bytes::from_static(""),
                    born_us: 0,
                    seq: Some(Arc::new(marker)),
                },
            );
        }
    }

    /// Answers `not found` (or `bus unavailable`) to the origin of every message that
    /// reached no session.
    async fn answer_unreached(
        &mut self,
        conn: &mut RedisConn,
        batch: &[Dispatch],
        outcomes: Vec<Outcome>,
    ) -> Result<(), RedisError> {
        let node = Arc::clone(&self.node);
        let mut errors = Vec::new();
        for (msg, outcome) in batch.iter().zip(outcomes) {
            if outcome.reached {
                node.answer_ack(&msg.origin);
            } else {
                let to = match &msg.target {
                    Target::User(to) | Target::Room(to) => to,
                };
                let error = if outcome.failed {
                    ClientError::BusUnavailable
                } else if outcome.too_slow {
                    ClientError::RecipientTooSlow(to.to_string())
                } else {
                    ClientError::UserNotFound(to.to_string())
                };
                errors.extend(node.answer_error(&msg.origin, &error));
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
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
        Ok(())
    }
}

/// The inbox entries of a batch, packed per destination node as its messages are planned,
/// then appended in one pipeline in the order they were opened (so each node's entries, and
/// the envelopes in each, keep batch order).
#[derive(Default)]
struct Entries {
    /// Each destination node's entry being filled: its index in `all`.
    filling: HashMap<Arc<str>, usize>,
    /// This batch's entries (the first `len`); the rest are kept for their buffers.
    all: Vec<Entry>,
    len: usize,
}

/// Past this, an entry's buffer is not kept for the next batch (one burst of large messages
/// should not pin memory for good).
const KEEP_PACK_BYTES: usize = 256 * 1024;

impl Entries {
    /// Starts a batch.
    fn clear(&mut self) {
        self.filling.clear();
        self.len = 0;
    }

    /// The entry that takes `node`'s next envelope: the one being filled, or a new one when
    /// there is none or it is full (see [`Cap`]).
    fn for_node(&mut self, node: &Arc<str>, cap: &Cap<'_>, keys: &Keys) -> &mut Entry {
        let filling = self.filling.get(node).copied();
        let e = match filling.filter(|&e| self.all[e].pack.len() < self.all[e].cap) {
            Some(e) => e,
            None => {
                if self.len == self.all.len() {
                    self.all.push(Entry::default());
                }
                let e = self.len;
                self.len += 1;
                self.all[e].reset(node, cap.of(node), keys);
                self.filling.insert(node.clone(), e);
                e
            }
        };
        &mut self.all[e]
    }

    /// This batch's entries.
    fn batch(&mut self) -> &mut [Entry] {
        &mut self.all[..self.len]
    }
}

/// How many envelopes one entry for a node may hold: `--bus-pack`, or 1 (the single
/// layout) for a node that does not say it reads packed entries (one of a version before
/// them, during a rolling upgrade; or one this node's view has not asked yet).
struct Cap<'a> {
    bus_pack: usize,
    live: &'a crate::cluster::live::LiveNodes,
}

impl Cap<'_> {
    fn of(&self, node: &str) -> usize {
        if self.live.reads_packed(node) {
            self.bus_pack
        } else {
            1
        }
    }
}

/// One inbox entry being packed for one node.
#[derive(Default)]
struct Entry {
    /// The node's inbox key.
    inbox: String,
    /// Most envelopes it may hold ([`Cap`]).
    cap: usize,
    pack: Pack,
    /// The first envelope's plain fields (`from`, `to`, `action`): an entry that ends up with
    /// that envelope alone is written in the single layout, which every version reads.
    from: String,
    to: String,
    action: String,
    /// The batch's messages it carries: (index in the batch, for the recipient).
    messages: Vec<(usize, bool)>,
}

impl Entry {
    fn reset(&mut self, node: &str, cap: usize, keys: &Keys) {
        keys.inbox_into(node, &mut self.inbox);
        self.cap = cap;
        if self.pack.capacity() > KEEP_PACK_BYTES {
            self.pack = Pack::default();
        }
        self.pack.clear();
        self.messages.clear();
    }

    fn push(&mut self, env: &Envelope<'_>, from: &str, to: &str, action: &str) {
        if self.pack.is_empty() {
            for (field, value) in [
                (&mut self.from, from),
                (&mut self.to, to),
                (&mut self.action, action),
            ] {
                field.clear();
                field.push_str(value);
            }
        }
        self.pack.push(env);
    }

    /// Adds its `XADD` to `pipe`: single with one envelope, else packed.
    fn append_to(&mut self, pipe: &mut redis::Pipeline) {
        match self.pack.single() {
            Some(env) => append_entry(pipe, &self.inbox, &self.from, &self.to, &self.action, env),
            None => append_packed(pipe, &self.inbox, &mut self.pack),
        }
    }
}

/// Where and by whom a message was first sent, as its entries carry it: an entry forwarded
/// after its recipient moved keeps its first sender's.
struct FirstSent<'m> {
    /// The message id (`None`: a new one).
    id: Option<u64>,
    boot: u64,
    node: &'m str,
    sid: u64,
    hops: u8,
    /// Nodes that already had it appended.
    tried: &'m [Box<str>],
}

impl<'m> FirstSent<'m> {
    fn of(node: &'m Node, origin: &'m Origin) -> Self {
        let here = |sid| FirstSent {
            id: None,
            boot: node.boot,
            node: &node.id,
            sid,
            hops: 0,
            tried: &[],
        };
        match origin {
            Origin::Session { sid, .. } => here(*sid),
            Origin::Node { .. } | Origin::Api { .. } => here(0),
            Origin::Forward {
                node: origin,
                sid,
                id,
                boot,
                hops,
                tried,
                ..
            } => FirstSent {
                id: Some(*id),
                boot: *boot,
                node: origin,
                sid: *sid,
                hops: *hops,
                tried,
            },
        }
    }
}

/// The nodes an entry says have the message already, for a node that forwards it to skip:
/// with several sessions per user, for a direct message, those it was tried on, this one,
/// and those `plan` appends it to. Otherwise none.
fn tried_after<'a>(
    node: &'a Node,
    msg: &Dispatch,
    plan: &'a Plan,
    tried: &'a [Box<str>],
) -> Vec<Cow<'a, str>> {
    let mut all_tried = Vec::new();
    if node.config.multi_session() && matches!(msg.target, Target::User(_)) {
        all_tried.extend(tried.iter().map(|t| (&**t).into()));
        all_tried.push((&*node.id).into());
        all_tried.extend(plan.entries.iter().map(|(n, _, _)| (&**n).into()));
    }
    all_tried
}

/// The body of `msg`'s entries. A frame stamped with its place (`stored`) travels as it is,
/// whatever it carries.
fn body<'m>(msg: &'m Dispatch, stored: Option<&'m Utf8Bytes>) -> Body<'m> {
    if let Some(frame) = stored {
        return match &msg.target {
            Target::User(_) => Body::Publish {
                frame: frame.as_str().into(),
            },
            Target::Room(room) => Body::RoomPublish {
                room: (&**room).into(),
                frame: frame.as_str().into(),
            },
        };
    }
    match (&msg.target, &msg.payload) {
        (Target::User(_), Payload::Text(text)) => Body::Message {
            text: (&**text).into(),
        },
        (Target::Room(room), Payload::Text(text)) => Body::RoomMessage {
            room: (&**room).into(),
            text: (&**text).into(),
        },
        (Target::Room(room), Payload::Presence(event)) => Body::Presence {
            room: (&**room).into(),
            event: *event,
        },
        (Target::User(_), Payload::Frame { frame, .. }) => Body::Publish {
            frame: frame.as_str().into(),
        },
        (Target::Room(room), Payload::Frame { frame, .. }) => Body::RoomPublish {
            room: (&**room).into(),
            frame: frame.as_str().into(),
        },
        (Target::User(_), Payload::Presence(_)) => {
            unreachable!("presence events go to rooms")
        }
    }
}

/// The action an entry shows in its plain field: what a stamped message is, not how it
/// travels.
fn plain_action(payload: &Payload, body: &Body<'_>) -> &'static str {
    match (payload, body) {
        (Payload::Text(_), Body::Publish { .. }) => "message",
        (Payload::Text(_), Body::RoomPublish { .. }) => "room_message",
        _ => body.action(),
    }
}

/// The appends of the messages of `batch` that need a place in their target's stream (not
/// presence events, not those `stamped` already), each with the frame its clients get.
fn appends_of<'b>(batch: &'b [Dispatch], stamped: &[Option<Stamped>]) -> Appends<'b> {
    let mut appends = Appends::default();
    for (i, msg) in batch.iter().enumerate() {
        // Entries stamped already keep their place; transient ones (relays) have none.
        if stamped[i].is_some() || msg.transient {
            continue;
        }
        let from = msg.origin.user();
        match (&msg.target, &msg.payload) {
            (_, Payload::Presence(_)) => {}
            (Target::User(to), Payload::Text(text)) => {
                appends.add(i, Stream::User(to), &encode_message(from, to, text));
            }
            (Target::Room(room), Payload::Text(text)) => {
                let frame = encode_room_message(from, room, text);
                appends.add(i, Stream::Room(room), &frame);
            }
            (Target::User(to), Payload::Frame { frame, .. }) => {
                appends.add(i, Stream::User(to), frame);
            }
            (Target::Room(room), Payload::Frame { frame, .. }) => {
                appends.add(i, Stream::Room(room), frame);
            }
        }
    }
    appends
}
