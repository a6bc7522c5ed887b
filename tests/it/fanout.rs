//! Wide publishes cannot take a node down: recipients per publish are capped
//! (`--max-publish-targets`), fan-outs go in chunks that yield, and the heartbeat beats on a
//! thread and a Redis connection of its own, so a node busy with a fan-out (or stuck
//! altogether) is never declared dead by its peers.
//!
//! The heartbeat's age is sampled from an OS thread of the test's own (a blocking Redis
//! connection), so a test runtime that the nodes keep busy cannot hide a lapse.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;

/// Samples every node's heartbeat age (Redis time now minus its last beat in `P:nodes`)
/// from a thread of its own until stopped; a node missing from `P:nodes` was reaped.
struct HeartbeatWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(HashMap<String, u64>, u64)>,
}

impl HeartbeatWatch {
    fn start(url: &str, nodes: &[&str]) -> Self {
        let client = redis::Client::open(url).unwrap();
        let nodes: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conn = client.get_connection().unwrap();
            let mut worst: HashMap<String, u64> = HashMap::new();
            let mut samples = 0;
            while !stopped.load(Ordering::Acquire) {
                let ((secs, micros), beats): ((u64, u64), Vec<(String, f64)>) = redis::pipe()
                    .cmd("TIME")
                    .cmd("ZRANGE")
                    .arg("wsbus:nodes")
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query(&mut conn)
                    .unwrap();
                let now_ms = secs * 1000 + micros / 1000;
                for node in &nodes {
                    let age = beats
                        .iter()
                        .find(|(n, _)| n == node)
                        .map_or(u64::MAX, |(_, last)| now_ms.saturating_sub(*last as u64));
                    let w = worst.entry(node.clone()).or_default();
                    *w = (*w).max(age);
                }
                samples += 1;
                // Pacing, not waiting for anything.
                std::thread::sleep(Duration::from_millis(20));
            }
            (worst, samples)
        });
        HeartbeatWatch { stop, thread }
    }

    /// Stops sampling; the largest age seen per node, and how many samples were taken.
    fn stop(self) -> (HashMap<String, u64>, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap()
    }
}

async fn xadd(backend: &Backend, to: &str, action: &str) {
    let mut conn = backend.conn().await;
    let _: String = redis::cmd("XADD")
        .arg("wsbus:ingress")
        .arg("*")
        .arg("to")
        .arg(to)
        .arg("action")
        .arg(action)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// `n` clients `u0`… connected alternately to `a` and `b`.
async fn connect_many(a: &Node, b: &Node, n: usize) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let connecting = chunk.iter().map(|&i| {
            let node = if i % 2 == 0 { a } else { b };
            let user = format!("u{i}");
            async move { node.connect(&user).await }
        });
        clients.extend(futures_util::future::join_all(connecting).await);
    }
    clients
}

/// A 50,000-recipient ingress entry is refused (counted invalid: acknowledged unrouted); a
/// 1,000-recipient one, then twenty more back to back, reach all 1,000 users over two nodes,
/// and neither node's heartbeat lapses meanwhile (nobody is reaped).
#[tokio::test]
async fn a_wide_fan_out_is_capped_and_a_capped_one_reaps_no_node() {
    let backend = Backend::single().await;
    let (a, b) = backend.pair().await;
    assert_eq!(wsbus::NodeConfig::default().max_publish_targets, 1000);
    let mut clients = connect_many(&a, &b, 1000).await;
    let invalid = r#"wsbus_ingress_entries_total{result="invalid"}"#;
    let invalid_before = metric(a.addr, invalid).await;
    let watch = HeartbeatWatch::start(&backend.url(), &["a", "b"]);

    let wide: Vec<String> = (0..50_000).map(|i| format!("u{i}")).collect();
    xadd(&backend, &wide.join(","), "wide").await;
    let capped: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    let capped = capped.join(",");
    for k in 0..21 {
        xadd(&backend, &capped, &format!("capped{k}")).await;
    }
    // Each node routes the entries it read in order, but two nodes share them: each user
    // gets each capped entry once, in some order.
    let want: std::collections::BTreeSet<String> = (0..21).map(|k| format!("capped{k}")).collect();
    for client in &mut clients {
        let mut got = std::collections::BTreeSet::new();
        for _ in 0..21 {
            let v = client.recv().await;
            got.insert(v["action"].as_str().unwrap().to_owned());
        }
        assert_eq!(got, want, "{}", client.user);
    }
    let (worst, samples) = watch.stop();
    assert_eq!(metric(a.addr, invalid).await - invalid_before, 1.0);
    let ttl = backend.config("x").node_ttl.as_millis() as u64;
    assert!(samples >= 5, "{samples} samples");
    for (node, age) in &worst {
        assert!(
            *age < ttl,
            "node {node}: heartbeat {age} ms old (node TTL {ttl} ms)"
        );
    }
    // Both nodes still see each other alive: a message crosses.
    let mut u1 = clients.pop().unwrap();
    let mut u0 = clients.swap_remove(0);
    u0.send_to(&u1.user.clone(), "alive?").await;
    u1.expect_message("u0", "alive?").await;
}

