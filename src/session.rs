//! One connected client: reads its frames and routes them, writes what is queued for it,
//! pings it, and cleans up after it. One task per connection.
//!
//! Writes drain the whole queue with `feed` and finish with one `flush`. Every await that
//! can block on the client (a write) also watches the session's kick and the node's
//! shutdown, so a client that stops reading cannot hold its task hostage.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::sync::OwnedSemaphorePermit;

use crate::dispatch::{Origin, Target};
use crate::hub::{Outbound, SessionInbox};
use crate::node::Node;
use crate::protocol::{ClientError, Command, close, encode_error, encode_frame, parse_command};
use crate::user::RoomId;
use crate::user::UserId;
use serde_json::json;

/// Frames written per flush at most, so reads are not starved by a long queue.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// Releases the user's registration when the session ends, however it ends (including an
/// upgrade that never completed, when the session is dropped without running).
pub struct SessionGuard {
    node: Arc<Node>,
    user: UserId,
    sid: u64,
}

impl SessionGuard {
    /// A guard for session `sid` of `user`.
    pub fn new(node: Arc<Node>, user: UserId, sid: u64) -> Self {
        Self { node, user, sid }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
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
    Close(u16, &'static str),
    /// The connection is gone or broken; nothing more to write.
    Gone,
}

/// A session about to run.
pub struct Session {
    node: Arc<Node>,
    user: UserId,
    sid: u64,
    /// The rooms this session is in (the hub's room map has the other direction).
    rooms: HashSet<RoomId>,
    queue: SessionInbox,
    bucket: TokenBucket,
    _guard: SessionGuard,
    _permit: OwnedSemaphorePermit,
}

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
        queue: SessionInbox,
        guard: SessionGuard,
        permit: OwnedSemaphorePermit,
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
            _guard: guard,
            _permit: permit,
        }
    }

    /// Serves the socket until either side ends the session.
    pub async fn run(mut self, mut socket: WebSocket) {
        self.node.metrics.connections_active.increment(1.0);
        let end = self.serve(&mut socket).await;
        // Before the close: a member that has left must get nothing sent after it left.
        self.leave_rooms().await;
        self.node.metrics.connections_active.decrement(1.0);
        let code = match &end {
            End::Close(code, _) => code.to_string(),
            End::Gone => "none".to_owned(),
        };
        metrics::counter!("wsbus_connections_closed_total", "code" => code).increment(1);
        if let End::Close(code, reason) = end {
            let frame = Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }));
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(frame)).await;
        }
    }

    async fn serve(&mut self, socket: &mut WebSocket) -> End {
        let node = self.node.clone();
        let mut ping = tokio::time::interval(node.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut heard_from = true;
        // Registered once, not once per frame. Fires on node shutdown too.
        let kick = self.queue.kick.clone();
        let mut kicked = std::pin::pin!(kick.kicked());
        loop {
            tokio::select! {
                biased;
                _ = &mut kicked => return self.kicked(),
                frame = self.queue.rx.recv() => {
                    let Some(frame) = frame else { return End::Gone };
                    if let Err(end) = self.write_queued(socket, frame).await {
                        return end;
                    }
                }
                incoming = socket.recv() => {
                    heard_from = true;
                    match incoming {
                        None | Some(Ok(Message::Close(_))) => return End::Gone,
                        Some(Ok(frame @ (Message::Text(_) | Message::Binary(_)))) => {
                            let outcome = match (self.bucket.take(), frame) {
                                (Admission::Closed, _) => {
                                    return End::Close(close::RATE_LIMITED, "rate limit exceeded");
                                }
                                (Admission::Refused, _) => Err(ClientError::RateLimited),
                                (Admission::Allowed, Message::Text(text)) => self.handle(&text).await,
                                (Admission::Allowed, _) => Err(ClientError::BinaryFrame),
                            };
                            if let Err(error) = outcome
                                && let Err(end) = self.write_error(socket, &error).await
                            {
                                return end;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Err(e)) => return self.read_failed(socket, e).await,
                    }
                }
                _ = ping.tick() => {
                    if !heard_from {
                        return End::Close(close::PING_TIMEOUT, "ping timeout");
                    }
                    heard_from = false;
                    if let Err(end) = self.write(socket, Message::Ping(Default::default()), true).await {
                        return end;
                    }
                }
            }
        }
    }

    fn kicked(&self) -> End {
        match self.queue.kick.code() {
            Some(close::SLOW_CONSUMER) => End::Close(close::SLOW_CONSUMER, "slow consumer"),
            Some(close::SESSION_REPLACED) => {
                End::Close(close::SESSION_REPLACED, "session replaced")
            }
            Some(close::REPLACED_BY_NEWER) => {
                End::Close(close::REPLACED_BY_NEWER, "replaced by a newer session")
            }
            Some(code) => End::Close(code, ""),
            None => End::Close(close::GOING_AWAY, "node shutting down"),
        }
    }

    /// Handles one client frame; a frame that answers the client (`joined`, `left`,
    /// `members`) is queued for it like any other.
    async fn handle(&mut self, text: &str) -> Result<(), ClientError> {
        let node = &self.node;
        node.metrics.received.increment(1);
        let born_us = crate::node::now_us();
        let origin = || Origin::Session {
            user: self.user.clone(),
            sid: self.sid,
        };
        match parse_command(text)? {
            Command::Message { to, text } => {
                node.send(origin(), Target::User(to.into()), text, born_us)
                    .await
            }
            Command::RoomMessage { room, text } => {
                if !self.rooms.contains(room) {
                    return Err(ClientError::NotInRoom(room.to_owned()));
                }
                node.send(origin(), Target::Room(room.into()), text, born_us)
                    .await
            }
            Command::Join { room } => {
                let id = RoomId::parse(room).ok_or(ClientError::InvalidRoom)?;
                if !self.rooms.contains(room)
                    && self.rooms.len() >= node.config.max_rooms_per_session
                {
                    return Err(ClientError::TooManyRooms);
                }
                let members = node.join_room(&id, &self.user, self.sid).await?;
                self.rooms.insert(id);
                self.reply("joined", json!({"room": room, "members": members}))
            }
            Command::Leave { room } => {
                let Some(id) = self.rooms.take(room) else {
                    return Err(ClientError::NotInRoom(room.to_owned()));
                };
                node.leave_room(&id, &self.user, self.sid).await?;
                self.reply("left", json!({"room": room}))
            }
            Command::Members { room } => {
                let id = RoomId::parse(room).ok_or(ClientError::InvalidRoom)?;
                let list = node.room_member_list(&id).await?;
                let mut data = json!({"room": room, "users": list.users});
                if list.truncated {
                    data["truncated"] = json!(true);
                }
                self.reply("members", data)
            }
        }
    }

    /// Queues a reply frame `{"from": <own id>, "action": .., "data": ..}` for this session.
    fn reply(&self, action: &str, data: serde_json::Value) -> Result<(), ClientError> {
        let frame = Outbound::unmeasured(encode_frame(self.user.as_str(), action, data));
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

    async fn read_failed(&mut self, socket: &mut WebSocket, error: axum::Error) -> End {
        let too_big = error
            .into_inner()
            .downcast_ref::<tungstenite::Error>()
            .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)));
        if !too_big {
            return End::Gone;
        }
        let limit = self.node.config.max_frame_bytes;
        let _ = self
            .write_error(socket, &ClientError::FrameTooLarge(limit))
            .await;
        End::Close(close::TOO_BIG, "frame too large")
    }

    async fn write_error(&self, socket: &mut WebSocket, error: &ClientError) -> Result<(), End> {
        error.count();
        let frame = encode_error(self.user.as_str(), &error.to_string());
        self.write(socket, Message::Text(frame.into()), true).await
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    /// Records each message's end-to-end latency as it goes into the socket's write buffer.
    async fn write_queued(&mut self, socket: &mut WebSocket, first: Outbound) -> Result<(), End> {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            if out.born_us != 0 {
                let latency_us = crate::node::now_us().saturating_sub(out.born_us);
                self.node
                    .metrics
                    .delivery_seconds
                    .record(latency_us as f64 / 1e6);
            }
            self.write(socket, Message::Text(out.frame), false).await?;
            n += 1;
            if n < MAX_FRAMES_PER_FLUSH {
                next = self.queue.rx.try_recv().ok();
            }
        }
        self.flush(socket).await
    }

    /// Feeds one frame (and flushes if asked), giving up when kicked or shutting down.
    async fn write(&self, socket: &mut WebSocket, msg: Message, flush: bool) -> Result<(), End> {
        let io = async {
            if flush {
                socket.send(msg).await
            } else {
                socket.feed(msg).await
            }
        };
        self.interruptible(io).await?.map_err(|_| End::Gone)
    }

    async fn flush(&self, socket: &mut WebSocket) -> Result<(), End> {
        self.interruptible(socket.flush())
            .await?
            .map_err(|_| End::Gone)
    }

    /// Runs a socket write, giving up when the session is kicked or the node shuts down.
    /// A write usually completes at once (into the write buffer, or a socket with room):
    /// only one that has to wait registers for the kick, which costs locks; the common case
    /// checks the kick's code with one atomic load.
    async fn interruptible<T>(&self, io: impl Future<Output = T>) -> Result<T, End> {
        if self.queue.kick.code().is_some() {
            return Err(self.kicked());
        }
        let mut io = std::pin::pin!(io);
        if let Poll::Ready(done) = futures_util::poll!(io.as_mut()) {
            return Ok(done);
        }
        tokio::select! {
            biased;
            _ = self.queue.kick.kicked() => Err(self.kicked()),
            done = io => Ok(done),
        }
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
