//! Redis failures, slow readers, moved recipients and garbage on the bus.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn redis_restarted_empty_delivery_resumes_without_reconnecting() {
    let mut redis = Redis::start().await.unwrap();
    let port = redis.port();
    let url = redis.url();
    let a = Node::start("a", &url).await;
    let b = Node::start("b", &url).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "before").await;
    bob.expect_message("alice", "before").await;

    redis.kill().await;
    let _redis = Redis::start_on(port).await.unwrap();
    // Both users come back without reconnecting.
    for user in ["alice", "bob"] {
        eventually(DEADLINE, "user re-registered", || {
            let url = url.clone();
            async move { where_is(&url, user).await.is_some().then_some(()) }
        })
        .await;
    }
    // Sends may fail (with an error frame) until both inboxes and readers are back; each
    // attempt ends with either the error at the sender or the message at the recipient.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let text = format!("after {attempt}");
        alice.send_to("bob", &text).await;
        tokio::select! {
            got = bob.next_event_within(DEADLINE) => {
                let Some(Event::Json(v)) = got else { panic!("bob: {got:?}") };
                assert_eq!(v["data"]["text"], text.as_str());
                break;
            }
            got = alice.next_event_within(DEADLINE) => {
                let Some(Event::Json(v)) = got else { panic!("alice: {got:?}") };
                assert_eq!(v["action"], "error", "{v}");
            }
        }
        assert!(attempt < 100, "delivery did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.send_to("alice", "back").await;
    alice.expect_message("bob", "back").await;
}

#[tokio::test]
async fn redis_down_keeps_local_delivery_and_refuses_new_connections() {
    let mut redis = Redis::start().await.unwrap();
    let port = redis.port();
    let url = redis.url();
    let a = Node::start("a", &url).await;
    let _b = Node::start("b", &url).await;
    let mut alice = a.connect("alice").await;
    let mut carol = a.connect("carol").await;
    let _bob = _b.connect("bob").await;

    redis.kill().await;
    alice.send_to("bob", "lost in the void").await;
    alice.expect_error("bus unavailable").await;
    alice.send_to("carol", "next door").await;
    carol.expect_message("alice", "next door").await;
    let status = Client::connect(&a, "newcomer").await.err();
    assert_eq!(status, Some(503));
    let addr = a.addr;
    let body = eventually(DEADLINE, "readiness reports the outage", || async move {
        http_get(addr, "/readyz")
            .await
            .filter(|(s, _)| *s == 503)
            .map(|(_, b)| b)
    })
    .await;
    assert!(body.contains("\"ready\":false"), "{body}");

    let _redis = Redis::start_on(port).await.unwrap();
    a.wait_ready().await;
    let mut newcomer = eventually(DEADLINE, "connections accepted again", || async {
        Client::connect(&a, "newcomer").await.ok()
    })
    .await;
    newcomer.send_to("alice", "hello again").await;
    alice.expect_message("newcomer", "hello again").await;
}

