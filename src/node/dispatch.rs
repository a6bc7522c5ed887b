//! Dispatch: the one path from an origin to a target. A target resolves to a set of nodes;
//! this node delivers to its own sessions at once, and every other node with sessions of the
//! target gets one inbox entry (never one per session), through the bus writer.
//!
//! Every origin enters here: a client session ([`Node::send`]; a relayed action through
//! [`Node::publish`]), a backend through the HTTP API or the ingress stream ([`Origin::Api`],
//! [`Node::publish`] with a frame encoded once), and an inbox entry whose recipient moved
//! (re-dispatched by the inbox consumer with [`Origin::Forward`]). Errors go back to the
//! origin: the sending session's queue, or the origin node's inbox; a backend learns who was
//! offline from its reply instead.

use std::borrow::Cow;

use crate::cluster::presence::SessionRef;
use crate::delivery::target::{Dispatch, Origin, Payload, Target};
use crate::node::Node;
use crate::redis::RedisError;
use crate::wire::client::{
    ClientError, PresenceEvent, encode_message, encode_presence, encode_room_message,
};
use crate::wire::envelope::{Body, Envelope};
use crate::wire::frame::SocketFrame;
use crate::wire::ids::RoomId;
use tungstenite::Utf8Bytes;

impl Node {
    /// Sends a message from a session on this node to `target`: to its sessions here at once,
    /// and (through the bus writer) to the nodes that hold the rest. Waits only when the bus
    /// writer's queue is full.
    pub async fn send(
        &self,
        origin: Origin,
        target: Target,
        text: Cow<'_, str>,
        born_us: u64,
    ) -> Result<(), ClientError> {
        let mut built: Option<SocketFrame> = None;
        let frame = |origin: &Origin, target: &Target, payload: &Payload| {
            built
                .get_or_insert_with(|| {
                    let Payload::Text(text) = payload else {
                        unreachable!("send carries text");
                    };
                    let frame = match target {
                        Target::User(to) => encode_message(origin.user(), to, text),
                        Target::Room(room) => encode_room_message(origin.user(), room, text),
                    };
                    SocketFrame {
                        frame: frame.into(),
                        born_us,
                        seq: None,
                    }
                })
                .clone()
        };
        // The sender's other sessions get a copy of a direct message to someone else.
        let echo = self.config.multi_session()
            && matches!(&target, Target::User(to) if **to != *origin.user());
        if matches!(target, Target::Room(_)) {
            self.metrics.room_messages.increment(1);
        }
        let payload = Payload::Text(text.into_owned().into_boxed_str());
        self.route(origin, target, payload, frame, (echo, false), born_us)
            .await
    }

    /// Publishes a pre-encoded frame (from a backend, `Origin::Api`, or a client's relayed
    /// action) to every session of a user or every member of a room, through the same step
    /// as [`Node::send`]. The frame is encoded once by the caller. A `transient` frame (a
    /// relayed action not in `--stored-relay-actions`) is never kept in history.
    pub async fn publish(
        &self,
        origin: Origin,
        target: Target,
        (action, transient): (&str, bool),
        frame: &Utf8Bytes,
        born_us: u64,
    ) -> Result<(), ClientError> {
        // The one outbound size rule, before anything is sent or stored: a client's relay
        // cannot reach it (its frame is at most `--max-frame-bytes`); the API and ingress
        // refuse such a publish when they parse it.
        let limit = self.config.max_publish_frame_bytes();
        if frame.len() > limit {
            return Err(ClientError::FrameTooLarge(limit));
        }
        let socket_frame = |_: &Origin, _: &Target, _: &Payload| SocketFrame {
            frame: frame.clone(),
            born_us,
            seq: None,
        };
        let payload = Payload::Frame {
            action: action.into(),
            frame: frame.clone(),
        };
        self.route(
            origin,
            target,
            payload,
            socket_frame,
            (false, transient),
            born_us,
        )
        .await
    }

    /// Publishes a client's relayed action (`--relay-actions`): transient (never in history)
    /// unless it is one of `--stored-relay-actions`.
    pub async fn relay(
        &self,
        origin: Origin,
        target: Target,
        action: &str,
        frame: &Utf8Bytes,
        born_us: u64,
    ) -> Result<(), ClientError> {
        let stored = self.config.stored_relay_actions.iter().any(|a| a == action);
        self.publish(origin, target, (action, !stored), frame, born_us)
            .await
    }

