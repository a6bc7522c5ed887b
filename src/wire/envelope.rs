//! The bus envelope: what one node sends another through an inbox stream, as MessagePack,
//! and the two layouts of an inbox entry that carry envelopes.
//!
//! - **Single** (layout 1, the only one before packing): `from`, `to` and `action` as plain
//!   fields (so `redis-cli XRANGE` shows who talks to whom) and the envelope, MessagePack with
//!   named fields, in `env`. Every entry with one envelope is written this way, so a node of
//!   the previous version reads it.
//! - **Packed** (layout 2): `v` = `2`, `n` = how many envelopes, and `envs`, a MessagePack
//!   array of envelopes (each as in `env`). The bus writer puts everything one batch sends to
//!   one node into one entry: one `XADD` per destination node per batch instead of one per
//!   message. An array of whole envelopes (not a column per field) keeps writing to an
//!   append of each encoded envelope behind a fixed 5-byte header, and reading to one pass
//!   that borrows every string from the entry.
//!
//! Decoding only ever trusts `env` or `envs`; the plain fields and `n` are for people. An
//! entry whose `v` names a layout this version does not know is skipped as undecodable.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Stream field holding the MessagePack envelope of a single entry.
pub const ENVELOPE_FIELD: &str = "env";

/// Stream field naming a packed entry's layout; a single entry has none.
pub const VERSION_FIELD: &str = "v";

/// The layout version of a packed entry, in its `v` field.
pub const PACKED_VERSION: &str = "2";

/// Stream field of a packed entry: how many envelopes it holds (for people).
pub const COUNT_FIELD: &str = "n";

/// Stream field of a packed entry holding its envelopes, a MessagePack array.
pub const PACKED_FIELD: &str = "envs";

/// How many times an envelope may be forwarded after its recipient moved.
pub const MAX_HOPS: u8 = 1;

/// One message on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// Message id, increasing per origin node process (`boot`).
    pub id: u64,
    /// Random id of the origin node's process: (`boot`, `id`) names a message uniquely and
    /// lets receivers drop an entry appended twice (a Redis Cluster client retries a whole
    /// pipeline after `ASK`/`MOVED`, re-appending entries that had already succeeded).
    #[serde(default)]
    pub boot: u64,
    /// The node the sender is connected to; errors about this envelope go back there.
    #[serde(borrow)]
    pub origin: Cow<'a, str>,
    /// Sender user id.
    #[serde(borrow)]
    pub from: Cow<'a, str>,
    /// Recipient user id.
    #[serde(borrow)]
    pub to: Cow<'a, str>,
    /// How often this envelope was forwarded because its recipient had moved.
    pub hops: u8,
    /// When the message reached its sender's node (µs since the epoch; 0 = unknown).
    #[serde(default)]
    pub sent_us: u64,
    /// The sending session on the origin node: errors about this envelope go to it alone
    /// (0 = every session of the sender).
    #[serde(default)]
    pub origin_sid: u64,
    /// Deliver to the recipient's sessions on the receiving node.
    #[serde(default = "yes")]
    pub to_recipient: bool,
    /// Deliver a copy to the sender's sessions on the receiving node (a user with several
    /// sessions sees what it sent from any of them).
    #[serde(default, skip_serializing_if = "is_false")]
    pub to_sender: bool,
    /// Every node this message was appended to: a node that forwards it (its recipient
    /// moved) skips these, so no session gets it twice. Empty with one session per user.
    #[serde(borrow, default, skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<Cow<'a, str>>,
    /// The place of the frame it carries in its target's history stream (`--history`):
    /// `Publish`/`RoomPublish` bodies carry the frame already stamped with it.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<Stamp<'a>>,
    /// What it carries.
    #[serde(borrow)]
    pub body: Body<'a>,
}

/// A frame's place in a history stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp<'a> {
    /// The offset.
    pub offset: u64,
    /// The stream's epoch.
    #[serde(borrow)]
    pub epoch: Cow<'a, str>,
}

