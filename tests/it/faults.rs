//! Redis failures, slow readers, moved recipients and garbage on the bus.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn redis_restarted_empty_delivery_resumes_without_reconnecting() {
    let mut backend = Backend::single().await;
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "before").await;
    bob.expect_message("alice", "before").await;

    backend.restart_empty().await;
    // Both users come back without reconnecting.
    for user in ["alice", "bob"] {
        let backend = &backend;
        eventually(DEADLINE, "user re-registered", || async move {
            backend.where_is(user).await.is_some().then_some(())
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
    let mut backend = Backend::single().await;
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut carol = a.connect("carol").await;
    let _bob = b.connect("bob").await;

    backend.kill().await;
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

    backend.revive().await;
    a.wait_ready().await;
    let mut newcomer = eventually(DEADLINE, "connections accepted again", || async {
        Client::connect(&a, "newcomer").await.ok()
    })
    .await;
    newcomer.send_to("alice", "hello again").await;
    alice.expect_message("newcomer", "hello again").await;
}

/// The most a connection's kernel buffers hold when its client never reads: the node's send
/// buffer grows up to the maximum of `tcp_wmem`; the client's receive buffer stays at the
/// default of `tcp_rmem` (it only grows as the application reads).
fn socket_buffers_max() -> u64 {
    let field = |k: &str, i: usize| {
        let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/tcp_{k}")).unwrap();
        v.split_whitespace().nth(i).unwrap().parse::<u64>().unwrap()
    };
    field("wmem", 2) + field("rmem", 1)
}

#[tokio::test]
async fn a_slow_reader_is_disconnected_and_memory_stays_bounded() {
    let backend = Backend::single().await;
    // Node a as a process of its own: its memory is measured, not this test's.
    let a = NodeProcess::start_with_flags(
        "a",
        &backend.cli_args(),
        &["--session-queue", "64", "--ws-write-buffer", "4096"],
    )
    .await;
    let b = backend.node("b").await;
    let mut sleeper = Client::connect_url(&a.url("sleeper"), "sleeper")
        .await
        .unwrap();
    let mut local = Client::connect_url(&a.url("local"), "local").await.unwrap();
    let mut remote = b.connect("remote").await;
    const SIZE: u64 = 8 * 1024;
    let text = "z".repeat(SIZE as usize);
    let rss_before = a.rss_kib();
    // Up to 8000 x 8 KiB = 64 MiB offered to a client that never reads; the senders
    // stop once it is gone (after that, each send earns them a `not found` error).
    let mut sent = 0;
    while backend.where_is("sleeper").await.is_some() {
        assert!(sent < 8000, "slow reader was never disconnected");
        for _ in 0..25 {
            local.feed_to("sleeper", &text).await;
            remote.feed_to("sleeper", &text).await;
            sent += 2;
        }
        local.flush().await;
        remote.flush().await;
    }
    let grown = a.rss_kib().saturating_sub(rss_before);
    assert!(grown < 48 * 1024, "node memory grew by {grown} KiB");
    // The reader finds what fit in its queue and the sockets' buffers, then the
    // slow-consumer close.
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
    let bound = 64 + (4096 + socket_buffers_max()) / SIZE + 1;
    println!("slow reader: {sent} sent, {frames} buffered for it (bound {bound})");
    assert!(
        frames <= bound,
        "{frames} of {sent} frames were buffered for a client that never read (bound {bound})"
    );
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
        let env = envelope("b", "sender", to, text);
        // Delivered to node a, where neither user is.
        append_single_entry(&mut conn, &key_names().inbox("a"), "sender", to, &env).await;
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
        cmd.arg(key_names().inbox("b")).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    alice.send_to("bob", "after the garbage").await;
    bob.expect_message("alice", "after the garbage").await;
    // Read in order: the three before it were skipped, and counted.
    // (The metrics are this process's, both nodes': node a reads no garbage.)
    assert_eq!(metric(b.addr, "wsbus_undecodable_entries_total").await, 3.0);
}

/// The backstop for an inbox nobody reads (its consumer stuck while the node lives): each
/// heartbeat trims it to about `inbox_maxlen` entries. XADDs themselves carry no cap.
async fn the_heartbeat_caps_an_unread_inbox(backend: Backend) {
    use wsbus::cluster::live::LiveNodes;
    use wsbus::cluster::registry::Registry;
    use wsbus::redis::keys::Keys;

    let redis = wsbus::cli::open(&backend.url(), backend.is_cluster()).unwrap();
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
    let mut conn = redis.conn().await.unwrap();
    let first = registry.beat(&redis, &mut conn).await.unwrap();
    assert_eq!(first.inbox_len, 0, "the first beat creates an empty inbox");

    let inbox = keys.inbox("capped");
    let mut pipe = redis::pipe();
    for _ in 0..1000 {
        wsbus::wire::envelope::append_entry(&mut pipe, &inbox, "a", "b", "message", b"\x80");
    }
    let ids: Vec<Option<String>> = pipe.query_async(&mut conn).await.unwrap();
    assert!(ids.iter().all(Option::is_some), "all 1,000 appended");

    let beat = registry.beat(&redis, &mut conn).await.unwrap();
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

/// Clients that never read and never send, each offered 1,000 messages of 60 KB: the node
/// pins at most about `--session-queue-bytes` plus socket buffers for each, drops each as a
/// slow consumer (once), removes its registration, and tells the senders what it dropped.
#[tokio::test]
async fn clients_that_never_read_are_dropped_and_pin_little_memory() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    const SLEEPERS: usize = 8;
    const MESSAGES: usize = 1000;
    let backend = Backend::single().await;
    let node = NodeProcess::start_with_flags(
        "a",
        &backend.cli_args(),
        &[
            // Long: a busy machine that moves the flood slowly must not end the sleepers by
            // the ping deadline (4004) before their queues fill (4002).
            "--ping-interval",
            "60s",
            "--rate-limit",
            "1e9",
            "--rate-burst",
            "1000000000",
        ],
    )
    .await;
    let mut sleepers = Vec::new();
    for i in 0..SLEEPERS {
        let (ws, _) = tokio_tungstenite::connect_async(node.url(&format!("sleeper{i}")))
            .await
            .unwrap();
        // Never polled again: nothing is read, nothing sent, not even a pong.
        sleepers.push(ws);
    }
    let rss_before = node.rss_kib();
    let started = std::time::Instant::now();
    let text = "m".repeat(60 * 1000);
    let too_slow: Vec<Arc<AtomicUsize>> = (0..SLEEPERS).map(|_| Arc::default()).collect();
    let mut senders = Vec::new();
    for i in 0..SLEEPERS {
        let (ws, _) = tokio_tungstenite::connect_async(node.url(&format!("sender{i}")))
            .await
            .unwrap();
        let (mut sink, mut stream) = ws.split();
        let too_slow = too_slow[i].clone();
        let expected = format!("User 'sleeper{i}' is too slow; message dropped");
        // Senders read their errors, or they would become slow consumers themselves.
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Message::Text(t) = msg
                    && t.contains(&expected)
                {
                    too_slow.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let frame = serde_json::json!({"action": "message", "data": {"to": format!("sleeper{i}"), "text": text}})
            .to_string();
        senders.push(tokio::spawn(async move {
            for _ in 0..MESSAGES {
                sink.feed(Message::text(frame.clone())).await.unwrap();
            }
            sink.flush().await.unwrap();
            sink
        }));
    }
    let mut peak_kib = 0;
    let mut dropped_at = None;
    // Generous: 480 MB through a debug build on a machine that may be busy.
    let deadline = started + Duration::from_secs(90);
    loop {
        peak_kib = peak_kib.max(node.rss_kib());
        let mut registered = 0;
        for i in 0..SLEEPERS {
            let sleeper = format!("sleeper{i}");
            registered += usize::from(backend.where_is(&sleeper).await.is_some());
        }
        if registered == 0 && dropped_at.is_none() {
            dropped_at = Some(started.elapsed());
        }
        if dropped_at.is_some() && senders.iter().all(|s| s.is_finished()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{registered} sleepers still registered, senders finished: {}",
            senders.iter().filter(|s| s.is_finished()).count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped_at = dropped_at.unwrap();
    let grown_kib = peak_kib.saturating_sub(rss_before);
    eprintln!(
        "never-reading clients: rss {rss_before} KiB before, peak {peak_kib} KiB (+{grown_kib} KiB); \
         all {SLEEPERS} unregistered after {dropped_at:?}; flood took {:?}",
        started.elapsed()
    );
    assert!(grown_kib < 32 * 1024, "node RSS grew by {grown_kib} KiB");
    // Each dropped once, as a slow consumer (4002), not by the ping deadline (4004).
    let slow = node
        .metric(r#"wsbus_connections_closed_total{code="4002"}"#)
        .await;
    assert_eq!(slow, SLEEPERS as f64);
    assert_eq!(
        node.metric(r#"wsbus_connections_closed_total{code="4004"}"#)
            .await,
        0.0
    );
    assert_eq!(
        node.metric("wsbus_slow_consumer_disconnects_total").await,
        slow,
        "one slow-consumer disconnect per client"
    );
    // Nothing is dropped silently: each refused message earned its sender an error (the
    // node may still be reading the senders' last frames, hence the wait).
    let node = &node;
    let too_slow = &too_slow;
    let told = eventually(DEADLINE, "each dropped message answered", || async move {
        let dropped = node
            .metric(r#"wsbus_messages_dropped_total{reason="slow_consumer"}"#)
            .await;
        let told: Vec<usize> = too_slow.iter().map(|n| n.load(Ordering::Relaxed)).collect();
        (told.iter().all(|&n| n > 0) && told.iter().sum::<usize>() as f64 == dropped)
            .then_some(told)
    })
    .await;
    eprintln!("messages dropped and answered, per sender: {told:?}");
    drop(sleepers);
}

/// The ping deadline holds while a write is blocked: a client that reads nothing is dropped
/// with 4004 within two ping intervals even when its queue never fills.
#[tokio::test]
async fn a_blocked_write_does_not_suspend_the_ping_deadline() {
    let backend = Backend::single().await;
    let mut c = backend.config("a");
    c.ping_interval = Duration::from_millis(500);
    c.session_queue = 1_000_000;
    c.session_queue_bytes = 1 << 30;
    let a = Node::start_with(c).await;
    let (sleeper, _) = tokio_tungstenite::connect_async(a.url("sleeper"))
        .await
        .unwrap();
    let mut sender = a.connect("sender").await;
    // 24 MB: more than the loopback socket buffers of both ends hold.
    let text = "p".repeat(60 * 1000);
    for _ in 0..400 {
        sender.feed_to("sleeper", &text).await;
    }
    sender.flush().await;
    let sent = std::time::Instant::now();
    backend.wait_unregistered("sleeper").await;
    let after = sent.elapsed();
    eprintln!(
        "never-reading client with room in its queue: unregistered {after:?} after the flood"
    );
    // Two ping intervals, then at most 1 s of closing: 2 s. The bound is generous for a
    // busy machine; the behaviour is the 4004 below (a client with room in its queue that
    // is never dropped would fail the wait above).
    assert!(after < Duration::from_secs(5), "{after:?}");
    let (_, metrics) = http_get(a.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains(r#"wsbus_connections_closed_total{code="4004"} 1"#),
        "{metrics}"
    );
    drop(sleeper);
}

/// A sender on another node is told too when its recipient is being dropped as a slow
/// consumer: the recipient's node answers in the sender's node's inbox.
#[tokio::test]
async fn a_sender_on_another_node_is_told_its_recipient_is_too_slow() {
    let backend = Backend::single().await;
    let a = backend.node("a").await;
    let mut small = backend.config("b");
    small.session_queue = 8;
    small.session_queue_bytes = 64 * 1024;
    let b = Node::start_with(small).await;
    // Never read: its socket buffers fill, then its queue.
    let (sleeper, _) = tokio_tungstenite::connect_async(b.url("sleeper"))
        .await
        .unwrap();
    let mut sender = a.connect("sender").await;
    let text = "z".repeat(32 * 1024);
    // Sent in bursts until the answer comes (how much fits in the socket buffers first
    // depends on the machine); generous for a busy one.
    let told = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            for _ in 0..50 {
                sender.feed_to("sleeper", &text).await;
            }
            sender.flush().await;
            while let Some(e) = sender.next_event_within(Duration::from_millis(1)).await {
                let Event::Json(v) = e else {
                    panic!("sender: {e:?}")
                };
                if v["data"]["error"] == "User 'sleeper' is too slow; message dropped" {
                    return;
                }
            }
        }
    })
    .await;
    assert!(told.is_ok(), "the sender was never told");
    drop(sleeper);
}
