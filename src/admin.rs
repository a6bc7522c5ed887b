//! Operator commands that read the bus directly: `wsbus nodes`, `wsbus whereis`,
//! `wsbus inspect`. They only read; none of them changes Redis.

use redis::Value;
use serde::Serialize;

use crate::bus::{Bus, BusError};
use crate::keys::Keys;
use crate::wire::{Body, ENVELOPE_FIELD, Envelope};

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// One registered node.
#[derive(Debug, Serialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Its bind address.
    pub addr: Option<String>,
    /// Age of the node in seconds (from its start time).
    pub age_secs: Option<u64>,
    /// Milliseconds since its last heartbeat, by Redis time.
    pub last_heartbeat_ms: u64,
    /// Users it holds.
    pub users: u64,
    /// Entries waiting in its inbox.
    pub inbox_len: u64,
    /// Version it runs.
    pub version: Option<String>,
}

/// Where a user is connected.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UserLocation {
    /// Node id.
    pub node: String,
    /// Session id on that node.
    pub sid: String,
    /// Connected since (ms since the epoch).
    pub since: Option<u64>,
}

/// A bus handle for one-off commands: a single Redis, or a cluster from seed nodes.
pub fn open(url: &str, cluster: bool) -> Result<Bus, BusError> {
    Bus::new(url, cluster, None, std::time::Duration::from_secs(5), 2)
}

/// Every node in the registry (live or not yet reaped).
pub async fn nodes(bus: &Bus, keys: &Keys) -> Result<Vec<NodeInfo>, BusError> {
    let mut conn = bus.conn().await?;
    let ((secs, micros), members): ((u64, u64), Vec<(String, f64)>) = redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(keys.nodes())
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    let now_ms = secs * 1000 + micros / 1000;
    let mut pipe = redis::pipe();
    for (id, _) in &members {
        pipe.cmd("HMGET")
            .arg(keys.node(id))
            .arg("addr")
            .arg("started")
            .arg("version")
            .cmd("SCARD")
            .arg(keys.node_users(id))
            .cmd("XLEN")
            .arg(keys.inbox(id));
    }
    let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
    let mut out = Vec::with_capacity(members.len());
    for ((id, last), chunk) in members.into_iter().zip(replies.chunks(3)) {
        let (addr, started, version): (Option<String>, Option<u64>, Option<String>) =
            redis::from_redis_value(chunk[0].clone())?;
        let users: u64 = redis::from_redis_value(chunk[1].clone())?;
        let inbox_len: u64 = redis::from_redis_value(chunk[2].clone())?;
        out.push(NodeInfo {
            id,
            addr,
            age_secs: started.map(|s| now_ms.saturating_sub(s) / 1000),
            last_heartbeat_ms: now_ms.saturating_sub(last as u64),
            users,
            inbox_len,
            version,
        });
    }
    Ok(out)
}

/// Where `user` is registered, if anywhere.
pub async fn where_is(
    bus: &Bus,
    keys: &Keys,
    user: &str,
) -> Result<Option<UserLocation>, BusError> {
    let mut conn = bus.conn().await?;
    let (node, sid, since): (Option<String>, Option<String>, Option<u64>) = redis::cmd("HMGET")
        .arg(keys.user(user))
        .arg("node")
        .arg("sid")
        .arg("since")
        .query_async(&mut conn)
        .await?;
    Ok(node.map(|node| UserLocation {
        node,
        sid: sid.unwrap_or_default(),
        since,
    }))
}

/// The first `count` entries of `node`'s inbox, envelopes decoded to JSON; `None` when no
/// such node is registered and no inbox of that name exists (a mistyped id, another prefix).
pub async fn inspect(
    bus: &Bus,
    keys: &Keys,
    node: &str,
    count: usize,
) -> Result<Option<Vec<serde_json::Value>>, BusError> {
    let mut conn = bus.conn().await?;
    let (registered, inbox_exists, entries): (Option<f64>, bool, Vec<RawEntry>) = redis::pipe()
        .cmd("ZSCORE")
        .arg(keys.nodes())
        .arg(node)
        .cmd("EXISTS")
        .arg(keys.inbox(node))
        .cmd("XRANGE")
        .arg(keys.inbox(node))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut conn)
        .await?;
    if registered.is_none() && !inbox_exists {
        return Ok(None);
    }
    Ok(Some(
        entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let env = fields
                    .iter()
                    .find(|(k, _)| k == ENVELOPE_FIELD.as_bytes())
                    .map(|(_, v)| v.as_slice())?;
                Some(match Envelope::decode(env) {
                    Ok(env) => envelope_json(&id, &env),
                    Err(e) => serde_json::json!({"id": id, "error": e.to_string()}),
                })
            })
            .collect(),
    ))
}

fn envelope_json(id: &str, env: &Envelope<'_>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": id,
        "message_id": env.id,
        "origin": env.origin,
        "from": env.from,
        "to": env.to,
        "hops": env.hops,
        "action": env.body.action(),
    });
    match &env.body {
        Body::Message { text } => v["data"] = serde_json::json!({"to": env.to, "text": text}),
        Body::Error { error } => v["data"] = serde_json::json!({"error": error}),
    }
    v
}

/// `GET url` over plain HTTP/1.1 with a 5 s deadline; returns the status code.
pub async fn probe(url: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let invalid = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "expected http://host:port/path",
        )
    };
    let rest = url.strip_prefix("http://").ok_or_else(invalid)?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
            })
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s"))?
}
