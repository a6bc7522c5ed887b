//! Integration tests: real `redis-server`s, real nodes, real WebSocket clients.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod admin;
mod api;
mod closing;
mod cluster;
mod errors;
mod events;
mod fanout;
mod faults;
mod history;
mod history_bounds;
mod hostile_input;
mod http;
mod ingress;
mod knobs;
mod messaging;
mod observability;
mod outbound;
mod packing;
mod presence;
mod process;
mod resilience;
mod resume;
mod rooms;
mod security;
mod sessions;
