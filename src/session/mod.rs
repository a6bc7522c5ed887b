//! One connected client: reads its frames and routes them, writes what is queued for it,
//! pings it, and cleans up after it. One task per connection.
//!
//! Writes drain the whole queue with `feed` and finish with one `flush`. Every await that
//! can block on the client (a write) also watches the session's kick, the node's shutdown
//! and the ping timer, so a client that stops reading cannot hold its task hostage: it is
//! dropped as a slow consumer (its queue fills) or for not answering pings (a write stays
//! blocked across two ping ticks).
//!
//! Every close is polite (RFC 6455 §5.5.1, §7.1.1): the session answers a client's Close
//! (flushing the echo tungstenite queued), and ends its own closes with [`close_politely`],
//! which keeps reading until the client's Close, EOF or [`CLOSE_LINGER`], so that the client
//! gets a FIN after the Close rather than a reset that destroys it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Interval;
use tungstenite::Message;

use crate::delivery::target::{Origin, Target};
use crate::history::Sequencer;
use crate::wire::client::{
    ClientError, Command, Frame, FrameId, Position, Refused, RelayTo, close, encode_ack,
    encode_error_for, encode_frame, encode_relay, frame_id, parse_frame,
};
use crate::wire::event::{Event, EventKind};

mod access;
mod recovery;
pub mod socket;
use crate::delivery::hub::SessionReceiver;
use crate::node::Node;
use crate::wire::frame::SocketFrame;
use crate::wire::ids::RoomId;
use crate::wire::ids::UserId;
pub use recovery::StartAt;
use serde_json::json;
use socket::{CLOSE_LINGER, Socket, close_politely};

/// Frames written per flush at most, so reads are not starved by a long queue.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Releases the user's registration when the session ends, however it ends (including an
/// upgrade that never completed, when the session is dropped without running).
pub struct SessionGuard {
    node: Arc<Node>,
    user: UserId,
    sid: u64,
    /// [`SessionGuard::release`] ran; nothing is left to do on drop.
    released: bool,
}

impl SessionGuard {
    /// A guard for session `sid` of `user`.
    pub fn new(node: Arc<Node>, user: UserId, sid: u64) -> Self {
        Self {
            node,
            user,
            sid,
            released: false,
        }
    }

    /// Takes the session out of the hub and releases its registration now, waiting for
    /// Redis: a session that is closing accepts no more messages, and a client that
    /// reconnects right after the close handshake (to any node) is never refused for its own
    /// previous session.
    pub async fn release(&mut self) {
        self.released = true;
        let last_here = self.node.hub.remove(self.user.as_str(), self.sid);
        if self.node.shutdown.is_cancelled() {
            // The node deregisters all its users at once on shutdown.
            return;
        }
        if let Err(e) = self
            .node
            .presence
            .release(&self.user, self.sid, last_here)
            .await
        {
            tracing::warn!(user = %self.user, error = %e, "could not release user");
        }
        if let Some(history) = &self.node.history {
            // The user was connected until now: its stream lives `--history-ttl` from here,
            // so what is sent to it meanwhile is kept for its reconnect.
            let stream = crate::history::Stream::User(self.user.as_str());
            if let Err(e) = history.touch(stream).await {
                tracing::debug!(user = %self.user, error = %e, "could not refresh the user's stream");
            }
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let last_here = self.node.hub.remove(self.user.as_str(), self.sid);
        if self.node.shutdown.is_cancelled() {
            // The node deregisters all its users at once on shutdown.
            return;
        }
        let node = self.node.clone();
        let user = self.user.clone();
        let sid = self.sid;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(node.sessions.clone().track_future(async move {
                if let Err(e) = node.presence.release(&user, sid, last_here).await {
                    tracing::warn!(user = %user, error = %e, "could not release user");
                }
            }));
        }
    }
}

