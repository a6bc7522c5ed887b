//! The operator commands (`nodes`, `whereis`, `inspect`) as a library and as the binary.

use wsbus::redis::keys::Keys;

use crate::common::*;

#[tokio::test]
async fn nodes_whereis_and_inspect_report_the_bus() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let keys = Keys::new("wsbus");
    let redis = wsbus::cli::open(&url, false).unwrap();
    let a = Node::start("a", &url).await;
    let b = Node::start("b", &url).await;
    let _alice = a.connect("alice").await;
    let _bob = b.connect("bob").await;

    let nodes = wsbus::cli::nodes(&redis, &keys).await.unwrap();
    let mut ids: Vec<_> = nodes.iter().map(|n| (n.id.as_str(), n.users)).collect();
    ids.sort();
    assert_eq!(ids, [("a", 1), ("b", 1)]);
    assert!(
        nodes
            .iter()
            .all(|n| n.addr.is_some() && n.last_heartbeat_ms < 5_000)
    );

    let locs = wsbus::cli::where_is(&redis, &keys, "bob").await.unwrap();
    assert_eq!(locs.len(), 1);
    assert_eq!(locs[0].node, "b");
    assert!(locs[0].alive);
    assert!(
        wsbus::cli::where_is(&redis, &keys, "nobody")
            .await
            .unwrap()
            .is_empty()
    );

    // Put an entry in a stream nobody reads and decode it.
    let mut conn = redis_conn(&url).await;
    let env = envelope("a", "alice", "zed", "queued");
    let _: String = redis::cmd("XADD")
        .arg(key_names().inbox("parked"))
        .arg("*")
        .arg("from")
        .arg("alice")
        .arg("env")
        .arg(env)
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = wsbus::cli::inspect(&redis, &keys, "parked", 10)
        .await
        .unwrap()
        .expect("an inbox without a registration still exists");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["from"], "alice");
    assert_eq!(entries[0]["data"]["text"], "queued");

    // The binary prints the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["whereis", "alice", "--redis-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert_eq!((rows[0][0], rows[0][1], rows[0][3]), ("a", "1", "live"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["nodes", "--redis-url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() == 3 && text.contains("\na ") && text.contains("\nb "),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["inspect", "parked", "--redis-url", &url])
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["to"], "zed");

    // A node that does not exist is an error, not an empty inbox.
    let missing = wsbus::cli::inspect(&redis, &keys, "nosuchnode", 10).await;
    assert!(missing.unwrap().is_none());
    let registered = wsbus::cli::inspect(&redis, &keys, "a", 10).await;
    assert_eq!(registered.unwrap(), Some(vec![]), "node a, its inbox empty");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["inspect", "nosuchnode", "--redis-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no node \"nosuchnode\""), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["inspect", "a", "--redis-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "an empty inbox is not an error");
}

#[tokio::test]
async fn metrics_count_messages_in_prometheus_format() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "counted").await;
    bob.expect_message("alice", "counted").await;
    // The sender's node counts its XADD when Redis answers, which may be after delivery.
    let addr = a.addr;
    let body = eventually(DEADLINE, "messages counted", || async move {
        let (status, body) = http_get(addr, "/metrics").await?;
        assert_eq!(status, 200);
        let counted = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
        };
        (counted("wsbus_messages_received_total") && counted("wsbus_messages_to_bus_total"))
            .then_some(body)
    })
    .await;
    assert!(
        body.contains("# TYPE wsbus_bus_xadd_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains("wsbus_delivery_latency_seconds_bucket{le=\"5\"} "),
        "{body}"
    );
}

#[tokio::test]
async fn admin_endpoints_move_to_the_admin_address() {
    let redis = Redis::start().await.unwrap();
    let admin_port = wsbus::dev::free_port().unwrap();
    let mut config = config("a", &redis.url());
    config.admin_bind = Some(format!("127.0.0.1:{admin_port}").parse().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(wsbus::run(config, listener, stop.clone().cancelled_owned()));
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (status, body) = eventually(DEADLINE, "admin readyz", || async move {
        http_get(admin, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, ready["ready"].as_bool()), (200, Some(true)));
    assert_eq!(ready["reasons"], serde_json::json!([]));
    assert_eq!(http_get(admin, "/metrics").await.unwrap().0, 200);
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    // The container health check: `wsbus probe URL` exits 0 only on HTTP 200.
    // (Run without blocking: the node serves from this test's runtime.)
    let probe = |url: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
            .args(["probe", &url])
            .output()
            .await
            .unwrap()
            .status
            .success()
    };
    assert!(probe(format!("http://{admin}/healthz")).await);
    assert!(!probe(format!("http://{addr}/healthz")).await);
    // Not on the client address any more; the client routes still are.
    assert_eq!(http_get(addr, "/metrics").await.unwrap().0, 404);
    assert_eq!(http_get(addr, "/").await.unwrap().0, 200);
    stop.cancel();
    task.await.unwrap().unwrap();
}
