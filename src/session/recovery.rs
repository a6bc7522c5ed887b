//! The history side of a session (`--history`): where its streams start, recovery on
//! connect, `recover` and `join` (replay, then the reply that ends it), the `history` action,
//! and filling the gaps its sequencer waited on from the streams.

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use std::time::Instant;

use super::{Direct, End, Link, Session};
use crate::history::{Gap, History, Stream, StreamOf, Unrecoverable};
use crate::redis::RedisError;
use crate::wire::client::{ClientError, Position, encode_frame};

/// Where a session's view of one of its streams starts.
pub struct StartAt {
    /// After this position.
    pub position: Position<'static>,
    /// The client asked for it (`since`): it is told how the recovery went.
    pub asked: bool,
}

impl StartAt {
    /// Where a session's view of `stream` starts (`None` with history off): after `asked`,
    /// the position the client gave, or else where the stream is now, read before the
    /// session registers (or joins the room) so that what is sent meanwhile reaches it too.
    pub async fn of(
        history: Option<&History>,
        stream: Stream<'_>,
        asked: Option<Position<'static>>,
    ) -> Result<Option<StartAt>, RedisError> {
        let Some(history) = history else {
            return Ok(None);
        };
        Ok(Some(match asked {
            Some(position) => StartAt {
                position,
                asked: true,
            },
            None => StartAt {
                position: history.position(stream).await?,
                asked: false,
            },
        }))
    }
}

impl Session {
    /// One of this session's streams: `room`'s, or its user's.
    fn stream<'a>(&'a self, room: Option<&'a str>) -> Stream<'a> {
        match room {
            Some(room) => Stream::Room(room),
            None => Stream::User(self.user.as_str()),
        }
    }

    /// With history on, before anything else is written: starts ordering the user's stream
    /// from its current position and, if the connect URL asked (`?since=&epoch=`), replays
    /// what the client missed and says how that went (`recovered`). The session is
    /// registered already, so a frame sent meanwhile is either in what is replayed or
    /// queued (the sequencer drops those it replayed): no gap, no duplicate.
    pub(super) async fn open_user_stream(&mut self, link: &mut Link) -> Result<(), End> {
        if self.node.history.is_none() {
            return Ok(());
        }
        let start = self.recover.take();
        let asked = start.as_ref().is_some_and(|s| s.asked);
        match self
            .recover_stream(None, start, "recovered", json!({}))
            .await
        {
            Ok(mut direct) => {
                if !asked {
                    // Frames sent while the session registered, but no `recovered`: the client
                    // asked for nothing.
                    direct.pop();
                }
                self.write_direct(link, direct).await
            }
            Err(error) => self.write_error(link, &error).await,
        }
    }

    /// Opens one stream of this session (`room`, or the user's own): starts ordering its
    /// frames (unless it already does) and, with a position `since`, replays what came after
    /// it. Returns the frames to write at once: the replay, then the `action` reply (`data`
    /// completed with the position, and the recovery's outcome when one was asked).
    pub(super) async fn recover_stream(
        &mut self,
        room: StreamOf,
        start: Option<StartAt>,
        action: &str,
        mut data: serde_json::Value,
    ) -> Result<Direct, ClientError> {
        let asked = start.as_ref().is_some_and(|s| s.asked);
        let since = start.map(|s| s.position);
        let node = self.node.clone();
        let Some(history) = &node.history else {
            return Err(ClientError::HistoryOff);
        };
        let stream = self.stream(room.as_deref());
        let opened = history
            .replay(stream, since.as_ref().map(|p| p.since))
            .await
            .map_err(|e| {
                tracing::warn!(user = %self.user, room = ?room, error = %e, "history read failed");
                ClientError::BusUnavailable
            })?;
        if self.seq.position(&room).is_none() {
            self.seq.start(room.clone(), &opened.epoch, opened.top);
        }
        let (epoch, next) = self.seq.position(&room).expect("started above");
        let mut direct = Direct::new();
        if let Some(since) = since {
            let outcome = match *epoch == *opened.epoch {
                true => history.recovery(since.since, &since.epoch, &opened),
                false => Err(Unrecoverable::Epoch),
            };
            let result = match outcome {
                Ok(()) => {
                    // Offsets from `next` on reach the client live (or did already).
                    direct.extend(
                        opened
                            .frames
                            .into_iter()
                            .filter(|(offset, _)| *offset < next)
                            .map(|(_, frame)| frame),
                    );
                    data["recovered"] = json!(true);
                    data["count"] = json!(direct.len());
                    "recovered"
                }
                Err(why) => {
                    data["recovered"] = json!(false);
                    data["reason"] = json!(why.as_str());
                    data["count"] = json!(0);
                    why.as_str()
                }
            };
            if asked {
                metrics::counter!("wsbus_recoveries_total", "result" => result).increment(1);
            } else {
                for field in ["recovered", "reason", "count"] {
                    if let Some(data) = data.as_object_mut() {
                        data.remove(field);
                    }
                }
            }
        }
        data["offset"] = json!(next - 1);
        data["epoch"] = json!(&*epoch);
        direct.push(encode_frame(self.user.as_str(), action, data));
        Ok(direct)
    }

