//! Wall clocks, the lowest layer: every other module takes its time from here.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock microseconds since the epoch (for end-to-end latency across nodes).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Wall-clock milliseconds since the epoch (for `since` fields; liveness uses Redis time).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
