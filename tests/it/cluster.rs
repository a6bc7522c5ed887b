//! Redis Cluster specifics: functions on every primary, and an inbox's slot migrating to
//! another shard while messages flow. (The cross-node behaviour tests in `messaging`,
//! `presence` and `process` also run against a cluster.)

use std::time::Duration;

use crate::common::*;

/// Nodes a and b, alice on a and bob on b, one message through already.
async fn alice_on_a_bob_on_b(backend: &Backend) -> (Node, Node, Client, Client) {
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "warm-up").await;
    bob.expect_message("alice", "warm-up").await;
    (a, b, alice, bob)
}

/// Sends `0..n` to bob in bursts of 20, a steady stream for the fault to land in.
async fn stream_to_bob(alice: &mut Client, n: u32) {
    for i in 0..n {
        alice.feed_to("bob", &i.to_string()).await;
        if i % 20 == 19 {
            alice.flush().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    alice.flush().await;
}

#[tokio::test]
async fn functions_are_loaded_on_every_primary() {
    let backend = Backend::cluster().await;
    let _a = backend.node("a").await;
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    for &port in &cluster.ports {
        let mut shard = cluster.shard(port).await;
        let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg("wsbus_v1")
            .query_async(&mut shard)
            .await
            .unwrap();
        assert_eq!(
            libraries.len(),
            1,
            "shard {port} lacks the wsbus_v1 library"
        );
    }
}

/// Moves the slot of node b's inbox to another shard (IMPORTING/MIGRATING, MIGRATE,
/// SETSLOT NODE) while alice on node a streams to bob on node b: the blocking reader follows
/// the slot, and every message arrives, in order.
#[tokio::test]
async fn delivery_continues_while_an_inbox_slot_migrates() {
    const N: u32 = 2000;
    let backend = Backend::cluster().await;
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let (_a, _b, mut alice, mut bob) = alice_on_a_bob_on_b(&backend).await;

    let (from, slot) = cluster.owner(&key_names().inbox("b")).await;
    let to = *cluster.ports.iter().find(|&&p| p != from).unwrap();
    let send = stream_to_bob(&mut alice, N);
    let migrate = async {
        // Let some traffic flow through the old owner first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.migrate_slot(slot, from, to).await;
    };
    let receive = async {
        for i in 0..N {
            bob.expect_message("alice", &i.to_string()).await;
        }
    };
    tokio::join!(send, migrate, receive);
    assert_eq!(
        cluster.owner(&key_names().inbox("b")).await.0,
        to,
        "the slot moved"
    );
    assert!(
        alice
            .next_event_within(Duration::from_millis(200))
            .await
            .is_none(),
        "the sender got no errors"
    );
}

/// A graceful failover of the shard that holds node b's inbox, while alice streams to bob:
/// the reader is unblocked by the role change, reconnects to the promoted replica, and every
/// message arrives, in order.
#[tokio::test]
async fn delivery_continues_through_a_failover() {
    const N: u32 = 1500;
    let cluster = crate::common::cluster::RedisCluster::start_with_replicas(1).await;
    let backend = Backend::Cluster(cluster);
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let (_a, _b, mut alice, mut bob) = alice_on_a_bob_on_b(&backend).await;

    let (primary, _) = cluster.owner(&key_names().inbox("b")).await;
    let replica = cluster.replica_of(primary).await;
    let send = stream_to_bob(&mut alice, N);
    let failover = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.failover_to(replica).await;
    };
    let receive = async {
        // Until nothing has arrived for 3 s: in order, no duplicates; gaps are checked below.
        let mut got = Vec::new();
        while let Some(e) = bob.next_event_within(Duration::from_secs(3)).await {
            let Event::Json(v) = e else {
                panic!("bob: {e:?}")
            };
            got.push(v["data"]["text"].as_str().unwrap().parse::<u32>().unwrap());
        }
        got
    };
    let ((), (), got) = tokio::join!(send, failover, receive);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "reordered or duplicated: {got:?}"
    );
    // Whatever did not arrive must have been answered with an error at the sender.
    let mut errors = 0;
    while let Some(e) = alice.next_event_within(Duration::from_millis(300)).await {
        let Event::Json(v) = e else {
            panic!("alice: {e:?}")
        };
        assert_eq!(v["action"], "error", "{v}");
        errors += 1;
    }
    println!(
        "failover: {} of {N} delivered, {errors} answered with errors",
        got.len()
    );
    assert_eq!(
        got.len() as u32 + errors,
        N,
        "messages vanished in the failover"
    );
    assert_eq!(
        cluster.owner(&key_names().inbox("b")).await.0,
        replica,
        "the replica took over"
    );
}