    /// Answers `history`: the frames of the user's stream (or `room`'s) after `since`, at
    /// most `limit`, as a `history` reply (split over several frames where one would be
    /// over what the client may receive: see [`history_frames`]).
    pub(super) async fn history(
        &mut self,
        room: Option<&str>,
        since: u64,
        limit: u32,
        epoch: Option<&str>,
    ) -> Result<Direct, ClientError> {
        let node = self.node.clone();
        let Some(history) = &node.history else {
            return Err(ClientError::HistoryOff);
        };
        let stream = self.stream(room);
        let page = history
            .page(stream, since, limit, epoch)
            .await
            .map_err(|_| ClientError::BusUnavailable)?;
        // The position is this session's: the last offset it was sent. Frames of the stream
        // with a lower offset may still be on their way to it (the stream's top is ahead of
        // them); the reply is written at once, so every frame still queued comes after it.
        let stream_of: StreamOf = room.map(Into::into);
        let offset = match self.seq.position(&stream_of) {
            Some((e, next)) if *e == *page.epoch => next - 1,
            _ => page.top,
        };
        let mut data = json!({"since": since, "offset": offset, "epoch": page.epoch});
        if let Some(room) = room {
            data["room"] = json!(room);
        }
        if let Some(reason) = page.reason {
            data["reason"] = json!(reason.as_str());
        }
        let messages: Vec<(u64, Box<RawValue>)> = page
            .frames
            .into_iter()
            .filter_map(|(offset, frame)| Some((offset, RawValue::from_string(frame).ok()?)))
            .collect();
        let serde_json::Value::Object(head) = data else {
            unreachable!("built as an object above");
        };
        Ok(history_frames(
            self.user.as_str(),
            head,
            &messages,
            page.more,
            node.config.max_out_frame_bytes(),
        ))
    }

    /// Reads the gaps that waited [`crate::history::GAP_WAIT`] from their streams and
    /// writes what they let out.
    pub(super) async fn fill_gaps(&mut self, link: &mut Link) -> Result<(), End> {
        let now = Instant::now();
        while let Some(gap) = self.seq.gap(now) {
            let frames = self.read_gap(&gap).await;
            let mut ready = std::mem::take(&mut self.ready);
            self.seq.fill(&gap, frames, &mut ready);
            metrics::counter!("wsbus_history_gap_fills_total").increment(1);
            let written = self.write_ready(link, &mut ready).await;
            self.ready = ready;
            written?;
        }
        self.flush(link).await
    }

    /// The frames of a gap, from its stream (none if it cannot be read).
    pub(super) async fn read_gap(&self, gap: &Gap) -> Vec<(u64, String)> {
        let Some(history) = &self.node.history else {
            return Vec::new();
        };
        let stream = self.stream(gap.room.as_deref());
        match history.read_gap(stream, gap).await {
            Ok(opened)
                if self
                    .seq
                    .position(&gap.room)
                    .is_some_and(|(e, _)| *e == *opened.epoch) =>
            {
                opened.frames
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::debug!(user = %self.user, error = %e, "could not read a gap");
                Vec::new()
            }
        }
    }
}

/// A `history` frame, serialized with its messages as they were stored (not re-encoded).
#[derive(serde::Serialize)]
struct HistoryFrame<'a> {
    from: &'a str,
    action: &'static str,
    data: HistoryData<'a>,
}

#[derive(serde::Serialize)]
struct HistoryData<'a> {
    #[serde(flatten)]
    head: &'a Map<String, Value>,
    messages: &'a [&'a RawValue],
}

fn encode_history(own: &str, head: &Map<String, Value>, messages: &[&RawValue]) -> String {
    let frame = HistoryFrame {
        from: own,
        action: "history",
        data: HistoryData { head, messages },
    };
    serde_json::to_string(&frame).expect("a history frame serializes")
}

