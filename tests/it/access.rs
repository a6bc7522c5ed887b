//! Who may be where: `--room-access` (open, token, server) with the token's `rooms` claim,
//! reading a room only from inside it, server-side joins and leaves across nodes and
//! sessions (HTTP, ingress, CLI), the token's `join` claim, and token lifetime (close 4008,
//! `refresh`, thousands expiring in the same second).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wsbus::config::RoomAccess;

use crate::common::*;
use crate::on_both;

const SECRET: &str = "access-test-secret-of-at-least-32-bytes";
const KEY: &str = "access-test-api-key";

/// A node checking tokens, with the API and 3 sessions per user.
async fn secure_node(backend: &Backend, id: &str, access: Option<RoomAccess>) -> Node {
    secure_node_with(backend, id, access, |_| {}).await
}

async fn secure_node_with(
    backend: &Backend,
    id: &str,
    access: Option<RoomAccess>,
    tune: impl FnOnce(&mut wsbus::NodeConfig),
) -> Node {
    backend
        .node_with(id, |c| {
            c.insecure = false;
            c.jwt_secret = Some(SECRET.to_owned());
            c.room_access = access;
            c.api_keys = vec![KEY.to_owned()];
            c.max_sessions_per_user = 3;
            c.ingress_claim_idle = Duration::from_millis(500);
            tune(c);
        })
        .await
}

/// A token for `user` expiring in `ttl` seconds, with these `rooms` and `join` claims.
fn token(user: &str, ttl: u64, rooms: Option<&[&str]>, join: &[&str]) -> String {
    token_until(user, now_secs() + ttl, rooms, join)
}

