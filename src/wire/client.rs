//! The edge protocol: JSON text frames between clients and a node, and every error text and
//! close code a client can see. This module is the single list of them; docs/protocol.md copies it.
//!
//! Client → server: `{"action": "<name>", "data": <object>}` (optionally `"id"`, answered with
//! an `ack` once accepted and echoed in an error the frame caused).
//! Server → client: `{"from": "<user id>", "action": "<name>", "data": <object>}`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::wire::ids::is_valid_id;

/// A room presence event: per user, not per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    /// The user's first session joined the room.
    Join,
    /// The user's last session left the room (leave, disconnect, or its node died).
    Leave,
}

impl PresenceEvent {
    /// The event's name in the `presence` frame.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceEvent::Join => "join",
            PresenceEvent::Leave => "leave",
        }
    }
}

/// WebSocket close codes a client can receive.
pub mod close {
    /// The node is shutting down (or restarting); reconnect, possibly to another node.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol: an unmasked frame, reserved bits set, an
    /// unknown opcode, a fragmented or oversized control frame, a bad close code or payload.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame exceeded the maximum frame size and the stream could not be resynchronised;
    /// or a frame for the client was over what it may receive (`--max-frame-bytes` × 2 +
    /// 1 KiB), which no path should make.
    pub const TOO_BIG: u16 = 1009;
    /// Another live session holds this user id (sent after the `not unique session` error).
    pub const NOT_UNIQUE: u16 = 4001;
    /// The client did not read its messages fast enough; its queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4002;
    /// The session lost its registration to another session of the same user (after Redis
    /// lost its data and another node claimed the id first).
    pub const SESSION_REPLACED: u16 = 4003;
    /// The client stopped answering pings.
    pub const PING_TIMEOUT: u16 = 4004;
    /// The client kept sending past its rate limit (a whole burst of refused frames).
    pub const RATE_LIMITED: u16 = 4005;
    /// The user connected once more past `--max-sessions-per-user` with
    /// `--on-session-limit replace`, and this was its oldest session; or a connect presented
    /// this session's resume secret (`?resume=`) and took it over.
    pub const REPLACED_BY_NEWER: u16 = 4006;
    /// A backend closed every session of the user through `POST /api/disconnect`; the close
    /// frame's reason is the one the backend gave (`disconnected by the server` without one).
    pub const DISCONNECTED: u16 = 4007;
    /// The connection's token passed its `exp` and the client did not `refresh` it first.
    pub const TOKEN_EXPIRED: u16 = 4008;
}

/// Every error a client can receive in an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The frame is not valid JSON.
    #[error("invalid JSON")]
    InvalidJson,
    /// The frame is JSON but not an object.
    #[error("frame must be a JSON object")]
    NotAnObject,
    /// An object with `action` or `data` twice.
    #[error("duplicate field in frame")]
    DuplicateField,
    /// No `action` field (or `null`).
    #[error("missing action")]
    MissingAction,
    /// `action` is not a string.
    #[error("action must be a string")]
    ActionNotString,
    /// `action` is `""`.
    #[error("empty action")]
    EmptyAction,
    /// An action this server does not know.
    #[error("unknown action '{0}'")]
    UnknownAction(String),
    /// `data` does not have the shape the action requires.
    #[error("malformed data: {0}")]
    MalformedData(&'static str),
    /// A recipient id outside the id alphabet.
    #[error("invalid recipient id")]
    InvalidRecipient,
    /// A binary frame; only text frames carry the protocol.
    #[error("binary frames are not supported")]
    BinaryFrame,
    /// A frame (or fragmented message) over the configured maximum.
    #[error("frame too large (max {0} bytes)")]
    FrameTooLarge(usize),
    /// The recipient is not connected anywhere.
    #[error("User '{0}' not found")]
    UserNotFound(String),
    /// Redis cannot be reached; the message was not sent.
    #[error("bus unavailable")]
    BusUnavailable,
    /// Another live session holds this user id.
    #[error("not unique session")]
    NotUniqueSession,
    /// The connection sends faster than its rate limit; the frame was dropped.
    #[error("rate limited")]
    RateLimited,
    /// A room id outside the id alphabet.
    #[error("invalid room id")]
    InvalidRoom,
    /// The session is not in that room (leave, room_message).
    #[error("not in room '{0}'")]
    NotInRoom(String),
    /// The room has `--max-room-members` members already.
    #[error("room '{0}' is full")]
    RoomFull(String),
    /// The session is in `--max-rooms-per-session` rooms already.
    #[error("too many rooms")]
    TooManyRooms,
    /// The recipient is being disconnected as a slow consumer; the message was dropped.
    #[error("User '{0}' is too slow; message dropped")]
    RecipientTooSlow(String),
    /// `history` or `recover` on a node running without `--history`.
    #[error("history is off")]
    HistoryOff,
    /// A connect URL's `since` that is not an offset (HTTP 400 before the upgrade).
    #[error("invalid since: expected an offset (an integer from 0 to 2^64-1)")]
    InvalidSince,
    /// `--room-access` refuses this client's join: not in its token's `rooms` claim
    /// (`token`), or clients may not join at all (`server`).
    #[error("not allowed to join room '{0}'")]
    NotAllowed(String),
    /// A `refresh` whose token does not check out (signature, expiry, another user); the
    /// connection keeps its current token.
    #[error("invalid token")]
    InvalidToken,
    /// A frame's `id` is neither a string of at most 64 characters nor an integer.
    #[error("invalid id: expected a string of at most 64 characters or an integer")]
    InvalidId,
}

