//! Delivery across nodes and on one node, ordering, and the claim-before-upgrade guarantee,
//! each against a single Redis and against a Redis Cluster.

use std::collections::HashMap;

use crate::common::*;
use crate::on_both;

on_both!(
    delivers_across_nodes_and_on_the_same_node,
    three_nodes_all_pairs,
    user_is_reachable_as_soon_as_the_handshake_completes,
    keeps_order_without_loss_or_duplicates,
);

async fn inbox_len(backend: &Backend, node: &str) -> u64 {
    let mut conn = backend.conn().await;
    redis::cmd("XLEN")
        .arg(key_names().inbox(node))
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn delivers_across_nodes_and_on_the_same_node(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;

    alice.send_to("bob", "hello across").await;
    bob.expect_message("alice", "hello across").await;
    bob.send_to("alice", "and back").await;
    alice.expect_message("bob", "and back").await;

    // Same-node delivery never touches the bus: no XADD at all (an inbox's length would
    // not tell, inboxes are trimmed as they are delivered).
    let xadd = backend.command_calls("xadd").await;
    alice.send_to("carol", "hello neighbour").await;
    carol.expect_message("alice", "hello neighbour").await;
    carol.send_to("carol", "note to self").await;
    carol.expect_message("carol", "note to self").await;
    assert_eq!(backend.command_calls("xadd").await - xadd, 0);
    // The count does see a message that crosses: one XADD.
    alice.send_to("bob", "across again").await;
    bob.expect_message("alice", "across again").await;
    assert_eq!(backend.command_calls("xadd").await - xadd, 1);
}

async fn three_nodes_all_pairs(backend: Backend) {
    let nodes = [
        backend.node("n1").await,
        backend.node("n2").await,
        backend.node("n3").await,
    ];
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        clients.push(node.connect(&format!("u{i}")).await);
    }
    for i in 0..3 {
        for j in 0..3 {
            let text = format!("{i}->{j}");
            clients[i].send_to(&format!("u{j}"), &text).await;
            clients[j].expect_message(&format!("u{i}"), &text).await;
        }
    }
}

async fn user_is_reachable_as_soon_as_the_handshake_completes(backend: Backend) {
    let (a, b) = backend.pair().await;
    let mut sender = a.connect("sender").await;
    for i in 0..20 {
        let user = format!("fresh{i}");
        let mut fresh = b.connect(&user).await;
        sender.send_to(&user, "first").await;
        fresh.expect_message("sender", "first").await;
    }
}

/// Thousands of messages from several senders on two nodes to one recipient: per-sender
/// order kept, nothing lost, nothing duplicated, on both the bus path and the local path.
async fn keeps_order_without_loss_or_duplicates(backend: Backend) {
    const PER_SENDER: usize = 3000;
    let a = backend.node("a").await;
    // The senders outpace this test's (debug-build) reader; the queue must hold the burst
    // rather than disconnect the reader as a slow consumer.
    let mut config = backend.config("b");
    config.session_queue = 4 * PER_SENDER;
    let b = Node::start_with(config).await;
    let mut sink = b.connect("sink").await;
    let mut remote = a.connect("remote").await;
    let mut local = b.connect("local").await;

    let send = async {
        for i in 0..PER_SENDER {
            remote.feed_to("sink", &i.to_string()).await;
            local.feed_to("sink", &i.to_string()).await;
            if i % 100 == 99 {
                remote.flush().await;
                local.flush().await;
            }
        }
        remote.flush().await;
        local.flush().await;
    };
    let receive = async {
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..2 * PER_SENDER {
            let v = sink.recv().await;
            assert_eq!(v["action"], "message", "{v}");
            let from = v["from"].as_str().unwrap().to_owned();
            let seq: usize = v["data"]["text"].as_str().unwrap().parse().unwrap();
            let expected = next.entry(from.clone()).or_default();
            assert_eq!(
                seq, *expected,
                "message from {from} out of order, lost or duplicated"
            );
            *expected += 1;
        }
        next
    };
    let ((), counts) = tokio::join!(send, receive);
    assert_eq!(counts["remote"], PER_SENDER);
    assert_eq!(counts["local"], PER_SENDER);
    // The inbox holds only what is not yet delivered.
    let backend = &backend;
    eventually(DEADLINE, "inbox trimmed", || async move {
        (inbox_len(backend, "b").await == 0).then_some(())
    })
    .await;
}
