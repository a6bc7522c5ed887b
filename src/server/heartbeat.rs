//! The heartbeat task: every `--heartbeat-interval`, refresh this node's registration and its
//! view of which nodes are alive; register every local session and room membership again when
//! Redis lost them; reap dead nodes and announce their users' departures from rooms; with
//! history on, keep the streams of local users and rooms from expiring under them.

use std::sync::Arc;

use crate::cluster::presence::RoomDrop;
use crate::node::Node;
use crate::redis::RedisError;
use crate::wire::client::PresenceEvent;
use crate::wire::client::close;
use crate::wire::event::{Event, EventKind};
use crate::wire::ids::{RoomId, UserId};

/// Beats until the node shuts down (the first beat is [`beat`], run before serving).
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut streams_refreshed = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        beat(&node).await;
        if let Some(history) = &node.history
            && streams_refreshed.elapsed() >= history.keep_alive_every()
        {
            streams_refreshed = tokio::time::Instant::now();
            keep_streams_alive(&node, history).await;
        }
    }
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

/// One heartbeat, with what follows from it: re-registering local sessions and rooms if Redis
/// lost them, and reaping dead nodes. Readiness learns whether it reached Redis.
pub async fn beat(node: &Node) {
    let result = async {
        let mut conn = node.redis.conn().await?;
        let beat = node.registry.beat(&node.redis, &mut conn).await?;
        node.metrics.inbox_length.set(beat.inbox_len as f64);
        if beat.lost {
            if let Some(history) = &node.history {
                history.redis_reset();
            }
            let sessions = node.hub.snapshot();
            tracing::warn!(
                sessions = sessions.len(),
                "registration was missing from Redis; registering local users again"
            );
            let lost = node.presence.reclaim(&sessions).await?;
            for (user, sid) in lost {
                node.hub
                    .kick(user.as_str(), sid, close::SESSION_REPLACED, "");
            }
            node.presence.rejoin_rooms(&node.rooms.snapshot()).await?;
        }
        for dead in &beat.dead {
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
        Ok::<(), RedisError>(())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(error = %e, "heartbeat failed");
    }
    node.health.set_redis_ok(result.is_ok());
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
        if before > node.config.presence_events_max_members {
            continue;
        }
        for user in &drop.gone {
            node.send_presence(&room, user, PresenceEvent::Leave).await;
        }
    }
}