impl ClientError {
    /// A short label for metrics (`wsbus_client_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::InvalidJson => "invalid_json",
            ClientError::NotAnObject => "not_an_object",
            ClientError::DuplicateField => "duplicate_field",
            ClientError::MissingAction => "missing_action",
            ClientError::ActionNotString => "action_not_string",
            ClientError::EmptyAction => "empty_action",
            ClientError::UnknownAction(_) => "unknown_action",
            ClientError::MalformedData(_) => "malformed_data",
            ClientError::InvalidRecipient => "invalid_recipient",
            ClientError::BinaryFrame => "binary_frame",
            ClientError::FrameTooLarge(_) => "frame_too_large",
            ClientError::UserNotFound(_) => "user_not_found",
            ClientError::BusUnavailable => "bus_unavailable",
            ClientError::NotUniqueSession => "not_unique_session",
            ClientError::RateLimited => "rate_limited",
            ClientError::InvalidRoom => "invalid_room",
            ClientError::NotInRoom(_) => "not_in_room",
            ClientError::RoomFull(_) => "room_full",
            ClientError::TooManyRooms => "too_many_rooms",
            ClientError::RecipientTooSlow(_) => "recipient_too_slow",
            ClientError::HistoryOff => "history_off",
            ClientError::InvalidSince => "invalid_since",
            ClientError::NotAllowed(_) => "not_allowed",
            ClientError::InvalidToken => "invalid_token",
            ClientError::InvalidId => "invalid_id",
        }
    }

    /// Counts this error in `wsbus_client_errors_total`.
    pub fn count(&self) {
        metrics::counter!("wsbus_client_errors_total", "kind" => self.kind()).increment(1);
    }
}

/// A parsed client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `message`: deliver `text` to user `to`.
    Message {
        /// Recipient user id (validated).
        to: &'a str,
        /// The text, unescaped.
        text: Cow<'a, str>,
    },
    /// `join`: enter room `room` (with `since`/`epoch`: and recover what it missed).
    Join {
        /// The room (validated).
        room: &'a str,
        /// Where the client's copy of the room's stream ends.
        since: Option<Position<'a>>,
    },
    /// `recover`: replay the user's stream after a position (the first-frame form of
    /// `?since=&epoch=`).
    Recover(Position<'a>),
    /// `history`: the frames of the user's stream (or a room's) after `since`.
    History {
        /// The room (validated), or the user's own stream.
        room: Option<&'a str>,
        /// Frames after this offset.
        since: u64,
        /// At most this many (0: only the position).
        limit: u32,
        /// The epoch the client knows, if any.
        epoch: Option<Cow<'a, str>>,
    },
    /// `leave`: leave room `room`.
    Leave {
        /// The room (validated).
        room: &'a str,
    },
    /// `room_message`: deliver `text` to every member of `room`.
    RoomMessage {
        /// The room (validated).
        room: &'a str,
        /// The text, unescaped.
        text: Cow<'a, str>,
    },
    /// A `--relay-actions` action: deliver `data` as it is to a user or a room.
    Relay {
        /// The action (one of `--relay-actions`).
        action: &'a str,
        /// Where it goes.
        to: RelayTo<'a>,
        /// `data` exactly as sent (a JSON object's text).
        data: &'a str,
    },
    /// `members`: list the users in `room`.
    Members {
        /// The room (validated).
        room: &'a str,
    },
    /// `refresh`: replace the connection's token before it expires.
    Refresh {
        /// The new token (checked like a connect token).
        token: Cow<'a, str>,
    },
    /// A `--backend-actions` action: appended to the events stream, delivered to nobody.
    Backend {
        /// The action (one of `--backend-actions`).
        action: &'a str,
        /// `data` exactly as sent (any JSON value; `null` when left out).
        data: &'a str,
    },
}

#[derive(Deserialize)]
struct RefreshData<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

/// A parsed client frame: its command, its `id` if it had one, and its `data` as sent.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The frame's `id` as JSON (a string or an integer), to echo in its `ack` or error.
    pub id: Option<FrameId>,
    /// What it asks for.
    pub command: Command<'a>,
    /// Its `data` exactly as sent (`null` when left out), for the events stream.
    pub data: &'a str,
}

