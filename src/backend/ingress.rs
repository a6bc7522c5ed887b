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

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;
use serde_json::json;

use crate::backend::api::{Publish, PublishLimits};
use crate::node::Node;
use crate::redis::stream::{entry_parts, field, stream_entries};
use crate::redis::{RedisConn, RedisError};

/// The consumer group every node reads the ingress stream in.
pub const GROUP: &str = "wsbus";

/// The fields an ingress entry may have.
pub const FIELDS: [&str; 5] = ["to", "room", "action", "data", "from"];

const READ_MARGIN: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs the ingress consumer until the node shuts down.
pub async fn run(node: Arc<Node>) {
    let mut reader = Reader {
        key: node.keys.ingress(),
        node,
        group_ready: false,
        last_claim: None,
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let shutdown = reader.node.shutdown.clone();
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = reader.node.redis.dedicated_conn() => c,
        };
        match connected {
            Ok(mut conn) => {
                backoff = BACKOFF_MIN;
                // A new connection may be a new (empty) server: check the group again.
                reader.group_ready = false;
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = reader.read_loop(&mut conn) => r,
                };
                tracing::warn!(error = %outcome, "ingress connection lost; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the ingress reader"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Reader {
    node: Arc<Node>,
    key: String,
    /// The consumer group is known to exist on the current connection's server.
    group_ready: bool,
    /// When this node last claimed idle entries and trimmed the stream.
    last_claim: Option<Instant>,
}

impl Reader {
    async fn read_loop(&mut self, conn: &mut RedisConn) -> RedisError {
        let node = self.node.clone();
        let config = &node.config;
        let block = config.inbox_block;
        let deadline = block + READ_MARGIN;
        loop {
            if !self.group_ready {
                match self.create_group(conn).await {
                    Ok(true) => self.group_ready = true,
                    // No stream yet: nobody has published; look again after a block period.
                    Ok(false) => {
                        tokio::time::sleep(block).await;
                        continue;
                    }
                    Err(e) => return e,
                }
            }
            if self
                .last_claim
                .is_none_or(|at| at.elapsed() >= config.ingress_claim_idle)
            {
                self.last_claim = Some(Instant::now());
                if let Err(e) = self.claim_idle(conn).await {
                    if is_no_group(&e) {
                        self.group_ready = false;
                        continue;
                    }
                    return e;
                }
            }
            let mut read = redis::cmd("XREADGROUP");
            read.arg("GROUP")
                .arg(GROUP)
                .arg(&*self.node.id)
                .arg("COUNT")
                .arg(config.inbox_read_count)
                .arg("BLOCK")
                .arg(block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(">");
            let reply = match tokio::time::timeout(deadline, read.query_async::<Value>(conn)).await
            {
                Err(_) => return RedisError::Reply("XREADGROUP passed its deadline"),
                Ok(Err(e)) if is_no_group(&e.clone().into()) => {
                    // The stream (and its group) vanished: Redis lost its data, or someone
                    // deleted the key.
                    tracing::info!("ingress consumer group gone; creating it again");
                    self.group_ready = false;
                    continue;
                }
                Ok(Err(e)) => return e.into(),
                Ok(Ok(reply)) => reply,
            };
            if let Some(entries) = stream_entries(reply)
                && let Err(e) = self.handle(conn, &entries).await
            {
                return e;
            }
        }
    }

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
            self.handle(conn, &entries).await?;
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
    async fn handle(&self, conn: &mut RedisConn, entries: &[Value]) -> Result<(), RedisError> {
        let mut garbage: Vec<String> = Vec::new();
        let mut routed: Vec<String> = Vec::new();
        let mut items: Vec<Publish> = Vec::with_capacity(entries.len());
        let limits = PublishLimits::of(&self.node.config);
        for entry in entries {
            let Some((id, fields)) = entry_parts(entry) else {
                // A deleted entry (`XAUTOCLAIM` reports it as nil fields) or a bad shape.
                continue;
            };
            match parse_entry(fields, limits) {
                Ok(item) => {
                    items.push(item);
                    routed.push(id.to_string());
                }
                Err(reason) => {
                    metrics::counter!("wsbus_ingress_entries_total", "result" => "invalid")
                        .increment(1);
                    tracing::warn!(entry = %id, reason = %reason, "dropping an ingress entry that does not parse");
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

/// Reads one entry's plain fields as a publish: `to` (user ids, comma-separated), `room`
/// (room ids, comma-separated), `action`, `data` (a JSON object, default `{}`), `from`
/// (default `@server`). Any other field is an error, and so is a publish past `limits`.
pub fn parse_entry(fields: &[Value], limits: PublishLimits) -> Result<Publish, String> {
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
        if !FIELDS.contains(&&*name) {
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

    fn parse_entry_(fields: &[Value]) -> Result<Publish, String> {
        parse_entry(
            fields,
            PublishLimits {
                max_targets: 3,
                max_frame_bytes: 100,
            },
        )
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
