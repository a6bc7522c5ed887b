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
mod faults;
mod history;
mod hostile_input;
mod http;
mod ingress;
mod messaging;
mod observability;
mod presence;
mod process;
mod resilience;
mod resume;
mod rooms;
mod security;
mod sessions;
