//! History and recovery (`--history`): offsets and epochs on every kind of frame, recovery
//! on connect and on join (with and without a gap, and each reason it cannot be made), no
//! gap and no duplicate where replay meets live delivery, offline-for-a-moment delivery,
//! several sessions sharing one stream, the `history` action, the Redis cost, and the
//! failures: a killed node, a deploy (SIGTERM), Redis restarted empty, Redis down.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;
use crate::on_both;

const KEY: &str = "history-test-api-key-0123456789";

/// History on (100 per stream), a relayed action and an API key.
fn history(c: &mut wsbus::config::NodeConfig) {
    c.history = 100;
    c.relay_actions = vec!["typing".to_owned()];
    // Relayed actions are transient unless listed here.
    c.stored_relay_actions = vec!["typing".to_owned()];
    c.api_keys = vec![KEY.to_owned()];
}

/// Node `a` in this process and a `wsbus serve` process `id`, both with history. Node a
/// judges a node dead after 4 s of silence: a process stopped on purpose stays live long
/// enough for what is sent to it meanwhile to reach its inbox, on a busy machine too.
async fn node_and_process(backend: &Backend, id: &str) -> (Node, NodeProcess) {
    let a = backend
        .node_with("a", |c| {
            history(c);
            c.node_ttl = Duration::from_secs(4);
        })
        .await;
    let flags = ["--history", "100"];
    let p = NodeProcess::start_with_flags(id, &backend.cli_args(), &flags).await;
    (a, p)
}

fn since_url(node: &Node, user: &str, since: u64, epoch: &str) -> String {
    format!("{}?since={since}&epoch={epoch}", node.url(user))
}

async fn connect_since(node: &Node, user: &str, since: u64, epoch: &str) -> Client {
    Client::connect_url(&since_url(node, user, since, epoch), user)
        .await
        .unwrap_or_else(|s| panic!("connect {user}: HTTP {s}"))
}

/// Connects `user` with `since`, retrying while a session that is gone still holds the
/// user (its node died and is not yet known dead), as a client's reconnect loop would.
async fn reconnect_since(node: &Node, user: &str, since: u64, epoch: &str) -> Client {
    let url = since_url(node, user, since, epoch);
    eventually(Duration::from_secs(10), "the reconnect is accepted", || {
        let url = url.clone();
        async move {
            let mut c = Client::connect_url(&url, user).await.ok()?;
            // A session with `since` always hears back (its replay, then `recovered`); a
            // refused one hears `not unique session` and a close.
            match c.next_event().await {
                Event::Json(v) if v["data"]["error"] == "not unique session" => None,
                Event::Closed(_) => None,
                Event::Json(v) => {
                    c.pushed_back(v);
                    Some(c)
                }
            }
        }
    })
    .await
}

/// Waits until a stream (`u:<user>` or `r:<room>`) has given offset `top` (entry ids are
/// `0-<offset>`).
async fn wait_top(backend: &Backend, stream: &str, top: u64) {
    let key = format!("wsbus:{{{stream}}}:history");
    let want = format!("0-{top}");
    eventually(DEADLINE, "the stream's top", || {
        let (key, want) = (key.clone(), want.clone());
        async move {
            let mut conn = backend.conn().await;
            let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .ok()?;
            (last.first().map(|(id, _)| id) == Some(&want)).then_some(())
        }
    })
    .await
}

/// The next frame that is not a presence event.
async fn recv(client: &mut Client) -> Value {
    loop {
        let v = client.recv().await;
        if v["action"] != "presence" {
            return v;
        }
    }
}

async fn publish(addr: std::net::SocketAddr, body: Value) {
    let auth = format!("Bearer {KEY}");
    let (status, reply) = http_request(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
}

fn offset(v: &Value) -> u64 {
    v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset in {v}"))
}

fn epoch(v: &Value) -> String {
    v["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {v}"))
        .to_owned()
}

on_both!(every_frame_of_a_stream_carries_its_place);