/// A frame's `id`, as JSON text: a string of at most 64 characters, or an integer.
pub type FrameId = Arc<str>;

/// A frame refused: why, and its `id` when it had a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The error to answer.
    pub error: ClientError,
    /// The frame's `id`, echoed in the error's `data`.
    pub id: Option<FrameId>,
}

impl From<ClientError> for Refused {
    fn from(error: ClientError) -> Self {
        Refused { error, id: None }
    }
}

/// Longest string `id`, in characters.
pub const MAX_ID_CHARS: usize = 64;

#[derive(Deserialize)]
struct RoomData<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
}

/// A place in a history stream, as a client gives it: after offset `since` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    /// The last offset the client has.
    pub since: u64,
    /// The epoch of that offset.
    pub epoch: Cow<'a, str>,
}

impl Position<'_> {
    /// Copies the epoch, detaching the position from its frame.
    pub fn into_owned(self) -> Position<'static> {
        Position {
            since: self.since,
            epoch: Cow::Owned(self.epoch.into_owned()),
        }
    }
}

impl Position<'static> {
    /// The position in a connect URL's query (`since=<offset>&epoch=<epoch>`), if `since`
    /// is there. A `since` that is not an offset (`-1`, `abc`, past 2^64-1, empty) is an
    /// error; a missing `epoch` is empty (and recovers nothing).
    pub fn from_query(query: Option<&str>) -> Result<Option<Self>, ClientError> {
        let mut since = None;
        let mut epoch = String::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if let Some(v) = pair.strip_prefix("since=") {
                // `u64::from_str` takes a leading `+`; an offset is digits only.
                if !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ClientError::InvalidSince);
                }
                since = Some(v.parse::<u64>().map_err(|_| ClientError::InvalidSince)?);
            } else if let Some(v) = pair.strip_prefix("epoch=") {
                // Epochs are `[0-9a-f-]`: nothing to percent-decode in one of ours.
                epoch = v.chars().take(64).collect();
            }
        }
        Ok(since.map(|since| Position {
            since,
            epoch: Cow::Owned(epoch),
        }))
    }
}

/// The `resume` of a connect URL's query: `None` when absent, `Some("")` for `?resume=`
/// (the client asks for a secret), else the secret it presents (used as it is: a secret is
/// hex, with nothing to percent-decode).
pub fn resume_from_query(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|pair| pair.strip_prefix("resume"))
        .find_map(|rest| match rest {
            "" => Some(""),
            rest => rest.strip_prefix('='),
        })
}

#[derive(Deserialize)]
struct JoinData<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RecoverData<'a> {
    since: u64,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct HistoryData<'a> {
    // `&str`: serde borrows a `Cow` only outside an `Option` (see `RelayData`).
    #[serde(borrow, default)]
    room: Option<&'a str>,
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
}

/// Most frames one `history` request returns.
pub const MAX_HISTORY_LIMIT: u32 = 1000;

#[derive(Deserialize)]
struct RoomMessageData<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    action: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MessageData<'a> {
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
}

/// Actions a server frame can carry (or a client send) that no relayed action, API publish or
/// ingress entry may take: a client or a backend could otherwise forge them.
pub const RESERVED_ACTIONS: &[&str] = &[
    "ack",
    "welcome",
    "refreshed",
    "message",
    "room_message",
    "join",
    "leave",
    "members",
    "joined",
    "left",
    "presence",
    "error",
    "recover",
    "recovered",
    "history",
    "refresh",
];

/// Where a relayed action goes.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayTo<'a> {
    /// Every session of a user (validated id).
    User(&'a str),
    /// Every member of a room the sender is in (validated id).
    Room(&'a str),
}

#[derive(Deserialize)]
struct RelayData<'a> {
    // `&str`, not `Cow`: serde borrows a `Cow` only outside an `Option`. A valid id has no
    // escapes, and one with escapes fails here as malformed data.
    #[serde(borrow, default)]
    to: Option<&'a str>,
    #[serde(borrow, default)]
    room: Option<&'a str>,
}

/// Parses one client text frame (no relayed actions).
pub fn parse_command(frame: &str) -> Result<Command<'_>, ClientError> {
    parse_command_relaying(frame, &[])
}

/// Parses one client text frame; the actions in `relay` (`--relay-actions`) are relayed.
pub fn parse_command_relaying<'a>(
    frame: &'a str,
    relay: &[String],
) -> Result<Command<'a>, ClientError> {
    parse_frame(frame, relay, &[])
        .map(|f| f.command)
        .map_err(|r| r.error)
}

/// The `id` of a frame that is not parsed further (one refused by the rate limiter).
pub fn frame_id(frame: &str) -> Option<FrameId> {
    let raw: RawFrame<'_> = serde_json::from_str(frame).ok()?;
    parse_id(raw.id).ok().flatten()
}

