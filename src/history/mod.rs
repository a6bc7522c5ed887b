//! History (`--history N`): every message a user can receive is first appended to a Redis
//! stream of its target (the recipient user, or the room: one write per room message), and
//! the frame clients get carries its place there, a top-level `"offset"` (1, 2, 3… within
//! the stream) and `"epoch"` (changes whenever the stream's past was lost). This module owns
//! the stream side (the Redis functions of `migrations/wsbus_v3.lua`, stamping frames, the
//! recovery decision) and the [`Sequencer`] a session uses to hand each stream's frames to
//! its client in offset order, once each, filling gaps from the stream.
//!
//! Keys, hash-tagged by target so each function touches one slot:
//! `P:{u:<uid>}:history` / `P:{u:<uid>}:hmeta` and `P:{r:<room>}:history` / `P:{r:<room>}:hmeta`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::Value;

use crate::config::NodeConfig;
use crate::redis::RedisError;
use crate::redis::keys::Keys;

pub mod sequencer;

/// Replies of [`History::add_plain_append`] besides one per frame: the epoch, the byte
/// count, two TTL refreshes and where the target is.
pub const PLAIN_EXTRA_REPLIES: usize = 5;

pub use crate::wire::frame::{Seq, StreamOf};
pub use sequencer::{GAP_WAIT, Gap, Sequencer};

/// Function names (libraries `wsbus_v3` and `wsbus_v4`).
pub mod func {
    /// Append frames to a stream if it is alive or its target has sessions (a user) or
    /// members (a room), keep it within its byte bound, and say where the target is.
    pub const APPEND: &str = "wsbus_v4_history_append";
    /// Count the bytes a plain append added to a live stream, trimming it past its bound.
    pub const ACCOUNT: &str = "wsbus_v4_history_account";
    /// Read a stream's position (and the frames after an offset), refreshing its TTL.
    pub const OPEN: &str = "wsbus_v3_history_open";
}

/// One stream: a user's or a room's.
#[derive(Debug, Clone, Copy)]
pub enum Stream<'a> {
    /// A user's (direct messages, publishes and relays to the user).
    User(&'a str),
    /// A room's.
    Room(&'a str),
}

/// The history settings and what this node knows about the streams' past.
pub struct History {
    /// Messages kept per stream.
    pub keep: u32,
    /// Bytes of frames kept per stream (`--history-max-bytes`).
    pub max_bytes: usize,
    /// Stream TTL in milliseconds.
    pub ttl_ms: u64,
    /// Most messages one recovery replays.
    pub recover_max: u32,
    keys: Keys,
    /// When this node last saw Redis lose its data (ms since the Unix epoch; 0 = never).
    reset_ms: AtomicU64,
    seed: u64,
    counter: AtomicU64,
}

/// What appending frames to one stream gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored from offset `first` on (one each, in order) in epoch `epoch`; the target is on
    /// `nodes` (for a user: its session fields `<node>:<sid>`; for a room: nodes with
    /// members).
    Stored {
        /// The first frame's offset.
        first: u64,
        /// The stream's epoch.
        epoch: String,
        /// Where the target is.
        nodes: Vec<String>,
    },
    /// The target has no live stream, and no session (a user) or member (a room): nothing
    /// was stored, no key made.
    NoStream,
}

/// A stream's position, and frames read from it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// The epoch (empty: the stream does not exist and was not created).
    pub epoch: String,
    /// The last offset given.
    pub top: u64,
    /// The stream did not exist and was created now (its past is gone).
    pub created: bool,
    /// The oldest offset still kept (0: none).
    pub first: u64,
    /// The frames read, in offset order, stamped with their place.
    pub frames: Vec<(u64, String)>,
}

/// Why a recovery could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The stream's past was lost (Redis restarted empty, or the client's epoch is not this
    /// stream's).
    Epoch,
    /// The offset is older than what the stream keeps.
    Trimmed,
    /// The stream expired (nobody wrote to it for `--history-ttl`).
    Expired,
    /// More than `--recover-max` messages were missed.
    TooMany,
}

impl Unrecoverable {
    /// The `reason` of a `recovered: false` frame.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecoverable::Epoch => "epoch",
            Unrecoverable::Trimmed => "trimmed",
            Unrecoverable::Expired => "expired",
            Unrecoverable::TooMany => "too_many",
        }
    }
}

impl History {
    /// The history settings of `config`, or `None` when history is off.
    pub fn new(config: &NodeConfig, keys: &Keys, seed: u64) -> Option<Self> {
        (config.history > 0).then(|| Self {
            keep: config.history,
            max_bytes: config.history_max_bytes,
            ttl_ms: (config.history_ttl.as_millis() as u64).max(1),
            recover_max: config.recover_max,
            keys: keys.clone(),
            reset_ms: AtomicU64::new(0),
            seed,
            counter: AtomicU64::new(0),
        })
    }

