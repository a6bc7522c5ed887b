//! Input that used to get through or flood: an `Idempotency-Key` reused with another body,
//! forged protocol actions from a backend, bad `since` on the URL, relayed actions filling
//! history, failed API authentications, oversized ingress entries, and the log lines of a
//! flood of bad keys or entries.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const KEY: &str = "hostile-input-api-key-0123456789";
const STREAM: &str = "wsbus:ingress";

async fn api_node(backend: &Backend, tune: impl FnOnce(&mut wsbus::NodeConfig)) -> Node {
    backend
        .node_with("a", |c| {
            c.api_keys = vec![KEY.to_owned()];
            tune(c);
        })
        .await
}

async fn post(addr: SocketAddr, key: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {key}");
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

async fn xadd(conn: &mut wsbus::redis::RedisConn, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(conn).await.unwrap();
}

/// Nothing arrives for `client` within a short window (it would have, had it been sent).
async fn expect_nothing(client: &mut Client) {
    if let Some(e) = client.next_event_within(Duration::from_millis(300)).await {
        panic!("{}: unexpected {e:?}", client.user);
    }
}

/// An `Idempotency-Key` repeated with the same body answers the first reply; with another
/// body, 422 and nothing sent.
#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_refused() {
    let backend = Backend::single().await;
    let a = api_node(&backend, |_| {}).await;
    let mut bob = a.connect("bob").await;
    let key = [("Idempotency-Key", "order-1")];
    let first = json!({"to": ["bob"], "action": "notice", "data": {"n": 1}});
    let (status, reply) = post(a.addr, KEY, &key, &first).await;
    assert_eq!((status, &reply["sent"]), (200, &json!(["bob"])), "{reply}");
    assert_eq!(bob.recv().await["data"], json!({"n": 1}));
    let other = json!({"to": ["bob"], "action": "notice", "data": {"n": 2}});
    let (status, body) = post(a.addr, KEY, &key, &other).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body,
        json!({"error": "this Idempotency-Key was used for another request"})
    );
    let (status, again) = post(a.addr, KEY, &key, &first).await;
    assert_eq!((status, again), (200, reply));
    expect_nothing(&mut bob).await;
}

/// Every action of the protocol itself is refused from the API (400), ingress (counted
/// invalid, nothing sent) and `--relay-actions` (the node does not start).
#[tokio::test]
async fn built_in_action_names_are_reserved() {
    let backend = Backend::single().await;
    let a = api_node(&backend, |_| {}).await;
    let mut bob = a.connect("bob").await;
    let reserved = [
        "presence",
        "recovered",
        "joined",
        "left",
        "members",
        "ack",
        "welcome",
        "refreshed",
        "history",
        "error",
        "message",
        "room_message",
    ];
    let mut conn = backend.conn().await;
    for action in reserved {
        let (status, body) =
            post(a.addr, KEY, &[], &json!({"to": ["bob"], "action": action})).await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("action")),
            "{action}: {body}"
        );
        let error = body["error"].as_str().unwrap();
        assert_eq!(
            error,
            format!("`{action}` is a built-in action of the protocol (reserved)")
        );
        xadd(&mut conn, &[("to", "bob"), ("action", action)]).await;
    }
    let series = r#"wsbus_ingress_entries_total{result="invalid"}"#;
    let n = reserved.len() as f64;
    eventually(
        DEADLINE,
        "reserved ingress entries counted invalid",
        || async move { (metric(a.addr, series).await == n).then_some(()) },
    )
    .await;
    expect_nothing(&mut bob).await;
    for name in ["ack", "welcome", "refreshed", "joined"] {
        let mut config = backend.config("r");
        config.relay_actions = vec![name.to_owned()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = wsbus::run(config, listener, std::future::pending()).await;
        assert!(
            matches!(result, Err(wsbus::NodeError::Config(_))),
            "{name}: {result:?}"
        );
    }
}

