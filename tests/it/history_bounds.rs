//! What history may make Redis hold: nothing for a recipient without a live stream (a user
//! never connected within `--history-ttl`, a room without members), and each stream bounded
//! in bytes (`--history-max-bytes`, oldest trimmed first) as well as in messages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;
use crate::on_both;

const KEY: &str = "bounds-test-api-key-0123456789";

async fn node(backend: &Backend, id: &str, tune: impl FnOnce(&mut wsbus::NodeConfig)) -> Node {
    backend
        .node_with(id, |c| {
            c.history = 1000;
            c.api_keys = vec![KEY.to_owned()];
            tune(c);
        })
        .await
}

async fn publish(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    http_request(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await
}

on_both!(sends_to_recipients_without_a_stream_store_nothing);

/// A few seconds of messages (and API publishes) to random user ids and member-less rooms:
/// each message answered `User '<id>' not found`, and not one key more in Redis.
async fn sends_to_recipients_without_a_stream_store_nothing(backend: Backend) {
    let a = node(&backend, "a", |_| {}).await;
    let b = node(&backend, "b", |_| {}).await;
    let mut alice = a.connect("alice").await;
    let _bob = b.connect("bob").await;
    let before = backend.keys().await;
    let text = "x".repeat(8 * 1024);
    let end = Instant::now() + Duration::from_secs(3);
    let mut sent = 0;
    while Instant::now() < end {
        let ids: Vec<String> = (0..20)
            .map(|_| format!("ghost{}", fastrand::u64(..)))
            .collect();
        for id in &ids {
            alice.feed_to(id, &text).await;
        }
        alice.flush().await;
        for id in &ids {
            alice.expect_error(&format!("User '{id}' not found")).await;
        }
        let rooms: Vec<String> = (0..5)
            .map(|_| format!("empty{}", fastrand::u64(..)))
            .collect();
        let (status, reply) = publish(
            b.addr,
            &json!({"to": &ids[..5], "rooms": rooms, "action": "n", "data": {"t": text}}),
        )
        .await;
        assert_eq!(
            (status, reply["offline"].as_array().map(Vec::len)),
            (200, Some(5)),
            "{reply}"
        );
        sent += ids.len();
    }
    assert!(sent >= 100, "{sent} messages sent");
    assert_eq!(backend.keys().await, before, "after {sent} messages");
}

/// The frames a stream holds: (offset, bytes) oldest first, and its meta's byte count.
async fn stream_bytes(backend: &Backend, stream: &str) -> (Vec<(u64, usize)>, Option<u64>) {
    let mut conn = backend.conn().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("wsbus:{{{stream}}}:history"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let counted: Option<u64> = redis::cmd("HGET")
        .arg(format!("wsbus:{{{stream}}}:hmeta"))
        .arg("bytes")
        .query_async(&mut conn)
        .await
        .unwrap();
    let frames = entries
        .into_iter()
        .map(|(id, fields)| {
            let offset = id.strip_prefix("0-").unwrap().parse().unwrap();
            (offset, fields[0].1.len())
        })
        .collect();
    (frames, counted)
}

on_both!(a_stream_is_bounded_in_bytes_and_keeps_its_newest);

/// Forty 60 KB messages to a user and to a room (2.4 MB each) with `--history-max-bytes`
/// 200,000: each stream holds at most that many bytes of frames after every append, the
/// newest ones, contiguous; the user's `history` says what was trimmed.
async fn a_stream_is_bounded_in_bytes_and_keeps_its_newest(backend: Backend) {
    const MAX: usize = 200_000;
    let tune = |c: &mut wsbus::NodeConfig| c.history_max_bytes = MAX;
    let a = node(&backend, "a", tune).await;
    let b = node(&backend, "b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    for client in [&mut alice, &mut bob] {
        client
            .send_raw(&json!({"action": "join", "data": {"room": "lobby"}}).to_string())
            .await;
        while client.recv().await["action"] != "joined" {}
    }
    let text = "t".repeat(60_000);
    for i in 1..=40u64 {
        alice.send_to("bob", &format!("{i}{text}")).await;
        alice
            .send_raw(
                &json!({"action": "room_message", "data": {"room": "lobby", "text": format!("{i}{text}")}})
                    .to_string(),
            )
            .await;
        let mut got = 0;
        while got < 2 {
            let v = bob.recv().await;
            if matches!(v["action"].as_str(), Some("message" | "room_message")) {
                assert_eq!(v["offset"], i, "{}", v["action"]);
                got += 1;
            }
        }
        for stream in ["u:bob", "r:lobby"] {
            let (frames, counted) = stream_bytes(&backend, stream).await;
            let total: usize = frames.iter().map(|(_, n)| n).sum();
            assert!(total <= MAX, "{stream} after {i}: {total} bytes");
            assert_eq!(counted, Some(total as u64), "{stream}: the meta's count");
            let offsets: Vec<u64> = frames.iter().map(|(o, _)| *o).collect();
            let first = i + 1 - offsets.len() as u64;
            assert_eq!(
                offsets,
                (first..=i).collect::<Vec<_>>(),
                "{stream}: the newest, in order"
            );
        }
    }
    let (frames, _) = stream_bytes(&backend, "u:bob").await;
    assert!(
        frames.len() < 40 && frames.len() >= 2,
        "{} kept",
        frames.len()
    );
    bob.send_raw(&json!({"action": "history", "data": {"limit": 100}}).to_string())
        .await;
    let v = loop {
        let v = bob.recv().await;
        if v["action"] == "history" {
            break v;
        }
    };
    assert_eq!(v["data"]["reason"], "trimmed", "{}", v["data"]["since"]);
    assert_eq!(v["data"]["messages"][0]["offset"], frames[0].0);
}

/// A history stream must hold any one frame: `--history-max-bytes` below what a client may
/// receive is refused at start.
#[tokio::test]
async fn a_byte_bound_below_one_frame_is_refused_at_start() {
    let mut config = wsbus::NodeConfig::new("a", "redis://127.0.0.1:1");
    config.history = 10;
    config.history_max_bytes = config.max_out_frame_bytes() - 1;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = wsbus::run(config, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--history-max-bytes"), "{error}");
}
