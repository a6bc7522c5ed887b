//! The edge, where clients arrive: the accept loop and connections before they upgrade
//! ([`listener`]), the HTTP routes and the gates of a WebSocket connect ([`routes`]), and the
//! upgrade handshake ([`websocket`]). A session closes its socket politely itself
//! (`session::socket`).

pub mod listener;
pub mod routes;
pub mod websocket;
