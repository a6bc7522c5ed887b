//! The cluster's shared registry in Redis: which nodes are alive ([`live`]), this node's
//! registration, heartbeat and the reaper ([`registry`]), and where users' sessions and
//! rooms' members are ([`presence`]).

pub mod live;
pub mod presence;
pub mod registry;
