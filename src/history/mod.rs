//! History (`--history N`): every message a user can receive is first appended to a Redis
//! stream of its target (the recipient user, or the room: one write per room message), and
//! the frame clients get carries its place there, a top-level `"offset"` (1, 2, 3… within
//! the stream) and `"epoch"` (changes whenever the stream's past was lost).
//!
//! Everything else talks to the streams through one type, [`History`] (there is one only
//! when history is on):
//! - the bus writer gathers a batch's messages into [`Appends`], has [`History::append`]
//!   append them on its own connection (one round trip for the batch, before it delivers
//!   anything), and gets each message's stamped frame and where its target is from
//!   [`Appends::place`];
//! - a session starts a stream where it is ([`History::position`]), replays what a client
//!   missed ([`History::replay`], [`History::recovery`]), answers `history`
//!   ([`History::page`]), fills its sequencer's gaps ([`History::read_gap`]), and keeps its
//!   user's stream when it ends ([`History::touch`]);
//! - the heartbeat keeps the streams of local users and rooms from expiring
//!   ([`History::keep_alive`]) and says when Redis lost its data ([`History::redis_reset`]).
//!
//! This file holds the type, its API and the decisions (recovery, pages, stamping frames);
//! [`store`] the Redis commands and their replies; [`sequencer`] a session's in-order
//! hand-over of each stream's frames. No Redis in the decisions or the sequencer: their
//! tests run without it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::NodeConfig;
use crate::redis::keys::Keys;
use crate::redis::{Redis, RedisConn, RedisError};
use crate::wire::client::Position;

pub mod sequencer;
mod store;

pub use crate::wire::frame::{Seq, StreamOf};
pub use sequencer::{GAP_WAIT, Gap, Sequencer};
pub use store::Opened;
use store::{Replies, Reply};

/// One stream: a user's or a room's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream<'a> {
    /// A user's (direct messages, publishes and relays to the user).
    User(&'a str),
    /// A room's.
    Room(&'a str),
}

impl<'a> Stream<'a> {
    /// The room whose stream it is (`None`: a user's).
    pub fn room(self) -> Option<&'a str> {
        match self {
            Stream::Room(room) => Some(room),
            Stream::User(_) => None,
        }
    }
}

/// The history settings, the Redis they live in, and what this node knows about the
/// streams' past.
pub struct History {
    /// Messages kept per stream.
    keep: u32,
    /// Bytes of frames kept per stream (`--history-max-bytes`).
    max_bytes: usize,
    /// Stream TTL.
    ttl: Duration,
    /// The same in milliseconds (at least 1), as Redis takes it.
    ttl_ms: u64,
    /// Most messages one recovery replays.
    recover_max: u32,
    /// Redis is a cluster: an append cannot be one transaction over several streams.
    cluster: bool,
    keys: Keys,
    redis: Arc<Redis>,
    /// When this node last saw Redis lose its data (ms since the Unix epoch; 0 = never).
    reset_ms: AtomicU64,
    seed: u64,
    counter: AtomicU64,
}

impl History {
    /// The history of a node with `config` over `redis`, or `None` when history is off.
    pub fn new(config: &NodeConfig, keys: &Keys, redis: Arc<Redis>, seed: u64) -> Option<Self> {
        (config.history > 0).then(|| Self {
            keep: config.history,
            max_bytes: config.history_max_bytes,
            ttl: config.history_ttl,
            ttl_ms: (config.history_ttl.as_millis() as u64).max(1),
            recover_max: config.recover_max,
            cluster: config.redis_cluster,
            keys: keys.clone(),
            redis,
            reset_ms: AtomicU64::new(0),
            seed,
            counter: AtomicU64::new(0),
        })
    }