/// Direct messages (same node and across), relays and API publishes to a user land in the
/// user's stream (1, 2, 3, …, one epoch); room messages, room relays and room publishes in
/// the room's, with a top-level `room`. Presence and replies carry no offset.
async fn every_frame_of_a_stream_carries_its_place(backend: Backend) {
    let a = backend.node_with("a", history).await;
    let b = backend.node_with("b", history).await;
    let mut alice = a.connect("alice").await;
    let mut carol = a.connect("carol").await;
    let mut bob = b.connect("bob").await;

    alice.send_to("bob", "across").await;
    carol.send_to("bob", "also across").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(recv(&mut bob).await);
    }
    got.sort_by_key(offset);
    assert_eq!(got.iter().map(offset).collect::<Vec<_>>(), [1, 2]);
    let e = epoch(&got[0]);
    assert_eq!(epoch(&got[1]), e);
    let first = got.iter().find(|v| v["from"] == "alice").unwrap();
    assert_eq!(
        first,
        &json!({"from": "alice", "action": "message", "data": {"to": "bob", "text": "across"},
                "offset": offset(first), "epoch": e})
    );
    alice.send_to("carol", "same node").await;
    let v = recv(&mut carol).await;
    assert_eq!(
        (v["data"]["text"].as_str(), offset(&v)),
        (Some("same node"), 1)
    );

    // A relay and an API publish to bob: the same stream, next offsets.
    alice
        .send_raw(&json!({"action": "typing", "data": {"to": "bob"}}).to_string())
        .await;
    let v = recv(&mut bob).await;
    assert_eq!(
        (v["action"].as_str(), offset(&v)),
        (Some("typing"), 3),
        "{v}"
    );
    publish(
        a.addr,
        json!({"to": ["bob"], "action": "notice", "data": {"n": 1}}),
    )
    .await;
    let v = recv(&mut bob).await;
    assert_eq!(
        (v["action"].as_str(), offset(&v), epoch(&v)),
        (Some("notice"), 4, e.clone())
    );

    // A room: its own stream, whoever sends, with the room named on top.
    let j = alice.join_with(json!({"room": "lobby"})).await;
    assert_eq!(
        (j["data"]["offset"].as_u64(), j["data"].get("recovered")),
        (Some(0), None),
        "{j}"
    );
    bob.join_with(json!({"room": "lobby"})).await;
    carol.join_with(json!({"room": "lobby"})).await;
    alice
        .send_raw(
            &json!({"action": "room_message", "data": {"room": "lobby", "text": "hi all"}})
                .to_string(),
        )
        .await;
    for client in [&mut bob, &mut carol] {
        let v = recv(client).await;
        assert_eq!(v["room"], "lobby", "{v}");
        assert_eq!(
            (v["data"]["text"].as_str(), offset(&v)),
            (Some("hi all"), 1)
        );
    }
    bob.send_raw(&json!({"action": "typing", "data": {"room": "lobby"}}).to_string())
        .await;
    publish(
        b.addr,
        json!({"rooms": ["lobby"], "action": "notice", "data": {"n": 2}}),
    )
    .await;
    for client in [&mut alice, &mut carol] {
        let got = [recv(client).await, recv(client).await];
        assert_eq!(
            (got[0]["action"].as_str(), offset(&got[0])),
            (Some("typing"), 2),
            "{got:?}"
        );
        let last = &got[1];
        assert_eq!(
            (last["action"].as_str(), offset(last)),
            (Some("notice"), 3),
            "{got:?}"
        );
    }
    // The sender's own room message does not come back; its order has no hole for it.
    let v = recv(&mut bob).await;
    assert_eq!(
        (v["action"].as_str(), offset(&v)),
        (Some("notice"), 3),
        "{v}"
    );
}

on_both!(a_reconnect_with_since_replays_the_gap_then_goes_live);

