//! Rooms on this node: which local sessions are in which room, and delivery to them.
//!
//! Membership is per session (a session joins a room); a *user* is in a room while any of
//! its sessions is. Redis learns only what other nodes need: that this node has a user in a
//! room (on the user's first session here joining, and its last leaving), so a room message
//! costs one inbox entry per other node with members, never one per member (see
//! [`crate::cluster::presence`] for the Redis side and [`crate::delivery::target`] for delivery).
//!
//! Membership changes of one room are serialized on this node ([`Rooms::change`]), so the
//! Redis write that follows one change is never overtaken by the next one's.

use std::sync::Arc;

use dashmap::DashMap;

use crate::delivery::hub::{Delivery, SessionSender};
use crate::wire::frame::SocketFrame;
use crate::wire::ids::{RoomId, UserId};

/// One session in a room.
struct Member {
    user: UserId,
    sender: SessionSender,
}

/// What a local join changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The session was in the room already (nothing changed).
    pub already: bool,
    /// It is the user's first session here in the room (Redis must learn it).
    pub first_of_user: bool,
    /// It is the room's first member on this node.
    pub first_here: bool,
}

/// What a local leave changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    /// The session was in the room.
    pub was_in: bool,
    /// It was the user's last session here in the room (Redis must learn it).
    pub last_of_user: bool,
    /// The room has no member left on this node.
    pub last_here: bool,
}

/// The rooms with members on this node.
#[derive(Default)]
pub struct Rooms {
    rooms: DashMap<RoomId, Vec<Member>>,
    /// One lock per room with pending membership changes (see the module doc).
    locks: DashMap<RoomId, Arc<tokio::sync::Mutex<()>>>,
}

impl Rooms {
    /// An empty set of rooms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the turn to change `room`'s membership on this node; hold the returned
    /// guard from the local change until its Redis write is done.
    pub async fn change(&self, room: &RoomId) -> RoomChange<'_> {
        let lock = self.locks.entry(room.clone()).or_default().clone();
        RoomChange {
            guard: Some(lock.lock_owned().await),
            rooms: self,
            room: room.clone(),
        }
    }

    /// Adds session `handle` of `user` to `room`.
    pub fn join(&self, room: &RoomId, user: &UserId, sender: SessionSender) -> Joined {
        let mut members = self.rooms.entry(room.clone()).or_default();
        let first_here = members.is_empty();
        if members.iter().any(|m| m.sender.sid == sender.sid) {
            return Joined {
                already: true,
                first_of_user: false,
                first_here: false,
            };
        }
        let first_of_user = !members.iter().any(|m| m.user == *user);
        members.push(Member {
            user: user.clone(),
            sender,
        });
        Joined {
            already: false,
            first_of_user,
            first_here,
        }
    }

    /// Removes session `sid` of `user` from `room`.
    pub fn leave(&self, room: &RoomId, user: &UserId, sid: u64) -> Left {
        let mut left = Left {
            was_in: false,
            last_of_user: false,
            last_here: false,
        };
        self.rooms.remove_if_mut(room, |_, members| {
            if let Some(i) = members.iter().position(|m| m.sender.sid == sid) {
                members.swap_remove(i);
                left.was_in = true;
                left.last_of_user = !members.iter().any(|m| m.user == *user);
            }
            left.last_here = members.is_empty();
            left.last_here
        });
        left
    }

    /// Queues the frame `make` builds for every session in `room`, except session
    /// `except_sid` and every session of user `except_user`. Returns the sessions queued for.
    pub fn deliver(
        &self,
        room: &str,
        except_sid: Option<u64>,
        except_user: Option<&str>,
        make: impl FnOnce() -> SocketFrame,
    ) -> u32 {
        let Some(members) = self.rooms.get(room) else {
            return 0;
        };
        let mut make = Some(make);
        let mut frame: Option<SocketFrame> = None;
        let mut queued = 0;
        for m in members.iter() {
            if Some(m.sender.sid) == except_sid || Some(m.user.as_str()) == except_user {
                continue;
            }
            let frame = frame.get_or_insert_with(|| (make.take().expect("built once"))());
            if m.sender.offer(frame.clone()) == Delivery::Queued {
                queued += 1;
            }
        }
        queued
    }

    /// Every (room, user) with a session here, once each (to register them again after
    /// Redis lost its data).
    pub fn snapshot(&self) -> Vec<(RoomId, UserId)> {
        let mut pairs = Vec::new();
        for entry in self.rooms.iter() {
            let mut users: Vec<&UserId> = entry.value().iter().map(|m| &m.user).collect();
            users.sort_unstable();
            users.dedup();
            pairs.extend(users.into_iter().map(|u| (entry.key().clone(), u.clone())));
        }
        pairs
    }

    /// Number of rooms with members here.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// Whether no room has members here.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

