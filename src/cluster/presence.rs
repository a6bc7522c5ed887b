//! Presence: which nodes hold which sessions of a user, in one `P:{u:<uid>}:sessions` hash per
//! user, and the per-node user sets the reaper cleans up from.
//!
//! Claims decide the per-user session limit atomically in that one key (a Redis function).
//! A session may hold a resume secret (its SHA-256 in `P:{u:<uid>}:resume`, same slot):
//! presenting it takes that session over in the same function, wherever the session is.
//! Liveness is not kept per session: a session counts iff its node is alive in the node
//! registry, so presence costs nothing per user per heartbeat.

use std::sync::Arc;

use redis::Value;

use crate::cluster::live::{LiveNodes, NodeStatus};
use crate::config::OnSessionLimit;
use crate::redis::keys::Keys;
use crate::redis::{Redis, RedisError, func};
use crate::wire::ids::{RoomId, UserId};

/// One session, as Redis names it: `<node>:<sid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRef {
    /// The node the session is connected to.
    pub node: String,
    /// Its id on that node.
    pub sid: u64,
}

impl SessionRef {
    /// Parses a `<node>:<sid>` hash field.
    pub fn parse(field: &str) -> Option<Self> {
        let (node, sid) = field.rsplit_once(':')?;
        Some(Self {
            node: node.to_owned(),
            sid: sid.parse().ok()?,
        })
    }
}

/// Outcome of a claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The session is registered.
    Claimed,
    /// The user is at its session limit (mode `reject`); these live sessions hold it.
    Refused {
        /// The sessions that count against the limit.
        holders: Vec<SessionRef>,
    },
    /// The session is registered; these (the user's oldest) were evicted to make room
    /// (mode `replace`) and must be closed with 4006.
    Replaced {
        /// The evicted sessions.
        evicted: Vec<SessionRef>,
    },
    /// The session is registered in place of the one whose resume secret was presented;
    /// these (that one, if it was still registered, and any evicted to stay within the
    /// limit) must be closed with 4006.
    Resumed {
        /// The evicted sessions.
        evicted: Vec<SessionRef>,
    },
}

/// A claim's resume secrets, as their SHA-256 (hex): the secret is never sent to Redis.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResumeHashes<'a> {
    /// The hash of the secret the client presented: take its session over.
    pub presented: Option<&'a str>,
    /// The hash of the secret issued to this session.
    pub issued: Option<&'a str>,
}

/// A new resume secret (32 random bytes, hex) and its hash.
pub fn new_resume_secret() -> (String, String) {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source works");
    let secret = hex(&bytes);
    let hash = resume_hash(&secret);
    (secret, hash)
}