fn token_until(user: &str, exp: u64, rooms: Option<&[&str]>, join: &[&str]) -> String {
    let claims = wsbus::auth::Claims {
        sub: user.to_owned(),
        exp,
        iat: now_secs(),
        rooms: rooms.map(|r| r.iter().map(|s| s.to_string()).collect()),
        join: join.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    wsbus::auth::mint_claims(&claims, Some(SECRET.as_bytes()), None).unwrap()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn connect_with(node: &Node, user: &str, token: &str) -> Client {
    let url = format!("{}?token={token}", node.url(user));
    Client::connect_url(&url, user)
        .await
        .unwrap_or_else(|status| panic!("{user}: HTTP {status}"))
}

async fn send(client: &mut Client, action: &str, data: Value) {
    client
        .send_raw(&json!({"action": action, "data": data}).to_string())
        .await;
}

/// The next frame that is not a presence event.
async fn recv_skipping_presence(client: &mut Client) -> Value {
    loop {
        let v = client.recv().await;
        if v["action"] != "presence" {
            return v;
        }
    }
}

async fn expect_joined(client: &mut Client, room: &str) {
    let v = recv_skipping_presence(client).await;
    assert_eq!(
        (v["action"].as_str(), v["data"]["room"].as_str()),
        (Some("joined"), Some(room)),
        "{}: {v}",
        client.user
    );
}

async fn expect_left(client: &mut Client, room: &str) {
    let v = recv_skipping_presence(client).await;
    assert_eq!(
        v,
        json!({"from": client.user, "action": "left", "data": {"room": room}})
    );
}

async fn join(client: &mut Client, room: &str) {
    send(client, "join", json!({"room": room})).await;
    expect_joined(client, room).await;
}

async fn refused(client: &mut Client, room: &str) {
    send(client, "join", json!({"room": room})).await;
    client
        .expect_error(&format!("not allowed to join room '{room}'"))
        .await;
}

/// Nothing arrives for `client` within a short window (it would have, had it been sent).
async fn expect_nothing(client: &mut Client) {
    if let Some(e) = client.next_event_within(Duration::from_millis(300)).await {
        panic!("{}: unexpected {e:?}", client.user);
    }
}

async fn api(addr: SocketAddr, path: &str, body: &Value, key: Option<&str>) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(key) = key {
        headers.push(("Idempotency-Key", key));
    }
    http_request(addr, "POST", path, &headers, body.to_string().as_bytes()).await
}

on_both!(token_mode_allows_the_rooms_of_the_claim_and_patterns);

/// With authentication the default is `token`: a client joins the rooms its `rooms` claim
/// names (ids exactly, `prefix*` by prefix) and no other; without the claim, none. Leaving
/// is always allowed, and rooms stay readable only from inside.
async fn token_mode_allows_the_rooms_of_the_claim_and_patterns(backend: Backend) {
    let a = secure_node(&backend, "a", None).await;
    let rooms: &[&str] = &["lobby", "team-42-*"];
    let mut alice = connect_with(&a, "alice", &token("alice", 600, Some(rooms), &[])).await;
    join(&mut alice, "lobby").await;
    join(&mut alice, "team-42-ops").await;
    join(&mut alice, "team-42-").await;
    for room in ["lobby2", "team-43-ops", "team-4", "lob"] {
        refused(&mut alice, room).await;
    }
    send(&mut alice, "leave", json!({"room": "team-42-ops"})).await;
    expect_left(&mut alice, "team-42-ops").await;
    let mut bob = connect_with(&a, "bob", &token("bob", 600, None, &[])).await;
    refused(&mut bob, "lobby").await;
    // Recovering a room's past is a join: refused too.
    send(
        &mut bob,
        "join",
        json!({"room": "lobby", "since": 0, "epoch": ""}),
    )
    .await;
    bob.expect_error("not allowed to join room 'lobby'").await;
    send(&mut bob, "members", json!({"room": "lobby"})).await;
    bob.expect_error("not in room 'lobby'").await;
    send(
        &mut bob,
        "room_message",
        json!({"room": "lobby", "text": "hi"}),
    )
    .await;
    bob.expect_error("not in room 'lobby'").await;
    expect_nothing(&mut alice).await;
    send(&mut alice, "members", json!({"room": "lobby"})).await;
    let v = alice.recv().await;
    assert_eq!(v["data"]["users"], json!(["alice"]), "{v}");
}

on_both!(open_and_server_modes);

/// `open`: any client, any room (also the default with `--insecure`). `server`: no client
/// joins, whatever its claim; the backend still can, and the client may leave.
async fn open_and_server_modes(backend: Backend) {
    let open = secure_node(&backend, "open", Some(RoomAccess::Open)).await;
    let mut alice = connect_with(&open, "alice", &token("alice", 600, None, &[])).await;
    join(&mut alice, "anything").await;
    let insecure = backend.node("insecure").await;
    let mut carol = insecure.connect("carol").await;
    join(&mut carol, "anything").await;

    let server = secure_node(&backend, "server", Some(RoomAccess::Server)).await;
    let mut bob = connect_with(&server, "bob", &token("bob", 600, Some(&["*"]), &[])).await;
    refused(&mut bob, "lobby").await;
    let (status, reply) = api(
        server.addr,
        "/api/join",
        &json!({"user": "bob", "room": "lobby"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"user": "bob", "room": "lobby", "sessions": 1})
    );
    expect_joined(&mut bob, "lobby").await;
    send(&mut bob, "members", json!({"room": "lobby"})).await;
    assert_eq!(bob.recv().await["data"]["users"], json!(["bob"]));
    send(&mut bob, "leave", json!({"room": "lobby"})).await;
    expect_left(&mut bob, "lobby").await;
}

/// Reading a room needs membership in every mode: `members`, a room's `history`, and
/// presence events reach members only.
#[tokio::test]
async fn reading_a_room_needs_membership() {
    let backend = Backend::single().await;
    let a = backend.node_with("a", |c| c.history = 100).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    join(&mut alice, "team").await;
    send(
        &mut alice,
        "room_message",
        json!({"room": "team", "text": "secret"}),
    )
    .await;
    send(&mut bob, "history", json!({"room": "team", "since": 0})).await;
    bob.expect_error("not in room 'team'").await;
    send(&mut bob, "members", json!({"room": "team"})).await;
    bob.expect_error("not in room 'team'").await;
    let mut carol = a.connect("carol").await;
    join(&mut carol, "team").await;
    let v = alice.recv().await;
    assert_eq!(
        (v["action"].as_str(), v["from"].as_str()),
        (Some("presence"), Some("carol")),
        "{v}"
    );
    expect_nothing(&mut bob).await;
}

on_both!(server_side_join_and_leave_reach_every_session_on_every_node);

/// `POST /api/join` puts every live session of the user in the room, here and on another
/// node (each gets `joined`, the members one presence event); `/api/leave` takes them out.
/// A room at its limit answers `room 'x' is full` to the caller.
async fn server_side_join_and_leave_reach_every_session_on_every_node(backend: Backend) {
    let tune = |c: &mut wsbus::NodeConfig| c.max_room_members = 2;
    let a = secure_node_with(&backend, "a", Some(RoomAccess::Server), tune).await;
    let b = secure_node_with(&backend, "b", Some(RoomAccess::Server), tune).await;
    let t = token("alice", 600, None, &[]);
    let mut alice = vec![
        connect_with(&a, "alice", &t).await,
        connect_with(&a, "alice", &t).await,
        connect_with(&b, "alice", &t).await,
    ];
    let mut bob = connect_with(&a, "bob", &token("bob", 600, None, &[])).await;
    let body = json!({"user": "bob", "room": "team"});
    assert_eq!(api(b.addr, "/api/join", &body, None).await.0, 200);
    expect_joined(&mut bob, "team").await;

    let body = json!({"user": "alice", "room": "team"});
    let (status, reply) = api(b.addr, "/api/join", &body, None).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"user": "alice", "room": "team", "sessions": 3})
    );
    for session in &mut alice {
        expect_joined(session, "team").await;
    }
    let v = bob.recv().await;
    assert_eq!(v["data"], json!({"room": "team", "event": "join"}), "{v}");
    expect_nothing(&mut bob).await;
    // Joined by the backend, a session is a member like any other.
    send(
        &mut alice[2],
        "room_message",
        json!({"room": "team", "text": "hi"}),
    )
    .await;
    assert_eq!(bob.recv().await["data"]["text"], "hi");
    for other in &mut alice[..2] {
        assert_eq!(other.recv().await["data"]["text"], "hi");
    }
    // Again: nothing changes, no second `joined`.
    let (status, reply) = api(a.addr, "/api/join", &body, None).await;
    assert_eq!((status, &reply["sessions"]), (200, &json!(3)), "{reply}");
    expect_nothing(&mut alice[0]).await;

    let carol = json!({"user": "carol", "room": "team"});
    let mut carol_ws = connect_with(&a, "carol", &token("carol", 600, None, &[])).await;
    let (status, reply) = api(b.addr, "/api/join", &carol, None).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(
        reply,
        json!({"error": "room 'team' is full", "field": "room"})
    );
    expect_nothing(&mut carol_ws).await;

    let (status, reply) = api(a.addr, "/api/leave", &body, None).await;
    assert_eq!((status, &reply["sessions"]), (200, &json!(3)), "{reply}");
    for session in &mut alice {
        expect_left(session, "team").await;
    }
    let v = bob.recv().await;
    assert_eq!(v["data"], json!({"room": "team", "event": "leave"}), "{v}");
    send(&mut alice[0], "members", json!({"room": "team"})).await;
    alice[0].expect_error("not in room 'team'").await;
}

