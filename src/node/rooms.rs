//! A session's room operations on the node: local membership, the Redis write when a user's
//! first session here joins or its last leaves, presence events, and the member list.

use crate::node::Node;
use crate::wire::client::{ClientError, PresenceEvent};
use crate::wire::ids::{RoomId, UserId};

/// A `members` reply: the users, sorted, and whether the list was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberList {
    /// Users in the room, sorted, at most `--max-members-listed`.
    pub users: Vec<String>,
    /// More users are in the room than listed.
    pub truncated: bool,
}

/// Whether a room sends presence events about a user who joins or leaves it: when the room,
/// counting that user (after the join, before the leave), has at most
/// `--presence-events-max-members` users. "Rooms with more than that many users send no
/// join/leave events" (docs/protocol.md); joins, leaves and a dead node's departures
/// (`server::heartbeat`) all ask here.
pub fn sends_presence(max_members: u64, members_with_user: u64) -> bool {
    members_with_user <= max_members
}

/// The room operations of a session: local membership, the Redis write when a user's first
/// session here joins or its last leaves, and presence events.
impl Node {
    /// Adds session `sid` of `user` to `room`; returns the number of users in the room.
    /// Joining a room the session is in already changes nothing.
    pub async fn join_room(
        &self,
        room: &RoomId,
        user: &UserId,
        sid: u64,
    ) -> Result<u64, ClientError> {
        let handle = self
            .hub
            .sender(user.as_str(), sid)
            .ok_or(ClientError::BusUnavailable)?;
        let turn = self.rooms.change(room).await;
        let joined = self.rooms.join(room, user, handle);
        if !joined.already {
            self.metrics.room_joins.increment(1);
            self.metrics.rooms_active.set(self.rooms.len() as f64);
        }
        if !joined.first_of_user {
            drop(turn);
            return self
                .presence
                .room_size(room)
                .await
                .map_err(|_| ClientError::BusUnavailable);
        }
        let outcome = self
            .presence
            .room_join(room, user, joined.first_here, self.config.max_room_members)
            .await;
        let refused = match &outcome {
            Ok(r) if r.joined => None,
            Ok(_) => Some(ClientError::RoomFull(room.to_string())),
            Err(e) => {
                tracing::warn!(room = %room, user = %user, error = %e, "room join failed");
                Some(ClientError::BusUnavailable)
            }
        };
        if let Some(error) = refused {
            self.rooms.leave(room, user, sid);
            self.metrics.rooms_active.set(self.rooms.len() as f64);
            return Err(error);
        }
        drop(turn);
        let joined = outcome.expect("refusals returned above");
        // `members` counts the user who joined.
        if joined.user_new
            && sends_presence(self.config.presence_events_max_members, joined.members)
        {
            self.send_presence(room, user.as_str(), PresenceEvent::Join)
                .await;
        }
        Ok(joined.members)
    }

    /// Removes session `sid` of `user` from `room` (`not in room` if it is not in it).
    pub async fn leave_room(
        &self,
        room: &RoomId,
        user: &UserId,
        sid: u64,
    ) -> Result<(), ClientError> {
        let turn = self.rooms.change(room).await;
        let left = self.rooms.leave(room, user, sid);
        if !left.was_in {
            return Err(ClientError::NotInRoom(room.to_string()));
        }
        self.metrics.room_leaves.increment(1);
        self.metrics.rooms_active.set(self.rooms.len() as f64);
        if !left.last_of_user {
            return Ok(());
        }
        let outcome = self.presence.room_leave(room, user, left.last_here).await;
        drop(turn);
        match outcome {
            // `members` is counted after the leave: the room had one more, the user who left.
            Ok(r)
                if r.user_gone
                    && sends_presence(self.config.presence_events_max_members, r.members + 1) =>
            {
                self.send_presence(room, user.as_str(), PresenceEvent::Leave)
                    .await;
            }
            Ok(_) => {}
            // The session is out of the room here; Redis still lists this node for the
            // user until the node leaves the room or dies (harmless: nothing is delivered).
            Err(e) => tracing::warn!(room = %room, user = %user, error = %e, "room leave failed"),
        }
        Ok(())
    }

    /// The users in `room`, sorted, cut at `--max-members-listed`.
    pub async fn room_member_list(&self, room: &RoomId) -> Result<MemberList, ClientError> {
        let mut users = self
            .presence
            .room_members(room)
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        let max = self.config.max_members_listed;
        let truncated = users.len() > max;
        users.truncate(max);
        Ok(MemberList { users, truncated })
    }
}