/// The SHA-256 (hex) of a resume secret, as Redis stores it.
pub fn resume_hash(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Session registration for one node.
pub struct Presence {
    redis: Arc<Redis>,
    keys: Keys,
    node_id: Arc<str>,
    live: Arc<LiveNodes>,
    max_sessions: u32,
    mode: OnSessionLimit,
    /// How long the user's resume secrets live after the last one was issued.
    resume_ttl: std::time::Duration,
}

impl Presence {
    /// Presence of node `node_id`, allowing `max_sessions` per user, handled per `mode`;
    /// resume secrets live `resume_ttl`.
    pub fn new(
        redis: Arc<Redis>,
        keys: Keys,
        node_id: Arc<str>,
        live: Arc<LiveNodes>,
        (max_sessions, mode): (u32, OnSessionLimit),
        resume_ttl: std::time::Duration,
    ) -> Self {
        Self {
            redis,
            keys,
            node_id,
            live,
            max_sessions: max_sessions.max(1),
            mode,
            resume_ttl,
        }
    }

    /// Registers session `sid` of this node for `user`, within the user's session limit.
    /// Sessions on nodes this node knows to be dead do not count; if the limit is reached by
    /// sessions on nodes it has not heard of yet, their liveness is checked and the claim is
    /// retried once without the dead ones. With `resume`, a presented secret takes its
    /// session over (whatever the limit) and an issued one is stored for this session.
    pub async fn claim(
        &self,
        user: &UserId,
        sid: u64,
        resume: ResumeHashes<'_>,
    ) -> Result<Claim, RedisError> {
        // The shared multiplexed connection: a reconnect storm (thousands of claims at once)
        // pipelines on it instead of queueing for pooled connections and their PINGs.
        let mut conn = self.redis.shared_conn().await?;
        let claimed = self.claim_on(&mut conn, user, sid, resume).await;
        if let Err(e) = &claimed
            && crate::redis::is_connection_error(e)
        {
            self.redis.reset_shared();
        }
        claimed
    }

    async fn claim_on(
        &self,
        conn: &mut crate::redis::RedisConn,
        user: &UserId,
        sid: u64,
        mut resume: ResumeHashes<'_>,
    ) -> Result<Claim, RedisError> {
        let mut dead = self.live.dead_nodes();
        let mut first = true;
        loop {
            let mut pipe = redis::pipe();
            self.add_claim(&mut pipe, user, sid, (self.mode, resume), &dead);
            pipe.cmd("SADD")
                .arg(self.keys.node_users(&self.node_id))
                .arg(user.as_str())
                .ignore();
            let (reply,): (Vec<Value>,) = self.redis.query(conn, &pipe).await?;
            let claim = parse_claim(&reply)?;
            let Claim::Refused { holders } = &claim else {
                return Ok(claim);
            };
            let mut found_dead = false;
            if first {
                for holder in holders {
                    let unknown = self.live.status(&holder.node) == NodeStatus::Unknown;
                    if unknown
                        && !dead.contains(&holder.node)
                        && !self.live.is_alive(conn, &holder.node).await?
                    {
                        dead.push(holder.node.clone());
                        found_dead = true;
                    }
                }
            }
            if !found_dead {
                return Ok(claim);
            }
            first = false;
            // Presented once: a secret works once (the function took it, or it was wrong).
            resume.presented = None;
        }
    }

    fn add_claim(
        &self,
        pipe: &mut redis::Pipeline,
        user: &UserId,
        sid: u64,
        (mode, resume): (OnSessionLimit, ResumeHashes<'_>),
        dead: &[String],
    ) {
        pipe.cmd("FCALL")
            .arg(func::CLAIM)
            .arg(2)
            .arg(self.keys.user_sessions(user.as_str()))
            .arg(self.keys.user_resume(user.as_str()))
            .arg(&*self.node_id)
            .arg(sid)
            .arg(self.max_sessions)
            .arg(mode.as_str())
            .arg(self.resume_ttl.as_millis() as u64)
            .arg(resume.issued.unwrap_or(""))
            .arg(resume.presented.unwrap_or(""))
            .arg(dead);
    }

    /// Releases session `sid` of `user`. `last_here` says the user has no other session on
    /// this node, so it leaves this node's user set too.
    pub async fn release(
        &self,
        user: &UserId,
        sid: u64,
        last_here: bool,
    ) -> Result<(), RedisError> {
        let mut conn = self.redis.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg(func::RELEASE)
            .arg(2)
            .arg(self.keys.user_sessions(user.as_str()))
            .arg(self.keys.user_resume(user.as_str()))
            .arg(&*self.node_id)
            .arg(sid)
            .ignore();
        if last_here {
            pipe.cmd("SREM")
                .arg(self.keys.node_users(&self.node_id))
                .arg(user.as_str())
                .ignore();
        }
        self.redis.query::<()>(&mut conn, &pipe).await
    }

    /// Claims every listed session again (after Redis lost its data or reaped this node),
    /// in pipelined chunks, never evicting anyone. Returns the sessions that no longer fit
    /// (other sessions of their user registered meanwhile).
    pub async fn reclaim(
        &self,
        sessions: &[(UserId, u64)],
    ) -> Result<Vec<(UserId, u64)>, RedisError> {
        let mut lost = Vec::new();
        let mut conn = self.redis.conn().await?;
        let users_key = self.keys.node_users(&self.node_id);
        let dead = self.live.dead_nodes();
        for chunk in sessions.chunks(512) {
            let mut pipe = redis::pipe();
            for (user, sid) in chunk {
                let never_evict = (OnSessionLimit::Reject, ResumeHashes::default());
                self.add_claim(&mut pipe, user, *sid, never_evict, &dead);
            }
            let replies: Vec<Vec<Value>> = self.redis.query(&mut conn, &pipe).await?;
            let mut add = redis::cmd("SADD");
            add.arg(&users_key);
            let mut added = 0;
            for ((user, sid), reply) in chunk.iter().zip(&replies) {
                match parse_claim(reply)? {
                    Claim::Refused { .. } => lost.push((user.clone(), *sid)),
                    _ => {
                        add.arg(user.as_str());
                        added += 1;
                    }
                }
            }
            if added > 0 {
                add.query_async::<()>(&mut conn).await?;
            }
        }
        Ok(lost)
    }

    /// Where targets are, in one pipeline: for each user, the nodes it has sessions on
    /// (distinct); for each room, the nodes with members. Liveness is not checked.
    pub async fn locate(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        users: &[&str],
        rooms: &[&str],
    ) -> Result<(Vec<Vec<String>>, Vec<Vec<String>>), RedisError> {
        let mut pipe = redis::Pipeline::with_capacity(users.len() + rooms.len());
        let mut key = String::new();
        for user in users {
            self.keys.user_sessions_into(user, &mut key);
            pipe.cmd("HKEYS").arg(&key);
        }
        for room in rooms {
            self.keys.room_nodes_into(room, &mut key);
            pipe.cmd("SMEMBERS").arg(&key);
        }
        let mut replies: Vec<Vec<String>> = pipe.query_async(conn).await?;
        let rooms = replies.split_off(users.len());
        Ok((replies.into_iter().map(nodes_of).collect(), rooms))
    }
}

/// What Redis said to a user's first session on this node joining a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomJoin {
    /// `false`: the room is full; nothing changed.
    pub joined: bool,
    /// The user was in the room on no node before (a presence `join`).
    pub user_new: bool,
    /// Users in the room now.
    pub members: u64,
}

/// What Redis said to a user's last session on this node leaving a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomLeave {
    /// The user is in the room on no node now (a presence `leave`).
    pub user_gone: bool,
    /// Users in the room now.
    pub members: u64,
}

