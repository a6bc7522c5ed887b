//! The node registry: this node's registration and heartbeat, the view of which nodes are
//! alive, and the reaper that cleans up after dead nodes.
//!
//! Each heartbeat is one pipeline: refresh `P:node:<id>` (hash + TTL) and record the beat in
//! `P:nodes` at Redis server time, which returns every node's last beat. A node whose last
//! beat is older than the node TTL is dead: its users read as not found at once, and one
//! survivor (guarded by `P:reap:<id>`) deletes its users, user set, inbox and entries.
//! When the node's own hash is found missing (Redis restarted empty, or this node was reaped
//! after a stall), the node registers again: inbox, and every local user.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::Value;
use serde::Serialize;

use crate::cluster::live::LiveNodes;
use crate::cluster::presence::{RoomDrop, drop_node_from_rooms};
use crate::redis::keys::Keys;
use crate::redis::{Redis, RedisError, func};

/// What one heartbeat found.
#[derive(Debug, Default)]
pub struct Beat {
    /// This node's registration was missing and has been recreated; local users must be
    /// claimed again.
    pub lost: bool,
    /// Nodes whose heartbeat is older than the node TTL.
    pub dead: Vec<String>,
    /// Entries waiting in this node's inbox.
    pub inbox_len: u64,
}

/// This node's entry in the registry.
pub struct Registry {
    keys: Keys,
    node_id: String,
    addr: String,
    started_ms: u64,
    ttl: Duration,
    live: Arc<LiveNodes>,
    registered: AtomicBool,
    /// Length past which each heartbeat trims this node's inbox (`XTRIM MAXLEN ~`).
    inbox_cap: usize,
}

impl Registry {
    /// The registry entry of node `node_id`, reachable at `addr`.
    pub fn new(
        keys: Keys,
        node_id: String,
        addr: String,
        started_ms: u64,
        ttl: Duration,
        live: Arc<LiveNodes>,
        inbox_cap: usize,
    ) -> Self {
        Self {
            keys,
            node_id,
            addr,
            started_ms,
            ttl,
            live,
            registered: Default::default(),
            inbox_cap,
        }
    }

    /// One heartbeat: refreshes the registration (recreating it if missing) and the view.
    pub async fn beat(
        &self,
        redis: &Redis,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<Beat, RedisError> {
        let node_key = self.keys.node(&self.node_id);
        let inbox = self.keys.inbox(&self.node_id);
        // The inbox is the canary: it exists from registration until deregistration, so its
        // absence means Redis lost our data (or reaped us). Checking it inside the same
        // pipeline keeps the test idempotent if the pipeline has to be retried.
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS")
            .arg(&inbox)
            .cmd("XLEN")
            .arg(&inbox)
            // The backstop against an inbox nobody reads (its consumer stuck while the node
            // lives): once per beat, not on every XADD. Creates no stream.
            .cmd("XTRIM")
            .arg(&inbox)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.inbox_cap)
            .ignore()
            .cmd("HSET")
            .arg(&node_key)
            .arg("addr")
            .arg(&self.addr)
            .arg("started")
            .arg(self.started_ms)
            .arg("version")
            .arg(env!("CARGO_PKG_VERSION"))
            .arg(crate::cluster::live::LAYOUTS_FIELD)
            .arg(crate::cluster::live::LAYOUTS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&node_key)
            .arg(self.ttl.as_millis() as u64)
            .ignore()
            .cmd("FCALL")
            .arg(func::HEARTBEAT)
            .arg(1)
            .arg(self.keys.nodes())
            .arg(&self.node_id);
        let (inbox_exists, inbox_len, reply): (bool, u64, Vec<Value>) =
            redis.query(conn, &pipe).await?;
        let (now_ms, nodes) = parse_heartbeat(&reply)?;
        let mut beat = Beat {
            inbox_len,
            ..Beat::default()
        };
        if !inbox_exists {
            // Make the inbox exist, so that senders' `XADD NOMKSTREAM` reaches it. Nobody
            // else creates it, so an empty one made with `MAXLEN 0` loses no entries.
            redis::cmd("XADD")
                .arg(&inbox)
                .arg("MAXLEN")
                .arg(0)
                .arg("*")
                .arg("_")
                .arg("_")
                .query_async::<()>(conn)
                .await?;
            beat.lost = self.registered.swap(true, Ordering::AcqRel);
        }
        beat.dead = self.live.refresh(now_ms, nodes);
        self.live.learn_layouts(conn).await?;
        Ok(beat)
    }