/// Bob drops; messages sent meanwhile are stored (no `not found`), replayed on his
/// reconnect (to another node) after `since`, followed by `recovered`, then live ones.
async fn a_reconnect_with_since_replays_the_gap_then_goes_live(backend: Backend) {
    let a = backend.node_with("a", history).await;
    let b = backend.node_with("b", history).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "1").await;
    let v = recv(&mut bob).await;
    let (since, e) = (offset(&v), epoch(&v));
    bob.close().await;
    backend.wait_unregistered("bob").await;
    for text in ["2", "3"] {
        alice.send_to("bob", text).await;
    }
    // Stored, not refused: no `not found` came back to alice.
    wait_top(&backend, "u:bob", 3).await;
    alice.expect_nothing().await;
    // A backend's publish is kept too; its reply says bob is offline.
    let auth = format!("Bearer {KEY}");
    let body = json!({"to": ["bob"], "action": "notice", "data": {"text": "4"}});
    let (status, reply) = http_request(
        a.addr,
        "POST",
        "/api/publish",
        &[("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        (status, &reply["offline"]),
        (200, &json!(["bob"])),
        "{reply}"
    );
    wait_top(&backend, "u:bob", 4).await;

    let mut bob = connect_since(&a, "bob", since, &e).await;
    for (text, off) in [("2", 2), ("3", 3), ("4", 4)] {
        let v = recv(&mut bob).await;
        assert_eq!(
            (v["data"]["text"].as_str(), offset(&v)),
            (Some(text), off),
            "{v}"
        );
    }
    let v = recv(&mut bob).await;
    assert_eq!(
        v,
        json!({"from": "bob", "action": "recovered",
               "data": {"recovered": true, "count": 3, "offset": 4, "epoch": e}})
    );
    alice.send_to("bob", "5").await;
    let v = recv(&mut bob).await;
    assert_eq!((v["data"]["text"].as_str(), offset(&v)), (Some("5"), 5));

    // Nothing missed: an empty recovery. And the first-frame form, for clients that cannot
    // change the URL.
    bob.close().await;
    backend.wait_unregistered("bob").await;
    let mut bob = connect_since(&b, "bob", 5, &e).await;
    assert_eq!(
        recv(&mut bob).await["data"],
        json!({"recovered": true, "count": 0, "offset": 5, "epoch": e})
    );
    bob.close().await;
    backend.wait_unregistered("bob").await;
    alice.send_to("bob", "6").await;
    wait_top(&backend, "u:bob", 6).await;
    let mut bob = b.connect("bob").await;
    bob.send_raw(&json!({"action": "recover", "data": {"since": 5, "epoch": e}}).to_string())
        .await;
    let v = recv(&mut bob).await;
    assert_eq!((v["data"]["text"].as_str(), offset(&v)), (Some("6"), 6));
    assert_eq!(
        recv(&mut bob).await["data"],
        json!({"recovered": true, "count": 1, "offset": 6, "epoch": e})
    );

    // A user who never connected (no stream) is still `not found`.
    alice.send_to("nobody", "hello?").await;
    alice.expect_error("User 'nobody' not found").await;
}

on_both!(each_reason_a_recovery_cannot_be_made);

async fn each_reason_a_recovery_cannot_be_made(backend: Backend) {
    let a = backend
        .node_with("a", |c| {
            history(c);
            c.history = 3;
            c.recover_max = 5;
            // Long enough that a busy machine's pauses between the steps below do not expire
            // the stream early; the end of the test waits for it to expire.
            c.history_ttl = Duration::from_secs(3);
        })
        .await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.send_to("bob", "1").await;
    let e = epoch(&recv(&mut bob).await);
    bob.close().await;
    backend.wait_unregistered("bob").await;
    for i in 2..=5 {
        // One at a time: messages a bus writer batches share a stream entry, trimmed whole.
        alice.send_to("bob", &i.to_string()).await;
        wait_top(&backend, "u:bob", i).await;
    }
    let recovered = |reason: &str, top: u64, e: &str| {
        json!({"from": "bob", "action": "recovered",
               "data": {"recovered": false, "reason": reason, "count": 0, "offset": top, "epoch": e}})
    };
    // Kept: 3, 4, 5. From 1, 2 is gone.
    let mut bob = connect_since(&a, "bob", 1, &e).await;
    assert_eq!(recv(&mut bob).await, recovered("trimmed", 5, &e));
    bob.close().await;
    backend.wait_unregistered("bob").await;
    let mut bob = connect_since(&a, "bob", 2, "not-this-epoch").await;
    assert_eq!(recv(&mut bob).await, recovered("epoch", 5, &e));
    bob.close().await;
    backend.wait_unregistered("bob").await;
    // The live stream continues from where it is after a failed recovery.
    alice.send_to("bob", "6").await;
    for i in 7..=12 {
        alice.send_to("bob", &i.to_string()).await;
    }
    wait_top(&backend, "u:bob", 12).await;
    let mut bob = connect_since(&a, "bob", 5, &e).await;
    assert_eq!(recv(&mut bob).await, recovered("too_many", 12, &e));
    bob.close().await;
    backend.wait_unregistered("bob").await;
    // Nobody writes for the TTL: the stream expires.
    let expired = || async {
        let keys = backend.keys().await;
        (!keys.iter().any(|k| k.contains("{u:bob}:h"))).then_some(())
    };
    eventually(DEADLINE, "bob's stream expired", expired).await;
    let mut bob = connect_since(&a, "bob", 12, &e).await;
    let v = recv(&mut bob).await;
    assert_eq!(v["data"]["reason"], "expired", "{v}");
    assert_ne!(epoch(&v["data"]), e, "a new epoch");
    assert_eq!(v["data"]["offset"], 0);
    // After the TTL a user with no session is no one to store for.
    bob.close().await;
    backend.wait_unregistered("bob").await;
    eventually(DEADLINE, "bob's stream expired again", expired).await;
    alice.send_to("bob", "too late").await;
    alice.expect_error("User 'bob' not found").await;
}

on_both!(no_gap_and_no_duplicate_where_replay_meets_live);

/// Two senders on two nodes send without pause while bob drops (without a close) and
/// reconnects to the other node with `since`: every message arrives once, in order per
/// sender, with offsets 1..=n without a hole.
async fn no_gap_and_no_duplicate_where_replay_meets_live(backend: Backend) {
    const N: usize = 300;
    let a = backend
        .node_with("a", |c| {
            history(c);
            c.history = 2000;
        })
        .await;
    let b = backend
        .node_with("b", |c| {
            history(c);
            c.history = 2000;
        })
        .await;
    let mut bob = a.connect("bob").await;
    let senders = [("s1", &a), ("s2", &b)].map(|(user, node)| {
        let url = node.url(user);
        tokio::spawn(async move {
            let mut c = Client::connect_url(&url, user).await.unwrap();
            for i in 0..N {
                c.send_to("bob", &format!("{user} {i}")).await;
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            c
        })
    });
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut position = (0, String::new());
    while seen.len() < 2 * N / 3 {
        let v = recv(&mut bob).await;
        position = (offset(&v), epoch(&v));
        seen.push((position.0, v["data"]["text"].as_str().unwrap().to_owned()));
    }
    bob.abort();
    let mut bob = connect_since(&b, "bob", position.0, &position.1).await;
    // The replay, then `recovered` with the number of frames it replayed, then live ones.
    let before = seen.len();
    let mut recovered = None;
    while seen.len() < 2 * N || recovered.is_none() {
        let v = recv(&mut bob).await;
        if v["action"] == "recovered" {
            assert_eq!(v["data"]["recovered"], true, "{v}");
            assert!(recovered.is_none(), "a second recovered: {v}");
            assert_eq!(
                v["data"]["count"].as_u64(),
                Some((seen.len() - before) as u64),
                "the count is what was replayed before it: {v}"
            );
            recovered = Some(seen.len());
            continue;
        }
        seen.push((offset(&v), v["data"]["text"].as_str().unwrap().to_owned()));
    }
    // Errors would have reached the senders before their last message reached bob.
    for s in senders {
        s.await.unwrap().expect_nothing().await;
    }
    bob.expect_nothing().await;
    let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (1..=2 * N as u64).collect::<Vec<_>>(),
        "offsets in order, once each"
    );
    let mut next: HashMap<String, usize> = HashMap::new();
    for (_, text) in &seen {
        let (sender, i) = text.split_once(' ').unwrap();
        let want = next.entry(sender.to_owned()).or_default();
        assert_eq!(i.parse::<usize>().unwrap(), *want, "{sender} in order");
        *want += 1;
    }
}

on_both!(a_room_is_recovered_on_join);

async fn a_room_is_recovered_on_join(backend: Backend) {
    let a = backend.node_with("a", history).await;
    let b = backend.node_with("b", history).await;
    let mut carol = a.connect("carol").await;
    let mut dave = b.connect("dave").await;
    carol.join_with(json!({"room": "r"})).await;
    dave.join_with(json!({"room": "r"})).await;
    let say = |text: &str| {
        json!({"action": "room_message", "data": {"room": "r", "text": text}}).to_string()
    };
    carol.send_raw(&say("1")).await;
    let v = recv(&mut dave).await;
    let (since, e) = (offset(&v), epoch(&v));
    dave.close().await;
    backend.wait_unregistered("dave").await;
    for t in ["2", "3"] {
        carol.send_raw(&say(t)).await;
    }
    wait_top(&backend, "r:r", 3).await;
    let mut dave = a.connect("dave").await;
    dave.send_raw(
        &json!({"action": "join", "data": {"room": "r", "since": since, "epoch": e}}).to_string(),
    )
    .await;
    for (t, off) in [("2", 2), ("3", 3)] {
        let v = recv(&mut dave).await;
        assert_eq!(
            (v["data"]["text"].as_str(), v["room"].as_str(), offset(&v)),
            (Some(t), Some("r"), off)
        );
    }
    let j = recv(&mut dave).await;
    assert_eq!(
        j,
        json!({"from": "dave", "action": "joined",
               "data": {"room": "r", "members": 2, "recovered": true, "count": 2, "offset": 3, "epoch": e}})
    );
    carol.send_raw(&say("4")).await;
    assert_eq!(offset(&recv(&mut dave).await), 4);
    // A room position from another epoch.
    dave.send_raw(&json!({"action": "leave", "data": {"room": "r"}}).to_string())
        .await;
    assert_eq!(recv(&mut dave).await["action"], "left");
    dave.send_raw(
        &json!({"action": "join", "data": {"room": "r", "since": 1, "epoch": "x"}}).to_string(),
    )
    .await;
    let j = recv(&mut dave).await;
    assert_eq!(
        (
            j["data"]["recovered"].as_bool(),
            j["data"]["reason"].as_str()
        ),
        (Some(false), Some("epoch")),
        "{j}"
    );
}

on_both!(sessions_of_one_user_share_a_stream_and_recover_on_their_own);

async fn sessions_of_one_user_share_a_stream_and_recover_on_their_own(backend: Backend) {
    let tune = |c: &mut wsbus::config::NodeConfig| c.max_sessions_per_user = 3;
    let a = backend
        .node_with("a", |c| {
            history(c);
            tune(c);
        })
        .await;
    let b = backend
        .node_with("b", |c| {
            history(c);
            tune(c);
        })
        .await;
    let mut alice = a.connect("alice").await;
    let mut phone = a.connect("bob").await;
    let mut laptop = b.connect("bob").await;
    alice.send_to("bob", "1").await;
    let (p, l) = (recv(&mut phone).await, recv(&mut laptop).await);
    assert_eq!((offset(&p), offset(&l), epoch(&p)), (1, 1, epoch(&l)));
    let e = epoch(&p);
    phone.close().await;
    alice.send_to("bob", "2").await;
    assert_eq!(offset(&recv(&mut laptop).await), 2);
    let mut phone = connect_since(&b, "bob", 1, &e).await;
    let v = recv(&mut phone).await;
    assert_eq!((v["data"]["text"].as_str(), offset(&v)), (Some("2"), 2));
    assert_eq!(recv(&mut phone).await["data"]["count"], 1);
    // The copy of what bob sends from one session, at the other, is no frame of his stream.
    phone.send_to("alice", "from the phone").await;
    let copy = recv(&mut laptop).await;
    assert_eq!(copy["data"]["text"], "from the phone");
    assert_eq!(copy.get("offset"), None, "{copy}");
    assert_eq!(offset(&recv(&mut alice).await), 1);
}

#[tokio::test]
async fn the_history_action_pages_through_a_stream() {
    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| {
            history(c);
            c.history = 5;
        })
        .await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    for i in 1..=7 {
        alice.send_to("bob", &i.to_string()).await;
        recv(&mut bob).await;
    }
    let ask = |data: Value| json!({"action": "history", "data": data}).to_string();
    bob.send_raw(&ask(json!({"limit": 0}))).await;
    let v = recv(&mut bob).await;
    let e = epoch(&v["data"]);
    assert_eq!(
        v,
        json!({"from": "bob", "action": "history",
               "data": {"since": 0, "offset": 7, "epoch": e, "messages": [], "more": true, "reason": "trimmed"}})
    );
    bob.send_raw(&ask(json!({"since": 4, "limit": 2}))).await;
    let v = recv(&mut bob).await;
    let texts: Vec<&str> = v["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        (texts, v["data"]["more"].as_bool()),
        (vec!["5", "6"], Some(true)),
        "{v}"
    );
    assert_eq!(v["data"]["messages"][0]["offset"], 5);
    bob.send_raw(&ask(json!({"since": 6, "epoch": "other"})))
        .await;
    let v = recv(&mut bob).await;
    assert_eq!(
        (
            v["data"]["reason"].as_str(),
            v["data"]["messages"].as_array().map(Vec::len)
        ),
        (Some("epoch"), Some(0))
    );
    bob.send_raw(&ask(json!({"room": "nowhere"}))).await;
    bob.expect_error("not in room 'nowhere'").await;
    bob.send_raw(&ask(json!({"limit": 1001}))).await;
    let v = recv(&mut bob).await;
    assert!(
        v["data"]["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed data"),
        "{v}"
    );

    // Without --history.
    let plain = backend.node("plain").await;
    let mut carol = plain.connect("carol").await;
    carol.send_raw(&ask(json!({}))).await;
    carol.expect_error("history is off").await;
    carol
        .send_raw(&json!({"action": "recover", "data": {"since": 1, "epoch": "e"}}).to_string())
        .await;
    carol.expect_error("history is off").await;
    let mut dan = plain.connect("dan").await;
    dan.send_to("carol", "no offsets here").await;
    let v = recv(&mut carol).await;
    assert_eq!(
        v,
        json!({"from": "dan", "action": "message", "data": {"to": "carol", "text": "no offsets here"}})
    );
}

