//! Several sessions per user (`--max-sessions-per-user`, `--on-session-limit`): the limit
//! under races, replacing the oldest, fan-out to every session on every node, the sender's
//! copies, the Redis cost per message, a dead node's sessions, and `whereis`.

use futures_util::future::join_all;
use serde_json::json;
use wsbus::config::OnSessionLimit;

use crate::common::*;
use crate::on_both;

/// `max` sessions per user, `mode` past them.
fn limit(max: u32, mode: OnSessionLimit) -> impl FnOnce(&mut wsbus::NodeConfig) {
    move |c| {
        c.max_sessions_per_user = max;
        c.on_session_limit = mode;
    }
}

/// What became of one connect attempt: accepted and live (a probe is answered), or
/// refused/closed with a code.
async fn settle(client: Result<Client, u16>) -> Result<Client, Option<u16>> {
    let mut client = client.map_err(Some)?;
    client.settle().await?;
    Ok(client)
}

on_both!(the_limit_holds_under_racing_connects);

/// N + 20 concurrent connects for one user over two nodes: exactly N accepted, the rest get
/// `not unique session` and 4001.
async fn the_limit_holds_under_racing_connects(backend: Backend) {
    const N: usize = 3;
    let a = backend
        .node_with("a", limit(N as u32, OnSessionLimit::Reject))
        .await;
    let b = backend
        .node_with("b", limit(N as u32, OnSessionLimit::Reject))
        .await;
    let connects = (0..N + 20).map(|i| {
        let url = if i % 2 == 0 {
            a.url("neo")
        } else {
            b.url("neo")
        };
        async move { settle(Client::connect_url(&url, "neo").await).await }
    });
    let results = join_all(connects).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(accepted, N, "refusals: {refused:?}");
    assert!(refused.iter().all(|c| **c == Some(4001)), "{refused:?}");
    assert_eq!(backend.sessions("neo").await.len(), N);
}

on_both!(replace_keeps_exactly_n_alive_and_closes_the_oldest_with_4006);

async fn replace_keeps_exactly_n_alive_and_closes_the_oldest_with_4006(backend: Backend) {
    let a = backend
        .node_with("a", limit(1, OnSessionLimit::Replace))
        .await;
    let b = backend
        .node_with("b", limit(1, OnSessionLimit::Replace))
        .await;
    // Last login wins, across nodes.
    let mut first = a.connect("trinity").await;
    let mut second = b.connect("trinity").await;
    first.expect_close(4006).await;
    let mut bob = a.connect("bob").await;
    bob.send_to("trinity", "to the newest").await;
    second.expect_message("bob", "to the newest").await;
    // A race of 22 connects with 2 allowed: exactly 2 alive at the end.
    drop((a, b));
    let a = backend
        .node_with("a2", limit(2, OnSessionLimit::Replace))
        .await;
    let b = backend
        .node_with("b2", limit(2, OnSessionLimit::Replace))
        .await;
    let connects = (0..22).map(|i| {
        let url = if i % 2 == 0 {
            a.url("neo")
        } else {
            b.url("neo")
        };
        async move { Client::connect_url(&url, "neo").await.unwrap() }
    });
    let mut clients = join_all(connects).await;
    // Once 20 more sessions were closed as replaced (the metric is this process's, and
    // counts trinity's first session too), the rest are live and stay so.
    let closed = r#"wsbus_connections_closed_total{code="4006"}"#;
    let addr = a.addr;
    eventually(DEADLINE, "20 sessions replaced", || async move {
        (metric(addr, closed).await == 21.0).then_some(())
    })
    .await;
    let mut alive = 0;
    for c in &mut clients {
        match c.settle().await {
            Ok(()) => alive += 1,
            Err(code) => assert_eq!(code, Some(4006)),
        }
    }
    assert_eq!(alive, 2);
    let sessions = backend.sessions("neo").await;
    assert_eq!(sessions.len(), 2, "{sessions:?}");
}

on_both!(a_message_reaches_every_session_in_order_and_the_senders_other_sessions);

