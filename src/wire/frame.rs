//! A frame on its way to a socket: the encoded JSON, when its message entered the cluster, and
//! its place in a history stream. The delivery side queues these; the session's sequencer
//! (history) orders them.

use std::sync::Arc;

use tungstenite::Utf8Bytes;

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

/// One frame queued for a session, with when its message entered the cluster.
#[derive(Debug, Clone)]
pub struct SocketFrame {
    /// The encoded JSON frame.
    pub frame: Utf8Bytes,
    /// When the message's frame reached its sender's node (µs since the epoch), for the
    /// end-to-end latency histogram; 0 for frames not measured (errors).
    pub born_us: u64,
    /// Its place in a history stream (`--history`), for the session's sequencer.
    pub seq: Option<Arc<Seq>>,
}

impl SocketFrame {
    /// A frame that is not measured.
    pub fn unmeasured(frame: impl Into<Utf8Bytes>) -> Self {
        Self {
            frame: frame.into(),
            born_us: 0,
            seq: None,
        }
    }
}
