//! What the application's backend talks to: the HTTP API ([`api`]: publish, disconnect,
//! lookups) and the Redis ingress stream ([`ingress`]), both origins of the one dispatch path.

pub mod api;
pub mod ingress;
