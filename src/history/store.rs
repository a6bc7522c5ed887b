//! The Redis side of history: the commands behind [`History`]'s API (the functions of
//! `migrations/wsbus_v5.lua` and `wsbus_v3.lua`, and the plain commands an append is on a
//! single Redis) and the
//! parsing of their replies. Nothing here decides anything; [`super`] does.
//!
//! Keys, hash-tagged by target so each function touches one slot:
//! `P:{u:<uid>}:history` / `P:{u:<uid>}:hmeta` and `P:{r:<room>}:history` / `P:{r:<room>}:hmeta`.

use redis::{RedisResult, Value};

use super::{History, Part, Stream, stamp_stored};
use crate::redis::{RedisConn, RedisError};

/// Function names (libraries `wsbus_v5` and `wsbus_v3`).
mod func {
    /// Append frames to a stream if it is alive or its target has sessions (a user) or
    /// members (a room), keep it within `--history-max-bytes`, and say where the target is.
    pub(super) const APPEND: &str = "wsbus_v5_history_append";
    /// Count the bytes a plain append added to a live stream, trimming it past its bound.
    pub(super) const ACCOUNT: &str = "wsbus_v5_history_account";
    /// Read a stream's position (and the frames after an offset), refreshing its TTL.
    pub(super) const OPEN: &str = "wsbus_v3_history_open";
}

/// Replies of [`History::add_plain_append`] besides one per frame: the epoch, the byte
/// count, two TTL refreshes and where the target is.
const PLAIN_EXTRA_REPLIES: usize = 5;

/// Streams whose TTL one pipeline of [`History::expire`] refreshes at most.
const EXPIRE_CHUNK: usize = 500;

/// One reply per part of a batch, in order.
pub(super) type Replies = Vec<Result<Reply, RedisError>>;

/// What appending frames to one stream gave (its reply, parsed).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply {
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
    /// The target has no live stream and no session (a user) or member (a room): nothing
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

impl History {
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