    /// Reaps dead node `dead` unless another survivor is already at it: removes its
    /// sessions, its room memberships, its user and room sets, inbox, hash and registry entry.
    /// Returns what its rooms lost (`None` when another survivor reaps it); with `released`,
    /// the sessions it had are added there as (user, session id).
    pub async fn reap(
        &self,
        redis: &Redis,
        conn: &mut impl redis::aio::ConnectionLike,
        dead: &str,
        released: Option<&mut Vec<(String, u64)>>,
    ) -> Result<Option<Vec<RoomDrop>>, RedisError> {
        let locked: Option<String> = redis::cmd("SET")
            .arg(self.keys.reap_lock(dead))
            .arg(&self.node_id)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(conn)
            .await?;
        if locked.is_none() {
            return Ok(None);
        }
        release_all_users(&self.keys, redis, conn, dead, released).await?;
        let drops = drop_node_from_rooms(&self.keys, redis, conn, dead).await?;
        remove_node_keys(&self.keys, conn, dead).await?;
        // The node is out of `P:nodes` now, so nobody will try again; the lock can go.
        redis::cmd("DEL")
            .arg(self.keys.reap_lock(dead))
            .query_async::<()>(conn)
            .await?;
        tracing::info!(node = dead, "reaped dead node");
        Ok(Some(drops))
    }

    /// Releases every session of this node in Redis at once (it is shutting down), so
    /// that its clients, told 1001 next, can reconnect to another node at once.
    pub async fn release_users(
        &self,
        redis: &Redis,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), RedisError> {
        release_all_users(&self.keys, redis, conn, &self.node_id, None).await
    }

    /// Clears what an earlier run of this node id left in Redis: a node killed and restarted
    /// under its id within the node TTL is never reaped, and its sessions would hold their
    /// users (`not unique session`) for as long as the id heartbeats again. Run before the
    /// node serves anyone; returns what its rooms lost, for presence `leave` events (and,
    /// with `released`, adds the sessions it had there).
    pub async fn clear_earlier_run(
        &self,
        redis: &Redis,
        conn: &mut impl redis::aio::ConnectionLike,
        released: Option<&mut Vec<(String, u64)>>,
    ) -> Result<Vec<RoomDrop>, RedisError> {
        release_all_users(&self.keys, redis, conn, &self.node_id, released).await?;
        redis::cmd("DEL")
            .arg(self.keys.node_users(&self.node_id))
            .query_async::<()>(conn)
            .await?;
        drop_node_from_rooms(&self.keys, redis, conn, &self.node_id).await
    }

    /// Removes this node from Redis on clean shutdown: its users, user set, inbox, hash and
    /// registry entry.
    pub async fn deregister(
        &self,
        redis: &Redis,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), RedisError> {
        release_all_users(&self.keys, redis, conn, &self.node_id, None).await?;
        // Sessions leave their rooms as they close; this catches what they could not.
        drop_node_from_rooms(&self.keys, redis, conn, &self.node_id).await?;
        remove_node_keys(&self.keys, conn, &self.node_id).await
    }
}