/// A `since` on the connect URL that is not an offset is a 400 before the upgrade, with or
/// without history; a valid one still connects.
#[tokio::test]
async fn a_since_that_is_no_offset_is_refused_before_the_upgrade() {
    let backend = Backend::single().await;
    let plain = backend.node("a").await;
    let with_history = backend.node_with("h", |c| c.history = 10).await;
    for node in [&plain, &with_history] {
        for bad in ["-1", "abc", &"9".repeat(30), "", "+3"] {
            let url = format!("{}?since={bad}&epoch=x", node.url("alice"));
            let refused = Client::connect_url(&url, "alice").await.err();
            assert_eq!(refused, Some(400), "since={bad:?}");
        }
    }
    let client = Client::connect_url(
        &format!("{}?since=0&epoch=x", with_history.url("alice")),
        "alice",
    )
    .await;
    assert!(client.is_ok());
}

/// With history on, a relayed action is delivered without an offset and not stored, unless
/// it is one of `--stored-relay-actions`; so relays cannot push messages out of history.
#[tokio::test]
async fn relayed_actions_are_transient_unless_listed_as_stored() {
    let backend = Backend::single().await;
    let tune = |c: &mut wsbus::NodeConfig| {
        c.history = 3;
        c.relay_actions = vec!["typing".to_owned(), "receipt".to_owned()];
        c.stored_relay_actions = vec!["receipt".to_owned()];
    };
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob_here = a.connect("bob").await;
    let mut carol = b.connect("carol").await;
    alice.send_to("bob", "keep me").await;
    assert_eq!(bob_here.recv().await["data"]["text"], "keep me");
    for i in 0..10 {
        let typing = json!({"action": "typing", "data": {"to": "bob", "n": i}});
        alice.send_raw(&typing.to_string()).await;
        let v = bob_here.recv().await;
        assert_eq!(
            (v["action"].as_str(), v.get("offset")),
            (Some("typing"), None),
            "{v}"
        );
        // Across nodes too.
        let typing = json!({"action": "typing", "data": {"to": "carol", "n": i}});
        alice.send_raw(&typing.to_string()).await;
        let v = carol.recv().await;
        assert_eq!(
            (v["action"].as_str(), v.get("offset")),
            (Some("typing"), None),
            "{v}"
        );
    }
    alice
        .send_raw(&json!({"action": "receipt", "data": {"to": "bob"}}).to_string())
        .await;
    let v = bob_here.recv().await;
    assert_eq!(
        (v["action"].as_str(), v["offset"].as_u64()),
        (Some("receipt"), Some(2)),
        "{v}"
    );
    let mut conn = backend.conn().await;
    let stored: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("wsbus:{u:bob}:history")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2, "the message and the receipt only");
    let carol_kept: u64 = redis::cmd("XLEN")
        .arg("wsbus:{u:carol}:history")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(carol_kept, 0);
    // To a room as well.
    let join = json!({"action": "join", "data": {"room": "r"}}).to_string();
    carol.send_raw(&join).await;
    assert_eq!(carol.recv().await["action"], "joined");
    alice.send_raw(&join).await;
    assert_eq!(alice.recv().await["action"], "joined");
    assert_eq!(carol.recv().await["action"], "presence");
    let typing = json!({"action": "typing", "data": {"room": "r"}});
    alice.send_raw(&typing.to_string()).await;
    let w = carol.recv().await;
    assert_eq!(
        (w["action"].as_str(), w.get("offset")),
        (Some("typing"), None),
        "{w}"
    );
    let room_kept: u64 = redis::cmd("XLEN")
        .arg("wsbus:{r:r}:history")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(room_kept, 0);
    // The message is still there to recover.
    drop(bob_here);
    backend.wait_unregistered("bob").await;
    let url = format!(
        "{}?since=0&epoch={}",
        a.url("bob"),
        v["epoch"].as_str().unwrap()
    );
    let mut bob = Client::connect_url(&url, "bob").await.unwrap();
    assert_eq!(bob.recv().await["data"]["text"], "keep me");
}

