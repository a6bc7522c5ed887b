//! Server-side membership: a backend puts every live session of a user in a room, or takes
//! them out, on every node (`POST /api/join|leave`, ingress `op=join|leave`, `wsbus join`).
//!
//! It goes the dispatch way: the user resolves to the live nodes holding its sessions; this
//! node orders its own sessions at once, every other node gets one inbox entry
//! ([`Body::Member`]) and answers with one ([`Body::MemberReply`]), which the inbox reader
//! hands back here through [`Node::member_replied`]. Each session joins in its own task, as
//! if its client had sent `join` (room limits, presence, `joined`), past `--room-access`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::delivery::hub::Order;
use crate::node::Node;
use crate::redis::RedisError;
use crate::wire::client::ClientError;
use crate::wire::envelope::{Body, Envelope, append_entry};
use crate::wire::ids::{RoomId, UserId};

/// How long the sessions of a user (here, or on another node) may take to answer.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(5);

/// What one node did for a server-side join or leave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberOutcome {
    /// Sessions now in the room (join) or out of it (leave).
    pub sessions: u32,
    /// The client error text that refused a session's join (`room 'x' is full`), if any.
    pub error: Option<String>,
}

impl Node {
    /// Joins (or, with `join` false, leaves) `room` with every live session of `user` on every
    /// node; returns how many sessions it applied to, or why a join was refused.
    pub async fn change_membership(
        &self,
        user: &UserId,
        room: &RoomId,
        join: bool,
    ) -> Result<u32, ClientError> {
        let nodes = self
            .nodes_of_user(user.as_str())
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        let mut waits = Vec::new();
        let mut pipe = redis::pipe();
        let mut buf = Vec::new();
        for node in nodes.iter().filter(|n| ***n != *self.id) {
            let reply = self.next_message_id();
            let (tx, rx) = oneshot::channel();
            self.member_replies.insert(reply, tx);
            waits.push((reply, rx));
            let env = self.member_envelope(user.as_str(), room.as_str(), join, reply);
            buf.clear();
            env.encode_into(&mut buf);
            let inbox = self.keys.inbox(node);
            append_entry(
                &mut pipe,
                &inbox,
                &env.from,
                &env.to,
                env.body.action(),
                &buf,
            );
        }
        if !waits.is_empty() {
            let sent = async {
                let mut conn = self.redis.conn().await?;
                pipe.query_async::<()>(&mut conn).await?;
                Ok::<_, RedisError>(())
            };
            if sent.await.is_err() {
                for (reply, _) in &waits {
                    self.member_replies.remove(reply);
                }
                return Err(ClientError::BusUnavailable);
            }
        }
        let (ids, answers): (Vec<u64>, Vec<_>) = waits.into_iter().unzip();
        let here = self.change_membership_here(user.as_str(), room, join);
        let there = tokio::time::timeout(MEMBER_TIMEOUT, futures_util::future::join_all(answers));
        let (mut outcome, there) = tokio::join!(here, there);
        for id in ids {
            self.member_replies.remove(&id);
        }
        let Ok(there) = there else {
            return Err(ClientError::BusUnavailable);
        };
        for answer in there {
            let Ok(answer) = answer else {
                return Err(ClientError::BusUnavailable);
            };
            outcome.sessions += answer.sessions;
            outcome.error = outcome.error.or(answer.error);
        }
        match outcome.error {
            Some(text) if text == ClientError::TooManyRooms.to_string() => {
                Err(ClientError::TooManyRooms)
            }
            Some(text) if text == ClientError::BusUnavailable.to_string() => {
                Err(ClientError::BusUnavailable)
            }
            Some(_) => Err(ClientError::RoomFull(room.to_string())),
            None => Ok(outcome.sessions),
        }
    }