    /// The one step behind every message: the target's sessions here get `frame` (built once,
    /// only if someone here gets it) at once
    /// (and, with `echo`, the sender's other sessions here); the bus writer takes the rest.
    /// With one session per user, a recipient found here is nowhere else, and Redis is
    /// skipped. A `transient` message goes out at once even with history on (no place in a
    /// stream to wait for).
    async fn route(
        &self,
        origin: Origin,
        target: Target,
        payload: Payload,
        mut frame: impl FnMut(&Origin, &Target, &Payload) -> SocketFrame,
        (echo, transient): (bool, bool),
        born_us: u64,
    ) -> Result<(), ClientError> {
        let sending_session = match &origin {
            Origin::Session { sid, .. } => Some(*sid),
            _ => None,
        };
        if self.history.is_some() && !transient {
            // The frame's place comes from its target's stream: the bus writer appends it
            // there first and then delivers it, here and elsewhere. Only the sender's copies
            // (no frame of its own streams) go out at once.
            if echo {
                self.echo_here(&origin, || frame(&origin, &target, &payload));
            }
            return self
                .to_bus(Dispatch {
                    origin,
                    target,
                    payload,
                    born_us,
                    delivered_here: false,
                    echo,
                    stamp: None,
                    transient,
                })
                .await;
        }
        let delivered_here = match &target {
            Target::User(to) => {
                let here = self
                    .hub
                    .deliver_user(to, None, || frame(&origin, &target, &payload));
                if echo {
                    self.echo_here(&origin, || frame(&origin, &target, &payload));
                }
                self.metrics
                    .delivered_local
                    .increment(u64::from(here.queued));
                if here.found() && !self.config.multi_session() {
                    // One session per user: the recipient is here and nowhere else.
                    if here.queued == 0 && sending_session.is_some() {
                        return Err(ClientError::RecipientTooSlow(to.to_string()));
                    }
                    self.answer_ack(&origin);
                    return Ok(());
                }
                here.found()
            }
            Target::Room(room) => {
                // A room message does not come back to the session that sent it.
                let queued = self.rooms.deliver(room, sending_session, None, || {
                    frame(&origin, &target, &payload)
                });
                self.metrics
                    .room_delivered_local
                    .increment(u64::from(queued));
                queued > 0
            }
        };
        self.to_bus(Dispatch {
            origin,
            target,
            payload,
            born_us,
            delivered_here,
            echo,
            stamp: None,
            transient,
        })
        .await
    }

    /// Copies a session's message to its user's other sessions here.
    fn echo_here(&self, origin: &Origin, frame: impl FnOnce() -> SocketFrame) {
        if let Origin::Session { sid, .. } = origin {
            self.hub.deliver_user(origin.user(), Some(*sid), frame);
        }
    }

    /// Tells the other members of `room` that `user` entered or left it (on every node).
    pub async fn send_presence(&self, room: &RoomId, user: &str, event: PresenceEvent) {
        self.rooms.deliver(room.as_str(), None, Some(user), || {
            SocketFrame::unmeasured(encode_presence(user, room.as_str(), event))
        });
        let sent = self
            .to_bus(Dispatch {
                origin: Origin::Node { user: user.into() },
                target: Target::Room(room.as_str().into()),
                payload: Payload::Presence(event),
                born_us: 0,
                delivered_here: true,
                echo: false,
                stamp: None,
                transient: true,
            })
            .await;
        if sent.is_err() {
            tracing::debug!(room = %room, user, "presence event not sent: the bus writer stopped");
        }
    }

    /// Hands what is left of a message to the bus writer (waits while its queue is full).
    async fn to_bus(&self, dispatch: Dispatch) -> Result<(), ClientError> {
        self.bus_writer
            .send(dispatch)
            .await
            .map_err(|_| ClientError::BusUnavailable)
    }

