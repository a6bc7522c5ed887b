//! A node's shared state: its identity, configuration, Redis access, local sessions and
//! rooms, the bus writer's queue and the one shutdown token. Building it checks the
//! configuration; starting, wiring and stopping the tasks is [`crate::server`]'s business.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::live::LiveNodes;
use crate::cluster::presence::Presence;
use crate::cluster::registry::Registry;
use crate::config::NodeConfig;
use crate::delivery::hub::Hub;
use crate::delivery::target::Dispatch;
use crate::redis::keys::Keys;
use crate::redis::{Redis, RedisError};
use crate::wire::clock::now_ms;
use crate::wire::event::{Event, EventKinds};
use crate::wire::ids::{is_valid_id, random_node_id};

pub mod dispatch;
pub mod events;
pub mod membership;
pub mod rooms;

/// An event on its way to the events stream, and who waits for its append (`true`: it is
/// in Redis).
pub type EventRequest = (Event, Option<tokio::sync::oneshot::Sender<bool>>);

/// The receiving ends of a node's queues, for the tasks that serve them.
pub struct Queues {
    /// The bus writer's.
    pub bus_writer: mpsc::Receiver<Dispatch>,
    /// The events appender's (`--events`), `None` when events are off.
    pub events: Option<mpsc::Receiver<EventRequest>>,
}

