//! Settings documented in docs/operations.md and docs/api.md that the other tests leave at
//! their defaults: each set to another value, and what the docs say it does, checked. Where
//! a setting's effect cannot be seen from outside (a buffer size, a queue length), the test
//! says so and checks that a node with an extreme value works.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::common::*;

const KEY: &str = "knobs-test-api-key-0123456789";

fn bearer() -> String {
    format!("Bearer {KEY}")
}

async fn publish(addr: SocketAddr, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let auth = bearer();
    let mut all = vec![("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    http_request(
        addr,
        "POST",
        "/api/publish",
        &all,
        body.to_string().as_bytes(),
    )
    .await
}

/// `wsbus <args>` run to its end: (success, stdout, stderr).
async fn wsbus(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(args)
        .env_remove("WSBUS_JWT_SECRET")
        .env_remove("WSBUS_INSECURE")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("wsbus exits in time")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--prefix`: every key a node writes is under its prefix, and nodes with different
/// prefixes on one Redis are separate deployments (their users do not see each other).
#[tokio::test]
async fn a_prefix_keeps_deployments_apart_on_one_redis() {
    let backend = Backend::single().await;
    let blue = |c: &mut wsbus::NodeConfig| c.prefix = "blue".to_owned();
    let blue_a = backend.node_with("blue-a", blue).await;
    let blue_b = backend.node_with("blue-b", blue).await;
    let green = backend
        .node_with("green-a", |c| c.prefix = "green".to_owned())
        .await;
    let mut alice = blue_a.connect("alice").await;
    let mut bob = blue_b.connect("bob").await;
    let mut carol = green.connect("carol").await;
    alice.join("lobby").await;
    alice.send_to("bob", "same prefix").await;
    bob.expect_message("alice", "same prefix").await;
    alice.send_to("carol", "other prefix").await;
    alice.expect_error("User 'carol' not found").await;
    carol.send_to("alice", "other prefix").await;
    carol.expect_error("User 'alice' not found").await;

    let mut conn = backend.conn().await;
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        all.iter().any(|k| k.starts_with("blue:")) && all.iter().any(|k| k.starts_with("green:")),
        "{all:?}"
    );
    let stray: Vec<&String> = all
        .iter()
        .filter(|k| !k.starts_with("blue:") && !k.starts_with("green:"))
        .collect();
    assert!(stray.is_empty(), "keys outside the prefixes: {stray:?}");
    // The operator commands take the prefix too.
    let url = backend.url();
    let (ok, out, err) =
        wsbus(&["whereis", "alice", "--prefix", "blue", "--redis-url", &url]).await;
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("blue-a ")), "{out}");
    let (_, out, _) = wsbus(&["whereis", "alice", "--prefix", "green", "--redis-url", &url]).await;
    assert!(!out.contains("blue-a"), "{out}");
}

/// `--presence-events-max-members`: a room sends presence events while it has at most that
/// many users, counting the user who joins or leaves (docs/protocol.md: rooms with more
/// users send none). At the boundary (2 here): the second user's join and leave are
/// announced, the third's are not; nor are they when a node dies with the third user on it.
#[tokio::test]
async fn presence_events_stop_past_the_member_cap_at_the_boundary() {
    let backend = Backend::single().await;
    let cap = |c: &mut wsbus::NodeConfig| c.presence_events_max_members = 2;
    let a = backend.node_with("a", cap).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    let mut carol = a.connect("carol").await;
    assert_eq!(alice.join_count("r").await, 1);
    assert_eq!(bob.join_count("r").await, 2);
    alice.expect_presence("bob", "r", "join").await;
    assert_eq!(carol.join_count("r").await, 3);
    // A presence event would be queued before carol's `joined`; a probe comes after it.
    alice.expect_nothing().await;
    bob.expect_nothing().await;
    carol.act("leave", json!({"room": "r"})).await;
    assert_eq!(carol.recv().await["action"], "left");
    alice.expect_nothing().await;
    bob.expect_nothing().await;
    bob.act("leave", json!({"room": "r"})).await;
    assert_eq!(bob.recv().await["action"], "left");
    alice.expect_presence("bob", "r", "leave").await;

    // A node dies: its users' departures follow the same rule. Room `two` has 2 users with
    // the victim's (a leave), room `three` 3 (none).
    let mut args = backend.cli_args();
    args.extend(["--presence-events-max-members".to_owned(), "2".to_owned()]);
    let mut victim = NodeProcess::start_with("victim", &args).await;
    let mut doomed = Client::connect_url(&victim.url("doomed"), "doomed")
        .await
        .unwrap();
    let mut dave = a.connect("dave").await;
    assert_eq!(dave.join_count("two").await, 1);
    assert_eq!(doomed.join_count("two").await, 2);
    dave.expect_presence("doomed", "two", "join").await;
    assert_eq!(carol.join_count("three").await, 1);
    assert_eq!(alice.join_count("three").await, 2);
    carol.expect_presence("alice", "three", "join").await;
    assert_eq!(doomed.join_count("three").await, 3);
    victim.signal("KILL");
    victim.wait_exit().await;
    dave.expect_presence("doomed", "two", "leave").await;
    // The reaper announced the departures of both rooms in one go: `two`'s is here, and
    // `three`'s would have been queued by now.
    carol.expect_nothing().await;
    alice.expect_nothing().await;
    carol.act("members", json!({"room": "three"})).await;
    assert_eq!(
        carol.recv().await["data"]["users"],
        json!(["alice", "carol"])
    );
}

/// `--ingress-maxlen`: the ingress stream is trimmed to about that many entries (`MAXLEN ~`,
/// whole stream nodes of 100 entries) every claim interval.
#[tokio::test]
async fn the_ingress_stream_is_capped_at_ingress_maxlen() {
    let backend = Backend::single().await;
    let _a = backend
        .node_with("a", |c| {
            c.ingress_maxlen = 10;
            c.ingress_claim_idle = Duration::from_millis(300);
        })
        .await;
    let mut conn = backend.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("XADD")
            .arg("wsbus:ingress")
            .arg("*")
            .arg("to")
            .arg("nobody")
            .arg("action")
            .arg(format!("n{i}"))
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let backend = &backend;
    let left = eventually(DEADLINE, "the ingress stream trimmed", || async move {
        let mut conn = backend.conn().await;
        let n: u64 = redis::cmd("XLEN")
            .arg("wsbus:ingress")
            .query_async(&mut conn)
            .await
            .unwrap();
        (n <= 200).then_some(n)
    })
    .await;
    println!("ingress stream: 1000 entries trimmed to {left}");
}

/// `--max-head-bytes`: a head that passes the limit without ending gets 431 (with the
/// default of 16 KiB, 12,000 bytes would still be waited for); a complete head under it is
/// served, a complete one over it (its end in the same write) gets 431 too. The limit cannot
/// be set under 8192.
#[tokio::test]
async fn max_head_bytes_sets_where_431_starts() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.max_head_bytes = 10_000).await;
    let head = |bytes: usize, end: &str| {
        let mut head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n".to_vec();
        let filler = bytes - head.len() - "X-Filler: \r\n".len() - end.len();
        head.extend_from_slice(format!("X-Filler: {}\r\n{end}", "a".repeat(filler)).as_bytes());
        assert_eq!(head.len(), bytes);
        head
    };
    for (bytes, end, status) in [
        (9_000, "\r\n", "200"),
        (12_000, "", "431"),
        (12_000, "\r\n", "431"),
    ] {
        let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
        let _ = s.write_all(&head(bytes, end)).await;
        let answer = closed_within(&mut s, DEADLINE)
            .await
            .expect("an answer, then the connection closes");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "a head of {bytes} bytes: {answer:?}"
        );
    }
    let (ok, _, err) = wsbus(&["serve", "--insecure", "--max-head-bytes", "8191"]).await;
    assert!(!ok && err.contains("at least 8192"), "{err}");
}

/// `--shutdown-timeout`: the budget for closing sockets. A client that never answers a Close
/// holds its session for the close linger (1 s); a node with a budget below that stops
/// without waiting for it, one with a larger budget waits.
#[tokio::test]
async fn shutdown_stops_waiting_for_sessions_at_the_shutdown_timeout() {
    let backend = Backend::single().await;
    let mut took = Vec::new();
    for (id, budget) in [
        ("short", Duration::from_millis(200)),
        ("long", Duration::from_secs(5)),
    ] {
        let node = backend.node_with(id, |c| c.shutdown_timeout = budget).await;
        // Never polled: it neither reads the node's Close nor answers it.
        let (mute, _) = tokio_tungstenite::connect_async(node.url("mute"))
            .await
            .unwrap();
        let mut other = node.connect("other").await;
        other.send_to("other", "registered").await;
        other.expect_message("other", "registered").await;
        let started = Instant::now();
        node.stop().await;
        took.push(started.elapsed());
        drop(mute);
    }
    println!("shutdown with a mute client: {took:?} (budgets 200 ms and 5 s)");
    // The long budget waited for the mute client's close linger (1 s); the short one did not.
    assert!(took[1] >= Duration::from_millis(900), "{took:?}");
    assert!(took[0] + Duration::from_millis(500) < took[1], "{took:?}");
}

/// `--ws-read-buffer` (the per-socket read chunk) cannot be seen from outside: with a
/// chunk of 16 bytes, frames of up to the frame limit still arrive whole, in order.
#[tokio::test]
async fn a_tiny_ws_read_buffer_still_reads_whole_frames() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.ws_read_buffer = 16).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    let big = "y".repeat(60_000);
    for text in ["short", big.as_str(), "after"] {
        alice.send_to("bob", text).await;
    }
    for text in ["short", big.as_str(), "after"] {
        bob.expect_message("alice", text).await;
    }
}

/// `--bus-queue` (cross-node messages queued before senders wait) cannot be seen from
/// outside either: with room for one message, a burst of 500 from two senders crosses
/// complete and in order (the senders wait instead of failing).
#[tokio::test]
async fn a_bus_queue_of_one_makes_senders_wait_and_loses_nothing() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.bus_queue = 1).await;
    let b = backend.node("b").await;
    let mut s1 = a.connect("s1").await;
    let mut s2 = a.connect("s2").await;
    let mut bob = b.connect("bob").await;
    for i in 0..250 {
        s1.feed_to("bob", &i.to_string()).await;
        s2.feed_to("bob", &i.to_string()).await;
    }
    s1.flush().await;
    s2.flush().await;
    let mut next = std::collections::HashMap::new();
    for _ in 0..500 {
        let v = bob.recv().await;
        let want = next
            .entry(v["from"].as_str().unwrap().to_owned())
            .or_insert(0);
        assert_eq!(v["data"]["text"], want.to_string(), "{v}");
        *want += 1;
    }
    s1.expect_nothing().await;
    s2.expect_nothing().await;
}

/// `--bus-batch`: the most messages per bus pipeline. At 1, a burst that queued up while
/// Redis was paused still goes out one message per pipeline (`wsbus_bus_xadd_seconds`
/// counts the pipelines); batches of the default size would take it in a few.
#[tokio::test]
async fn a_bus_batch_of_one_sends_one_pipeline_per_message() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.bus_batch = 1).await;
    let b = backend.node("b").await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "warm up").await;
    bob.expect_message("alice", "warm up").await;
    let pipelines = "wsbus_bus_xadd_seconds_count";
    let before = metric(a.addr, pipelines).await;
    // Writes wait 300 ms: the burst queues up in the bus writer meanwhile.
    let mut conn = backend.conn().await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(300)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    const N: u64 = 200;
    for i in 0..N {
        alice.feed_to("bob", &i.to_string()).await;
    }
    alice.flush().await;
    for i in 0..N {
        bob.expect_message("alice", &i.to_string()).await;
    }
    let after = metric(a.addr, pipelines).await;
    assert_eq!(after - before, N as f64, "pipelines for {N} messages");
}

/// `--inbox-read-count`: the `COUNT` of the inbox reader's `XREAD`. At 1, a burst of N
/// entries takes at least N reads. (The sender writes an entry per message, `--bus-pack 1`,
/// so that the burst is N entries.)
#[tokio::test]
async fn an_inbox_read_count_of_one_reads_one_entry_at_a_time() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.bus_pack = 1).await;
    let b = backend.node_with("b", |c| c.inbox_read_count = 1).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "warm up").await;
    bob.expect_message("alice", "warm up").await;
    let before = backend.command_calls("xread").await;
    const N: u64 = 300;
    for i in 0..N {
        alice.feed_to("bob", &i.to_string()).await;
    }
    alice.flush().await;
    for i in 0..N {
        bob.expect_message("alice", &i.to_string()).await;
    }
    let reads = backend.command_calls("xread").await - before;
    assert!(reads >= N, "{reads} XREADs for {N} entries");
}

/// The API: 409 while a request with the same `Idempotency-Key` is running; a 503 (Redis
/// failing mid-request) releases the key, so the retry is sent.
#[tokio::test]
async fn idempotency_keys_in_progress_get_409_and_a_503_releases_them() {
    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| c.api_keys = vec![KEY.to_owned()])
        .await;
    let mut alice = a.connect("alice").await;
    let body = json!({"to": ["alice"], "action": "paid"});
    let mut conn = backend.conn().await;

    // Another request holds `busy` (its key is claimed, no reply stored yet).
    let busy = key_names().idempotency("busy");
    let () = redis::cmd("SET")
        .arg(&busy)
        .arg("")
        .arg("EX")
        .arg(60)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, reply) = publish(a.addr, &[("Idempotency-Key", "busy")], &body).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(
        reply,
        json!({"error": "a request with this Idempotency-Key is in progress"})
    );

    // Redis fails the lookup of `zed` (a key of the wrong type): 503, nothing sent, and the
    // idempotency key is free again.
    let zed = key_names().user_sessions("zed");
    let () = redis::cmd("SET")
        .arg(&zed)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let both = json!({"to": ["alice", "zed"], "action": "paid"});
    let (status, reply) = publish(a.addr, &[("Idempotency-Key", "retry")], &both).await;
    assert_eq!(status, 503, "{reply}");
    let held: bool = redis::cmd("EXISTS")
        .arg(key_names().idempotency("retry"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!held, "the key was released");
    let () = redis::cmd("DEL")
        .arg(&zed)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, reply) = publish(a.addr, &[("Idempotency-Key", "retry")], &both).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"sent": ["alice"], "offline": ["zed"], "rooms": {}})
    );
    assert_eq!(
        alice.recv().await,
        json!({"from": "@server", "action": "paid", "data": {}}),
        "sent once, by the retry"
    );
    alice.expect_nothing().await;
}

/// `--admin-bind`: `/api/` moves to the admin address with health and metrics; on the client
/// address it answers 404.
#[tokio::test]
async fn the_api_is_served_on_the_admin_address() {
    let backend = Backend::single().await;
    let admin_port = wsbus::dev::free_port().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let a = backend
        .node_with("a", |c| {
            c.api_keys = vec![KEY.to_owned()];
            c.admin_bind = Some(admin);
        })
        .await;
    let mut alice = a.connect("alice").await;
    let body = json!({"to": ["alice"], "action": "via-admin"});
    let (status, reply) = publish(admin, &[], &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(alice.recv().await["action"], "via-admin");
    let (status, _) = publish(a.addr, &[], &body).await;
    assert_eq!(status, 404, "no /api/ on the client address");
    let auth = bearer();
    let (status, _) =
        http_request(admin, "GET", "/api/nodes", &[("Authorization", &auth)], b"").await;
    assert_eq!(status, 200);
    alice.expect_nothing().await;
}

/// `POST /api/disconnect`: a close reason fits a Close frame, 123 bytes; a longer one is
/// refused (400, field `reason`) and nobody is disconnected.
#[tokio::test]
async fn a_disconnect_reason_over_123_bytes_is_refused() {
    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| c.api_keys = vec![KEY.to_owned()])
        .await;
    let mut alice = a.connect("alice").await;
    let auth = bearer();
    let disconnect = |reason: String| {
        let body = json!({"user": "alice", "reason": reason}).to_string();
        let auth = auth.clone();
        async move {
            http_request(
                a.addr,
                "POST",
                "/api/disconnect",
                &[("Authorization", &auth)],
                body.as_bytes(),
            )
            .await
        }
    };
    // 124 bytes in 62 characters.
    let (status, reply) = disconnect("é".repeat(62)).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], "reason", "{reply}");
    alice.expect_nothing().await;
    let longest = format!("{}é", "r".repeat(121));
    assert_eq!(longest.len(), 123);
    let (status, reply) = disconnect(longest.clone()).await;
    assert_eq!(status, 200, "{reply}");
    alice.expect_close_with(4007, &longest).await;
}

/// `wsbus token --ttl`: the token's `exp` is `iat` plus the lifetime (1 h without it), and a
/// node accepts it.
#[tokio::test]
async fn wsbus_token_ttl_sets_the_lifetime() {
    const SECRET: &str = "knobs-secret-knobs-secret-knobs-";
    let claims = |token: &str| {
        let validation = jsonwebtoken::Validation::default();
        jsonwebtoken::decode::<wsbus::auth::Claims>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .unwrap()
        .claims
    };
    let mint = |ttl: Option<&'static str>| async move {
        let mut args = vec!["token", "alice", "--jwt-secret", SECRET];
        if let Some(ttl) = ttl {
            args.extend(["--ttl", ttl]);
        }
        let (ok, out, err) = wsbus(&args).await;
        assert!(ok, "{err}");
        out.trim().to_owned()
    };
    let token = mint(Some("90m")).await;
    let c = claims(&token);
    assert_eq!(c.exp - c.iat, 90 * 60, "{c:?}");
    let c = claims(&mint(None).await);
    assert_eq!(c.exp - c.iat, 3600, "{c:?}");
    let c = claims(&mint(Some("45s")).await);
    assert_eq!(c.exp - c.iat, 45, "{c:?}");

    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| {
            c.insecure = false;
            c.jwt_secret = Some(SECRET.into());
        })
        .await;
    let mut alice = Client::connect_url(&format!("{}?token={token}", a.url("alice")), "alice")
        .await
        .expect("a minted token is accepted");
    alice.send_to("alice", "signed in").await;
    alice.expect_message("alice", "signed in").await;
}

/// `--redis-ca-file` with `--redis-cluster` is not supported (docs/redis.md): the node
/// refuses to start and says so, instead of connecting without the CA.
#[tokio::test]
async fn redis_ca_file_with_redis_cluster_is_refused_at_startup() {
    let (ok, _, err) = wsbus(&[
        "serve",
        "--insecure",
        "--bind",
        "127.0.0.1:0",
        "--redis-cluster",
        "--redis-url",
        "rediss://127.0.0.1:1",
        "--redis-ca-file",
        "/nonexistent/ca.crt",
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("--redis-ca-file is not supported with --redis-cluster"),
        "{err}"
    );
}
