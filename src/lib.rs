//! wsbus: WebSocket messaging that scales horizontally over Redis Streams.
//!
//! Clients connect to any node (`GET /ws/{user_id}`); any client can message any other by
//! user id, or a room, whichever node each is on. Data flow:
//!
//! ```text
//! origin (session | API publish | ingress entry | inbox entry whose recipient moved)
//!   └─▶ node::dispatch: target (user | room) ─▶ local sessions ─▶ delivery::hub ─▶ socket queue ─▶ socket
//!                                           └─▶ other nodes with sessions/members of the target
//!                     bus::writer (pipelined lookups, one XADD per destination node)
//!                                      ▼
//!                     Redis stream P:inbox:<node>  (MessagePack envelopes, wire::envelope)
//!                                      ▼
//!                     bus::reader (blocking XREAD, dedicated connection) ─▶ delivery ─▶ socket
//! ```
//!
//! The tree is the architecture; imports point down (`tests/layers.rs` keeps them so):
//!
//! ```text
//! main, cli, dev                       the binary's commands
//! server                               starts, wires and stops a node's tasks (heartbeat too)
//! edge, backend                        where clients and the application's backend come in
//! session                              one connected client's task and its recovery
//! bus                                  the writer to other nodes' inboxes, the reader of ours
//! node                                 a node's shared state, and the one dispatch path
//! delivery, history, cluster           local sessions and rooms; history streams and the
//!                                      sequencer; the registry of nodes and sessions in Redis
//! redis, auth, config, telemetry       Redis access and keys; tokens; settings; metrics
//! wire                                 frames, envelopes, ids, clocks (imports nothing)
//! ```
//!
//! - [`wire`]: client frames, error texts and close codes (the one list), the bus envelope,
//!   ids, clocks.
//! - [`redis`]: connections, the functions in `migrations/`, key names, stream replies.
//! - [`config`]: every tunable and its default. [`auth`]: tokens. [`telemetry`]: `/metrics`.
//! - [`cluster`]: live nodes, this node's registration and reaping, sessions and room
//!   membership in Redis.
//! - [`history`]: per-user and per-room streams (`--history`), offsets and epochs, recovery,
//!   and the session's in-order hand-over of stream frames.
//! - [`delivery`]: local sessions by user, their socket queues, local rooms, what a
//!   dispatch is (origin, target, payload, node plan), and when tokens expire.
//! - [`node`]: a node's shared state, the dispatch path from any origin to any target, the
//!   room operations, and server-side joins and leaves (one inbox entry per node).
//! - [`bus`]: appends to other nodes' inboxes; reads this node's.
//! - [`session`]: one connected client's task, its recovery.
//! - [`edge`]: the listener, the HTTP routes and the gates of a connect, the upgrade.
//! - [`backend`]: the HTTP API for backends and the ingress stream.
//! - [`server`]: starting, wiring and stopping a node's tasks; the heartbeat.
//! - [`dev`]: the local dev cluster. [`cli`]: read-only operator commands.

pub mod auth;
pub mod backend;
pub mod bus;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod dev;
pub mod edge;
pub mod history;
pub mod node;
pub mod redis;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod wire;

pub use config::NodeConfig;
pub use node::NodeError;
pub use server::run;