on_both!(server_side_membership_batches_keys_and_bad_input);

/// Batches answer per item; an `Idempotency-Key` repeats the first reply without doing it
/// twice; bad input names its field; a user with no session is `sessions: 0`.
async fn server_side_membership_batches_keys_and_bad_input(backend: Backend) {
    let a = secure_node(&backend, "a", None).await;
    let mut alice = connect_with(&a, "alice", &token("alice", 600, None, &[])).await;
    let batch = json!([{"user": "alice", "room": "r1"}, {"user": "nobody", "room": "r1"}]);
    let (status, reply) = api(a.addr, "/api/join", &batch, Some("k-1")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!([
            {"user": "alice", "room": "r1", "sessions": 1},
            {"user": "nobody", "room": "r1", "sessions": 0}
        ])
    );
    expect_joined(&mut alice, "r1").await;
    let leave = json!({"user": "alice", "room": "r1"});
    assert_eq!(api(a.addr, "/api/leave", &leave, Some("k-2")).await.0, 200);
    expect_left(&mut alice, "r1").await;
    // The same key: the first reply, and alice is not joined again.
    let (status, again) = api(a.addr, "/api/join", &batch, Some("k-1")).await;
    assert_eq!((status, again), (200, reply));
    expect_nothing(&mut alice).await;
    for (body, field) in [
        (json!({"user": "a b", "room": "r"}), "user"),
        (json!({"user": "alice"}), "room"),
        (json!({"user": "alice", "room": "r", "x": 1}), "x"),
        (
            json!([{"user": "alice", "room": "r"}, {"room": "r"}]),
            "[1].user",
        ),
    ] {
        let (status, reply) = api(a.addr, "/api/join", &body, None).await;
        assert_eq!(
            (status, reply["field"].as_str()),
            (400, Some(field)),
            "{body}: {reply}"
        );
    }
    expect_nothing(&mut alice).await;
}

