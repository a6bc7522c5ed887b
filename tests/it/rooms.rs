//! Rooms: join/leave/room_message across nodes, members, presence events, limits, and the
//! Redis cost of a room message.

use std::time::Duration;

use serde_json::json;
use wsbus::config::OnSessionLimit;

use crate::common::*;
use crate::on_both;

/// Nodes where a user may hold 4 sessions.
fn rooms(c: &mut wsbus::NodeConfig) {
    c.max_sessions_per_user = 4;
    c.on_session_limit = OnSessionLimit::Reject;
}

on_both!(room_messages_reach_every_member_but_the_sending_session);

async fn room_messages_reach_every_member_but_the_sending_session(backend: Backend) {
    let a = backend.node_with("a", rooms).await;
    let b = backend.node_with("b", rooms).await;
    let mut alice_tab = a.connect("alice").await;
    let mut alice_phone = b.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;
    assert_eq!(alice_tab.join_count("lobby").await, 1);
    // A second session of the same user joining is not news: no presence event, same count.
    assert_eq!(alice_phone.join_count("lobby").await, 1);
    assert_eq!(bob.join_count("lobby").await, 2);
    alice_tab.expect_presence("bob", "lobby", "join").await;
    alice_phone.expect_presence("bob", "lobby", "join").await;
    assert_eq!(carol.join_count("lobby").await, 3);
    for s in [&mut alice_tab, &mut alice_phone, &mut bob] {
        s.expect_presence("carol", "lobby", "join").await;
    }
    // Joining again is idempotent.
    assert_eq!(carol.join_count("lobby").await, 3);

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
    alice_tab.expect_nothing().await;

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
    bob.expect_nothing_from(&mut carol).await;
    alice_tab.expect_nothing_from(&mut carol).await;
    // Disconnecting leaves every room: alice's last session goes.
    alice_phone.close().await;
    carol.expect_presence("alice", "lobby", "leave").await;
}

on_both!(room_errors_and_limits);

async fn room_errors_and_limits(backend: Backend) {
    let a = backend
        .node_with("a", |c| {
            rooms(c);
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
    assert_eq!(alice.join_count("lobby").await, 1);
    assert_eq!(bob.join_count("lobby").await, 2);
    alice.expect_presence("bob", "lobby", "join").await;
    carol.act("join", json!({"room": "lobby"})).await;
    carol.expect_error("room 'lobby' is full").await;
    carol.say("lobby", "let me in").await;
    carol.expect_error("not in room 'lobby'").await;
    assert_eq!(alice.join_count("second").await, 1);
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
    carol.expect_nothing_from(&mut alice).await;
}

on_both!(a_room_message_costs_one_xadd_per_other_node_with_members);

async fn a_room_message_costs_one_xadd_per_other_node_with_members(backend: Backend) {
    let a = backend.node_with("a", rooms).await;
    let b = backend.node_with("b", rooms).await;
    let c = backend.node_with("c", rooms).await;
    let mut members = Vec::new();
    for (i, n) in [&b, &b, &b, &c, &c, &c].into_iter().enumerate() {
        let mut client = n.connect(&format!("m{i}")).await;
        client.join_count("big").await;
        members.push(client);
    }
    let mut sender = a.connect("sender").await;
    sender.join_count("big").await;
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
    let envelopes = metric(a.addr, TO_BUS).await;
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
    // Six members on two other nodes: two envelopes per message, not six; and what one
    // bus batch sends one node shares an entry, so at most as many XADDs.
    assert_eq!(metric(a.addr, TO_BUS).await - envelopes, (2 * COUNT) as f64);
    assert!((2..=2 * COUNT).contains(&xadds), "{xadds} XADDs");
}

on_both!(a_killed_nodes_users_leave_their_rooms);

async fn a_killed_nodes_users_leave_their_rooms(backend: Backend) {
    let a = backend.node_with("a", rooms).await;
    let mut args = backend.cli_args();
    args.extend(["--max-sessions-per-user".into(), "4".into()]);
    let mut victim = NodeProcess::start_with("victim", &args).await;
    let mut alice = a.connect("alice").await;
    assert_eq!(alice.join_count("lobby").await, 1);
    let mut doomed = Client::connect_url(&victim.url("doomed"), "doomed")
        .await
        .unwrap();
    assert_eq!(doomed.join_count("lobby").await, 2);
    alice.expect_presence("doomed", "lobby", "join").await;
    // Also in the room on a surviving node: stays a member when the victim dies.
    let mut hedged = a.connect("hedged").await;
    let mut hedged_v = Client::connect_url(&victim.url("hedged"), "hedged")
        .await
        .unwrap();
    assert_eq!(hedged_v.join_count("lobby").await, 3);
    alice.expect_presence("hedged", "lobby", "join").await;
    assert_eq!(hedged.join_count("lobby").await, 3);

    victim.signal("KILL");
    victim.wait_exit().await;
    let killed = std::time::Instant::now();
    // Within the dead-node bound: node TTL (1.5 s here) and a heartbeat, with room for a
    // busy machine (the bound is 10 s with default timings).
    let bound = Duration::from_secs(6);
    let leave = alice.next_event_within(bound).await;
    let Some(Event::Json(leave)) = leave else {
        panic!("no leave within {bound:?} of the kill: {leave:?}")
    };
    assert_eq!(
        leave,
        json!({"from": "doomed", "action": "presence", "data": {"room": "lobby", "event": "leave"}})
    );
    println!(
        "killed node: its user left the room after {:?}",
        killed.elapsed()
    );
    hedged.expect_presence("doomed", "lobby", "leave").await;
    alice.act("members", json!({"room": "lobby"})).await;
    assert_eq!(
        alice.recv().await["data"]["users"],
        json!(["alice", "hedged"])
    );
    alice.expect_nothing().await;
}