    /// A new epoch: its creation time (ms, hex), a dash, and a random part.
    fn new_epoch(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mix = (self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(17);
        format!("{:x}-{:08x}", crate::wire::clock::now_ms(), mix as u32)
    }

    /// Appends the frames of a batch (see [`Appends`]) to their streams on `conn`, the bus
    /// writer's: one pipeline for the whole batch (on a single Redis a transaction of plain
    /// commands, followed by function calls only for streams that had no epoch yet; on a
    /// cluster one function call per stream). [`Appends::place`] reads the replies.
    pub async fn append(
        &self,
        conn: &mut RedisConn,
        appends: &Appends<'_>,
    ) -> Result<AppendReplies, RedisError> {
        Ok(AppendReplies(
            self.append_parts(conn, &appends.parts).await?,
        ))
    }

    /// Where `stream` is now (made, in a new epoch, if it is missing): where a session that
    /// asks for no recovery starts it.
    pub async fn position(&self, stream: Stream<'_>) -> Result<Position<'static>, RedisError> {
        let opened = self.open(stream, None, 0, true).await?;
        Ok(Position {
            since: opened.top,
            epoch: opened.epoch.into(),
        })
    }

    /// Keeps `stream` for `--history-ttl` from now (made if it is missing): what is sent to
    /// a user who just disconnected is kept for its reconnect.
    pub async fn touch(&self, stream: Stream<'_>) -> Result<(), RedisError> {
        self.open(stream, None, 0, true).await.map(drop)
    }

    /// Where `stream` is (made if missing) and, after `since`, the frames a recovery
    /// replays (at most `--recover-max`); [`History::recovery`] decides whether they are
    /// all the client missed.
    pub async fn replay(
        &self,
        stream: Stream<'_>,
        since: Option<u64>,
    ) -> Result<Opened, RedisError> {
        self.open(stream, since, self.recover_max, true).await
    }

    /// Decides a recovery from `since` in `epoch` against the stream as `opened` by
    /// [`History::replay`].
    pub fn recovery(&self, since: u64, epoch: &str, opened: &Opened) -> Result<(), Unrecoverable> {
        decide(
            since,
            epoch,
            opened,
            self.recover_max,
            self.reset_ms.load(Ordering::Relaxed),
        )
    }

    /// A page of `stream` (made if missing) for the `history` action: at most `limit`
    /// frames after `since`, for a client that knows `epoch` (if it says).
    pub async fn page(
        &self,
        stream: Stream<'_>,
        since: u64,
        limit: u32,
        epoch: Option<&str>,
    ) -> Result<Page, RedisError> {
        let opened = self.open(stream, Some(since), limit, true).await?;
        Ok(Page::of(opened, since, epoch))
    }

    /// The frames of `gap` from `stream` (a missing stream stays missing); they fill it if
    /// the stream's epoch is still the session's.
    pub async fn read_gap(&self, stream: Stream<'_>, gap: &Gap) -> Result<Opened, RedisError> {
        let want = u32::try_from(gap.until - gap.from).unwrap_or(u32::MAX);
        self.open(stream, Some(gap.from - 1), want, false).await
    }

    /// Refreshes the TTL of the streams of `users` and `rooms` (those with sessions or
    /// members on this node), so a stream does not expire under a user who is connected but
    /// gets nothing for longer than `--history-ttl`.
    pub async fn keep_alive(&self, users: &[&str], rooms: &[&str]) -> Result<(), RedisError> {
        let streams = users
            .iter()
            .map(|u| Stream::User(u))
            .chain(rooms.iter().map(|r| Stream::Room(r)));
        self.expire(streams).await
    }

    /// How often [`History::keep_alive`] is due: a third of `--history-ttl`.
    pub fn keep_alive_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Records that Redis lost its data (the heartbeat found this node's registration gone):
    /// a stream missing since then was lost, not expired.
    pub fn redis_reset(&self) {
        self.reset_ms
            .store(crate::wire::clock::now_ms(), Ordering::Relaxed);
    }
}

/// The appends of one batch of messages: each message's frame, to its target's stream. A
/// stream's frames are appended in one go in the order they were added (their senders'),
/// so they get contiguous offsets in that order.
#[derive(Default)]
pub struct Appends<'a> {
    parts: Vec<Part<'a>>,
    /// Which part each stream is, by (is a room, id).
    part_of: HashMap<(bool, &'a str), usize>,
}

/// One stream's part of a batch.
struct Part<'a> {
    stream: Stream<'a>,
    /// The caller's number of each message (see [`Appends::add`]), in order.
    messages: Vec<usize>,
    /// Their frames as stored: without offset and epoch (see [`stored_frame`]).
    frames: Vec<String>,
}

/// The replies of [`History::append`], for [`Appends::place`].
pub struct AppendReplies(Replies);

/// What became of one stream's part of a batch.
#[derive(Debug)]
pub enum Appended {
    /// In the stream, each message with its frame as stamped and its place.
    Stored {
        /// Where the stream's target is, from the same round trip.
        target: Located,
        /// The stream's messages, in the order they were added.
        frames: Vec<StampedFrame>,
    },
    /// The target has no live stream, and no session (a user) or member (a room): nothing
    /// stored, no key made.
    NoStream {
        /// The messages (as numbered by the caller).
        messages: Vec<usize>,
    },
    /// The append failed: nothing stored.
    Failed {
        /// The messages (as numbered by the caller).
        messages: Vec<usize>,
        /// Why.
        error: RedisError,
    },
}

/// Where a stream's target is, as the append found it.
#[derive(Debug, PartialEq, Eq)]
pub enum Located {
    /// A user's stream: the user's session fields (`<node>:<sid>`).
    Sessions(Vec<String>),
    /// A room's stream: the nodes with members.
    Nodes(Vec<String>),
}

/// One message, stored.
#[derive(Debug, PartialEq, Eq)]
pub struct StampedFrame {
    /// The caller's number of the message.
    pub message: usize,
    /// Its frame as clients get it: with its place (and, in a room's stream, the room).
    pub frame: String,
    /// Its place.
    pub seq: Arc<Seq>,
}

impl<'a> Appends<'a> {
    /// Adds message number `message` (the caller's, e.g. its place in a batch), whose frame
    /// clients would get is `frame`, to `stream`.
    pub fn add(&mut self, message: usize, stream: Stream<'a>, frame: &str) {
        let frame = stored_frame(frame, stream.room());
        let key = match stream {
            Stream::User(id) => (false, id),
            Stream::Room(id) => (true, id),
        };
        match self.part_of.get(&key) {
            Some(&p) => {
                self.parts[p].messages.push(message);
                self.parts[p].frames.push(frame);
            }
            None => {
                self.part_of.insert(key, self.parts.len());
                self.parts.push(Part {
                    stream,
                    messages: vec![message],
                    frames: vec![frame],
                });
            }
        }
    }

    /// Nothing to append.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// What became of each stream's part, from the replies of [`History::append`].
    pub fn place(self, replies: AppendReplies) -> impl Iterator<Item = Appended> {
        self.parts
            .into_iter()
            .zip(replies.0)
            .map(|(p, r)| p.place(r))
    }
}

impl Part<'_> {
    /// What its reply says became of this part: its frames stamped with contiguous offsets
    /// from the first one given, or why nothing was stored.
    fn place(self, reply: Result<Reply, RedisError>) -> Appended {
        let (first, epoch, nodes) = match reply {
            Ok(Reply::Stored {
                first,
                epoch,
                nodes,
            }) => (first, epoch, nodes),
            Ok(Reply::NoStream) => {
                return Appended::NoStream {
                    messages: self.messages,
                };
            }
            Err(error) => {
                return Appended::Failed {
                    messages: self.messages,
                    error,
                };
            }
        };
        let room: StreamOf = self.stream.room().map(Arc::from);
        let epoch: Arc<str> = epoch.into();
        let frames = self
            .messages
            .into_iter()
            .zip(self.frames)
            .zip(first..)
            .map(|((message, frame), offset)| StampedFrame {
                message,
                frame: stamp_stored(frame, offset, &epoch),
                seq: Arc::new(Seq {
                    room: room.clone(),
                    offset,
                    epoch: epoch.clone(),
                    marker: false,
                }),
            })
            .collect();
        let target = match self.stream {
            Stream::User(_) => Located::Sessions(nodes),
            Stream::Room(_) => Located::Nodes(nodes),
        };
        Appended::Stored { target, frames }
    }
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
    /// The `reason` of a `recovered: false` frame (and of a `history` page).
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecoverable::Epoch => "epoch",
            Unrecoverable::Trimmed => "trimmed",
            Unrecoverable::Expired => "expired",
            Unrecoverable::TooMany => "too_many",
        }
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

/// A page of a stream, for the `history` action.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    /// The stream's epoch.
    pub epoch: String,
    /// The stream's last offset.
    pub top: u64,
    /// The frames after `since`, in offset order, stamped.
    pub frames: Vec<(u64, String)>,
    /// Why the frames are not all that came after `since`: `Epoch` (the client's epoch is
    /// not the stream's: no frames) or `Trimmed` (the oldest are no longer kept).
    pub reason: Option<Unrecoverable>,
    /// More frames follow the last one (in the same epoch).
    pub more: bool,
}

