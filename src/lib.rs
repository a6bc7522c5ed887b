//! wsbus: WebSocket messaging that scales horizontally over Redis Streams.
//!
//! Clients connect to any node (`GET /ws/{user_id}`); any client can message any other by
//! user id, or a room, whichever node each is on. Data flow:
//!
//! ```text
//! origin (session | API publish | ingress entry | inbox entry whose recipient moved)
//!   └─▶ dispatch: target (user | room) ─▶ local sessions here ─▶ hub ─▶ socket queue ─▶ socket
//!                                     └─▶ other nodes with sessions/members of the target
//!                     bus writer (pipelined lookups, one XADD per destination node)
//!                                      ▼
//!                     Redis stream P:inbox:<node>  (MessagePack envelopes)
//!                                      ▼
//!                     inbox reader (blocking XREAD, dedicated connection) ─▶ hub / rooms ─▶ socket
//! ```
//!
//! Modules, by what they own:
//! - [`config`]: every tunable and its default.
//! - [`edge_protocol`]: the client-side JSON frames, error texts and close codes (the one list
//!   of them). [`envelope`]: the bus side, the MessagePack envelope in an inbox entry.
//! - [`user`]: user, room and node ids.
//! - [`listener`]: the accept loop and connections before they upgrade (header timeout,
//!   head size, stalled and pending connections).
//! - [`edge`]: HTTP routes and the upgrade (auth, then claim before upgrade). [`auth`]: tokens.
//!   [`websocket`]: the upgrade handshake and polite closes.
//! - [`session`]: one connected client's task. [`socket_queue`]: its bounded queue.
//! - [`hub`]: local sessions by user, non-blocking delivery. [`rooms`]: local room membership
//!   and the room operations.
//! - [`dispatch`]: the one path from any origin to any target. [`history`]: per-user and
//!   per-room streams (`--history`), offsets and epochs, recovery, and the session's
//!   in-order hand-over of stream frames.
//! - [`bus_writer`]: appends to other nodes' inboxes. [`inbox_reader`]: reads this node's.
//! - [`presence`]: sessions and room membership in Redis. [`registry`]: nodes, heartbeats,
//!   reaping.
//! - [`bus`]: Redis connections and the functions in `migrations/`. [`keys`]: key names.
//! - [`node`]: a node's shared state. [`server`]: starting, wiring and stopping its tasks.
//!   [`heartbeat`]: registration, liveness, reaping. [`dev`]: the local dev cluster.
//! - [`api`]: the HTTP API for backends (publish, disconnect, lookups), one more origin of
//!   dispatch.
//! - [`ingress`]: publishing through the Redis stream `P:ingress` (consumer group, claims of
//!   a dead node's entries), routed like an API publish.
//! - [`admin`]: read-only operator commands. [`telemetry`]: `/metrics`.

pub mod admin;
pub mod api;
pub mod auth;
pub mod bus;
pub mod bus_writer;
pub mod config;
pub mod dev;
pub mod dispatch;
pub mod edge;
pub mod edge_protocol;
pub mod envelope;
pub mod heartbeat;
pub mod history;
pub mod hub;
pub mod inbox_reader;
pub mod ingress;
pub mod keys;
pub mod listener;
pub mod node;
pub mod presence;
pub mod registry;
pub mod rooms;
pub mod server;
pub mod session;
pub mod socket_queue;
pub mod telemetry;
pub mod user;
pub mod websocket;

pub use config::NodeConfig;
pub use node::NodeError;
pub use server::run;
