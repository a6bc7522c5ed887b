//! wsbus: WebSocket messaging that scales horizontally over Redis Streams.
//!
//! Clients connect to any node (`GET /ws/{user_id}`); any client can message any other by
//! user id, whichever node each is on. Data flow:
//!
//! ```text
//! client ─ws─▶ session (edge JSON) ─▶ recipient here? ─▶ hub ─▶ its session queue ─▶ socket
//!                                      │ no
//!                                      ▼
//!                     outbox (bus writer, pipelined lookups + XADDs)
//!                                      ▼
//!                     Redis stream P:inbox:<node>  (MessagePack envelopes)
//!                                      ▼
//!                     inbox (blocking XREAD, dedicated connection) ─▶ hub ─▶ socket
//! ```
//!
//! Modules, by what they own:
//! - [`config`]: every tunable and its default.
//! - [`protocol`]: the edge JSON, error texts and close codes (the one list of them).
//! - [`user`]: user and node ids.
//! - [`listener`]: the accept loop and connections before they upgrade (header timeout,
//!   head size, stalled and pending connections).
//! - [`edge`]: HTTP routes and the upgrade (auth, then claim before upgrade). [`auth`]: tokens.
//! - [`session`]: one connected client's task.
//! - [`hub`]: local sessions and non-blocking delivery.
//! - [`outbox`]: the bus writer. [`inbox`]: the inbox consumer.
//! - [`wire`]: the MessagePack envelope.
//! - [`presence`]: user → node registration. [`registry`]: nodes, heartbeats, reaping.
//! - [`bus`]: Redis connections and the functions in `migrations/`. [`keys`]: key names.
//! - [`node`]: a running node and its shutdown. [`dev`]: the local dev cluster.
//! - [`admin`]: read-only operator commands. [`telemetry`]: `/metrics`.

pub mod admin;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dev;
pub mod edge;
pub mod hub;
pub mod inbox;
pub mod keys;
pub mod listener;
pub mod node;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod telemetry;
pub mod user;
pub mod wire;

pub use config::NodeConfig;
pub use node::{NodeError, run};
