//! The inbox reader: one task per node that reads the node's stream with blocking `XREAD`
//! on a dedicated connection and delivers into local sessions. The connection, the read's
//! deadline, reconnects with backoff and shutdown are [`crate::redis::consumer`]'s; the
//! cursor, trimming and what becomes of each entry are here.
//!
//! Each round trip is one pipeline: `XTRIM MINID` past what the previous read delivered, then
//! `XREAD COUNT n BLOCK t` from the cursor, so the stream holds only undelivered entries.
//! An entry holds one envelope or, packed, several (see [`crate::wire::envelope`]); both
//! layouts are read, and each envelope of a packed entry is handled exactly as if it had an
//! entry of its own (duplicates, delivery, forwarding, answers), in order.
//! After a reconnect to a different Redis server (`run_id` changed: a restart or failover),
//! the cursor restarts at the beginning of the (new) stream. An entry for a user who is no
//! longer here goes back to [`crate::delivery::target`], which forwards it once to the user's
//! current nodes or answers `not found` to the sender's node; it is never dropped silently.

use std::collections::HashMap;
use std::sync::Arc;

use redis::Value;

use crate::delivery::target::{Dispatch, Origin, Payload, Target};
use crate::history::{Seq, unstamped};
use crate::node::Node;
use crate::redis::consumer::{StreamReader, consume};
use crate::redis::stream::{EntryId, entry_parts, field, stream_entries};
use crate::redis::{RedisConn, RedisError};
use crate::wire::client::{ClientError, encode_message, encode_presence, encode_room_message};
use crate::wire::envelope::{self, Body, DecodeError, Envelope, Stamp, append_entry};
use crate::wire::frame::SocketFrame;

/// Runs the inbox reader until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let mut reader = InboxReader {
        inbox: node.keys.inbox(&node.id),
        node: node.clone(),
        cursor: EntryId::default(),
        trim_to: None,
        run_id: None,
        last_seen: HashMap::new(),
        answers: Vec::new(),
    };
    let block = node.config.inbox_block;
    consume(&node.redis, &mut reader, block, node.shutdown.clone()).await;
}

/// This node's inbox as read by [`consume`]: the cursor and trimming, duplicate detection,
/// and what becomes of each entry.
struct InboxReader {
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
    /// Error answers for other nodes' senders, appended after the batch that produced them.
    answers: Vec<Envelope<'static>>,
}

impl StreamReader for InboxReader {
    const NAME: &'static str = "inbox";

    /// Restarts the cursor when the server is not the one it belongs to.
    async fn on_connect(&mut self, conn: &mut RedisConn) -> Result<(), RedisError> {
        if self.node.redis.is_cluster() {
            // Each shard has its own run_id; a failover keeps the stream on the replica.
            return Ok(());
        }
        let info: String = tokio::time::timeout(
            self.node.config.redis_timeout,
            redis::cmd("INFO").arg("server").query_async(conn),
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
        Ok(())
    }

    /// One pipeline: `XTRIM MINID` past what the previous read delivered, then `XREAD` from
    /// the cursor.
    async fn read(&mut self, conn: &mut RedisConn) -> Result<Value, RedisError> {
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
            .arg(self.node.config.inbox_block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.inbox)
            .arg(self.cursor.to_string());
        let (reply,) = pipe.query_async::<(Value,)>(conn).await?;
        self.trim_to = None;
        Ok(reply)
    }

    /// Delivers the entries; a failure to forward moved ones is logged, not a reason to
    /// drop the connection (they went out on other connections).
    async fn process(&mut self, _conn: &mut RedisConn, reply: Value) -> Result<(), RedisError> {
        if let Err(e) = self.deliver_entries(reply).await {
            tracing::warn!(error = %e, "could not forward moved entries");
        }
        Ok(())
    }

    fn report_alive(&mut self) {
        self.node.health.inbox_read();
    }

    fn report_lost(&mut self) {
        metrics::counter!("wsbus_redis_reconnects_total").increment(1);
        self.node.health.inbox_lost();
    }
}

impl InboxReader {
    /// Delivers one `XREAD` reply into local sessions, answers the senders of messages
    /// refused as too slow, advances the cursor, and forwards entries whose recipient left.
    async fn deliver_entries(&mut self, reply: Value) -> Result<(), RedisError> {
        let Some(entries) = stream_entries(reply) else {
            return Ok(());
        };
        tracing::trace!(entries = entries.len(), "inbox read");
        let mut moved: Vec<Envelope<'static>> = Vec::new();
        let mut last = None;
        let mut queued = 0;
        // The envelopes of one entry (one, or a packed entry's), borrowing from it.
        let mut envs = Vec::new();
        for entry in &entries {
            let Some((id, fields)) = entry_parts(entry) else {
                metrics::counter!("wsbus_undecodable_entries_total").increment(1);
                tracing::warn!("skipping a malformed inbox entry");
                continue;
            };
            last = Some(id);
            decode_entry(id, fields, &mut envs);
            for env in envs.drain(..) {
                if self.is_duplicate(&env) {
                    continue;
                }
                match self.queue_locally(&env) {
                    Some(n) => queued += u64::from(n),
                    None => moved.push(env.into_owned()),
                }
            }
        }
        self.node.metrics.from_bus.increment(queued);
        if !self.answers.is_empty()
            && let Err(e) = self.append_answers().await
        {
            tracing::warn!(error = %e, "could not tell senders their recipients are too slow");
        }
        if let Some(last) = last {
            self.advance_cursor(last);
        }
        if moved.is_empty() {
            return Ok(());
        }
        self.forward_moved(moved).await
    }