    /// A new epoch: its creation time (ms, hex), a dash, and a random part.
    pub fn new_epoch(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mix = (self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17);
        format!("{:x}-{:08x}", crate::wire::clock::now_ms(), mix as u32)
    }

    /// Records that Redis lost its data (the heartbeat found this node's registration gone):
    /// a stream missing since then was lost, not expired.
    pub fn redis_reset(&self) {
        self.reset_ms
            .store(crate::wire::clock::now_ms(), Ordering::Relaxed);
    }

    fn stream_keys(&self, stream: Stream<'_>) -> (String, String) {
        match stream {
            Stream::User(user) => (
                self.keys.user_history(user),
                self.keys.user_history_meta(user),
            ),
            Stream::Room(room) => (
                self.keys.room_history(room),
                self.keys.room_history_meta(room),
            ),
        }
    }

    /// Adds the append of `frames` (in order, each as stored: without offset and epoch) to
    /// `stream` to `pipe`; its reply parses with [`Appended::parse`].
    pub fn add_append<'f>(
        &self,
        pipe: &mut redis::Pipeline,
        stream: Stream<'_>,
        frames: impl Iterator<Item = &'f str>,
    ) {
        let (history, meta) = self.stream_keys(stream);
        let (where_key, kind) = match stream {
            Stream::User(user) => (self.keys.user_sessions(user), "u"),
            Stream::Room(room) => (self.keys.room_nodes(room), "r"),
        };
        // Exact trimming below a stream node's 100 entries; above, Redis drops whole nodes
        // (`~`), which is far cheaper and keeps up to 100 more.
        let trim = if self.keep < 100 { "=" } else { "~" };
        let cmd = pipe
            .cmd("FCALL")
            .arg(func::APPEND)
            .arg(3)
            .arg(history)
            .arg(meta)
            .arg(where_key)
            .arg(trim)
            .arg(self.keep)
            .arg(self.ttl_ms)
            .arg(self.new_epoch())
            .arg(kind)
            .arg(self.max_bytes);
        for frame in frames {
            cmd.arg(frame);
        }
    }

    /// Adds to an atomic (`MULTI`) pipeline on a single Redis the plain commands that append
    /// `frames` to `stream` if it exists (`NOMKSTREAM`: Redis numbers the entries `0-1`,
    /// `0-2`, …: contiguous offsets within the transaction), count their bytes (a small
    /// function call, which trims the stream past `--history-max-bytes`), refresh its TTL,
    /// read its epoch and say where its target is: no function call with the frames, whose
    /// argument passing costs Redis more than the appends. A stream not there yet is left to
    /// the append function, which makes it only for a live target. Its
    /// [`PLAIN_EXTRA_REPLIES`] + `frames.len()` replies parse with [`Appended::parse_plain`].
    pub fn add_plain_append<S: AsRef<str>>(
        &self,
        pipe: &mut redis::Pipeline,
        stream: Stream<'_>,
        frames: &[S],
    ) {
        let (history, meta) = self.stream_keys(stream);
        pipe.cmd("HGET").arg(&meta).arg("epoch");
        let trim = if self.keep < 100 { "=" } else { "~" };
        let mut bytes = 0;
        for frame in frames {
            bytes += frame.as_ref().len();
            pipe.cmd("XADD")
                .arg(&history)
                .arg("NOMKSTREAM")
                .arg("MAXLEN")
                .arg(trim)
                .arg(self.keep)
                .arg("0-*")
                .arg("frame")
                .arg(frame.as_ref());
        }
        pipe.cmd("FCALL")
            .arg(func::ACCOUNT)
            .arg(2)
            .arg(&history)
            .arg(&meta)
            .arg(bytes)
            .arg(self.max_bytes);
        pipe.cmd("PEXPIRE").arg(&history).arg(self.ttl_ms);
        pipe.cmd("PEXPIRE").arg(&meta).arg(self.ttl_ms);
        match stream {
            Stream::User(user) => pipe.cmd("HKEYS").arg(self.keys.user_sessions(user)),
            Stream::Room(room) => pipe.cmd("SMEMBERS").arg(self.keys.room_nodes(room)),
        };
    }

    /// Reads the position of `stream` and (with `since`) up to `limit` frames after it,
    /// refreshing its TTL; `create` makes a missing stream (new epoch) instead of reporting
    /// it missing.
    pub async fn open(
        &self,
        redis: &crate::redis::Redis,
        stream: Stream<'_>,
        since: Option<u64>,
        limit: u32,
        create: bool,
    ) -> Result<Opened, RedisError> {
        let (history, meta) = self.stream_keys(stream);
        let mut pipe = redis::pipe();
        pipe.cmd("FCALL")
            .arg(func::OPEN)
            .arg(2)
            .arg(history)
            .arg(meta)
            .arg(self.ttl_ms)
            .arg(self.new_epoch())
            .arg(since.map_or(-1, |s| s.min(i64::MAX as u64) as i64))
            .arg(limit)
            .arg(u8::from(create));
        let mut conn = redis.conn().await?;
        let (reply,): (Value,) = redis.query(&mut conn, &pipe).await?;
        Opened::parse(reply)
    }

    /// Refreshes the TTL of the streams of `users` and `rooms` (those with sessions or
    /// members on this node), so a stream does not expire under a user who is connected but
    /// gets nothing for longer than `--history-ttl`. Plain `PEXPIRE`s (a missing key stays
    /// missing), pipelined in chunks.
    pub async fn keep_alive(
        &self,
        redis: &crate::redis::Redis,
        users: &[&str],
        rooms: &[&str],
    ) -> Result<(), RedisError> {
        let streams = users
            .iter()
            .map(|u| Stream::User(u))
            .chain(rooms.iter().map(|r| Stream::Room(r)));
        let mut conn = redis.conn().await?;
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for stream in streams {
            let (history, meta) = self.stream_keys(stream);
            pipe.cmd("PEXPIRE").arg(history).arg(self.ttl_ms).ignore();
            pipe.cmd("PEXPIRE").arg(meta).arg(self.ttl_ms).ignore();
            queued += 1;
            if queued == 500 {
                pipe.query_async::<()>(&mut conn).await?;
                pipe = redis::pipe();
                queued = 0;
            }
        }
        if queued > 0 {
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Decides a recovery from `since` in `epoch` against the stream as `opened` (read with
    /// `since` and a limit of `recover_max`).
    pub fn recovery(&self, since: u64, epoch: &str, opened: &Opened) -> Result<(), Unrecoverable> {
        decide(
            since,
            epoch,
            opened,
            self.recover_max,
            self.reset_ms.load(Ordering::Relaxed),
        )
    }
}

/// See [`History::recovery`].
fn decide(
    since: u64,
    epoch: &str,
    opened: &Opened,
    recover_max: u32,
    reset_ms: u64,
) -> Result<(), Unrecoverable> {
    if epoch != opened.epoch {
        // A stream made anew since the client's epoch began: it expired, unless Redis lost
        // its data after that epoch was made (or the epoch is not one of ours).
        let made_ms = epoch
            .split_once('-')
            .and_then(|(ms, _)| u64::from_str_radix(ms, 16).ok());
        return match made_ms {
            Some(made) if opened.created && made > reset_ms => Err(Unrecoverable::Expired),
            _ => Err(Unrecoverable::Epoch),
        };
    }
    if since > opened.top {
        // Positions from a past this stream never had.
        return Err(Unrecoverable::Epoch);
    }
    let missed = opened.top - since;
    if missed == 0 {
        return Ok(());
    }
    if missed > u64::from(recover_max) {
        return Err(Unrecoverable::TooMany);
    }
    if opened.first == 0 || since + 1 < opened.first || opened.frames.len() as u64 != missed {
        return Err(Unrecoverable::Trimmed);
    }
    Ok(())
}

impl Appended {
    /// Parses the replies of [`History::add_plain_append`] for one stream. `None`: the
    /// stream or its meta was missing, so whether it is alive (and its epoch) is for the
    /// append function to decide: the plain commands appended nothing (the stream was not
    /// there), or appended to a stream without an epoch, which that function empties when
    /// it makes one.
    pub fn parse_plain(replies: &[Value]) -> Result<Option<Self>, RedisError> {
        let (Some(epoch), Some(first), Some(nodes)) =
            (replies.first(), replies.get(1), replies.last())
        else {
            return Err(RedisError::Reply("history append"));
        };
        let Some(epoch): Option<String> = redis::from_redis_value(epoch.clone())? else {
            return Ok(None);
        };
        let Some(first): Option<String> = redis::from_redis_value(first.clone())? else {
            return Ok(None);
        };
        let first = first
            .strip_prefix("0-")
            .and_then(|n| n.parse().ok())
            .ok_or(RedisError::Reply("history entry id"))?;
        Ok(Some(Appended::Stored {
            first,
            epoch,
            nodes: redis::from_redis_value(nodes.clone())?,
        }))
    }

    /// Parses the reply of [`History::add_append`].
    pub fn parse(reply: Value) -> Result<Self, RedisError> {
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply("history append"));
        };
        let mut items = items.into_iter();
        let first: u64 = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(RedisError::Reply("history append")),
        };
        if first == 0 {
            return Ok(Appended::NoStream);
        }
        let epoch: String = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(RedisError::Reply("history append")),
        };
        let nodes = items
            .map(redis::from_redis_value::<String>)
            .collect::<Result<_, _>>()?;
        Ok(Appended::Stored {
            first,
            epoch,
            nodes,
        })
    }
}

