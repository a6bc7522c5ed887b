//! Fuzzes the edge frame decoder (`wsbus::wire::client::parse_command`) and the frame encoders.
//!
//! Invariants checked (a violation panics, which libFuzzer reports as a crash):
//! - `parse_command` never panics, on any UTF-8 input;
//! - a parsed message's recipient (or room) is a valid id;
//! - `encode_message` (`encode_room_message`) of a parsed message is valid JSON with exactly the parsed fields, and
//!   parsing it again as a client frame yields the same command (the extra `from` is ignored);
//! - `encode_error` of any error's text (which can quote the client's action name) is valid
//!   JSON carrying that text unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use wsbus::wire::client::{Command, encode_error, encode_message, encode_room_message, parse_command};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    match parse_command(frame) {
        Ok(cmd) => {
            let (out, expected) = match &cmd {
                Command::Message { to, text } => {
                    assert!(wsbus::wire::ids::is_valid_id(to), "accepted recipient {to:?}");
                    let out = encode_message("fuzz-sender", to, text);
                    let expected = json!({"from": "fuzz-sender", "action": "message", "data": {"to": to, "text": text}});
                    (out, expected)
                }
                Command::RoomMessage { room, text } => {
                    assert!(wsbus::wire::ids::is_valid_id(room), "accepted room {room:?}");
                    let out = encode_room_message("fuzz-sender", room, text);
                    let expected = json!({"from": "fuzz-sender", "action": "room_message", "data": {"room": room, "text": text}});
                    (out, expected)
                }
                Command::Join { room } | Command::Leave { room } | Command::Members { room } => {
                    assert!(wsbus::wire::ids::is_valid_id(room), "accepted room {room:?}");
                    return;
                }
            };
            let v: Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("the encoder produced invalid JSON ({e}): {out:?}"));
            assert_eq!(v, expected);
            assert_eq!(parse_command(&out), Ok(cmd), "re-parsing {out:?}");
        }
        Err(err) => {
            let text = err.to_string();
            let out = encode_error("fuzz-own", &text);
            let v: Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("encode_error produced invalid JSON ({e}): {out:?}"));
            assert_eq!(
                v,
                json!({"from": "fuzz-own", "action": "error", "data": {"error": text}}),
            );
            let _ = err.kind();
        }
    }
});
