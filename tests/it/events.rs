//! The events stream (`--events`), backend actions and acknowledgements, against real Redis
//! (single and Cluster), with one events stream and with shards.

use redis::Value;
use serde_json::{Value as Json, json};
use std::collections::HashMap;

use crate::common::{Backend, Client, DEADLINE, NodeProcess, eventually, key_names};
use crate::on_both;

/// One entry of an events stream: the stream's key, the entry id and its fields.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    fields: HashMap<String, String>,
}

impl Entry {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.fields.keys().map(String::as_str).collect();
        names.sort();
        names
    }
}

/// Every entry of every events stream (`shards` of them), each stream in its order.
async fn read_events(backend: &Backend, shards: u32) -> Vec<Entry> {
    let mut conn = backend.conn().await;
    let mut out = Vec::new();
    for key in key_names().all_events(shards) {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Value::Array(entries) = reply else {
            panic!("XRANGE reply {reply:?}")
        };
        for entry in entries {
            let (_id, fields): (String, Vec<String>) = redis::from_redis_value(entry).unwrap();
            let fields = fields
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect();
            out.push(Entry {
                key: key.clone(),
                fields,
            });
        }
    }
    out
}

/// Waits until the streams hold an entry that `matches`, and returns it.
async fn wait_event(
    backend: &Backend,
    shards: u32,
    what: &str,
    matches: impl Fn(&Entry) -> bool,
) -> Entry {
    let matches = &matches;
    eventually(DEADLINE, what, || async move {
        read_events(backend, shards).await.into_iter().find(matches)
    })
    .await
}

fn is(entry: &Entry, kind: &str, user: &str) -> bool {
    entry.get("type") == Some(kind) && entry.get("user") == Some(user)
}

/// Receives frames until one with `action` arrives; those before it must be no error.
async fn recv_action(client: &mut Client, action: &str) -> Json {
    loop {
        let v = client.recv().await;
        if v["action"] == action {
            return v;
        }
        assert_ne!(v["action"], "error", "{}: {v}", client.user);
    }
}

fn frame(id: Json, action: &str, data: Json) -> String {
    json!({"id": id, "action": action, "data": data}).to_string()
}

