//! Session resume (`?resume=`): a client takes its own session over with the secret of its
//! `welcome`, on any node, whether the old session's node is alive (4006) or dead, whatever
//! the session limit; a secret works once and only for its holder. Fault tests: a half-open
//! client, and the clients of a SIGKILLed node coming back to another one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::proxy::{Mode, Proxy};
use crate::common::*;
use crate::on_both;

/// Connects `user` at `url` (a WebSocket URL with its query), expecting `welcome` first:
/// returns the client, the `session` and the new secret.
async fn welcomed(url: &str, user: &str) -> (Client, String, String) {
    let mut client = Client::connect_url(url, user)
        .await
        .unwrap_or_else(|status| panic!("{url}: HTTP {status}"));
    let v = client.recv().await;
    assert_eq!(
        (v["from"].as_str(), v["action"].as_str()),
        (Some(user), Some("welcome")),
        "{v}"
    );
    let session = v["data"]["session"].as_str().expect("session").to_owned();
    let secret = v["data"]["resume"].as_str().expect("resume").to_owned();
    assert_eq!(secret.len(), 64, "{v}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    (client, session, secret)
}

/// The first frame `client` gets is `not unique session`, then close 4001.
async fn refused(mut client: Client) {
    client.expect_error("not unique session").await;
    client.expect_close(4001).await;
}

on_both!(a_secret_takes_its_session_over_once_on_any_node);

/// With one session per user (`reject`), a reconnect that presents its secret takes the
/// session over from another node at once: the old connection closes with 4006 and the new
/// one gets a new secret. The used secret, a wrong one and none at all are plain connects
/// (refused while the session lives). Redis holds hashes only.
async fn a_secret_takes_its_session_over_once_on_any_node(backend: Backend) {
    let (a, b) = backend.pair().await;
    let (mut first, session, secret) =
        welcomed(&format!("{}?resume=", a.url("alice")), "alice").await;
    assert!(session.starts_with("a:"), "{session}");
    // A client that does not ask gets no new frame: its first frame is what is sent to it.
    let mut bob = a.connect("bob").await;
    first.send_to("bob", "hi").await;
    bob.expect_message("alice", "hi").await;

    let started = Instant::now();
    let (mut second, session2, secret2) =
        welcomed(&format!("{}?resume={secret}", b.url("alice")), "alice").await;
    let took = started.elapsed();
    assert!(session2.starts_with("b:"), "{session2}");
    assert_ne!(secret2, secret);
    first
        .expect_close_with(4006, "replaced by a newer session")
        .await;
    println!("resume across nodes took {took:?}");
    assert!(
        took < Duration::from_millis(300),
        "took {took:?}: not at once"
    );
    bob.send_to("alice", "back").await;
    second.expect_message("bob", "back").await;

    // Single use, holder only: the old secret, a wrong one, none.
    for query in [
        format!("?resume={secret}"),
        format!("?resume={}", "0".repeat(64)),
        String::new(),
    ] {
        let url = format!("{}{query}", a.url("alice"));
        let mut client = Client::connect_url(&url, "alice").await.unwrap();
        if query.is_empty() {
            refused(client).await;
        } else {
            // Asked for a secret: a refused connect gets no welcome, only the refusal.
            let v = client.recv().await;
            assert_eq!(v["data"]["error"], "not unique session", "{query}: {v}");
            client.expect_close(4001).await;
        }
    }
    // Redis has the hash of the live session's secret, never a secret.
    let mut conn = backend.conn().await;
    let stored: Vec<String> = redis::cmd("HGETALL")
        .arg("wsbus:{u:alice}:resume")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(
        !stored
            .iter()
            .any(|v| v.contains(&secret) || v.contains(&secret2)),
        "{stored:?}"
    );
    // A clean close forgets the session's secret: it no longer takes anything over.
    second.close().await;
    backend.wait_unregistered("alice").await;
    eventually(DEADLINE, "the secret forgotten", || async {
        let mut conn = backend.conn().await;
        let n: u64 = redis::cmd("HLEN")
            .arg("wsbus:{u:alice}:resume")
            .query_async(&mut conn)
            .await
            .unwrap();
        (n == 0).then_some(())
    })
    .await;
}

on_both!(a_resume_is_never_refused_whatever_the_limit);

/// With two sessions per user and both taken, the holder of one session's secret still gets
/// in (mode `reject`): its own session gives way, the other stays.
async fn a_resume_is_never_refused_whatever_the_limit(backend: Backend) {
    let a = backend
        .node_with("a", |c| c.max_sessions_per_user = 2)
        .await;
    let (mut one, _, secret) = welcomed(&format!("{}?resume=", a.url("alice")), "alice").await;
    let mut two = a.connect("alice").await;
    refused(Client::connect_url(&a.url("alice"), "alice").await.unwrap()).await;
    let (mut three, _, _) = welcomed(&format!("{}?resume={secret}", a.url("alice")), "alice").await;
    one.expect_close(4006).await;
    let mut bob = a.connect("bob").await;
    bob.send_to("alice", "both").await;
    two.expect_message("bob", "both").await;
    three.expect_message("bob", "both").await;
}

on_both!(a_half_open_client_reconnects_at_its_first_try);

/// A client whose network vanished (its connection half-open behind a proxy that forwards
/// nothing any more) reconnects with its secret and is accepted at its first try, not
/// refused for two ping intervals.
async fn a_half_open_client_reconnects_at_its_first_try(backend: Backend) {
    let a = backend.node("a").await;
    let proxy = Proxy::start(a.addr.port()).await;
    let through = format!("ws://127.0.0.1:{}/ws/alice?resume=", proxy.port);
    let (_stale, _, secret) = welcomed(&through, "alice").await;
    proxy.set(Mode::BlackHole);
    let started = Instant::now();
    let (mut again, _, _) = welcomed(&format!("{}?resume={secret}", a.url("alice")), "alice").await;
    println!(
        "half-open client back after {:?}, first try",
        started.elapsed()
    );
    let mut bob = a.connect("bob").await;
    bob.send_to("alice", "here?").await;
    again.expect_message("bob", "here?").await;
}

/// How many clients the SIGKILL storm in the suite runs (`WSBUS_STORM_CLIENTS`).
fn storm_clients() -> usize {
    std::env::var("WSBUS_STORM_CLIENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_another() {
    killed_node_storm(storm_clients()).await;
}

/// The target of the issue: 3,000 clients (run with `--run-ignored only`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: 3,000 clients; run alone"]
async fn clients_of_a_killed_node_resume_on_another_3000() {
    killed_node_storm(3000).await;
}

/// `n` clients of a `wsbus serve` process that is SIGKILLed reconnect to a surviving node
/// with their secrets, all at once: every one is accepted at its first try (0 refusals),
/// all within 2 s of the first retry, and each is reachable there.
async fn killed_node_storm(n: usize) {
    let backend = Backend::single().await;
    // Both nodes are processes (default Redis timeout): this process runs the clients only.
    let survivor = NodeProcess::start_with("survivor", &backend.cli_args()).await;
    let mut victim = NodeProcess::start_with("victim", &backend.cli_args()).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let connects = (0..n).map(|i| {
        let url = format!("{}?resume=", victim.url(&format!("u{i}")));
        let gate = gate.clone();
        tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let (client, _, secret) = welcomed(&url, &format!("u{i}")).await;
            (client, secret)
        })
    });
    let mut clients = Vec::with_capacity(n);
    for c in connects.collect::<Vec<_>>() {
        clients.push(c.await.unwrap());
    }
    victim.signal("KILL");
    victim.wait_exit().await;
    let killed = Instant::now();
    let retries = clients.into_iter().enumerate().map(|(i, (old, secret))| {
        let url = format!("{}?resume={secret}", survivor.url(&format!("u{i}")));
        tokio::spawn(async move {
            // As wsbus.js does: the first retry after a full-jitter delay under 250 ms.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..250))).await;
            let first_retry = Instant::now();
            let user = format!("u{i}");
            let outcome = match Client::connect_url(&url, &user).await {
                Ok(mut client) => {
                    let v: Value = client.recv().await;
                    (v["action"] == "welcome", Some(client))
                }
                Err(status) => {
                    println!("{user}: HTTP {status}");
                    (false, None)
                }
            };
            drop(old);
            (outcome.0, first_retry.elapsed(), outcome.1)
        })
    });
    let mut back = Vec::with_capacity(n);
    for r in retries.collect::<Vec<_>>() {
        back.push(r.await.unwrap());
    }
    let refusals = back.iter().filter(|(ok, _, _)| !ok).count();
    let slowest = back.iter().map(|(_, t, _)| *t).max().unwrap();
    println!(
        "{n} clients of a SIGKILLed node: {refusals} refusals; each back at most {slowest:?} \
         after its first retry, all back {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(refusals, 0);
    assert!(
        slowest < Duration::from_secs(2),
        "slowest back after {slowest:?}"
    );
    // Each is reachable where it is now.
    let mut sender = Client::connect_url(&survivor.url("sender"), "sender")
        .await
        .unwrap();
    for (i, (_, _, client)) in back.iter_mut().enumerate().step_by((n / 20).max(1)) {
        sender.send_to(&format!("u{i}"), "ok").await;
        let client = client.as_mut().expect("connected");
        client.expect_message("sender", "ok").await;
    }
}
