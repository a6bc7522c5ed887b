//! Token lifetimes: one ordered set per node of (expiry, user, session), and one task that
//! closes each session whose token expired (4008, `token expired`) unless it was refreshed
//! first. A connection costs one entry in the set: no timer and no task of its own, so a
//! few thousand tokens expiring in the same second are one wake-up and one pass.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::delivery::hub::Hub;
use crate::wire::client::close;
use crate::wire::ids::UserId;

/// The sessions whose tokens expire, earliest first.
#[derive(Default)]
pub struct Expiries {
    /// (exp in seconds since the epoch, user, session id).
    due: Mutex<BTreeSet<(u64, UserId, u64)>>,
    /// Wakes the task when an entry earlier than all others arrives.
    earlier: Notify,
}

impl Expiries {
    /// Session `sid` of `user` closes at `exp` (seconds since the epoch).
    pub fn insert(&self, exp: u64, user: &UserId, sid: u64) {
        let mut due = self.due.lock().expect("not poisoned");
        let first = due.first().is_none_or(|(at, _, _)| exp < *at);
        due.insert((exp, user.clone(), sid));
        drop(due);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Forgets the entry of session `sid` of `user` at `exp` (it ended, or refreshed).
    pub fn remove(&self, exp: u64, user: &UserId, sid: u64) {
        self.due
            .lock()
            .expect("not poisoned")
            .remove(&(exp, user.clone(), sid));
    }

    /// Moves session `sid` of `user` from `old` to `new` (a refresh).
    pub fn reset(&self, old: u64, new: u64, user: &UserId, sid: u64) {
        self.remove(old, user, sid);
        self.insert(new, user, sid);
    }

    /// Number of sessions with an expiry.
    pub fn len(&self) -> usize {
        self.due.lock().expect("not poisoned").len()
    }

    /// Whether no session has an expiry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The earliest expiry.
    fn next(&self) -> Option<u64> {
        self.due.lock().expect("not poisoned").first().map(|e| e.0)
    }

    /// Takes every entry due at `now_secs`.
    fn take_due(&self, now_secs: u64) -> Vec<(UserId, u64)> {
        let mut due = self.due.lock().expect("not poisoned");
        let mut out = Vec::new();
        while let Some((exp, _, _)) = due.first()
            && *exp <= now_secs
        {
            let (_, user, sid) = due.pop_first().expect("just seen");
            out.push((user, sid));
        }
        out
    }
}

/// Closes sessions as their tokens expire, until `shutdown`.
pub async fn run(expiries: &Expiries, hub: &Hub, shutdown: CancellationToken) {
    loop {
        let wait = expiries.next().map(|exp| {
            let now_ms = crate::wire::clock::now_ms();
            Duration::from_millis((exp * 1000).saturating_sub(now_ms))
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = expiries.earlier.notified() => continue,
            _ = sleep_for(wait) => {}
        }
        let now_secs = crate::wire::clock::now_ms() / 1000;
        let expired = expiries.take_due(now_secs);
        if !expired.is_empty() {
            tracing::debug!(sessions = expired.len(), "tokens expired");
            metrics::counter!("wsbus_tokens_expired_total").increment(expired.len() as u64);
        }
        for (user, sid) in expired {
            hub.kick(user.as_str(), sid, close::TOKEN_EXPIRED, "token expired");
        }
    }
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn takes_what_is_due_in_order_and_forgets_refreshed_entries() {
        let e = Expiries::default();
        e.insert(20, &uid("b"), 2);
        e.insert(10, &uid("a"), 1);
        e.insert(10, &uid("c"), 3);
        assert_eq!(e.next(), Some(10));
        e.reset(10, 30, &uid("c"), 3);
        assert_eq!(e.take_due(9), vec![]);
        assert_eq!(e.take_due(15), vec![(uid("a"), 1)]);
        e.remove(20, &uid("b"), 2);
        assert_eq!(e.take_due(25), vec![]);
        assert_eq!(e.take_due(30), vec![(uid("c"), 3)]);
        assert!(e.is_empty());
    }

    #[tokio::test]
    async fn closes_every_session_due_in_one_pass() {
        let hub = Hub::new(4, 1 << 20, CancellationToken::new());
        let e = Expiries::default();
        let now = crate::wire::clock::now_ms() / 1000;
        let receivers: Vec<_> = (0..3000)
            .map(|i| {
                let user = uid(&format!("u{i}"));
                let rx = hub.insert(user.clone(), i);
                e.insert(now, &user, i);
                rx
            })
            .collect();
        let later = hub.insert(uid("later"), 9999);
        e.insert(now + 3600, &uid("later"), 9999);
        let stop = CancellationToken::new();
        let task = async {
            run(&e, &hub, stop.clone()).await;
        };
        let check = async {
            for rx in &receivers {
                rx.kick.kicked().await;
                assert_eq!(rx.kick.code(), Some(close::TOKEN_EXPIRED));
                assert_eq!(rx.kick.reason(), Some("token expired"));
            }
            assert_eq!(later.kick.code(), None);
            assert_eq!(e.len(), 1);
            stop.cancel();
        };
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(task, check) })
            .await
            .expect("every due session closed at once");
    }
}