/// A valid `id` as JSON text (`None` when absent or `null`).
fn parse_id(raw: Option<&RawValue>) -> Result<Option<FrameId>, ClientError> {
    let Some(raw) = raw.map(RawValue::get).filter(|r| *r != "null") else {
        return Ok(None);
    };
    if raw.starts_with('"') {
        let id: Cow<'_, str> = serde_json::from_str(raw).map_err(|_| ClientError::InvalidId)?;
        if id.chars().count() > MAX_ID_CHARS {
            return Err(ClientError::InvalidId);
        }
        let mut out = String::with_capacity(id.len() + 2);
        push_json_str(&mut out, &id);
        return Ok(Some(out.into()));
    }
    match serde_json::from_str::<serde_json::Number>(raw) {
        Ok(n) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string().into())),
        _ => Err(ClientError::InvalidId),
    }
}

/// Parses one client text frame: the actions in `relay` (`--relay-actions`) are relayed,
/// those in `backend` (`--backend-actions`) go to the backend.
pub fn parse_frame<'a>(
    frame: &'a str,
    relay: &[String],
    backend: &[String],
) -> Result<Frame<'a>, Refused> {
    let raw = parse_raw(frame)?;
    let id = parse_id(raw.id)?;
    let data = raw.data.map(RawValue::get).unwrap_or("null");
    match parse_action(&raw, relay, backend) {
        Ok(command) => Ok(Frame { id, command, data }),
        Err(error) => Err(Refused { error, id }),
    }
}

fn parse_raw(frame: &str) -> Result<RawFrame<'_>, ClientError> {
    let raw: RawFrame<'_> = serde_json::from_str(frame).map_err(|_| {
        let is_json = serde_json::from_str::<serde::de::IgnoredAny>(frame).is_ok();
        match (is_json, frame.trim_start().starts_with('{')) {
            (false, _) => ClientError::InvalidJson,
            (true, false) => ClientError::NotAnObject,
            // Valid JSON that still does not fit: a repeated `action` or `data` key.
            (true, true) => ClientError::DuplicateField,
        }
    })?;
    // serde also fills a struct from a JSON array; only objects are frames.
    if !frame.trim_start().starts_with('{') {
        return Err(ClientError::NotAnObject);
    }
    Ok(raw)
}

fn parse_action<'a>(
    raw: &RawFrame<'a>,
    relay: &[String],
    backend: &[String],
) -> Result<Command<'a>, ClientError> {
    let raw_action = raw.action.map(RawValue::get).unwrap_or("null");
    if raw_action == "null" {
        return Err(ClientError::MissingAction);
    }
    let action: Cow<'_, str> =
        serde_json::from_str(raw_action).map_err(|_| ClientError::ActionNotString)?;
    match &*action {
        "" => Err(ClientError::EmptyAction),
        "message" => parse_message(raw.data),
        "join" => parse_join(raw.data),
        "recover" => {
            let data: RecoverData<'_> = data_object(
                raw.data,
                r#"expected {"since": <offset>, "epoch": "<epoch>"}"#,
            )?;
            Ok(Command::Recover(Position {
                since: data.since,
                epoch: data.epoch.unwrap_or_default(),
            }))
        }
        "history" => parse_history(raw.data),
        "leave" => Ok(Command::Leave {
            room: parse_room(raw.data)?,
        }),
        "members" => Ok(Command::Members {
            room: parse_room(raw.data)?,
        }),
        "room_message" => parse_room_message(raw.data),
        "refresh" => {
            let data: RefreshData<'_> = data_object(raw.data, r#"expected {"token": "<jwt>"}"#)?;
            Ok(Command::Refresh { token: data.token })
        }
        // A listed action is a valid id, which has no escapes: its text in the frame, between
        // the quotes, is the action itself (borrowed from the frame).
        other if relay.iter().any(|a| a == other) && !raw_action.contains('\\') => {
            parse_relay(&raw_action[1..raw_action.len() - 1], raw.data)
        }
        other if backend.iter().any(|a| a == other) && !raw_action.contains('\\') => {
            Ok(Command::Backend {
                action: &raw_action[1..raw_action.len() - 1],
                data: raw.data.map(RawValue::get).unwrap_or("null"),
            })
        }
        other => Err(ClientError::UnknownAction(truncate(other, 64).to_owned())),
    }
}

fn parse_message(data: Option<&RawValue>) -> Result<Command<'_>, ClientError> {
    const SHAPE: &str = r#"expected {"to": "<user id>", "text": "<string>"}"#;
    let data = data.ok_or(ClientError::MalformedData(SHAPE))?;
    // serde would also fill the struct from an array (`["bob", "hi"]`); only objects count.
    if !data.get().starts_with('{') {
        return Err(ClientError::MalformedData(SHAPE));
    }
    let data: MessageData<'_> =
        serde_json::from_str(data.get()).map_err(|_| ClientError::MalformedData(SHAPE))?;
    // A valid id never contains an escape, so it is always borrowed from the frame.
    let to = match data.to {
        Cow::Borrowed(to) if is_valid_id(to) => to,
        _ => return Err(ClientError::InvalidRecipient),
    };
    Ok(Command::Message {
        to,
        text: data.text,
    })
}

