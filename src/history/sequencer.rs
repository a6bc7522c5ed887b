//! The session's sequencer: hands each history stream's frames to the client in offset order,
//! once each. A frame that overtook an earlier one (they came through different nodes) is
//! held for at most [`GAP_WAIT`]; then the gap is read from the stream. Pure logic, no Redis:
//! the session reads the gap and hands the frames back with [`Sequencer::fill`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::frame::{SocketFrame, StreamOf};

/// How long a session holds a frame that came before an earlier offset of its stream
/// (it was sent by another node and is still on its way) before it reads the missing ones
/// from the stream.
pub const GAP_WAIT: Duration = Duration::from_millis(250);

/// Frames a session holds at most while waiting for a gap to close.
const MAX_HELD: usize = 4096;

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
    use crate::wire::frame::Seq;

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
}
