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
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;
use crate::dispatch::Dispatch;
use crate::listener::HttpLimits;
use crate::node::{Node, NodeError};

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
    let (node, bus_writer_rx) = Node::build(config, listener.local_addr()?)?;
    tracing::info!(node = %node.id, addr = %listener.local_addr()?, "node starting");
    register(&node).await;
    let running = start_tasks(&node, bus_writer_rx);
    let server = serve_http(&node, listener, admin_listener, &running.tasks)?;
    tokio::select! {
        _ = shutdown => {}
        _ = node.shutdown.cancelled() => {}
    }
    stop(&node, running, server).await;
    Ok(())
}

/// Loads the Redis functions and runs the first heartbeat, which registers the node. If Redis
/// is down, the heartbeat keeps trying and the node serves same-node traffic meanwhile.
async fn register(node: &Node) {
    match node.bus.conn().await {
        Ok(mut conn) => {
            if let Err(e) = node.bus.load_functions(&mut conn).await {
                tracing::warn!(error = %e, "cannot load the Redis functions yet");
            }
        }
        Err(e) => tracing::warn!(error = %e, "Redis is not reachable yet"),
    }
    crate::heartbeat::beat(node).await;
}

/// The node's background tasks.
struct Running {
    /// Heartbeat, metrics upkeep, inbox reader, admin listener: stop with the node's token.
    tasks: TaskTracker,
    /// The bus writer, which stops only when `drain` is cancelled and its queue is empty.
    writer: JoinHandle<()>,
    drain: CancellationToken,
}

fn start_tasks(node: &Arc<Node>, bus_writer_rx: mpsc::Receiver<Dispatch>) -> Running {
    let tasks = TaskTracker::new();
    let drain = CancellationToken::new();
    tasks.spawn(crate::heartbeat::run(node.clone()));
    tasks.spawn(crate::telemetry::run_upkeep(node.shutdown.clone()));
    tasks.spawn(crate::inbox_reader::run(node.clone()));
    tasks.spawn(crate::ingress::run(node.clone()));
    let writer = tokio::spawn(crate::bus_writer::run(
        node.clone(),
        bus_writer_rx,
        drain.clone(),
    ));
    Running {
        tasks,
        writer,
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
    let mut app = crate::edge::client_router(node.clone());
    let api = crate::api::router(node.clone());
    match admin_listener {
        None => {
            app = app
                .merge(crate::edge::admin_router(node.clone()))
                .merge(api)
        }
        Some(admin) => {
            tracing::info!(addr = %admin.local_addr()?, "admin endpoints listening");
            let routes = crate::edge::admin_router(node.clone()).merge(api);
            let limits = HttpLimits::from_config(&node.config);
            tasks.spawn(crate::listener::serve(
                admin,
                routes,
                limits,
                node.shutdown.clone(),
            ));
        }
    }
    let limits = HttpLimits::from_config(&node.config);
    Ok(tokio::spawn(crate::listener::serve(
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
        let mut conn = node.bus.conn().await?;
        node.registry.release_users(&node.bus, &mut conn).await
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
    running.tasks.close();
    let _ = tokio::time::timeout(remaining(budget, started), running.tasks.wait()).await;
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
}

fn remaining(budget: Duration, since: Instant) -> Duration {
    budget.saturating_sub(since.elapsed())
}
