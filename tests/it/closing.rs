//! How connections end: the close handshake both ways, close codes for protocol violations,
//! and closes that must reach a client still sending (a reset would destroy them).

use crate::common::raw::{self, Ending, Frame, RawClient};
use crate::common::*;

/// `n` text frames of `size` bytes that are not JSON (each earns an error frame).
fn flood(n: usize, size: usize) -> Vec<u8> {
    let one = Frame::text(&"x".repeat(size)).encode();
    one.repeat(n)
}

#[tokio::test]
async fn a_clients_close_is_answered_with_its_code() {
    let backend = Backend::single().await;
    let a = backend.node("a").await;
    for (user, code) in [("alice", 1000), ("bob", 4321)] {
        let mut client = RawClient::connect(a.addr, user).await;
        client.send(&Frame::close(code, "bye")).await;
        let closing = client.read_until_end().await;
        assert_eq!(closing.close, Some(Some(code)), "{user}: {closing:?}");
        assert_eq!(closing.ending, Ending::Eof, "{user}");
        backend.wait_unregistered(user).await;
    }
}

/// A client that floods past its rate limit gets its errors, the 4005 Close and a FIN, every
/// time: the node reads and discards what is still in flight instead of resetting.
#[tokio::test]
async fn a_rate_limit_close_reaches_a_client_that_floods() {
    let redis = Redis::start().await.unwrap();
    let mut c = config("a", &redis.url());
    c.rate_limit = 10.0;
    c.rate_burst = 5;
    let a = Node::start_with(c).await;
    for attempt in 0..5 {
        let client = RawClient::connect(a.addr, &format!("flooder{attempt}")).await;
        let closing = client.flood_until_end(flood(2000, 200)).await;
        let errors = closing.errors();
        assert!(
            errors.iter().any(|e| e == "rate limited"),
            "attempt {attempt}: {errors:?}"
        );
        assert_eq!(closing.close, Some(Some(4005)), "attempt {attempt}");
        assert_eq!(closing.ending, Ending::Eof, "attempt {attempt}");
    }
}

#[tokio::test]
async fn a_not_unique_refusal_reaches_a_client_that_floods() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let _first = a.connect("alice").await;
    for attempt in 0..3 {
        let second = RawClient::connect_sending(a.addr, "alice", &flood(100, 200)).await;
        let closing = second.flood_until_end(flood(2000, 200)).await;
        assert_eq!(
            closing.errors(),
            ["not unique session"],
            "attempt {attempt}"
        );
        assert_eq!(closing.close, Some(Some(4001)), "attempt {attempt}");
        assert_eq!(closing.ending, Ending::Eof, "attempt {attempt}");
    }
}

#[tokio::test]
async fn a_shutdown_close_reaches_a_client_that_floods() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let client = RawClient::connect(a.addr, "alice").await;
    let flooding = tokio::spawn(client.flood_until_end(flood(20_000, 200)));
    let stopped = tokio::spawn(a.stop());
    let closing = flooding.await.unwrap();
    assert_eq!(closing.close, Some(Some(1001)), "{:?}", closing.close);
    assert_eq!(closing.ending, Ending::Eof);
    stopped.await.unwrap();
}

/// Each violation of RFC 6455 gets its close code (1007 for invalid UTF-8, 1002 for the
/// rest) even while the client keeps sending, and the node goes on serving everyone else.
#[tokio::test]
async fn protocol_violations_are_closed_with_their_codes() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let text = |t: &str| Frame::text(t);
    let cases: Vec<(&str, Frame, u16)> = vec![
        (
            "invalid UTF-8",
            Frame::new(raw::TEXT, vec![b'a', 0xff, 0xfe]),
            1007,
        ),
        (
            "invalid UTF-8 across fragments",
            Frame {
                fin: false,
                ..Frame::new(raw::TEXT, vec![b'a', 0xe2, 0x82])
            },
            1007,
        ),
        (
            "unmasked",
            Frame {
                masked: false,
                ..text("hi")
            },
            1002,
        ),
        (
            "RSV1",
            Frame {
                rsv: 0b100,
                ..text("hi")
            },
            1002,
        ),
        (
            "RSV3",
            Frame {
                rsv: 0b001,
                ..text("hi")
            },
            1002,
        ),
        ("data opcode 3", Frame::new(0x3, "hi"), 1002),
        ("control opcode 0xB", Frame::new(0xb, "hi"), 1002),
        (
            "ping over 125 bytes",
            Frame::new(raw::PING, vec![0; 126]),
            1002,
        ),
        (
            "fragmented ping",
            Frame {
                fin: false,
                ..Frame::new(raw::PING, "hi")
            },
            1002,
        ),
        ("continuation first", Frame::new(0x0, "hi"), 1002),
    ];
    for (i, (what, frame, code)) in cases.into_iter().enumerate() {
        let mut client = RawClient::connect(a.addr, &format!("v{i}")).await;
        client.send(&frame).await;
        if what == "invalid UTF-8 across fragments" {
            client.send(&Frame::new(0x0, vec![0xffu8])).await;
        }
        let closing = client.flood_until_end(flood(2000, 200)).await;
        assert_eq!(closing.close, Some(Some(code)), "{what}");
        assert_eq!(closing.ending, Ending::Eof, "{what}");
    }
    // Close frames the client gets wrong (nothing follows a Close, so no flood).
    let bad_closes: Vec<(&str, Frame, u16)> = vec![
        ("close code 1005", Frame::close(1005, ""), 1002),
        ("close code 999", Frame::close(999, ""), 1002),
        ("close code 5000", Frame::close(5000, ""), 1002),
        (
            "close payload of 1 byte",
            Frame::new(raw::CLOSE, vec![3]),
            1002,
        ),
        (
            "close reason not UTF-8",
            Frame::new(raw::CLOSE, vec![0x03, 0xe8, 0xff]),
            1007,
        ),
    ];
    for (i, (what, frame, code)) in bad_closes.into_iter().enumerate() {
        let mut client = RawClient::connect(a.addr, &format!("c{i}")).await;
        client.send(&frame).await;
        let closing = client.read_until_end().await;
        assert_eq!(closing.close, Some(Some(code)), "{what}");
        assert_eq!(closing.ending, Ending::Eof, "{what}");
    }
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.send_to("bob", "still serving").await;
    bob.expect_message("alice", "still serving").await;
}

/// An oversized frame cannot be skipped; its error and the 1009 Close still reach a client
/// that keeps sending the frame's bytes.
#[tokio::test]
async fn a_frame_too_large_close_reaches_a_client_still_sending_it() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let client = RawClient::connect(a.addr, "alice").await;
    let big = Frame::text(&"y".repeat(1024 * 1024)).encode();
    let closing = client.flood_until_end(big).await;
    assert_eq!(closing.errors(), ["frame too large (max 65536 bytes)"]);
    assert_eq!(closing.close, Some(Some(1009)));
    assert_eq!(closing.ending, Ending::Eof);
}
