//! The inbox consumer: one task per node that reads the node's stream with blocking `XREAD`
//! on a dedicated connection and delivers into local sessions.
//!
//! Each round trip is one pipeline: `XTRIM MINID` past what the previous read delivered, then
//! `XREAD COUNT n BLOCK t` from the cursor, so the stream holds only undelivered entries.
//! The call has its own deadline (block time + margin): a half-open connection is dropped and
//! replaced, with backoff. After a reconnect to a different Redis server (`run_id` changed:
//! a restart or failover), the cursor restarts at the beginning of the (new) stream.
//! An entry for a user who is no longer here goes back to [`crate::delivery::target`], which forwards it
//! once to the user's current nodes or answers `not found` to the sender's node; it is never
//! dropped silently.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;

use crate::delivery::target::{Dispatch, Origin, Payload, Target};
use crate::history::{Seq, unstamped};
use crate::node::Node;
use crate::redis::stream::{EntryId, entry_parts, field, stream_entries};
use crate::redis::{RedisConn, RedisError};
use crate::wire::client::{ClientError, encode_message, encode_presence, encode_room_message};
use crate::wire::envelope::{Body, ENVELOPE_FIELD, Envelope, append_entry};
use crate::wire::frame::SocketFrame;

/// Extra time allowed past the block time before a read counts as hung.
const READ_MARGIN: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs the consumer until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let mut consumer = Consumer {
        inbox: node.keys.inbox(&node.id),
        node,
        cursor: EntryId::default(),
        trim_to: None,
        run_id: None,
        last_seen: HashMap::new(),
        answers: Vec::new(),
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let shutdown = consumer.node.shutdown.clone();
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = consumer.connect() => c,
        };
        match connected {
            Ok(mut conn) => {
                backoff = BACKOFF_MIN;
                consumer.node.health.inbox_read();
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = consumer.read_loop(&mut conn) => r,
                };
                tracing::warn!(error = %outcome, "inbox connection lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the inbox reader"),
        }
        metrics::counter!("wsbus_redis_reconnects_total").increment(1);
        consumer.node.health.inbox_lost();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Consumer {
    node: Arc<Node>,
    inbox: String,
    /// Last entry id read (and handled).
    cursor: EntryId,
    /// Entries below this id are handled and can be trimmed.
    trim_to: Option<EntryId>,
    /// The Redis server the cursor belongs to.
    run_id: Option<String>,
    /// Highest message id seen per sending process (`boot`), to drop entries appended twice.
    last_seen: HashMap<u64, u64>,
    /// Error answers for other nodes' senders, sent after the batch that produced them.
    answers: Vec<Envelope<'static>>,
}

impl Consumer {
    async fn connect(&mut self) -> Result<RedisConn, RedisError> {
        let mut conn = self.node.redis.dedicated_conn().await?;
        if self.node.redis.is_cluster() {
            // Each shard has its own run_id; a failover keeps the stream on the replica.
            return Ok(conn);
        }
        let info: String = tokio::time::timeout(
            self.node.config.redis_timeout,
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await
        .map_err(|_| RedisError::Reply("INFO timed out"))??;
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_owned());
        if self.run_id.is_some() && self.run_id != run_id {
            tracing::info!("Redis server changed; reading the inbox from its start");
            self.cursor = EntryId::default();
            self.trim_to = None;
        }
        self.run_id = run_id;
        Ok(conn)
    }

