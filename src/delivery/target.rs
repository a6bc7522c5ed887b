//! What a dispatch is: a message's origin, target and payload, and the plan that resolves a
//! target to the nodes that get one inbox entry each. The one path that carries it from any
//! origin to any target is [`crate::node::Node::send`] and [`crate::node::Node::publish`]
//! (in `node/dispatch.rs`); the bus writer finishes what is left for other nodes.

use std::sync::Arc;

use tungstenite::Utf8Bytes;

use crate::wire::client::PresenceEvent;
use crate::wire::ids::UserId;
/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every session of one user.
    User(Box<str>),
    /// Every session in one room.
    Room(Box<str>),
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text (a direct or a room message).
    Text(Box<str>),
    /// A user entered or left a room (for a room target; the origin's user is the subject).
    Presence(PresenceEvent),
    /// A whole frame encoded once by its origin (an API publish), delivered as it is to
    /// every session of the target.
    Frame {
        /// The frame's action (shown in the inbox entry's plain `action` field).
        action: Box<str>,
        /// The frame, `{"from":F,"action":A,"data":D}`.
        frame: Utf8Bytes,
    },
}

/// Who sent a message, so an error can be answered to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A client session on this node.
    Session {
        /// The sending user.
        user: UserId,
        /// The sending session.
        sid: u64,
    },
    /// This node on its own account (events about users of a node that died), for a user.
    Node {
        /// The user the message is about.
        user: Box<str>,
    },
    /// A backend (the HTTP API or the ingress stream) publishing as `from` (`@server` unless
    /// it named a user). Nothing is answered to it through the bus: it learns who was
    /// online from its reply.
    Api {
        /// The `from` of the frames it sends.
        from: Box<str>,
    },
    /// An entry another node sent whose recipient is not here (it moved): forwarded once.
    Forward {
        /// The node the sender is on.
        node: Box<str>,
        /// The sending user.
        user: Box<str>,
        /// The sending session on that node (0 = any).
        sid: u64,
        /// The original message id and process (kept, so the entry stays traceable).
        id: u64,
        /// The original sender process (see [`Envelope::boot`]).
        boot: u64,
        /// How often it was forwarded before.
        hops: u8,
        /// Nodes that already had it appended.
        tried: Vec<Box<str>>,
    },
}

impl Origin {
    /// The sending user.
    pub fn user(&self) -> &str {
        match self {
            Origin::Session { user, .. } => user.as_str(),
            Origin::Node { user } | Origin::Forward { user, .. } => user,
            Origin::Api { from } => from,
        }
    }
}

/// A message handed to the bus writer: what is left to do after local delivery.
#[derive(Debug)]
pub struct Dispatch {
    /// Who sent it.
    pub origin: Origin,
    /// Who it is for.
    pub target: Target,
    /// What it carries.
    pub payload: Payload,
    /// When the frame reached the cluster (µs since the epoch).
    pub born_us: u64,
    /// The recipient's sessions on this node already have it.
    pub delivered_here: bool,
    /// Copies go to the sender's sessions on other nodes too.
    pub echo: bool,
    /// Its place in its target's history stream, when it has one already (an entry
    /// forwarded after its recipient moved: its frame is stamped). With history on, a
    /// message without one is appended to the stream first.
    pub stamp: Option<crate::wire::envelope::Stamp<'static>>,
    /// Never kept in history, even with `--history` (presence events, relayed actions not
    /// in `--stored-relay-actions`): delivered to whoever is connected, without an offset.
    pub transient: bool,
}

/// Which nodes get an entry for one message, and what each delivers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One entry per node: (node, deliver to the recipient, deliver copies to the sender).
    pub entries: Vec<(Arc<str>, bool, bool)>,
    /// The recipient has a live session on some node other than this one (including nodes
    /// that already had the message).
    pub recipient_elsewhere: bool,
}

impl Plan {
    /// Plans the entries for a message whose recipient is on `recipient` nodes and whose
    /// sender is on `sender` nodes (both already filtered to live ones), skipping this node
    /// `me` and the nodes in `tried`.
    pub fn new(me: &str, recipient: &[Arc<str>], sender: &[Arc<str>], tried: &[Box<str>]) -> Self {
        let mut plan = Plan::default();
        let skip = |n: &Arc<str>| **n == *me || tried.iter().any(|t| **t == **n);
        for node in recipient.iter().filter(|n| ***n != *me) {
            plan.recipient_elsewhere = true;
            if !skip(node) && !plan.entries.iter().any(|(n, _, _)| n == node) {
                plan.entries.push((node.clone(), true, false));
            }
        }
        for node in sender.iter().filter(|n| !skip(n)) {
            match plan.entries.iter_mut().find(|(n, _, _)| n == node) {
                Some(entry) => entry.2 = true,
                None => plan.entries.push((node.clone(), false, true)),
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<Arc<str>> {
        ids.iter().map(|&n| Arc::from(n)).collect()
    }

    #[test]
    fn one_entry_per_node_with_what_it_delivers() {
        let plan = Plan::new("a", &nodes(&["a", "b", "c"]), &nodes(&["c", "d"]), &[]);
        assert!(plan.recipient_elsewhere);
        assert_eq!(
            plan.entries,
            vec![
                ("b".into(), true, false),
                ("c".into(), true, true),
                ("d".into(), false, true),
            ]
        );
    }

    #[test]
    fn skips_this_node_and_nodes_already_tried() {
        let plan = Plan::new("a", &nodes(&["a"]), &[], &[]);
        assert!(!plan.recipient_elsewhere);
        assert!(plan.entries.is_empty());
        let plan = Plan::new("c", &nodes(&["b", "d"]), &[], &["b".into(), "c".into()]);
        assert!(plan.recipient_elsewhere, "b has it already");
        assert_eq!(plan.entries, vec![("d".into(), true, false)]);
        let plan = Plan::new("c", &nodes(&["b"]), &[], &["b".into()]);
        assert!(plan.recipient_elsewhere && plan.entries.is_empty());
    }
}