impl Opened {
    fn parse(reply: Value) -> Result<Self, RedisError> {
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply("history open"));
        };
        if items.len() < 4 {
            return Err(RedisError::Reply("history open"));
        }
        let mut items = items.into_iter();
        let mut next = || items.next().expect("length checked");
        let epoch: String = redis::from_redis_value(next())?;
        let top: u64 = redis::from_redis_value(next())?;
        let created: u8 = redis::from_redis_value(next())?;
        let first: u64 = redis::from_redis_value(next())?;
        let mut frames = Vec::new();
        let rest: Vec<Value> = items.collect();
        for pair in rest.chunks_exact(2) {
            let offset: u64 = redis::from_redis_value(pair[0].clone())?;
            let stored: String = redis::from_redis_value(pair[1].clone())?;
            frames.push((offset, stamp(&frame_prefix(&stored, None), offset, &epoch)));
        }
        Ok(Opened {
            epoch,
            top,
            created: created == 1,
            first,
            frames,
        })
    }
}

/// The frame `frame` (`{...}`) without its closing brace, with `,"room":"<room>"` added for
/// a room's stream: what [`stamp`] and the Redis function complete.
pub fn frame_prefix(frame: &str, room: Option<&str>) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    let mut out = String::with_capacity(body.len() + 64);
    out.push_str(body);
    if let Some(room) = room {
        // Room ids are from the id alphabet: nothing to escape.
        out.push_str(",\"room\":\"");
        out.push_str(room);
        out.push('"');
    }
    out
}

