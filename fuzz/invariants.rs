//! The invariants the fuzz targets check, one copy: `fuzz/fuzz_targets/*.rs` call these on
//! generated inputs, and `tests/fuzz_regressions.rs` (which includes this file with `#[path]`)
//! on the kept cases and on every seed of `fuzz/corpus/`. A violation panics, which libFuzzer
//! reports as a crash.

#![allow(dead_code, unreachable_pub)]

use serde_json::{Value, json};
use wsbus::wire::client::{
    ClientError, Command, encode_error, encode_message, encode_room_message, parse_command,
};
use wsbus::wire::envelope::{Body, Envelope, Pack, decode_entry};

/// The check a fuzz target runs on one input's bytes.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name (`fuzz/Cargo.toml`'s `[[bin]]`s), and their checks.
pub const TARGETS: [(&str, Check); 2] = [
    ("edge_frame", |data| {
        if let Ok(frame) = std::str::from_utf8(data) {
            let _ = check_frame(frame);
        }
    }),
    ("bus_envelope", |data| {
        let _ = check_envelope(data);
        check_packed(data);
    }),
];

/// `edge_frame`: parsing a client frame (with `typing` relayed) never panics; an accepted
/// recipient or room is a valid id; what the node would send back for it (a message, a room
/// message, a relay, or the error) is valid JSON carrying the same strings, and a message
/// parses back to the same command.
pub fn check_frame(frame: &str) -> Result<Command<'_>, ClientError> {
    let parsed = wsbus::wire::client::parse_command_relaying(frame, &["typing".to_owned()]);
    match &parsed {
        Ok(cmd) => {
            let (out, expected) = match cmd {
                Command::Message { to, text } => {
                    assert!(
                        wsbus::wire::ids::is_valid_id(to),
                        "accepted recipient {to:?}"
                    );
                    let out = encode_message("sender", to, text);
                    let expected = json!({"from": "sender", "action": "message", "data": {"to": to, "text": text}});
                    (out, expected)
                }
                Command::RoomMessage { room, text } => {
                    assert!(
                        wsbus::wire::ids::is_valid_id(room),
                        "accepted room {room:?}"
                    );
                    let out = encode_room_message("sender", room, text);
                    let expected = json!({"from": "sender", "action": "room_message", "data": {"room": room, "text": text}});
                    (out, expected)
                }
                Command::Relay { action, data, .. } => {
                    let out = wsbus::wire::client::encode_relay("sender", action, data);
                    let v: Value = serde_json::from_str(&out).expect("the encoder yields JSON");
                    let data: Value = serde_json::from_str(data).expect("data is JSON");
                    assert_eq!(v, json!({"from": "sender", "action": action, "data": data}));
                    return parsed;
                }
                Command::Join { room, .. }
                | Command::Leave { room }
                | Command::Members { room } => {
                    assert!(
                        wsbus::wire::ids::is_valid_id(room),
                        "accepted room {room:?}"
                    );
                    return parsed;
                }
                Command::History { room, .. } => {
                    assert!(
                        room.is_none_or(wsbus::wire::ids::is_valid_id),
                        "accepted room {room:?}"
                    );
                    return parsed;
                }
                Command::Recover(_) | Command::Refresh { .. } => return parsed,
                Command::Backend { .. } => unreachable!("no backend action is listed"),
            };
            let v: Value = serde_json::from_str(&out).expect("the encoder yields JSON");
            assert_eq!(v, expected);
            assert_eq!(parse_command(&out).as_ref(), Ok(cmd), "re-parsing {out:?}");
        }
        Err(err) => {
            let text = err.to_string();
            let out = encode_error("own", &text);
            let v: Value = serde_json::from_str(&out).expect("encode_error yields JSON");
            assert_eq!(
                v,
                json!({"from": "own", "action": "error", "data": {"error": text}})
            );
        }
    }
    parsed
}

/// What the `bus_envelope` fuzz target checks for one input: no panic, and a decoded envelope
/// survives an encode/decode round trip unchanged.
pub fn check_envelope(bytes: &[u8]) -> Option<Envelope<'_>> {
    let env = Envelope::decode(bytes).ok()?;
    let mut buf = Vec::new();
    env.encode_into(&mut buf);
    let again = Envelope::decode(&buf).expect("a re-encoded envelope decodes");
    assert_eq!(again, env);
    let mut buf2 = Vec::new();
    again.encode_into(&mut buf2);
    assert_eq!(buf2, buf, "the encoding is canonical");
    assert_eq!(env.clone().into_owned(), env);
    action_matches(&env);
    Some(env)
}

/// `bus_envelope`, the same bytes as a packed inbox entry's `envs` (`v` = `2`): decoding never
/// panics, and what decodes packs again into the same envelopes.
pub fn check_packed(bytes: &[u8]) {
    let entry = |envs: &[u8]| {
        let mut out = Vec::new();
        let fields = |name: &str| match name {
            "v" => Some(&b"2"[..]),
            "envs" => Some(envs),
            _ => None,
        };
        decode_entry(fields, &mut out).map(|()| {
            out.into_iter()
                .map(Envelope::into_owned)
                .collect::<Vec<_>>()
        })
    };
    let Ok(envs) = entry(bytes) else {
        return;
    };
    let mut pack = Pack::default();
    for env in &envs {
        pack.push(env);
    }
    let again = entry(pack.encoded()).expect("a re-packed entry decodes");
    assert_eq!(again, envs);
}

/// `bus_envelope` also checks that `body.action()` matches the variant.
fn action_matches(env: &Envelope<'_>) {
    assert!(matches!(
        (&env.body, env.body.action()),
        (Body::Message { .. }, "message") | (Body::Error { .. }, "error")
    ));
}