#[tokio::test]
async fn a_slow_reader_is_disconnected_and_memory_stays_bounded() {
    let redis = Redis::start().await.unwrap();
    let mut config = config("a", &redis.url());
    config.session_queue = 64;
    config.ws_write_buffer = 4096;
    let a = Node::start_with(config).await;
    let b = Node::start("b", &redis.url()).await;
    let mut sleeper = a.connect("sleeper").await;
    let mut local = a.connect("local").await;
    let mut remote = b.connect("remote").await;
    let text = "z".repeat(8 * 1024);
    let rss_before = rss_kib();
    // Up to 2 x 4000 x 8 KiB = 64 MiB offered to a client that never reads; the senders
    // stop once it is gone (after that, each send earns them a `not found` error).
    let url = redis.url();
    let mut sent = 0;
    while where_is(&url, "sleeper").await.is_some() {
        assert!(sent < 4000, "slow reader was never disconnected");
        for _ in 0..25 {
            local.feed_to("sleeper", &text).await;
            remote.feed_to("sleeper", &text).await;
            sent += 1;
        }
        local.flush().await;
        remote.flush().await;
    }
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(grown < 48 * 1024, "node memory grew by {grown} KiB");
    // The reader finds what fit in its queue, then the slow-consumer close.
    let mut frames = 0;
    loop {
        match sleeper.next_event().await {
            Event::Json(v) => {
                assert_eq!(v["action"], "message");
                frames += 1;
            }
            Event::Closed(code) => {
                // The close frame (4002) queues behind the unread data; when even that cannot
                // be written within a second, the connection is dropped without it.
                assert!(matches!(code, Some(4002) | None), "close code {code:?}");
                break;
            }
        }
    }
    assert!(
        frames < 8000,
        "{frames} frames were buffered for a client that never read"
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// An entry that reaches a node after its recipient moved is forwarded to the new node; one
/// for a user who is nowhere comes back to the sender as `not found`.
#[tokio::test]
async fn entries_for_users_who_moved_are_rerouted_or_answered() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let a = Node::start("a", &url).await;
    let b = Node::start("b", &url).await;
    let mut mover = b.connect("mover").await;
    let mut sender = b.connect("sender").await;
    let mut conn = redis_conn(&url).await;
    for (to, text) in [("mover", "follow me"), ("nobody", "lost")] {
        let mut env = Vec::new();
        wsbus::wire::Envelope {
            id: 1,
            boot: 0,
            origin: "b".into(),
            from: "sender".into(),
            to: to.into(),
            hops: 0,
            sent_us: 0,
            origin_sid: 0,
            to_recipient: true,
            to_sender: false,
            tried: Vec::new(),
            body: wsbus::wire::Body::Message { text: text.into() },
        }
        .encode_into(&mut env);
        // Delivered to node a, where neither user is.
        let _: String = redis::cmd("XADD")
            .arg("wsbus:inbox:a")
            .arg("*")
            .arg("from")
            .arg("sender")
            .arg("to")
            .arg(to)
            .arg("action")
            .arg("message")
            .arg("env")
            .arg(env)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    mover.expect_message("sender", "follow me").await;
    sender.expect_error("User 'nobody' not found").await;
    drop(a);
}

#[tokio::test]
async fn undecodable_inbox_entries_are_skipped() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let a = Node::start("a", &url).await;
    let b = Node::start("b", &url).await;
    let mut bob = b.connect("bob").await;
    let mut alice = a.connect("alice").await;
    let mut conn = redis_conn(&url).await;
    for fields in [
        vec![("env", b"\xc1\xc1\xc1".to_vec())],
        vec![("env", b"\x85\xa2id".to_vec())],
        vec![("from", b"x".to_vec())],
    ] {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("wsbus:inbox:b").arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    alice.send_to("bob", "after the garbage").await;
    bob.expect_message("alice", "after the garbage").await;
}

/// The backstop for an inbox nobody reads (its consumer stuck while the node lives): each
/// heartbeat trims it to about `inbox_maxlen` entries. XADDs themselves carry no cap.
async fn the_heartbeat_caps_an_unread_inbox(backend: Backend) {
    use wsbus::keys::Keys;
    use wsbus::registry::{LiveNodes, Registry};

    let bus = wsbus::admin::open(&backend.url(), backend.is_cluster()).unwrap();
    let keys = Keys::new("wsbus");
    let live = std::sync::Arc::new(LiveNodes::new(&keys, Duration::from_secs(5)));
    let registry = Registry::new(
        keys.clone(),
        "capped".to_owned(),
        "127.0.0.1:1".to_owned(),
        0,
        Duration::from_secs(5),
        live,
        100,
    );
    let mut conn = bus.conn().await.unwrap();
    let first = registry.beat(&bus, &mut conn).await.unwrap();
    assert_eq!(first.inbox_len, 0, "the first beat creates an empty inbox");

    let inbox = keys.inbox("capped");
    let mut pipe = redis::pipe();
    for _ in 0..1000 {
        wsbus::outbox::append_entry(&mut pipe, &inbox, "a", "b", "message", b"\x80");
    }
    let ids: Vec<Option<String>> = pipe.query_async(&mut conn).await.unwrap();
    assert!(ids.iter().all(Option::is_some), "all 1,000 appended");

    let beat = registry.beat(&bus, &mut conn).await.unwrap();
    assert_eq!(beat.inbox_len, 1000, "XLEN is read before the trim");
    let left: u64 = redis::cmd("XLEN")
        .arg(&inbox)
        .query_async(&mut conn)
        .await
        .unwrap();
    // `~` trims whole stream nodes (100 entries each by default).
    assert!((100..200).contains(&left), "{left} entries left");
}

crate::on_both!(the_heartbeat_caps_an_unread_inbox);