/// `data` as an object of type `T`, or `malformed data: <shape>`.
fn data_object<'a, T: Deserialize<'a>>(
    data: Option<&'a RawValue>,
    shape: &'static str,
) -> Result<T, ClientError> {
    let data = data.ok_or(ClientError::MalformedData(shape))?;
    if !data.get().starts_with('{') {
        return Err(ClientError::MalformedData(shape));
    }
    serde_json::from_str(data.get()).map_err(|_| ClientError::MalformedData(shape))
}

/// A valid room id; a valid id never contains an escape, so it is borrowed from the frame.
fn valid_room(room: Cow<'_, str>) -> Result<&str, ClientError> {
    match room {
        Cow::Borrowed(room) if is_valid_id(room) => Ok(room),
        _ => Err(ClientError::InvalidRoom),
    }
}

fn parse_join(data: Option<&RawValue>) -> Result<Command<'_>, ClientError> {
    let data: JoinData<'_> = data_object(data, r#"expected {"room": "<room id>"}"#)?;
    Ok(Command::Join {
        room: valid_room(data.room)?,
        since: data.since.map(|since| Position {
            since,
            epoch: data.epoch.unwrap_or_default(),
        }),
    })
}

fn parse_history(data: Option<&RawValue>) -> Result<Command<'_>, ClientError> {
    const SHAPE: &str =
        r#"expected {"since": <offset>, "limit": 0..1000} (optionally with "room", "epoch")"#;
    // `data` may be left out: the user's stream from the start, 50 frames.
    let data: HistoryData<'_> = match data {
        None => HistoryData {
            room: None,
            since: None,
            limit: None,
            epoch: None,
        },
        data => data_object(data, SHAPE)?,
    };
    let limit = data.limit.unwrap_or(50);
    if limit > MAX_HISTORY_LIMIT {
        return Err(ClientError::MalformedData(SHAPE));
    }
    Ok(Command::History {
        room: data
            .room
            .map(|r| valid_room(Cow::Borrowed(r)))
            .transpose()?,
        since: data.since.unwrap_or(0),
        limit,
        epoch: data.epoch,
    })
}

fn parse_room(data: Option<&RawValue>) -> Result<&str, ClientError> {
    let data: RoomData<'_> = data_object(data, r#"expected {"room": "<room id>"}"#)?;
    valid_room(data.room)
}

fn parse_room_message(data: Option<&RawValue>) -> Result<Command<'_>, ClientError> {
    let data: RoomMessageData<'_> = data_object(
        data,
        r#"expected {"room": "<room id>", "text": "<string>"}"#,
    )?;
    Ok(Command::RoomMessage {
        room: valid_room(data.room)?,
        text: data.text,
    })
}

fn parse_relay<'a>(
    action: &'a str,
    data: Option<&'a RawValue>,
) -> Result<Command<'a>, ClientError> {
    const SHAPE: &str = r#"expected {"to": "<user id>", ...} or {"room": "<room id>", ...}"#;
    let target: RelayData<'_> = data_object(data, SHAPE)?;
    let to = match (target.to, target.room) {
        (Some(to), None) if is_valid_id(to) => RelayTo::User(to),
        (Some(_), None) => return Err(ClientError::InvalidRecipient),
        (None, Some(room)) => RelayTo::Room(valid_room(Cow::Borrowed(room))?),
        _ => return Err(ClientError::MalformedData(SHAPE)),
    };
    Ok(Command::Relay {
        action,
        to,
        data: data.expect("checked by data_object").get(),
    })
}

