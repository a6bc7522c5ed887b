//! A cluster for the load-test tests: a `redis-server` on a free port and two `wsbus serve`
//! nodes, killed on drop.

#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the spawned processes on drop.
pub struct Cluster {
    pub children: Vec<Child>,
    pub nodes: Vec<String>,
    /// Nodes that allow two sessions per user (dm-multi), on the same Redis.
    pub multi_nodes: Vec<String>,
    /// `127.0.0.1:<port>` of its redis-server.
    pub redis: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback port (the server crate's picker: outside the ephemeral range, so no
/// bind to port 0 takes it meanwhile).
pub fn free_port() -> u16 {
    wsbus::dev::free_port().expect("free port")
}

/// `GET /readyz` on `port`: true on HTTP 200 from node `id`.
fn ready(port: u16, id: &str) -> bool {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = "GET /readyz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
    let mut reply = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut reply).is_ok()
        && reply.starts_with("HTTP/1.1 200 ")
        && reply.contains(&format!("\"node\":\"{id}\""))
}

/// Whether a `redis-server` answers `PING` on `port`.
fn redis_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Starts `spawn(port)` on a free port and waits until `ready(port)`; a child that exits
/// first (its port taken meanwhile by another process) is started again on another port.
pub fn start_ready(
    what: &str,
    mut spawn: impl FnMut(u16) -> Child,
    ready: impl Fn(u16) -> bool,
) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ready(port) {
                return (child, port);
            }
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("{what} exited with {status} before it was ready on port {port}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what} was not ready on port {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("{what} did not start");
}

/// The `wsbus` binary of the same build as this test. `CARGO_BIN_EXE_*` only names binaries
/// of this package, so it is found from the test's own path: `<target>/<profile>/deps/<test>-…`
/// puts it at `<target>/<profile>/wsbus`, wherever `CARGO_TARGET_DIR` moved `<target>`.
pub fn wsbus_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from <target>/<profile>/deps");
    profile_dir.join(format!("wsbus{}", std::env::consts::EXE_SUFFIX))
}

/// A cluster with nothing but its own `redis-server` yet, and that Redis's port.
fn with_redis() -> (Cluster, u16) {
    let mut cluster = Cluster {
        children: Vec::new(),
        nodes: Vec::new(),
        multi_nodes: Vec::new(),
        redis: String::new(),
    };
    let (redis, rport) = start_ready(
        "redis-server",
        |port| {
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server must be on PATH")
        },
        redis_ready,
    );
    cluster.redis = format!("127.0.0.1:{rport}");
    cluster.children.push(redis);
    (cluster, rport)
}

pub fn start_cluster() -> Cluster {
    let bin = wsbus_bin();
    assert!(
        bin.exists(),
        "server binary {} not found: build it with `cargo build` in the workspace root, \
         or set WSBUS_LOADTEST_NODES=ws://host:port,ws://host:port to use a running cluster",
        bin.display()
    );
    let (mut cluster, rport) = with_redis();
    for (name, sessions) in [
        ("smoke-a", "1"),
        ("smoke-b", "1"),
        ("smoke-multi-a", "2"),
        ("smoke-multi-b", "2"),
    ] {
        let (child, port) = start_ready(
            name,
            |port| {
                Command::new(&bin)
                    .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
                    .args(["--redis-url", &format!("redis://127.0.0.1:{rport}")])
                    .args(["--node-id", name])
                    .args(["--max-sessions-per-user", sessions])
                    // Measure the server, not its abuse limits.
                    .args(["--insecure", "--rate-limit", "1000000000"])
                    .args(["--rate-burst", "1000000000"])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn wsbus serve")
            },
            |port| ready(port, name),
        );
        cluster.children.push(child);
        let url = format!("ws://127.0.0.1:{port}");
        if sessions == "1" {
            cluster.nodes.push(url);
        } else {
            cluster.multi_nodes.push(url);
        }
    }
    cluster
}

/// Two nodes that check HS256 tokens signed with `secret` (no `--insecure`), on their own
/// `redis-server`.
pub fn start_jwt_cluster(secret: &str) -> Cluster {
    let bin = wsbus_bin();
    assert!(bin.exists(), "server binary {} not found", bin.display());
    let (mut cluster, rport) = with_redis();
    for name in ["jwt-a", "jwt-b"] {
        let (child, port) = start_ready(
            name,
            |port| {
                Command::new(&bin)
                    .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
                    .args(["--redis-url", &format!("redis://127.0.0.1:{rport}")])
                    .args(["--node-id", name, "--jwt-secret", secret])
                    .args(["--rate-limit", "1000000000", "--rate-burst", "1000000000"])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn wsbus serve")
            },
            |port| ready(port, name),
        );
        cluster.children.push(child);
        cluster.nodes.push(format!("ws://127.0.0.1:{port}"));
    }
    cluster
}

/// Three history nodes on their own `redis-server`, the third started (and restarted) by
/// shell commands the drops scenario runs, with its pid in a file.
pub struct HistoryCluster {
    /// Redis and the first two nodes.
    pub cluster: Cluster,
    /// `ws://` URLs of the three nodes.
    pub nodes: Vec<String>,
    /// Kills the third node (SIGKILL: a crash, no clean shutdown).
    pub kill_cmd: String,
    /// Starts the third node in the background and returns at once.
    pub restart_cmd: String,
    pidfile: PathBuf,
}

impl Drop for HistoryCluster {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pidfile) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

/// Common arguments of a history node: fast heartbeats, so that a killed node reads as
/// dead (and its users as free to reconnect elsewhere) within a second.
fn history_args(port: u16, rport: u16, name: &str) -> Vec<String> {
    [
        "serve",
        "--bind",
        &format!("127.0.0.1:{port}"),
        "--redis-url",
        &format!("redis://127.0.0.1:{rport}"),
        "--node-id",
        name,
        "--history",
        "1000",
        "--heartbeat-interval",
        "250ms",
        "--node-ttl",
        "1s",
        "--insecure",
        "--rate-limit",
        "1000000000",
        "--rate-burst",
        "1000000000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

pub fn start_history_cluster() -> HistoryCluster {
    let bin = wsbus_bin();
    assert!(bin.exists(), "server binary {} not found", bin.display());
    let (mut cluster, rport) = with_redis();
    let mut nodes = Vec::new();
    for name in ["drops-a", "drops-b"] {
        let (child, port) = start_ready(
            name,
            |port| {
                Command::new(&bin)
                    .args(history_args(port, rport, name))
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn wsbus serve")
            },
            |port| ready(port, name),
        );
        cluster.children.push(child);
        nodes.push(format!("ws://127.0.0.1:{port}"));
    }
    let port = free_port();
    let pidfile = std::env::temp_dir().join(format!("wsbus-drops-{rport}.pid"));
    let args: Vec<String> = history_args(port, rport, "drops-c")
        .into_iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let restart_cmd = format!(
        "'{}' {} >/dev/null 2>&1 & echo $! > '{}'",
        bin.display(),
        args.join(" "),
        pidfile.display()
    );
    let kill_cmd = format!("kill -9 $(cat '{}')", pidfile.display());
    let started = Command::new("sh")
        .args(["-c", &restart_cmd])
        .status()
        .expect("sh");
    assert!(started.success(), "starting drops-c: {started}");
    let c = HistoryCluster {
        cluster,
        nodes,
        kill_cmd,
        restart_cmd,
        pidfile,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(port, "drops-c") {
        assert!(
            Instant::now() < deadline,
            "drops-c was not ready within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = c;
    c.nodes.push(format!("ws://127.0.0.1:{port}"));
    c
}