impl Page {
    /// The page `opened` (read after `since`) is for a client that knows `epoch`.
    fn of(opened: Opened, since: u64, epoch: Option<&str>) -> Page {
        let mut frames = opened.frames;
        let reason = if epoch.is_some_and(|e| e != opened.epoch) {
            frames.clear();
            Some(Unrecoverable::Epoch)
        } else if since < opened.top && (opened.first == 0 || since + 1 < opened.first) {
            Some(Unrecoverable::Trimmed)
        } else {
            None
        };
        let last = frames.last().map_or(since, |(offset, _)| *offset);
        Page {
            more: reason != Some(Unrecoverable::Epoch) && last < opened.top,
            epoch: opened.epoch,
            top: opened.top,
            frames,
            reason,
        }
    }
}

/// A frame as its stream stores it: `frame` (`{...}`) with `,"room":"<room>"` added for a
/// room's stream; [`stamp_stored`] and the append function add its place.
fn stored_frame(frame: &str, room: Option<&str>) -> String {
    let body = frame.strip_suffix('}').unwrap_or(frame);
    // Room for the room and the stamp (see `stamp_stored`) to come.
    let mut out = String::with_capacity(body.len() + room.map_or(0, |r| r.len() + 10) + 64);
    out.push_str(body);
    if let Some(room) = room {
        // Room ids are from the id alphabet: nothing to escape.
        out.push_str(",\"room\":\"");
        out.push_str(room);
        out.push('"');
    }
    out.push('}');
    out
}