    /// Orders every session of `user` on this node to join (or leave) `room`, and waits for
    /// their answers (at most [`MEMBER_TIMEOUT`]; a session that ended meanwhile counts not).
    pub async fn change_membership_here(
        &self,
        user: &str,
        room: &RoomId,
        join: bool,
    ) -> MemberOutcome {
        let mut answers = Vec::new();
        for session in self.hub.senders_of(user) {
            let (done, answer) = oneshot::channel();
            let room = room.clone();
            session.order(match join {
                true => Order::Join { room, done },
                false => Order::Leave { room, done },
            });
            answers.push(answer);
        }
        let mut outcome = MemberOutcome::default();
        let collect = async {
            for answer in answers {
                match answer.await {
                    Ok(Ok(_)) => outcome.sessions += 1,
                    Ok(Err(e)) => {
                        outcome.error.get_or_insert(e.to_string());
                    }
                    Err(_) => {}
                }
            }
        };
        if tokio::time::timeout(MEMBER_TIMEOUT, collect).await.is_err() {
            tracing::warn!(user, room = %room, "sessions did not answer a membership change");
        }
        outcome
    }

    /// Takes a [`Body::Member`] entry (applied in a task of its own, answered when its
    /// sessions have answered: the inbox reader never waits for them) or a
    /// [`Body::MemberReply`] (handed to the request waiting for it).
    pub fn take_member_entry(self: &Arc<Self>, env: &Envelope<'_>) {
        match &env.body {
            Body::Member { room, join, reply } => {
                let node = self.clone();
                let (origin, user, room) =
                    (env.origin.to_string(), env.to.to_string(), room.to_string());
                let (join, reply) = (*join, *reply);
                tokio::spawn(async move {
                    node.answer_member(&origin, &user, &room, join, reply).await
                });
            }
            Body::MemberReply {
                reply,
                sessions,
                error,
            } => {
                let outcome = MemberOutcome {
                    sessions: *sessions,
                    error: (!error.is_empty()).then(|| error.to_string()),
                };
                self.member_replied(*reply, outcome);
            }
            _ => {}
        }
    }

    /// Hands another node's answer to the [`Node::change_membership`] waiting for it.
    pub fn member_replied(&self, reply: u64, outcome: MemberOutcome) {
        if let Some((_, waiting)) = self.member_replies.remove(&reply) {
            let _ = waiting.send(outcome);
        }
    }

    /// Answers a [`Body::Member`] entry from `origin`: applies it here, then appends the
    /// [`Body::MemberReply`] to the origin's inbox.
    pub async fn answer_member(
        &self,
        origin: &str,
        user: &str,
        room: &str,
        join: bool,
        reply: u64,
    ) {
        let Some(room) = RoomId::parse(room) else {
            return;
        };
        let outcome = self.change_membership_here(user, &room, join).await;
        let mut env = self.member_envelope(user, room.as_str(), join, reply);
        env.body = Body::MemberReply {
            reply,
            sessions: outcome.sessions,
            error: Cow::Owned(outcome.error.unwrap_or_default()),
        };
        let mut buf = Vec::new();
        env.encode_into(&mut buf);
        let mut pipe = redis::pipe();
        let inbox = self.keys.inbox(origin);
        append_entry(&mut pipe, &inbox, user, user, env.body.action(), &buf);
        let sent = async {
            let mut conn = self.redis.conn().await?;
            pipe.query_async::<()>(&mut conn).await?;
            Ok::<_, RedisError>(())
        };
        if let Err(e) = sent.await {
            tracing::warn!(user, origin, error = %e, "could not answer a membership change");
        }
    }

    fn member_envelope<'a>(
        &'a self,
        user: &'a str,
        room: &'a str,
        join: bool,
        reply: u64,
    ) -> Envelope<'a> {
        self.control_envelope(
            user,
            Body::Member {
                room: Cow::Borrowed(room),
                join,
                reply,
            },
        )
    }

    /// The live nodes holding sessions of `user` (this one included when it holds one).
    async fn nodes_of_user(&self, user: &str) -> Result<Vec<String>, RedisError> {
        let mut conn = self.redis.conn().await?;
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.user_sessions(user))
            .query_async(&mut conn)
            .await?;
        let mut nodes = Vec::new();
        for node in crate::cluster::presence::nodes_of(fields) {
            if node == *self.id || self.live.is_alive(&mut conn, &node).await? {
                nodes.push(node);
            }
        }
        Ok(nodes)
    }
}
