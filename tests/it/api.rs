//! The HTTP API (`/api/`): publish to users and rooms across nodes (one entry per node),
//! batches, keys, bad input, idempotency, disconnect with 4007, and the lookups.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::common::*;
use crate::on_both;

const KEY: &str = "test-api-key-0123456789";
const OLD_KEY: &str = "old-api-key-9876543210";

/// Two keys open the API; small limits.
fn api(c: &mut wsbus::NodeConfig) {
    c.api_keys = vec![OLD_KEY.to_owned(), KEY.to_owned()];
    c.api_max_batch = 5;
    c.api_max_body_bytes = 4096;
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let auth = bearer(KEY);
    http_request(
        addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let auth = bearer(KEY);
    http_request(addr, "GET", path, &[("Authorization", &auth)], b"").await
}

/// Nothing more arrives for `clients`: a publish of a marker through the API on `addr`
/// (after whatever must not arrive) is the next frame of each.
async fn expect_only_marker(addr: SocketAddr, clients: &mut [&mut Client]) {
    let users: Vec<&str> = clients.iter().map(|c| c.user.as_str()).collect();
    let (status, reply) = post(
        addr,
        "/api/publish",
        &json!({"to": users, "action": "marker"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    for client in clients {
        assert_eq!(
            client.recv().await,
            json!({"from": "@server", "action": "marker", "data": {}}),
            "{}: a frame before the marker",
            client.user
        );
    }
}

on_both!(a_publish_reaches_users_and_rooms_on_every_node);

/// `@server` frames reach every listed user and every room member, here and on another
/// node, with one inbox entry per node and target; an unknown user is `offline`.
async fn a_publish_reaches_users_and_rooms_on_every_node(backend: Backend) {
    let a = backend.node_with("a", api).await;
    let b = backend.node_with("b", api).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = b.connect("carol").await;
    let mut dave = a.connect("dave").await;
    // dave first: carol's join then reaches him for sure (he is a member by then), and is
    // read before the publish; nothing of his join goes to node b, which had no member yet.
    dave.join("lobby").await;
    carol.join("lobby").await;
    let presence = dave.recv().await;
    assert_eq!(presence["action"], "presence", "{presence}");
    assert_eq!(presence["from"], "carol", "{presence}");
    let before = backend.command_calls("xadd").await;
    let envelopes = metric(a.addr, TO_BUS).await;
    let (status, reply) = post(
        a.addr,
        "/api/publish",
        &json!({"to": ["alice", "bob", "zed"], "rooms": ["lobby"], "action": "notice",
                "data": {"x": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"sent": ["alice", "bob"], "offline": ["zed"], "rooms": {"lobby": 2}})
    );
    let frame = json!({"from": "@server", "action": "notice", "data": {"x": 1}});
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        assert_eq!(client.recv().await, frame, "{}", client.user);
    }
    // bob's envelope and the room's, both for node b (one entry if one bus batch took
    // both); nothing for node a.
    assert_eq!(metric(a.addr, TO_BUS).await - envelopes, 2.0);
    let xadds = backend.command_calls("xadd").await - before;
    assert!((1..=2).contains(&xadds), "{xadds} XADDs");
    expect_only_marker(a.addr, &mut [&mut alice, &mut bob, &mut carol, &mut dave]).await;
}

on_both!(a_batch_is_answered_in_order_and_a_backend_may_publish_as_a_user);

async fn a_batch_is_answered_in_order_and_a_backend_may_publish_as_a_user(backend: Backend) {
    let a = backend.node_with("a", api).await;
    let b = backend.node_with("b", api).await;
    let mut alice = b.connect("alice").await;
    let (status, reply) = post(
        a.addr,
        "/api/publish",
        &json!([
            {"to": ["alice"], "action": "one", "data": {"n": 1}},
            {"to": ["nobody"], "action": "two"},
            {"to": ["alice"], "action": "three", "from": "billing"},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!([
            {"sent": ["alice"], "offline": [], "rooms": {}},
            {"sent": [], "offline": ["nobody"], "rooms": {}},
            {"sent": ["alice"], "offline": [], "rooms": {}},
        ])
    );
    assert_eq!(
        alice.recv().await,
        json!({"from": "@server", "action": "one", "data": {"n": 1}})
    );
    assert_eq!(
        alice.recv().await,
        json!({"from": "billing", "action": "three", "data": {}})
    );
}

#[tokio::test]
async fn keys_are_required_any_configured_key_opens_and_no_key_means_no_api() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", api).await;
    let body = json!({"to": ["alice"], "action": "n"}).to_string();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-key")],
        vec![("Authorization", "Basic dGVzdA==")],
    ] {
        let (status, reply) =
            http_request(a.addr, "POST", "/api/publish", &headers, body.as_bytes()).await;
        assert_eq!(status, 401, "{headers:?}");
        assert_eq!(reply, json!({"error": "missing or invalid API key"}));
    }
    let (status, _) = http_request(a.addr, "GET", "/api/nodes", &[], b"").await;
    assert_eq!(status, 401);
    for key in [KEY, OLD_KEY] {
        let auth = bearer(key);
        let (status, reply) = http_request(
            a.addr,
            "POST",
            "/api/publish",
            &[("Authorization", &auth)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
    }
    let plain = backend.node("p").await;
    let auth = bearer(KEY);
    for (method, path) in [
        ("POST", "/api/publish"),
        ("GET", "/api/nodes"),
        ("GET", "/api/users/alice"),
    ] {
        let (status, _) =
            http_request(plain.addr, method, path, &[("Authorization", &auth)], b"{}").await;
        assert_eq!(status, 404, "{path} without --api-key");
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named_and_nothing_is_sent() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", api).await;
    let mut alice = a.connect("alice").await;
    let auth = bearer(KEY);
    let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
        (b"{not json".to_vec(), None),
        (
            br#"{"to":["alice"],"action":"n","color":"red"}"#.to_vec(),
            Some("color"),
        ),
        (br#"{"to":["al ice"],"action":"n"}"#.to_vec(), Some("to")),
        (
            br#"{"to":["alice"],"action":"n","data":"x"}"#.to_vec(),
            Some("data"),
        ),
        (
            br#"{"to":["alice"],"action":"error"}"#.to_vec(),
            Some("action"),
        ),
        (
            br#"{"to":["alice"],"action":"n","from":"@server"}"#.to_vec(),
            Some("from"),
        ),
        (
            // The first item is fine: a batch is checked whole before anything is sent.
            br#"[{"to":["alice"],"action":"n"},{"to":["alice"],"action":"n","data":1}]"#.to_vec(),
            Some("[1].data"),
        ),
        (
            json!(vec![json!({"to": ["alice"], "action": "n"}); 6])
                .to_string()
                .into_bytes(),
            None,
        ),
    ];
    for (body, field) in cases {
        let (status, reply) = http_request(
            a.addr,
            "POST",
            "/api/publish",
            &[("Authorization", &auth)],
            &body,
        )
        .await;
        let shown = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{shown}: {reply}");
        assert!(reply["error"].is_string(), "{shown}: {reply}");
        assert_eq!(reply["field"].as_str(), field, "{shown}: {reply}");
    }
    let big = json!({"to": ["alice"], "action": "n", "data": {"pad": "x".repeat(5000)}});
    let (status, reply) = post(a.addr, "/api/publish", &big).await;
    assert_eq!(status, 413, "{reply}");
    assert!(reply["error"].is_string());
    expect_only_marker(a.addr, &mut [&mut alice]).await;
}

on_both!(a_repeated_idempotency_key_returns_the_first_reply_and_sends_nothing);

async fn a_repeated_idempotency_key_returns_the_first_reply_and_sends_nothing(backend: Backend) {
    let a = backend.node_with("a", api).await;
    let b = backend.node_with("b", api).await;
    let mut alice = b.connect("alice").await;
    let auth = bearer(KEY);
    let body = json!({"to": ["alice", "bob"], "action": "charge", "data": {"id": 7}}).to_string();
    let headers = [
        ("Authorization", auth.as_str()),
        ("Idempotency-Key", "req-1"),
    ];
    let (status, first) =
        http_request(a.addr, "POST", "/api/publish", &headers, body.as_bytes()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["sent"], json!(["alice"]));
    assert_eq!(alice.recv().await["data"], json!({"id": 7}));
    // bob comes online: a repeat still answers what the first request did.
    let _bob = a.connect("bob").await;
    for node in [&a, &b] {
        let (status, again) =
            http_request(node.addr, "POST", "/api/publish", &headers, body.as_bytes()).await;
        assert_eq!(status, 200);
        assert_eq!(again, first);
    }
    let (status, _) = post(
        a.addr,
        "/api/publish",
        &json!({"to": ["alice"], "action": "marker"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        alice.recv().await["action"],
        "marker",
        "the repeats sent nothing"
    );
}

on_both!(disconnect_closes_every_session_with_4007_and_the_reason);

async fn disconnect_closes_every_session_with_4007_and_the_reason(backend: Backend) {
    let tune = |c: &mut wsbus::NodeConfig| {
        c.api_keys = vec![KEY.to_owned()];
        c.max_sessions_per_user = 2;
    };
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let mut here = a.connect("alice").await;
    let mut there = b.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let (status, reply) = post(
        a.addr,
        "/api/disconnect",
        &json!({"user": "alice", "reason": "banned"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"user": "alice", "sessions": 2}));
    here.expect_close_with(4007, "banned").await;
    there.expect_close_with(4007, "banned").await;
    expect_only_marker(a.addr, &mut [&mut bob]).await;
    let (status, reply) = post(a.addr, "/api/disconnect", &json!({"user": "bob"})).await;
    assert_eq!(status, 200, "{reply}");
    bob.expect_close_with(4007, "disconnected by the server")
        .await;
    let (status, reply) = post(a.addr, "/api/disconnect", &json!({"usr": "bob"})).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], "usr");
}

on_both!(users_rooms_and_nodes_can_be_looked_up);

async fn users_rooms_and_nodes_can_be_looked_up(backend: Backend) {
    let a = backend.node_with("a", api).await;
    let b = backend.node_with("b", api).await;
    let mut alice = b.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    let (status, reply) = get(a.addr, "/api/users/alice").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["online"], true);
    assert_eq!(reply["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(reply["sessions"][0]["node"], "b");
    assert!(reply["sessions"][0]["since"].as_u64().unwrap() > 1_700_000_000_000);
    let (status, reply) = get(a.addr, "/api/users/zed").await;
    assert_eq!(status, 200);
    assert_eq!(reply, json!({"online": false, "sessions": []}));
    let (status, reply) = get(a.addr, "/api/users/bad%20id").await;
    assert_eq!(status, 400, "{reply}");
    let (status, reply) = get(a.addr, "/api/rooms/lobby").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"room": "lobby", "users": ["alice", "bob"]}));
    let (status, reply) = get(a.addr, "/api/nodes").await;
    assert_eq!(status, 200, "{reply}");
    let mut ids: Vec<&str> = reply["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"]);
}

#[tokio::test]
async fn wsbus_publish_sends_from_the_command_line() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", api).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    bob.join("lobby").await;
    let url = format!("http://{}", a.addr);
    let run = |args: Vec<&str>| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
            .arg("publish")
            .args(args)
            .args(["--url", &url])
            .env("WSBUS_API_KEYS", format!("{KEY},{OLD_KEY}"))
            .output()
    };
    let out = run(vec![
        "--to",
        "alice,zed",
        "--room",
        "lobby",
        "--action",
        "notice",
        "--data",
        r#"{"x":1}"#,
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply,
        json!({"sent": ["alice"], "offline": ["zed"], "rooms": {"lobby": 1}})
    );
    let frame = json!({"from": "@server", "action": "notice", "data": {"x": 1}});
    assert_eq!(alice.recv().await, frame);
    assert_eq!(bob.recv().await, frame);
    let out = run(vec!["--to", "alice", "--action", "error"])
        .await
        .unwrap();
    assert!(!out.status.success(), "action `error` is refused");
    expect_only_marker(a.addr, &mut [&mut alice]).await;
}

on_both!(relayed_actions_reach_users_and_rooms_like_messages);

/// `--relay-actions`: a listed action goes to a user or a room (on any node) with its data
/// as sent; errors are those of `message`; unlisted actions stay unknown.
async fn relayed_actions_reach_users_and_rooms_like_messages(backend: Backend) {
    let tune = |c: &mut wsbus::NodeConfig| c.relay_actions = vec!["typing".into(), "read".into()];
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;
    alice
        .send_raw(r#"{"action":"typing","data":{"to":"bob","state":"on","at":[1,2]}}"#)
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"from": "alice", "action": "typing",
               "data": {"to": "bob", "state": "on", "at": [1, 2]}})
    );
    alice.join("lobby").await;
    bob.join("lobby").await;
    assert_eq!(alice.recv().await["action"], "presence");
    carol.join("lobby").await;
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.recv().await["action"], "presence");
    }
    bob.send_raw(r#"{"action":"read","data":{"room":"lobby","upto":9}}"#)
        .await;
    let frame = json!({"from": "bob", "action": "read", "data": {"room": "lobby", "upto": 9}});
    assert_eq!(alice.recv().await, frame);
    assert_eq!(carol.recv().await, frame);
    alice
        .send_raw(r#"{"action":"typing","data":{"to":"zed"}}"#)
        .await;
    alice.expect_error("User 'zed' not found").await;
    alice
        .send_raw(r#"{"action":"typing","data":{"room":"elsewhere"}}"#)
        .await;
    alice.expect_error("not in room 'elsewhere'").await;
    alice
        .send_raw(r#"{"action":"reaction","data":{"to":"bob"}}"#)
        .await;
    alice.expect_error("unknown action 'reaction'").await;
    bob.expect_nothing_from(&mut alice).await;
}

#[tokio::test]
async fn a_built_in_action_cannot_be_relayed() {
    let backend = Backend::single().await;
    for name in ["error", "message", "presence", "a b"] {
        let mut config = backend.config("a");
        config.relay_actions = vec![name.to_owned()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = wsbus::run(config, listener, std::future::pending()).await;
        assert!(
            matches!(result, Err(wsbus::NodeError::Config(_))),
            "{name}: {result:?}"
        );
    }
}

/// The API's shared Redis connection is replaced after Redis restarts: publishing answers
/// 503 (nothing sent) while Redis is away, and works again once it is back.
#[tokio::test]
async fn publishing_recovers_after_redis_restarts() {
    let mut redis = Redis::start().await.unwrap();
    let port = redis.port();
    let mut config = config("a", &redis.url());
    config.api_keys = vec![KEY.to_owned()];
    let a = Node::start_with(config).await;
    let body = json!({"to": ["zed"], "action": "n"});
    let (status, reply) = post(a.addr, "/api/publish", &body).await;
    assert_eq!(status, 200, "{reply}");
    redis.kill().await;
    let (status, reply) = post(a.addr, "/api/publish", &body).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply, json!({"error": "bus unavailable"}));
    let _redis = Redis::start_on(port).await.unwrap();
    eventually(DEADLINE, "publishing works again", || async {
        let (status, _) = post(a.addr, "/api/publish", &body).await;
        (status == 200).then_some(())
    })
    .await;
}