on_both!(a_message_costs_one_append_more);

/// With history on, a direct message to another node costs its history append (which also
/// says where the recipient is) and one XADD; a room message one append and one XADD per
/// other node.
async fn a_message_costs_one_append_more(backend: Backend) {
    let a = backend.node_with("a", history).await;
    let b = backend.node_with("b", history).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.join_with(json!({"room": "r"})).await;
    bob.join_with(json!({"room": "r"})).await;
    // Warm up both streams: the first append to a stream goes through the function (a
    // plain `XADD NOMKSTREAM` makes no stream), and this counts the steady state.
    alice.send_to("bob", "warm up").await;
    recv(&mut bob).await;
    alice
        .send_raw(
            &json!({"action": "room_message", "data": {"room": "r", "text": "w"}}).to_string(),
        )
        .await;
    recv(&mut bob).await;
    let (fcall, xadd, hkeys) = (
        backend.command_calls("fcall").await,
        backend.command_calls("xadd").await,
        backend.command_calls("hkeys").await,
    );
    let envelopes = metric(a.addr, TO_BUS).await;
    const N: u64 = 50;
    for i in 0..N {
        alice.send_to("bob", &i.to_string()).await;
        alice
            .send_raw(
                &json!({"action": "room_message", "data": {"room": "r", "text": "x"}}).to_string(),
            )
            .await;
    }
    for _ in 0..2 * N {
        recv(&mut bob).await;
    }
    // One append per stream and bus-writer batch (so at most one per message), and
    // heartbeats call functions too (one per node per 100 ms): allow for them.
    let fcalls = backend.command_calls("fcall").await - fcall;
    assert!(
        fcalls <= 2 * N + 80,
        "{fcalls} function calls for {N} + {N}"
    );
    // Each message's XADD to its stream (a plain command in a transaction on a single
    // Redis, inside the append function on a cluster, which commandstats counts too), and
    // its envelope to bob's node's inbox, in an entry it may share with the rest of its bus
    // batch.
    assert_eq!(metric(a.addr, TO_BUS).await - envelopes, (2 * N) as f64);
    let xadds = backend.command_calls("xadd").await - xadd;
    assert!((2 * N + 1..=2 * 2 * N).contains(&xadds), "{xadds} XADDs");
    // The recipient's sessions are read with the append, once per stream and batch.
    let hkeys = backend.command_calls("hkeys").await - hkeys;
    assert!((1..=N).contains(&hkeys), "{hkeys}");
}