/// A stored frame with its place: `,"offset":N,"epoch":"E"}` in place of its closing brace.
fn stamp_stored(mut stored: String, offset: u64, epoch: &str) -> String {
    if stored.ends_with('}') {
        stored.pop();
    }
    stored.reserve(36 + epoch.len());
    let _ = write!(stored, ",\"offset\":{offset},\"epoch\":\"{epoch}\"}}");
    stored
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
        let stored = stored_frame(r#"{"from":"a","action":"m","data":{}}"#, Some("lobby"));
        assert_eq!(
            stored,
            r#"{"from":"a","action":"m","data":{},"room":"lobby"}"#
        );
        assert_eq!(
            stamp_stored(stored, 7, "e1"),
            r#"{"from":"a","action":"m","data":{},"room":"lobby","offset":7,"epoch":"e1"}"#
        );
        let stored = stored_frame(r#"{"from":"a","action":"m","data":{}}"#, None);
        assert_eq!(stored, r#"{"from":"a","action":"m","data":{}}"#);
        let stamped = stamp_stored(stored, 7, "e1");
        assert_eq!(
            unstamped(&stamped, 7, "e1"),
            r#"{"from":"a","action":"m","data":{}}"#
        );
        // Not this place: left as it is.
        assert_eq!(unstamped(&stamped, 8, "e1"), stamped);
    }

    #[test]
    fn a_batch_appends_once_per_stream_in_the_order_given() {
        let mut appends = Appends::default();
        assert!(appends.is_empty());
        appends.add(0, Stream::User("bob"), r#"{"n":0}"#);
        appends.add(1, Stream::Room("bob"), r#"{"n":1}"#);
        appends.add(2, Stream::User("ann"), r#"{"n":2}"#);
        appends.add(3, Stream::User("bob"), r#"{"n":3}"#);
        appends.add(4, Stream::Room("bob"), r#"{"n":4}"#);
        let parts: Vec<_> = appends
            .parts
            .iter()
            .map(|p| (p.stream, p.messages.clone(), p.frames.clone()))
            .collect();
        assert_eq!(
            parts,
            vec![
                (
                    Stream::User("bob"),
                    vec![0, 3],
                    vec![r#"{"n":0}"#.into(), r#"{"n":3}"#.into()]
                ),
                (
                    Stream::Room("bob"),
                    vec![1, 4],
                    vec![
                        r#"{"n":1,"room":"bob"}"#.into(),
                        r#"{"n":4,"room":"bob"}"#.into()
                    ]
                ),
                (Stream::User("ann"), vec![2], vec![r#"{"n":2}"#.into()]),
            ]
        );
    }

    #[test]
    fn placing_stamps_contiguous_offsets_or_says_why_nothing_was_stored() {
        let mut appends = Appends::default();
        appends.add(0, Stream::Room("r"), r#"{"n":0}"#);
        appends.add(1, Stream::User("bob"), r#"{"n":1}"#);
        appends.add(2, Stream::Room("r"), r#"{"n":2}"#);
        appends.add(3, Stream::User("ann"), r#"{"n":3}"#);
        appends.add(4, Stream::User("cy"), r#"{"n":4}"#);
        let replies = AppendReplies(vec![
            Ok(Reply::Stored {
                first: 41,
                epoch: "e1".into(),
                nodes: vec!["n2".into()],
            }),
            Ok(Reply::Stored {
                first: 1,
                epoch: "e2".into(),
                nodes: vec!["n1:7".into()],
            }),
            Ok(Reply::NoStream),
            Err(RedisError::Reply("history append")),
        ]);
        let placed: Vec<Appended> = appends.place(replies).collect();
        let seq = |room: Option<&str>, offset, epoch: &str| {
            Arc::new(Seq {
                room: room.map(Arc::from),
                offset,
                epoch: epoch.into(),
                marker: false,
            })
        };
        match &placed[0] {
            Appended::Stored { target, frames } => {
                assert_eq!(target, &Located::Nodes(vec!["n2".into()]));
                assert_eq!(
                    frames,
                    &vec![
                        StampedFrame {
                            message: 0,
                            frame: r#"{"n":0,"room":"r","offset":41,"epoch":"e1"}"#.into(),
                            seq: seq(Some("r"), 41, "e1"),
                        },
                        StampedFrame {
                            message: 2,
                            frame: r#"{"n":2,"room":"r","offset":42,"epoch":"e1"}"#.into(),
                            seq: seq(Some("r"), 42, "e1"),
                        },
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        match &placed[1] {
            Appended::Stored { target, frames } => {
                assert_eq!(target, &Located::Sessions(vec!["n1:7".into()]));
                assert_eq!(frames[0].frame, r#"{"n":1,"offset":1,"epoch":"e2"}"#);
                assert_eq!(frames[0].seq, seq(None, 1, "e2"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&placed[2], Appended::NoStream { messages } if messages == &[3]));
        assert!(matches!(&placed[3], Appended::Failed { messages, .. } if messages == &[4]));
        assert_eq!(placed.len(), 4);
    }

    #[test]
    fn a_page_says_why_it_is_not_all_that_came_after() {
        // Frames 4..=6 of a stream whose top is 9: more follow.
        let read = |first| Opened {
            epoch: "e1".into(),
            top: 9,
            created: false,
            first,
            frames: (4..=6).map(|o| (o, format!("f{o}"))).collect(),
        };
        let page = Page::of(read(1), 3, Some("e1"));
        assert_eq!((page.reason, page.more, page.frames.len()), (None, true, 3));
        assert_eq!((page.epoch.as_str(), page.top), ("e1", 9));
        // The oldest wanted is no longer kept.
        let page = Page::of(read(4), 1, None);
        assert_eq!(
            (page.reason, page.more),
            (Some(Unrecoverable::Trimmed), true)
        );
        // Another epoch: no frames, nothing more to read in this one.
        let page = Page::of(read(1), 3, Some("e0"));
        assert_eq!(
            (page.reason, page.more, page.frames.len()),
            (Some(Unrecoverable::Epoch), false, 0)
        );
        // Up to date.
        let mut done = read(1);
        done.top = 6;
        let page = Page::of(done, 3, None);
        assert_eq!((page.reason, page.more), (None, false));
    }
}