/// What dropping a node from a room left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomDrop {
    /// The room.
    pub room: String,
    /// Users that were in the room on that node only (each a presence `leave`).
    pub gone: Vec<String>,
    /// Users in the room now.
    pub members: u64,
}

/// Room membership in Redis: written only when a user's first session on this node joins a
/// room or its last one leaves, never per message or per heartbeat.
impl Presence {
    /// Adds this node to `user`'s nodes in `room` (its first session here joined), within
    /// `max_members`. `first_here` says the room had no member on this node before.
    pub async fn room_join(
        &self,
        room: &RoomId,
        user: &UserId,
        first_here: bool,
        max_members: u32,
    ) -> Result<RoomJoin, RedisError> {
        let mut conn = self.redis.conn().await?;
        let mut pipe = redis::pipe();
        self.add_room_join(&mut pipe, room, user, max_members, &self.live.dead_nodes());
        let ((joined, user_new, members, room_new),): ((u8, u8, u64, u8),) =
            self.redis.query(&mut conn, &pipe).await?;
        if joined == 1 && (first_here || room_new == 1) {
            let mut pipe = redis::pipe();
            if first_here {
                pipe.cmd("SADD")
                    .arg(self.keys.node_rooms(&self.node_id))
                    .arg(room.as_str())
                    .ignore();
            }
            if room_new == 1 {
                pipe.cmd("SADD")
                    .arg(self.keys.rooms())
                    .arg(room.as_str())
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(RoomJoin {
            joined: joined == 1,
            user_new: user_new == 1,
            members,
        })
    }

    /// Adds `FCALL wsbus_v2_room_join` for `user` in `room` on this node to `pipe`.
    fn add_room_join(
        &self,
        pipe: &mut redis::Pipeline,
        room: &RoomId,
        user: &UserId,
        max_members: u32,
        dead: &[String],
    ) {
        pipe.cmd("FCALL")
            .arg(func::ROOM_JOIN)
            .arg(2)
            .arg(self.keys.room_members(room.as_str()))
            .arg(self.keys.room_nodes(room.as_str()))
            .arg(user.as_str())
            .arg(&*self.node_id)
            .arg(max_members)
            .arg(dead);
    }

    /// Removes this node from `user`'s nodes in `room` (its last session here left).
    /// `last_here` says no member of the room is left on this node.
    pub async fn room_leave(
        &self,
        room: &RoomId,
        user: &UserId,
        last_here: bool,
    ) -> Result<RoomLeave, RedisError> {
        let mut conn = self.redis.conn().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg(func::ROOM_LEAVE)
            .arg(2)
            .arg(self.keys.room_members(room.as_str()))
            .arg(self.keys.room_nodes(room.as_str()))
            .arg(user.as_str())
            .arg(&*self.node_id)
            .arg(if last_here { "1" } else { "0" });
        if last_here {
            pipe.cmd("SREM")
                .arg(self.keys.node_rooms(&self.node_id))
                .arg(room.as_str())
                .ignore();
        }
        let ((gone, members, empty),): ((u8, u64, u8),) =
            self.redis.query(&mut conn, &pipe).await?;
        if empty == 1 {
            redis::cmd("SREM")
                .arg(self.keys.rooms())
                .arg(room.as_str())
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(RoomLeave {
            user_gone: gone == 1,
            members,
        })
    }

    /// Users in `room` now (as `joined` reports it).
    pub async fn room_size(&self, room: &RoomId) -> Result<u64, RedisError> {
        let mut conn = self.redis.conn().await?;
        Ok(redis::cmd("HLEN")
            .arg(self.keys.room_members(room.as_str()))
            .query_async(&mut conn)
            .await?)
    }

    /// The users in `room` that have a session in it on a node not known to be dead,
    /// sorted.
    pub async fn room_members(&self, room: &RoomId) -> Result<Vec<String>, RedisError> {
        let mut conn = self.redis.conn().await?;
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.keys.room_members(room.as_str()))
            .query_async(&mut conn)
            .await?;
        let mut users: Vec<String> = all
            .into_iter()
            .filter(|(_, nodes)| {
                nodes
                    .split_whitespace()
                    .any(|n| self.live.status(n) != NodeStatus::Dead)
            })
            .map(|(user, _)| user)
            .collect();
        users.sort_unstable();
        Ok(users)
    }

    /// Registers every local (room, user) again (after Redis lost its data), pipelined.
    pub async fn rejoin_rooms(&self, pairs: &[(RoomId, UserId)]) -> Result<(), RedisError> {
        let mut conn = self.redis.conn().await?;
        for chunk in pairs.chunks(512) {
            let mut pipe = redis::pipe();
            for (room, user) in chunk {
                // Already members here: the room limit was checked when they joined.
                self.add_room_join(&mut pipe, room, user, u32::MAX, &[]);
                pipe.ignore()
                    .cmd("SADD")
                    .arg(self.keys.node_rooms(&self.node_id))
                    .arg(room.as_str())
                    .ignore()
                    .cmd("SADD")
                    .arg(self.keys.rooms())
                    .arg(room.as_str())
                    .ignore();
            }
            self.redis.query::<()>(&mut conn, &pipe).await?;
        }
        Ok(())
    }
}

/// Drops `node` from every room it had members in (it died, or is shutting down): its users
/// leave those rooms unless another node holds a session of theirs there.
pub async fn drop_node_from_rooms(
    keys: &Keys,
    redis: &Redis,
    conn: &mut impl redis::aio::ConnectionLike,
    node: &str,
) -> Result<Vec<RoomDrop>, RedisError> {
    let rooms: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.node_rooms(node))
        .query_async(conn)
        .await?;
    let mut drops = Vec::with_capacity(rooms.len());
    for chunk in rooms.chunks(256) {
        let mut pipe = redis::pipe();
        for room in chunk {
            pipe.cmd("FCALL")
                .arg(func::ROOM_DROP_NODE)
                .arg(2)
                .arg(keys.room_members(room))
                .arg(keys.room_nodes(room))
                .arg(node)
                .cmd("HLEN")
                .arg(keys.room_members(room));
        }
        let replies: Vec<Value> = redis.query(conn, &pipe).await?;
        let mut empty_rooms = redis::pipe();
        let mut any_empty = false;
        for (room, pair) in chunk.iter().zip(replies.chunks(2)) {
            let [Value::Array(reply), members] = pair else {
                return Err(RedisError::Reply("room drop"));
            };
            let (empty, gone) = reply.split_first().ok_or(RedisError::Reply("room drop"))?;
            if matches!(empty, Value::Int(1)) {
                any_empty = true;
                empty_rooms.cmd("SREM").arg(keys.rooms()).arg(room).ignore();
            }
            drops.push(RoomDrop {
                room: room.clone(),
                gone: gone
                    .iter()
                    .map(redis::from_redis_value_ref::<String>)
                    .collect::<Result<_, _>>()?,
                members: redis::from_redis_value_ref(members)?,
            });
        }
        if any_empty {
            empty_rooms.query_async::<()>(conn).await?;
        }
    }
    Ok(drops)
}

/// The distinct nodes of a list of `<node>:<sid>` fields.
pub fn nodes_of(fields: Vec<String>) -> Vec<String> {
    let mut nodes: Vec<String> = Vec::with_capacity(fields.len());
    for field in fields {
        let Some(s) = SessionRef::parse(&field) else {
            continue;
        };
        if !nodes.contains(&s.node) {
            nodes.push(s.node);
        }
    }
    nodes
}

/// Reads a reply of `wsbus_v4_claim`.
fn parse_claim(reply: &[Value]) -> Result<Claim, RedisError> {
    let (status, rest) = reply.split_first().ok_or(RedisError::Reply("claim"))?;
    let sessions = || -> Result<Vec<SessionRef>, RedisError> {
        rest.iter()
            .map(|v| match v {
                Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(SessionRef::parse),
                Value::SimpleString(s) => SessionRef::parse(s),
                _ => None,
            })
            .map(|s| s.ok_or(RedisError::Reply("claim holder")))
            .collect()
    };
    match status {
        Value::Int(1) => Ok(Claim::Claimed),
        Value::Int(0) => Ok(Claim::Refused {
            holders: sessions()?,
        }),
        Value::Int(2) => Ok(Claim::Replaced {
            evicted: sessions()?,
        }),
        Value::Int(3) => Ok(Claim::Resumed {
            evicted: sessions()?,
        }),
        _ => Err(RedisError::Reply("claim")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_session_fields_and_claim_replies() {
        assert_eq!(
            SessionRef::parse("node-a.1:42"),
            Some(SessionRef {
                node: "node-a.1".into(),
                sid: 42
            })
        );
        assert_eq!(SessionRef::parse("nocolon"), None);
        assert_eq!(SessionRef::parse("n:x"), None);
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(parse_claim(&[Value::Int(1)]).unwrap(), Claim::Claimed);
        assert_eq!(
            parse_claim(&[Value::Int(2), bulk("a:1")]).unwrap(),
            Claim::Replaced {
                evicted: vec![SessionRef {
                    node: "a".into(),
                    sid: 1
                }]
            }
        );
        assert!(matches!(
            parse_claim(&[Value::Int(0), bulk("a:1"), bulk("b:2")]).unwrap(),
            Claim::Refused { holders } if holders.len() == 2
        ));
        assert!(parse_claim(&[Value::Int(0), bulk("junk")]).is_err());
        assert!(parse_claim(&[]).is_err());
        assert_eq!(
            parse_claim(&[Value::Int(3)]).unwrap(),
            Claim::Resumed { evicted: vec![] }
        );
        let (secret, hash) = new_resume_secret();
        assert_eq!((secret.len(), hash.len()), (64, 64));
        assert_eq!(resume_hash(&secret), hash);
        assert_ne!(new_resume_secret().0, secret);
        assert_eq!(
            nodes_of(vec!["a:1".into(), "b:2".into(), "a:3".into()]),
            vec!["a".to_string(), "b".to_string()]
        );
    }
}
