//! Operator commands that read the bus directly: `wsbus nodes`, `wsbus whereis`,
//! `wsbus inspect`. They only read; none of them changes Redis.

use serde::Serialize;

use crate::redis::keys::Keys;
use crate::redis::{Redis, RedisError};
use crate::wire::envelope::{Body, DecodeError, Envelope, VERSION_FIELD, decode_entry};

pub use crate::cluster::registry::{NodeInfo, nodes};

/// A stream entry as `XRANGE` returns it: id and field/value pairs.
type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// One session of a user.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UserLocation {
    /// Node id.
    pub node: String,
    /// Session id on that node.
    pub sid: u64,
    /// Connected since (ms since the epoch, Redis server time).
    pub since: u64,
    /// Whether its node is alive (its `P:node:<id>` key has not expired).
    pub alive: bool,
}

/// A bus handle for one-off commands: a single Redis, or a cluster from seed nodes.
pub fn open(url: &str, cluster: bool) -> Result<Redis, RedisError> {
    Redis::new(url, cluster, None, std::time::Duration::from_secs(5), 2)
}

/// Every session `user` has registered, oldest first.
pub async fn where_is(
    redis: &Redis,
    keys: &Keys,
    user: &str,
) -> Result<Vec<UserLocation>, RedisError> {
    let mut conn = redis.conn().await?;
    let sessions: Vec<(String, u64)> = redis::cmd("HGETALL")
        .arg(keys.user_sessions(user))
        .query_async(&mut conn)
        .await?;
    let mut out: Vec<UserLocation> = sessions
        .into_iter()
        .filter_map(|(field, since_us)| {
            let s = crate::cluster::presence::SessionRef::parse(&field)?;
            Some(UserLocation {
                node: s.node,
                sid: s.sid,
                since: since_us / 1000,
                alive: false,
            })
        })
        .collect();
    if out.is_empty() {
        return Ok(out);
    }
    let mut pipe = redis::pipe();
    for loc in &out {
        pipe.cmd("EXISTS").arg(keys.node(&loc.node));
    }
    let alive: Vec<bool> = pipe.query_async(&mut conn).await?;
    for (loc, alive) in out.iter_mut().zip(alive) {
        loc.alive = alive;
    }
    out.sort_by_key(|l| (l.since, l.sid));
    Ok(out)
}

/// One room with members somewhere.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RoomInfo {
    /// Room id.
    pub room: String,
    /// Users in it.
    pub members: u64,
    /// Nodes with members in it.
    pub nodes: Vec<String>,
}

/// Up to `count` rooms with members (from `P:rooms`), largest first.
pub async fn rooms(redis: &Redis, keys: &Keys, count: usize) -> Result<Vec<RoomInfo>, RedisError> {
    let mut conn = redis.conn().await?;
    let mut names: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(keys.rooms())
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        names.extend(batch);
        if next == 0 || names.len() >= count {
            break;
        }
        cursor = next;
    }
    names.truncate(count);
    let mut pipe = redis::pipe();
    for room in &names {
        pipe.cmd("HLEN")
            .arg(keys.room_members(room))
            .cmd("SMEMBERS")
            .arg(keys.room_nodes(room));
    }
    let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut out = Vec::with_capacity(names.len());
    for (room, pair) in names.into_iter().zip(replies.chunks(2)) {
        let members: u64 = redis::from_redis_value_ref(&pair[0])?;
        let mut nodes: Vec<String> = redis::from_redis_value_ref(&pair[1])?;
        nodes.sort();
        // A room whose last node just left (its `P:rooms` entry goes next).
        if !nodes.is_empty() {
            out.push(RoomInfo {
                room,
                members,
                nodes,
            });
        }
    }
    out.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.room.cmp(&b.room)));
    Ok(out)
}

/// The members of `room`, sorted, each with the nodes it has sessions in the room on.
pub async fn members(
    redis: &Redis,
    keys: &Keys,
    room: &str,
) -> Result<Vec<(String, Vec<String>)>, RedisError> {
    let mut conn = redis.conn().await?;
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.room_members(room))
        .query_async(&mut conn)
        .await?;
    let mut out: Vec<(String, Vec<String>)> = all
        .into_iter()
        .map(|(user, nodes)| (user, nodes.split_whitespace().map(str::to_owned).collect()))
        .collect();
    out.sort();
    Ok(out)
}

/// The first `count` entries of `node`'s inbox, envelopes decoded to JSON, one object per
/// envelope (a packed entry's also say which `part` they are, of how many: `of`); `None`
/// when no such node is registered and no inbox of that name exists (a mistyped id, another
/// prefix).
pub async fn inspect(
    redis: &Redis,
    keys: &Keys,
    node: &str,
    count: usize,
) -> Result<Option<Vec<serde_json::Value>>, RedisError> {
    let mut conn = redis.conn().await?;
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
    let mut out = Vec::new();
    for (id, fields) in &entries {
        entry_json(id, fields, &mut out);
    }
    Ok(Some(out))
}

/// Adds the JSON of one inbox entry's envelopes to `out` (nothing for the placeholder that
/// keeps an empty inbox in existence).
fn entry_json(id: &str, fields: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<serde_json::Value>) {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    };
    let mut envs = Vec::new();
    match decode_entry(field, &mut envs) {
        Ok(()) => {}
        Err(DecodeError::Missing) => {}
        Err(e) => out.push(serde_json::json!({"id": id, "error": e.to_string()})),
    }
    let packed = field(VERSION_FIELD).is_some();
    let of = envs.len();
    for (part, env) in envs.iter().enumerate() {
        let mut v = envelope_json(id, env);
        if packed {
            v["part"] = (part + 1).into();
            v["of"] = of.into();
        }
        out.push(v);
    }
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
        Body::RoomMessage { room, text } => {
            v["data"] = serde_json::json!({"room": room, "text": text})
        }
        Body::Presence { room, event } => {
            v["data"] = serde_json::json!({"room": room, "event": event.as_str()})
        }
        Body::Kick { sid, code, reason } => {
            v["data"] = serde_json::json!({"sid": sid, "code": code, "reason": reason})
        }
        Body::Publish { frame } | Body::RoomPublish { frame, .. } => {
            v["data"] = serde_json::from_str(frame).unwrap_or_default()
        }
        Body::Member { room, join, reply } => {
            v["data"] = serde_json::json!({"room": room, "join": join, "reply": reply})
        }
        Body::MemberReply {
            reply,
            sessions,
            error,
        } => v["data"] = serde_json::json!({"reply": reply, "sessions": sessions, "error": error}),
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
    let (host, path) = split_url(url).ok_or_else(invalid)?;
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

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Option<(&str, String)> {
    let rest = url.strip_prefix("http://")?;
    Some(
        rest.split_once('/')
            .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}"))),
    )
}

/// `POST url` with a JSON `body` and `Authorization: Bearer <key>` over plain HTTP/1.1, with
/// a 10 s deadline: (status, response body). For `wsbus publish`.
pub async fn post_json(url: &str, key: &str, body: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let (host, path) = split_url(url).ok_or_else(|| invalid("expected http://host:port/path"))?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
             Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        let reply = String::from_utf8_lossy(&reply);
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("not an HTTP response"))?;
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s"))?
}