    /// Moves the cursor past `last` (the batch's last entry) and schedules the trim of
    /// what it read; records the read lag.
    fn advance_cursor(&mut self, last: EntryId) {
        let lag_ms = crate::wire::clock::now_ms().saturating_sub(last.ms());
        self.node
            .metrics
            .inbox_read_lag_seconds
            .set(lag_ms as f64 / 1e3);
        self.cursor = last;
        self.trim_to = Some(last.next());
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

    /// Queues `env`'s frame for its local sessions; the number queued, or `None` if it must
    /// be forwarded (a message for a recipient with no session here: it moved).
    fn queue_locally(&mut self, env: &Envelope<'_>) -> Option<u32> {
        match &env.body {
            Body::Message { text } => self.queue_message(env, text),
            Body::RoomMessage { room, text } => Some(self.queue_room_frame(room, || SocketFrame {
                frame: encode_room_message(&env.from, room, text).into(),
                born_us: env.sent_us,
                seq: None,
            })),
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
            Body::Publish { frame } => self.queue_publish(env, frame),
            Body::RoomPublish { room, frame } => {
                let seq = history_seq(env.stamp.as_ref(), Some(room));
                Some(self.queue_room_frame(room, || SocketFrame {
                    frame: (**frame).into(),
                    born_us: env.sent_us,
                    seq,
                }))
            }
            Body::Kick { sid, code, reason } => {
                self.node.hub.kick(&env.to, *sid, *code, reason);
                Some(0)
            }
            Body::Member { .. } | Body::MemberReply { .. } => {
                self.node.take_member_entry(env);
                Some(0)
            }
        }
    }

    /// A direct message: the sender's copy, if asked for, and the recipient's (`None`: the
    /// recipient has no session here). When every recipient session refused it as slow, its
    /// sender gets an answer.
    fn queue_message(&mut self, env: &Envelope<'_>, text: &str) -> Option<u32> {
        let hub = &self.node.hub;
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

    /// A published frame for a user: the sender's copy, if asked for (without the
    /// recipient's history stamp), and the recipient's (`None`: no session here).
    fn queue_publish(&self, env: &Envelope<'_>, frame: &str) -> Option<u32> {
        let hub = &self.node.hub;
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
            let seq = history_seq(env.stamp.as_ref(), None);
            let fanout = hub.deliver_user(&env.to, None, || SocketFrame {
                frame: frame.into(),
                born_us: env.sent_us,
                seq,
            });
            if !fanout.found() {
                return None;
            }
            queued += fanout.queued;
        }
        Some(queued)
    }

    /// A room's frame (`make` builds it) for the room's members here; counted as delivered
    /// from the bus.
    fn queue_room_frame(&self, room: &str, make: impl FnOnce() -> SocketFrame) -> u32 {
        let queued = self.node.rooms.deliver(room, None, None, make);
        self.node
            .metrics
            .room_delivered_from_bus
            .increment(u64::from(queued));
        queued
    }

    /// Queues, for the sender of `env`, the answer that its recipient's sessions here all
    /// refused it as slow consumers (the message was dropped and counted); appended to the
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

    /// Appends the answers queued by [`InboxReader::answer_too_slow`] to their nodes'
    /// inboxes, one pipeline.
    async fn append_answers(&mut self) -> Result<(), RedisError> {
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
    async fn forward_moved(&self, moved: Vec<Envelope<'static>>) -> Result<(), RedisError> {
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
                // With history on, every message kept there is stamped before it travels:
                // one without a stamp was transient where it was sent.
                transient: env.stamp.is_none(),
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

/// Puts the envelopes of an inbox entry (single or packed) into `out`; none (counted and
/// logged unless it is the placeholder that keeps an empty inbox in existence) when it has
/// none or they do not decode.
fn decode_entry<'e>(id: EntryId, fields: &'e [Value], out: &mut Vec<Envelope<'e>>) {
    match envelope::decode_entry(|name| field(fields, name), out) {
        Ok(()) => {}
        // Our own placeholder (`_`) that keeps an empty inbox in existence.
        Err(DecodeError::Missing) if field(fields, "_").is_some() => {}
        Err(e) => {
            metrics::counter!("wsbus_undecodable_entries_total").increment(1);
            tracing::warn!(entry = %id, error = %e, "skipping an undecodable inbox entry");
        }
    }
}

/// The place in `room`'s history stream (`None`: the user's) of a frame stamped `stamp`.
fn history_seq(stamp: Option<&Stamp<'_>>, room: Option<&str>) -> Option<Arc<Seq>> {
    stamp.map(|stamp| {
        Arc::new(Seq {
            room: room.map(Arc::from),
            offset: stamp.offset,
            epoch: Arc::from(&*stamp.epoch),
            marker: false,
        })
    })
}
