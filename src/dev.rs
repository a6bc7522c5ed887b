//! `wsbus dev`: a local cluster in one process for newcomers, and the `redis-server` child
//! process it (and the test harness) runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;

/// A `redis-server` child process on a loopback port, killed when dropped.
pub struct RedisChild {
    port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

/// Why a `redis-server` child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisChildError {
    /// The binary could not be run.
    #[error(
        "cannot run redis-server ({0}); install it (Debian/Ubuntu: apt-get install -y redis-server) or pass --redis-url"
    )]
    Spawn(std::io::Error),
    /// It did not answer PING in time.
    #[error("redis-server on port {0} did not become ready")]
    NotReady(u16),
    /// Other I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl RedisChild {
    /// Starts `redis-server` on a free loopback port, without persistence.
    pub async fn start() -> Result<Self, RedisChildError> {
        Self::start_on(free_port()?).await
    }

    /// Starts `redis-server` on `port` (e.g. the port of one that was killed), empty.
    pub async fn start_on(port: u16) -> Result<Self, RedisChildError> {
        let dir = std::env::temp_dir().join(format!("wsbus-redis-{port}-{}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(RedisChildError::Spawn)?;
        let mut redis = Self {
            port,
            child: Some(child),
            dir,
        };
        redis.wait_ready().await?;
        Ok(redis)
    }

    async fn wait_ready(&mut self) -> Result<(), RedisChildError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client =
            redis::Client::open(self.url()).map_err(|_| RedisChildError::NotReady(self.port))?;
        while Instant::now() < deadline {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(RedisChildError::NotReady(self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL (no save, nothing kept) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback TCP port (bound and released; good enough for local use and tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The id of the dev cluster's `i`th node (from 0).
fn node_id(i: u16) -> String {
    format!("dev-{}", i + 1)
}

/// What to type to run this very binary: `wsbus` if that is it on `PATH` (after
/// `cargo install --path .`), else its path (after `cargo run` it is in `target/`, not on
/// `PATH`), relative to the working directory when it lies under it.
fn wsbus_command() -> String {
    let Ok(exe) = std::env::current_exe().and_then(|e| e.canonicalize()) else {
        return "wsbus".to_owned();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|dir| dir.join("wsbus").canonicalize().is_ok_and(|p| p == exe))
    });
    if on_path {
        return "wsbus".to_owned();
    }
    let relative = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(|p| p.to_path_buf()));
    relative.unwrap_or(exe).display().to_string()
}

/// What `wsbus dev` prints: its nodes, and commands to paste that point at *its* Redis and
/// node ids (the examples in docs/operations.md assume `redis://127.0.0.1:6379`, which may be another
/// Redis). Only tools the setup installs: a browser, `wsbus` itself and `redis-cli`.
fn banner(
    redis_url: &str,
    ids: &[String],
    addrs: &[SocketAddr],
    wsbus: &str,
    config: &NodeConfig,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wsbus dev cluster: {} nodes on Redis {redis_url}",
        addrs.len()
    );
    for (id, addr) in ids.iter().zip(addrs) {
        let _ = writeln!(
            out,
            "  node {id}: ws://{addr}/ws/<user-id>  (page: http://{addr}/)"
        );
    }
    let (first, last) = (addrs[0], addrs[addrs.len() - 1]);
    let _ = writeln!(
        out,
        "Chat: open these in two browser tabs and press Connect in each:"
    );
    let _ = writeln!(out, "  http://{first}/?user=alice&to=bob");
    let _ = writeln!(out, "  http://{last}/?user=bob&to=alice");
    let last_id = &ids[ids.len() - 1];
    let _ = writeln!(out, "Look at the bus from another terminal:");
    let _ = writeln!(out, "  {wsbus} nodes --redis-url {redis_url}");
    let _ = writeln!(out, "  {wsbus} whereis --redis-url {redis_url} bob");
    let _ = writeln!(out, "  {wsbus} inspect --redis-url {redis_url} {last_id}");
    let _ = writeln!(
        out,
        "  redis-cli -u {redis_url} XRANGE wsbus:inbox:{last_id} - +"
    );
    if config.events.any() || !config.backend_actions.is_empty() {
        let shards = match config.events_shards {
            1 => String::new(),
            n => format!(" --shards {n}"),
        };
        let _ = writeln!(out, "Follow what users do (the events stream):");
        let _ = writeln!(out, "  {wsbus} events --redis-url {redis_url}{shards}");
    }
    let _ = writeln!(out, "Metrics: http://{first}/metrics");
    let _ = writeln!(out, "Ctrl-C stops everything.");
    out
}

/// Options of `wsbus dev` (beside every `wsbus serve` flag, which it passes to its nodes).
#[derive(Debug, Clone, clap::Args)]
pub struct DevOptions {
    /// Number of nodes.
    #[arg(long, default_value_t = 2)]
    pub nodes: u16,
    /// Host to bind the nodes on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the first node; the others take the next ones.
    #[arg(long, default_value_t = 8080)]
    pub base_port: u16,
}

/// Runs the dev cluster until `shutdown` resolves (Ctrl-C in the binary): nodes `dev-1` ..
/// with `config` (every `serve` flag given to `wsbus dev`), on `redis_url` if one was given,
/// else on a `redis-server` child. Without a JWT setting the nodes run `--insecure`.
pub async fn run(
    options: DevOptions,
    base: NodeConfig,
    redis_url: Option<String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if options.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let (redis_url, _redis) = match redis_url {
        Some(url) => (url, None),
        None => {
            let redis = RedisChild::start().await?;
            tracing::info!(url = %redis.url(), "started redis-server");
            (redis.url(), Some(redis))
        }
    };
    let stop = CancellationToken::new();
    let mut nodes = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 0..options.nodes {
        let port = options.base_port + i;
        let listener = TcpListener::bind((options.host.as_str(), port)).await?;
        addrs.push(listener.local_addr()?);
        let mut config = base.clone();
        config.node_id = Some(node_id(i));
        config.redis_url = redis_url.clone();
        config.insecure = config.jwt_secret.is_none() && config.jwt_public_key.is_none();
        let stop = stop.clone();
        nodes.push(tokio::spawn(crate::server::run(
            config,
            listener,
            stop.cancelled_owned(),
        )));
    }
    let ids: Vec<String> = (0..options.nodes).map(node_id).collect();
    print!(
        "{}",
        banner(&redis_url, &ids, &addrs, &wsbus_command(), &base)
    );
    shutdown.await;
    stop.cancel();
    for node in nodes {
        node.await??;
    }
    Ok(())
}
