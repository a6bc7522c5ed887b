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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Value;

use crate::bus::BusError;
use crate::config::NodeConfig;
use crate::hub::SocketFrame;
use crate::keys::Keys;

/// Function names (library `wsbus_v3`).
pub mod func {
    /// Append frames to a user's stream (if it is alive or the user has a session) or a
    /// room's, and say where the target is.
    pub const APPEND: &str = "wsbus_v3_history_append";
    /// Read a stream's position (and the frames after an offset), refreshing its TTL.
    pub const OPEN: &str = "wsbus_v3_history_open";
}

/// How long a session holds a frame that came before an earlier offset of its stream
/// (it was sent by another node and is still on its way) before it reads the missing ones
/// from the stream.
pub const GAP_WAIT: Duration = Duration::from_millis(250);

/// Frames a session holds at most while waiting for a gap to close.
const MAX_HELD: usize = 4096;

/// Which stream of a session a frame belongs to: its user's (`None`) or a room's.
pub type StreamOf = Option<Arc<str>>;

/// A frame's place in its stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Seq {
    /// The room whose stream it is (`None`: the user's).
    pub room: StreamOf,
    /// Its offset there.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: Arc<str>,
    /// Nothing to write: the session sent this room message itself (which does not come
    /// back to its sender); only its offset counts.
    pub marker: bool,
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
    /// The user has no live stream and no session: nothing was stored.
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
        format!("{:x}-{:08x}", crate::node::now_ms(), mix as u32)
    }

    /// Records that Redis lost its data (the heartbeat found this node's registration gone):
    /// a stream missing since then was lost, not expired.
    pub fn redis_reset(&self) {
        self.reset_ms
            .store(crate::node::now_ms(), Ordering::Relaxed);
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
            .arg(kind);
        for frame in frames {
            cmd.arg(frame);
        }
    }

    /// Adds to an atomic (`MULTI`) pipeline on a single Redis the plain commands that append
    /// `frames` to `stream` (Redis numbers the entries `0-1`, `0-2`, …: contiguous offsets
    /// within the transaction), refresh its TTL, read its epoch and say where its target is:
    /// no function call, whose argument passing costs Redis more than the appends. Its
    /// `frames.len() + 4` replies parse with [`Appended::parse_plain`].
    pub fn add_plain_append<S: AsRef<str>>(
        &self,
        pipe: &mut redis::Pipeline,
        stream: Stream<'_>,
        frames: &[S],
    ) {
        let (history, meta) = self.stream_keys(stream);
        pipe.cmd("HGET").arg(&meta).arg("epoch");
        let trim = if self.keep < 100 { "=" } else { "~" };
        for frame in frames {
            pipe.cmd("XADD")
                .arg(&history)
                .arg("MAXLEN")
                .arg(trim)
                .arg(self.keep)
                .arg("0-*")
                .arg("frame")
                .arg(frame.as_ref());
        }
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
        bus: &crate::bus::Bus,
        stream: Stream<'_>,
        since: Option<u64>,
        limit: u32,
        create: bool,
    ) -> Result<Opened, BusError> {
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
        let mut conn = bus.conn().await?;
        let (reply,): (Value,) = bus.query(&mut conn, &pipe).await?;
        Opened::parse(reply)
    }

    /// Refreshes the TTL of the streams of `users` and `rooms` (those with sessions or
    /// members on this node), so a stream does not expire under a user who is connected but
    /// gets nothing for longer than `--history-ttl`. Plain `PEXPIRE`s (a missing key stays
    /// missing), pipelined in chunks.
    pub async fn keep_alive(
        &self,
        bus: &crate::bus::Bus,
        users: &[&str],
        rooms: &[&str],
    ) -> Result<(), BusError> {
        let streams = users
            .iter()
            .map(|u| Stream::User(u))
            .chain(rooms.iter().map(|r| Stream::Room(r)));
        let mut conn = bus.conn().await?;
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
    /// stream's meta was missing, so whether it is alive (and its epoch) is for the append
    /// function to decide: what the plain commands appended went to a stream without an
    /// epoch, which that function empties when it makes one.
    pub fn parse_plain(replies: &[Value]) -> Result<Option<Self>, BusError> {
        let (Some(epoch), Some(first), Some(nodes)) =
            (replies.first(), replies.get(1), replies.last())
        else {
            return Err(BusError::Reply("history append"));
        };
        let Some(epoch): Option<String> = redis::from_redis_value(epoch.clone())? else {
            return Ok(None);
        };
        let first: String = redis::from_redis_value(first.clone())?;
        let first = first
            .strip_prefix("0-")
            .and_then(|n| n.parse().ok())
            .ok_or(BusError::Reply("history entry id"))?;
        Ok(Some(Appended::Stored {
            first,
            epoch,
            nodes: redis::from_redis_value(nodes.clone())?,
        }))
    }

    /// Parses the reply of [`History::add_append`].
    pub fn parse(reply: Value) -> Result<Self, BusError> {
        let Value::Array(items) = reply else {
            return Err(BusError::Reply("history append"));
        };
        let mut items = items.into_iter();
        let first: u64 = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(BusError::Reply("history append")),
        };
        if first == 0 {
            return Ok(Appended::NoStream);
        }
        let epoch: String = match items.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => return Err(BusError::Reply("history append")),
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
    fn parse(reply: Value) -> Result<Self, BusError> {
        let Value::Array(items) = reply else {
            return Err(BusError::Reply("history open"));
        };
        if items.len() < 4 {
            return Err(BusError::Reply("history open"));
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

/// Where one stream of a session is: the next offset to hand the client, and frames that
/// came early.
struct Track {
    epoch: Arc<str>,
    next: u64,
    held: BTreeMap<u64, SocketFrame>,
    /// When the oldest held frame arrived.
    holding_since: Option<Instant>,
}

/// A gap a session should fill from its stream: offsets `from..until` are missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The stream (`None`: the user's).
    pub room: StreamOf,
    /// The first missing offset.
    pub from: u64,
    /// The first held offset after the gap.
    pub until: u64,
}

/// Hands a session's stream frames to its client in offset order, each once: a frame
/// already handed (a replay overlapping live delivery, a forwarded copy) is dropped, one
/// that came before an earlier offset (sent through another node) waits for it, at most
/// [`GAP_WAIT`], after which the session reads the missing ones from the stream
/// ([`Sequencer::gap`], [`Sequencer::fill`]).
#[derive(Default)]
pub struct Sequencer {
    tracks: HashMap<StreamOf, Track>,
}

impl Sequencer {
    /// Starts ordering `room`'s stream (`None`: the user's) after `top` in `epoch`.
    pub fn start(&mut self, room: StreamOf, epoch: &str, top: u64) {
        self.tracks.insert(
            room,
            Track {
                epoch: epoch.into(),
                next: top + 1,
                held: BTreeMap::new(),
                holding_since: None,
            },
        );
    }

    /// Stops ordering `room`'s stream (the session left it).
    pub fn stop(&mut self, room: &str) {
        self.tracks.remove(&Some(Arc::from(room)));
    }

    /// Takes one queued frame; pushes onto `out` what is ready to be written, in order.
    pub fn accept(&mut self, frame: SocketFrame, now: Instant, out: &mut Vec<SocketFrame>) {
        let Some(seq) = frame.seq.clone() else {
            out.push(frame);
            return;
        };
        let Some(track) = self.tracks.get_mut(&seq.room) else {
            // A stream this session does not order (not joined any more): as it comes.
            if !seq.marker {
                out.push(frame);
            }
            return;
        };
        if *seq.epoch != *track.epoch {
            // The stream's past was lost and it started again: follow the new epoch.
            for (_, held) in std::mem::take(&mut track.held) {
                push_unless_marker(out, held);
            }
            track.epoch = seq.epoch.clone();
            track.next = seq.offset;
            track.holding_since = None;
        }
        if seq.offset < track.next {
            metrics::counter!("wsbus_history_duplicates_dropped_total").increment(1);
            return;
        }
        if seq.offset > track.next {
            track.held.insert(seq.offset, frame);
            track.holding_since.get_or_insert(now);
            return;
        }
        track.next += 1;
        push_unless_marker(out, frame);
        track.release(out);
    }

    /// The gap that waited longest, if it waited [`GAP_WAIT`] (or too much is held).
    pub fn gap(&self, now: Instant) -> Option<Gap> {
        self.tracks.iter().find_map(|(room, track)| {
            let since = track.holding_since?;
            let (&until, _) = track.held.first_key_value()?;
            (now.duration_since(since) >= GAP_WAIT || track.held.len() >= MAX_HELD).then(|| Gap {
                room: room.clone(),
                from: track.next,
                until,
            })
        })
    }

    /// When the next gap is due to be filled, if any frame is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tracks
            .values()
            .filter_map(|t| t.holding_since)
            .min()
            .map(|since| since + GAP_WAIT)
    }

    /// Fills `gap` with `frames` read from its stream (offset, frame); what is still
    /// missing is lost (counted), and the held frames after it go out.
    pub fn fill(&mut self, gap: &Gap, frames: Vec<(u64, String)>, out: &mut Vec<SocketFrame>) {
        let Some(track) = self.tracks.get_mut(&gap.room) else {
            return;
        };
        let mut lost = 0;
        for (offset, frame) in frames {
            if offset >= track.next && offset < gap.until {
                lost += offset - track.next;
                track.next = offset + 1;
                out.push(SocketFrame::unmeasured(frame));
            }
        }
        if track.next < gap.until {
            lost += gap.until - track.next;
            track.next = gap.until;
        }
        if lost > 0 {
            metrics::counter!("wsbus_history_gap_messages_lost_total").increment(lost);
            tracing::debug!(room = ?gap.room, lost, until = gap.until, "gap not in history");
        }
        track.release(out);
    }

    /// The epoch and next offset of a stream (for a gap's read).
    pub fn position(&self, room: &StreamOf) -> Option<(Arc<str>, u64)> {
        self.tracks.get(room).map(|t| (t.epoch.clone(), t.next))
    }
}

impl Track {
    /// Hands out the held frames that are next in line.
    fn release(&mut self, out: &mut Vec<SocketFrame>) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            self.next += 1;
            push_unless_marker(out, entry.remove());
        }
        if self.held.is_empty() {
            self.holding_since = None;
        } else if self.held.len() < MAX_HELD {
            // Still waiting; the clock runs from the frame now first in line.
            self.holding_since = self.holding_since.or(Some(Instant::now()));
        }
    }
}

