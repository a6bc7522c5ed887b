//! Redis Cluster specifics: functions on every primary, and an inbox's slot migrating to
//! another shard while messages flow. (The cross-node behaviour tests in `messaging`,
//! `presence` and `process` also run against a cluster.)

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;

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

/// Messages bob received so far.
#[derive(Default)]
struct Progress {
    received: AtomicU32,
}

/// Sends `0, 1, 2, ...` to bob in bursts of 20, a steady stream for the fault to land in,
/// until `fault_over` is set, then `after` more, then `end`; returns how many it sent, and
/// the first number sent after the fault was over.
async fn stream_to_bob(alice: &mut Client, fault_over: &AtomicBool, after: u32) -> (u32, u32) {
    let mut i = 0;
    let mut first_after = None;
    loop {
        if first_after.is_none() && fault_over.load(Ordering::Acquire) {
            first_after = Some(i);
        }
        if first_after.is_some_and(|f| i >= f + after) {
            break;
        }
        alice.feed_to("bob", &i.to_string()).await;
        i += 1;
        if i % 20 == 0 {
            alice.flush().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(i < 200_000, "the fault never ended");
    }
    alice.feed_to("bob", "end").await;
    alice.flush().await;
    (i, first_after.unwrap())
}

/// Waits until bob has received `n` messages of the stream (the fault lands in traffic).
async fn wait_received(progress: &Progress, n: u32) {
    eventually(DEADLINE, "traffic flows before the fault", || async {
        (progress.received.load(Ordering::Acquire) >= n).then_some(())
    })
    .await;
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
    let backend = Backend::cluster().await;
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let (_a, _b, mut alice, mut bob) = alice_on_a_bob_on_b(&backend).await;

    let (from, slot) = cluster.owner(&key_names().inbox("b")).await;
    let to = *cluster.ports.iter().find(|&&p| p != from).unwrap();
    let progress = Progress::default();
    let migrated = AtomicBool::new(false);
    let send = stream_to_bob(&mut alice, &migrated, 300);
    let migrate = async {
        // Traffic flows through the old owner first, and goes on after the move.
        wait_received(&progress, 100).await;
        cluster.migrate_slot(slot, from, to).await;
        migrated.store(true, Ordering::Release);
        progress.received.load(Ordering::Acquire)
    };
    let receive = async {
        let mut i = 0;
        loop {
            let v = bob.recv().await;
            assert_eq!(
                (&v["from"], &v["action"]),
                (&json!("alice"), &json!("message")),
                "{v}"
            );
            if v["data"]["text"] == "end" {
                return i;
            }
            assert_eq!(v["data"]["text"], i.to_string(), "in order, nothing lost");
            i += 1;
            progress.received.store(i, Ordering::Release);
        }
    };
    let ((sent, first_after), received_at_move, received) = tokio::join!(send, migrate, receive);
    assert_eq!(received, sent, "every message arrived, in order");
    assert!(
        received_at_move >= 100 && first_after + 300 == sent,
        "the move landed mid-stream: {received_at_move} received before it, 300 sent after"
    );
    assert_eq!(
        cluster.owner(&key_names().inbox("b")).await.0,
        to,
        "the slot moved"
    );
    bob.expect_nothing_from(&mut alice).await;
    alice.expect_nothing().await;
}

/// A graceful failover of the shard that holds node b's inbox, while alice streams to bob:
/// the reader is unblocked by the role change, reconnects to the promoted replica, and every
/// message arrives, in order.
#[tokio::test]
async fn delivery_continues_through_a_failover() {
    let cluster = crate::common::cluster::RedisCluster::start_with_replicas(1).await;
    let backend = Backend::Cluster(cluster);
    let Backend::Cluster(cluster) = &backend else {
        unreachable!()
    };
    let (_a, _b, mut alice, mut bob) = alice_on_a_bob_on_b(&backend).await;

    let (primary, _) = cluster.owner(&key_names().inbox("b")).await;
    let replica = cluster.replica_of(primary).await;
    let progress = Progress::default();
    let promoted = AtomicBool::new(false);
    let send = stream_to_bob(&mut alice, &promoted, 300);
    let failover = async {
        wait_received(&progress, 100).await;
        cluster.failover_to(replica).await;
        promoted.store(true, Ordering::Release);
    };
    let receive = async {
        // In order and no duplicates; what did not arrive is counted below.
        let mut got = Vec::new();
        loop {
            let v = bob.recv().await;
            if v["data"]["text"] == "end" {
                return got;
            }
            got.push(v["data"]["text"].as_str().unwrap().parse::<u32>().unwrap());
            progress.received.fetch_add(1, Ordering::Release);
        }
    };
    let ((sent, first_after), (), got) = tokio::join!(send, failover, receive);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "reordered or duplicated: {got:?}"
    );
    // Traffic after the promotion arrives: the reader reads the new primary. (The first
    // sends after it may still meet the old role and be answered with errors.)
    let tail: Vec<u32> = got.iter().copied().filter(|&i| i >= sent - 100).collect();
    assert_eq!(
        tail,
        (sent - 100..sent).collect::<Vec<_>>(),
        "the last 100 messages, all sent after the promotion (from {first_after})"
    );
    // Whatever did not arrive must have been answered with an error at the sender (a probe
    // comes back after every error already queued for alice).
    let probe = alice.send_probe().await;
    let mut errors = 0;
    loop {
        let v = alice.recv().await;
        if v["data"]["error"] == probe.as_str() {
            break;
        }
        assert_eq!(v["action"], "error", "{v}");
        errors += 1;
    }
    println!(
        "failover: {} of {sent} delivered, {errors} answered with errors",
        got.len()
    );
    assert_eq!(
        got.len() as u32 + errors,
        sent,
        "messages vanished in the failover"
    );
    assert_eq!(
        cluster.owner(&key_names().inbox("b")).await.0,
        replica,
        "the replica took over"
    );
}
