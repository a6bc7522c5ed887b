//! One live session per user across nodes; disconnects and dead clients free the id.

use std::time::Duration;

use crate::common::*;
use crate::on_both;

on_both!(
    close_and_reconnect_at_once_to_another_node_is_never_refused,
    a_second_session_is_refused_and_the_first_is_untouched,
    racing_connections_from_two_nodes_leave_exactly_one_session,
    disconnect_frees_the_id_for_any_node,
);

async fn a_second_session_is_refused_and_the_first_is_untouched(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut first = a.connect("neo").await;
    for node in [&a, &b] {
        let mut second = node.connect("neo").await;
        second.expect_error("not unique session").await;
        second.expect_close(4001).await;
    }
    // The refusal left nothing behind: b holds no user.
    let redis = wsbus::cli::open(&backend.url(), backend.is_cluster()).unwrap();
    let users_on = |nodes: &[wsbus::cli::NodeInfo], id: &str| {
        nodes.iter().find(|n| n.id == id).map(|n| n.users)
    };
    let nodes = wsbus::cli::nodes(&redis, &key_names()).await.unwrap();
    assert_eq!(users_on(&nodes, "a"), Some(1));
    assert_eq!(users_on(&nodes, "b"), Some(0));
    let mut other = b.connect("trinity").await;
    other.send_to("neo", "still yours").await;
    first.expect_message("trinity", "still yours").await;
    assert_eq!(backend.where_is("neo").await.as_deref(), Some("a"));
}

/// A page reload or a client's reconnect is never refused for its own previous session: the
/// node releases the claim before it answers the client's Close.
async fn close_and_reconnect_at_once_to_another_node_is_never_refused(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut refused = 0;
    for i in 0..200 {
        let node = if i % 2 == 0 { &a } else { &b };
        let mut client = node.connect("reloader").await;
        // A live session gets its own message back; a refused one gets the error instead.
        client.send_to("reloader", &i.to_string()).await;
        match client.next_event().await {
            Event::Json(v) if v["action"] == "message" => {
                assert_eq!(v["data"]["text"], i.to_string())
            }
            other => {
                eprintln!("cycle {i}: {other:?}");
                refused += 1;
            }
        }
        client.close().await;
    }
    assert_eq!(refused, 0, "reconnects refused");
}

/// A duplicate refused on the node that holds the user is counted like one refused elsewhere.
#[tokio::test]
async fn refusals_on_the_holding_node_are_counted() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let _first = a.connect("neo").await;
    let mut second = a.connect("neo").await;
    second.expect_error("not unique session").await;
    second.expect_close(4001).await;
    let refused = r#"wsbus_connections_refused_total{reason="not_unique"}"#;
    assert_eq!(metric(a.addr, refused).await, 1.0);
    let errors = r#"wsbus_client_errors_total{kind="not_unique_session"}"#;
    assert_eq!(metric(a.addr, errors).await, 1.0);
}

async fn racing_connections_from_two_nodes_leave_exactly_one_session(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut witness = a.connect("witness").await;
    for round in 0..25 {
        let user = format!("racer{round}");
        let (x, y) = tokio::join!(a.connect(&user), b.connect(&user));
        // Redis decided: exactly one holder. The other session gets the error and 4001.
        let holder = backend
            .where_is(&user)
            .await
            .expect("one session holds the id");
        let (mut winner, mut loser) = if holder == "a" { (x, y) } else { (y, x) };
        loser.expect_error("not unique session").await;
        loser.expect_close(4001).await;
        witness.send_to(&user, "you won").await;
        winner.expect_message("witness", "you won").await;
    }
}

async fn disconnect_frees_the_id_for_any_node(backend: Backend) {
    let (a, b) = backend.pair().await;
    a.connect("morpheus").await.close().await;
    backend.wait_unregistered("morpheus").await;
    let c = b.connect("morpheus").await;
    assert_eq!(backend.where_is("morpheus").await.as_deref(), Some("b"));
    // A dropped TCP connection without a close frame frees it too.
    c.abort();
    backend.wait_unregistered("morpheus").await;
    let mut sender = a.connect("sender").await;
    sender.send_to("morpheus", "gone?").await;
    sender.expect_error("User 'morpheus' not found").await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let backend = Backend::single().await;
    let mut config = backend.config("a");
    config.ping_interval = Duration::from_millis(200);
    let a = Node::start_with(config).await;
    // A raw TCP client that completes the handshake, then never reads or answers.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let req = "GET /ws/mute HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    assert_eq!(backend.where_is("mute").await.as_deref(), Some("a"));
    // An answering client on the same node stays connected meanwhile.
    let mut lively = a.connect("lively").await;
    // Reading lets the lively client answer pings while the mute one is dropped.
    let end = std::time::Instant::now() + DEADLINE;
    while backend.where_is("mute").await.is_some() {
        assert!(
            std::time::Instant::now() < end,
            "silent client was not dropped"
        );
        // Nothing for the lively client meanwhile (reading lets it answer pings).
        if let Some(e) = lively.next_event_within(Duration::from_millis(50)).await {
            panic!("lively: {e:?}");
        }
    }
    lively.send_to("lively", "alive").await;
    lively.expect_message("lively", "alive").await;
    drop(tcp);
}