impl Stamp<'_> {
    /// Copies the epoch, detaching the stamp from its buffer.
    pub fn into_owned(self) -> Stamp<'static> {
        Stamp {
            offset: self.offset,
            epoch: Cow::Owned(self.epoch.into_owned()),
        }
    }
}

/// The payload of an envelope; its variant is the action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body<'a> {
    /// A direct message from `from` to `to`.
    Message {
        /// The text as the sender wrote it.
        #[serde(borrow)]
        text: Cow<'a, str>,
    },
    /// An error for user `to` (the original sender) about a message it sent.
    Error {
        /// The client-facing error text.
        #[serde(borrow)]
        error: Cow<'a, str>,
    },
    /// A message from `from` to every session in room `room` on the receiving node (`to`
    /// names the room too, for `redis-cli`).
    #[serde(rename = "room_message")]
    RoomMessage {
        /// The room.
        #[serde(borrow)]
        room: Cow<'a, str>,
        /// The text as the sender wrote it.
        #[serde(borrow)]
        text: Cow<'a, str>,
    },
    /// User `from` entered or left room `room`: tell its other members on the receiving node.
    Presence {
        /// The room.
        #[serde(borrow)]
        room: Cow<'a, str>,
        /// What happened.
        event: crate::wire::client::PresenceEvent,
    },
    /// A frame a backend published (HTTP API or ingress), encoded once by the node that took
    /// it: deliver it as it is to every session of user `to` on the receiving node. The
    /// entry's plain `action` field shows the frame's action.
    Publish {
        /// The frame, `{"from":F,"action":A,"data":D}`.
        #[serde(borrow)]
        frame: Cow<'a, str>,
    },
    /// A published frame for every session in room `room` on the receiving node.
    #[serde(rename = "room_publish")]
    RoomPublish {
        /// The room.
        #[serde(borrow)]
        room: Cow<'a, str>,
        /// The frame, `{"from":F,"action":A,"data":D}`.
        #[serde(borrow)]
        frame: Cow<'a, str>,
    },
    /// Close session `sid` of user `to` on the receiving node with close code `code` (its
    /// user connected elsewhere past the session limit, with `--on-session-limit replace`).
    Kick {
        /// The session to close.
        sid: u64,
        /// The close code.
        code: u16,
        /// The close frame's reason (empty: the code's usual one).
        #[serde(borrow, default, skip_serializing_if = "is_empty")]
        reason: Cow<'a, str>,
    },
    /// Join (or leave) room `room` with every session of user `to` on the receiving node, on
    /// a backend's behalf (`POST /api/join`, ingress `op=join`); answer the origin node with
    /// a [`Body::MemberReply`] naming `reply`.
    Member {
        /// The room.
        #[serde(borrow)]
        room: Cow<'a, str>,
        /// Join (`true`) or leave.
        join: bool,
        /// The origin node's id for the answer it waits for.
        reply: u64,
    },
    /// The answer to a [`Body::Member`]: how many sessions it applied to, and the client
    /// error text that refused it (empty: none).
    #[serde(rename = "member_reply")]
    MemberReply {
        /// The request's id on the receiving (origin) node.
        reply: u64,
        /// Sessions now in (or out of) the room.
        sessions: u32,
        /// Why a session could not join (`room 'x' is full`), empty if none.
        #[serde(borrow, default, skip_serializing_if = "is_empty")]
        error: Cow<'a, str>,
    },
}

fn yes() -> bool {
    true
}

fn is_empty(s: &str) -> bool {
    s.is_empty()
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Body<'_> {
    /// The action name, as in the stream's `action` field.
    pub fn action(&self) -> &'static str {
        match self {
            Body::Message { .. } => "message",
            Body::Error { .. } => "error",
            Body::RoomMessage { .. } => "room_message",
            Body::Presence { .. } => "presence",
            Body::Kick { .. } => "kick",
            Body::Publish { .. } => "publish",
            Body::RoomPublish { .. } => "room_publish",
            Body::Member { join: true, .. } => "join",
            Body::Member { join: false, .. } => "leave",
            Body::MemberReply { .. } => "member_reply",
        }
    }
}

