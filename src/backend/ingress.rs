//! Ingress: publishing through Redis, no HTTP needed. Backends in any language append plain
//! fields to the stream `P:ingress` (`XADD P:ingress * to alice action notice data {"x":1}`);
//! every node reads it through the consumer group `wsbus`, so each entry is handled by one
//! live node, routes it like an API publish ([`crate::backend::api::send`]) and acknowledges it.
//!
//! Delivery is at least once: an entry is acknowledged after it was routed, and the entries
//! of a node that died before acknowledging are claimed by another after
//! `--ingress-claim-idle` (`XAUTOCLAIM`), so a recipient may see such a frame twice. An entry
//! that does not parse is counted, logged and acknowledged, never retried. When Redis comes
//! back empty the group is created again (from the stream's start) once a backend appends.
//! The stream is capped with `XTRIM MAXLEN ~ --ingress-maxlen`.
//!
//! An entry with `op join` or `op leave` (and `user`, `room`) is a server-side membership
//! change instead, as `POST /api/join|leave` ([`Node::change_membership`]); one the room's
//! limits refuse is logged and acknowledged.

use crate::wire::event::{Event, EventKind};
use std::sync::Arc;
use std::time::Instant;

use redis::Value;
use serde_json::json;

use crate::backend::api::{Membership, Publish, PublishLimits};
use crate::node::Node;
use crate::redis::consumer::{StreamReader, consume};
use crate::redis::stream::{entry_parts, field, stream_entries};
use crate::redis::{RedisConn, RedisError};
use crate::telemetry::LogSummary;

/// Entries dropped as unparsable, logged: the first, then a count every few seconds (the
/// metric counts each).
static BAD_ENTRIES: LogSummary = LogSummary::new(std::time::Duration::from_secs(5));

/// The consumer group every node reads the ingress stream in.
pub const GROUP: &str = "wsbus";

/// The fields an ingress entry may have.
pub const FIELDS: [&str; 7] = ["to", "room", "action", "data", "from", "op", "user"];

/// What one ingress entry asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// A publish (`op` absent or `publish`).
    Publish(Publish),
    /// `op join` (`true`) or `op leave`, of `user` and `room`.
    Member(Membership, bool),
}

/// Runs the ingress reader until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let mut reader = IngressReader {
        key: node.keys.ingress(),
        node: node.clone(),
        group_ready: false,
        last_claim: None,
    };
    let block = node.config.inbox_block;
    consume(&node.redis, &mut reader, block, node.shutdown.clone()).await;
}

/// The ingress stream as read by [`consume`], as a member of the group [`GROUP`]: the
/// group's creation, claims of a dead node's entries, routing and acknowledgement.
struct IngressReader {
    node: Arc<Node>,
    key: String,
    /// The consumer group is known to exist on the current connection's server.
    group_ready: bool,
    /// When this node last claimed idle entries and trimmed the stream.
    last_claim: Option<Instant>,
}

impl StreamReader for IngressReader {
    const NAME: &'static str = "ingress";

    /// A new connection may be a new (empty) server: check the group again.
    async fn on_connect(&mut self, _conn: &mut RedisConn) -> Result<(), RedisError> {
        self.group_ready = false;
        Ok(())
    }

    /// Creates the group if needed (no stream yet: waits a block period and skips the
    /// read), then claims idle entries when it is time.
    async fn before_read(&mut self, conn: &mut RedisConn) -> Result<bool, RedisError> {
        let config = &self.node.config;
        if !self.group_ready {
            if !self.create_group(conn).await? {
                // Nobody has published yet: look again after a block period.
                tokio::time::sleep(config.inbox_block).await;
                return Ok(false);
            }
            self.group_ready = true;
        }
        if self
            .last_claim
            .is_none_or(|at| at.elapsed() >= config.ingress_claim_idle)
        {
            self.last_claim = Some(Instant::now());
            if let Err(e) = self.claim_idle(conn).await {
                if is_no_group(&e) {
                    self.group_ready = false;
                    return Ok(false);
                }
                return Err(e);
            }
        }
        Ok(true)
    }

