//! Publishing through the Redis stream `P:ingress`: plain fields routed like an API
//! publish, one node per entry, garbage acknowledged, a dead consumer's entries claimed,
//! and the consumer group recreated after Redis comes back empty.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::on_both;

const STREAM: &str = "wsbus:ingress";

/// Idle entries are claimed after 500 ms.
fn quick_claims(c: &mut wsbus::NodeConfig) {
    c.ingress_claim_idle = Duration::from_millis(500);
}

async fn xadd(conn: &mut wsbus::redis::RedisConn, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(conn).await.unwrap();
}

async fn pending(conn: &mut wsbus::redis::RedisConn) -> u64 {
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg("wsbus")
        .query_async(conn)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(parts) => redis::from_redis_value_ref(&parts[0]).unwrap(),
        other => panic!("XPENDING: {other:?}"),
    }
}

on_both!(ingress_entries_reach_users_and_rooms_once_and_garbage_is_acknowledged);

async fn ingress_entries_reach_users_and_rooms_once_and_garbage_is_acknowledged(backend: Backend) {
    let a = backend.node_with("a", quick_claims).await;
    let b = backend.node_with("b", quick_claims).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    bob.join("lobby").await;
    let mut conn = backend.conn().await;
    xadd(
        &mut conn,
        &[
            ("to", "alice"),
            ("action", "notice"),
            ("data", r#"{"x":1}"#),
        ],
    )
    .await;
    xadd(&mut conn, &[("garbage", "yes")]).await;
    xadd(
        &mut conn,
        &[("to", "alice"), ("action", "n"), ("data", "[")],
    )
    .await;
    xadd(
        &mut conn,
        &[("room", "lobby"), ("action", "news"), ("from", "billing")],
    )
    .await;
    assert_eq!(
        alice.recv().await,
        json!({"from": "@server", "action": "notice", "data": {"x": 1}})
    );
    assert_eq!(
        bob.recv().await,
        json!({"from": "billing", "action": "news", "data": {}})
    );
    eventually(DEADLINE, "garbage counted on some node", || async {
        let series = r#"wsbus_ingress_entries_total{result="invalid"}"#;
        let n = metric(a.addr, series).await + metric(b.addr, series).await;
        (n >= 2.0).then_some(())
    })
    .await;
    eventually(DEADLINE, "every entry acknowledged", || {
        let backend = &backend;
        async move {
            let mut conn = backend.conn().await;
            (pending(&mut conn).await == 0).then_some(())
        }
    })
    .await;
    // Each entry was handled by one node: nothing arrives twice (a marker entry added
    // after them is the next frame of each).
    let mut conn = backend.conn().await;
    xadd(&mut conn, &[("to", "alice"), ("action", "marker")]).await;
    xadd(&mut conn, &[("room", "lobby"), ("action", "marker")]).await;
    let marker = json!({"from": "@server", "action": "marker", "data": {}});
    assert_eq!(alice.recv().await, marker);
    assert_eq!(bob.recv().await, marker);
}

/// A node that read entries and died before acknowledging them: another node claims them
/// once they are idle and delivers them (at least once). The dead node is a consumer that
/// reads and never acknowledges, like a node killed mid-routing.
#[tokio::test]
async fn a_dead_consumers_entries_are_claimed_and_delivered() {
    let backend = Backend::single().await;
    let mut conn = backend.conn().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg("wsbus")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let a = backend.node_with("a", quick_claims).await;
    let mut alice = a.connect("alice").await;
    // Appended and read by the doomed consumer in one transaction, so node a cannot read
    // it first.
    let (_, read): (String, redis::Value) = redis::pipe()
        .atomic()
        .cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("to")
        .arg("alice")
        .arg("action")
        .arg("orphan")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("wsbus")
        .arg("dead-node")
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(format!("{read:?}").contains("orphan"), "{read:?}");
    assert_eq!(pending(&mut conn).await, 1);
    let started = Instant::now();
    assert_eq!(
        alice.recv().await,
        json!({"from": "@server", "action": "orphan", "data": {}})
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually(DEADLINE, "the claimed entry acknowledged", || async {
        let mut conn = backend.conn().await;
        (pending(&mut conn).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn after_redis_restarts_empty_the_group_is_recreated_and_ingress_works_within_10s() {
    let mut backend = Backend::single().await;
    let a = backend.node_with("a", quick_claims).await;
    let mut alice = a.connect("alice").await;
    let mut conn = backend.conn().await;
    let add = |action: &'static str| {
        redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("to")
            .arg("alice")
            .arg("action")
            .arg(action)
            .clone()
    };
    let _: String = add("before").query_async(&mut conn).await.unwrap();
    assert_eq!(alice.recv().await["action"], "before");

    backend.restart_empty().await;
    let restarted = Instant::now();
    let backend = &backend;
    eventually(DEADLINE, "alice re-registered", || async {
        backend.where_is("alice").await.is_some().then_some(())
    })
    .await;
    let mut conn = backend.conn().await;
    let _: String = add("after").query_async(&mut conn).await.unwrap();
    assert_eq!(alice.recv().await["action"], "after");
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "ingress back after {took:?}"
    );
}