/// The `history` reply with `head` (`since`, `offset`, `epoch`, maybe `room` and `reason`)
/// and `messages`, over as many frames as keep each within `limit` bytes. Every part is a
/// `history` frame of its own: its `since` is the offset its messages follow, and all but
/// the last say `"more": true, "continues": true` (the next frame continues this reply);
/// the last says `more` as one frame would (whether the stream has more after it). The
/// `reason` is the first part's. A single message over the limit goes alone (and the
/// session closes with 1009 rather than write it).
pub(super) fn history_frames(
    own: &str,
    mut head: Map<String, Value>,
    messages: &[(u64, Box<RawValue>)],
    more: bool,
    limit: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = messages;
    loop {
        // The head's widest form (`more: true`, `continues`) with no message yet.
        head.insert("more".into(), json!(true));
        head.insert("continues".into(), json!(true));
        let mut size = encode_history(own, &head, &[]).len();
        let mut taken = 0;
        for (_, message) in rest {
            let add = message.get().len() + usize::from(taken > 0);
            if taken > 0 && size + add > limit {
                break;
            }
            size += add;
            taken += 1;
        }
        let (part, left) = rest.split_at(taken);
        if left.is_empty() {
            head.insert("more".into(), json!(more));
            head.remove("continues");
        }
        let part_messages: Vec<&RawValue> = part.iter().map(|(_, m)| &**m).collect();
        out.push(encode_history(own, &head, &part_messages));
        let Some((last, _)) = part.last().filter(|_| !left.is_empty()) else {
            return out;
        };
        head.insert("since".into(), json!(last));
        head.remove("reason");
        rest = left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(sizes: &[usize]) -> Vec<(u64, Box<RawValue>)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let text = format!(r#"{{"t":"{}","offset":{}}}"#, "x".repeat(n), i + 1);
                (i as u64 + 1, RawValue::from_string(text).unwrap())
            })
            .collect()
    }

    fn head() -> Map<String, Value> {
        let Value::Object(head) =
            json!({"since": 0, "offset": 9, "epoch": "e", "reason": "trimmed"})
        else {
            unreachable!()
        };
        head
    }

    #[test]
    fn one_frame_when_it_fits_as_before() {
        let frames = history_frames("bob", head(), &messages(&[10, 10]), false, 10_000);
        assert_eq!(frames.len(), 1);
        let v: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(v["action"], "history");
        assert_eq!(v["data"]["more"], false);
        assert_eq!(v["data"]["reason"], "trimmed");
        assert!(v["data"].get("continues").is_none());
        assert_eq!(v["data"]["messages"].as_array().unwrap().len(), 2);
        let empty = history_frames("bob", head(), &[], true, 10_000);
        let v: Value = serde_json::from_str(&empty[0]).unwrap();
        assert_eq!(
            (v["data"]["more"].clone(), v["data"]["messages"].clone()),
            (json!(true), json!([]))
        );
    }

    #[test]
    fn splits_over_frames_each_within_the_limit() {
        let limit = 500;
        let frames = history_frames(
            "bob",
            head(),
            &messages(&[150, 150, 150, 10, 500]),
            false,
            limit,
        );
        let parts: Vec<Value> = frames
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect();
        let offsets: Vec<Vec<u64>> = parts
            .iter()
            .map(|p| {
                p["data"]["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["offset"].as_u64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(offsets, vec![vec![1, 2], vec![3, 4], vec![5]]);
        for (frame, part) in frames.iter().zip(&parts).take(2) {
            assert!(frame.len() <= limit, "{}", frame.len());
            assert_eq!(
                (
                    part["data"]["more"].clone(),
                    part["data"]["continues"].clone()
                ),
                (json!(true), json!(true))
            );
        }
        assert!(
            frames[2].len() > limit,
            "a message over the limit goes alone"
        );
        assert_eq!(parts[2]["data"]["more"], false);
        assert!(parts[2]["data"].get("continues").is_none());
        let sinces: Vec<u64> = parts
            .iter()
            .map(|p| p["data"]["since"].as_u64().unwrap())
            .collect();
        assert_eq!(sinces, [0, 2, 4]);
        assert_eq!(parts[0]["data"]["reason"], "trimmed");
        assert!(parts[1]["data"].get("reason").is_none());
        // Packed as tightly as the limit allows: one more byte of limit changes nothing
        // that did not fit.
        let exact = history_frames(
            "bob",
            head(),
            &messages(&[150, 150]),
            false,
            frames[0].len(),
        );
        assert_eq!(exact.len(), 1);
        let short = history_frames(
            "bob",
            head(),
            &messages(&[150, 150]),
            false,
            frames[0].len() - 1,
        );
        assert_eq!(short.len(), 2);
    }
}