on_both!(a_killed_nodes_unread_inbox_is_recovered_elsewhere);

/// A node killed with entries in its inbox that it never read: the recipient reconnects to
/// another node with `since` and gets every one of them.
async fn a_killed_nodes_unread_inbox_is_recovered_elsewhere(backend: Backend) {
    let (a, mut victim) = node_and_process(&backend, "victim").await;
    let mut alice = a.connect("alice").await;
    let mut bob = Client::connect_url(&victim.url("bob"), "bob")
        .await
        .unwrap();
    alice.send_to("bob", "0").await;
    let v = recv(&mut bob).await;
    let (since, e) = (offset(&v), epoch(&v));
    // The victim stops reading (and then dies) with these in its inbox.
    victim.signal("STOP");
    for i in 1..=5 {
        alice.send_to("bob", &i.to_string()).await;
    }
    // Counted in envelopes: several may share a packed entry.
    let redis = wsbus::cli::open(&backend.url(), backend.is_cluster()).unwrap();
    eventually(DEADLINE, "messages wait in the victim's inbox", || async {
        let waiting = wsbus::cli::inspect(&redis, &key_names(), "victim", 100)
            .await
            .unwrap()
            .map_or(0, |envs| envs.len());
        (waiting >= 5).then_some(())
    })
    .await;
    victim.signal("KILL");
    victim.wait_exit().await;
    bob.abort();
    let mut bob = reconnect_since(&a, "bob", since, &e).await;
    for i in 1..=5 {
        let v = recv(&mut bob).await;
        assert_eq!(v["data"]["text"], i.to_string(), "{v}");
    }
    let v = recv(&mut bob).await;
    assert_eq!(
        (v["action"].as_str(), v["data"]["count"].as_u64()),
        (Some("recovered"), Some(5)),
        "{v}"
    );
    alice.expect_nothing().await;
}

