//! What the application's backend talks to: the HTTP API ([`api`]: publish, disconnect,
//! lookups) and the Redis ingress stream ([`ingress`]), both origins of the one dispatch path;
//! and what it hears: the events stream ([`events`]) its users' actions are appended to.

pub mod api;
pub mod events;
pub mod ingress;
