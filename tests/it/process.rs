//! Real `wsbus` processes: SIGTERM cleans up, SIGKILL is detected and reaped by survivors.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::on_both;

on_both!(sigterm_closes_clients_with_1001_and_leaves_no_keys);

async fn sigterm_closes_clients_with_1001_and_leaves_no_keys(backend: Backend) {
    let mut p = NodeProcess::start_with("proc", &backend.cli_args()).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let user = format!("u{i}");
        clients.push(Client::connect_url(&p.url(&user), &user).await.unwrap());
    }
    assert!(!backend.keys().await.is_empty());
    p.signal("TERM");
    for c in &mut clients {
        c.expect_close(1001).await;
    }
    let (status, took) = p.wait_exit().await;
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert_eq!(backend.keys().await, Vec::<String>::new());
}

on_both!(a_killed_node_is_detected_and_reaped);

async fn a_killed_node_is_detected_and_reaped(backend: Backend) {
    // Silence for 4 s reads as dead: the victim, stopped below, stays live long enough for
    // the message sent to it meanwhile to reach its inbox, on a busy machine too.
    let ttl = |c: &mut wsbus::NodeConfig| c.node_ttl = Duration::from_secs(4);
    let survivor = backend.node_with("survivor", ttl).await;
    let other = backend.node_with("other", ttl).await;
    let mut p = NodeProcess::start_with("victim", &backend.cli_args()).await;
    let mut carol = survivor.connect("carol").await;
    let mut dave = other.connect("dave").await;
    let _v = Client::connect_url(&p.url("victim-user"), "victim-user")
        .await
        .unwrap();
    let mut alice = survivor.connect("alice").await;
    // Leave an undelivered entry in the victim's inbox after the kill: stopped, it reads
    // nothing more.
    p.signal("STOP");
    alice.send_to("victim-user", "hi").await;
    let inbox = key_names().inbox("victim");
    eventually(DEADLINE, "an entry waits in the victim's inbox", || async {
        let mut conn = backend.conn().await;
        type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let entries: Entries = redis::cmd("XRANGE")
            .arg(&inbox)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let found = entries
            .iter()
            .any(|(_, fields)| fields.iter().any(|(k, v)| k == "to" && v == b"victim-user"));
        found.then_some(())
    })
    .await;
    p.signal("KILL");
    p.wait_exit().await;
    let killed = Instant::now();
    // Senders get `not found` within the bound (10 s by default; TTL 4 s here).
    // Until then, sends go to the dead node's inbox without an answer.
    let detect = async {
        let mut n = 0;
        loop {
            n += 1;
            alice.send_to("victim-user", &format!("ping {n}")).await;
            if let Some(Event::Json(v)) = alice.next_event_within(Duration::from_millis(100)).await
            {
                assert_eq!(v["data"]["error"], "User 'victim-user' not found", "{v}");
                return killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "still reachable after 10 s"
            );
        }
    };
    // Meanwhile the survivors' own cross-node traffic flows on, complete and in order.
    let others = async {
        for i in 0..400 {
            carol.send_to("dave", &i.to_string()).await;
            dave.expect_message("carol", &i.to_string()).await;
        }
    };
    let (detected, ()) = tokio::join!(detect, others);
    println!("killed node: its user read as not found after {detected:?}");
    // No key of the dead node survives the reaper.
    let in_time = tokio::time::timeout(DEADLINE, async {
        loop {
            let left: Vec<String> = backend
                .keys()
                .await
                .into_iter()
                .filter(|k| k.contains("victim"))
                .collect();
            if left.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let left = backend.keys().await;
    assert!(in_time.is_ok(), "keys of the dead node left: {left:?}");
    // The survivor's own traffic is unaffected.
    let mut bob = survivor.connect("bob").await;
    alice.send_to("bob", "fine").await;
    bob.expect_message("alice", "fine").await;
}

on_both!(a_node_restarted_at_once_under_its_id_frees_its_users);

/// A node killed and started again under its id before anyone saw it dead is never reaped:
/// the new run clears its earlier run's sessions and rooms before serving, so its users
/// reconnect at once (they used to be refused with 4001 for as long as the id heartbeats),
/// and the room's other members hear that they left.
async fn a_node_restarted_at_once_under_its_id_frees_its_users(backend: Backend) {
    let other = backend.node("other").await;
    let mut p = NodeProcess::start_with("phoenix", &backend.cli_args()).await;
    let mut carol = other.connect("carol").await;
    carol.join("r").await;
    let mut bob = Client::connect_url(&p.url("bob"), "bob").await.unwrap();
    bob.join("r").await;
    let v = carol.recv().await;
    assert_eq!(
        (v["action"].as_str(), v["data"]["event"].as_str()),
        (Some("presence"), Some("join")),
        "{v}"
    );
    p.signal("KILL");
    p.wait_exit().await;
    drop(bob);
    let p = NodeProcess::start_with("phoenix", &backend.cli_args()).await;
    let mut bob = Client::connect_url(&p.url("bob"), "bob").await.unwrap();
    assert_eq!(bob.settle().await, Ok(()), "bob was refused");
    let v = carol.recv().await;
    assert_eq!(
        (v["from"].as_str(), v["data"]["event"].as_str()),
        (Some("bob"), Some("leave")),
        "{v}"
    );
    carol.send_to("bob", "welcome back").await;
    bob.expect_message("carol", "welcome back").await;
}

/// `wsbus dev --nodes 3` starts its own redis-server and three nodes on consecutive ports;
/// Ctrl-C stops everything.
#[tokio::test]
async fn dev_runs_a_cluster_of_n_nodes_and_stops_on_sigint() {
    // Three consecutive free ports: retry until the run is free.
    let base = loop {
        let p = wsbus::dev::free_port().unwrap();
        if (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            break p;
        }
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["dev", "--nodes", "3", "--base-port", &base.to_string()])
        .env("RUST_LOG", "warn")
        .env_remove("WSBUS_REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let node_url = |i: u16, user: &str| format!("ws://127.0.0.1:{}/ws/{user}", base + i);
    let mut alice = eventually(DEADLINE, "dev node 1 up", || async {
        Client::connect_url(&node_url(0, "alice"), "alice")
            .await
            .ok()
    })
    .await;
    let mut carol = eventually(DEADLINE, "dev node 2 up", || async {
        Client::connect_url(&node_url(1, "carol"), "carol")
            .await
            .ok()
    })
    .await;
    let mut bob = eventually(DEADLINE, "dev node 3 up", || async {
        Client::connect_url(&node_url(2, "bob"), "bob").await.ok()
    })
    .await;
    carol.send_to("bob", "from the second").await;
    bob.expect_message("carol", "from the second").await;
    alice.send_to("bob", "hello dev").await;
    bob.expect_message("alice", "hello dev").await;

    // The banner's commands point at dev's own Redis and node ids, ready to paste.
    use tokio::io::AsyncBufReadExt;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            out.push_str(&line);
            out.push('\n');
            if line.starts_with("Ctrl-C") {
                break;
            }
        }
    })
    .await
    .expect("the banner is printed");
    let command = |words: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.contains(words))
            .unwrap_or_else(|| panic!("no `{words}` command in {out}"))
            .to_owned()
    };
    let run = |line: String| async move {
        let out = tokio::process::Command::new("sh")
            .args(["-c", &line])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{line}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let where_bob = run(command(" whereis --redis-url ")).await;
    assert!(
        where_bob
            .lines()
            .any(|l| l.starts_with("dev-3 ") && l.ends_with("live")),
        "{where_bob}"
    );
    let nodes = run(command(" nodes --redis-url ")).await;
    assert!(
        ["dev-1", "dev-2", "dev-3"]
            .iter()
            .all(|id| nodes.contains(id))
            && !nodes.contains("dev-4"),
        "{nodes}"
    );
    run(command(" inspect --redis-url ")).await;
    let xrange = command("redis-cli");
    assert!(xrange.contains("wsbus:inbox:dev-3"), "{xrange}");
    run(xrange).await;

    let pid = child.id().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    alice.expect_close(1001).await;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("dev exits in time")
        .unwrap();
    assert!(status.success(), "{status}");
    use tokio::io::AsyncReadExt;
    assert!(
        out.contains(&format!("ws://127.0.0.1:{base}/ws/<user-id>")),
        "{out}"
    );
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .await
        .unwrap();
    assert!(log.contains("dev mode: no authentication"), "{log}");
    assert!(
        !log.contains('\x1b') && !out.contains('\x1b'),
        "no colour codes when not on a terminal: {log:?}"
    );
}