on_both!(a_deploy_loses_nothing);

/// A deploy: SIGTERM closes bob's session with 1001; messages sent while he reconnects to
/// another node are all there after `since`.
async fn a_deploy_loses_nothing(backend: Backend) {
    let (a, mut old) = node_and_process(&backend, "old").await;
    let mut alice = a.connect("alice").await;
    let mut bob = Client::connect_url(&old.url("bob"), "bob").await.unwrap();
    alice.send_to("bob", "0").await;
    let v = recv(&mut bob).await;
    let (mut since, e) = (offset(&v), epoch(&v));
    // alice sends without pause until bob's old session is closed, and 10 more after that.
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut after = 0;
            let mut i = 0;
            while after < 10 {
                i += 1;
                alice.send_to("bob", &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                if closed.load(std::sync::atomic::Ordering::Acquire) {
                    after += 1;
                }
            }
            (alice, i)
        })
    };
    let mut texts = Vec::new();
    let mut term_sent = false;
    loop {
        match bob.next_event().await {
            Event::Json(v) => {
                since = offset(&v);
                texts.push(v["data"]["text"].as_str().unwrap().to_owned());
                // The deploy lands mid-stream: after a few messages arrived.
                if texts.len() == 3 {
                    old.signal("TERM");
                    term_sent = true;
                }
            }
            Event::Closed(code) => {
                assert_eq!(code, Some(1001));
                assert!(term_sent, "closed before the deploy");
                closed.store(true, std::sync::atomic::Ordering::Release);
                break;
            }
        }
    }
    let live = texts.len();
    // The node released its sessions before closing them: no wait to reconnect.
    let mut bob = connect_since(&a, "bob", since, &e).await;
    let (mut alice, sent) = sender.await.unwrap();
    while texts.len() < sent {
        let v = recv(&mut bob).await;
        if v["action"] == "recovered" {
            assert_eq!(v["data"]["recovered"], true, "{v}");
            continue;
        }
        texts.push(v["data"]["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(texts, (1..=sent).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(
        live >= 3 && sent - live >= 5,
        "{live} arrived live before the deploy closed bob, {} after it",
        sent - live
    );
    alice.expect_nothing().await;
    bob.expect_nothing().await;
    old.wait_exit().await;
}

/// Redis restarted empty: the streams' past is gone, so the epoch changes, and a client
/// recovering from the old one is told `recovered: false, reason: "epoch"`.
#[tokio::test]
async fn redis_restarted_empty_changes_the_epoch() {
    let mut backend = Backend::single().await;
    let a = backend.node_with("a", history).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.send_to("bob", "before").await;
    let v = recv(&mut bob).await;
    let (since, e) = (offset(&v), epoch(&v));
    bob.close().await;
    backend.wait_unregistered("bob").await;
    backend.restart_empty().await;
    let backend = &backend;
    eventually(DEADLINE, "alice re-registered", || async {
        backend.where_is("alice").await.is_some().then_some(())
    })
    .await;
    let mut bob = eventually(DEADLINE, "connections accepted again", || async {
        Client::connect_url(&since_url(&a, "bob", since, &e), "bob")
            .await
            .ok()
    })
    .await;
    let v = recv(&mut bob).await;
    assert_eq!(
        (
            v["action"].as_str(),
            v["data"]["recovered"].as_bool(),
            v["data"]["reason"].as_str()
        ),
        (Some("recovered"), Some(false), Some("epoch")),
        "{v}"
    );
    assert_ne!(epoch(&v["data"]), e);
}

/// Redis down: the history write fails, the sender gets `bus unavailable`, and nothing of
/// the message reaches anyone, not even a recipient on the same node.
#[tokio::test]
async fn a_failed_history_write_sends_nothing() {
    let mut backend = Backend::single().await;
    let a = backend.node_with("a", history).await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.send_to("bob", "stored").await;
    assert_eq!(offset(&recv(&mut bob).await), 1);
    backend.kill().await;
    alice.send_to("bob", "lost").await;
    alice.expect_error("bus unavailable").await;
    bob.expect_nothing().await;
}

on_both!(a_history_reply_gives_the_sessions_own_position);

/// `history` with `limit: 0` is how a client learns its position: the offset it gives is
/// the last one this session was sent, so every frame after the reply has a higher offset
/// (frames still on their way from another node are not skipped by a client that takes it).
async fn a_history_reply_gives_the_sessions_own_position(backend: Backend) {
    let a = backend.node_with("a", history).await;
    let b = backend.node_with("b", history).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let ask = json!({"action": "history", "data": {"limit": 0}}).to_string();
    let mut sent = 0;
    for _ in 0..5 {
        for _ in 0..50 {
            sent += 1;
            bob.feed_to("alice", &sent.to_string()).await;
        }
        bob.flush().await;
        alice.send_raw(&ask).await;
        let mut position = None;
        let mut last = 0;
        while last < sent {
            let v = recv(&mut alice).await;
            if v["action"] == "history" {
                position = Some(offset(&v["data"]));
                assert!(position >= Some(last), "{v} after offset {last}");
                continue;
            }
            last = offset(&v);
            if let Some(p) = position {
                assert!(last > p, "offset {last} after a reply that said {p}");
            }
        }
        if position.is_none() {
            let v = recv(&mut alice).await;
            assert_eq!(offset(&v["data"]), sent, "{v}");
        }
    }
}

#[tokio::test]
async fn a_burst_is_replayed_from_any_offset() {
    // Messages a bus writer batches for one stream are appended in one call; recovery and
    // `history` start at any offset among them.
    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| {
            history(c);
            c.history = 1000;
        })
        .await;
    let b = backend
        .node_with("b", |c| {
            history(c);
            c.history = 1000;
        })
        .await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "0").await;
    let e = epoch(&recv(&mut bob).await);
    bob.close().await;
    backend.wait_unregistered("bob").await;
    for i in 1..=200 {
        alice.feed_to("bob", &i.to_string()).await;
    }
    alice.flush().await;
    wait_top(&backend, "u:bob", 201).await;
    for since in [57, 1, 150] {
        let mut bob = connect_since(&b, "bob", since, &e).await;
        for want in since + 1..=201 {
            let v = recv(&mut bob).await;
            assert_eq!(
                (offset(&v), v["data"]["text"].as_str()),
                (want, Some((want - 1).to_string().as_str()))
            );
        }
        assert_eq!(recv(&mut bob).await["data"]["count"], 201 - since);
        bob.send_raw(
            &json!({"action": "history", "data": {"since": since + 3, "limit": 2}}).to_string(),
        )
        .await;
        let v = recv(&mut bob).await;
        let got: Vec<u64> = v["data"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(offset)
            .collect();
        assert_eq!(got, [since + 4, since + 5], "{v}");
        bob.close().await;
        backend.wait_unregistered("bob").await;
    }
}