    /// `=` (exact) trimming below a stream node's 100 entries; above, Redis drops whole
    /// nodes (`~`), which is far cheaper and keeps up to 100 more.
    fn trim(&self) -> &'static str {
        if self.keep < 100 { "=" } else { "~" }
    }

    /// Appends the frames of `parts` to their streams on `conn`: one pipeline of plain
    /// commands in a transaction on a single Redis (and one of function calls after it for
    /// the streams that had no epoch), one of function calls on a cluster, where a
    /// transaction cannot span slots. One reply per part.
    pub(super) async fn append_parts(
        &self,
        conn: &mut RedisConn,
        parts: &[Part<'_>],
    ) -> Result<Replies, RedisError> {
        match self.cluster {
            true => self.append_by_function(conn, parts.iter()).await,
            false => self.append_plainly(conn, parts).await,
        }
    }

    /// Appends with one history function call per stream, pipelined; one reply per part.
    async fn append_by_function<'p, 'a: 'p>(
        &self,
        conn: &mut RedisConn,
        parts: impl ExactSizeIterator<Item = &'p Part<'a>>,
    ) -> Result<Replies, RedisError> {
        let mut pipe = redis::Pipeline::with_capacity(parts.len());
        pipe.ignore_errors();
        for part in parts {
            self.add_append(&mut pipe, part.stream, &part.frames);
        }
        let mut results: Vec<RedisResult<Value>> = pipe.query_async(conn).await?;
        if results
            .iter()
            .all(|r| matches!(r, Err(e) if crate::redis::is_missing_function(e)))
        {
            // Redis lost the functions (it restarted): nothing was appended.
            self.redis.load_functions(conn).await?;
            results = pipe.query_async(conn).await?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.map_err(RedisError::from).and_then(Reply::parse))
            .collect())
    }

    /// Appends on a single Redis in one transaction of plain commands (see
    /// [`History::add_plain_append`]); the streams whose epoch was missing (new, expired, or
    /// lost with Redis's data) go through the function afterwards. One reply per part.
    async fn append_plainly(
        &self,
        conn: &mut RedisConn,
        parts: &[Part<'_>],
    ) -> Result<Replies, RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for part in parts {
            self.add_plain_append(&mut pipe, part.stream, &part.frames);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let (mut outcomes, unknown) = Reply::parse_transaction(&replies, parts)?;
        if !unknown.is_empty() {
            let again = self
                .append_by_function(conn, unknown.iter().map(|&i| &parts[i]))
                .await?;
            for (i, outcome) in unknown.into_iter().zip(again) {
                outcomes[i] = outcome;
            }
        }
        Ok(outcomes)
    }

    /// Adds the append of `frames` (in order, each as stored: without offset and epoch) to
    /// `stream` to `pipe`: one function call; its reply parses with [`Reply::parse`].
    fn add_append(&self, pipe: &mut redis::Pipeline, stream: Stream<'_>, frames: &[String]) {
        let (history, meta) = self.stream_keys(stream);
        let (where_key, kind) = match stream {
            Stream::User(user) => (self.keys.user_sessions(user), "u"),
            Stream::Room(room) => (self.keys.room_nodes(room), "r"),
        };
        let cmd = pipe
            .cmd("FCALL")
            .arg(func::APPEND)
            .arg(3)
            .arg(history)
            .arg(meta)
            .arg(where_key)
            .arg(self.trim())
            .arg(self.keep)
            .arg(self.ttl_ms)
            .arg(self.new_epoch())
            .arg(kind)
            .arg(self.max_bytes);
        for frame in frames {
            cmd.arg(frame.as_str());
        }
    }

    /// Adds to an atomic (`MULTI`) pipeline on a single Redis the plain commands that append
    /// `frames` to `stream` if it exists (`NOMKSTREAM`; Redis numbers the entries `0-1`,
    /// `0-2`, …: contiguous offsets within the transaction), count their bytes (a small
    /// function call, which trims the stream past `--history-max-bytes`), refresh its TTL,
    /// read its epoch and say where its target is: no function call with the frames, whose
    /// argument passing costs Redis more than the appends. A stream not there yet is left to
    /// the append function, which makes it only for a live target. Its
    /// `frames.len() + PLAIN_EXTRA_REPLIES` replies parse with [`Reply::parse_plain`].
    fn add_plain_append(&self, pipe: &mut redis::Pipeline, stream: Stream<'_>, frames: &[String]) {
        let (history, meta) = self.stream_keys(stream);
        pipe.cmd("HGET").arg(&meta).arg("epoch");
        let trim = self.trim();
        for frame in frames {
            pipe.cmd("XADD")
                .arg(&history)
                .arg("NOMKSTREAM")
                .arg("MAXLEN")
                .arg(trim)
                .arg(self.keep)
                .arg("0-*")
                .arg("frame")
                .arg(frame.as_str());
        }
        let bytes: usize = frames.iter().map(String::len).sum();
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
    /// it missing. One function call on a connection of its own.
    pub(super) async fn open(
        &self,
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
        let mut conn = self.redis.conn().await?;
        let (reply,): (Value,) = self.redis.query(&mut conn, &pipe).await?;
        Opened::parse(reply)
    }

    /// Refreshes the TTL of `streams`: plain `PEXPIRE`s (a missing key stays missing),
    /// pipelined in chunks.
    pub(super) async fn expire<'s>(
        &self,
        streams: impl Iterator<Item = Stream<'s>>,
    ) -> Result<(), RedisError> {
        let mut conn = self.redis.conn().await?;
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for stream in streams {
            let (history, meta) = self.stream_keys(stream);
            pipe.cmd("PEXPIRE").arg(history).arg(self.ttl_ms).ignore();
            pipe.cmd("PEXPIRE").arg(meta).arg(self.ttl_ms).ignore();
            queued += 1;
            if queued == EXPIRE_CHUNK {
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
}

impl Reply {
    /// Splits the replies of a transaction of [`History::add_plain_append`]s (one per part,
    /// in order) and parses each part's. Returns one reply per part, and the parts whose
    /// stream had no epoch (their reply is a placeholder error, for the function to replace).
    fn parse_transaction(
        replies: &[Value],
        parts: &[Part<'_>],
    ) -> Result<(Replies, Vec<usize>), RedisError> {
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut unknown = Vec::new();
        let mut at = 0;
        for (i, part) in parts.iter().enumerate() {
            let n = part.frames.len() + PLAIN_EXTRA_REPLIES;
            let Some(replies) = replies.get(at..at + n) else {
                return Err(RedisError::Reply("history append transaction"));
            };
            at += n;
            match Reply::parse_plain(replies) {
                Ok(Some(reply)) => outcomes.push(Ok(reply)),
                Ok(None) => {
                    unknown.push(i);
                    outcomes.push(Err(RedisError::Reply("history append")));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        Ok((outcomes, unknown))
    }

    /// Parses the replies of [`History::add_plain_append`] for one stream. `None`: the
    /// stream or its meta was missing, so whether it is alive (and its epoch) is for the
    /// append function to decide: the plain commands appended nothing (no stream), or
    /// appended to a stream without an epoch, which that function empties when it makes one.
    fn parse_plain(replies: &[Value]) -> Result<Option<Self>, RedisError> {
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
        Ok(Some(Reply::Stored {
            first,
            epoch,
            nodes: redis::from_redis_value(nodes.clone())?,
        }))
    }

    /// Parses the reply of [`History::add_append`].
    fn parse(reply: Value) -> Result<Self, RedisError> {
        let Value::Array(items) = reply else {
            return Err(RedisError::Reply("history append"));
        };
        let mut items = items.into_iter();
        let first: u64 = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(RedisError::Reply("history append")),
        };
        if first == 0 {
            return Ok(Reply::NoStream);
        }
        let epoch: String = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(RedisError::Reply("history append")),
        };
        let nodes = items
            .map(redis::from_redis_value::<String>)
            .collect::<Result<_, _>>()?;
        Ok(Reply::Stored {
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
            frames.push((offset, stamp_stored(stored, offset, &epoch)));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn part(stream: Stream<'_>, frames: usize) -> Part<'_> {
        Part {
            stream,
            messages: (0..frames).collect(),
            frames: vec!["{}".into(); frames],
        }
    }

    #[test]
    fn parses_a_function_append() {
        let stored = Value::Array(vec![Value::Int(7), bulk("e1"), bulk("n1:3"), bulk("n2:4")]);
        assert_eq!(
            Reply::parse(stored).unwrap(),
            Reply::Stored {
                first: 7,
                epoch: "e1".into(),
                nodes: vec!["n1:3".into(), "n2:4".into()],
            }
        );
        assert_eq!(
            Reply::parse(Value::Array(vec![Value::Int(0)])).unwrap(),
            Reply::NoStream
        );
        assert!(Reply::parse(Value::Array(vec![])).is_err());
        assert!(Reply::parse(Value::Nil).is_err());
    }

    #[test]
    fn splits_a_transaction_by_stream_and_leaves_unknown_epochs_to_the_function() {
        // Three streams: the first (two frames) has an epoch, the second (one frame) has
        // none, the third has an epoch but no stream yet (`NOMKSTREAM` appended nothing).
        let replies = vec![
            bulk("e1"),
            bulk("0-5"),
            bulk("0-6"),
            Value::Int(4),
            Value::Int(1),
            Value::Int(1),
            Value::Array(vec![bulk("n1:1")]),
            Value::Nil,
            bulk("0-1"),
            Value::Int(-1),
            Value::Int(1),
            Value::Int(1),
            Value::Array(vec![]),
            bulk("e2"),
            Value::Nil,
            Value::Int(-1),
            Value::Int(0),
            Value::Int(1),
            Value::Array(vec![bulk("n1:2")]),
        ];
        let parts = [
            part(Stream::User("a"), 2),
            part(Stream::Room("r"), 1),
            part(Stream::User("b"), 1),
        ];
        let (outcomes, unknown) = Reply::parse_transaction(&replies, &parts).unwrap();
        assert_eq!(unknown, vec![1, 2]);
        assert_eq!(
            outcomes[0].as_ref().unwrap(),
            &Reply::Stored {
                first: 5,
                epoch: "e1".into(),
                nodes: vec!["n1:1".into()],
            }
        );
        assert!(outcomes[1].is_err() && outcomes[2].is_err());
        // Fewer replies than the commands sent: the transaction is not understood.
        assert!(Reply::parse_transaction(&replies[..18], &parts).is_err());
    }

    #[test]
    fn parses_an_open_stream_with_its_frames_stamped() {
        let reply = Value::Array(vec![
            bulk("e1"),
            Value::Int(9),
            Value::Int(0),
            Value::Int(3),
            Value::Int(8),
            bulk(r#"{"from":"a","action":"m","data":{}}"#),
            Value::Int(9),
            bulk(r#"{"from":"b","action":"m","data":{}}"#),
        ]);
        assert_eq!(
            Opened::parse(reply).unwrap(),
            Opened {
                epoch: "e1".into(),
                top: 9,
                created: false,
                first: 3,
                frames: vec![
                    (
                        8,
                        r#"{"from":"a","action":"m","data":{},"offset":8,"epoch":"e1"}"#.into()
                    ),
                    (
                        9,
                        r#"{"from":"b","action":"m","data":{},"offset":9,"epoch":"e1"}"#.into()
                    ),
                ],
            }
        );
        assert!(Opened::parse(Value::Array(vec![bulk("e1")])).is_err());
    }
}
