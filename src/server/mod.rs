//! Starting, wiring and stopping a node: [`run`] builds its state, registers it, starts the
//! heartbeat, the inbox reader, the bus writer and the HTTP listeners, and shuts them down in
//! order.
//!
//! Shutdown goes through one [`CancellationToken`] (the node's): stop accepting, close every
//! socket with 1001, drain the bus writer, remove this node's keys, return.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::edge::listener::HttpLimits;
use crate::node::{Node, NodeError, Queues};

pub mod heartbeat;

/// Runs a node on `listener` until `shutdown` resolves, then shuts it down cleanly.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let admin_listener = match config.admin_bind {
        Some(admin_addr) => Some(TcpListener::bind(admin_addr).await?),
        None => None,
    };
    let (node, queues) = Node::build(config, listener.local_addr()?)?;
    tracing::info!(
        node = %node.id,
        addr = %listener.local_addr()?,
        features = %features(&node),
        "node starting"
    );
    let (left_behind, earlier_sessions) = register(&node).await;
    let running = start_tasks(&node, queues);
    if !left_behind.is_empty() || !earlier_sessions.is_empty() {
        let node = node.clone();
        running.tasks.spawn(async move {
            let id = node.id.clone();
            crate::server::heartbeat::report_dead_sessions(&node, &id, earlier_sessions).await;
            crate::server::heartbeat::announce_departures(&node, left_behind).await;
        });
    }
    let server = serve_http(&node, listener, admin_listener, &running.tasks)?;
    tokio::select! {
        _ = shutdown => {}
        _ = node.shutdown.cancelled() => {}
    }
    stop(&node, running, server).await;
    Ok(())
}

/// Loads the Redis functions, clears what an earlier run of this node id left behind, and
/// runs the first heartbeat, which registers the node. If Redis is down, the heartbeat keeps
/// trying and the node serves same-node traffic meanwhile. Returns the room departures of
/// the earlier run's users, to announce once the bus writer runs.
/// Returns the sessions the earlier run left (for `disconnect` events, when on) too.
async fn register(node: &Node) -> (Vec<crate::cluster::presence::RoomDrop>, Vec<(String, u64)>) {
    let mut left_behind = Vec::new();
    let mut sessions = Vec::new();
    match node.redis.conn().await {
        Ok(mut conn) => {
            if let Err(e) = node.redis.load_functions(&mut conn).await {
                tracing::warn!(error = %e, "cannot load the Redis functions yet");
            }
            let wanted = node
                .wants(crate::wire::event::EventKind::Disconnect)
                .then_some(&mut sessions);
            match node
                .registry
                .clear_earlier_run(&node.redis, &mut conn, wanted)
                .await
            {
                Ok(drops) => left_behind = drops,
                Err(e) => tracing::warn!(error = %e, "could not clear an earlier run's sessions"),
            }
        }
        Err(e) => tracing::warn!(error = %e, "Redis is not reachable yet"),
    }
    crate::server::heartbeat::first_beat(node).await;
    (left_behind, sessions)
}

/// The node's background tasks.
struct Running {
    /// Heartbeat, metrics upkeep, inbox reader, admin listener: stop with the node's token.
    tasks: TaskTracker,
    /// The bus writer, which stops only when `drain` is cancelled and its queue is empty.
    writer: JoinHandle<()>,
    /// The events appender (`--events`), stopped like the bus writer (after the sessions,
    /// so that their `disconnect` events are appended).
    events: Option<JoinHandle<()>>,
    drain: CancellationToken,
}

fn start_tasks(node: &Arc<Node>, queues: Queues) -> Running {
    let tasks = TaskTracker::new();
    let drain = CancellationToken::new();
    tasks.spawn(crate::server::heartbeat::run(node.clone()));
    tasks.spawn(crate::telemetry::run_upkeep(node.shutdown.clone()));
    tasks.spawn(crate::bus::reader::run(node.clone()));
    tasks.spawn(crate::backend::ingress::run(node.clone()));
    let expiring = node.clone();
    tasks.spawn(async move {
        let shutdown = expiring.shutdown.clone();
        crate::delivery::expiry::run(&expiring.expiries, &expiring.hub, shutdown).await
    });
    let writer = tokio::spawn(crate::bus::writer::run(
        node.clone(),
        queues.bus_writer,
        drain.clone(),
    ));
    let events = queues
        .events
        .map(|rx| tokio::spawn(crate::backend::events::run(node.clone(), rx, drain.clone())));
    Running {
        tasks,
        writer,
        events,
        drain,
    }
}

