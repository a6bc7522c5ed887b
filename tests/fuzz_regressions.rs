//! Regression inputs for the two decoders that see untrusted bytes: the edge frame decoder
//! (`protocol::parse_command`) and the bus envelope decoder (`wire::Envelope::decode`).
//!
//! The fuzz targets in `fuzz/` check the same invariants on generated inputs; this file keeps
//! the interesting cases (hand-picked adversarial inputs and anything the fuzzers found) in the
//! ordinary test suite, so they run without `cargo fuzz`.

use std::borrow::Cow;

use serde_json::{Value, json};
use wsbus::wire::client::{
    ClientError, Command, encode_error, encode_message, encode_room_message, parse_command,
};
use wsbus::wire::envelope::{Body, Envelope};

// ---------------------------------------------------------------------------------------------
// Edge frames
// ---------------------------------------------------------------------------------------------

/// What the `edge_frame` fuzz target checks for one frame: no panic, a parsed recipient is a
/// valid id, and whatever we would send back is valid JSON carrying the same strings.
fn check_frame(frame: &str) -> Result<Command<'_>, ClientError> {
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

fn frame_err(frame: &str) -> ClientError {
    check_frame(frame).expect_err(frame)
}

fn message(frame: &str) -> (String, String) {
    match check_frame(frame) {
        Ok(Command::Message { to, text }) => (to.to_owned(), text.into_owned()),
        Ok(other) => panic!("{frame:?} is not a message: {other:?}"),
        Err(e) => panic!("{frame:?} was rejected: {e}"),
    }
}

const SHAPE: &str = r#"expected {"to": "<user id>", "text": "<string>"}"#;