/// Completes a [`frame_prefix`] with its place: `,"offset":N,"epoch":"E"}`.
pub fn stamp(prefix: &str, offset: u64, epoch: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 36 + epoch.len());
    out.push_str(prefix);
    let _ = write!(out, ",\"offset\":{offset},\"epoch\":\"{epoch}\"}}");
    out
}

/// A stamped frame of a user's stream without its stamp (the copy of a direct message its
/// sender's other sessions get is no frame of theirs).
pub fn unstamped(frame: &str, offset: u64, epoch: &str) -> String {
    let suffix = format!(",\"offset\":{offset},\"epoch\":\"{epoch}\"}}");
    match frame.strip_suffix(&suffix) {
        Some(body) => format!("{body}}}"),
        None => frame.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(epoch: &str, top: u64, first: u64, frames: u64, created: bool) -> Opened {
        Opened {
            epoch: epoch.into(),
            top,
            created,
            first,
            frames: (top - frames + 1..=top)
                .map(|o| (o, String::new()))
                .collect(),
        }
    }

    #[test]
    fn recovery_names_why_it_cannot() {
        let e = "18c0000000-1";
        assert_eq!(decide(5, e, &opened(e, 8, 1, 3, false), 10, 0), Ok(()));
        assert_eq!(decide(8, e, &opened(e, 8, 1, 0, false), 10, 0), Ok(()));
        assert_eq!(
            decide(5, "other", &opened(e, 8, 1, 3, false), 10, 0),
            Err(Unrecoverable::Epoch)
        );
        assert_eq!(
            decide(9, e, &opened(e, 8, 1, 0, false), 10, 0),
            Err(Unrecoverable::Epoch)
        );
        assert_eq!(
            decide(1, e, &opened(e, 20, 1, 10, false), 10, 0),
            Err(Unrecoverable::TooMany)
        );
        assert_eq!(
            decide(2, e, &opened(e, 8, 5, 4, false), 10, 0),
            Err(Unrecoverable::Trimmed)
        );
        // A stream made anew: expired, unless Redis lost its data after the client's epoch.
        let fresh = opened("18d0000000-2", 0, 0, 0, true);
        assert_eq!(decide(5, e, &fresh, 10, 0), Err(Unrecoverable::Expired));
        assert_eq!(
            decide(5, e, &fresh, 10, 0x18c0000001),
            Err(Unrecoverable::Epoch)
        );
    }

    #[test]
    fn stamps_and_unstamps_frames() {
        let prefix = frame_prefix(r#"{"from":"a","action":"m","data":{}}"#, Some("lobby"));
        let stamped = stamp(&prefix, 7, "e1");
        assert_eq!(
            stamped,
            r#"{"from":"a","action":"m","data":{},"room":"lobby","offset":7,"epoch":"e1"}"#
        );
        let prefix = frame_prefix(r#"{"from":"a","action":"m","data":{}}"#, None);
        let stamped = stamp(&prefix, 7, "e1");
        assert_eq!(
            unstamped(&stamped, 7, "e1"),
            r#"{"from":"a","action":"m","data":{}}"#
        );
    }
}
