//! The hub: the sessions connected to this node, by user id (a user may hold several), and
//! delivery into their queues.
//!
//! Delivery never waits: it `try_send`s into the session's socket queue (bounded in messages
//! and bytes), and a full queue disconnects that session as a slow consumer (close code 4002).
//! A message refused because its recipient is being disconnected that way is counted in
//! `wsbus_messages_dropped_total{reason="slow_consumer"}`, and the caller answers its sender.
//! Nothing here touches Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use dashmap::DashMap;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::delivery::socket_queue::{self, TrySendError};
use crate::wire::client::{ClientError, close};
use crate::wire::frame::SocketFrame;
use crate::wire::ids::{RoomId, UserId};

/// The sending side of one session: its queue and the means to end it.
#[derive(Clone)]
pub struct SessionSender {
    /// Session id, unique on this node; with the node id it names the session in Redis.
    pub sid: u64,
    tx: socket_queue::Sender<SocketFrame>,
    kick: Arc<Kick>,
    orders: Arc<Orders>,
}

/// What the node asks of a session's task besides writing frames: to join or leave a room
/// on the backend's behalf. Rare, so a lock and a wake-up, not a channel per session.
#[derive(Default)]
pub struct Orders {
    pending: std::sync::Mutex<Vec<Order>>,
    wake: Notify,
}

/// One order to a session; `done` gets whether it changed the session's rooms, or why not.
pub enum Order {
    /// Join the room (as a client's `join` without `since`, past `--room-access`).
    Join {
        /// The room.
        room: RoomId,
        /// The outcome.
        done: oneshot::Sender<Result<bool, ClientError>>,
    },
    /// Leave the room, if in it.
    Leave {
        /// The room.
        room: RoomId,
        /// The outcome.
        done: oneshot::Sender<Result<bool, ClientError>>,
    },
}

impl Orders {
    /// Resolves once an order may be waiting.
    pub async fn arrived(&self) {
        self.wake.notified().await
    }

    /// Takes the orders waiting.
    pub fn take(&self) -> Vec<Order> {
        std::mem::take(&mut *self.pending.lock().expect("not poisoned"))
    }
}

/// Asks a session to close with a given code, from any task. Its token is a child of the
/// node's shutdown token, so a session waits on this one signal for both.
pub struct Kick {
    token: CancellationToken,
    code: AtomicU16,
    /// The close frame's reason, when the kicker gave one (`/api/disconnect`).
    reason: std::sync::OnceLock<Box<str>>,
}

impl Kick {
    fn new(shutdown: &CancellationToken) -> Self {
        Self {
            token: shutdown.child_token(),
            code: AtomicU16::new(0),
            reason: std::sync::OnceLock::new(),
        }
    }

    /// Ends the session with close code `code`. The first kick wins; returns whether this
    /// was it.
    pub fn kick(&self, code: u16) -> bool {
        self.kick_with(code, "")
    }

    /// Like [`Kick::kick`], with the close frame's reason (empty: the code's usual one).
    pub fn kick_with(&self, code: u16, reason: &str) -> bool {
        let first = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first && !reason.is_empty() {
            let _ = self.reason.set(reason.into());
        }
        self.token.cancel();
        first
    }

    /// The reason the kicker gave, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|r| &**r)
    }

    /// Resolves once the session was kicked or the node began shutting down.
    pub async fn kicked(&self) {
        self.token.cancelled().await
    }

    /// The close code of the kick, if any (none when the node shuts down).
    pub fn code(&self) -> Option<u16> {
        match self.code.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }
}

/// What the session task itself keeps: the receiving end of its queue and its kick.
pub struct SessionReceiver {
    /// Frames to write to the socket.
    pub rx: socket_queue::Receiver<SocketFrame>,
    /// Set when another task ends this session.
    pub kick: Arc<Kick>,
    /// Rooms to join or leave on the backend's behalf.
    pub orders: Arc<Orders>,
}

/// Outcome of a delivery attempt to one session.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the socket.
    Queued,
    /// No such session here.
    NotHere,
    /// The session's queue was full, or the session is already being disconnected as a slow
    /// consumer: the message was dropped (and counted); tell its sender.
    SlowConsumer,
}

/// Outcome of delivering one frame to every local session of a user.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Sessions it was queued for.
    pub queued: u32,
    /// Sessions whose queue was full (being disconnected as slow consumers).
    pub slow: u32,
}

impl Fanout {
    /// Whether the user has any session here (delivered or not).
    pub fn found(&self) -> bool {
        self.queued + self.slow > 0
    }
}