/// Why a node could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Redis setup failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What readiness depends on, updated by the tasks that know.
pub struct Health {
    /// The last heartbeat reached Redis.
    redis_ok: AtomicBool,
    /// When the inbox consumer's last read returned (ms since `epoch`, 0 = never).
    inbox_read_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            redis_ok: AtomicBool::new(false),
            inbox_read_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Health {
    /// Records whether the last heartbeat reached Redis.
    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// Records that an inbox read returned.
    pub fn inbox_read(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.inbox_read_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the last heartbeat reached Redis.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// Records that the inbox reader lost its connection.
    pub fn inbox_lost(&self) {
        self.inbox_read_ms.store(0, Ordering::Relaxed);
    }

    /// Whether an inbox read returned within `window`.
    pub fn inbox_read_within(&self, window: Duration) -> bool {
        let last = self.inbox_read_ms.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        last != 0 && now.saturating_sub(last) <= window.as_millis() as u64
    }
}

/// Shared state of a running node.
pub struct Node {
    /// This node's id.
    pub id: Arc<str>,
    /// Its configuration.
    pub config: NodeConfig,
    /// Key names.
    pub keys: Keys,
    /// Redis access.
    pub redis: Arc<Redis>,
    /// Local sessions.
    pub hub: Hub,
    /// Local room membership.
    pub rooms: crate::delivery::rooms::Rooms,
    /// Which nodes are alive.
    pub live: Arc<LiveNodes>,
    /// User registration.
    pub presence: Presence,
    /// This node's registration.
    pub registry: Registry,
    /// Queue of the bus writer.
    pub bus_writer: mpsc::Sender<Dispatch>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Session tasks, awaited on shutdown (axum does not track upgraded sockets).
    pub sessions: TaskTracker,
    /// Bounds the number of connections.
    pub connections: Arc<Semaphore>,
    /// Token checks; `None` when running `--insecure`.
    pub auth: Option<crate::auth::Verifier>,
    /// Readiness inputs.
    pub health: Health,
    /// Metric handles of the per-message paths.
    pub metrics: crate::telemetry::HotMetrics,
    /// History streams and recovery (`--history`); `None` when off.
    pub history: Option<crate::history::History>,
    /// When each session's token expires (closed by one task, `delivery::expiry::run`).
    pub expiries: crate::delivery::expiry::Expiries,
    /// Server-side membership changes waiting for another node's answer, by request id.
    pub member_replies:
        dashmap::DashMap<u64, tokio::sync::oneshot::Sender<membership::MemberOutcome>>,
    /// Queue of the events appender (`--events`); `None` when off.
    pub events: Option<mpsc::Sender<EventRequest>>,
    /// The event types appended (`--events`, and `action` with `--backend-actions`).
    pub event_kinds: EventKinds,
    next_sid: AtomicU64,
    next_message_id: AtomicU64,
    /// Random id of this process, stamped on every envelope (see [`crate::wire::envelope::Envelope::boot`]).
    pub boot: u64,
}

impl Node {
    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        self.next_sid.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh message id.
    pub fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }
}

impl Node {
    /// Checks `config` and builds the state of a node serving clients on `addr` (not yet
    /// registered, no task started). Returns the receiving ends of its queues too.
    pub fn build(config: NodeConfig, addr: SocketAddr) -> Result<(Arc<Node>, Queues), NodeError> {
        let id = config.node_id.clone().unwrap_or_else(random_node_id);
        check_config(&id, &config)?;
        let auth =
            crate::auth::from_config(&config).map_err(|e| NodeError::Config(e.to_string()))?;
        let keys = Keys::new(&config.prefix);
        let redis = Arc::new(Redis::new(
            &config.redis_url,
            config.redis_cluster,
            config.redis_ca_file.as_deref(),
            config.redis_timeout,
            16,
        )?);
        let live = Arc::new(LiveNodes::new(&keys, config.node_ttl));
        let id: Arc<str> = Arc::from(id);
        let (bus_writer, bus_writer_rx) = mpsc::channel(config.bus_queue.max(1));
        // The one shutdown token; every session's kick is a child of it.
        let stop = CancellationToken::new();
        let boot = fastrand::u64(1..);
        let history = crate::history::History::new(&config, &keys, redis.clone(), boot);
        let (event_kinds, events, events_rx) = events_queue(&config);
        let node = Arc::new(Node {
            history,
            events,
            event_kinds,
            presence: Presence::new(
                redis.clone(),
                keys.clone(),
                id.clone(),
                live.clone(),
                (config.max_sessions_per_user, config.on_session_limit),
                config.resume_ttl,
            ),
            registry: Registry::new(
                keys.clone(),
                id.to_string(),
                addr.to_string(),
                now_ms(),
                config.node_ttl,
                live.clone(),
                config.inbox_maxlen,
            ),
            hub: Hub::new(
                config.session_queue,
                config.session_queue_bytes,
                stop.clone(),
            ),
            rooms: crate::delivery::rooms::Rooms::new(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            id,
            keys,
            redis,
            live,
            bus_writer,
            shutdown: stop,
            sessions: TaskTracker::new(),
            auth,
            expiries: Default::default(),
            member_replies: Default::default(),
            health: Health::default(),
            metrics: crate::telemetry::HotMetrics::register(),
            next_sid: AtomicU64::new(1),
            next_message_id: AtomicU64::new(1),
            boot,
            config,
        });
        let queues = Queues {
            bus_writer: bus_writer_rx,
            events: events_rx,
        };
        Ok((node, queues))
    }
}

/// The event types a node appends (`--events`, and `action` with `--backend-actions`) and,
/// if any, the events appender's queue.
fn events_queue(
    config: &NodeConfig,
) -> (
    EventKinds,
    Option<mpsc::Sender<EventRequest>>,
    Option<mpsc::Receiver<EventRequest>>,
) {
    let mut kinds = config.events;
    if !config.backend_actions.is_empty() {
        kinds = kinds.with(crate::wire::event::EventKind::Action);
    }
    if !kinds.any() {
        return (kinds, None, None);
    }
    let (tx, rx) = mpsc::channel(config.bus_queue.max(1));
    (kinds, Some(tx), Some(rx))
}

/// Refuses a config a node cannot run with: ids outside the alphabet, built-in relay
/// actions, stored relay actions that are not relayed, backend actions that are no id, a
/// built-in action or also a relay action: a client's frame must mean one thing;
/// a history byte bound below one frame.
fn check_config(id: &str, config: &NodeConfig) -> Result<(), NodeError> {
    if !is_valid_id(id) {
        return Err(NodeError::Config(format!(
            "node id {id:?}: use 1-64 of [A-Za-z0-9_.-]"
        )));
    }
    if !is_valid_id(&config.prefix.replace(':', "_")) {
        return Err(NodeError::Config(format!("prefix {:?}", config.prefix)));
    }
    if let Some(bad) = config
        .relay_actions
        .iter()
        .find(|a| !is_valid_id(a) || crate::wire::client::RESERVED_ACTIONS.contains(&a.as_str()))
    {
        return Err(NodeError::Config(format!(
            "relay action {bad:?}: use 1-64 of [A-Za-z0-9_.-], not a built-in action"
        )));
    }
    if let Some(bad) = config
        .stored_relay_actions
        .iter()
        .find(|a| !config.relay_actions.contains(a))
    {
        return Err(NodeError::Config(format!(
            "stored relay action {bad:?}: not one of --relay-actions"
        )));
    }
    for name in &config.backend_actions {
        let why = if !is_valid_id(name) {
            "use 1-64 of [A-Za-z0-9_.-]"
        } else if crate::wire::client::RESERVED_ACTIONS.contains(&name.as_str()) {
            "it is a built-in action"
        } else if config.relay_actions.contains(name) {
            "it is also a relay action (--relay-actions)"
        } else {
            continue;
        };
        return Err(NodeError::Config(format!("backend action {name:?}: {why}")));
    }
    if config.history > 0 && config.history_max_bytes < config.max_out_frame_bytes() {
        return Err(NodeError::Config(format!(
            "--history-max-bytes {}: at least {} (2 x --max-frame-bytes + 1024), so that a \
             stream holds any message",
            config.history_max_bytes,
            config.max_out_frame_bytes()
        )));
    }
    Ok(())
}
