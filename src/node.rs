//! A running node: its identity and shared state, and [`run`], which wires the heartbeat,
//! the inbox consumer, the bus writer and the edge together and shuts them down in order.
//!
//! Shutdown goes through one [`CancellationToken`]: stop accepting, close every socket with
//! 1001, drain the bus writer, remove this node's keys, return.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusError};
use crate::config::NodeConfig;
use crate::hub::Hub;
use crate::keys::Keys;
use crate::outbox::Outgoing;
use crate::presence::Presence;
use crate::protocol::close;
use crate::registry::{LiveNodes, Registry};
use crate::user::{is_valid_id, random_node_id};

/// Why a node could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Redis setup failed.
    #[error(transparent)]
    Bus(#[from] BusError),
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
    pub bus: Arc<Bus>,
    /// Local sessions.
    pub hub: Hub,
    /// Which nodes are alive.
    pub live: Arc<LiveNodes>,
    /// User registration.
    pub presence: Presence,
    /// This node's registration.
    pub registry: Registry,
    /// Queue of the bus writer.
    pub outbox: mpsc::Sender<Outgoing>,
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
    next_sid: AtomicU64,
    next_message_id: AtomicU64,
    /// Random id of this process, stamped on every envelope (see `wire::Envelope::boot`).
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

/// Wall-clock microseconds since the epoch (for end-to-end latency across nodes).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds since the epoch (for `since` fields; liveness uses Redis time).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs a node on `listener` until `shutdown` resolves, then shuts it down cleanly.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let id = config.node_id.clone().unwrap_or_else(random_node_id);
    if !is_valid_id(&id) {
        return Err(NodeError::Config(format!(
            "node id {id:?}: use 1-64 of [A-Za-z0-9_.-]"
        )));
    }
    if !is_valid_id(&config.prefix.replace(':', "_")) {
        return Err(NodeError::Config(format!("prefix {:?}", config.prefix)));
    }
    let auth = crate::auth::from_config(&config).map_err(|e| NodeError::Config(e.to_string()))?;
    let addr = listener.local_addr()?;
    let admin_listener = match config.admin_bind {
        Some(admin_addr) => Some(TcpListener::bind(admin_addr).await?),
        None => None,
    };
    let keys = Keys::new(&config.prefix);
    let bus = Arc::new(Bus::new(
        &config.redis_url,
        config.redis_cluster,
        config.redis_ca_file.as_deref(),
        config.redis_timeout,
        16,
    )?);
    let live = Arc::new(LiveNodes::new(&keys, config.node_ttl));
    let id: Arc<str> = Arc::from(id);
    let (outbox, outbox_rx) = mpsc::channel(config.bus_queue.max(1));
    // The one shutdown token; every session's kick is a child of it.
    let stop = CancellationToken::new();
    let node = Arc::new(Node {
        presence: Presence::new(bus.clone(), keys.clone(), id.clone(), live.clone()),
        registry: Registry::new(
            keys.clone(),
            id.to_string(),
            addr.to_string(),
            now_ms(),
            config.node_ttl,
            live.clone(),
            config.inbox_maxlen,
        ),
        hub: Hub::new(config.session_queue, stop.clone()),
        connections: Arc::new(Semaphore::new(config.max_connections)),
        id,
        keys,
        bus,
        live,
        outbox,
        shutdown: stop,
        sessions: TaskTracker::new(),
        auth,
        health: Health::default(),
        metrics: crate::telemetry::HotMetrics::register(),
        next_sid: AtomicU64::new(1),
        next_message_id: AtomicU64::new(1),
        boot: fastrand::u64(1..),
        config,
    });
    tracing::info!(node = %node.id, %addr, "node starting");

    // The first heartbeat registers the node; if Redis is down, the loop keeps trying and
    // the node serves same-node traffic meanwhile.
    match node.bus.conn().await {
        Ok(mut conn) => {
            if let Err(e) = node.bus.load_functions(&mut conn).await {
                tracing::warn!(error = %e, "cannot load the Redis functions yet");
            }
        }
        Err(e) => tracing::warn!(error = %e, "Redis is not reachable yet"),
    }
    heartbeat_once(&node).await;

    let tasks = TaskTracker::new();
    let drain = CancellationToken::new();
    tasks.spawn(heartbeat_loop(node.clone()));
    tasks.spawn(crate::telemetry::run_upkeep(node.shutdown.clone()));
    tasks.spawn(crate::inbox::run(node.clone()));
    let writer = tokio::spawn(crate::outbox::run(node.clone(), outbox_rx, drain.clone()));
    let mut app = crate::edge::client_router(node.clone());
    match admin_listener {
        None => app = app.merge(crate::edge::admin_router(node.clone())),
        Some(admin) => {
            tracing::info!(addr = %admin.local_addr()?, "admin endpoints listening");
            let routes = crate::edge::admin_router(node.clone());
            let limits = crate::listener::HttpLimits::from_config(&node.config);
            tasks.spawn(crate::listener::serve(
                admin,
                routes,
                limits,
                node.shutdown.clone(),
            ));
        }
    }
    let limits = crate::listener::HttpLimits::from_config(&node.config);
    let server = tokio::spawn(crate::listener::serve(
        listener,
        app,
        limits,
        node.shutdown.clone(),
    ));

    tokio::select! {
        _ = shutdown => {}
        _ = node.shutdown.cancelled() => {}
    }
    let started = Instant::now();
    tracing::info!(node = %node.id, sessions = node.hub.len(), "node shutting down");
    node.shutdown.cancel();
    node.sessions.close();
    let budget = node.config.shutdown_timeout;
    if tokio::time::timeout(budget, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions did not all close in time");
    }
    drain.cancel();
    let _ = tokio::time::timeout(remaining(budget, started), writer).await;
    tasks.close();
    let _ = tokio::time::timeout(remaining(budget, started), tasks.wait()).await;
    let deregistered = async {
        let mut conn = node.bus.conn().await?;
        node.registry.deregister(&node.bus, &mut conn).await
    };
    match tokio::time::timeout(
        remaining(budget, started).max(Duration::from_secs(1)),
        deregistered,
    )
    .await
    {
        Ok(Ok(())) => tracing::info!(node = %node.id, "node removed from Redis"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove the node from Redis"),
        Err(_) => tracing::warn!("removing the node from Redis timed out"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    Ok(())
}

fn remaining(budget: Duration, since: Instant) -> Duration {
    budget.saturating_sub(since.elapsed())
}

async fn heartbeat_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        heartbeat_once(&node).await;
    }
}

/// One heartbeat, with what follows from it: re-registering local users if Redis lost them,
/// and reaping dead nodes.
async fn heartbeat_once(node: &Node) {
    let result = async {
        let mut conn = node.bus.conn().await?;
        let beat = node.registry.beat(&node.bus, &mut conn).await?;
        node.metrics.inbox_length.set(beat.inbox_len as f64);
        if beat.lost {
            let sessions = node.hub.snapshot();
            tracing::warn!(
                sessions = sessions.len(),
                "registration was missing from Redis; registering local users again"
            );
            let lost = node.presence.reclaim(&sessions, now_ms()).await?;
            for (user, sid) in lost {
                node.hub.kick(user.as_str(), sid, close::SESSION_REPLACED);
            }
        }
        for dead in &beat.dead {
            if let Err(e) = node.registry.reap(&node.bus, &mut conn, dead).await {
                tracing::warn!(node = %dead, error = %e, "reaping failed");
            }
        }
        Ok::<(), BusError>(())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(error = %e, "heartbeat failed");
    }
    node.health.set_redis_ok(result.is_ok());
}