/// Why the session loop ended.
enum End {
    /// Close the socket with this code.
    Close(u16, Cow<'static, str>),
    /// The client sent a Close (its code and reason, if it gave them); tungstenite queued the
    /// answer (the same code), still to be flushed.
    ClosedByClient(Option<(u16, String)>),
    /// The connection is gone or broken; nothing more to write.
    Gone,
}

/// The socket of a session and what the session knows about the client's liveness.
struct Link {
    socket: Socket,
    live: Liveness,
}

/// Ping bookkeeping, apart from the socket so a pending write can watch the timer.
struct Liveness {
    /// Ticks every ping interval.
    ping: Interval,
    /// Whether the client showed life since the last tick: a frame from it, or a blocked
    /// write that went through (so it read).
    heard_from: bool,
    /// A tick came while a write was blocked: its ping goes out once the write is done.
    ping_due: bool,
}

impl Link {
    fn new(socket: Socket, ping_interval: Duration) -> Self {
        let first = tokio::time::Instant::now() + ping_interval;
        let mut ping = tokio::time::interval_at(first, ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            socket,
            live: Liveness {
                ping,
                heard_from: true,
                ping_due: false,
            },
        }
    }
}

/// A session about to run.
pub struct Session {
    node: Arc<Node>,
    user: UserId,
    sid: u64,
    /// The rooms this session is in (the hub's room map has the other direction).
    rooms: HashSet<RoomId>,
    queue: SessionReceiver,
    bucket: TokenBucket,
    guard: SessionGuard,
    _permit: OwnedSemaphorePermit,
    /// With history on: hands each stream's frames over in offset order.
    seq: Sequencer,
    /// Frames the sequencer let out, to write.
    ready: Vec<SocketFrame>,
    /// Where the user's stream starts for this session: the position the client asked to
    /// recover from in its connect URL, or the stream's top read before the session was
    /// registered.
    recover: Option<StartAt>,
    /// The `welcome` frame (a resume secret), written before anything else, if the client
    /// asked for one.
    welcome: Option<String>,
    /// What its token grants: until when, which rooms the client may join (`refresh`
    /// replaces it).
    grant: crate::auth::Grant,
}

/// Frames to write to the socket at once, ahead of the queue (a replay and the reply that
/// ends it), from handling a client frame.
type Direct = Vec<String>;

/// What the rate limiter says about one client frame.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Allowed,
    /// Over the limit: answer `rate limited`, drop the frame.
    Refused,
    /// A whole burst refused in a row: close the connection (4005).
    Closed,
}

/// A per-connection token bucket: `rate` frames per second, bursts of `burst`.
struct TokenBucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    refused_in_a_row: u32,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            last: now,
            rate,
            burst: f64::from(burst.max(1)),
            refused_in_a_row: 0,
        }
    }

    fn take(&mut self) -> Admission {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Admission {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            return Admission::Allowed;
        }
        self.refused_in_a_row += 1;
        if f64::from(self.refused_in_a_row) > self.burst {
            Admission::Closed
        } else {
            Admission::Refused
        }
    }
}

impl Session {
    /// Prepares the session of `user` (already claimed and in the hub).
    pub fn new(
        node: Arc<Node>,
        user: UserId,
        queue: SessionReceiver,
        guard: SessionGuard,
        permit: OwnedSemaphorePermit,
        recover: Option<StartAt>,
        grant: crate::auth::Grant,
    ) -> Self {
        let bucket = TokenBucket::new(
            node.config.rate_limit,
            node.config.rate_burst,
            Instant::now(),
        );
        Self {
            rooms: HashSet::new(),
            sid: guard.sid,
            node,
            user,
            queue,
            bucket,
            guard,
            _permit: permit,
            seq: Sequencer::default(),
            ready: Vec::new(),
            recover,
            welcome: None,
            grant,
        }
    }

    /// Writes `welcome` as the session's first frame (a client that asked with `?resume`).
    pub fn welcomed(mut self, welcome: Option<String>) -> Self {
        self.welcome = welcome;
        self
    }

