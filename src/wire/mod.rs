//! The wire: what crosses a socket or the bus, and nothing else. Client frames, error texts
//! and close codes ([`client`]), the MessagePack envelope of an inbox entry ([`envelope`]),
//! a frame on its way to a socket ([`frame`]), an entry of the events stream ([`event`]),
//! user, room and node ids ([`ids`]) and wall clocks ([`clock`]). The lowest layer: it imports no other module of the crate.

pub mod client;
pub mod clock;
pub mod envelope;
pub mod event;
pub mod frame;
pub mod ids;
