//! The events stream's entry format (`--events`): what users did, told to the application's
//! backend as plain fields a backend (or `redis-cli`) reads without decoding anything:
//! `type`, `user`, `node`, `session`, `ts`, then the fields of the type. Absent fields are
//! left out. docs/backend.md lists every field of every type.

use std::fmt;
use std::str::FromStr;

/// The type of an event (its `type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A session was registered (`sessions`: the user's session count).
    Connect,
    /// A session ended (`code`, `reason`), or its node was found dead.
    Disconnect,
    /// A session joined a room (`room`).
    Join,
    /// A session left a room (`room`).
    Leave,
    /// A direct message (`to`, `data`).
    Message,
    /// A room message (`room`, `data`).
    RoomMessage,
    /// A backend action (`action`, `data`), delivered to nobody.
    Action,
    /// An ingress entry was refused (`entry`, `reason`).
    IngressInvalid,
}

impl EventKind {
    /// Every kind, in the order of [`EventKind::bit`].
    pub const ALL: [EventKind; 8] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Join,
        EventKind::Leave,
        EventKind::Message,
        EventKind::RoomMessage,
        EventKind::Action,
        EventKind::IngressInvalid,
    ];

    /// The `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Join => "join",
            EventKind::Leave => "leave",
            EventKind::Message => "message",
            EventKind::RoomMessage => "room_message",
            EventKind::Action => "action",
            EventKind::IngressInvalid => "ingress_invalid",
        }
    }

    fn bit(self) -> u8 {
        1 << EventKind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// The kinds of event a node appends (`--events`): a set, empty when events are off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventKinds(u8);

impl EventKinds {
    /// No events (the default: the stream is not written).
    pub const NONE: EventKinds = EventKinds(0);

    /// Whether `kind` is on.
    pub fn has(self, kind: EventKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Whether any kind is on.
    pub fn any(self) -> bool {
        self.0 != 0
    }

    /// This set and `kind`.
    pub fn with(self, kind: EventKind) -> EventKinds {
        EventKinds(self.0 | kind.bit())
    }
}

impl FromStr for EventKinds {
    type Err = String;

    /// `all`, `none` (or empty), or a comma list of types.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut kinds = EventKinds::NONE;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            kinds = match name {
                "all" => EventKind::ALL.iter().fold(kinds, |k, &kind| k.with(kind)),
                "none" => kinds,
                _ => match EventKind::ALL.iter().find(|k| k.as_str() == name) {
                    Some(&kind) => kinds.with(kind),
                    None => {
                        let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                        return Err(format!(
                            "unknown event type {name:?}: use all, none or a list of {}",
                            known.join(", ")
                        ));
                    }
                },
            };
        }
        Ok(kinds)
    }
}

impl fmt::Display for EventKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = EventKind::ALL
            .iter()
            .filter(|k| self.has(**k))
            .map(|k| k.as_str())
            .collect();
        match on.len() {
            0 => f.write_str("none"),
            n if n == EventKind::ALL.len() => f.write_str("all"),
            _ => f.write_str(&on.join(",")),
        }
    }
}

/// One event, before the node adds its `node` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its type.
    pub kind: EventKind,
    /// The user it is about (empty: none, as for `ingress_invalid`).
    pub user: Box<str>,
    /// The node's session id (0: none).
    pub session: u64,
    /// The node the session is on, when it is not the one appending (a dead node's).
    pub node: Option<Box<str>>,
    /// When it happened (wall clock, ms since the epoch).
    pub ts: u64,
    /// The fields of its type, in order.
    pub fields: Vec<(&'static str, Box<str>)>,
}

impl Event {
    /// An event of `kind` about session `session` of `user`, now.
    pub fn new(kind: EventKind, user: &str, session: u64) -> Self {
        Self {
            kind,
            user: user.into(),
            session,
            node: None,
            ts: crate::wire::clock::now_ms(),
            fields: Vec::new(),
        }
    }

    /// Adds field `name`.
    pub fn field(mut self, name: &'static str, value: impl Into<Box<str>>) -> Self {
        self.fields.push((name, value.into()));
        self
    }

    /// The entry's fields in order, `node` being the appending node's id (unless the event
    /// names the session's node).
    pub fn entry<'a>(&'a self, node: &'a str) -> impl Iterator<Item = (&'a str, Field<'a>)> {
        let node = self.node.as_deref().unwrap_or(node);
        let user = (!self.user.is_empty()).then_some(("user", Field::Text(&self.user)));
        let session = (self.session != 0).then_some(("session", Field::Number(self.session)));
        [
            Some(("type", Field::Text(self.kind.as_str()))),
            user,
            Some(("node", Field::Text(node))),
            session,
            Some(("ts", Field::Number(self.ts))),
        ]
        .into_iter()
        .flatten()
        .chain(self.fields.iter().map(|(n, v)| (*n, Field::Text(v))))
    }
}

/// A field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// Text as it is.
    Text(&'a str),
    /// A number, written in decimal.
    Number(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kinds() {
        let all: EventKinds = "all".parse().unwrap();
        assert!(EventKind::ALL.iter().all(|k| all.has(*k)));
        assert_eq!(all.to_string(), "all");
        let some: EventKinds = "join, message".parse().unwrap();
        assert!(some.has(EventKind::Join) && some.has(EventKind::Message));
        assert!(!some.has(EventKind::Leave));
        assert_eq!(some.to_string(), "join,message");
        assert_eq!("none".parse::<EventKinds>(), Ok(EventKinds::NONE));
        assert_eq!("".parse::<EventKinds>(), Ok(EventKinds::NONE));
        assert!(!EventKinds::NONE.any());
        let err = "join,typo".parse::<EventKinds>().unwrap_err();
        assert!(err.contains("\"typo\""), "{err}");
    }

    #[test]
    fn lists_fields_in_order_leaving_out_absent_ones() {
        let mut ev = Event::new(EventKind::Message, "alice", 7).field("to", "bob");
        ev.ts = 5;
        let fields: Vec<_> = ev.entry("n1").collect();
        assert_eq!(
            fields,
            [
                ("type", Field::Text("message")),
                ("user", Field::Text("alice")),
                ("node", Field::Text("n1")),
                ("session", Field::Number(7)),
                ("ts", Field::Number(5)),
                ("to", Field::Text("bob")),
            ]
        );
        let ev = Event::new(EventKind::IngressInvalid, "", 0).field("entry", "1-1");
        let names: Vec<&str> = ev.entry("n1").map(|(n, _)| n).collect();
        assert_eq!(names, ["type", "node", "ts", "entry"]);
    }
}
