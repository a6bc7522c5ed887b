//! The hub: the sessions connected to this node, by user id, and delivery into their queues.
//!
//! Delivery never waits: it `try_send`s into the session's bounded queue, and a full queue
//! disconnects that session as a slow consumer (close code 4002). Nothing here touches Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::close;
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
    tx: mpsc::Sender<Outbound>,
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

    /// Ends the session with close code `code` (the first kick wins).
    pub fn kick(&self, code: u16) {
        let _ = self
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
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
    pub rx: mpsc::Receiver<Outbound>,
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
    /// The session's queue was full; the session is being disconnected.
    SlowConsumer,
}

/// The local sessions.
pub struct Hub {
    sessions: DashMap<UserId, SessionHandle>,
    queue_len: usize,
    /// The node's shutdown token, parent of every session's kick.
    shutdown: CancellationToken,
}

impl Hub {
    /// An empty hub whose sessions queue up to `queue_len` frames each and end when
    /// `shutdown` is cancelled.
    pub fn new(queue_len: usize, shutdown: CancellationToken) -> Self {
        Self {
            sessions: DashMap::new(),
            queue_len: queue_len.max(1),
            shutdown,
        }
    }

    /// Registers a session for `user`, replacing nothing: `None` if the user already has one.
    pub fn insert(&self, user: UserId, sid: u64) -> Option<SessionInbox> {
        use dashmap::mapref::entry::Entry;
        match self.sessions.entry(user) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                let (tx, rx) = mpsc::channel(self.queue_len);
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
        match session.tx.try_send(make()) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::NotHere,
            Err(mpsc::error::TrySendError::Full(_)) => {
                session.kick.kick(close::SLOW_CONSUMER);
                metrics::counter!("wsbus_slow_consumer_disconnects_total").increment(1);
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
        let hub = Hub::new(2, CancellationToken::new());
        let mut inbox = hub.insert(uid("a"), 1).unwrap();
        assert!(hub.insert(uid("a"), 2).is_none(), "one session per user");
        let frame = || Outbound::unmeasured(Utf8Bytes::from_static("x"));
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(hub.deliver("a", frame()), Delivery::Queued);
        assert_eq!(hub.deliver("a", frame()), Delivery::SlowConsumer);
        assert_eq!(inbox.kick.code(), Some(close::SLOW_CONSUMER));
        assert_eq!(inbox.rx.recv().await.map(|o| o.frame).as_deref(), Some("x"));
        assert_eq!(hub.deliver("b", frame()), Delivery::NotHere);
    }

    #[test]
    fn removes_only_the_named_session() {
        let hub = Hub::new(1, CancellationToken::new());
        let _inbox = hub.insert(uid("a"), 1).unwrap();
        hub.remove("a", 2);
        assert!(hub.contains("a"));
        hub.remove("a", 1);
        assert!(hub.is_empty());
    }
}