    /// Serves the socket until either side ends the session.
    pub async fn run(mut self, socket: Socket) {
        self.node.metrics.connections_active.increment(1.0);
        let mut link = Link::new(socket, self.node.config.ping_interval);
        self.watch_expiry();
        // Boxed, as the other steps that wait on Redis (see `run_command`).
        let announced = Box::pin(self.connect_event()).await;
        let end = match &announced {
            Err(error) => match self.write_error(&mut link, error).await {
                Ok(()) => End::Close(close::GOING_AWAY, Cow::Borrowed("bus unavailable")),
                Err(end) => end,
            },
            Ok(()) => match Box::pin(self.open(&mut link)).await {
                Ok(()) => self.serve(&mut link).await,
                Err(end) => end,
            },
        };
        self.unwatch_expiry();
        // Before the close handshake: a member that has left must get nothing sent after it
        // left, and the client may reconnect as soon as it sees our Close.
        Box::pin(self.leave_rooms()).await;
        Box::pin(self.guard.release()).await;
        self.node.metrics.connections_active.decrement(1.0);
        let code = match &end {
            End::Close(code, _) => code.to_string(),
            End::ClosedByClient(_) => "client".to_owned(),
            End::Gone => "none".to_owned(),
        };
        metrics::counter!("wsbus_connections_closed_total", "code" => code).increment(1);
        let event = (announced.is_ok() && self.node.wants(EventKind::Disconnect))
            .then(|| self.disconnect_event(&end));
        match end {
            End::Close(code, reason) => {
                Box::pin(close_politely(&mut link.socket, code, reason.into_owned())).await
            }
            End::ClosedByClient(_) => {
                let _ = tokio::time::timeout(CLOSE_LINGER, link.socket.flush()).await;
            }
            End::Gone => {}
        }
        if let Some(event) = event
            && Box::pin(self.node.append_event(event)).await.is_err()
        {
            tracing::warn!(user = %self.user, "disconnect event not appended");
        }
    }

    /// The session's first steps, in order: `welcome` (when asked), the user's stream
    /// (history), the rooms its token joins.
    async fn open(&mut self, link: &mut Link) -> Result<(), End> {
        let welcome = Direct::from_iter(self.welcome.take());
        self.write_direct(link, welcome).await?;
        Box::pin(self.open_user_stream(link)).await?;
        Box::pin(self.join_claimed(link)).await
    }

    /// Appends the `connect` event (with the user's session count), if it is on.
    async fn connect_event(&self) -> Result<(), ClientError> {
        if !self.node.wants(EventKind::Connect) {
            return Ok(());
        }
        let sessions = self
            .node
            .presence
            .session_count(&self.user)
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        let event = Event::new(EventKind::Connect, self.user.as_str(), self.sid)
            .field("sessions", sessions.to_string());
        self.node.append_event(event).await
    }

    /// The `disconnect` event of a session that ended with `end`: its close code and reason
    /// (1006, `connection lost`, when the connection broke without a Close).
    fn disconnect_event(&self, end: &End) -> Event {
        let (code, reason) = match end {
            End::Close(code, reason) => (*code, reason.to_string()),
            End::ClosedByClient(Some((code, reason))) => (*code, reason.clone()),
            End::ClosedByClient(None) => (1005, String::new()),
            End::Gone => (1006, "connection lost".to_owned()),
        };
        let event = Event::new(EventKind::Disconnect, self.user.as_str(), self.sid)
            .field("code", code.to_string());
        match reason.is_empty() {
            true => event,
            false => event.field("reason", reason),
        }
    }