    /// `XREADGROUP ... >`: new entries for this node. When the group is gone, the reply is
    /// empty and the next round creates it again.
    async fn read(&mut self, conn: &mut RedisConn) -> Result<Value, RedisError> {
        let config = &self.node.config;
        let reply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&*self.node.id)
            .arg("COUNT")
            .arg(config.inbox_read_count)
            .arg("BLOCK")
            .arg(config.inbox_block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async::<Value>(conn)
            .await;
        match reply {
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream (and its group) vanished: Redis lost its data, or someone
                // deleted the key.
                tracing::info!("ingress consumer group gone; creating it again");
                self.group_ready = false;
                Ok(Value::Nil)
            }
            reply => Ok(reply?),
        }
    }

    async fn process(&mut self, conn: &mut RedisConn, reply: Value) -> Result<(), RedisError> {
        match stream_entries(reply) {
            Some(entries) => self.route_entries(conn, &entries).await,
            None => Ok(()),
        }
    }
}

impl IngressReader {
    /// Creates the consumer group from the stream's start; `false` when the stream does
    /// not exist yet (not created here, so an unused ingress leaves no key behind).
    async fn create_group(&self, conn: &mut RedisConn) -> Result<bool, RedisError> {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(GROUP)
            .arg("0")
            .query_async::<()>(conn)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(stream = %self.key, "ingress consumer group created");
                Ok(true)
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(true),
            Err(e) if e.to_string().contains("requires the key to exist") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Claims entries other consumers (dead nodes) read but did not acknowledge within
    /// `--ingress-claim-idle`, routes them, and trims the stream.
    async fn claim_idle(&mut self, conn: &mut RedisConn) -> Result<(), RedisError> {
        let config = &self.node.config;
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&*self.node.id)
            .arg(config.ingress_claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(config.inbox_read_count)
            .query_async(conn)
            .await?;
        let entries = match reply {
            Value::Array(mut parts) if parts.len() >= 2 => match parts.swap_remove(1) {
                Value::Array(entries) => entries,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        if !entries.is_empty() {
            tracing::info!(entries = entries.len(), "claimed idle ingress entries");
            metrics::counter!("wsbus_ingress_claimed_total").increment(entries.len() as u64);
            self.route_entries(conn, &entries).await?;
        }
        redis::cmd("XTRIM")
            .arg(&self.key)
            .arg("MAXLEN")
            .arg("~")
            .arg(config.ingress_maxlen)
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }

    /// Routes a batch of entries (one lookup for all) and acknowledges them. Entries that
    /// do not parse are acknowledged at once; if routing fails (Redis), the rest stay
    /// pending and are claimed again later.
    async fn route_entries(
        &self,
        conn: &mut RedisConn,
        entries: &[Value],
    ) -> Result<(), RedisError> {
        let mut garbage: Vec<String> = Vec::new();
        let mut routed: Vec<String> = Vec::new();
        let mut items: Vec<Publish> = Vec::with_capacity(entries.len());
        let mut members: Vec<(String, Membership, bool)> = Vec::new();
        for entry in entries {
            let Some((id, fields)) = entry_parts(entry) else {
                // A deleted entry (`XAUTOCLAIM` reports it as nil fields) or a bad shape.
                continue;
            };
            let limits = PublishLimits::of(&self.node.config);
            match parse_op(fields, self.node.config.api_max_body_bytes, limits) {
                Ok(Op::Publish(item)) => {
                    items.push(item);
                    routed.push(id.to_string());
                }
                Ok(Op::Member(item, join)) => members.push((id.to_string(), item, join)),
                Err(reason) => {
                    metrics::counter!("wsbus_ingress_entries_total", "result" => "invalid")
                        .increment(1);
                    if let Some(more) = BAD_ENTRIES.note() {
                        tracing::warn!(entry = %id, reason = %reason, more_since_last_line = more,
                            "dropping an ingress entry that does not parse");
                    }
                    if self.node.wants(EventKind::IngressInvalid) {
                        let event = Event::new(EventKind::IngressInvalid, "", 0)
                            .field("entry", id.to_string())
                            .field("reason", reason);
                        self.node.report_event(event).await;
                    }
                    garbage.push(id.to_string());
                }
            }
        }
        if !items.is_empty() {
            match crate::backend::api::publish_all(&self.node, &items).await {
                Ok(_) => {
                    metrics::counter!("wsbus_ingress_entries_total", "result" => "routed")
                        .increment(items.len() as u64);
                    garbage.extend(routed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, entries = items.len(), "ingress entries not routed; left pending");
                }
            }
        }
        for (id, item, join) in members {
            match crate::backend::api::apply_membership(&self.node, &item, join, "").await {
                Err(crate::backend::api::ApiError::BusUnavailable) => {
                    tracing::warn!(entry = %id, "ingress membership change failed; left pending");
                    continue;
                }
                Err(refused) => {
                    tracing::info!(entry = %id, user = %item.user, room = %item.room, error = %refused, "ingress join refused");
                }
                Ok(_) => {}
            }
            metrics::counter!("wsbus_ingress_entries_total", "result" => "routed").increment(1);
            garbage.push(id);
        }
        if garbage.is_empty() {
            return Ok(());
        }
        redis::cmd("XACK")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&garbage)
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }
}

fn is_no_group(e: &RedisError) -> bool {
    match e {
        RedisError::Redis(e) => e.code() == Some("NOGROUP"),
        _ => false,
    }
}

/// Reads one entry's plain fields: a membership change with `op join|leave`, `user`,
/// `room`; otherwise a publish ([`parse_entry`]).
pub fn parse_op(fields: &[Value], max_bytes: usize, limits: PublishLimits) -> Result<Op, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        field(fields, name)
            .map(|v| std::str::from_utf8(v).map_err(|_| format!("`{name}` is not UTF-8")))
            .transpose()
    };
    let join = match text("op")? {
        None | Some("publish") => return parse_entry(fields, max_bytes, limits).map(Op::Publish),
        Some("join") => true,
        Some("leave") => false,
        Some(other) => return Err(format!("`op`: unknown operation {other:?}")),
    };
    for pair in fields.chunks(2) {
        let name = match pair.first() {
            Some(Value::BulkString(name)) => String::from_utf8_lossy(name),
            _ => return Err("malformed entry".to_owned()),
        };
        if !matches!(&*name, "op" | "user" | "room") {
            return Err(format!(
                "unknown field `{name}` for op={}",
                text("op")?.unwrap_or("")
            ));
        }
    }
    let user = text("user")?
        .and_then(crate::wire::ids::UserId::parse)
        .ok_or("`user`: missing or invalid user id")?;
    let room = text("room")?
        .and_then(crate::wire::ids::RoomId::parse)
        .ok_or("`room`: missing or invalid room id")?;
    Ok(Op::Member(Membership { user, room }, join))
}