/// Failed authentications are limited per source address: past the burst, 429 without the
/// key being looked at, until the bucket refills; each is counted.
#[tokio::test]
async fn failed_api_authentications_are_rate_limited_per_address() {
    let backend = Backend::single().await;
    let a = api_node(&backend, |c| {
        c.api_auth_failure_burst = 5;
        c.api_auth_failure_rate = 2.0;
    })
    .await;
    let body = json!({"to": ["zed"], "action": "n"});
    for _ in 0..5 {
        assert_eq!(post(a.addr, "wrong", &[], &body).await.0, 401);
    }
    let (status, reply) = post(a.addr, "wrong", &[], &body).await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(
        reply,
        json!({"error": "too many failed authentications; retry later"})
    );
    // Guessing the right key meanwhile does not tell.
    assert_eq!(post(a.addr, KEY, &[], &body).await.0, 429);
    let unauthorized = r#"wsbus_api_requests_total{status="unauthorized"}"#;
    let limited = r#"wsbus_api_requests_total{status="too_many_failures"}"#;
    assert_eq!(metric(a.addr, unauthorized).await, 5.0);
    assert_eq!(metric(a.addr, limited).await, 2.0);
    // The bucket refills (2 per second).
    eventually(DEADLINE, "the right key works again", || async {
        (post(a.addr, KEY, &[], &body).await.0 == 200).then_some(())
    })
    .await;
}

/// An ingress entry larger than `--api-max-body-bytes` is counted invalid and not routed;
/// entries after it are.
#[tokio::test]
async fn an_ingress_entry_over_the_body_limit_is_counted_invalid() {
    let backend = Backend::single().await;
    let a = api_node(&backend, |c| c.api_max_body_bytes = 4096).await;
    let mut bob = a.connect("bob").await;
    let mut conn = backend.conn().await;
    let big = json!({"blob": "x".repeat(5000)}).to_string();
    xadd(
        &mut conn,
        &[("to", "bob"), ("action", "big"), ("data", &big)],
    )
    .await;
    xadd(&mut conn, &[("to", "bob"), ("action", "small")]).await;
    assert_eq!(bob.recv().await["action"], "small");
    let series = r#"wsbus_ingress_entries_total{result="invalid"}"#;
    assert_eq!(metric(a.addr, series).await, 1.0);
    expect_nothing(&mut bob).await;
}

/// A flood of bad API keys and of bad ingress entries writes a line for the first and then
/// a count every few seconds, not a line each; the metrics count each. Resume secrets are
/// never logged, even at debug level.
#[tokio::test]
async fn floods_of_bad_keys_and_entries_are_logged_in_summary() {
    let backend = Backend::single().await;
    let log = std::env::temp_dir().join(format!("wsbus-flood-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&log).unwrap();
    let port = wsbus::dev::free_port().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args([
            "serve",
            "--bind",
            &addr.to_string(),
            "--insecure",
            "--node-id",
            "flood",
        ])
        .args(backend.cli_args())
        .args(["--api-key", KEY, "--api-auth-failure-burst", "100000"])
        .env("RUST_LOG", "info,wsbus=debug")
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(DEADLINE, "process node ready", || async move {
        http_get(addr, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    const N: usize = 300;
    let body = json!({"to": ["zed"], "action": "n"});
    for _ in 0..N {
        assert_eq!(post(addr, "wrong", &[], &body).await.0, 401);
    }
    let mut conn = backend.conn().await;
    for _ in 0..N {
        xadd(&mut conn, &[("garbage", "yes")]).await;
    }
    let series = r#"wsbus_ingress_entries_total{result="invalid"}"#;
    eventually(DEADLINE, "every bad entry counted", || async move {
        (metric(addr, series).await == N as f64).then_some(())
    })
    .await;
    let unauthorized = r#"wsbus_api_requests_total{status="unauthorized"}"#;
    assert_eq!(metric(addr, unauthorized).await, N as f64);
    let url = format!("ws://{addr}/ws/alice?resume=");
    let mut first = Client::connect_url(&url, "alice").await.unwrap();
    let secret = first.recv().await["data"]["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("ws://{addr}/ws/alice?resume={secret}");
    let mut second = Client::connect_url(&url, "alice").await.unwrap();
    let next = second.recv().await["data"]["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    first.expect_close(4006).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let keys = text.matches("bad or missing key").count();
    let entries = text.matches("does not parse").count();
    println!("{N} bad keys: {keys} log lines; {N} bad entries: {entries} log lines");
    // The first of each, and at most a summary line or two if the flood spans 5 s periods.
    assert!((1..=3).contains(&keys), "{keys} lines:\n{text}");
    assert!((1..=3).contains(&entries), "{entries} lines:\n{text}");
    assert!(
        text.contains("claim"),
        "debug lines of the claims are there"
    );
    assert!(
        !text.contains(&secret) && !text.contains(&next),
        "a secret was logged"
    );
}