#[test]
fn deeply_nested_frames_are_rejected_not_overflowing_the_stack() {
    // serde_json stops at 128 levels, long before the stack is at risk.
    let brackets = "[".repeat(10_000);
    assert_eq!(frame_err(&brackets), ClientError::InvalidJson);
    // Balanced deep nesting is valid JSON (serde_json skips ignored values without
    // recursing), so it gets the usual errors.
    let closed = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(frame_err(&closed), ClientError::NotAnObject);
    let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    assert_eq!(frame_err(&objects), ClientError::MissingAction);
    let in_action = format!(r#"{{"action":{}"#, "[".repeat(10_000));
    assert_eq!(frame_err(&in_action), ClientError::InvalidJson);
    let in_data = format!(
        r#"{{"action":"message","data":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert_eq!(frame_err(&in_data), ClientError::MalformedData(SHAPE));
    // Nesting within the limit, in a field the server ignores, is fine.
    let shallow = format!(
        r#"{{"action":"message","data":{{"to":"bob","text":"t","x":{}{}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    assert_eq!(message(&shallow), ("bob".into(), "t".into()));
}

#[test]
fn huge_numbers_do_not_panic() {
    assert_eq!(
        frame_err(r#"{"action":1e999999999999}"#),
        ClientError::ActionNotString
    );
    assert_eq!(
        frame_err(&format!(r#"{{"action":{}}}"#, "9".repeat(10_000))),
        ClientError::ActionNotString
    );
    assert_eq!(
        frame_err(r#"{"action":"message","data":{"to":"bob","text":-1e-99999999}}"#),
        ClientError::MalformedData(SHAPE)
    );
    // Out of f64 range in an ignored field: skipped, not converted.
    assert_eq!(
        message(r#"{"action":"message","data":{"to":"bob","text":"t","n":1e400}}"#),
        ("bob".into(), "t".into())
    );
    // Within range, a large number in an ignored field is skipped.
    assert_eq!(
        message(r#"{"n":18446744073709551616,"action":"message","data":{"to":"b","text":""}}"#),
        ("b".into(), String::new())
    );
}

#[test]
fn surrogate_escapes() {
    // A lone surrogate is not a Unicode scalar value: rejected, not replaced.
    for text in [
        r"\ud800",
        r"\udfff",
        r"\ud83d\u0041",
        r"\ude00\ud83d",
        r"\ud83d",
    ] {
        let frame = format!(r#"{{"action":"message","data":{{"to":"bob","text":"{text}"}}}}"#);
        assert_eq!(
            frame_err(&frame),
            ClientError::MalformedData(SHAPE),
            "{text}"
        );
    }
    assert_eq!(
        frame_err(r#"{"action":"\ud800"}"#),
        ClientError::ActionNotString
    );
    assert_eq!(
        frame_err(r#"{"action":"message","data":{"to":"\ud800","text":""}}"#),
        ClientError::MalformedData(SHAPE)
    );
    // A proper pair is one character.
    let (_, text) = message(r#"{"action":"message","data":{"to":"bob","text":"\ud83d\ude00"}}"#);
    assert_eq!(text, "😀");
}

#[test]
fn control_characters_and_escapes_round_trip() {
    let (to, text) = message(
        r#"{"action":"message","data":{"to":"bob","text":"a\u0000b\u001f\"\\\/\b\f\n\r\t\u2028\u2029"}}"#,
    );
    assert_eq!(to, "bob");
    assert_eq!(text, "a\0b\u{1f}\"\\/\u{8}\u{c}\n\r\t\u{2028}\u{2029}");
    // Raw control characters inside a JSON string are invalid JSON.
    assert_eq!(
        frame_err("{\"action\":\"message\",\"data\":{\"to\":\"bob\",\"text\":\"a\nb\"}}"),
        ClientError::InvalidJson
    );
    // An escaped action name still names the action.
    assert_eq!(
        message(r#"{"action":"\u006dessage","data":{"to":"bob","text":"x"}}"#),
        ("bob".into(), "x".into())
    );
}

#[test]
fn wrong_types_and_extra_fields() {
    use ClientError::*;
    let cases: &[(&str, ClientError)] = &[
        ("", InvalidJson),
        (" \t\r\n", InvalidJson),
        ("\u{feff}{\"action\":\"message\"}", InvalidJson),
        (
            r#"{"action":"message","data":{"to":"bob","text":"x"}} x"#,
            InvalidJson,
        ),
        (
            r#"{"action":"message","data":{"to":"bob","text":"x"}}{}"#,
            InvalidJson,
        ),
        ("null", NotAnObject),
        ("[]", NotAnObject),
        (r#"["message",{"to":"bob","text":"x"}]"#, NotAnObject),
        ("  1e5", NotAnObject),
        (r#"{"action":{}}"#, ActionNotString),
        (r#"{"action":["message"]}"#, ActionNotString),
        (r#"{"action":true}"#, ActionNotString),
        (
            r#"{"action":null,"data":{"to":"bob","text":"x"}}"#,
            MissingAction,
        ),
        (r#"{"action":"","data":{}}"#, EmptyAction),
        (r#"{"action":"MESSAGE"}"#, UnknownAction("MESSAGE".into())),
        (r#"{"action":"message","data":null}"#, MalformedData(SHAPE)),
        (r#"{"action":"message","data":[]}"#, MalformedData(SHAPE)),
        (
            r#"{"action":"message","data":{"to":1,"text":"x"}}"#,
            MalformedData(SHAPE),
        ),
        (
            r#"{"action":"message","data":{"to":"bob","text":null}}"#,
            MalformedData(SHAPE),
        ),
        (
            r#"{"action":"message","data":{"to":"bob","text":["x"]}}"#,
            MalformedData(SHAPE),
        ),
        (
            r#"{"action":"message","data":{"to":"","text":"x"}}"#,
            InvalidRecipient,
        ),
        (
            r#"{"action":"message","data":{"to":"..","text":"x"}}"#,
            InvalidRecipient,
        ),
        (
            r#"{"action":"message","data":{"to":"a/b","text":"x"}}"#,
            InvalidRecipient,
        ),
        (
            r#"{"action":"message","data":{"to":"bób","text":"x"}}"#,
            InvalidRecipient,
        ),
    ];
    for (frame, want) in cases {
        assert_eq!(&frame_err(frame), want, "{frame}");
    }
    let long_id = format!(
        r#"{{"action":"message","data":{{"to":"{}","text":"x"}}}}"#,
        "a".repeat(10_000)
    );
    assert_eq!(frame_err(&long_id), InvalidRecipient);
    // Duplicate keys are valid JSON, but ambiguous; the frame is refused.
    assert_eq!(
        frame_err(r#"{"action":"message","action":"x","data":{"to":"b","text":""}}"#),
        DuplicateField
    );
    assert_eq!(
        frame_err(r#"{"action":"message","data":{"to":"b","to":"c","text":""}}"#),
        MalformedData(SHAPE)
    );
    // serde would fill a struct from an array; `data` must be an object like the frame.
    for array in [r#"["bob","x"]"#, r#"["bob","x","extra"]"#] {
        assert_eq!(
            frame_err(&format!(r#"{{"action":"message","data":{array}}}"#)),
            MalformedData(SHAPE)
        );
    }
    // Extra fields anywhere are ignored.
    assert_eq!(
        message(
            r#" {"id":[1,{"a":null}],"action":"message","data":{"x":{},"to":"b.c-d_9","text":"y","z":1}} "#
        ),
        ("b.c-d_9".into(), "y".into())
    );
}

#[test]
fn unknown_action_text_is_valid_json_in_the_error_frame() {
    // The action name is echoed back to the client inside an error frame; anything that
    // needs escaping must be escaped, and truncation must respect character boundaries.
    let name = format!("{}\"\\\u{0}\u{1f}😀", "é".repeat(31));
    let frame = json!({"action": name}).to_string();
    let ClientError::UnknownAction(echo) = frame_err(&frame) else {
        panic!("not an unknown action");
    };
    assert!(echo.len() <= 64 && name.starts_with(&echo), "{echo:?}");
}

// ---------------------------------------------------------------------------------------------
// Redis envelopes
// ---------------------------------------------------------------------------------------------

/// What the `bus_envelope` fuzz target checks for one input: no panic, and a decoded envelope
/// survives an encode/decode round trip unchanged.
fn check_envelope(bytes: &[u8]) -> Option<Envelope<'_>> {
    let env = Envelope::decode(bytes).ok()?;
    let mut buf = Vec::new();
    env.encode_into(&mut buf);
    let again = Envelope::decode(&buf).expect("a re-encoded envelope decodes");
    assert_eq!(again, env);
    let mut buf2 = Vec::new();
    again.encode_into(&mut buf2);
    assert_eq!(buf2, buf, "the encoding is canonical");
    assert_eq!(env.clone().into_owned(), env);
    Some(env)
}

/// The envelope `sample_fields` encodes. Built by decoding, so that fields added later with a
/// default (`#[serde(default)]`) need no change here.
fn sample() -> Envelope<'static> {
    let env = Envelope::decode(&mp_map(&sample_fields()))
        .expect("the sample decodes")
        .into_owned();
    assert_eq!((env.id, env.hops, env.sent_us), (7, 0, 1));
    assert_eq!((&*env.origin, &*env.from, &*env.to), ("n1", "alice", "bob"));
    assert_eq!(
        env.body,
        Body::Message {
            text: Cow::Borrowed("hi")
        }
    );
    env
}

fn encoded(env: &Envelope<'_>) -> Vec<u8> {
    let mut buf = Vec::new();
    env.encode_into(&mut buf);
    buf
}

/// MessagePack str header for `s` plus its bytes (fixstr or str8, enough for keys).
fn mp_str(s: &str) -> Vec<u8> {
    let mut out = if s.len() < 32 {
        vec![0xa0 | s.len() as u8]
    } else {
        vec![0xd9, u8::try_from(s.len()).expect("short string")]
    };
    out.extend_from_slice(s.as_bytes());
    out
}

/// A map with the given already-encoded (key, value) pairs.
fn mp_map(fields: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0x80 | u8::try_from(fields.len()).expect("fixmap")];
    for (k, v) in fields {
        out.extend(mp_str(k));
        out.extend_from_slice(v);
    }
    out
}

/// The sample envelope's fields, encoded one by one, so tests can swap, drop or add some.
fn sample_fields() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("id", vec![0x07]),
        ("origin", mp_str("n1")),
        ("from", mp_str("alice")),
        ("to", mp_str("bob")),
        ("hops", vec![0x00]),
        ("sent_us", vec![0x01]),
        (
            "body",
            mp_map(&[("message", mp_map(&[("text", mp_str("hi"))]))]),
        ),
    ]
}

fn with_field(name: &str, value: Vec<u8>) -> Vec<u8> {
    let fields: Vec<_> = sample_fields()
        .into_iter()
        .map(|(k, v)| {
            if k == name {
                (k, value.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    mp_map(&fields)
}

#[test]
fn the_hand_built_encoding_round_trips() {
    assert_eq!(check_envelope(&mp_map(&sample_fields())), Some(sample()));
    assert_eq!(check_envelope(&encoded(&sample())), Some(sample()));
}

#[test]
fn truncated_envelopes_are_errors() {
    let full = encoded(&sample());
    for cut in 0..full.len() {
        assert!(check_envelope(&full[..cut]).is_none(), "prefix of {cut}");
    }
    assert!(check_envelope(b"").is_none());
    assert!(check_envelope(b"\x80").is_none());
    assert!(check_envelope(b"\x90").is_none());
}

#[test]
fn huge_declared_lengths_are_errors_without_allocating() {
    let str32 = |rest: &[u8]| [&[0xdb, 0xff, 0xff, 0xff, 0xff][..], rest].concat();
    let bin32 = |rest: &[u8]| [&[0xc6, 0xff, 0xff, 0xff, 0xff][..], rest].concat();
    for (field, value) in [
        ("origin", str32(b"n1")),
        ("from", str32(b"")),
        ("to", bin32(b"bob")),
        (
            "body",
            mp_map(&[("message", mp_map(&[("text", str32(b"hi"))]))]),
        ),
        // A 4 Gi-element array and map in place of a string.
        ("to", vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xa1, b'x']),
        ("to", vec![0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1, b'x']),
    ] {
        let bytes = with_field(field, value);
        assert!(check_envelope(&bytes).is_none(), "{field}: {bytes:x?}");
    }
    // The envelope itself declared as a 4 Gi-entry map or array.
    assert!(check_envelope(b"\xdf\xff\xff\xff\xff\xa2id\x01").is_none());
    assert!(check_envelope(b"\xdd\xff\xff\xff\xff\x01\xa1a").is_none());
    // An ignored extra field declared huge.
    let mut fields = sample_fields();
    fields.push(("extra", vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0]));
    assert!(check_envelope(&mp_map(&fields)).is_none());
    fields.pop();
    fields.push(("extra", vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0x00]));
    assert!(check_envelope(&mp_map(&fields)).is_none());
}

/// `levels` nested one-element arrays (`open = 0x91`) or one-entry maps (`open = 0x81`,
/// key 0) around a nil.
fn nested(open: u8, levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * levels + 1);
    for _ in 0..levels {
        out.push(open);
        if open == 0x81 {
            out.push(0x00);
        }
    }
    out.push(0xc0);
    out
}

/// The sample envelope with `value` in an extra (ignored) field.
fn with_extra(value: Vec<u8>) -> Vec<u8> {
    let mut fields = sample_fields();
    fields.push(("extra", value));
    mp_map(&fields)
}

/// Runs `f` on a thread with a `stack`-byte stack (a Tokio worker has 2 MiB).
fn on_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no panic")
}

#[test]
fn deeply_nested_envelopes_are_errors() {
    // Given enough stack, rmp-serde's own limit (1024 levels) turns deep nesting into an error.
    on_stack(256 << 20, || {
        for open in [0x91, 0x81] {
            let deep = nested(open, 100_000);
            assert!(check_envelope(&with_extra(deep.clone())).is_none());
            assert!(check_envelope(&with_field("to", deep.clone())).is_none());
            assert!(check_envelope(&deep).is_none());
        }
    });
    // Modest nesting in an ignored field is fine, on a worker-sized stack.
    on_stack(2 << 20, || {
        for open in [0x91, 0x81] {
            let bytes = with_extra(nested(open, 16));
            assert_eq!(check_envelope(&bytes), Some(sample()));
        }
    });
}

/// Found while writing these cases (libFuzzer runs on an 8 MiB stack and missed it):
/// rmp-serde allows 1024 levels of nesting, but in a debug build, skipping an ignored field
/// a few hundred levels deep already overflows a 2 MiB stack (a Tokio worker's, where the
/// inbox decodes), which aborts the whole node. Release builds have a few times more room. `Envelope::decode` caps the depth.
#[test]
fn deeply_nested_envelopes_do_not_overflow_a_worker_stack() {
    on_stack(2 << 20, || {
        for open in [0x91, 0x81] {
            assert!(check_envelope(&with_extra(nested(open, 1023))).is_none());
            assert!(check_envelope(&with_extra(nested(open, 100_000))).is_none());
        }
    });
}

#[test]
fn wrong_types_are_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("id", mp_str("7")),
        ("id", vec![0xff]),                               // -1
        ("id", vec![0xcb, 0x40, 0x1c, 0, 0, 0, 0, 0, 0]), // 7.0 as f64
        ("id", vec![0xc0]),
        ("hops", vec![0xcc, 0xff]),       // 255 fits
        ("hops", vec![0xcd, 0x01, 0x00]), // 256 does not
        ("hops", vec![0xff]),
        ("origin", vec![0x07]),
        ("from", vec![0xc0]),
        ("to", vec![0xc3]),
        ("to", vec![0xa2, 0xff, 0xfe]),       // invalid UTF-8
        ("to", vec![0xc4, 0x02, 0xc3, 0x28]), // invalid UTF-8 as bin
        ("to", vec![0xd4, 0x01, 0x00]),       // fixext1
        ("sent_us", mp_str("1")),
        ("body", mp_str("message")),
        (
            "body",
            mp_map(&[("fly", mp_map(&[("text", mp_str("hi"))]))]),
        ),
        (
            "body",
            mp_map(&[("message", mp_map(&[("error", mp_str("hi"))]))]),
        ),
        (
            "body",
            mp_map(&[("message", mp_map(&[("text", vec![0x01])]))]),
        ),
        (
            "body",
            mp_map(&[
                ("message", mp_map(&[("text", mp_str("a"))])),
                ("error", mp_map(&[("error", mp_str("b"))])),
            ]),
        ),
        ("body", vec![0xc0]),
    ];
    for (field, value) in cases {
        let ok = field == "hops" && value == [0xcc, 0xff];
        let bytes = with_field(field, value);
        assert_eq!(check_envelope(&bytes).is_some(), ok, "{field}: {bytes:x?}");
    }
    // Not a map at all.
    for bytes in [&b"\xc0"[..], b"\x07", b"\xa3abc", b"\xc1", b"{\"id\":1}"] {
        assert!(check_envelope(bytes).is_none(), "{bytes:x?}");
    }
}

#[test]
fn missing_duplicate_and_extra_fields() {
    // Every field but `sent_us` is required.
    for drop in ["id", "origin", "from", "to", "hops", "body"] {
        let fields: Vec<_> = sample_fields()
            .into_iter()
            .filter(|(k, _)| *k != drop)
            .collect();
        assert!(check_envelope(&mp_map(&fields)).is_none(), "without {drop}");
    }
    let fields: Vec<_> = sample_fields()
        .into_iter()
        .filter(|(k, _)| *k != "sent_us")
        .collect();
    let bytes = mp_map(&fields);
    let env = check_envelope(&bytes).expect("sent_us is optional");
    assert_eq!(env.sent_us, 0);

    let mut fields = sample_fields();
    fields.push(("to", mp_str("mallory")));
    assert!(
        check_envelope(&mp_map(&fields)).is_none(),
        "duplicate field"
    );

    // Unknown fields (from a newer node) are ignored, whatever they hold.
    let mut fields = sample_fields();
    fields.push((
        "trace",
        mp_map(&[("a", vec![0x93, 0xc0, 0xc3, 0xa1, b'x'])]),
    ));
    fields.push(("ext", vec![0xd6, 0xff, 0, 0, 0, 1]));
    fields.push(("f", vec![0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 1])); // NaN
    assert_eq!(check_envelope(&mp_map(&fields)), Some(sample()));

    // The positional (array) form: rmp-serde accepts it; whether this one matches depends on
    // the field order, so only check the invariants.
    let array: Vec<u8> = [vec![0x97]]
        .into_iter()
        .chain(sample_fields().into_iter().map(|(_, v)| v))
        .flatten()
        .collect();
    let _ = check_envelope(&array);
}

#[test]
fn error_bodies_round_trip() {
    let env = Envelope {
        body: Body::Error {
            error: Cow::Borrowed("User 'bob' not found"),
        },
        hops: wsbus::wire::envelope::MAX_HOPS,
        id: u64::MAX,
        sent_us: u64::MAX,
        ..sample()
    };
    assert_eq!(check_envelope(&encoded(&env)), Some(env));
}
