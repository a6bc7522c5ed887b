//! Presence: which node holds which user, in `P:user:<uid>` hashes, and the per-node user sets.
//!
//! Claims decide uniqueness atomically in one key (a Redis function). Liveness is not kept
//! per user: a user is reachable iff its hash names a node that is alive in the node registry,
//! so presence costs nothing per user per heartbeat.

use std::sync::Arc;

use redis::Value;

use crate::bus::{Bus, BusError, func};
use crate::keys::Keys;
use crate::registry::LiveNodes;
use crate::user::UserId;

/// Outcome of a claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// This session holds the user now.
    Claimed,
    /// Another live session holds it.
    Held {
        /// The node of the holding session.
        node: String,
    },
}

/// User registration for one node.
pub struct Presence {
    bus: Arc<Bus>,
    keys: Keys,
    node_id: Arc<str>,
    live: Arc<LiveNodes>,
}

impl Presence {
    /// Presence of node `node_id`.
    pub fn new(bus: Arc<Bus>, keys: Keys, node_id: Arc<str>, live: Arc<LiveNodes>) -> Self {
        Self {
            bus,
            keys,
            node_id,
            live,
        }
    }

    /// Claims `user` for session `sid` of this node. A holder on a dead node is replaced.
    pub async fn claim(&self, user: &UserId, sid: u64, now_ms: u64) -> Result<Claim, BusError> {
        let key = self.keys.user(user.as_str());
        let sid_text = sid.to_string();
        let mut conn = self.bus.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg(func::CLAIM)
            .arg(1)
            .arg(&key)
            .arg(&*self.node_id)
            .arg(&sid_text)
            .arg(now_ms)
            .cmd("SADD")
            .arg(self.keys.node_users(&self.node_id))
            .arg(user.as_str())
            .ignore();
        let (reply,): (Vec<Value>,) = self.bus.query(&mut conn, &pipe).await?;
        let (holder_node, holder_sid) = match parse_claim(&reply)? {
            None => return Ok(Claim::Claimed),
            Some(holder) => holder,
        };
        let holder_alive =
            holder_node == *self.node_id || self.live.is_alive(&mut conn, &holder_node).await?;
        let outcome = if holder_alive {
            Some((holder_node, holder_sid))
        } else {
            let mut take = redis::pipe();
            take.cmd("FCALL")
                .arg(func::TAKE_OVER)
                .arg(1)
                .arg(&key)
                .arg(&holder_node)
                .arg(&holder_sid)
                .arg(&*self.node_id)
                .arg(&sid_text)
                .arg(now_ms);
            let (reply,): (Vec<Value>,) = self.bus.query(&mut conn, &take).await?;
            parse_claim(&reply)?
        };
        match outcome {
            None => Ok(Claim::Claimed),
            Some((node, _)) => {
                if node != *self.node_id {
                    // The SADD above added a user that is not ours.
                    redis::cmd("SREM")
                        .arg(self.keys.node_users(&self.node_id))
                        .arg(user.as_str())
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                Ok(Claim::Held { node })
            }
        }
    }

    /// Releases `user` if session `sid` of this node still holds it.
    pub async fn release(&self, user: &UserId, sid: u64) -> Result<(), BusError> {
        let mut conn = self.bus.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg(func::RELEASE)
            .arg(1)
            .arg(self.keys.user(user.as_str()))
            .arg(&*self.node_id)
            .arg(sid)
            .ignore()
            .cmd("SREM")
            .arg(self.keys.node_users(&self.node_id))
            .arg(user.as_str())
            .ignore();
        self.bus.query::<()>(&mut conn, &pipe).await
    }

    /// Claims every listed session again (after Redis lost its data or reaped this node),
    /// in pipelined chunks. Returns the sessions another live session has taken meanwhile.
    pub async fn reclaim(
        &self,
        sessions: &[(UserId, u64)],
        now_ms: u64,
    ) -> Result<Vec<(UserId, u64)>, BusError> {
        let mut lost = Vec::new();
        let mut conn = self.bus.conn().await?;
        let users_key = self.keys.node_users(&self.node_id);
        for chunk in sessions.chunks(512) {
            let mut pipe = redis::pipe();
            for (user, sid) in chunk {
                pipe.cmd("FCALL")
                    .arg(func::CLAIM)
                    .arg(1)
                    .arg(self.keys.user(user.as_str()))
                    .arg(&*self.node_id)
                    .arg(sid)
                    .arg(now_ms);
            }
            let replies: Vec<Vec<Value>> = self.bus.query(&mut conn, &pipe).await?;
            let mut add = redis::cmd("SADD");
            add.arg(&users_key);
            let mut added = 0;
            for ((user, sid), reply) in chunk.iter().zip(&replies) {
                match parse_claim(reply)? {
                    None => {
                        add.arg(user.as_str());
                        added += 1;
                    }
                    Some(_) => lost.push((user.clone(), *sid)),
                }
            }
            if added > 0 {
                add.query_async::<()>(&mut conn).await?;
            }
        }
        Ok(lost)
    }

    /// Which node each user is on, by `P:user:<uid>` (no liveness check), one pipeline.
    pub async fn locate(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        users: impl Iterator<Item = impl AsRef<str>>,
    ) -> Result<Vec<Option<String>>, BusError> {
        let mut pipe = redis::pipe();
        let mut key = String::new();
        for user in users {
            self.keys.user_into(user.as_ref(), &mut key);
            pipe.cmd("HGET").arg(&key).arg("node");
        }
        Ok(pipe.query_async(conn).await?)
    }
}

/// `None` for a granted claim, the holder (node, sid) for a refused one.
fn parse_claim(reply: &[Value]) -> Result<Option<(String, String)>, BusError> {
    match reply {
        [Value::Int(1)] => Ok(None),
        [Value::Int(0), node, sid] => {
            let text = |v: &Value| match v {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            };
            match (text(node), text(sid)) {
                (Some(n), Some(s)) => Ok(Some((n, s))),
                _ => Err(BusError::Reply("claim holder")),
            }
        }
        _ => Err(BusError::Reply("claim")),
    }
}
