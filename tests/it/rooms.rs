//! Rooms: join/leave/room_message across nodes, members, presence events, limits, and the
//! Redis cost of a room message.

use std::time::Duration;

use serde_json::{Value, json};
use wsbus::config::OnSessionLimit;

use crate::common::*;
use crate::on_both;

/// Nodes where a user may hold 4 sessions, tuned further by `tune`.
async fn node_with(backend: &Backend, id: &str, tune: impl FnOnce(&mut wsbus::NodeConfig)) -> Node {
    backend
        .node_with(id, |c| {
            c.max_sessions_per_user = 4;
            c.on_session_limit = OnSessionLimit::Reject;
            tune(c);
        })
        .await
}

async fn node(backend: &Backend, id: &str) -> Node {
    node_with(backend, id, |_| {}).await
}

/// Client-side helpers for the room actions.
trait RoomClient {
    async fn act(&mut self, action: &str, data: Value);
    async fn join(&mut self, room: &str) -> u64;
    async fn say(&mut self, room: &str, text: &str);
    async fn expect_room_message(&mut self, from: &str, room: &str, text: &str);
    async fn expect_presence(&mut self, user: &str, room: &str, event: &str);
    async fn expect_silence(&mut self);
}

impl RoomClient for Client {
    async fn act(&mut self, action: &str, data: Value) {
        self.send_raw(&json!({"action": action, "data": data}).to_string())
            .await;
    }

    /// Joins `room`; returns the member count from `joined`. A presence event about another
    /// user that arrives first is skipped: one sent just before this join (another node's
    /// member joined a moment ago, its event still on the bus) reaches this session too.
    async fn join(&mut self, room: &str) -> u64 {
        self.act("join", json!({"room": room})).await;
        let mut v = self.recv().await;
        while v["action"] == "presence" && v["from"] != self.user.as_str() {
            v = self.recv().await;
        }
        assert_eq!(v["action"], "joined", "{v}");
        assert_eq!(v["from"], self.user.as_str());
        assert_eq!(v["data"]["room"], room);
        v["data"]["members"].as_u64().expect("members is a number")
    }

    async fn say(&mut self, room: &str, text: &str) {
        self.act("room_message", json!({"room": room, "text": text}))
            .await;
    }

    async fn expect_room_message(&mut self, from: &str, room: &str, text: &str) {
        assert_eq!(
            self.recv().await,
            json!({"from": from, "action": "room_message", "data": {"room": room, "text": text}}),
            "{}",
            self.user
        );
    }

    async fn expect_presence(&mut self, user: &str, room: &str, event: &str) {
        assert_eq!(
            self.recv().await,
            json!({"from": user, "action": "presence", "data": {"room": room, "event": event}}),
            "{}",
            self.user
        );
    }

    async fn expect_silence(&mut self) {
        if let Some(e) = self.next_event_within(Duration::from_millis(300)).await {
            panic!("{}: expected nothing, got {e:?}", self.user);
        }
    }
}

on_both!(room_messages_reach_every_member_but_the_sending_session);