/// Reads one entry's plain fields as a publish: `to` (user ids, comma-separated), `room`
/// (room ids, comma-separated), `action`, `data` (a JSON object, default `{}`), `from`
/// (default `@server`). Any other field is an error, and so is an entry whose fields and
/// values add up to more than `max_bytes` (`--api-max-body-bytes`, as an API body), or a
/// publish past `limits` (too many recipients, a frame too large for a client).
pub fn parse_entry(
    fields: &[Value],
    max_bytes: usize,
    limits: PublishLimits,
) -> Result<Publish, String> {
    let size: usize = fields
        .iter()
        .map(|v| match v {
            Value::BulkString(b) => b.len(),
            _ => 0,
        })
        .sum();
    if size > max_bytes {
        return Err(format!("entry too large ({size} bytes, max {max_bytes})"));
    }
    let text = |name: &str| -> Result<Option<&str>, String> {
        field(fields, name)
            .map(|v| std::str::from_utf8(v).map_err(|_| format!("`{name}` is not UTF-8")))
            .transpose()
    };
    for pair in fields.chunks(2) {
        let name = match pair.first() {
            Some(Value::BulkString(name)) => String::from_utf8_lossy(name),
            _ => return Err("malformed entry".to_owned()),
        };
        if !FIELDS.contains(&&*name) || name == "user" {
            return Err(format!("unknown field `{name}`"));
        }
    }
    fn list(v: Option<&str>) -> Vec<&str> {
        v.map(|s| s.split(',').map(str::trim).collect())
            .unwrap_or_default()
    }
    let data = match text("data")? {
        None => json!({}),
        Some(d) => serde_json::from_str(d).map_err(|e| format!("`data` is not JSON: {e}"))?,
    };
    let mut item = json!({
        "to": list(text("to")?),
        "rooms": list(text("room")?),
        "data": data,
    });
    if let Some(action) = text("action")? {
        item["action"] = json!(action);
    }
    if let Some(from) = text("from")? {
        item["from"] = json!(from);
    }
    crate::backend::api::parse_item(&item, "", limits).map_err(|e| match e {
        crate::backend::api::ApiError::Invalid { field, error } => {
            let field = if field == "rooms" { "room" } else { &field };
            format!("`{field}`: {error}")
        }
        too_large @ crate::backend::api::ApiError::FrameTooLarge { .. } => {
            format!("`data`: {too_large}")
        }
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs
            .iter()
            .flat_map(|(k, v)| {
                [
                    Value::BulkString(k.as_bytes().to_vec()),
                    Value::BulkString(v.as_bytes().to_vec()),
                ]
            })
            .collect()
    }

    const LIMITS: PublishLimits = PublishLimits {
        max_targets: 3,
        max_frame_bytes: 100,
    };

    fn parse_entry_(fields: &[Value]) -> Result<Publish, String> {
        parse_entry(fields, 1024, LIMITS)
    }

    #[test]
    fn refuses_an_entry_over_the_size_limit() {
        let big = "x".repeat(2000);
        let err =
            parse_entry_(&entry(&[("to", "a"), ("action", "n"), ("from", &big)])).unwrap_err();
        assert!(err.starts_with("entry too large ("), "{err}");
        assert!(err.ends_with("max 1024)"), "{err}");
    }

    #[test]
    fn reads_plain_fields_as_a_publish() {
        let p = parse_entry_(&entry(&[
            ("to", "alice,bob"),
            ("room", "lobby"),
            ("action", "notice"),
            ("data", r#"{"x":1}"#),
        ]))
        .unwrap();
        assert_eq!(p.to.len(), 2);
        assert_eq!(p.rooms[0].as_str(), "lobby");
        assert_eq!(
            p.frame.as_str(),
            r#"{"from":"@server","action":"notice","data":{"x":1}}"#
        );
        let p = parse_entry_(&entry(&[("to", "a"), ("action", "n"), ("from", "billing")])).unwrap();
        assert_eq!(
            p.frame.as_str(),
            r#"{"from":"billing","action":"n","data":{}}"#
        );
    }

    #[test]
    fn reads_membership_changes() {
        let op = parse_op(
            &entry(&[("op", "join"), ("user", "alice"), ("room", "team")]),
            1024,
            LIMITS,
        )
        .unwrap();
        let Op::Member(item, true) = op else {
            panic!("{op:?}")
        };
        assert_eq!((item.user.as_str(), item.room.as_str()), ("alice", "team"));
        let op = parse_op(
            &entry(&[("op", "leave"), ("user", "a"), ("room", "r")]),
            1024,
            LIMITS,
        )
        .unwrap();
        assert!(matches!(op, Op::Member(_, false)));
        let op = parse_op(
            &entry(&[("op", "publish"), ("to", "a"), ("action", "n")]),
            1024,
            LIMITS,
        )
        .unwrap();
        assert!(matches!(op, Op::Publish(_)));
        for (pairs, why) in [
            (vec![("op", "join"), ("room", "r")], "`user`"),
            (vec![("op", "join"), ("user", "a")], "`room`"),
            (
                vec![("op", "join"), ("user", "a b"), ("room", "r")],
                "`user`",
            ),
            (
                vec![("op", "leave"), ("user", "a"), ("room", "r"), ("to", "b")],
                "`to`",
            ),
            (vec![("op", "kick"), ("user", "a")], "`op`"),
            (vec![("to", "a"), ("action", "n"), ("user", "b")], "`user`"),
        ] {
            let err = parse_op(&entry(&pairs), 1024, LIMITS).unwrap_err();
            assert!(err.contains(why), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn refuses_what_does_not_parse() {
        let big_data = format!(r#"{{"x":"{}"}}"#, "y".repeat(100));
        for (pairs, why) in [
            (vec![("to", "a")], "action"),
            (vec![("to", "a"), ("action", "n"), ("data", "{")], "data"),
            (vec![("to", "a"), ("action", "n"), ("data", "[1]")], "data"),
            (vec![("to", "a b"), ("action", "n")], "to"),
            (vec![("room", "@r"), ("action", "n")], "room"),
            (vec![("to", "a"), ("action", "error")], "action"),
            (vec![("action", "n")], "to"),
            (
                vec![("to", "a"), ("action", "n"), ("colour", "red")],
                "colour",
            ),
            (vec![("to", "a,b,c,d"), ("action", "n")], "to"),
            (
                vec![("to", "a,b"), ("room", "r,s"), ("action", "n")],
                "room",
            ),
            (
                vec![("to", "a"), ("action", "n"), ("data", &big_data)],
                "data",
            ),
        ] {
            let err = parse_entry_(&entry(&pairs)).unwrap_err();
            assert!(err.contains(&format!("`{why}`")), "{pairs:?}: {err}");
        }
    }
}