/// The local sessions, by user: a user may hold several (`--max-sessions-per-user`).
pub struct Hub {
    users: DashMap<UserId, Vec<SessionSender>>,
    /// Number of sessions (not users), kept beside the map so reading it locks nothing.
    sessions: AtomicUsize,
    queue_len: usize,
    queue_bytes: usize,
    /// The node's shutdown token, parent of every session's kick.
    shutdown: CancellationToken,
}

impl Hub {
    /// An empty hub whose sessions queue up to `queue_len` frames and about `queue_bytes`
    /// bytes each, and end when `shutdown` is cancelled.
    pub fn new(queue_len: usize, queue_bytes: usize, shutdown: CancellationToken) -> Self {
        Self {
            users: DashMap::new(),
            sessions: AtomicUsize::new(0),
            queue_len: queue_len.max(1),
            queue_bytes,
            shutdown,
        }
    }

    /// Registers session `sid` of `user` (the per-user limit is the claim's business).
    pub fn insert(&self, user: UserId, sid: u64) -> SessionReceiver {
        let (tx, rx) = socket_queue::channel(self.queue_len, self.queue_bytes);
        let kick = Arc::new(Kick::new(&self.shutdown));
        let orders = Arc::new(Orders::default());
        self.users.entry(user).or_default().push(SessionSender {
            sid,
            tx,
            kick: kick.clone(),
            orders: orders.clone(),
        });
        self.sessions.fetch_add(1, Ordering::Relaxed);
        SessionReceiver { rx, kick, orders }
    }

    /// Removes session `sid` of `user`; returns whether the user has no session here left.
    pub fn remove(&self, user: &str, sid: u64) -> bool {
        let mut removed = false;
        let emptied = self.users.remove_if_mut(user, |_, sessions| {
            if let Some(i) = sessions.iter().position(|s| s.sid == sid) {
                sessions.swap_remove(i);
                removed = true;
            }
            sessions.is_empty()
        });
        if removed {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
        emptied.is_some() || !self.users.contains_key(user)
    }

    /// Queues the frame `make` builds for every session of `user` here except `except`,
    /// building it only if there is one. Never waits.
    pub fn deliver_user(
        &self,
        user: &str,
        except: Option<u64>,
        make: impl FnOnce() -> SocketFrame,
    ) -> Fanout {
        let mut fanout = Fanout::default();
        let Some(sessions) = self.users.get(user) else {
            return fanout;
        };
        let mut make = Some(make);
        let mut frame: Option<SocketFrame> = None;
        for session in sessions.iter().filter(|s| Some(s.sid) != except) {
            let frame = frame.get_or_insert_with(|| (make.take().expect("built once"))());
            match session.offer(frame.clone()) {
                Delivery::Queued => fanout.queued += 1,
                Delivery::SlowConsumer => fanout.slow += 1,
                Delivery::NotHere => {}
            }
        }
        fanout
    }

    /// Queues `frame` for session `sid` of `user` only (errors go to the session that sent).
    pub fn deliver_session(&self, user: &str, sid: u64, frame: SocketFrame) -> Delivery {
        let Some(sessions) = self.users.get(user) else {
            return Delivery::NotHere;
        };
        match sessions.iter().find(|s| s.sid == sid) {
            Some(session) => session.offer(frame),
            None => Delivery::NotHere,
        }
    }

    /// The sending side of session `sid` of `user` (to add it to rooms).
    pub fn sender(&self, user: &str, sid: u64) -> Option<SessionSender> {
        self.users.get(user)?.iter().find(|s| s.sid == sid).cloned()
    }

    /// The sending sides of every session of `user` here.
    pub fn senders_of(&self, user: &str) -> Vec<SessionSender> {
        self.users.get(user).map_or_else(Vec::new, |s| s.clone())
    }

    /// Number of sessions `user` has here.
    pub fn sessions_of(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |s| s.len())
    }

    /// Whether `user` has a session here.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Ends session `sid` of `user` with close code `code` and `reason` (empty: the code's
    /// usual one).
    pub fn kick(&self, user: &str, sid: u64, code: u16, reason: &str) {
        if let Some(sessions) = self.users.get(user)
            && let Some(s) = sessions.iter().find(|s| s.sid == sid)
        {
            s.kick.kick_with(code, reason);
        }
    }

