//! The live-node view: which nodes are alive, by their last heartbeat in Redis server time,
//! refreshed by this node's heartbeat. A user whose session names a dead node reads as not
//! found at once, before the reaper has cleaned up.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::redis::RedisError;
use crate::redis::keys::Keys;

/// What this node knows of another node's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Heartbeat within the node TTL, as of the last refresh.
    Live,
    /// Registered, but its heartbeat is older than the node TTL.
    Dead,
    /// Not registered as of the last refresh (new, or already reaped).
    Unknown,
}

/// The live-node view, refreshed every heartbeat.
pub struct LiveNodes {
    /// Node id → last heartbeat (Redis server ms). A std lock: held only to read or swap.
    nodes: RwLock<HashMap<String, u64>>,
    /// Redis server time of the last refresh (ms).
    now_ms: AtomicU64,
    ttl_ms: u64,
    nodes_key: String,
}

impl LiveNodes {
    /// An empty view; nodes silent for longer than `ttl` count as dead.
    pub fn new(keys: &Keys, ttl: Duration) -> Self {
        Self {
            nodes: RwLock::new(HashMap::new()),
            now_ms: AtomicU64::new(0),
            ttl_ms: ttl.as_millis() as u64,
            nodes_key: keys.nodes(),
        }
    }

    /// The status of node `id` as of the last refresh.
    pub fn status(&self, id: &str) -> NodeStatus {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        match nodes.get(id) {
            None => NodeStatus::Unknown,
            Some(&last) => self.judge(last, self.now_ms.load(Ordering::Relaxed)),
        }
    }

    /// The registered nodes whose heartbeat is older than the node TTL, as of the last refresh
    /// (usually none).
    pub fn dead_nodes(&self) -> Vec<String> {
        let now_ms = self.now_ms.load(Ordering::Relaxed);
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .filter(|&(_, &last)| self.judge(last, now_ms) == NodeStatus::Dead)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn judge(&self, last_ms: u64, now_ms: u64) -> NodeStatus {
        if now_ms.saturating_sub(last_ms) <= self.ttl_ms {
            NodeStatus::Live
        } else {
            NodeStatus::Dead
        }
    }

    /// Replaces the view with a fresh heartbeat reply; returns the dead nodes.
    pub(crate) fn refresh(&self, now_ms: u64, nodes: HashMap<String, u64>) -> Vec<String> {
        let dead = nodes
            .iter()
            .filter(|&(_, &last)| self.judge(last, now_ms) == NodeStatus::Dead)
            .map(|(id, _)| id.clone())
            .collect();
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes;
        self.now_ms.store(now_ms, Ordering::Relaxed);
        dead
    }

    /// Asks Redis directly whether node `id` is alive (for a node the view does not know
    /// yet) and records the answer.
    pub async fn check(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        id: &str,
    ) -> Result<bool, RedisError> {
        let (time, score): ((u64, u64), Option<f64>) = redis::pipe()
            .cmd("TIME")
            .cmd("ZSCORE")
            .arg(&self.nodes_key)
            .arg(id)
            .query_async(conn)
            .await?;
        let now_ms = time.0 * 1000 + time.1 / 1000;
        let Some(last) = score else {
            return Ok(false);
        };
        let last = last as u64;
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), last);
        Ok(self.judge(last, now_ms) == NodeStatus::Live)
    }

    /// Whether node `id` is alive: from the view, or from Redis for a node it does not know.
    pub async fn is_alive(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        id: &str,
    ) -> Result<bool, RedisError> {
        match self.status(id) {
            NodeStatus::Live => Ok(true),
            NodeStatus::Dead => Ok(false),
            NodeStatus::Unknown => self.check(conn, id).await,
        }
    }
}