/// A turn to change one room's membership on this node (see [`Rooms::change`]). On drop, the
/// room's lock is forgotten unless another change is waiting for it.
pub struct RoomChange<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    rooms: &'a Rooms,
    room: RoomId,
}

impl Drop for RoomChange<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Only the map holds it: nobody waits.
        self.rooms
            .locks
            .remove_if(&self.room, |_, lock| Arc::strong_count(lock) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::hub::Hub;
    use tokio_util::sync::CancellationToken;
    use tungstenite::Utf8Bytes;

    fn id<T>(parse: fn(&str) -> Option<T>, s: &str) -> T {
        parse(s).unwrap()
    }

    #[tokio::test]
    async fn tracks_first_and_last_per_user_and_per_node_and_delivers_with_exclusions() {
        let hub = Hub::new(8, 1 << 20, CancellationToken::new());
        let rooms = Rooms::new();
        let lobby = id(RoomId::parse, "lobby");
        let (alice, bob) = (id(UserId::parse, "alice"), id(UserId::parse, "bob"));
        let mut a1 = hub.insert(alice.clone(), 1);
        let mut a2 = hub.insert(alice.clone(), 2);
        let mut b3 = hub.insert(bob.clone(), 3);
        let handle = |u: &UserId, sid| hub.sender(u.as_str(), sid).unwrap();

        let j = rooms.join(&lobby, &alice, handle(&alice, 1));
        assert!(j.first_of_user && j.first_here && !j.already);
        let j = rooms.join(&lobby, &alice, handle(&alice, 2));
        assert!(!j.first_of_user && !j.first_here);
        assert!(rooms.join(&lobby, &alice, handle(&alice, 2)).already);
        let j = rooms.join(&lobby, &bob, handle(&bob, 3));
        assert!(j.first_of_user && !j.first_here);
        assert_eq!(rooms.snapshot().len(), 2);

        let frame = || SocketFrame::unmeasured(Utf8Bytes::from_static("m"));
        // A message from session 1: everyone else in the room.
        assert_eq!(rooms.deliver("lobby", Some(1), None, frame), 2);
        // A presence event about alice: only bob.
        assert_eq!(rooms.deliver("lobby", None, Some("alice"), frame), 1);
        assert!(a1.rx.try_recv().is_none());
        assert!(a2.rx.try_recv().is_some());
        assert_eq!(b3.rx.try_recv().map(|o| o.frame).as_deref(), Some("m"));
        assert_eq!(b3.rx.try_recv().map(|o| o.frame).as_deref(), Some("m"));

        let l = rooms.leave(&lobby, &alice, 1);
        assert!(l.was_in && !l.last_of_user && !l.last_here);
        let l = rooms.leave(&lobby, &alice, 2);
        assert!(l.was_in && l.last_of_user && !l.last_here);
        assert!(!rooms.leave(&lobby, &alice, 2).was_in);
        let l = rooms.leave(&lobby, &bob, 3);
        assert!(l.last_of_user && l.last_here);
        assert!(rooms.is_empty());
        assert_eq!(rooms.deliver("lobby", None, None, frame), 0);
    }

    #[tokio::test]
    async fn a_rooms_lock_is_kept_while_a_change_waits_and_forgotten_after() {
        let rooms = Rooms::new();
        let room = id(RoomId::parse, "r");
        let first = rooms.change(&room).await;
        let mut second = Box::pin(rooms.change(&room));
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        drop(first);
        assert_eq!(rooms.locks.len(), 1, "kept: a change is waiting for it");
        let second = second.await;
        assert_eq!(rooms.locks.len(), 1);
        drop(second);
        assert!(rooms.locks.is_empty(), "forgotten: nobody waits");
    }
}
