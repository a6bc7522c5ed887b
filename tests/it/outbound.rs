//! One outbound size rule: no frame over what a client may receive
//! (`NodeConfig::max_out_frame_bytes`) reaches a socket. A publish that would make one is
//! refused before anything is sent (API 413, ingress entry counted invalid); `history`
//! replies are split over frames that fit, recovery replays frame by frame; a frame that
//! still cannot be written closes the connection with 1009 (never a bare TCP close).

use std::net::SocketAddr;

use serde_json::{Value, json};
use wsbus::NodeConfig;

use crate::common::*;
use crate::on_both;

const KEY: &str = "outbound-test-api-key-0123456789";

async fn node(backend: &Backend, id: &str, tune: impl FnOnce(&mut NodeConfig)) -> Node {
    backend
        .node_with(id, |c| {
            c.history = 100;
            c.api_keys = vec![KEY.to_owned()];
            c.relay_actions = vec!["typing".to_owned()];
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

/// A publish body whose frame (`{"from":"@server","action":"big","data":{"x":"yy…"}}`) is
/// exactly `bytes` long.
fn sized(target: Value, bytes: usize) -> Value {
    let frame_of = |n: usize| {
        json!({"from": "@server", "action": "big", "data": {"x": "y".repeat(n)}}).to_string()
    };
    let n = bytes - frame_of(0).len();
    assert_eq!(frame_of(n).len(), bytes);
    let mut body = json!({"action": "big", "data": {"x": "y".repeat(n)}});
    for (k, v) in target.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The next frame that is not a presence event.
async fn next_frame(client: &mut Client) -> Value {
    loop {
        let v = client.recv().await;
        if v["action"] != "presence" {
            return v;
        }
    }
}

async fn join(client: &mut Client, room: &str) -> Value {
    client
        .send_raw(&json!({"action": "join", "data": {"room": room}}).to_string())
        .await;
    let v = next_frame(client).await;
    assert_eq!(v["action"], "joined", "{v}");
    v
}

on_both!(a_publish_too_large_for_a_client_is_refused_before_anything_is_sent);

/// Over the limit: 413 naming the limit and the field, nothing delivered or stored (a batch
/// is refused whole). At the limit: delivered, stamped, to a user and a room on another
/// node, and the connections live on.
async fn a_publish_too_large_for_a_client_is_refused_before_anything_is_sent(backend: Backend) {
    let a = node(&backend, "a", |_| {}).await;
    let b = node(&backend, "b", |_| {}).await;
    let limit = NodeConfig::default().max_publish_frame_bytes();
    let mut bob = b.connect("bob").await;
    let mut carol = b.connect("carol").await;
    join(&mut carol, "lobby").await;

    let (status, body) = publish(a.addr, &sized(json!({"to": ["bob"]}), 200_000)).await;
    assert_eq!(
        (status, body),
        (
            413,
            json!({"error": format!("frame too large (max {limit} bytes)"), "field": "data"})
        )
    );
    let batch = json!([
        {"to": ["bob"], "action": "small"},
        sized(json!({"rooms": ["lobby"]}), limit + 1),
    ]);
    let (status, body) = publish(a.addr, &batch).await;
    assert_eq!(
        (status, &body["field"]),
        (413, &json!("[1].data")),
        "{body}"
    );

    // At the limit: it goes through, stamped, and nothing refused above came before it.
    let (status, body) = publish(a.addr, &sized(json!({"to": ["bob"]}), limit)).await;
    assert_eq!((status, &body["sent"]), (200, &json!(["bob"])), "{body}");
    let v = next_frame(&mut bob).await;
    assert_eq!((&v["action"], &v["offset"]), (&json!("big"), &json!(1)));
    assert!(v.to_string().len() > limit, "the stamp came on top");
    let (status, _) = publish(a.addr, &sized(json!({"rooms": ["lobby"]}), limit)).await;
    assert_eq!(status, 200);
    let v = next_frame(&mut carol).await;
    assert_eq!((&v["action"], &v["room"]), (&json!("big"), &json!("lobby")));

    // Both connections are alive: the next publish arrives.
    let (status, _) = publish(a.addr, &json!({"to": ["bob", "carol"], "action": "after"})).await;
    assert_eq!(status, 200);
    assert_eq!(next_frame(&mut bob).await["action"], "after");
    assert_eq!(next_frame(&mut carol).await["action"], "after");
}

on_both!(an_ingress_entry_too_large_for_a_client_is_counted_invalid);

/// An ingress entry whose frame would be over the limit is acknowledged as invalid and
/// reaches nobody; the next entry does.
async fn an_ingress_entry_too_large_for_a_client_is_counted_invalid(backend: Backend) {
    let a = node(&backend, "a", |_| {}).await;
    let mut bob = a.connect("bob").await;
    let series = r#"wsbus_ingress_entries_total{result="invalid"}"#;
    let invalid_before = metric(a.addr, series).await;
    let mut conn = backend.conn().await;
    let big = json!({"x": "y".repeat(200_000)}).to_string();
    for (action, data) in [("big", big.as_str()), ("small", "{}")] {
        let _: String = redis::cmd("XADD")
            .arg("wsbus:ingress")
            .arg("*")
            .arg("to")
            .arg("bob")
            .arg("action")
            .arg(action)
            .arg("data")
            .arg(data)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(next_frame(&mut bob).await["action"], "small");
    assert_eq!(metric(a.addr, series).await - invalid_before, 1.0);
}

on_both!(a_history_reply_is_split_over_frames_that_fit);

/// Three room messages of nearly 64 KiB: one `history` reply with all three would be over
/// the limit (and used to drop the asker's connection); it comes as several `history`
/// frames, each within the limit, in order, the last one ending the reply.
async fn a_history_reply_is_split_over_frames_that_fit(backend: Backend) {
    let a = node(&backend, "a", |_| {}).await;
    let b = node(&backend, "b", |_| {}).await;
    let out_limit = NodeConfig::default().max_out_frame_bytes();
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    join(&mut alice, "lobby").await;
    join(&mut bob, "lobby").await;
    let text = "z".repeat(65_000);
    for i in 0..3 {
        alice
            .send_raw(
                &json!({"action": "room_message", "data": {"room": "lobby", "text": format!("{i}{text}")}})
                    .to_string(),
            )
            .await;
        let v = next_frame(&mut bob).await;
        assert_eq!(v["offset"], i + 1);
    }
    bob.send_raw(&json!({"action": "history", "data": {"room": "lobby", "limit": 3}}).to_string())
        .await;
    let mut got = Vec::new();
    let mut parts = 0;
    loop {
        let v = next_frame(&mut bob).await;
        assert_eq!(v["action"], "history", "{v}");
        assert!(v.to_string().len() <= out_limit);
        parts += 1;
        for m in v["data"]["messages"].as_array().unwrap() {
            got.push((
                m["offset"].as_u64().unwrap(),
                m["data"]["text"].as_str().unwrap()[..1].to_owned(),
            ));
        }
        assert_eq!(
            v["data"]["since"],
            got.len() as u64 - v["data"]["messages"].as_array().unwrap().len() as u64
        );
        if v["data"].get("continues").is_none() {
            assert_eq!(v["data"]["more"], false);
            break;
        }
        assert_eq!(v["data"]["more"], true);
    }
    assert!(parts >= 2, "{parts} frames");
    assert_eq!(
        got,
        [
            (1, "0".to_owned()),
            (2, "1".to_owned()),
            (3, "2".to_owned())
        ]
    );
    // Still connected.
    alice.send_to("bob", "still here").await;
    let v = next_frame(&mut bob).await;
    assert_eq!(v["data"]["text"], "still here");
}

on_both!(a_recovery_replays_large_frames_one_by_one);

/// Five publishes of 120 KB each, stored while their user was away: each fits, and the
/// recovery replays all five, frame by frame, then `recovered`.
async fn a_recovery_replays_large_frames_one_by_one(backend: Backend) {
    let a = node(&backend, "a", |_| {}).await;
    let b = node(&backend, "b", |_| {}).await;
    let mut bob = b.connect("bob").await;
    bob.send_raw(&json!({"action": "history", "data": {"limit": 0}}).to_string())
        .await;
    let v = next_frame(&mut bob).await;
    let (since, epoch) = (
        v["data"]["offset"].as_u64().unwrap(),
        v["data"]["epoch"].as_str().unwrap().to_owned(),
    );
    bob.close().await;
    backend.wait_unregistered("bob").await;
    for i in 0..5 {
        let mut body = sized(json!({"to": ["bob"]}), 120_000);
        body["data"]["i"] = json!(i);
        let (status, body) = publish(a.addr, &body).await;
        assert_eq!((status, &body["offline"]), (200, &json!(["bob"])), "{body}");
    }
    let url = format!("{}?since={since}&epoch={epoch}", b.url("bob"));
    let mut bob = Client::connect_url(&url, "bob").await.unwrap();
    for i in 0..5 {
        let v = next_frame(&mut bob).await;
        assert_eq!((&v["action"], &v["data"]["i"]), (&json!("big"), &json!(i)));
    }
    let v = next_frame(&mut bob).await;
    assert_eq!(
        (&v["action"], &v["data"]["recovered"], &v["data"]["count"]),
        (&json!("recovered"), &json!(true), &json!(5)),
        "{v}"
    );
}

on_both!(a_frame_that_cannot_be_written_closes_with_1009);

/// A node whose clients may receive less than another's (a smaller `--max-frame-bytes`)
/// finds a stored frame over its limit in a recovery: the client gets close 1009 (counted
/// with its code), not a dropped TCP connection.
async fn a_frame_that_cannot_be_written_closes_with_1009(backend: Backend) {
    let a = node(&backend, "a", |c| c.max_frame_bytes = 256 * 1024).await;
    let b = node(&backend, "b", |_| {}).await;
    let mut bob = b.connect("bob").await;
    bob.send_raw(&json!({"action": "history", "data": {"limit": 0}}).to_string())
        .await;
    let v = next_frame(&mut bob).await;
    let (since, epoch) = (
        v["data"]["offset"].as_u64().unwrap(),
        v["data"]["epoch"].as_str().unwrap().to_owned(),
    );
    bob.close().await;
    backend.wait_unregistered("bob").await;
    let (status, body) = publish(a.addr, &sized(json!({"to": ["bob"]}), 200_000)).await;
    assert_eq!(status, 200, "{body}");
    let series = r#"wsbus_connections_closed_total{code="1009"}"#;
    let closed_before = metric(b.addr, series).await;
    let url = format!("{}?since={since}&epoch={epoch}", b.url("bob"));
    let mut bob = Client::connect_url(&url, "bob").await.unwrap();
    bob.expect_close(1009).await;
    assert_eq!(metric(b.addr, series).await - closed_before, 1.0);
}

on_both!(a_relay_at_the_client_frame_limit_fits_stamped);

/// A client's own frame can never make an outbound frame over the limit: a relay of the
/// largest frame a client may send, stamped for a room's stream, arrives whole.
async fn a_relay_at_the_client_frame_limit_fits_stamped(backend: Backend) {
    let tune = |c: &mut NodeConfig| {
        c.max_frame_bytes = 4096;
        c.stored_relay_actions = vec!["typing".to_owned()];
    };
    let a = node(&backend, "a", tune).await;
    let b = node(&backend, "b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    join(&mut alice, "lobby").await;
    join(&mut bob, "lobby").await;
    let frame_of = |n: usize| {
        json!({"action": "typing", "data": {"room": "lobby", "s": "\"".repeat(n)}}).to_string()
    };
    let n = (4096 - frame_of(0).len()) / 2;
    let frame = frame_of(n);
    assert!(frame.len() > 4090 && frame.len() <= 4096);
    alice.send_raw(&frame).await;
    let v = next_frame(&mut bob).await;
    assert_eq!(
        (&v["action"], &v["room"]),
        (&json!("typing"), &json!("lobby"))
    );
    assert_eq!(v["data"]["s"].as_str().unwrap().len(), n);
}