    /// Answers `error` to the origin of a message: the sending session here, or the sending
    /// node through its inbox (pushed onto `remote` by the caller's pipeline).
    pub fn answer_error(&self, origin: &Origin, error: &ClientError) -> Option<Envelope<'static>> {
        if matches!(origin, Origin::Api { .. }) {
            // Its reply already said who was offline; a user that left since is no error.
            return None;
        }
        error.count();
        let text = error.to_string();
        match origin {
            Origin::Api { .. } => None,
            Origin::Node { user } => {
                tracing::debug!(user = %user, error = %text, "a node's own message failed");
                None
            }
            Origin::Session { user, sid, ack } => {
                let frame =
                    crate::wire::client::encode_error_for(user.as_str(), &text, ack.as_deref());
                self.hub
                    .deliver_session(user.as_str(), *sid, SocketFrame::unmeasured(frame));
                None
            }
            Origin::Forward {
                node,
                user,
                sid,
                id,
                boot,
                hops,
                ..
            } => {
                let env = Envelope {
                    id: *id,
                    boot: *boot,
                    origin: Cow::Owned(node.to_string()),
                    from: Cow::Owned(user.to_string()),
                    to: Cow::Owned(user.to_string()),
                    hops: *hops,
                    sent_us: 0,
                    origin_sid: *sid,
                    to_recipient: true,
                    to_sender: false,
                    tried: Vec::new(),
                    stamp: None,
                    body: Body::Error {
                        error: Cow::Owned(text),
                    },
                };
                if **node == *self.id {
                    self.deliver_error(&env);
                    return None;
                }
                Some(env)
            }
        }
    }

    /// Acknowledges a client's frame (with an `id`) to its session: the message it carried
    /// was accepted (handed to Redis or to the sockets here).
    pub fn answer_ack(&self, origin: &Origin) {
        if let Origin::Session {
            user,
            sid,
            ack: Some(id),
        } = origin
        {
            let frame = crate::wire::client::encode_ack(user.as_str(), id);
            self.hub
                .deliver_session(user.as_str(), *sid, SocketFrame::unmeasured(frame));
        }
    }

    /// Delivers an error envelope to the session it names (or every session of its user).
    pub fn deliver_error(&self, env: &Envelope<'_>) {
        let Body::Error { error } = &env.body else {
            return;
        };
        let frame = SocketFrame::unmeasured(crate::wire::client::encode_error(&env.to, error));
        if env.origin_sid == 0 {
            self.hub.deliver_user(&env.to, None, || frame);
        } else {
            self.hub.deliver_session(&env.to, env.origin_sid, frame);
        }
    }

    /// An envelope this node sends on its own account about `user`, to that user's sessions
    /// on another node: a kick, a server-side membership change.
    pub fn control_envelope<'a>(&'a self, user: &'a str, body: Body<'a>) -> Envelope<'a> {
        Envelope {
            id: self.next_message_id(),
            boot: self.boot,
            origin: Cow::Borrowed(&self.id),
            from: Cow::Borrowed(user),
            to: Cow::Borrowed(user),
            hops: 0,
            sent_us: 0,
            origin_sid: 0,
            to_recipient: true,
            to_sender: false,
            tried: Vec::new(),
            stamp: None,
            body,
        }
    }

    /// Closes one session of `user` with `code` and `reason` (empty: the code's usual one),
    /// wherever it is: here through the hub,
    /// elsewhere with a `kick` entry in its node's inbox.
    pub async fn close_session(
        &self,
        user: &str,
        session: &SessionRef,
        code: u16,
        reason: &str,
    ) -> Result<(), RedisError> {
        if session.node == *self.id {
            self.hub.kick(user, session.sid, code, reason);
            return Ok(());
        }
        let env = self.control_envelope(
            user,
            Body::Kick {
                sid: session.sid,
                code,
                reason: Cow::Borrowed(reason),
            },
        );
        let mut buf = Vec::new();
        env.encode_into(&mut buf);
        let mut pipe = redis::pipe();
        crate::wire::envelope::append_entry(
            &mut pipe,
            &self.keys.inbox(&session.node),
            user,
            user,
            env.body.action(),
            &buf,
        );
        let mut conn = self.redis.shared_conn().await?;
        let sent = pipe
            .query_async::<()>(&mut conn)
            .await
            .map_err(RedisError::from);
        if let Err(e) = &sent
            && crate::redis::is_connection_error(e)
        {
            self.redis.reset_shared();
        }
        sent?;
        Ok(())
    }
}
