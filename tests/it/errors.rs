//! Every error a client can cause gets a clear error frame and leaves the connection open.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    let shape = r#"malformed data: expected {"to": "<user id>", "text": "<string>"}"#;
    let cases = [
        ("{not json", "invalid JSON"),
        ("[1,2,3]", "frame must be a JSON object"),
        ("42", "frame must be a JSON object"),
        ("{}", "missing action"),
        (r#"{"action":""}"#, "empty action"),
        (r#"{"action":3}"#, "action must be a string"),
        (
            r#"{"action":"teleport","data":{}}"#,
            "unknown action 'teleport'",
        ),
        (r#"{"action":"message"}"#, shape),
        (r#"{"action":"message","data":"bob"}"#, shape),
        (r#"{"action":"message","data":{"to":"bob"}}"#, shape),
        (
            r#"{"action":"message","data":{"to":"bob","text":7}}"#,
            shape,
        ),
        (
            r#"{"action":"message","data":{"to":"no/slash","text":"x"}}"#,
            "invalid recipient id",
        ),
        (
            r#"{"action":"message","data":{"to":"nobody","text":"x"}}"#,
            "User 'nobody' not found",
        ),
    ];
    for (frame, error) in cases {
        alice.send_raw(frame).await;
        alice.expect_error(error).await;
    }
    alice.send_frame(Message::binary(vec![1, 2, 3])).await;
    alice.expect_error("binary frames are not supported").await;
    // Still open and working after all that.
    alice.send_to("bob", "still here").await;
    bob.expect_message("alice", "still here").await;
}

#[tokio::test]
async fn unknown_user_on_another_node_is_not_found() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let _b = Node::start("b", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    alice.send_to("ghost", "boo").await;
    alice.expect_error("User 'ghost' not found").await;
}

#[tokio::test]
async fn oversized_frames_get_an_error_and_a_close_without_buffering() {
    let backend = Backend::single().await;
    let mut config = backend.config("a");
    config.max_frame_bytes = 1024;
    let a = Node::start_with(config).await;
    let mut alice = a.connect("alice").await;
    let big = json!({"action":"message","data":{"to":"alice","text":"x".repeat(2000)}});
    alice.send_raw(&big.to_string()).await;
    alice.expect_error("frame too large (max 1024 bytes)").await;
    alice.expect_close(1009).await;
    // The id is free again, and a frame just under the limit is fine.
    backend.wait_unregistered("alice").await;
    let mut alice = a.connect("alice").await;
    alice.send_to("alice", &"y".repeat(900)).await;
    alice.expect_message("alice", &"y".repeat(900)).await;
}

#[tokio::test]
async fn bad_user_ids_are_refused_before_the_upgrade() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let long = "x".repeat(65);
    for bad in ["..", ".", "a%20b", "%C3%A9", long.as_str(), "a:b"] {
        let status = Client::connect_url(&a.url(bad), bad).await.err();
        assert_eq!(status, Some(400), "user id {bad:?}");
    }
    let ok = "x".repeat(64);
    a.connect(&ok).await;
}