fn push_unless_marker(out: &mut Vec<SocketFrame>, frame: SocketFrame) {
    if !frame.seq.as_ref().is_some_and(|s| s.marker) {
        out.push(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(room: Option<&str>, offset: u64, epoch: &str, marker: bool) -> SocketFrame {
        SocketFrame {
            frame: format!("{offset}").into(),
            born_us: 0,
            seq: Some(Arc::new(Seq {
                room: room.map(Arc::from),
                offset,
                epoch: epoch.into(),
                marker,
            })),
        }
    }

    fn texts(out: &[SocketFrame]) -> Vec<String> {
        out.iter().map(|f| f.frame.to_string()).collect()
    }

    #[test]
    fn hands_frames_in_offset_order_once_each() {
        let mut seq = Sequencer::default();
        seq.start(None, "e", 3);
        let now = Instant::now();
        let mut out = Vec::new();
        // 3 was replayed already; 5 comes before 4; 4 twice.
        for offset in [3, 5, 4, 4, 6] {
            seq.accept(framed(None, offset, "e", false), now, &mut out);
        }
        assert_eq!(texts(&out), ["4", "5", "6"]);
        assert_eq!(seq.gap(now + GAP_WAIT), None);
    }

    #[test]
    fn a_gap_waits_then_is_filled_from_the_stream() {
        let mut seq = Sequencer::default();
        seq.start(Some("r".into()), "e", 0);
        let now = Instant::now();
        let mut out = Vec::new();
        seq.accept(framed(Some("r"), 1, "e", false), now, &mut out);
        seq.accept(framed(Some("r"), 4, "e", false), now, &mut out);
        assert_eq!(texts(&out), ["1"]);
        assert_eq!(seq.gap(now), None, "not yet overdue");
        assert_eq!(seq.next_deadline(), Some(now + GAP_WAIT));
        let gap = seq.gap(now + GAP_WAIT).expect("overdue");
        assert_eq!(
            gap,
            Gap {
                room: Some("r".into()),
                from: 2,
                until: 4
            }
        );
        // The stream still has 3 but lost 2: 3 and 4 go out, 2 is lost.
        seq.fill(&gap, vec![(3, "3".into()), (4, "4 again".into())], &mut out);
        assert_eq!(texts(&out), ["1", "3", "4"]);
        let mut out = Vec::new();
        let mut seq = Sequencer::default();
        seq.start(None, "e", 0);
        seq.accept(framed(None, 3, "e", false), now, &mut out);
        let gap = seq.gap(now + GAP_WAIT).unwrap();
        seq.fill(&gap, vec![(1, "1".into()), (2, "2".into())], &mut out);
        assert_eq!(texts(&out), ["1", "2", "3"]);
    }

    #[test]
    fn markers_advance_without_writing_and_new_epochs_restart() {
        let mut seq = Sequencer::default();
        seq.start(Some("r".into()), "e", 0);
        let now = Instant::now();
        let mut out = Vec::new();
        seq.accept(framed(Some("r"), 2, "e", false), now, &mut out);
        seq.accept(framed(Some("r"), 1, "e", true), now, &mut out);
        assert_eq!(texts(&out), ["2"]);
        seq.accept(framed(Some("r"), 1, "f", false), now, &mut out);
        seq.accept(framed(Some("r"), 2, "f", false), now, &mut out);
        assert_eq!(texts(&out), ["2", "1", "2"]);
        // Frames of streams not ordered, and frames without a place, pass.
        seq.accept(framed(Some("x"), 9, "e", false), now, &mut out);
        seq.accept(SocketFrame::unmeasured("plain"), now, &mut out);
        assert_eq!(texts(&out), ["2", "1", "2", "9", "plain"]);
    }

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
