//! The heartbeat: every `--heartbeat-interval`, refresh this node's registration and its
//! view of which nodes are alive. Nothing the node does may delay it past `--node-ttl` (its
//! peers would reap a healthy node), so it runs on a thread of its own (a one-thread Tokio
//! runtime) with a Redis connection of its own: a wide fan-out keeping the worker threads
//! busy, a full bus queue or a pool with no free connection cannot hold it up.
//!
//! What follows from a beat (registering every local session and room membership again when
//! Redis lost them, reaping dead nodes and announcing their users' departures from rooms,
//! and, with history on, keeping the streams of local users and rooms from expiring) is the
//! upkeep task's, on the node's runtime: it may wait on the bus writer; the beat never does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cluster::presence::RoomDrop;
use crate::cluster::registry::Beat;
use crate::node::Node;
use crate::redis::{RedisConn, RedisError};
use crate::wire::client::PresenceEvent;
use crate::wire::client::close;
use crate::wire::event::{Event, EventKind};
use crate::wire::ids::{RoomId, UserId};

/// What the heartbeat leaves to the upkeep task.
#[derive(Default)]
struct Upkeep {
    /// A beat found this node's registration gone: local sessions and rooms must be
    /// registered again.
    lost: AtomicBool,
    /// Wakes the upkeep task (registration lost, or dead nodes to reap).
    due: Notify,
}

impl Upkeep {
    fn after(&self, beat: &Beat) {
        if beat.lost {
            self.lost.store(true, Ordering::Release);
        }
        if beat.lost || !beat.dead.is_empty() {
            self.due.notify_one();
        }
    }
}

/// Beats (on the heartbeat's own thread) and keeps up (on this task) until the node shuts
/// down; the first beat is [`first_beat`], run before serving.
pub async fn run(node: Arc<Node>) {
    let upkeep = Arc::new(Upkeep::default());
    // The thread stops with the node, or when this task is dropped without the node
    // stopping (its runtime shut down: a test that ends).
    let stop = node.shutdown.child_token();
    let _stop_when_dropped = stop.clone().drop_guard();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let thread = {
        let (node, upkeep, stop) = (node.clone(), upkeep.clone(), stop.clone());
        std::thread::Builder::new()
            .name("wsbus-heartbeat".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(beat_loop(&node, &upkeep, &stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start the heartbeat's runtime"),
                }
                drop(done);
            })
    };
    match thread {
        Ok(_) => {
            // `finished` resolves (with an error: nothing is sent) when the thread ends.
            let _ = tokio::join!(upkeep_loop(&node, &upkeep, &stop), finished);
        }
        Err(e) => {
            tracing::warn!(error = %e, "no thread for the heartbeat; it runs as a task");
            tokio::join!(
                beat_loop(&node, &upkeep, &stop),
                upkeep_loop(&node, &upkeep, &stop)
            );
        }
    }
}

/// Beats every `--heartbeat-interval` on a connection of its own (made again after a
/// connection error), until `stop`.
async fn beat_loop(node: &Node, upkeep: &Upkeep, stop: &CancellationToken) {
    let mut tick = tokio::time::interval(node.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut conn: Option<RedisConn> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beaten = async {
            let conn = match &mut conn {
                Some(conn) => conn,
                None => conn.insert(node.redis.own_conn().await?),
            };
            beat(node, conn).await
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = beaten => result,
        };
        match result {
            Ok(beat) => upkeep.after(&beat),
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                node.health.set_redis_ok(false);
                if crate::redis::is_connection_error(&e) {
                    conn = None;
                }
            }
        }
    }
}

/// One heartbeat on `conn`: refreshes this node's registration and the live-node view.
/// Readiness learns whether it reached Redis.
async fn beat(node: &Node, conn: &mut RedisConn) -> Result<Beat, RedisError> {
    let beat = node.registry.beat(&node.redis, conn).await?;
    node.health.set_redis_ok(true);
    node.metrics.inbox_length.set(beat.inbox_len as f64);
    if beat.lost
        && let Some(history) = &node.history
    {
        history.redis_reset();
    }
    Ok(beat)
}