on_both!(streams_of_connected_users_and_joined_rooms_do_not_expire);

/// A user connected (and a room joined) for longer than `--history-ttl` with no traffic keeps
/// its stream: the nodes refresh the TTL of their users' and rooms' streams, so a reconnect
/// later recovers in the same epoch instead of being told its past is gone.
async fn streams_of_connected_users_and_joined_rooms_do_not_expire(backend: Backend) {
    let tune = |c: &mut wsbus::config::NodeConfig| c.history_ttl = Duration::from_millis(1500);
    let a = backend
        .node_with("a", |c| {
            history(c);
            tune(c);
        })
        .await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    alice.join_with(json!({"room": "r"})).await;
    bob.join_with(json!({"room": "r"})).await;
    alice.send_to("bob", "1").await;
    let v = recv(&mut bob).await;
    let e = epoch(&v);
    alice
        .send_raw(
            &json!({"action": "room_message", "data": {"room": "r", "text": "a"}}).to_string(),
        )
        .await;
    let room_epoch = epoch(&recv(&mut bob).await);
    // Two TTLs without a message: watched all along, both streams are there every time,
    // and their TTLs go up again (refreshed) instead of running out.
    bob.expect_nothing().await;
    let start = std::time::Instant::now();
    let mut conn = backend.conn().await;
    let mut last = [i64::MAX; 2];
    let mut refreshed = [0; 2];
    while start.elapsed() < Duration::from_millis(2 * 1500) {
        for (i, key) in ["wsbus:{u:bob}:history", "wsbus:{r:r}:history"]
            .into_iter()
            .enumerate()
        {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                ttl > 0,
                "{key} expired (PTTL {ttl}) after {:?}",
                start.elapsed()
            );
            if ttl > last[i] {
                refreshed[i] += 1;
            }
            last[i] = ttl;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refreshed.iter().all(|&n| n >= 2),
        "TTL refreshes seen: {refreshed:?}"
    );
    alice
        .send_raw(
            &json!({"action": "room_message", "data": {"room": "r", "text": "b"}}).to_string(),
        )
        .await;
    let v = recv(&mut bob).await;
    assert_eq!((offset(&v), epoch(&v)), (2, room_epoch), "{v}");
    bob.close().await;
    backend.wait_unregistered("bob").await;
    alice.send_to("bob", "2").await;
    wait_top(&backend, "u:bob", 2).await;
    let mut bob = connect_since(&a, "bob", 1, &e).await;
    assert_eq!(recv(&mut bob).await["data"]["text"], "2");
    assert_eq!(
        recv(&mut bob).await["data"],
        json!({"recovered": true, "count": 1, "offset": 2, "epoch": e})
    );
}