/// Removes every session of `node` from the users in its user set; with `released`, adds
/// them there as (user, session id), read just before each user's release (the node is
/// gone, so none is added in between).
async fn release_all_users(
    keys: &Keys,
    redis: &Redis,
    conn: &mut impl redis::aio::ConnectionLike,
    node: &str,
    mut released: Option<&mut Vec<(String, u64)>>,
) -> Result<(), RedisError> {
    let set = keys.node_users(node);
    let mut cursor: u64 = 0;
    loop {
        let (next, users): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(&set)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if let Some(released) = released.as_deref_mut()
            && !users.is_empty()
        {
            let mut pipe = redis::pipe();
            for user in &users {
                pipe.cmd("HKEYS").arg(keys.user_sessions(user));
            }
            let fields: Vec<Vec<String>> = pipe.query_async(conn).await?;
            for (user, fields) in users.iter().zip(fields) {
                released.extend(
                    fields
                        .iter()
                        .filter_map(|f| crate::cluster::presence::SessionRef::parse(f))
                        .filter(|s| s.node == node)
                        .map(|s| (user.clone(), s.sid)),
                );
            }
        }
        if !users.is_empty() {
            let mut pipe = redis::pipe();
            for user in &users {
                pipe.cmd("FCALL")
                    .arg(func::RELEASE_NODE)
                    .arg(1)
                    .arg(keys.user_sessions(user))
                    .arg(node)
                    .ignore();
            }
            redis.query::<()>(conn, &pipe).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn remove_node_keys(
    keys: &Keys,
    conn: &mut impl redis::aio::ConnectionLike,
    node: &str,
) -> Result<(), RedisError> {
    // One key per command: the keys live in different slots on a Redis Cluster.
    redis::pipe()
        .cmd("DEL")
        .arg(keys.node_users(node))
        .ignore()
        .cmd("DEL")
        .arg(keys.node_rooms(node))
        .ignore()
        .cmd("DEL")
        .arg(keys.inbox(node))
        .ignore()
        .cmd("DEL")
        .arg(keys.node(node))
        .ignore()
        .cmd("ZREM")
        .arg(keys.nodes())
        .arg(node)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

fn parse_heartbeat(reply: &[Value]) -> Result<(u64, HashMap<String, u64>), RedisError> {
    let bad = || RedisError::Reply("heartbeat");
    let (now, rest) = reply.split_first().ok_or_else(bad)?;
    let now = match now {
        Value::Int(n) => *n as u64,
        _ => return Err(bad()),
    };
    let mut nodes = HashMap::with_capacity(rest.len() / 2);
    for pair in rest.chunks_exact(2) {
        let (Value::BulkString(id), Value::BulkString(score)) = (&pair[0], &pair[1]) else {
            return Err(bad());
        };
        let id = String::from_utf8(id.clone()).map_err(|_| bad())?;
        let score: f64 = std::str::from_utf8(score)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        nodes.insert(id, score as u64);
    }
    Ok((now, nodes))
}

/// One registered node.
#[derive(Debug, Serialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Its bind address.
    pub addr: Option<String>,
    /// Age of the node in seconds (from its start time).
    pub age_secs: Option<u64>,
    /// Milliseconds since its last heartbeat, by Redis time.
    pub last_heartbeat_ms: u64,
    /// Users it holds.
    pub users: u64,
    /// Entries waiting in its inbox.
    pub inbox_len: u64,
    /// Version it runs.
    pub version: Option<String>,
}

/// Every node in the registry (live or not yet reaped).
pub async fn nodes(redis: &Redis, keys: &Keys) -> Result<Vec<NodeInfo>, RedisError> {
    let mut conn = redis.conn().await?;
    let ((secs, micros), members): ((u64, u64), Vec<(String, f64)>) = redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let now_ms = secs * 1000 + micros / 1000;
    let mut pipe = redis::pipe();
    for (id, _) in &members {
        pipe.cmd("HMGET")
            .arg(keys.node(id))
            .arg("addr")
            .arg("started")
            .arg("version")
            .cmd("SCARD")
            .arg(keys.node_users(id))
            .cmd("XLEN")
            .arg(keys.inbox(id));
    }
    let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
    let mut out = Vec::with_capacity(members.len());
    for ((id, last), chunk) in members.into_iter().zip(replies.chunks(3)) {
        let (addr, started, version): (Option<String>, Option<u64>, Option<String>) =
            redis::from_redis_value(chunk[0].clone())?;
        let users: u64 = redis::from_redis_value(chunk[1].clone())?;
        let inbox_len: u64 = redis::from_redis_value(chunk[2].clone())?;
        out.push(NodeInfo {
            id,
            addr,
            age_secs: started.map(|s| now_ms.saturating_sub(s) / 1000),
            last_heartbeat_ms: now_ms.saturating_sub(last as u64),
            users,
            inbox_len,
            version,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::live::NodeStatus;

    #[test]
    fn judges_liveness_by_server_time() {
        let live = LiveNodes::new(&Keys::new("t"), Duration::from_secs(5));
        let dead = live.refresh(
            100_000,
            HashMap::from([("a".to_owned(), 99_000), ("b".to_owned(), 90_000)]),
        );
        assert_eq!(dead, vec!["b".to_owned()]);
        assert_eq!(live.status("a"), NodeStatus::Live);
        assert_eq!(live.status("b"), NodeStatus::Dead);
        assert_eq!(live.status("c"), NodeStatus::Unknown);
    }

    #[test]
    fn parses_heartbeat_replies() {
        let reply = vec![
            Value::Int(5000),
            Value::BulkString(b"a".to_vec()),
            Value::BulkString(b"4000".to_vec()),
        ];
        let (now, nodes) = parse_heartbeat(&reply).unwrap();
        assert_eq!(now, 5000);
        assert_eq!(nodes["a"], 4000);
        assert!(parse_heartbeat(&[]).is_err());
        assert!(parse_heartbeat(&[Value::Int(1), Value::Int(2), Value::Int(3)]).is_err());
    }
}