async fn room_messages_reach_every_member_but_the_sending_session(backend: Backend) {
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let mut alice_tab = a.connect("alice").await;
    let mut alice_phone = b.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;
    assert_eq!(alice_tab.join("lobby").await, 1);
    // A second session of the same user joining is not news: no presence event, same count.
    assert_eq!(alice_phone.join("lobby").await, 1);
    assert_eq!(bob.join("lobby").await, 2);
    alice_tab.expect_presence("bob", "lobby", "join").await;
    alice_phone.expect_presence("bob", "lobby", "join").await;
    assert_eq!(carol.join("lobby").await, 3);
    for s in [&mut alice_tab, &mut alice_phone, &mut bob] {
        s.expect_presence("carol", "lobby", "join").await;
    }
    // Joining again is idempotent.
    assert_eq!(carol.join("lobby").await, 3);

    const COUNT: usize = 30;
    for i in 0..COUNT {
        alice_tab.say("lobby", &i.to_string()).await;
    }
    for s in [&mut alice_phone, &mut bob, &mut carol] {
        for i in 0..COUNT {
            s.expect_room_message("alice", "lobby", &i.to_string())
                .await;
        }
    }
    alice_tab.expect_silence().await;

    // members: sorted user ids.
    bob.act("members", json!({"room": "lobby"})).await;
    assert_eq!(
        bob.recv().await,
        json!({"from": "bob", "action": "members", "data": {"room": "lobby", "users": ["alice", "bob", "carol"]}})
    );

    // The operator's view: `wsbus rooms` and `wsbus members`.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
            .args(args)
            .args(backend.cli_args())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let rooms = run(&["rooms"]);
    let row: Vec<&str> = rooms
        .lines()
        .find(|l| l.starts_with("lobby "))
        .unwrap_or_else(|| panic!("no lobby in {rooms}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, ["lobby", "3", "a,b"]);
    assert_eq!(
        run(&["members", "lobby"]),
        "alice a,b\nbob b\ncarol a\n",
        "each member with the nodes it is in the room on"
    );

    // Leaving: `left`, then nothing more; the user is still in while another session is.
    bob.act("leave", json!({"room": "lobby"})).await;
    assert_eq!(
        bob.recv().await,
        json!({"from": "bob", "action": "left", "data": {"room": "lobby"}})
    );
    for s in [&mut alice_tab, &mut alice_phone, &mut carol] {
        s.expect_presence("bob", "lobby", "leave").await;
    }
    alice_tab.act("leave", json!({"room": "lobby"})).await;
    alice_tab.recv().await;
    carol.say("lobby", "after").await;
    alice_phone
        .expect_room_message("carol", "lobby", "after")
        .await;
    bob.expect_silence().await;
    alice_tab.expect_silence().await;
    // Disconnecting leaves every room: alice's last session goes.
    alice_phone.close().await;
    carol.expect_presence("alice", "lobby", "leave").await;
}

on_both!(room_errors_and_limits);

async fn room_errors_and_limits(backend: Backend) {
    let a = node_with(&backend, "a", |c| {
        c.max_room_members = 2;
        c.max_rooms_per_session = 2;
        c.max_members_listed = 1;
    })
    .await;
    let mut alice = a.connect("alice").await;
    let mut bob = a.connect("bob").await;
    let mut carol = a.connect("carol").await;
    alice.say("lobby", "hi").await;
    alice.expect_error("not in room 'lobby'").await;
    alice.act("leave", json!({"room": "lobby"})).await;
    alice.expect_error("not in room 'lobby'").await;
    alice.act("join", json!({"room": "a b"})).await;
    alice.expect_error("invalid room id").await;
    alice.act("join", json!({"room": ".."})).await;
    alice.expect_error("invalid room id").await;
    alice.act("join", json!({"nope": 1})).await;
    alice
        .expect_error(r#"malformed data: expected {"room": "<room id>"}"#)
        .await;
    assert_eq!(alice.join("lobby").await, 1);
    assert_eq!(bob.join("lobby").await, 2);
    alice.expect_presence("bob", "lobby", "join").await;
    carol.act("join", json!({"room": "lobby"})).await;
    carol.expect_error("room 'lobby' is full").await;
    carol.say("lobby", "let me in").await;
    carol.expect_error("not in room 'lobby'").await;
    assert_eq!(alice.join("second").await, 1);
    alice.act("join", json!({"room": "third"})).await;
    alice.expect_error("too many rooms").await;
    // The member list is cut at --max-members-listed; only members may read it (issue 21).
    carol.act("members", json!({"room": "lobby"})).await;
    carol.expect_error("not in room 'lobby'").await;
    bob.act("members", json!({"room": "lobby"})).await;
    assert_eq!(
        bob.recv().await,
        json!({"from": "bob", "action": "members", "data": {"room": "lobby", "users": ["alice"], "truncated": true}})
    );
    // Nothing reached carol, who never got in.
    alice.say("lobby", "members only").await;
    bob.expect_room_message("alice", "lobby", "members only")
        .await;
    carol.expect_silence().await;
}

on_both!(a_room_message_costs_one_xadd_per_other_node_with_members);

async fn a_room_message_costs_one_xadd_per_other_node_with_members(backend: Backend) {
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let c = node(&backend, "c").await;
    let mut members = Vec::new();
    for (i, n) in [&b, &b, &b, &c, &c, &c].into_iter().enumerate() {
        let mut client = n.connect(&format!("m{i}")).await;
        client.join("big").await;
        members.push(client);
    }
    let mut sender = a.connect("sender").await;
    sender.join("big").await;
    // Warm up, and let the presence events of the joins pass.
    sender.say("big", "warm").await;
    for m in &mut members {
        loop {
            let v = m.recv().await;
            if v["action"] == "room_message" {
                assert_eq!(v["data"]["text"], "warm");
                break;
            }
        }
    }
    let before = backend.command_calls("xadd").await;
    const COUNT: u64 = 20;
    for i in 0..COUNT {
        sender.say("big", &i.to_string()).await;
    }
    for m in &mut members {
        for i in 0..COUNT {
            m.expect_room_message("sender", "big", &i.to_string()).await;
        }
    }
    let xadds = backend.command_calls("xadd").await - before;
    // Six members on two other nodes: two entries per message, not six.
    assert_eq!(xadds, 2 * COUNT);
}

on_both!(a_killed_nodes_users_leave_their_rooms);

async fn a_killed_nodes_users_leave_their_rooms(backend: Backend) {
    let a = node(&backend, "a").await;
    let mut args = backend.cli_args();
    args.extend(["--max-sessions-per-user".into(), "4".into()]);
    let mut victim = NodeProcess::start_with("victim", &args).await;
    let mut alice = a.connect("alice").await;
    assert_eq!(alice.join("lobby").await, 1);
    let mut doomed = Client::connect_url(&victim.url("doomed"), "doomed")
        .await
        .unwrap();
    assert_eq!(doomed.join("lobby").await, 2);
    alice.expect_presence("doomed", "lobby", "join").await;
    // Also in the room on a surviving node: stays a member when the victim dies.
    let mut hedged = a.connect("hedged").await;
    let mut hedged_v = Client::connect_url(&victim.url("hedged"), "hedged")
        .await
        .unwrap();
    assert_eq!(hedged_v.join("lobby").await, 3);
    alice.expect_presence("hedged", "lobby", "join").await;
    assert_eq!(hedged.join("lobby").await, 3);

    victim.signal("KILL");
    victim.wait_exit().await;
    let killed = std::time::Instant::now();
    alice.expect_presence("doomed", "lobby", "leave").await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "leave after {took:?}");
    hedged.expect_presence("doomed", "lobby", "leave").await;
    alice.act("members", json!({"room": "lobby"})).await;
    assert_eq!(
        alice.recv().await["data"]["users"],
        json!(["alice", "hedged"])
    );
    alice.expect_silence().await;
}