    async fn serve(&mut self, link: &mut Link) -> End {
        // Registered once, not once per frame. Fires on node shutdown too.
        let kick = self.queue.kick.clone();
        let mut kicked = std::pin::pin!(kick.kicked());
        let orders = self.queue.orders.clone();
        loop {
            if std::mem::take(&mut link.live.ping_due)
                && let Err(end) = self
                    .write(link, Message::Ping(Default::default()), true)
                    .await
            {
                return end;
            }
            let gap_due = self.seq.next_deadline();
            tokio::select! {
                biased;
                _ = &mut kicked => return self.kicked(),
                _ = until(gap_due) => {
                    if let Err(end) = Box::pin(self.fill_gaps(link)).await {
                        return end;
                    }
                }
                _ = orders.arrived() => {
                    if let Err(end) = Box::pin(self.run_orders(link)).await {
                        return end;
                    }
                }
                frame = self.queue.rx.recv() => {
                    let Some(frame) = frame else { return End::Gone };
                    if let Err(end) = self.write_queued(link, frame).await {
                        return end;
                    }
                }
                incoming = link.socket.next() => {
                    link.live.heard_from = true;
                    match incoming {
                        None => return End::Gone,
                        Some(Ok(Message::Close(frame))) => {
                            let frame = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                            return End::ClosedByClient(frame);
                        }
                        Some(Ok(frame @ (Message::Text(_) | Message::Binary(_)))) => {
                            let outcome = match (self.bucket.take(), frame) {
                                (Admission::Closed, _) => {
                                    return End::Close(close::RATE_LIMITED, Cow::Borrowed("rate limit exceeded"));
                                }
                                (Admission::Refused, Message::Text(text)) => Err(Refused {
                                    error: ClientError::RateLimited,
                                    id: frame_id(&text),
                                }),
                                (Admission::Refused, _) => Err(ClientError::RateLimited.into()),
                                (Admission::Allowed, Message::Text(text)) => self.run_command(&text).await,
                                (Admission::Allowed, _) => Err(ClientError::BinaryFrame.into()),
                            };
                            let written = match outcome {
                                Ok(direct) => self.write_direct(link, direct).await,
                                Err(refused) => self.write_refused(link, &refused).await,
                            };
                            if let Err(end) = written {
                                return end;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                        Some(Err(e)) => return self.read_failed(link, e).await,
                    }
                }
                _ = link.live.ping.tick() => {
                    if !std::mem::replace(&mut link.live.heard_from, false) {
                        return End::Close(close::PING_TIMEOUT, Cow::Borrowed("ping timeout"));
                    }
                    if let Err(end) = self.write(link, Message::Ping(Default::default()), true).await {
                        return end;
                    }
                }
            }
        }
    }

    fn kicked(&self) -> End {
        match self.queue.kick.code() {
            Some(close::SLOW_CONSUMER) => {
                End::Close(close::SLOW_CONSUMER, Cow::Borrowed("slow consumer"))
            }
            Some(close::SESSION_REPLACED) => {
                End::Close(close::SESSION_REPLACED, Cow::Borrowed("session replaced"))
            }
            Some(close::REPLACED_BY_NEWER) => End::Close(
                close::REPLACED_BY_NEWER,
                Cow::Borrowed("replaced by a newer session"),
            ),
            Some(close::TOKEN_EXPIRED) => {
                End::Close(close::TOKEN_EXPIRED, Cow::Borrowed("token expired"))
            }
            Some(close::DISCONNECTED) => End::Close(
                close::DISCONNECTED,
                match self.queue.kick.reason() {
                    Some(reason) => Cow::Owned(reason.to_owned()),
                    None => Cow::Borrowed("disconnected by the server"),
                },
            ),
            Some(code) => End::Close(code, Cow::Borrowed("")),
            None => End::Close(close::GOING_AWAY, Cow::Borrowed("node shutting down")),
        }
    }

    /// Handles one client frame; a frame that answers the client (`joined`, `left`,
    /// `members`) is queued for it like any other. A frame with an `id` is acknowledged
    /// once accepted: a message by the dispatch that hands it on, the rest here.
    async fn run_command(&mut self, text: &str) -> Result<Direct, Refused> {
        let node = self.node.clone();
        node.metrics.received.increment(1);
        let frame = parse_frame(
            text,
            &node.config.relay_actions,
            &node.config.backend_actions,
        )?;
        let id = frame.id.clone();
        let acked_by_dispatch = matches!(
            frame.command,
            Command::Message { .. } | Command::RoomMessage { .. } | Command::Relay { .. }
        );
        let mut direct = match acked_by_dispatch {
            true => self.send(frame).await,
            false => self.execute(frame.command).await,
        }
        .map_err(|error| Refused {
            error,
            id: id.clone(),
        })?;
        if let Some(id) = id
            && !acked_by_dispatch
        {
            let ack = encode_ack(self.user.as_str(), &id);
            match direct.is_empty() {
                // After the reply queued for the client, if any.
                true => {
                    let ack = SocketFrame::unmeasured(ack);
                    self.node
                        .hub
                        .deliver_session(self.user.as_str(), self.sid, ack);
                }
                false => direct.push(ack),
            }
        }
        Ok(direct)
    }

    /// `message`, `room_message` and relayed actions: appended to the events stream where it
    /// is on, then handed to dispatch (which acknowledges the frame's `id`).
    async fn send(&mut self, frame: Frame<'_>) -> Result<Direct, ClientError> {
        let node = self.node.clone();
        let born_us = crate::wire::clock::now_us();
        let origin = Origin::Session {
            user: self.user.clone(),
            sid: self.sid,
            ack: frame.id,
        };
        let event = |kind, field, value: &str| {
            Event::new(kind, self.user.as_str(), self.sid)
                .field(field, value)
                .field("data", frame.data)
        };
        match frame.command {
            Command::Relay { action, to, data } => {
                let target = match to {
                    RelayTo::User(user) => Target::User(user.into()),
                    RelayTo::Room(room) if self.rooms.contains(room) => Target::Room(room.into()),
                    RelayTo::Room(room) => return Err(ClientError::NotInRoom(room.to_owned())),
                };
                let frame = encode_relay(self.user.as_str(), action, data).into();
                node.relay(origin, target, action, &frame, born_us).await?;
            }
            Command::Message { to, text } => {
                if node.wants(EventKind::Message) {
                    node.append_event(event(EventKind::Message, "to", to))
                        .await?;
                }
                node.send(origin, Target::User(to.into()), text, born_us)
                    .await?;
            }
            Command::RoomMessage { room, text } => {
                if !self.rooms.contains(room) {
                    return Err(ClientError::NotInRoom(room.to_owned()));
                }
                if node.wants(EventKind::RoomMessage) {
                    node.append_event(event(EventKind::RoomMessage, "room", room))
                        .await?;
                }
                node.send(origin, Target::Room(room.into()), text, born_us)
                    .await?;
            }
            _ => unreachable!("only messages are sent"),
        }
        Ok(Direct::new())
    }

    /// Every other command: answered here.
    async fn execute(&mut self, command: Command<'_>) -> Result<Direct, ClientError> {
        let node = self.node.clone();
        match command {
            Command::Message { .. } | Command::RoomMessage { .. } | Command::Relay { .. } => {
                unreachable!("messages are sent")
            }
            Command::Backend { action, data } => {
                let event = Event::new(EventKind::Action, self.user.as_str(), self.sid)
                    .field("action", action)
                    .field("data", data);
                Box::pin(node.append_event(event)).await?;
                Ok(Direct::new())
            }
            // The steps that wait on Redis are boxed: inline, their futures would sit in every
            // session's task, used or not (they were most of an idle connection's memory).
            Command::Join { room, since } => {
                if !self.rooms.contains(room) && !self.may_join(room) {
                    return Err(ClientError::NotAllowed(room.to_owned()));
                }
                Box::pin(self.join(room, since)).await
            }
            Command::Refresh { token } => self.refresh(&token),
            Command::Recover(position) => {
                // Without history, `recover_stream` answers `history is off`.
                let start = StartAt {
                    position: position.into_owned(),
                    asked: true,
                };
                Box::pin(self.recover_stream(None, Some(start), "recovered", json!({}))).await
            }
            Command::History {
                room,
                since,
                limit,
                epoch,
            } => {
                if let Some(room) = room
                    && !self.rooms.contains(room)
                {
                    return Err(ClientError::NotInRoom(room.to_owned()));
                }
                Box::pin(self.history(room, since, limit, epoch.as_deref())).await
            }
            Command::Leave { room } => {
                let Some(id) = self.rooms.take(room) else {
                    return Err(ClientError::NotInRoom(room.to_owned()));
                };
                self.leave(id).await?;
                Ok(Direct::new())
            }
            Command::Members { room } => Box::pin(self.members(room)).await,
        }
    }

    /// Writes frames the sequencer let out (no flush).
    async fn write_ready(
        &mut self,
        link: &mut Link,
        ready: &mut Vec<SocketFrame>,
    ) -> Result<(), End> {
        for out in ready.drain(..) {
            self.record_latency(&out);
            self.write(link, Message::Text(out.frame), false).await?;
        }
        Ok(())
    }

    /// Writes `direct` and flushes.
    async fn write_direct(&mut self, link: &mut Link, direct: Direct) -> Result<(), End> {
        if direct.is_empty() {
            return Ok(());
        }
        for frame in direct {
            self.write(link, Message::Text(frame.into()), false).await?;
        }
        self.flush(link).await
    }

    fn record_latency(&self, out: &SocketFrame) {
        if out.born_us != 0 {
            let latency_us = crate::wire::clock::now_us().saturating_sub(out.born_us);
            self.node
                .metrics
                .delivery_seconds
                .record(latency_us as f64 / 1e6);
        }
    }

    /// `join`: enters `room` (and, with history on, replays what came after `since`).
    async fn join(
        &mut self,
        room: &str,
        since: Option<Position<'_>>,
    ) -> Result<Direct, ClientError> {
        let node = self.node.clone();
        let id = RoomId::parse(room).ok_or(ClientError::InvalidRoom)?;
        if !self.rooms.contains(room) && self.rooms.len() >= node.config.max_rooms_per_session {
            return Err(ClientError::TooManyRooms);
        }
        // Without `since`, the room's frames start for this session where its stream
        // is before the join, so none sent while it joins is missed.
        let stream = crate::history::Stream::Room(room);
        let since = since.map(Position::into_owned);
        let start = StartAt::of(node.history.as_ref(), stream, since)
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        let members = node.join_room(&id, &self.user, self.sid).await?;
        if node.wants(EventKind::Join) {
            let event =
                Event::new(EventKind::Join, self.user.as_str(), self.sid).field("room", room);
            if let Err(e) = node.append_event(event).await {
                // Nobody may see a member the backend was not told about: the join is undone.
                if !self.rooms.contains(room) {
                    let _ = node.leave_room(&id, &self.user, self.sid).await;
                }
                return Err(e);
            }
        }
        self.rooms.insert(id);
        let data = json!({"room": room, "members": members});
        if node.history.is_none() {
            self.reply("joined", data)?;
            return Ok(Direct::new());
        }
        self.recover_stream(Some(room.into()), start, "joined", data)
            .await
    }

    /// Queues a reply frame `{"from": <own id>, "action": .., "data": ..}` for this session.
    fn reply(&self, action: &str, data: serde_json::Value) -> Result<(), ClientError> {
        let frame = SocketFrame::unmeasured(encode_frame(self.user.as_str(), action, data));
        self.node
            .hub
            .deliver_session(self.user.as_str(), self.sid, frame);
        Ok(())
    }

    /// Takes the session out of every room it is in (it is ending).
    async fn leave_rooms(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            if let Err(e) = self.node.leave_room(&room, &self.user, self.sid).await {
                tracing::debug!(room = %room, error = %e, "leaving a room on disconnect");
            }
        }
    }

    /// Answers a read error: the close code for a frame the client should not have sent, or
    /// nothing when the connection just broke.
    async fn read_failed(&mut self, link: &mut Link, error: tungstenite::Error) -> End {
        use tungstenite::error::{Error, ProtocolError};
        match error {
            Error::Capacity(_) => {
                let limit = self.node.config.max_frame_bytes;
                let _ = self
                    .write_error(link, &ClientError::FrameTooLarge(limit))
                    .await;
                End::Close(close::TOO_BIG, Cow::Borrowed("frame too large"))
            }
            Error::Utf8(_) => End::Close(close::INVALID_PAYLOAD, Cow::Borrowed("invalid UTF-8")),
            Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
            Error::Protocol(violation) => {
                tracing::debug!(user = %self.user, %violation, "protocol violation");
                End::Close(close::PROTOCOL_ERROR, Cow::Borrowed("protocol error"))
            }
            _ => End::Gone,
        }
    }

    async fn write_error(&self, link: &mut Link, error: &ClientError) -> Result<(), End> {
        self.write_refused(link, &error.clone().into()).await
    }

    /// Writes the error a frame caused, with the frame's `id` if it had one.
    async fn write_refused(&self, link: &mut Link, refused: &Refused) -> Result<(), End> {
        refused.error.count();
        let id: Option<&FrameId> = refused.id.as_ref();
        let frame = encode_error_for(
            self.user.as_str(),
            &refused.error.to_string(),
            id.map(|id| &**id),
        );
        self.write(link, Message::Text(frame.into()), true).await
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    /// Records each message's end-to-end latency as it goes into the socket's write buffer.
    async fn write_queued(&mut self, link: &mut Link, first: SocketFrame) -> Result<(), End> {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            if out.seq.is_some() {
                // A history stream's frame: in offset order, once.
                let mut ready = std::mem::take(&mut self.ready);
                self.seq.accept(out, Instant::now(), &mut ready);
                let written = self.write_ready(link, &mut ready).await;
                self.ready = ready;
                written?;
            } else {
                self.record_latency(&out);
                self.write(link, Message::Text(out.frame), false).await?;
            }
            n += 1;
            if n < MAX_FRAMES_PER_FLUSH {
                next = self.queue.rx.try_recv();
            }
        }
        self.flush(link).await
    }

    /// Feeds one frame (and flushes if asked), giving up when kicked, shutting down, or the
    /// client stops answering.
    async fn write(&self, link: &mut Link, msg: Message, flush: bool) -> Result<(), End> {
        if let Message::Text(text) = &msg
            && text.len() > self.node.config.max_out_frame_bytes()
        {
            return Err(self.too_big(text.len()));
        }
        let Link { socket, live } = link;
        let io = async {
            if flush {
                socket.send(msg).await
            } else {
                socket.feed(msg).await
            }
        };
        self.interruptible(live, io)
            .await?
            .map_err(|e| self.write_failed(e))
    }

    /// A write that failed: a frame the socket's buffer cannot take closes with 1009; any
    /// other error means the connection is gone.
    fn write_failed(&self, error: tungstenite::Error) -> End {
        match error {
            tungstenite::Error::WriteBufferFull(msg) => self.too_big(msg.len()),
            _ => End::Gone,
        }
    }

    /// A frame over what a client may receive (`NodeConfig::max_out_frame_bytes`): never
    /// written (the write buffer would refuse it, and the connection would just drop), the
    /// connection closes with 1009, and the log says why.
    fn too_big(&self, bytes: usize) -> End {
        tracing::warn!(
            user = %self.user,
            bytes,
            limit = self.node.config.max_out_frame_bytes(),
            "a frame too large for the client; closing with 1009"
        );
        End::Close(close::TOO_BIG, Cow::Borrowed("outgoing frame too large"))
    }

    async fn flush(&self, link: &mut Link) -> Result<(), End> {
        let Link { socket, live } = link;
        self.interruptible(live, socket.flush())
            .await?
            .map_err(|_| End::Gone)
    }

    /// Runs a socket write, giving up when the session is kicked, the node shuts down, or the
    /// write stays blocked across two ping ticks (the client reads nothing: 4004).
    /// A write usually completes at once (into the write buffer, or a socket with room):
    /// only one that has to wait registers for the kick, which costs locks; the common case
    /// checks the kick's code with one atomic load.
    async fn interruptible<T>(
        &self,
        live: &mut Liveness,
        io: impl Future<Output = T>,
    ) -> Result<T, End> {
        if self.queue.kick.code().is_some() {
            return Err(self.kicked());
        }
        let mut io = std::pin::pin!(io);
        if let Poll::Ready(done) = futures_util::poll!(io.as_mut()) {
            return Ok(done);
        }
        let kick = &self.queue.kick;
        let mut kicked = std::pin::pin!(kick.kicked());
        loop {
            tokio::select! {
                biased;
                _ = &mut kicked => return Err(self.kicked()),
                done = io.as_mut() => {
                    // It had to wait and went through: the client read.
                    live.heard_from = true;
                    return Ok(done);
                }
                _ = live.ping.tick() => {
                    // No ping can go out behind a blocked write, and no pong be read.
                    if !std::mem::replace(&mut live.heard_from, false) {
                        return Err(End::Close(close::PING_TIMEOUT, Cow::Borrowed("ping timeout")));
                    }
                    live.ping_due = true;
                }
            }
        }
    }
}

/// Resolves at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_bursts_refuses_excess_and_closes_on_abuse() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take_at(t0), Admission::Allowed);
        }
        assert_eq!(bucket.take_at(t0), Admission::Refused);
        // 100 ms refills one token at 10/s.
        assert_eq!(
            bucket.take_at(t0 + Duration::from_millis(100)),
            Admission::Allowed
        );
        let t1 = t0 + Duration::from_millis(100);
        for _ in 0..3 {
            assert_eq!(bucket.take_at(t1), Admission::Refused);
        }
        assert_eq!(bucket.take_at(t1), Admission::Closed);
    }
}