/// Why an envelope could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The entry has no `env` field (nor, packed, `envs`).
    #[error("entry has no `{ENVELOPE_FIELD}` field")]
    Missing,
    /// The entry's `v` names a layout this version cannot read.
    #[error("unknown entry layout `{VERSION_FIELD}` = {0:?}")]
    UnknownVersion(String),
    /// The bytes are not a valid envelope.
    #[error("undecodable envelope: {0}")]
    Invalid(#[from] rmp_serde::decode::Error),
}

impl<'a> Envelope<'a> {
    /// Appends the MessagePack encoding to `out` (reuse one buffer across envelopes).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
        self.serialize(&mut ser)
            .expect("an envelope always serializes into a Vec");
    }

    /// Decodes an envelope, borrowing strings from `bytes` where it can. Nesting is capped
    /// (an envelope needs 3 levels): skipping a deeply nested foreign field costs kilobytes
    /// of stack per level, and a few hundred levels would overflow a worker's stack (found
    /// while fuzzing; `tests/fuzz_regressions.rs`).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        const MAX_DEPTH: usize = 32;
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        de.set_max_depth(MAX_DEPTH);
        Ok(Self::deserialize(&mut de)?)
    }

    /// Copies every borrowed string, detaching the envelope from its buffer.
    pub fn into_owned(self) -> Envelope<'static> {
        Envelope {
            id: self.id,
            boot: self.boot,
            origin: Cow::Owned(self.origin.into_owned()),
            from: Cow::Owned(self.from.into_owned()),
            to: Cow::Owned(self.to.into_owned()),
            hops: self.hops,
            sent_us: self.sent_us,
            origin_sid: self.origin_sid,
            to_recipient: self.to_recipient,
            to_sender: self.to_sender,
            tried: self
                .tried
                .into_iter()
                .map(|n| Cow::Owned(n.into_owned()))
                .collect(),
            stamp: self.stamp.map(Stamp::into_owned),
            body: match self.body {
                Body::Message { text } => Body::Message {
                    text: Cow::Owned(text.into_owned()),
                },
                Body::Error { error } => Body::Error {
                    error: Cow::Owned(error.into_owned()),
                },
                Body::RoomMessage { room, text } => Body::RoomMessage {
                    room: Cow::Owned(room.into_owned()),
                    text: Cow::Owned(text.into_owned()),
                },
                Body::Presence { room, event } => Body::Presence {
                    room: Cow::Owned(room.into_owned()),
                    event,
                },
                Body::Kick { sid, code, reason } => Body::Kick {
                    sid,
                    code,
                    reason: Cow::Owned(reason.into_owned()),
                },
                Body::Publish { frame } => Body::Publish {
                    frame: Cow::Owned(frame.into_owned()),
                },
                Body::RoomPublish { room, frame } => Body::RoomPublish {
                    room: Cow::Owned(room.into_owned()),
                    frame: Cow::Owned(frame.into_owned()),
                },
                Body::Member { room, join, reply } => Body::Member {
                    room: Cow::Owned(room.into_owned()),
                    join,
                    reply,
                },
                Body::MemberReply {
                    reply,
                    sessions,
                    error,
                } => Body::MemberReply {
                    reply,
                    sessions,
                    error: Cow::Owned(error.into_owned()),
                },
            },
        }
    }
}

