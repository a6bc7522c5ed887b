//! Delivery across nodes and on one node, ordering, and the claim-before-upgrade guarantee.

use std::collections::HashMap;

use crate::common::*;

#[tokio::test]
async fn delivers_across_nodes_and_on_the_same_node() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = a.connect("carol").await;

    alice.send_to("bob", "hello across").await;
    bob.expect_message("alice", "hello across").await;
    bob.send_to("alice", "and back").await;
    alice.expect_message("bob", "and back").await;

    alice.send_to("carol", "hello neighbour").await;
    carol.expect_message("alice", "hello neighbour").await;
    carol.send_to("carol", "note to self").await;
    carol.expect_message("carol", "note to self").await;

    // Same-node delivery never touches the bus.
    let mut conn = redis_conn(&redis.url()).await;
    let added: u64 = redis::cmd("XLEN")
        .arg("wsbus:inbox:a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(added, 0);
}

#[tokio::test]
async fn three_nodes_all_pairs() {
    let redis = Redis::start().await.unwrap();
    let nodes = [
        Node::start("n1", &redis.url()).await,
        Node::start("n2", &redis.url()).await,
        Node::start("n3", &redis.url()).await,
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

#[tokio::test]
async fn user_is_reachable_as_soon_as_the_handshake_completes() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
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
#[tokio::test]
async fn keeps_order_without_loss_or_duplicates() {
    const PER_SENDER: usize = 3000;
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    // The senders outpace this test's (debug-build) reader; the queue must hold the burst
    // rather than disconnect the reader as a slow consumer.
    let mut config = config("b", &redis.url());
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
    let url = redis.url();
    eventually(DEADLINE, "inbox trimmed", || {
        let url = url.clone();
        async move {
            let mut c = redis_conn(&url).await;
            let len: u64 = redis::cmd("XLEN")
                .arg("wsbus:inbox:b")
                .query_async(&mut c)
                .await
                .unwrap();
            (len == 0).then_some(())
        }
    })
    .await;
}