    /// Reads and delivers until the connection fails; returns why.
    async fn read_loop(&mut self, conn: &mut RedisConn) -> RedisError {
        let block_ms = self.node.config.inbox_block.as_millis() as u64;
        let deadline = self.node.config.inbox_block + READ_MARGIN;
        loop {
            let mut pipe = redis::pipe();
            if let Some(trim_to) = self.trim_to {
                pipe.cmd("XTRIM")
                    .arg(&self.inbox)
                    .arg("MINID")
                    .arg(trim_to.to_string())
                    .ignore();
            }
            pipe.cmd("XREAD")
                .arg("COUNT")
                .arg(self.node.config.inbox_read_count)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&self.inbox)
                .arg(self.cursor.to_string());
            let reply = match tokio::time::timeout(deadline, pipe.query_async::<(Value,)>(conn))
                .await
            {
                Err(_) => {
                    return RedisError::Reply("XREAD passed its deadline (half-open connection?)");
                }
                Ok(Err(e)) => return e.into(),
                Ok(Ok((reply,))) => reply,
            };
            self.trim_to = None;
            self.node.health.inbox_read();
            if let Err(e) = self.handle(reply).await {
                tracing::warn!(error = %e, "could not forward moved entries");
            }
        }
    }

    /// Delivers one `XREAD` reply; forwards or answers entries whose recipient left.
    async fn handle(&mut self, reply: Value) -> Result<(), RedisError> {
        let Some(entries) = stream_entries(reply) else {
            return Ok(());
        };
        tracing::trace!(entries = entries.len(), "inbox read");
        let mut moved: Vec<Envelope<'static>> = Vec::new();
        let mut last = None;
        let mut delivered = 0;
        for entry in &entries {
            let Some((id, fields)) = entry_parts(entry) else {
                metrics::counter!("wsbus_undecodable_entries_total").increment(1);
                tracing::warn!("skipping a malformed inbox entry");
                continue;
            };
            last = Some(id);
            let env = match field(fields, ENVELOPE_FIELD).map(Envelope::decode) {
                Some(Ok(env)) => env,
                Some(Err(e)) => {
                    metrics::counter!("wsbus_undecodable_entries_total").increment(1);
                    tracing::warn!(entry = %id, error = %e, "skipping an undecodable inbox entry");
                    continue;
                }
                None => {
                    // Our own placeholder (`_`) that keeps an empty inbox in existence.
                    if field(fields, "_").is_none() {
                        metrics::counter!("wsbus_undecodable_entries_total").increment(1);
                        tracing::warn!(entry = %id, "skipping an inbox entry without envelope");
                    }
                    continue;
                }
            };
            if self.is_duplicate(&env) {
                continue;
            }
            match self.deliver(&env) {
                Some(queued) => delivered += u64::from(queued),
                None => moved.push(env.into_owned()),
            }
        }
        self.node.metrics.from_bus.increment(delivered);
        if !self.answers.is_empty()
            && let Err(e) = self.send_answers().await
        {
            tracing::warn!(error = %e, "could not tell senders their recipients are too slow");
        }
        if let Some(last) = last {
            let lag_ms = crate::wire::clock::now_ms().saturating_sub(last.ms());
            self.node
                .metrics
                .inbox_read_lag_seconds
                .set(lag_ms as f64 / 1e3);
            self.cursor = last;
            self.trim_to = Some(last.next());
        }
        if moved.is_empty() {
            return Ok(());
        }
        self.reroute(moved).await
    }

    /// Whether `env` was appended twice (a retried pipeline). Each sending process's bus
    /// writer appends to an inbox in id order (direct and room messages, presence events,
    /// publishes),
    /// so an id at or below the last one seen from that process is a repeat. Forwarded
    /// entries, errors and kicks are exempt: they arrive out of that order.
    fn is_duplicate(&mut self, env: &Envelope<'_>) -> bool {
        let from_bus_writer = matches!(
            env.body,
            Body::Message { .. }
                | Body::RoomMessage { .. }
                | Body::Presence { .. }
                | Body::Publish { .. }
                | Body::RoomPublish { .. }
        );
        if env.hops > 0 || env.boot == 0 || !from_bus_writer {
            return false;
        }
        if self.last_seen.len() > 10_000 {
            // Bounded memory: forgetting only weakens duplicate detection for a moment.
            self.last_seen.clear();
        }
        let last = self.last_seen.entry(env.boot).or_insert(0);
        if env.id <= *last {
            metrics::counter!("wsbus_duplicate_entries_total").increment(1);
            return true;
        }
        *last = env.id;
        false
    }

    /// Delivers `env` to its local sessions; `None` if it must be forwarded (a message for
    /// a recipient with no session here: it moved).
    fn deliver(&mut self, env: &Envelope<'_>) -> Option<u32> {
        let hub = &self.node.hub;
        match &env.body {
            Body::Message { text } => {
                let mut built: Option<SocketFrame> = None;
                let mut frame = || {
                    built
                        .get_or_insert_with(|| SocketFrame {
                            frame: encode_message(&env.from, &env.to, text).into(),
                            born_us: env.sent_us,
                            seq: None,
                        })
                        .clone()
                };
                let mut queued = 0;
                if env.to_sender {
                    queued += hub.deliver_user(&env.from, None, &mut frame).queued;
                }
                if env.to_recipient {
                    let fanout = hub.deliver_user(&env.to, None, &mut frame);
                    if !fanout.found() {
                        return None;
                    }
                    if fanout.queued == 0 {
                        self.answer_too_slow(env);
                    }
                    queued += fanout.queued;
                }
                Some(queued)
            }
            Body::RoomMessage { room, text } => {
                let queued = self.node.rooms.deliver(room, None, None, || SocketFrame {
                    frame: encode_room_message(&env.from, room, text).into(),
                    born_us: env.sent_us,
                    seq: None,
                });
                self.node
                    .metrics
                    .room_delivered_from_bus
                    .increment(u64::from(queued));
                Some(queued)
            }
            Body::Presence { room, event } => {
                self.node.rooms.deliver(room, None, Some(&env.from), || {
                    SocketFrame::unmeasured(encode_presence(&env.from, room, *event))
                });
                Some(0)
            }
            Body::Error { .. } => {
                self.node.deliver_error(env);
                Some(0)
            }
            Body::Publish { frame } => {
                let seq = env.stamp.as_ref().map(|stamp| {
                    Arc::new(Seq {
                        room: None,
                        offset: stamp.offset,
                        epoch: Arc::from(&*stamp.epoch),
                        marker: false,
                    })
                });
                let mut queued = 0;
                if env.to_sender {
                    // The sender's own copy of a stamped direct message: no frame of its
                    // streams, so without the recipient's stamp.
                    let copy = match &env.stamp {
                        Some(stamp) => unstamped(frame, stamp.offset, &stamp.epoch),
                        None => frame.to_string(),
                    };
                    queued += hub
                        .deliver_user(&env.from, None, || SocketFrame {
                            frame: copy.into(),
                            born_us: env.sent_us,
                            seq: None,
                        })
                        .queued;
                }
                if env.to_recipient {
                    let frame = || SocketFrame {
                        frame: (**frame).into(),
                        born_us: env.sent_us,
                        seq: seq.clone(),
                    };
                    let fanout = hub.deliver_user(&env.to, None, frame);
                    if !fanout.found() {
                        return None;
                    }
                    queued += fanout.queued;
                }
                Some(queued)
            }
            Body::RoomPublish { room, frame } => {
                let seq = env.stamp.as_ref().map(|stamp| {
                    Arc::new(Seq {
                        room: Some(Arc::from(&**room)),
                        offset: stamp.offset,
                        epoch: Arc::from(&*stamp.epoch),
                        marker: false,
                    })
                });
                let queued = self.node.rooms.deliver(room, None, None, || SocketFrame {
                    frame: (**frame).into(),
                    born_us: env.sent_us,
                    seq: seq.clone(),
                });
                self.node
                    .metrics
                    .room_delivered_from_bus
                    .increment(u64::from(queued));
                Some(queued)
            }
            Body::Kick { sid, code, reason } => {
                hub.kick(&env.to, *sid, *code, reason);
                Some(0)
            }
            Body::Member { .. } | Body::MemberReply { .. } => {
                self.node.take_member_entry(env);
                Some(0)
            }
        }
    }

    /// Queues, for the sender of `env`, the answer that its recipient's sessions here all
    /// refused it as slow consumers (the message was dropped and counted); sent to the
    /// sending node's inbox after the batch.
    fn answer_too_slow(&mut self, env: &Envelope<'_>) {
        let origin = Origin::Forward {
            node: (*env.origin).into(),
            user: (*env.from).into(),
            sid: env.origin_sid,
            id: env.id,
            boot: env.boot,
            hops: env.hops,
            tried: Vec::new(),
        };
        let error = ClientError::RecipientTooSlow(env.to.to_string());
        self.answers.extend(self.node.answer_error(&origin, &error));
    }

    /// Sends the answers queued by [`Consumer::answer_too_slow`], one pipeline.
    async fn send_answers(&mut self) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        let mut buf = Vec::new();
        for answer in self.answers.drain(..) {
            buf.clear();
            answer.encode_into(&mut buf);
            append_entry(
                &mut pipe,
                &self.node.keys.inbox(&answer.origin),
                &answer.from,
                &answer.to,
                answer.body.action(),
                &buf,
            );
        }
        let mut conn = self.node.redis.conn().await?;
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Hands entries whose recipient moved back to dispatch, to be forwarded once to the
    /// recipient's current nodes (or answered `not found` to their sender).
    async fn reroute(&self, moved: Vec<Envelope<'static>>) -> Result<(), RedisError> {
        for env in moved {
            let mut tried: Vec<Box<str>> = env.tried.iter().map(|t| (**t).into()).collect();
            tried.push((*self.node.id).into());
            let dispatch = Dispatch {
                origin: Origin::Forward {
                    node: (*env.origin).into(),
                    user: (*env.from).into(),
                    sid: env.origin_sid,
                    id: env.id,
                    boot: env.boot,
                    hops: env.hops.saturating_add(1),
                    tried,
                },
                target: Target::User((*env.to).into()),
                payload: match env.body {
                    Body::Message { text } => Payload::Text(text.into_owned().into_boxed_str()),
                    Body::Publish { frame } => Payload::Frame {
                        action: action_of(&frame).into(),
                        frame: frame.into_owned().into(),
                    },
                    _ => continue,
                },
                born_us: env.sent_us,
                delivered_here: false,
                echo: false,
                stamp: env.stamp.map(|s| s.into_owned()),
            };
            if self.node.bus_writer.send(dispatch).await.is_err() {
                return Err(RedisError::Reply("the bus writer has stopped"));
            }
        }
        Ok(())
    }
}

/// The action of a published frame (`{"from":..,"action":A,..}`), for the plain field of a
/// forwarded entry.
fn action_of(frame: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Head {
        action: String,
    }
    serde_json::from_str::<Head>(frame)
        .map(|h| h.action)
        .unwrap_or_default()
}