/// Adds `XADD <inbox> NOMKSTREAM * from .. to .. action .. env ..` to `pipe`. (The length
/// cap is applied by the inbox owner's heartbeat, not per entry.)
pub fn append_entry(
    pipe: &mut redis::Pipeline,
    inbox: &str,
    from: &str,
    to: &str,
    action: &str,
    env: &[u8],
) {
    // Sized up front: a command grown arg by arg reallocates about ten times.
    const ARGS: usize = 12;
    let data = 24 + inbox.len() + from.len() + to.len() + action.len() + env.len();
    let mut cmd = redis::Cmd::with_capacity(ARGS, data);
    cmd.arg("XADD")
        .arg(inbox)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg("from")
        .arg(from)
        .arg("to")
        .arg(to)
        .arg("action")
        .arg(action)
        .arg(ENVELOPE_FIELD)
        .arg(env);
    pipe.add_command(cmd);
}

/// Adds `XADD <inbox> NOMKSTREAM * v 2 n <count> envs <array>` to `pipe`: a packed entry
/// (layout 2) holding `pack`'s envelopes. Fills in the array's header; `pack` is left as it
/// is for the caller to clear.
pub fn append_packed(pipe: &mut redis::Pipeline, inbox: &str, pack: &mut Pack) {
    let n = pack.n;
    let envs = pack.encoded();
    const ARGS: usize = 10;
    let data = 32 + inbox.len() + envs.len();
    let mut cmd = redis::Cmd::with_capacity(ARGS, data);
    cmd.arg("XADD")
        .arg(inbox)
        .arg("NOMKSTREAM")
        .arg("*")
        .arg(VERSION_FIELD)
        .arg(PACKED_VERSION)
        .arg(COUNT_FIELD)
        .arg(n)
        .arg(PACKED_FIELD)
        .arg(envs);
    pipe.add_command(cmd);
}

/// The `envs` of a packed entry being built: encoded envelopes appended one after another
/// behind a fixed-size array header (MessagePack `array 32`, valid for any length), which
/// is filled in when the entry is appended, so no envelope is encoded or copied twice.
#[derive(Debug, Default)]
pub struct Pack {
    /// The header, then the envelopes; empty until the first push.
    buf: Vec<u8>,
    /// Envelopes pushed.
    n: u32,
}

/// `array 32` marker and length.
const PACK_HEADER: usize = 5;

impl Pack {
    /// Adds one envelope.
    pub fn push(&mut self, env: &Envelope<'_>) {
        self.start();
        env.encode_into(&mut self.buf);
        self.n += 1;
    }

    /// How many envelopes it holds.
    pub fn len(&self) -> usize {
        self.n as usize
    }

    /// The bytes its buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The encoding of its only envelope, when it holds exactly one (such an entry is
    /// written single, readable by every version).
    pub fn single(&self) -> Option<&[u8]> {
        (self.n == 1).then(|| &self.buf[PACK_HEADER..])
    }

    /// The `envs` field's value: the array, header filled in.
    pub fn encoded(&mut self) -> &[u8] {
        self.seal();
        &self.buf
    }

    /// Empties it, keeping its buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.n = 0;
    }

    fn start(&mut self) {
        if self.buf.is_empty() {
            self.buf.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        }
    }

    fn seal(&mut self) {
        self.start();
        self.buf[1..PACK_HEADER].copy_from_slice(&self.n.to_be_bytes());
    }
}

/// Decodes the envelopes of one inbox entry, whichever its layout, appending them to `out`
/// in order; `field` gives a field's value. A packed entry is taken whole or not at all: on
/// an error `out` is as it was.
pub fn decode_entry<'a>(
    field: impl Fn(&str) -> Option<&'a [u8]>,
    out: &mut Vec<Envelope<'a>>,
) -> Result<(), DecodeError> {
    match field(VERSION_FIELD) {
        None => {
            let env = field(ENVELOPE_FIELD).ok_or(DecodeError::Missing)?;
            out.push(Envelope::decode(env)?);
            Ok(())
        }
        Some(v) if v == PACKED_VERSION.as_bytes() => {
            let envs = field(PACKED_FIELD).ok_or(DecodeError::Missing)?;
            let before = out.len();
            decode_packed(envs, out).inspect_err(|_| out.truncate(before))
        }
        Some(v) => Err(DecodeError::UnknownVersion(
            String::from_utf8_lossy(v).into_owned(),
        )),
    }
}