on_both!(ingress_and_cli_join_and_leave);

/// The same through the ingress stream (`op join|leave`) and `wsbus join|leave`.
async fn ingress_and_cli_join_and_leave(backend: Backend) {
    let a = secure_node(&backend, "a", None).await;
    let b = secure_node(&backend, "b", None).await;
    let t = token("alice", 600, None, &[]);
    let mut alice = vec![
        connect_with(&a, "alice", &t).await,
        connect_with(&b, "alice", &t).await,
    ];
    let mut conn = backend.conn().await;
    let xadd = |op: &'static str| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("wsbus:ingress")
            .arg("*")
            .arg("op")
            .arg(op)
            .arg("user")
            .arg("alice")
            .arg("room")
            .arg("ops");
        cmd
    };
    let _: String = xadd("join").query_async(&mut conn).await.unwrap();
    for session in &mut alice {
        expect_joined(session, "ops").await;
    }
    let _: String = xadd("leave").query_async(&mut conn).await.unwrap();
    for session in &mut alice {
        expect_left(session, "ops").await;
    }

    let url = format!("http://{}", b.addr);
    let cli = |op: &'static str| {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
                    .args([op, "alice", "cli", "--url", &url, "--api-key", KEY])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = cli("join").await;
    assert!(out.status.success(), "{out:?}");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        reply,
        json!({"user": "alice", "room": "cli", "sessions": 2})
    );
    for session in &mut alice {
        expect_joined(session, "cli").await;
    }
    let out = cli("leave").await;
    assert!(out.status.success(), "{out:?}");
    for session in &mut alice {
        expect_left(session, "cli").await;
    }
}

on_both!(the_join_claim_joins_before_the_first_frame);

/// A token's `join` claim puts the session in its rooms before the client's first frame is
/// read, in any mode: a frame sent at once already finds it in the room.
async fn the_join_claim_joins_before_the_first_frame(backend: Backend) {
    let a = secure_node(&backend, "a", Some(RoomAccess::Server)).await;
    let t = token("alice", 600, None, &["news", "ops"]);
    let mut alice = connect_with(&a, "alice", &t).await;
    send(&mut alice, "members", json!({"room": "news"})).await;
    expect_joined(&mut alice, "news").await;
    expect_joined(&mut alice, "ops").await;
    let v = alice.recv().await;
    assert_eq!(v["action"], "members", "{v}");
    assert_eq!(v["data"]["users"], json!(["alice"]));
}

/// A connection closes with 4008 `token expired` when its token's `exp` passes.
#[tokio::test]
async fn an_expired_token_closes_the_connection() {
    let backend = Backend::single().await;
    let a = secure_node(&backend, "a", None).await;
    let exp = now_secs() + 2;
    let mut alice = connect_with(&a, "alice", &token_until("alice", exp, None, &[])).await;
    alice.expect_close_with(4008, "token expired").await;
    assert!(now_secs() >= exp, "closed before its expiry");
    // An --insecure node reads no token and never expires a connection.
    let open = backend.node("open").await;
    let url = format!(
        "{}?token={}",
        open.url("bob"),
        token_until("bob", exp, None, &[])
    );
    let mut bob = Client::connect_url(&url, "bob").await.unwrap();
    bob.send_to("bob", "still here").await;
    bob.expect_message("bob", "still here").await;
}