async fn a_message_reaches_every_session_in_order_and_the_senders_other_sessions(backend: Backend) {
    let a = backend
        .node_with("a", limit(3, OnSessionLimit::Reject))
        .await;
    let b = backend
        .node_with("b", limit(3, OnSessionLimit::Reject))
        .await;
    let c = backend
        .node_with("c", limit(3, OnSessionLimit::Reject))
        .await;
    // alice: two tabs on a, a phone on b. bob: a laptop on c, a phone on b, a tab on a.
    let mut alice = [
        a.connect("alice").await,
        a.connect("alice").await,
        b.connect("alice").await,
    ];
    let mut bob_laptop = c.connect("bob").await;
    let mut bob_phone = b.connect("bob").await;
    let mut bob_tab = a.connect("bob").await;
    const COUNT: usize = 50;
    for i in 0..COUNT {
        bob_laptop.feed_to("alice", &i.to_string()).await;
    }
    bob_laptop.flush().await;
    for session in alice.iter_mut().chain([&mut bob_phone, &mut bob_tab]) {
        for i in 0..COUNT {
            // Every copy is the same frame: `from` is bob, `to` is alice.
            assert_eq!(
                session.recv().await,
                json!({"from": "bob", "action": "message", "data": {"to": "alice", "text": i.to_string()}})
            );
        }
    }
    // The sending session gets no copy of its own message.
    bob_laptop.expect_nothing().await;
    // Replies reach all of bob's devices, from alice's phone; alice's tabs get copies.
    alice[2].send_to("bob", "back").await;
    for s in [&mut bob_laptop, &mut bob_phone, &mut bob_tab] {
        s.expect_message("alice", "back").await;
    }
    for tab in &mut alice[..2] {
        assert_eq!(
            tab.recv().await,
            json!({"from": "alice", "action": "message", "data": {"to": "bob", "text": "back"}})
        );
    }
}

on_both!(a_message_costs_one_xadd_per_node_not_per_session);

async fn a_message_costs_one_xadd_per_node_not_per_session(backend: Backend) {
    let a = backend
        .node_with("a", limit(4, OnSessionLimit::Reject))
        .await;
    let b = backend
        .node_with("b", limit(4, OnSessionLimit::Reject))
        .await;
    let c = backend
        .node_with("c", limit(4, OnSessionLimit::Reject))
        .await;
    let mut alice = Vec::new();
    for n in [&b, &b, &c, &c] {
        alice.push(n.connect("alice").await);
    }
    let mut bob = a.connect("bob").await;
    // Warm up (functions loaded, connections made), then count.
    bob.send_to("alice", "warm").await;
    for s in &mut alice {
        s.expect_message("bob", "warm").await;
    }
    let before = backend.command_calls("xadd").await;
    let envelopes = metric(a.addr, TO_BUS).await;
    const COUNT: u64 = 20;
    for i in 0..COUNT {
        bob.send_to("alice", &i.to_string()).await;
    }
    for s in &mut alice {
        for i in 0..COUNT {
            s.expect_message("bob", &i.to_string()).await;
        }
    }
    let xadds = backend.command_calls("xadd").await - before;
    // Four sessions on two other nodes: two envelopes per message; what one bus batch
    // sends one node shares an entry, so at most as many XADDs.
    assert_eq!(metric(a.addr, TO_BUS).await - envelopes, (2 * COUNT) as f64);
    assert!((2..=2 * COUNT).contains(&xadds), "{xadds} XADDs");
}

on_both!(a_dead_nodes_sessions_vanish_and_whereis_lists_every_session);

async fn a_dead_nodes_sessions_vanish_and_whereis_lists_every_session(backend: Backend) {
    let a = backend
        .node_with("a", limit(3, OnSessionLimit::Reject))
        .await;
    let mut args = backend.cli_args();
    args.extend(["--max-sessions-per-user".to_owned(), "3".to_owned()]);
    let mut victim = NodeProcess::start_with("victim", &args).await;
    let mut on_a = a.connect("alice").await;
    let _on_victim = Client::connect_url(&victim.url("alice"), "alice")
        .await
        .unwrap();
    let sessions = backend.sessions("alice").await;
    let mut nodes: Vec<_> = sessions.iter().map(|s| s.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "victim"]);
    assert!(sessions.iter().all(|s| s.alive && s.since > 0));
    // `wsbus whereis` prints one row per session.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"));
    cmd.arg("whereis").arg("alice").args(backend.cli_args());
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().any(|l| l.starts_with("victim ")), "{text}");

    victim.signal("KILL");
    victim.wait_exit().await;
    eventually(DEADLINE, "the dead node's session removed", || async {
        let sessions = backend.sessions("alice").await;
        (sessions.len() == 1 && sessions[0].node == "a").then_some(())
    })
    .await;
    // Messages still reach the surviving session, and nobody is told `not found`.
    let mut bob = a.connect("bob").await;
    bob.send_to("alice", "still here").await;
    on_a.expect_message("bob", "still here").await;
    bob.expect_nothing().await;
}