/// Decodes a packed entry's array of envelopes onto the end of `out`.
fn decode_packed<'a>(bytes: &'a [u8], out: &mut Vec<Envelope<'a>>) -> Result<(), DecodeError> {
    // One level more than a single envelope needs.
    const MAX_DEPTH: usize = 32;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    serde::de::DeserializeSeed::deserialize(Extend(out), &mut de)?;
    Ok(())
}

/// Deserializes an array of envelopes by pushing each onto a vector (no vector of its own).
struct Extend<'v, 'a>(&'v mut Vec<Envelope<'a>>);

impl<'de> serde::de::DeserializeSeed<'de> for Extend<'_, 'de> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Extend<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of envelopes")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(env) = seq.next_element::<Envelope<'de>>()? {
            self.0.push(env);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope<'static> {
        Envelope {
            id: 42,
            boot: 7,
            origin: "node-a".into(),
            from: "alice".into(),
            to: "bob".into(),
            hops: 0,
            sent_us: 1_700_000_000_000_000,
            origin_sid: 3,
            to_recipient: true,
            to_sender: true,
            tried: vec!["node-a".into(), "node-b".into()],
            stamp: Some(Stamp {
                offset: 17,
                epoch: "18c3f0a2b1-7f3a".into(),
            }),
            body: Body::Message {
                text: "hello ✓".into(),
            },
        }
    }

    #[test]
    fn round_trips() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        assert_eq!(Envelope::decode(&buf).unwrap(), sample());
        let err = Envelope {
            body: Body::Error {
                error: "User 'bob' not found".into(),
            },
            ..sample()
        };
        buf.clear();
        err.encode_into(&mut buf);
        assert_eq!(Envelope::decode(&buf).unwrap(), err);
        assert_eq!(err.body.action(), "error");
        let kick = Envelope {
            body: Body::Kick {
                sid: 9,
                code: 4006,
                reason: "".into(),
            },
            tried: Vec::new(),
            to_sender: false,
            ..sample()
        };
        buf.clear();
        kick.encode_into(&mut buf);
        assert_eq!(Envelope::decode(&buf).unwrap(), kick);
        for body in [
            Body::Member {
                room: "team".into(),
                join: true,
                reply: 5,
            },
            Body::MemberReply {
                reply: 5,
                sessions: 2,
                error: "room 'team' is full".into(),
            },
        ] {
            let env = Envelope {
                body,
                ..kick.clone()
            };
            buf.clear();
            env.encode_into(&mut buf);
            assert_eq!(Envelope::decode(&buf).unwrap().into_owned(), env);
        }
    }

    /// An envelope from a node of the previous version (no session fields) still decodes,
    /// as a message for the recipient only.
    #[test]
    fn decodes_envelopes_without_the_session_fields() {
        #[derive(Serialize)]
        struct V1<'a> {
            id: u64,
            boot: u64,
            origin: &'a str,
            from: &'a str,
            to: &'a str,
            hops: u8,
            sent_us: u64,
            body: Body<'a>,
        }
        let mut buf = Vec::new();
        let mut ser = rmp_serde::Serializer::new(&mut buf).with_struct_map();
        V1 {
            id: 1,
            boot: 2,
            origin: "a",
            from: "alice",
            to: "bob",
            hops: 0,
            sent_us: 5,
            body: Body::Message { text: "hi".into() },
        }
        .serialize(&mut ser)
        .unwrap();
        let env = Envelope::decode(&buf).unwrap();
        assert!(env.to_recipient && !env.to_sender && env.tried.is_empty());
        assert_eq!(env.origin_sid, 0);
    }

    /// The fields of an entry, as a lookup.
    fn lookup<'f>(fields: &'f [(&str, &'f [u8])]) -> impl Fn(&str) -> Option<&'f [u8]> {
        move |name| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    fn several() -> Vec<Envelope<'static>> {
        let room = Envelope {
            to: "team".into(),
            tried: Vec::new(),
            stamp: None,
            body: Body::RoomMessage {
                room: "team".into(),
                text: "hi all".into(),
            },
            ..sample()
        };
        let publish = Envelope {
            id: 44,
            hops: 1,
            body: Body::Publish {
                frame: r#"{"from":"api","action":"news","data":1}"#.into(),
            },
            ..sample()
        };
        vec![sample(), room, publish]
    }

    #[test]
    fn packed_entries_round_trip_in_order() {
        let mut pack = Pack::default();
        for env in several() {
            pack.push(&env);
        }
        assert_eq!(pack.len(), 3);
        assert!(pack.single().is_none());
        let envs = pack.encoded().to_vec();
        let fields = [("v", &b"2"[..]), ("n", b"3"), ("envs", &envs)];
        let mut out = Vec::new();
        decode_entry(lookup(&fields), &mut out).unwrap();
        assert_eq!(out, several());
        assert!(
            matches!(out[0].from, Cow::Borrowed(_)),
            "borrows from the entry"
        );

        // Reused: cleared, it packs anew; appended after what `out` held.
        pack.clear();
        pack.push(&several()[2]);
        let envs = pack.encoded().to_vec();
        let fields = [("v", &b"2"[..]), ("n", b"1"), ("envs", &envs)];
        decode_entry(lookup(&fields), &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out[3], several()[2]);
    }

    /// An entry with one envelope is written in the single layout, as the previous version
    /// wrote every entry, and read as before.
    #[test]
    fn a_pack_of_one_is_a_single_entry() {
        let mut pack = Pack::default();
        pack.push(&sample());
        let mut alone = Vec::new();
        sample().encode_into(&mut alone);
        assert_eq!(pack.single(), Some(&alone[..]));
        let fields = [("from", &b"alice"[..]), ("to", b"bob"), ("env", &alone)];
        let mut out = Vec::new();
        decode_entry(lookup(&fields), &mut out).unwrap();
        assert_eq!(out, vec![sample()]);
    }

    #[test]
    fn bad_entries_are_refused_whole() {
        let mut pack = Pack::default();
        for env in several() {
            pack.push(&env);
        }
        let envs = pack.encoded().to_vec();
        for cut in 1..envs.len() {
            let fields = [("v", &b"2"[..]), ("envs", &envs[..cut])];
            let mut out = vec![sample()];
            assert!(decode_entry(lookup(&fields), &mut out).is_err(), "{cut}");
            assert_eq!(out.len(), 1, "nothing of a broken entry is kept");
        }
        let mut out = vec![sample()];
        let future = [("v", &b"3"[..]), ("envs", &envs)];
        assert!(matches!(
            decode_entry(lookup(&future), &mut out),
            Err(DecodeError::UnknownVersion(v)) if v == "3"
        ));
        let no_envs = [("v", &b"2"[..]), ("env", &envs)];
        assert!(matches!(
            decode_entry(lookup(&no_envs), &mut out),
            Err(DecodeError::Missing)
        ));
        assert!(matches!(
            decode_entry(lookup(&[("_", b"_")]), &mut out),
            Err(DecodeError::Missing)
        ));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn borrows_strings_from_the_buffer() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        let env = Envelope::decode(&buf).unwrap();
        assert!(matches!(env.from, Cow::Borrowed(_)));
        assert!(matches!(
            env.body,
            Body::Message {
                text: Cow::Borrowed(_)
            }
        ));
    }

    #[test]
    fn rejects_garbage_and_truncation_without_panicking() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        for cut in 0..buf.len() {
            assert!(
                Envelope::decode(&buf[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        assert!(Envelope::decode(b"\xc1\xff\x00").is_err());
        assert!(Envelope::decode(b"{\"json\":1}").is_err());
    }
}
