//! The live-node view: which nodes are alive, by their last heartbeat in Redis server time,
//! refreshed by this node's heartbeat. A user whose session names a dead node reads as not
//! found at once, before the reaper has cleaned up.
//!
//! It also knows which nodes read packed inbox entries: each node says so in its hash
//! (`layouts`), read once per node when the view first sees it. A node that does not say so
//! (one that predates packing) gets single entries only, so a rolling upgrade loses nothing.

use std::collections::{HashMap, HashSet};
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
    /// Node id → whether it reads packed inbox entries (as its hash said when first seen).
    layouts: RwLock<HashMap<String, bool>>,
    keys: Keys,
}

/// Whether a node's [`LAYOUTS_FIELD`] says it reads packed entries (layout 2 or newer).
fn reads_packed(layouts: Option<String>) -> bool {
    layouts
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|v| v >= 2)
}

/// The field of a node's hash (`P:node:<id>`) naming the newest inbox entry layout it reads.
pub const LAYOUTS_FIELD: &str = "layouts";

/// What this version writes in [`LAYOUTS_FIELD`]: it reads packed entries (layout 2).
pub const LAYOUTS: &str = "2";

impl LiveNodes {
    /// An empty view; nodes silent for longer than `ttl` count as dead.
    pub fn new(keys: &Keys, ttl: Duration) -> Self {
        Self {
            nodes: RwLock::new(HashMap::new()),
            now_ms: AtomicU64::new(0),
            ttl_ms: ttl.as_millis() as u64,
            nodes_key: keys.nodes(),
            layouts: RwLock::new(HashMap::new()),
            keys: keys.clone(),
        }
    }

    /// Whether node `id` reads packed inbox entries; `false` for a node not asked yet.
    pub fn reads_packed(&self, id: &str) -> bool {
        let layouts = self.layouts.read().unwrap_or_else(|e| e.into_inner());
        layouts.get(id).copied().unwrap_or(false)
    }

    /// Asks the nodes of the view that were not asked yet which inbox entry layouts they read
    /// (one `HGET` each, in one pipeline; none at all on most heartbeats), and forgets the
    /// nodes that left the view.
    pub async fn learn_layouts(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), RedisError> {
        let known: HashSet<String> = {
            let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
            nodes.keys().cloned().collect()
        };
        let new: Vec<String> = {
            let mut layouts = self.layouts.write().unwrap_or_else(|e| e.into_inner());
            layouts.retain(|id, _| known.contains(id));
            known
                .into_iter()
                .filter(|id| !layouts.contains_key(id))
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in &new {
            pipe.cmd("HGET").arg(self.keys.node(id)).arg(LAYOUTS_FIELD);
        }
        let replies: Vec<Option<String>> = pipe.query_async(conn).await?;
        let mut layouts = self.layouts.write().unwrap_or_else(|e| e.into_inner());
        for (id, reply) in new.into_iter().zip(replies) {
            layouts.insert(id, reads_packed(reply));
        }
        Ok(())
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
        let (time, score, layouts): ((u64, u64), Option<f64>, Option<String>) = redis::pipe()
            .cmd("TIME")
            .cmd("ZSCORE")
            .arg(&self.nodes_key)
            .arg(id)
            .cmd("HGET")
            .arg(self.keys.node(id))
            .arg(LAYOUTS_FIELD)
            .query_async(conn)
            .await?;
        let now_ms = time.0 * 1000 + time.1 / 1000;
        let Some(last) = score else {
            return Ok(false);
        };
        // A node first met here is packed for at once, not from the next heartbeat on.
        self.layouts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), reads_packed(layouts));
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
