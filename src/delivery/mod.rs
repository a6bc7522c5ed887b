//! Local delivery, and what a dispatch is. The sessions on this node by user ([`hub`]), each
//! with its bounded socket queue ([`socket_queue`]); the rooms with members here ([`rooms`]);
//! and the dispatch's origin, target, payload and node plan ([`target`]); when tokens expire
//! ([`expiry`]). Nothing here waits on a socket or on Redis: the one path that uses these is
//! `node::dispatch`.

pub mod expiry;
pub mod hub;
pub mod rooms;
pub mod socket_queue;
pub mod target;
