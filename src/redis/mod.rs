//! Redis access, below every feature: connections and the versioned functions in
//! `migrations/` ([`conn`]), every key name ([`keys`]), the shapes of stream replies
//! ([`stream`]), and the reconnecting loop every stream reader runs ([`consumer`]). Knows
//! nothing of sessions, rooms or history.

pub mod conn;
pub mod consumer;
pub mod keys;
pub mod stream;

pub use conn::{
    FUNCTIONS, Redis, RedisConn, RedisError, func, is_connection_error, is_missing_function,
};