    /// Every session, as (user, sid), for re-registration and shutdown.
    pub fn snapshot(&self) -> Vec<(UserId, u64)> {
        self.users
            .iter()
            .flat_map(|e| {
                let user = e.key().clone();
                e.value()
                    .iter()
                    .map(move |s| (user.clone(), s.sid))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SessionSender {
    /// Hands `order` to the session's task.
    pub fn order(&self, order: Order) {
        self.orders
            .pending
            .lock()
            .expect("not poisoned")
            .push(order);
        self.orders.wake.notify_one();
    }

    /// Queues `frame` without waiting; a full queue kicks the session as a slow consumer,
    /// and the frame is dropped and counted.
    pub fn offer(&self, frame: SocketFrame) -> Delivery {
        // A session being dropped as a slow consumer no longer drains its queue.
        let queued = if self.kick.code() == Some(close::SLOW_CONSUMER) {
            Err(TrySendError::Full)
        } else {
            let size = frame.frame.len();
            self.tx.try_send(frame, size)
        };
        match queued {
            Ok(()) => Delivery::Queued,
            Err(TrySendError::Closed) => Delivery::NotHere,
            Err(TrySendError::Full) => {
                if self.kick.kick(close::SLOW_CONSUMER) {
                    metrics::counter!("wsbus_slow_consumer_disconnects_total").increment(1);
                }
                metrics::counter!("wsbus_messages_dropped_total", "reason" => "slow_consumer")
                    .increment(1);
                Delivery::SlowConsumer
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::Utf8Bytes;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn frame() -> SocketFrame {
        SocketFrame::unmeasured(Utf8Bytes::from_static("x"))
    }

    #[tokio::test]
    async fn delivers_to_every_session_and_kicks_slow_consumers() {
        let hub = Hub::new(2, 1 << 20, CancellationToken::new());
        let mut one = hub.insert(uid("a"), 1);
        let mut two = hub.insert(uid("a"), 2);
        assert_eq!(hub.len(), 2);
        assert_eq!(hub.sessions_of("a"), 2);
        let all = hub.deliver_user("a", None, frame);
        assert_eq!((all.queued, all.slow), (2, 0));
        let others = hub.deliver_user("a", Some(1), frame);
        assert_eq!((others.queued, others.slow), (1, 0));
        // Session 2 holds two frames now: the next one overflows it.
        let over = hub.deliver_user("a", None, frame);
        assert_eq!((over.queued, over.slow), (1, 1));
        assert_eq!(two.kick.code(), Some(close::SLOW_CONSUMER));
        assert_eq!(one.kick.code(), None);
        assert_eq!(one.rx.recv().await.map(|o| o.frame).as_deref(), Some("x"));
        assert_eq!(two.rx.recv().await.map(|o| o.frame).as_deref(), Some("x"));
        // Room again, but session 2 is on its way out: still refused.
        let after = hub.deliver_user("a", Some(1), frame);
        assert_eq!((after.queued, after.slow), (0, 1));
        assert!(!hub.deliver_user("b", None, frame).found());
        assert_eq!(hub.deliver_session("a", 1, frame()), Delivery::Queued);
        assert_eq!(hub.deliver_session("a", 9, frame()), Delivery::NotHere);
    }

    #[test]
    fn a_queue_over_its_byte_bound_is_a_slow_consumer() {
        let hub = Hub::new(1000, 10, CancellationToken::new());
        let inbox = hub.insert(uid("a"), 1);
        let frame = || SocketFrame::unmeasured(Utf8Bytes::from_static("12345"));
        assert_eq!(hub.deliver_session("a", 1, frame()), Delivery::Queued);
        assert_eq!(hub.deliver_session("a", 1, frame()), Delivery::Queued);
        assert_eq!(inbox.rx.bytes(), 10);
        assert_eq!(hub.deliver_session("a", 1, frame()), Delivery::SlowConsumer);
        assert_eq!(inbox.kick.code(), Some(close::SLOW_CONSUMER));
    }

    #[test]
    fn builds_the_frame_only_for_someone() {
        let hub = Hub::new(1, 1 << 20, CancellationToken::new());
        let _a = hub.insert(uid("a"), 1);
        let built = std::cell::Cell::new(0);
        let make = || {
            built.set(built.get() + 1);
            frame()
        };
        hub.deliver_user("a", Some(1), make);
        assert_eq!(built.get(), 0, "no session but the excluded one");
        hub.deliver_user("a", None, make);
        assert_eq!(built.get(), 1);
    }

    #[test]
    fn removes_only_the_named_session() {
        let hub = Hub::new(1, 1 << 20, CancellationToken::new());
        let _one = hub.insert(uid("a"), 1);
        let _two = hub.insert(uid("a"), 2);
        assert!(
            !hub.remove("a", 3),
            "unknown sid: the user still has sessions"
        );
        assert!(!hub.remove("a", 1), "one session left");
        assert!(hub.contains("a"));
        assert_eq!(hub.len(), 1);
        assert!(hub.remove("a", 2), "the last one");
        assert!(hub.is_empty());
        assert!(!hub.contains("a"));
    }
}