/// The nodes' runtime (this test's) stuck for 3 s, as by work that never yields: their
/// heartbeats go on, on their own threads, so neither is ever seen dead by the other, and
/// messages cross once the runtime runs again.
#[tokio::test]
async fn the_heartbeat_beats_while_the_node_is_stuck() {
    let backend = Backend::single().await;
    let (a, b) = backend.pair().await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let watch = HeartbeatWatch::start(&backend.url(), &["a", "b"]);
    // The stall under test: this thread runs every task of both nodes.
    std::thread::sleep(Duration::from_secs(3));
    let (worst, samples) = watch.stop();
    assert!(samples >= 20, "{samples} samples");
    for (node, age) in &worst {
        assert!(
            *age < 1000,
            "node {node}: heartbeat {age} ms old during the stall"
        );
    }
    alice.send_to("bob", "after the stall").await;
    bob.expect_message("alice", "after the stall").await;
}

/// The API caps recipients the same way: 40,000 rooms in one publish are a 400 naming the
/// limit, answered without creating a key; 1,000 recipients (users and rooms together) go.
#[tokio::test]
async fn an_api_publish_past_the_target_cap_is_refused() {
    const KEY: &str = "fanout-test-api-key-0123456789";
    let backend = Backend::single().await;
    let a = backend
        .node_with("a", |c| c.api_keys = vec![KEY.to_owned()])
        .await;
    let mut u0 = a.connect("u0").await;
    let auth = format!("Bearer {KEY}");
    let post = |body: serde_json::Value| {
        let auth = auth.clone();
        async move {
            http_request(
                a.addr,
                "POST",
                "/api/publish",
                &[("Authorization", &auth)],
                body.to_string().as_bytes(),
            )
            .await
        }
    };
    let keys_before = backend.keys().await;
    let rooms: Vec<String> = (0..40_000).map(|i| format!("r{i}")).collect();
    let (status, body) = post(serde_json::json!({"rooms": rooms, "action": "wide"})).await;
    assert_eq!(
        (status, body),
        (
            400,
            serde_json::json!({"field": "rooms",
                "error": "over the limit of 1000 recipients (users and rooms together)"})
        )
    );
    assert_eq!(backend.keys().await, keys_before);
    let users: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    let rooms: Vec<String> = (0..500).map(|i| format!("r{i}")).collect();
    let (status, body) =
        post(serde_json::json!({"to": users, "rooms": rooms, "action": "capped"})).await;
    assert_eq!(
        (status, &body["sent"]),
        (200, &serde_json::json!(["u0"])),
        "{body}"
    );
    assert_eq!(u0.recv().await["action"], "capped");
    let (status, _) =
        post(serde_json::json!({"to": users, "rooms": ["r500"], "action": "n"})).await;
    assert_eq!(status, 200, "500 + 1 recipients");
    let mut over = rooms.clone();
    over.push("r500".into());
    let (status, body) = post(serde_json::json!({"to": users, "rooms": over, "action": "n"})).await;
    assert_eq!(
        (status, &body["field"]),
        (400, &serde_json::json!("rooms")),
        "{body}"
    );
}
