//! A cluster for the load-test tests: a `redis-server` on a free port and two `wsbus serve`
//! nodes, killed on drop.

#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener, TcpStream};
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not accept on port {port} within 20 s");
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
    let rport = free_port();
    cluster.redis = format!("127.0.0.1:{rport}");
    let mut redis = Command::new("redis-server")
        .args(["--port", &rport.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be on PATH");
    wait_for_port(rport, "redis-server", &mut redis);
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
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &format!("redis://127.0.0.1:{rport}")])
            .args(["--node-id", name])
            .args(["--max-sessions-per-user", sessions])
            // Measure the server, not its abuse limits.
            .args(["--insecure", "--rate-limit", "1000000000"])
            .args(["--rate-burst", "1000000000"])
            .stdout(Stdio::null());
        let mut child = cmd.spawn().expect("spawn wsbus serve");
        wait_for_port(port, name, &mut child);
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
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &format!("redis://127.0.0.1:{rport}")])
            .args(["--node-id", name, "--jwt-secret", secret])
            .args(["--rate-limit", "1000000000", "--rate-burst", "1000000000"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn wsbus serve");
        wait_for_port(port, name, &mut child);
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
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(history_args(port, rport, name))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn wsbus serve");
        wait_for_port(port, name, &mut child);
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
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "drops-c did not listen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = c;
    c.nodes.push(format!("ws://127.0.0.1:{port}"));
    c
}