/// Encodes `{"from":F,"action":A,"data":DATA}` with `data` exactly as the sender wrote it.
pub fn encode_relay(from: &str, action: &str, data: &str) -> String {
    let mut out = String::with_capacity(32 + from.len() + action.len() + data.len());
    out.push_str(r#"{"from":"#);
    push_json_str(&mut out, from);
    out.push_str(r#","action":"#);
    push_json_str(&mut out, action);
    out.push_str(r#","data":"#);
    out.push_str(data);
    out.push('}');
    out
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes `{"from":F,"action":"message","data":{"to":T,"text":TEXT}}`, once per message.
pub fn encode_message(from: &str, to: &str, text: &str) -> String {
    let mut out = String::with_capacity(52 + from.len() + to.len() + text.len() + text.len() / 8);
    out.push_str(r#"{"from":"#);
    push_json_str(&mut out, from);
    out.push_str(r#","action":"message","data":{"to":"#);
    push_json_str(&mut out, to);
    out.push_str(r#","text":"#);
    push_json_str(&mut out, text);
    out.push_str("}}");
    out
}

/// Encodes `{"from":F,"action":"room_message","data":{"room":R,"text":TEXT}}`, once per
/// message.
pub fn encode_room_message(from: &str, room: &str, text: &str) -> String {
    let mut out = String::with_capacity(58 + from.len() + room.len() + text.len() + text.len() / 8);
    out.push_str(r#"{"from":"#);
    push_json_str(&mut out, from);
    out.push_str(r#","action":"room_message","data":{"room":"#);
    push_json_str(&mut out, room);
    out.push_str(r#","text":"#);
    push_json_str(&mut out, text);
    out.push_str("}}");
    out
}

/// Encodes `{"from":USER,"action":"presence","data":{"room":R,"event":"join"|"leave"}}`.
pub fn encode_presence(user: &str, room: &str, event: PresenceEvent) -> String {
    encode_frame(
        user,
        "presence",
        serde_json::json!({"room": room, "event": event.as_str()}),
    )
}

/// Encodes a server frame `{"from":F,"action":A,"data":DATA}` (not on a hot path).
pub fn encode_frame(from: &str, action: &str, data: serde_json::Value) -> String {
    serde_json::json!({"from": from, "action": action, "data": data}).to_string()
}

/// Encodes `{"from":OWN,"action":"welcome","data":{"session":"<node>:<sid>","resume":SECRET}}`,
/// the first frame of a session that asked for a resume secret.
pub fn encode_welcome(own: &str, node: &str, sid: u64, secret: &str) -> String {
    encode_frame(
        own,
        "welcome",
        serde_json::json!({"session": format!("{node}:{sid}"), "resume": secret}),
    )
}

/// Encodes `{"from":OWN,"action":"error","data":{"error":TEXT}}`.
pub fn encode_error(own: &str, error: &str) -> String {
    let mut out = String::with_capacity(48 + own.len() + error.len());
    out.push_str(r#"{"from":"#);
    push_json_str(&mut out, own);
    out.push_str(r#","action":"error","data":{"error":"#);
    push_json_str(&mut out, error);
    out.push_str("}}");
    out
}

/// Encodes `{"from":OWN,"action":"error","data":{"error":TEXT,"id":ID}}` (without `id` when
/// the frame had none).
pub fn encode_error_for(own: &str, error: &str, id: Option<&str>) -> String {
    let Some(id) = id else {
        return encode_error(own, error);
    };
    let mut out = encode_error(own, error);
    out.truncate(out.len() - 2);
    out.push_str(r#","id":"#);
    out.push_str(id);
    out.push_str("}}");
    out
}

/// Encodes `{"from":OWN,"action":"ack","data":{"id":ID}}`, `id` being JSON already.
pub fn encode_ack(own: &str, id: &str) -> String {
    let mut out = String::with_capacity(40 + own.len() + id.len());
    out.push_str(r#"{"from":"#);
    push_json_str(&mut out, own);
    out.push_str(r#","action":"ack","data":{"id":"#);
    out.push_str(id);
    out.push_str("}}");
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // Writing JSON into a String cannot fail and always yields UTF-8.
    let mut buf = std::mem::take(out).into_bytes();
    serde_json::to_writer(&mut buf, s).expect("serializing a str into a Vec cannot fail");
    *out = String::from_utf8(buf).expect("serde_json writes UTF-8");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(frame: &str) -> String {
        parse_command(frame).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_message() {
        let cmd = parse_command(r#"{"action":"message","data":{"to":"bob","text":"hi \"x\""}}"#);
        assert_eq!(
            cmd,
            Ok(Command::Message {
                to: "bob",
                text: Cow::Borrowed("hi \"x\"")
            })
        );
    }

    #[test]
    fn ignores_extra_fields() {
        let cmd =
            parse_command(r#"{"id":1,"action":"message","data":{"to":"b","text":"","x":[]}}"#);
        assert!(matches!(cmd, Ok(Command::Message { to: "b", .. })));
    }

    #[test]
    fn names_each_malformation() {
        assert_eq!(err("{"), "invalid JSON");
        assert_eq!(err("nope"), "invalid JSON");
        assert_eq!(err(""), "invalid JSON");
        assert_eq!(err("[1,2]"), "frame must be a JSON object");
        assert_eq!(err("\"s\""), "frame must be a JSON object");
        assert_eq!(err("{}"), "missing action");
        assert_eq!(err(r#"{"action":null}"#), "missing action");
        assert_eq!(err(r#"{"action":7}"#), "action must be a string");
        assert_eq!(err(r#"{"action":""}"#), "empty action");
        assert_eq!(err(r#"{"action":"fly","data":{}}"#), "unknown action 'fly'");
        let shape = r#"malformed data: expected {"to": "<user id>", "text": "<string>"}"#;
        assert_eq!(err(r#"{"action":"message"}"#), shape);
        assert_eq!(err(r#"{"action":"message","data":5}"#), shape);
        assert_eq!(err(r#"{"action":"message","data":["bob","x"]}"#), shape);
        assert_eq!(
            err(r#"{"action":"message","action":"message","data":{}}"#),
            "duplicate field in frame"
        );
        assert_eq!(err(r#"{"action":"message","data":{"to":"b"}}"#), shape);
        assert_eq!(
            err(r#"{"action":"message","data":{"to":"b","text":1}}"#),
            shape
        );
        assert_eq!(
            err(r#"{"action":"message","data":{"to":"a b","text":""}}"#),
            "invalid recipient id"
        );
        assert_eq!(
            err(r#"{"action":"message","data":{"to":"\u0062","text":""}}"#),
            "invalid recipient id"
        );
    }

    #[test]
    fn parses_room_commands_and_names_their_malformations() {
        assert_eq!(
            parse_command(r#"{"action":"join","data":{"room":"lobby","since":3}}"#),
            Ok(Command::Join {
                room: "lobby",
                since: Some(Position {
                    since: 3,
                    epoch: "".into()
                })
            })
        );
        assert_eq!(
            parse_command(r#"{"action":"leave","data":{"room":"lobby"}}"#),
            Ok(Command::Leave { room: "lobby" })
        );
        assert_eq!(
            parse_command(r#"{"action":"members","data":{"room":"a.b-c_d"}}"#),
            Ok(Command::Members { room: "a.b-c_d" })
        );
        assert_eq!(
            parse_command(r#"{"action":"room_message","data":{"room":"r","text":"hi"}}"#),
            Ok(Command::RoomMessage {
                room: "r",
                text: Cow::Borrowed("hi")
            })
        );
        let room_shape = r#"malformed data: expected {"room": "<room id>"}"#;
        assert_eq!(err(r#"{"action":"join"}"#), room_shape);
        assert_eq!(err(r#"{"action":"join","data":{"room":7}}"#), room_shape);
        assert_eq!(err(r#"{"action":"leave","data":["r"]}"#), room_shape);
        for bad in ["", ".", "..", "a b", "\\u0062"] {
            let frame = format!(r#"{{"action":"join","data":{{"room":"{bad}"}}}}"#);
            assert_eq!(err(&frame), "invalid room id", "{bad:?}");
        }
        assert_eq!(
            err(r#"{"action":"room_message","data":{"room":"r"}}"#),
            r#"malformed data: expected {"room": "<room id>", "text": "<string>"}"#
        );
        assert_eq!(
            err(r#"{"action":"room_message","data":{"room":"..","text":""}}"#),
            "invalid room id"
        );
        let frame: serde_json::Value =
            serde_json::from_str(&encode_room_message("a", "r", "x\"y")).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"from":"a","action":"room_message","data":{"room":"r","text":"x\"y"}})
        );
    }

    #[test]
    fn reads_since_and_resume_from_a_connect_query() {
        let at = |q: &str| Position::from_query(Some(q)).map(|p| p.map(|p| p.since));
        assert_eq!(at("since=7&epoch=e"), Ok(Some(7)));
        assert_eq!(at("token=x"), Ok(None));
        assert_eq!(Position::from_query(None), Ok(None));
        assert_eq!(at("since=18446744073709551615"), Ok(Some(u64::MAX)));
        for bad in [
            "since=-1",
            "since=abc",
            "since=",
            "since=+1",
            &format!("since={}", "9".repeat(30)),
        ] {
            assert_eq!(at(bad), Err(ClientError::InvalidSince), "{bad}");
        }
        assert_eq!(resume_from_query(Some("a=1&resume=")), Some(""));
        assert_eq!(resume_from_query(Some("resume")), Some(""));
        assert_eq!(resume_from_query(Some("resume=abc&x=1")), Some("abc"));
        assert_eq!(resume_from_query(Some("resumex=abc")), None);
        assert_eq!(resume_from_query(None), None);
    }

    #[test]
    fn unknown_action_names_are_truncated_on_a_char_boundary() {
        let long = format!(r#"{{"action":"{}","data":{{}}}}"#, "é".repeat(100));
        let text = err(&long);
        assert!(text.len() < 100, "{text}");
    }

    #[test]
    fn encodes_frames_as_valid_json() {
        let frame = encode_message("a", "b", "line\n\"quoted\" ✓");
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"from":"a","action":"message","data":{"to":"b","text":"line\n\"quoted\" ✓"}})
        );
        let v: serde_json::Value =
            serde_json::from_str(&encode_error("a", "User 'x' not found")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"from":"a","action":"error","data":{"error":"User 'x' not found"}})
        );
    }

    #[test]
    fn reads_ids_and_keeps_them_on_errors() {
        fn parse(f: &str) -> Result<Frame<'_>, Refused> {
            parse_frame(f, &[], &["order".to_owned()])
        }
        let frame = parse(r#"{"id":"a\u0062","action":"members","data":{"room":"r"}}"#).unwrap();
        assert_eq!(frame.id.as_deref(), Some(r#""ab""#));
        assert_eq!(frame.data, r#"{"room":"r"}"#);
        let frame = parse(r#"{"action":"members","id":-7,"data":{"room":"r"}}"#).unwrap();
        assert_eq!(frame.id.as_deref(), Some("-7"));
        assert_eq!(
            parse(r#"{"id":null,"action":"members","data":{"room":"r"}}"#)
                .unwrap()
                .id,
            None
        );
        let refused = parse(r#"{"id":5,"action":"fly"}"#).unwrap_err();
        assert_eq!(refused.error, ClientError::UnknownAction("fly".into()));
        assert_eq!(refused.id.as_deref(), Some("5"));
        let long = format!(
            r#"{{"id":"{}","action":"members","data":{{"room":"r"}}}}"#,
            "é".repeat(64)
        );
        assert!(parse(&long).is_ok(), "64 characters are fine");
        for bad in [
            format!(r#"{{"id":"{}","action":"members"}}"#, "x".repeat(65)),
            r#"{"id":1.5,"action":"members"}"#.to_owned(),
            r#"{"id":[1],"action":"members"}"#.to_owned(),
            r#"{"id":true,"action":"members"}"#.to_owned(),
        ] {
            assert_eq!(
                parse(&bad).unwrap_err(),
                Refused::from(ClientError::InvalidId),
                "{bad}"
            );
        }
        assert_eq!(
            frame_id(r#"{"id":"x","action":1}"#).as_deref(),
            Some(r#""x""#)
        );
        assert_eq!(frame_id("nope"), None);
        let v: serde_json::Value =
            serde_json::from_str(&encode_error_for("a", "rate limited", Some(r#""x\"y""#)))
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"from":"a","action":"error","data":{"error":"rate limited","id":"x\"y"}})
        );
        let v: serde_json::Value = serde_json::from_str(&encode_ack("a", "12")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"from":"a","action":"ack","data":{"id":12}})
        );
    }

    #[test]
    fn passes_backend_actions_on_with_their_data_as_sent() {
        let backend = vec!["order".to_owned()];
        let frame = parse_frame(
            r#"{"action":"order","data":{"sku": [1, 2]}}"#,
            &[],
            &backend,
        );
        assert_eq!(
            frame.unwrap().command,
            Command::Backend {
                action: "order",
                data: r#"{"sku": [1, 2]}"#
            }
        );
        let frame = parse_frame(r#"{"action":"order"}"#, &[], &backend).unwrap();
        assert_eq!(
            frame.command,
            Command::Backend {
                action: "order",
                data: "null"
            }
        );
        assert_eq!(
            parse_command(r#"{"action":"order","data":{}}"#),
            Err(ClientError::UnknownAction("order".into()))
        );
        assert!(RESERVED_ACTIONS.contains(&"ack"));
    }

    #[test]
    fn relays_listed_actions_with_their_data_as_sent() {
        let relay = vec!["typing".to_owned()];
        let frame = r#"{"action":"typing","data":{"to":"bob","state":"on","n":[1, 2]}}"#;
        assert_eq!(
            parse_command_relaying(frame, &relay),
            Ok(Command::Relay {
                action: "typing",
                to: RelayTo::User("bob"),
                data: r#"{"to":"bob","state":"on","n":[1, 2]}"#,
            })
        );
        assert_eq!(
            parse_command_relaying(r#"{"action":"typing","data":{"room":"lobby"}}"#, &relay),
            Ok(Command::Relay {
                action: "typing",
                to: RelayTo::Room("lobby"),
                data: r#"{"room":"lobby"}"#,
            })
        );
        assert_eq!(
            parse_command(frame).unwrap_err().to_string(),
            "unknown action 'typing'"
        );
        let shape =
            r#"malformed data: expected {"to": "<user id>", ...} or {"room": "<room id>", ...}"#;
        for bad in [
            r#"{"action":"typing","data":{"x":1}}"#,
            r#"{"action":"typing","data":{"to":"a","room":"b"}}"#,
            r#"{"action":"typing","data":[1]}"#,
            r#"{"action":"typing"}"#,
        ] {
            assert_eq!(
                parse_command_relaying(bad, &relay).unwrap_err().to_string(),
                shape,
                "{bad}"
            );
        }
        assert_eq!(
            parse_command_relaying(r#"{"action":"typing","data":{"to":"a b"}}"#, &relay),
            Err(ClientError::InvalidRecipient)
        );
        assert_eq!(
            encode_relay("alice", "typing", r#"{"to":"bob", "x":1}"#),
            r#"{"from":"alice","action":"typing","data":{"to":"bob", "x":1}}"#
        );
    }
}