/// Every event type, with every field, appended before what it concerns is delivered or
/// acknowledged; a session's events in order, each in its user's shard.
async fn every_event_type_with_every_field(backend: Backend, shards: u32) {
    let tune = |c: &mut wsbus::NodeConfig| {
        c.events = "all".parse().unwrap();
        c.events_shards = shards;
        c.backend_actions = vec!["order".into()];
    };
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    wait_event(&backend, shards, "bob's connect", |e| {
        is(e, "connect", "bob")
    })
    .await;

    alice
        .send_raw(&frame(json!("j1"), "join", json!({"room": "lobby"})))
        .await;
    assert_eq!(alice.recv().await["action"], "joined");
    assert_eq!(
        alice.recv().await,
        json!({"from": "alice", "action": "ack", "data": {"id": "j1"}})
    );
    bob.send_raw(&frame(json!(1), "join", json!({"room": "lobby"})))
        .await;
    assert_eq!(recv_action(&mut bob, "ack").await["data"]["id"], 1);

    // A direct message across nodes: the event is in Redis before bob has it.
    alice
        .send_raw(&frame(
            json!(7),
            "message",
            json!({"to": "bob", "text": "hi \"b\""}),
        ))
        .await;
    let got = recv_action(&mut bob, "message").await;
    assert_eq!(got["data"]["text"], "hi \"b\"");
    let message = read_events(&backend, shards).await;
    let message = message.iter().find(|e| is(e, "message", "alice"));
    assert!(
        message.is_some(),
        "the message event is appended before delivery"
    );
    assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], 7);

    alice
        .send_raw(&frame(
            json!("r"),
            "room_message",
            json!({"room": "lobby", "text": "all"}),
        ))
        .await;
    assert_eq!(
        recv_action(&mut bob, "room_message").await["data"]["text"],
        "all"
    );
    assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], "r");

    // A backend action goes to the stream, to nobody else.
    alice
        .send_raw(r#"{"id":"o1","action":"order","data":{"sku": [1, 2], "note":"x"}}"#)
        .await;
    assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], "o1");
    alice.send_to("bob", "after the order").await;
    bob.expect_message("alice", "after the order").await;

    alice
        .send_raw(&frame(json!(2), "leave", json!({"room": "lobby"})))
        .await;
    assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], 2);

    // A refused ingress entry.
    let mut conn = backend.conn().await;
    let bad_id: String = redis::cmd("XADD")
        .arg(key_names().ingress())
        .arg("*")
        .arg("bogus")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let invalid = wait_event(&backend, shards, "ingress_invalid", |e| {
        e.get("type") == Some("ingress_invalid")
    })
    .await;
    assert_eq!(invalid.get("entry"), Some(bad_id.as_str()));
    assert!(
        invalid.get("reason").is_some_and(|r| r.contains("bogus")),
        "{invalid:?}"
    );
    assert_eq!(invalid.names(), ["entry", "node", "reason", "ts", "type"]);
    assert_eq!(invalid.key, key_names().events_for("", shards));

    alice.close().await;
    bob.abort();
    wait_event(&backend, shards, "alice's disconnect", |e| {
        is(e, "disconnect", "alice")
    })
    .await;
    wait_event(&backend, shards, "bob's disconnect", |e| {
        is(e, "disconnect", "bob")
    })
    .await;
    check_alices_events(&backend, shards).await;
    let events = read_events(&backend, shards).await;
    let bob_gone = events.iter().find(|e| is(e, "disconnect", "bob")).unwrap();
    assert_eq!(
        (bob_gone.get("code"), bob_gone.get("reason")),
        (Some("1006"), Some("connection lost"))
    );
    assert_eq!(bob_gone.get("node"), Some("b"));
    for e in &events {
        if let Some(user) = e.get("user") {
            assert_eq!(
                e.key,
                key_names().events_for(user, shards),
                "{e:?} in its user's shard"
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

/// Alice's events, in the order she did things, with every field.
async fn check_alices_events(backend: &Backend, shards: u32) {
    let events: Vec<Entry> = read_events(backend, shards)
        .await
        .into_iter()
        .filter(|e| e.get("user") == Some("alice"))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.get("type").unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "connect",
            "join",
            "message",
            "room_message",
            "action",
            "message",
            "leave",
            "disconnect"
        ]
    );
    let session = events[0].get("session").unwrap().to_owned();
    let mut last_ts = 0;
    for e in &events {
        assert_eq!(e.get("node"), Some("a"));
        assert_eq!(e.get("session"), Some(session.as_str()), "one session");
        let ts: u64 = e.get("ts").unwrap().parse().unwrap();
        assert!(
            ts >= last_ts && ts > 1_700_000_000_000,
            "ts in ms, in order"
        );
        last_ts = ts;
    }
    let common = ["node", "session", "ts", "type", "user"];
    let with = |extra: &[&'static str]| {
        let mut names: Vec<&str> = common.iter().chain(extra).copied().collect();
        names.sort();
        names
    };
    assert_eq!(events[0].names(), with(&["sessions"]));
    assert_eq!(events[0].get("sessions"), Some("1"));
    assert_eq!(events[1].names(), with(&["room"]));
    assert_eq!(events[1].get("room"), Some("lobby"));
    assert_eq!(events[2].names(), with(&["data", "to"]));
    assert_eq!(events[2].get("to"), Some("bob"));
    let data: Json = serde_json::from_str(events[2].get("data").unwrap()).unwrap();
    assert_eq!(data, json!({"to": "bob", "text": "hi \"b\""}));
    assert_eq!(events[3].names(), with(&["data", "room"]));
    assert_eq!(events[3].get("room"), Some("lobby"));
    assert_eq!(events[4].names(), with(&["action", "data"]));
    assert_eq!(events[4].get("action"), Some("order"));
    // As sent, byte for byte.
    assert_eq!(
        events[4].get("data"),
        Some(r#"{"sku": [1, 2], "note":"x"}"#)
    );
    assert_eq!(events[6].names(), with(&["room"]));
    // A normal close without a reason: no `reason` field.
    assert_eq!(events[7].names(), with(&["code"]));
    assert_eq!(events[7].get("code"), Some("1000"));
}

async fn one_stream(backend: Backend) {
    every_event_type_with_every_field(backend, 1).await
}

async fn sharded(backend: Backend) {
    every_event_type_with_every_field(backend, 3).await
}

on_both!(one_stream, sharded);

/// The sessions of a node that died are reported by the node that reaps it.
async fn a_dead_nodes_sessions_are_disconnected_by_its_reaper(backend: Backend) {
    let survivor = backend
        .node_with("survivor", |c| c.events = "all".parse().unwrap())
        .await;
    let mut flags = vec!["--events", "all"];
    flags.extend(["--events-shards", "1"]);
    let victim = NodeProcess::start_with_flags("victim", &backend.cli_args(), &flags).await;
    let bob = Client::connect_url(&victim.url("bob"), "bob")
        .await
        .unwrap();
    let connect = wait_event(&backend, 1, "bob's connect", |e| is(e, "connect", "bob")).await;
    victim.signal("KILL");
    let gone = wait_event(&backend, 1, "bob's disconnect", |e| {
        is(e, "disconnect", "bob")
    })
    .await;
    assert_eq!(gone.get("node"), Some("victim"));
    assert_eq!(gone.get("session"), connect.get("session"));
    assert_eq!(
        (gone.get("code"), gone.get("reason")),
        (Some("1006"), Some("node died"))
    );
    assert_eq!(gone.get("reaped_by"), Some("survivor"));
    drop(bob);
    survivor.stop().await;
}

on_both!(a_dead_nodes_sessions_are_disconnected_by_its_reaper);

/// When the event cannot be appended, the client gets `bus unavailable` (with its id) and
/// nothing is delivered: a backend action, a message.
async fn nothing_is_delivered_that_the_backend_did_not_get(backend: Backend) {
    let node = backend
        .node_with("a", |c| {
            c.events = "message,action".parse().unwrap();
            c.backend_actions = vec!["vote".into()];
        })
        .await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    // The events stream's key holds a string: every XADD to it fails.
    let mut conn = backend.conn().await;
    redis::cmd("SET")
        .arg(key_names().events(None))
        .arg("not a stream")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    for (id, action, data) in [
        (json!("v"), "vote", json!({"n": 1})),
        (json!(3), "message", json!({"to": "bob", "text": "lost"})),
    ] {
        alice.send_raw(&frame(id.clone(), action, data)).await;
        assert_eq!(
            alice.recv().await,
            json!({"from": "alice", "action": "error", "data": {"error": "bus unavailable", "id": id}})
        );
    }
    let _: () = redis::cmd("DEL")
        .arg(key_names().events(None))
        .query_async(&mut conn)
        .await
        .unwrap();
    alice
        .send_raw(&frame(
            json!(4),
            "message",
            json!({"to": "bob", "text": "ok"}),
        ))
        .await;
    bob.expect_message("alice", "ok").await;
    assert_eq!(alice.recv().await["data"]["id"], 4);
    node.stop().await;
}

on_both!(nothing_is_delivered_that_the_backend_did_not_get);

/// Acknowledgements, with events off: every kind of frame, here and across nodes; errors
/// carry the id; without an id nothing changes.
async fn frames_with_an_id_are_acknowledged(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;
    let ack = |id: Json| json!({"from": "alice", "action": "ack", "data": {"id": id}});
    // Across nodes (through the bus writer) and here (at once).
    alice
        .send_raw(&frame(
            json!("x1"),
            "message",
            json!({"to": "bob", "text": "1"}),
        ))
        .await;
    bob.expect_message("alice", "1").await;
    assert_eq!(alice.recv().await, ack(json!("x1")));
    alice
        .send_raw(&frame(
            json!(-5),
            "message",
            json!({"to": "carol", "text": "2"}),
        ))
        .await;
    carol.expect_message("alice", "2").await;
    assert_eq!(alice.recv().await, ack(json!(-5)));
    alice
        .send_raw(&frame(json!("m"), "join", json!({"room": "somewhere"})))
        .await;
    assert_eq!(alice.recv().await["action"], "joined");
    assert_eq!(alice.recv().await, ack(json!("m")));
    // Errors carry the id: found late (by the bus writer), found at once, refused frames.
    let error = |text: &str, id: Json| json!({"from": "alice", "action": "error", "data": {"error": text, "id": id}});
    alice
        .send_raw(&frame(
            json!(9),
            "message",
            json!({"to": "nobody", "text": "?"}),
        ))
        .await;
    assert_eq!(
        alice.recv().await,
        error("User 'nobody' not found", json!(9))
    );
    alice
        .send_raw(&frame(json!("l"), "leave", json!({"room": "r"})))
        .await;
    assert_eq!(alice.recv().await, error("not in room 'r'", json!("l")));
    alice.send_raw(r#"{"id":"u","action":"fly"}"#).await;
    assert_eq!(
        alice.recv().await,
        error("unknown action 'fly'", json!("u"))
    );
    alice
        .send_raw(r#"{"id":"v","action":"message","data":[]}"#)
        .await;
    let v = alice.recv().await;
    assert_eq!(v["data"]["id"], "v");
    assert!(
        v["data"]["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed data")
    );
    alice
        .send_raw(r#"{"id":1.5,"action":"members","data":{"room":"r"}}"#)
        .await;
    alice
        .expect_error("invalid id: expected a string of at most 64 characters or an integer")
        .await;
    // Without an id: no ack.
    alice.send_to("bob", "plain").await;
    bob.expect_message("alice", "plain").await;
    alice
        .send_raw(&frame(json!("last"), "join", json!({"room": "r2"})))
        .await;
    assert_eq!(
        alice.recv().await["action"],
        "joined",
        "no ack came for the plain message"
    );
    assert_eq!(alice.recv().await, ack(json!("last")));
    a.stop().await;
    b.stop().await;
}

on_both!(frames_with_an_id_are_acknowledged);

/// A rate-limited frame's error carries its id.
#[tokio::test]
async fn a_rate_limited_frame_keeps_its_id() {
    let backend = Backend::single().await;
    let node = backend
        .node_with("a", |c| {
            c.rate_limit = 0.001;
            c.rate_burst = 1;
        })
        .await;
    let mut alice = node.connect("alice").await;
    alice
        .send_raw(&frame(json!(1), "join", json!({"room": "r"})))
        .await;
    assert_eq!(alice.recv().await["action"], "joined");
    assert_eq!(alice.recv().await["action"], "ack");
    alice
        .send_raw(&frame(json!(2), "join", json!({"room": "r"})))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"from": "alice", "action": "error", "data": {"error": "rate limited", "id": 2}})
    );
    node.stop().await;
}

/// The stream is trimmed to about `--events-maxlen` (whole stream nodes of 100 entries), by a
/// trim once a second rather than on every append.
#[tokio::test]
async fn the_stream_is_trimmed() {
    let backend = Backend::single().await;
    let node = backend
        .node_with("a", |c| {
            c.events = "message".parse().unwrap();
            c.events_maxlen = 10;
        })
        .await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    for i in 0..1000 {
        alice.feed_to("bob", &i.to_string()).await;
    }
    alice.flush().await;
    for i in 0..1000 {
        bob.expect_message("alice", &i.to_string()).await;
    }
    // Trimmed once a second, in whole stream nodes of 100 entries.
    let len = eventually(DEADLINE, "the stream trimmed to about 10", || async {
        let len: u64 = redis::cmd("XLEN")
            .arg(key_names().events(None))
            .query_async(&mut backend.conn().await)
            .await
            .unwrap();
        (len <= 210).then_some(len)
    })
    .await;
    assert!(len >= 10, "trimmed to about 10, not below: {len}");
    node.stop().await;
}

/// A backend action may not also be a relay action nor a built-in one.
#[tokio::test]
async fn backend_action_names_are_checked_at_startup() {
    for (relay, backend, why) in [
        (vec!["order"], vec!["order"], "also a relay action"),
        (vec![], vec!["message"], "built-in"),
        (vec![], vec!["ack"], "built-in"),
        (vec![], vec!["a b"], "use 1-64"),
    ] {
        let mut config = wsbus::NodeConfig::new("a", "redis://127.0.0.1:1");
        config.relay_actions = relay.into_iter().map(String::from).collect();
        config.backend_actions = backend.iter().map(|s| s.to_string()).collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = wsbus::run(config, listener, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(backend[0]) && err.contains(why), "{err}");
    }
}

/// With events off, nothing is written (and Redis sees no XADD to an events key).
#[tokio::test]
async fn events_off_write_nothing() {
    let backend = Backend::single().await;
    let node = backend.node("a").await;
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.send_to("bob", "x").await;
    bob.expect_message("alice", "x").await;
    alice.close().await;
    backend.wait_unregistered("alice").await;
    let keys = backend.keys().await;
    assert!(!keys.iter().any(|k| k.contains("events")), "{keys:?}");
    node.stop().await;
}

/// Runs `wsbus events` with `args` until it exits (it must, through `--count`); its stdout.
async fn cli_events(backend: &Backend, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .arg("events")
        .args(backend.cli_args())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run wsbus events")
}

async fn output_of(child: tokio::process::Child) -> String {
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("wsbus events exits after --count")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// `wsbus events` follows every shard, as a consumer group member (acknowledging what it
/// printed) or from the start, as JSON lines or pretty-printed.
async fn the_cli_follows_the_stream(backend: Backend) {
    let node = backend
        .node_with("a", |c| {
            c.events = "connect,message".parse().unwrap();
            c.events_shards = 2;
        })
        .await;
    let mut bob = node.connect("bob").await;
    let follower = cli_events(
        &backend,
        &[
            "--shards",
            "2",
            "--group",
            "g",
            "--consumer",
            "c1",
            "--json",
            "--count",
            "2",
        ],
    )
    .await;
    // The group exists once the follower runs: what comes next is read.
    let mut conn = backend.conn().await;
    let backend_ref = &backend;
    eventually(DEADLINE, "the group on both shards", || async move {
        let mut conn = backend_ref.conn().await;
        for key in key_names().all_events(2) {
            let groups: redis::RedisResult<Vec<Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .query_async(&mut conn)
                .await;
            if groups.map_or(true, |g| g.is_empty()) {
                return None;
            }
        }
        Some(())
    })
    .await;
    let mut alice = node.connect("alice").await;
    alice.send_to("bob", "hello").await;
    bob.expect_message("alice", "hello").await;
    let lines = output_of(follower).await;
    let events: Vec<Json> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{lines}");
    assert_eq!(events[0]["type"], "connect");
    assert_eq!(events[0]["user"], "alice");
    assert_eq!(events[1]["type"], "message");
    assert_eq!(events[1]["to"], "bob");
    assert_eq!(events[1]["stream"], key_names().events_for("alice", 2));
    for key in key_names().all_events(2) {
        let pending: (u64, Value, Value, Value) = redis::cmd("XPENDING")
            .arg(&key)
            .arg("g")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(pending.0, 0, "{key}: everything printed was acknowledged");
    }
    // From the start, pretty: bob's connect, alice's connect, alice's message.
    let pretty =
        output_of(cli_events(&backend, &["--shards", "2", "--from-start", "--count", "3"]).await)
            .await;
    let lines: Vec<&str> = pretty.lines().collect();
    assert_eq!(lines.len(), 3, "{pretty}");
    let message = lines
        .iter()
        .find(|l| l.contains(" message "))
        .expect("a message line");
    assert!(
        message.contains("alice@a#") && message.contains("to=bob"),
        "{message}"
    );
    assert!(
        message.contains(r#"data={"text":"hello","to":"bob"}"#),
        "{message}"
    );
    node.stop().await;
}

on_both!(the_cli_follows_the_stream);

/// `wsbus dev` passes every `serve` flag to its nodes, whose first log line says which
/// features are on.
#[tokio::test]
async fn dev_passes_serve_flags_to_its_nodes() {
    use tokio::io::AsyncBufReadExt;
    let base = loop {
        let p = wsbus::dev::free_port().unwrap();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["dev", "--base-port", &base.to_string(), "--history", "10"])
        .args([
            "--api-key",
            "dev-key-1",
            "--events",
            "all",
            "--backend-actions",
            "order",
        ])
        .env("RUST_LOG", "info")
        .env_remove("WSBUS_REDIS_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(DEADLINE, async {
        loop {
            let line = stderr.next_line().await.unwrap().expect("a log line");
            if line.contains("wsbus::server") {
                return line;
            }
        }
    })
    .await
    .expect("a node logs");
    assert!(first.contains("node starting"), "{first}");
    assert!(
        first.contains(
            "auth=off (insecure) api=on history=10 events=all relay_actions=none backend_actions=order"
        ),
        "{first}"
    );
    let url = format!("ws://127.0.0.1:{base}/ws/alice");
    let mut alice = eventually(DEADLINE, "dev node up", || async {
        Client::connect_url(&url, "alice").await.ok()
    })
    .await;
    alice.send_raw(&frame(json!(1), "order", json!({}))).await;
    assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], 1);
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The Python interpreter of the examples' venv (`scripts/setup --test` makes it, with the
/// `redis` package): `$WSBUS_EXAMPLES_VENV/bin/python`, by default under /tmp/wsbus-examples.
fn examples_python() -> String {
    let venv =
        std::env::var("WSBUS_EXAMPLES_VENV").unwrap_or_else(|_| "/tmp/wsbus-examples".into());
    let python = format!("{venv}/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: run scripts/setup --test (it makes a venv with the redis package)"
    );
    python
}

/// examples/chat_backend.py against real nodes (events sharded in two): it joins users to the
/// lobby on connect and greets them there, stores their chat messages in SQLite, and answers its backend action.
#[tokio::test]
async fn the_example_chat_backend_works() {
    use tokio::io::AsyncBufReadExt;
    let backend = Backend::single().await;
    let tune = |c: &mut wsbus::NodeConfig| {
        c.events = "all".parse().unwrap();
        c.events_shards = 2;
        c.backend_actions = vec!["stats".into()];
    };
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let db = std::env::temp_dir().join(format!("wsbus-chat-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/chat_backend.py");
    let mut child = tokio::process::Command::new(examples_python())
        .arg(script)
        .args(["--redis-url", &backend.url(), "--shards", "2", "--db"])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(DEADLINE, out.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(
        ready.is_some_and(|l| l.contains(r#""ready": true"#)),
        "the backend started"
    );

    let greeting = |user: &str| json!({"from": "@server", "action": "greeting", "data": {"text": format!("{user} joined the lobby")}});
    // On connect the backend joins the user to the lobby (ingress `op join`), and greets the
    // lobby on the `join` event that follows.
    let mut alice = a.connect("alice").await;
    let joined = recv_action(&mut alice, "joined").await;
    assert_eq!(joined["data"], json!({"room": "lobby", "members": 1}));
    assert_eq!(recv_action(&mut alice, "greeting").await, greeting("alice"));
    let mut bob = b.connect("bob").await;
    let joined = recv_action(&mut bob, "joined").await;
    assert_eq!(joined["data"]["room"], "lobby");
    assert_eq!(recv_action(&mut bob, "greeting").await, greeting("bob"));
    assert_eq!(recv_action(&mut alice, "greeting").await, greeting("bob"));
    alice.send_to("bob", "hi bob").await;
    bob.expect_message("alice", "hi bob").await;
    for client in [&mut alice, &mut bob] {
        client
            .send_raw(&frame(json!(1), "join", json!({"room": "r"})))
            .await;
        recv_action(client, "ack").await;
    }
    alice
        .send_raw(&frame(
            json!(2),
            "room_message",
            json!({"room": "r", "text": "hi room"}),
        ))
        .await;
    assert_eq!(
        recv_action(&mut bob, "room_message").await["data"]["text"],
        "hi room"
    );
    // The action comes after alice's messages in her shard: both are stored by then.
    alice.send_raw(&frame(json!(3), "stats", json!({}))).await;
    let stats = recv_action(&mut alice, "stats").await;
    assert_eq!(
        stats,
        json!({"from": "@server", "action": "stats", "data": {"stored": 2}})
    );

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let rows = tokio::process::Command::new(examples_python())
        .args(["-c", "import json, sqlite3, sys; print(json.dumps(sqlite3.connect(sys.argv[1]).execute('SELECT sender, to_user, room, text FROM messages ORDER BY ts, entry').fetchall()))"])
        .arg(&db)
        .output()
        .await
        .unwrap();
    let rows: Json = serde_json::from_slice(&rows.stdout).unwrap();
    assert_eq!(
        rows,
        json!([
            ["alice", "bob", null, "hi bob"],
            ["alice", null, "r", "hi room"]
        ])
    );
    let _ = std::fs::remove_file(&db);
    a.stop().await;
    b.stop().await;
}

/// With history on, a message is acknowledged by the bus writer once it is in its stream
/// (here and across nodes), and an offline recipient's stream keeps it (an ack, no error).
#[tokio::test]
async fn acks_with_history_on() {
    let backend = Backend::single().await;
    let tune = |c: &mut wsbus::NodeConfig| {
        c.history = 100;
        c.events = "message".parse().unwrap();
    };
    let a = backend.node_with("a", tune).await;
    let b = backend.node_with("b", tune).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;
    for (id, to) in [(1, "bob"), (2, "carol")] {
        alice
            .send_raw(&frame(json!(id), "message", json!({"to": to, "text": "h"})))
            .await;
        assert_eq!(recv_action(&mut alice, "ack").await["data"]["id"], id);
    }
    assert_eq!(recv_action(&mut bob, "message").await["data"]["text"], "h");
    assert_eq!(
        recv_action(&mut carol, "message").await["data"]["text"],
        "h"
    );
    a.stop().await;
    b.stop().await;
}