on_both!(refresh_keeps_the_connection_and_applies_the_new_claims);

/// `refresh` with a valid token moves the expiry (`refreshed` with the new `exp`) and its
/// `rooms` claim applies to later joins; an invalid one answers `invalid token` and changes
/// nothing: the old expiry still closes the connection.
async fn refresh_keeps_the_connection_and_applies_the_new_claims(backend: Backend) {
    let a = secure_node(&backend, "a", None).await;
    let mut alice = connect_with(&a, "alice", &token("alice", 2, None, &[])).await;
    refused(&mut alice, "later").await;
    let exp = now_secs() + 600;
    let fresh = token_until("alice", exp, Some(&["later"]), &[]);
    send(&mut alice, "refresh", json!({"token": fresh})).await;
    assert_eq!(
        alice.recv().await,
        json!({"from": "alice", "action": "refreshed", "data": {"exp": exp}})
    );
    join(&mut alice, "later").await;
    // Past the first token's expiry (and the second it is counted in): still connected.
    if let Some(e) = alice.next_event_within(Duration::from_secs(4)).await {
        panic!("refreshed connection got {e:?}");
    }
    alice.send_to("alice", "alive").await;
    alice.expect_message("alice", "alive").await;

    let mut bob = connect_with(&a, "bob", &token("bob", 3, None, &[])).await;
    for bad in [
        "not-a-token".to_owned(),
        token("alice", 600, None, &[]),
        token_until("bob", now_secs() - 60, None, &[]),
    ] {
        send(&mut bob, "refresh", json!({"token": bad})).await;
        bob.expect_error("invalid token").await;
    }
    bob.expect_close_with(4008, "token expired").await;
}

/// Thousands of connections whose tokens expire in the same second are all closed with
/// 4008 within moments of it: one timer set per node, one pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_expiring_in_the_same_second() {
    const N: usize = 2000;
    let backend = Backend::single().await;
    let a = secure_node_with(&backend, "a", None, |c| c.max_sessions_per_user = 1).await;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(N);
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|i| {
            let user = format!("u{i}");
            let t = token(&user, 3600, None, &[]);
            let a = &a;
            async move { connect_with(a, &user, &t).await }
        });
        clients.extend(futures_util::future::join_all(batch).await);
    }
    let connected = started.elapsed();
    // One shared deadline a little ahead, set by a refresh on every connection.
    let exp = now_secs() + 5;
    for client in &mut clients {
        let fresh = token_until(&client.user.clone(), exp, None, &[]);
        send(client, "refresh", json!({"token": fresh})).await;
    }
    for client in &mut clients {
        assert_eq!(client.recv().await["action"], "refreshed");
    }
    let closes = clients.iter_mut().map(|c| async move {
        c.expect_close(4008).await;
        std::time::SystemTime::now()
    });
    let closed_at = futures_util::future::join_all(closes).await;
    let last = closed_at.iter().max().unwrap();
    let first = closed_at.iter().min().unwrap();
    let exp_time = std::time::UNIX_EPOCH + Duration::from_secs(exp);
    assert!(*first >= exp_time, "a connection closed before its expiry");
    let spread = last.duration_since(exp_time).unwrap();
    eprintln!("{N} connections in {connected:?}; all closed with 4008 within {spread:?} after exp");
    assert!(spread < Duration::from_secs(5), "closing took {spread:?}");
}

/// `wsbus token --rooms --join` mints the claims a node reads.
#[tokio::test]
async fn wsbus_token_mints_rooms_and_join_claims() {
    let backend = Backend::single().await;
    let a = secure_node(&backend, "a", None).await;
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
            .args([
                "token",
                "alice",
                "--ttl",
                "10m",
                "--rooms",
                "lobby,team-42-*",
            ])
            .args(["--join", "news"])
            .env("WSBUS_JWT_SECRET", SECRET)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let minted = String::from_utf8(out.stdout).unwrap();
    let mut alice = connect_with(&a, "alice", minted.trim()).await;
    expect_joined(&mut alice, "news").await;
    join(&mut alice, "team-42-x").await;
    refused(&mut alice, "team-43").await;
}
