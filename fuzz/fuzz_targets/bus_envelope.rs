//! Fuzzes the bus envelope decoder (`wsbus::wire::envelope::Envelope::decode`, MessagePack).
//!
//! Invariants checked (a violation panics, which libFuzzer reports as a crash):
//! - `Envelope::decode` never panics, on any bytes;
//! - a decoded envelope re-encodes (`encode_into`) to bytes that decode to an equal envelope,
//!   and re-encoding that gives the same bytes (the encoding is canonical);
//! - `into_owned` keeps the envelope equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsbus::wire::envelope::{Body, Envelope};

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::decode(data) else {
        return;
    };
    let mut buf = Vec::new();
    env.encode_into(&mut buf);
    let again = Envelope::decode(&buf)
        .unwrap_or_else(|e| panic!("re-encoded envelope does not decode ({e}): {env:?}"));
    assert_eq!(again, env, "round trip changed the envelope");
    let mut buf2 = Vec::new();
    again.encode_into(&mut buf2);
    assert_eq!(buf2, buf, "encoding is not canonical");
    let action = env.body.action();
    assert!(matches!(
        (&env.body, action),
        (Body::Message { .. }, "message") | (Body::Error { .. }, "error")
    ));
    assert_eq!(env.clone().into_owned(), env);
});