/// Serves the client routes (and the admin and API routes, on their own listener if one is
/// given).
fn serve_http(
    node: &Arc<Node>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    tasks: &TaskTracker,
) -> Result<JoinHandle<()>, NodeError> {
    let mut app = crate::edge::routes::client_router(node.clone());
    let api = crate::backend::api::router(node.clone());
    match admin_listener {
        None => {
            app = app
                .merge(crate::edge::routes::admin_router(node.clone()))
                .merge(api)
        }
        Some(admin) => {
            tracing::info!(addr = %admin.local_addr()?, "admin endpoints listening");
            let routes = crate::edge::routes::admin_router(node.clone()).merge(api);
            let limits = HttpLimits::from_config(&node.config);
            tasks.spawn(crate::edge::listener::serve(
                admin,
                routes,
                limits,
                node.shutdown.clone(),
            ));
        }
    }
    let limits = HttpLimits::from_config(&node.config);
    Ok(tokio::spawn(crate::edge::listener::serve(
        listener,
        app,
        limits,
        node.shutdown.clone(),
    )))
}

/// Closes every session (1001), drains the bus writer, stops the tasks and removes this node
/// from Redis, all within `--shutdown-timeout`.
async fn stop(node: &Node, running: Running, server: JoinHandle<()>) {
    let started = Instant::now();
    tracing::info!(node = %node.id, sessions = node.hub.len(), "node shutting down");
    // Registrations first: a client told 1001 below may reconnect to another node at once,
    // and must not be refused for its own session here. (Messages sent to it meanwhile are
    // answered `not found`, or, with history on, kept for its reconnect.)
    let released = async {
        let mut conn = node.redis.conn().await?;
        node.registry.release_users(&node.redis, &mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(1), released).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not release the sessions early"),
        Err(_) => tracing::warn!("releasing the sessions early timed out"),
    }
    node.shutdown.cancel();
    node.sessions.close();
    let budget = node.config.shutdown_timeout;
    if tokio::time::timeout(budget, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions did not all close in time");
    }
    running.drain.cancel();
    let _ = tokio::time::timeout(remaining(budget, started), running.writer).await;
    if let Some(events) = running.events {
        let _ = tokio::time::timeout(remaining(budget, started), events).await;
    }
    running.tasks.close();
    let _ = tokio::time::timeout(remaining(budget, started), running.tasks.wait()).await;
    let deregistered = async {
        let mut conn = node.redis.conn().await?;
        node.registry.deregister(&node.redis, &mut conn).await
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
}

/// What a node runs with, for its first log line: auth, API, history, events, relay and
/// backend actions.
fn features(node: &Node) -> String {
    let config = &node.config;
    let list = |names: &[String]| match names.is_empty() {
        true => "none".to_owned(),
        false => names.join(","),
    };
    format!(
        "auth={} api={} history={} events={}{} relay_actions={} backend_actions={}",
        match (&node.auth, config.insecure) {
            (Some(_), _) => "jwt",
            (None, _) => "off (insecure)",
        },
        match !config.api_keys.is_empty() {
            true => "on",
            false => "off",
        },
        match config.history {
            0 => "off".to_owned(),
            n => n.to_string(),
        },
        node.event_kinds,
        match (node.event_kinds.any(), config.events_shards) {
            (true, n) if n > 1 => format!(" (shards={n})"),
            _ => String::new(),
        },
        list(&config.relay_actions),
        list(&config.backend_actions),
    )
}

fn remaining(budget: Duration, since: Instant) -> Duration {
    budget.saturating_sub(since.elapsed())
}
