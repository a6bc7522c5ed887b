//! Integration tests: real `redis-server`s, real nodes, real WebSocket clients.

#[path = "../common/mod.rs"]
mod common;

mod admin;
mod api;
mod closing;
mod cluster;
mod errors;
mod faults;
mod history;
mod http;
mod ingress;
mod knobs;
mod messaging;
mod observability;
mod presence;
mod process;
mod resilience;
mod rooms;
mod security;
mod sessions;