/// The first heartbeat, before the node serves (on a pooled connection), and what follows
/// from it.
pub async fn first_beat(node: &Node) {
    let beaten = async {
        let mut conn = node.redis.conn().await?;
        beat(node, &mut conn).await
    };
    match beaten.await {
        Ok(beat) => {
            if let Err(e) = catch_up(node, beat.lost).await {
                tracing::warn!(error = %e, "heartbeat upkeep failed");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat failed");
            node.health.set_redis_ok(false);
        }
    }
}

/// Does what the beats leave (see [`catch_up`]) as they ask, and keeps history streams
/// alive every third of `--history-ttl`, until `stop`.
async fn upkeep_loop(node: &Node, upkeep: &Upkeep, stop: &CancellationToken) {
    let period = node
        .history
        .as_ref()
        .map_or(Duration::MAX / 4, |h| h.keep_alive_every())
        .max(Duration::from_millis(1));
    let mut streams = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    streams.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = upkeep.due.notified() => {
                let lost = upkeep.lost.swap(false, Ordering::AcqRel);
                if let Err(e) = catch_up(node, lost).await {
                    tracing::warn!(error = %e, "heartbeat upkeep failed");
                    // Registering again is retried after the next beat.
                    upkeep.lost.fetch_or(lost, Ordering::AcqRel);
                }
            }
            _ = streams.tick(), if node.history.is_some() => {
                if let Some(history) = &node.history {
                    keep_streams_alive(node, history).await;
                }
            }
        }
    }
}

/// Registers every local session and room membership again if Redis lost them (`lost`),
/// and reaps the nodes the live view holds dead.
async fn catch_up(node: &Node, lost: bool) -> Result<(), RedisError> {
    if lost {
        let sessions = node.hub.snapshot();
        tracing::warn!(
            sessions = sessions.len(),
            "registration was missing from Redis; registering local users again"
        );
        let replaced = node.presence.reclaim(&sessions).await?;
        for (user, sid) in replaced {
            node.hub
                .kick(user.as_str(), sid, close::SESSION_REPLACED, "");
        }
        node.presence.rejoin_rooms(&node.rooms.snapshot()).await?;
    }
    let dead = node.live.dead_nodes();
    if dead.is_empty() {
        return Ok(());
    }
    let mut conn = node.redis.conn().await?;
    for dead in &dead {
        let mut released = Vec::new();
        let wanted = node.wants(EventKind::Disconnect).then_some(&mut released);
        match node
            .registry
            .reap(&node.redis, &mut conn, dead, wanted)
            .await
        {
            Ok(Some(drops)) => announce_departures(node, drops).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(node = %dead, error = %e, "reaping failed"),
        }
        report_dead_sessions(node, dead, released).await;
    }
    Ok(())
}

/// Keeps the history streams of this node's users and rooms from expiring under them
/// (every third of `--history-ttl`: one `PEXPIRE` pair per user and room with sessions here).
async fn keep_streams_alive(node: &Node, history: &crate::history::History) {
    let mut users: Vec<UserId> = node.hub.snapshot().into_iter().map(|(u, _)| u).collect();
    users.sort_unstable();
    users.dedup();
    let mut rooms: Vec<RoomId> = node.rooms.snapshot().into_iter().map(|(r, _)| r).collect();
    rooms.sort_unstable();
    rooms.dedup();
    let users: Vec<&str> = users.iter().map(UserId::as_str).collect();
    let rooms: Vec<&str> = rooms.iter().map(RoomId::as_str).collect();
    if let Err(e) = history.keep_alive(&users, &rooms).await {
        tracing::warn!(error = %e, "could not refresh the history streams' TTL");
    }
}

/// `disconnect` events for the sessions of dead node `dead` (this node found them, so it
/// tells the backend: no session stays a ghost): `node` is the dead node, code 1006, reason
/// `node died`, and `reaped_by` this node.
pub async fn report_dead_sessions(node: &Node, dead: &str, sessions: Vec<(String, u64)>) {
    for (user, sid) in sessions {
        let mut event = Event::new(EventKind::Disconnect, &user, sid)
            .field("code", "1006")
            .field("reason", "node died")
            .field("reaped_by", &*node.id);
        event.node = Some(dead.into());
        node.report_event(event).await;
    }
}

/// Presence `leave` events for the users a dead node took out of its rooms.
pub async fn announce_departures(node: &Node, drops: Vec<RoomDrop>) {
    for drop in drops {
        let before = drop.members + drop.gone.len() as u64;
        let Some(room) = RoomId::parse(&drop.room) else {
            continue;
        };
        // The room's size with the users who left still in it, as for any leave.
        if !crate::node::rooms::sends_presence(node.config.presence_events_max_members, before) {
            continue;
        }
        for user in &drop.gone {
            node.send_presence(&room, user, PresenceEvent::Leave).await;
        }
    }
}
