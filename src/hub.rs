//! The hub: the sessions connected to this node, by user id, and delivery into their queues.
//!
//! Delivery never waits: it `try_send`s into the session's socket queue (bounded in messages
//! and bytes), and a full queue disconnects that session as a slow consumer (close code 4002).
//! A message refused because its recipient is being disconnected that way is counted in
//! `wsbus_messages_dropped_total{reason="slow_consumer"}`, and the caller answers its sender.
//! Nothing here touches Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use crate::protocol::close;
use crate::socket_queue::{self, TrySendError};
use crate::user::UserId;

/// One frame queued for a session, with when its message entered the cluster.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The encoded JSON frame.
    pub frame: Utf8Bytes,
    /// When the message's frame reached its sender's node (µs since the epoch), for the
    /// end-to-end latency histogram; 0 for frames not measured (errors).
    pub born_us: u64,
}

impl Outbound {
    /// A frame that is not measured.
    pub fn unmeasured(frame: impl Into<Utf8Bytes>) -> Self {
        Self {
            frame: frame.into(),
            born_us: 0,
        }
    }
}

/// The sending side of one session: its queue and the means to end it.
#[derive(Clone)]
pub struct SessionHandle {
    /// Session id, unique on this node; with the node id it names the session in Redis.
    pub sid: u64,
    tx: socket_queue::Sender<Outbound>,
    kick: Arc<Kick>,
}

/// Asks a session to close with a given code, from any task. Its token is a child of the
/// node's shutdown token, so a session waits on this one signal for both.
pub struct Kick {
    token: CancellationToken,
    code: AtomicU16,
}

impl Kick {
    fn new(shutdown: &CancellationToken) -> Self {
        Self {
            token: shutdown.child_token(),
            code: AtomicU16::new(0),
        }
    }

    /// Ends the session with close code `code`. The first kick wins; returns whether this
    /// was it.
    pub fn kick(&self, code: u16) -> bool {
        let first = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.token.cancel();
        first
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
pub struct SessionInbox {
    /// Frames to write to the socket.
    pub rx: socket_queue::Receiver<Outbound>,
    /// Set when another task ends this session.
    pub kick: Arc<Kick>,
}

/// Outcome of a delivery attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the socket.
    Queued,
    /// No session of that user here.
    NotHere,
    /// The session's queue was full, or the session is already being disconnected as a slow
    /// consumer: the message was dropped (and counted); tell its sender.
    SlowConsumer,
}

/// The local sessions.
pub struct Hub {
    sessions: DashMap<UserId, SessionHandle>,
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
            sessions: DashMap::new(),
            queue_len: queue_len.max(1),
            queue_bytes,
            shutdown,
        }
    }

    /// Registers a session for `user`, replacing nothing: `None` if the user already has one.
    pub fn insert(&self, user: UserId, sid: u64) -> Option<SessionInbox> {
        use dashmap::mapref::entry::Entry;
        match self.sessions.entry(user) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                let (tx, rx) = socket_queue::channel(self.queue_len, self.queue_bytes);
                let kick = Arc::new(Kick::new(&self.shutdown));
                slot.insert(SessionHandle {
                    sid,
                    tx,
                    kick: kick.clone(),
                });
                Some(SessionInbox { rx, kick })
            }
        }
    }

    /// Removes `user`'s session if it is still session `sid`.
    pub fn remove(&self, user: &str, sid: u64) {
        self.sessions.remove_if(user, |_, s| s.sid == sid);
    }

    /// Queues `frame` for `user` without waiting.
    pub fn deliver(&self, user: &str, frame: Outbound) -> Delivery {
        self.deliver_with(user, || frame)
    }

    /// Queues the frame `make` builds for `user`, building it only if `user` is here.
    pub fn deliver_with(&self, user: &str, make: impl FnOnce() -> Outbound) -> Delivery {
        let Some(session) = self.sessions.get(user) else {
            return Delivery::NotHere;
        };
        // A session being dropped as a slow consumer no longer drains its queue.
        let queued = if session.kick.code() == Some(close::SLOW_CONSUMER) {
            Err(TrySendError::Full)
        } else {
            let out = make();
            let size = out.frame.len();
            session.tx.try_send(out, size)
        };
        match queued {
            Ok(()) => Delivery::Queued,
            Err(TrySendError::Closed) => Delivery::NotHere,
            Err(TrySendError::Full) => {
                if session.kick.kick(close::SLOW_CONSUMER) {
                    metrics::counter!("wsbus_slow_consumer_disconnects_total").increment(1);
                }
                metrics::counter!("wsbus_messages_dropped_total", "reason" => "slow_consumer")
                    .increment(1);
                Delivery::SlowConsumer
            }
        }
    }

    /// Whether `user` has a session here.
    pub fn contains(&self, user: &str) -> bool {
        self.sessions.contains_key(user)
    }

    /// Ends `user`'s session `sid` with close code `code`.
    pub fn kick(&self, user: &str, sid: u64, code: u16) {
        if let Some(s) = self.sessions.get(user).filter(|s| s.sid == sid) {
            s.kick.kick(code);
        }
    }

    /// Every session, as (user, sid), for re-registration and shutdown.
    pub fn snapshot(&self) -> Vec<(UserId, u64)> {
        self.sessions
            .iter()
            .map(|e| (e.key().clone(), e.value().sid))
            .collect()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn delivers_and_kicks_slow_consumers() {
        let hub = Hub::new(2, usize::MAX, CancellationToken::new());
        let mut inbox = hub.insert(uid("a"), 1).unwrap();
        assert!(hub.insert(uid("a"), 2).is_none(), "one session per user");
        let frame = || Outbound::unmeasured(Utf8Bytes::from_static("x"));
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(hub.deliver("a", frame()), Delivery::SlowConsumer);
        assert_eq!(inbox.kick.code(), Some(close::SLOW_CONSUMER));
        assert_eq!(inbox.rx.recv().await.map(|o| o.frame).as_deref(), Some("x"));
        // Room again, but the session is on its way out: still refused.
        assert_eq!(hub.deliver("a", frame()), Delivery::SlowConsumer);
        assert_eq!(hub.deliver("b", frame()), Delivery::NotHere);
    }

    #[test]
    fn a_queue_over_its_byte_bound_is_a_slow_consumer() {
        let hub = Hub::new(1000, 10, CancellationToken::new());
        let inbox = hub.insert(uid("a"), 1).unwrap();
        let frame = || Outbound::unmeasured(Utf8Bytes::from_static("12345"));
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(inbox.rx.bytes(), 10);
        assert_eq!(hub.deliver("a", frame()), Delivery::SlowConsumer);
        assert_eq!(inbox.kick.code(), Some(close::SLOW_CONSUMER));
    }

    #[test]
    fn removes_only_the_named_session() {
        let hub = Hub::new(1, usize::MAX, CancellationToken::new());
        let _inbox = hub.insert(uid("a"), 1).unwrap();
        hub.remove("a", 2);
        assert!(hub.contains("a"));
        hub.remove("a", 1);
        assert!(hub.is_empty());
    }
}
