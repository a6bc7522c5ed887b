//! What a session may do, and what the backend has it do: `--room-access` against the
//! token's `rooms` claim, the token's `join` claim at connect, a `refresh` that replaces
//! the token (and its expiry in the node's one timer set), and the join and leave orders
//! of a server-side membership change.

use std::borrow::Cow;

use serde_json::json;

use super::{Direct, End, Link, Session};
use crate::config::RoomAccess;
use crate::delivery::hub::Order;
use crate::wire::client::ClientError;

impl Session {
    /// Whether the client may join `room` itself (`--room-access`).
    pub(super) fn may_join(&self, room: &str) -> bool {
        match self.node.config.room_access() {
            RoomAccess::Open => true,
            RoomAccess::Token => self.grant.rooms.allows(room),
            RoomAccess::Server => false,
        }
    }

    /// Puts the session's token expiry in the node's timer set (not with `--insecure`).
    pub(super) fn watch_expiry(&self) {
        if let (Some(exp), Some(_)) = (self.grant.exp, &self.node.auth) {
            self.node.expiries.insert(exp, &self.user, self.sid);
        }
    }

    /// Takes the session's expiry out of the node's timer set (it is ending).
    pub(super) fn unwatch_expiry(&self) {
        if let Some(exp) = self.grant.exp {
            self.node.expiries.remove(exp, &self.user, self.sid);
        }
    }

    /// `refresh`: checks `token` like a connect token (this user); on success the session's
    /// expiry and `rooms` claim are the new token's, answered with `refreshed`. Anything
    /// wrong answers `invalid token` and changes nothing.
    pub(super) fn refresh(&mut self, token: &str) -> Result<Direct, ClientError> {
        let verifier = self.node.auth.as_ref().ok_or(ClientError::InvalidToken)?;
        let grant = verifier
            .verify(token, self.user.as_str())
            .map_err(|_| ClientError::InvalidToken)?;
        let exp = grant.exp.ok_or(ClientError::InvalidToken)?;
        match self.grant.exp {
            Some(old) => self.node.expiries.reset(old, exp, &self.user, self.sid),
            None => self.node.expiries.insert(exp, &self.user, self.sid),
        }
        self.grant.exp = Some(exp);
        self.grant.rooms = grant.rooms;
        self.reply("refreshed", json!({"exp": exp}))?;
        Ok(Direct::new())
    }

    /// Joins the rooms of the token's `join` claim, before the client's first frame is read:
    /// their `joined` frames come first. A refused one answers its error and the rest go on.
    pub(super) async fn join_claimed(&mut self, link: &mut Link) -> Result<(), End> {
        for room in std::mem::take(&mut self.grant.join) {
            match self.join(&room, None).await {
                Ok(direct) => self.write_direct(link, direct).await?,
                Err(error) => self.write_error(link, &error).await?,
            }
        }
        Ok(())
    }

    /// Carries out the node's orders: joins and leaves on the backend's behalf.
    pub(super) async fn run_orders(&mut self, link: &mut Link) -> Result<(), End> {
        for order in self.queue.orders.take() {
            match order {
                Order::Join { room, done } => {
                    if self.rooms.contains(&room) {
                        let _ = done.send(Ok(false));
                        continue;
                    }
                    match self.join(room.as_str(), None).await {
                        Ok(direct) => {
                            let _ = done.send(Ok(true));
                            self.write_direct(link, direct).await?;
                        }
                        Err(error) => {
                            let _ = done.send(Err(error));
                        }
                    }
                }
                Order::Leave { room, done } => {
                    let left = match self.rooms.take(&room) {
                        None => Ok(false),
                        Some(id) => self.leave(id).await.map(|()| true),
                    };
                    let _ = done.send(left);
                }
            }
        }
        Ok(())
    }

    /// `members`: the users of a room the session is in (reading a room needs membership).
    pub(super) async fn members(&mut self, room: &str) -> Result<Direct, ClientError> {
        if !self.rooms.contains(room) {
            return Err(ClientError::NotInRoom(room.to_owned()));
        }
        let id = crate::wire::ids::RoomId::parse(room).ok_or(ClientError::InvalidRoom)?;
        let list = self.node.room_member_list(&id).await?;
        let mut data = json!({"room": room, "users": list.users});
        if list.truncated {
            data["truncated"] = json!(true);
        }
        self.reply("members", data)?;
        Ok(Direct::new())
    }

    /// Leaves a room the session was in (`leave`, or on the backend's behalf): `left`.
    pub(super) async fn leave(&mut self, id: crate::wire::ids::RoomId) -> Result<(), ClientError> {
        self.seq.stop(id.as_str());
        Box::pin(self.node.leave_room(&id, &self.user, self.sid)).await?;
        self.reply("left", json!({"room": Cow::Borrowed(id.as_str())}))
    }
}
