//! The shared test harness: real `redis-server` processes, real nodes (in-process through
//! `wsbus::run`, or as `wsbus` processes where signals matter) and real WebSocket clients.
//! Everything waits on conditions with deadlines; nothing sleeps for a guessed time.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use wsbus::NodeConfig;
pub use wsbus::dev::RedisChild as Redis;

pub mod cluster;
pub mod proxy;
pub mod raw;

/// Key names under the default prefix, as the nodes build them.
pub fn key_names() -> wsbus::redis::keys::Keys {
    wsbus::redis::keys::Keys::new("wsbus")
}

/// How long any expected event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The metric of envelopes appended to other nodes' inboxes (one per message and
/// destination node, however many share an entry); every node of the test process adds to it.
pub const TO_BUS: &str = "wsbus_messages_to_bus_total";

/// Polls `check` until it returns `Some` or `deadline` passes.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Redis a test runs against: one server, or a three-shard cluster. Tests of cross-node
/// behaviour run against both (see [`on_both`]).
pub enum Backend {
    Single(Redis),
    Cluster(cluster::RedisCluster),
}

impl Backend {
    pub async fn single() -> Backend {
        Backend::Single(Redis::start().await.unwrap())
    }

    pub async fn cluster() -> Backend {
        Backend::Cluster(cluster::RedisCluster::start().await)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Backend::Cluster(_))
    }

    /// The single Redis; panics on a cluster.
    pub fn redis(&mut self) -> &mut Redis {
        match self {
            Backend::Single(r) => r,
            Backend::Cluster(_) => panic!("a single-Redis test"),
        }
    }

    /// Kills the single Redis (SIGKILL: nothing saved).
    pub async fn kill(&mut self) {
        self.redis().kill().await;
    }

    /// Starts an empty single Redis on the port of the one killed.
    pub async fn revive(&mut self) {
        let port = self.redis().port();
        *self.redis() = Redis::start_on(port).await.unwrap();
    }

    /// Kills the single Redis and starts an empty one on its port.
    pub async fn restart_empty(&mut self) {
        self.kill().await;
        self.revive().await;
    }

    pub fn url(&self) -> String {
        match self {
            Backend::Single(r) => r.url(),
            Backend::Cluster(c) => c.url(),
        }
    }

    /// Test timings, pointed at this backend.
    pub fn config(&self, id: &str) -> NodeConfig {
        let mut c = config(id, &self.url());
        c.redis_cluster = self.is_cluster();
        c
    }

    pub async fn node(&self, id: &str) -> Node {
        Node::start_with(self.config(id)).await
    }

    /// A node with test timings and whatever `tune` changes.
    pub async fn node_with(&self, id: &str, tune: impl FnOnce(&mut NodeConfig)) -> Node {
        let mut config = self.config(id);
        tune(&mut config);
        Node::start_with(config).await
    }

    /// The two-node fixture: nodes `a` and `b` on this backend.
    pub async fn pair(&self) -> (Node, Node) {
        (self.node("a").await, self.node("b").await)
    }

    /// Extra `wsbus` arguments that select this backend.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--redis-url".to_owned(), self.url()];
        if self.is_cluster() {
            args.push("--redis-cluster".to_owned());
        }
        args
    }

    /// A connection that routes like the nodes' own (cluster-aware).
    pub async fn conn(&self) -> wsbus::redis::RedisConn {
        let redis = wsbus::cli::open(&self.url(), self.is_cluster()).unwrap();
        redis.conn().await.unwrap()
    }

    /// The URL of every Redis server: the one, or each shard of the cluster.
    pub fn shard_urls(&self) -> Vec<String> {
        match self {
            Backend::Single(r) => vec![r.url()],
            Backend::Cluster(c) => c
                .ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect(),
        }
    }

    /// How often Redis ran `command` since it started (summed over every shard), from
    /// `INFO commandstats`.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut total = 0;
        for url in self.shard_urls() {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut redis_conn(&url).await)
                .await
                .unwrap();
            let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
            total += info
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |n| n.parse::<u64>().unwrap());
        }
        total
    }

    /// Every session of `user` (live node or not), oldest first.
    pub async fn sessions(&self, user: &str) -> Vec<wsbus::cli::UserLocation> {
        sessions(&self.url(), self.is_cluster(), user).await
    }

    /// The node of `user`'s oldest session, if any.
    pub async fn where_is(&self, user: &str) -> Option<String> {
        self.sessions(user).await.into_iter().next().map(|l| l.node)
    }

    pub async fn wait_unregistered(&self, user: &str) {
        eventually(DEADLINE, &format!("{user} unregistered"), || async move {
            self.where_is(user).await.is_none().then_some(())
        })
        .await;
    }

    /// Every key under the default prefix (on every shard), sorted.
    pub async fn keys(&self) -> Vec<String> {
        match self {
            Backend::Single(r) => keys(&r.url()).await,
            Backend::Cluster(c) => c.keys().await,
        }
    }
}

/// Defines `mod $test { single, cluster }`: runs `async fn $test(Backend)` against a single
/// Redis and against a Redis Cluster.
#[macro_export]
macro_rules! on_both {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test]
                async fn single() {
                    super::$test($crate::common::Backend::single().await).await
                }
                #[tokio::test]
                async fn cluster() {
                    super::$test($crate::common::Backend::cluster().await).await
                }
            }
        )*
    };
}

/// A node config with test timings: fast heartbeats and a short node TTL.
pub fn config(id: &str, redis: &str) -> NodeConfig {
    let mut c = NodeConfig::new(id, redis);
    c.heartbeat_interval = Duration::from_millis(100);
    c.node_ttl = Duration::from_millis(1500);
    c.inbox_block = Duration::from_millis(500);
    c.redis_timeout = Duration::from_millis(500);
    c.shutdown_timeout = Duration::from_secs(3);
    // Tests flood on purpose; the rate-limit test sets its own limits.
    c.rate_limit = 1e9;
    c.rate_burst = u32::MAX;
    c
}

/// A node running in this process.
pub struct Node {
    pub id: String,
    pub addr: SocketAddr,
    /// Where `/readyz` is: `--admin-bind` when set, else `addr`.
    health: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), wsbus::NodeError>>>,
}

impl Node {
    /// Starts node `id` on Redis `redis` with test timings.
    pub async fn start(id: &str, redis: &str) -> Node {
        Self::start_with(config(id, redis)).await
    }

    /// Starts a node with this config.
    pub async fn start_with(config: NodeConfig) -> Node {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let id = config.node_id.clone().unwrap();
        let health = config.admin_bind.unwrap_or(addr);
        let task = tokio::spawn(wsbus::run(config, listener, stop.clone().cancelled_owned()));
        let node = Node {
            id,
            addr,
            health,
            stop,
            task: Some(task),
        };
        node.wait_ready().await;
        node
    }

    /// Waits until `/readyz` says ready.
    pub async fn wait_ready(&self) {
        let addr = self.health;
        eventually(DEADLINE, "node ready", || async move {
            http_get(addr, "/readyz").await.filter(|(s, _)| *s == 200)
        })
        .await;
    }

    /// The WebSocket URL of `user` on this node.
    pub fn url(&self, user: &str) -> String {
        format!("ws://{}/ws/{user}", self.addr)
    }

    /// Connects `user`, panicking on failure.
    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(self, user).await.unwrap_or_else(|status| {
            panic!("connecting {user} to {} failed: HTTP {status}", self.id)
        })
    }

    /// Shuts the node down cleanly and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("node stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The value of the Prometheus sample `series` (name with labels, as rendered) on the node at
/// `addr`, or 0.
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await.expect("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// `GET path` on `addr`: (status, body), or `None` if nothing answered.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// `method path` on `addr` with `headers` and a body: (status, body as JSON, or `Null` when
/// the body is not JSON).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // The server may answer (413) before the whole body is written.
    let _ = s.write_all(&bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("an HTTP reply in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Numbers probes and markers apart.
static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A real WebSocket client.
pub struct Client {
    pub user: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read ahead and handed back ([`Client::pushed_back`]), returned first.
    ahead: std::collections::VecDeque<Value>,
}

/// What arrived from the server.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    Closed(Option<u16>),
}

impl Client {
    /// Connects `user` to `node`; `Err(status)` when the upgrade is refused.
    pub async fn connect(node: &Node, user: &str) -> Result<Client, u16> {
        Self::connect_url(&node.url(user), user).await
    }

    /// Connects to a raw URL; `Err(0)` when nothing answered at HTTP level.
    pub async fn connect_url(url: &str, user: &str) -> Result<Client, u16> {
        Self::connect_request(url, user).await
    }

    /// Connects with a prepared request (e.g. with extra headers); `Err(status)` when the
    /// upgrade is refused, `Err(0)` when nothing answered at HTTP level.
    pub async fn connect_request(
        request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
        user: &str,
    ) -> Result<Client, u16> {
        let request = request.into_client_request().expect("a valid request");
        let url = request.uri().to_string();
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Client {
                user: user.to_owned(),
                ws,
                ahead: Default::default(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(tokio_tungstenite::tungstenite::Error::Io(_)) => Err(0),
            Err(e) => panic!("connect {url}: {e}"),
        }
    }

    /// Sends a raw text frame.
    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends any frame.
    pub async fn send_frame(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Sends a `message` to `to`.
    pub async fn send_to(&mut self, to: &str, text: &str) {
        let frame = json!({"action": "message", "data": {"to": to, "text": text}});
        self.send_raw(&frame.to_string()).await;
    }

    /// Feeds a `message` without flushing (for fast bursts); call `flush` after.
    pub async fn feed_to(&mut self, to: &str, text: &str) {
        let frame = json!({"action": "message", "data": {"to": to, "text": text}});
        self.ws
            .feed(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    /// Flushes fed frames.
    pub async fn flush(&mut self) {
        self.ws.flush().await.unwrap();
    }

    /// The next JSON frame or close, within the deadline.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(DEADLINE)
            .await
            .unwrap_or_else(|| panic!("{}: nothing arrived in time", self.user))
    }

    /// The next JSON frame or close, or `None` if nothing arrives within `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<Event> {
        if let Some(v) = self.ahead.pop_front() {
            return Some(Event::Json(v));
        }
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next()).await.ok()?;
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Some(Event::Json(
                        serde_json::from_str(&t).expect("server sends JSON"),
                    ));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Event::Closed(frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected frame {other:?}"),
                None | Some(Err(_)) => return Some(Event::Closed(None)),
            }
        }
    }

    /// Hands a frame read ahead back: the next read returns it.
    pub fn pushed_back(&mut self, v: Value) {
        self.ahead.push_back(v);
    }

    /// The next frame, which must be JSON.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Json(v) => v,
            Event::Closed(code) => panic!("{}: closed ({code:?}) instead of a frame", self.user),
        }
    }

    /// Expects a message from `from` with `text`.
    pub async fn expect_message(&mut self, from: &str, text: &str) {
        let v = self.recv().await;
        assert_eq!(
            v,
            json!({"from": from, "action": "message", "data": {"to": self.user, "text": text}}),
            "{} expected a message from {from}",
            self.user
        );
    }

    /// Expects an error frame with `error`.
    pub async fn expect_error(&mut self, error: &str) {
        let v = self.recv().await;
        assert_eq!(
            v,
            json!({"from": self.user, "action": "error", "data": {"error": error}}),
            "{} expected an error",
            self.user
        );
    }

    /// Expects the server to close with `code`.
    pub async fn expect_close(&mut self, code: u16) {
        match self.next_event().await {
            Event::Closed(got) => assert_eq!(got, Some(code), "{}: close code", self.user),
            Event::Json(v) => panic!("{}: expected close {code}, got {v}", self.user),
        }
    }

    /// Expects the server to close with `code` and `reason` in the close frame.
    pub async fn expect_close_with(&mut self, code: u16, reason: &str) {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no close in time", self.user));
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    assert_eq!(
                        (u16::from(frame.code), frame.reason.as_str()),
                        (code, reason),
                        "{}: close frame",
                        self.user
                    );
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("{}: expected close {code}, got {other:?}", self.user),
            }
        }
    }

    /// Sends `{"action": action, "data": data}`.
    pub async fn act(&mut self, action: &str, data: Value) {
        self.send_raw(&json!({"action": action, "data": data}).to_string())
            .await;
    }

    /// Joins `room`; returns the `joined` frame.
    pub async fn join(&mut self, room: &str) -> Value {
        self.join_with(json!({"room": room})).await
    }

    /// Sends `join` with `data` (a room, and `since`/`epoch` to recover); returns the
    /// `joined` frame. Presence events about other users that arrive first are skipped: one
    /// sent just before this join (another node's member joined a moment ago, its event still
    /// on the bus) reaches this session too.
    pub async fn join_with(&mut self, data: Value) -> Value {
        self.act("join", data.clone()).await;
        loop {
            let v = self.recv().await;
            if v["action"] == "presence" && v["from"] != self.user.as_str() {
                continue;
            }
            assert_eq!(v["action"], "joined", "{}: {v}", self.user);
            assert_eq!(v["from"], self.user.as_str(), "{v}");
            assert_eq!(v["data"]["room"], data["room"], "{v}");
            return v;
        }
    }

    /// The member count a `join` of `room` reports.
    pub async fn join_count(&mut self, room: &str) -> u64 {
        self.join(room).await["data"]["members"]
            .as_u64()
            .expect("members is a number")
    }

    /// Sends a `room_message`.
    pub async fn say(&mut self, room: &str, text: &str) {
        self.act("room_message", json!({"room": room, "text": text}))
            .await;
    }

    /// Expects a `room_message` from `from` in `room`.
    pub async fn expect_room_message(&mut self, from: &str, room: &str, text: &str) {
        assert_eq!(
            self.recv().await,
            json!({"from": from, "action": "room_message", "data": {"room": room, "text": text}}),
            "{}",
            self.user
        );
    }

    /// Expects a presence `event` (`join`, `leave`) of `user` in `room`.
    pub async fn expect_presence(&mut self, user: &str, room: &str, event: &str) {
        assert_eq!(
            self.recv().await,
            json!({"from": user, "action": "presence", "data": {"room": room, "event": event}}),
            "{}",
            self.user
        );
    }

    /// Sends this session a marker that only it gets back (an unknown action's error, sent
    /// by its own node after every frame already queued for it), and returns the marker's
    /// error text.
    pub async fn send_probe(&mut self) -> String {
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let action = format!("probe-{n}");
        self.act(&action, json!({})).await;
        format!("unknown action '{action}'")
    }

    /// Nothing is queued for this session: a probe ([`Client::send_probe`]) comes back
    /// before anything else does. (What another node may still send is caught by
    /// [`Client::expect_nothing_from`].)
    pub async fn expect_nothing(&mut self) {
        let marker = self.send_probe().await;
        self.expect_marker_error(&marker).await;
    }

    /// Nothing more arrives from `sender` (or from anything that `sender`'s earlier frames
    /// caused): `sender` sends a marker message after them, and it is the next frame here.
    pub async fn expect_nothing_from(&mut self, sender: &mut Client) {
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let marker = format!("marker-{n}");
        sender.send_to(&self.user, &marker).await;
        let v = self.recv().await;
        assert_eq!(
            (&v["from"], &v["action"], &v["data"]["text"]),
            (&json!(sender.user), &json!("message"), &json!(marker)),
            "{}: unexpected frame before {sender}'s marker: {v}",
            self.user,
            sender = sender.user
        );
    }

    /// The next frame is the error `marker`: anything before it is unexpected.
    pub async fn expect_marker_error(&mut self, marker: &str) {
        let v = self.recv().await;
        assert_eq!(
            v,
            json!({"from": self.user, "action": "error", "data": {"error": marker}}),
            "{}: unexpected frame before the marker",
            self.user
        );
    }

    /// Whether this session is live: a probe is answered (true), or the server refuses it
    /// with `not unique session` or closes it (false, with the close code).
    pub async fn settle(&mut self) -> Result<(), Option<u16>> {
        let marker = self.send_probe().await;
        loop {
            match self.next_event().await {
                Event::Json(v) if v["data"]["error"] == marker.as_str() => return Ok(()),
                Event::Json(v) if v["data"]["error"] == "not unique session" => {}
                Event::Json(v) => panic!("{}: unexpected frame {v}", self.user),
                Event::Closed(code) => return Err(code),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        // Wait for the server's close reply, so the server has seen it.
        let _ =
            tokio::time::timeout(DEADLINE, async { while self.ws.next().await.is_some() {} }).await;
    }

    /// Drops the TCP connection without a close frame.
    pub fn abort(self) {
        drop(self);
    }
}

/// A direct Redis connection for inspecting and injecting.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Keys under the default prefix, sorted.
pub async fn keys(url: &str) -> Vec<String> {
    let mut c = redis_conn(url).await;
    let mut k: Vec<String> = redis::cmd("KEYS")
        .arg("wsbus:*")
        .query_async(&mut c)
        .await
        .unwrap();
    k.sort();
    k
}

/// Every session of `user` (live node or not), oldest first, as `wsbus whereis` reads them.
pub async fn sessions(url: &str, cluster: bool, user: &str) -> Vec<wsbus::cli::UserLocation> {
    let redis = wsbus::cli::open(url, cluster).unwrap();
    let keys = key_names();
    wsbus::cli::where_is(&redis, &keys, user).await.unwrap()
}

/// A `wsbus serve` process (for signal tests).
pub struct NodeProcess {
    pub id: String,
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl NodeProcess {
    /// Starts `wsbus serve` with test timings on a single Redis.
    pub async fn start(id: &str, redis: &str) -> NodeProcess {
        Self::start_with(id, &["--redis-url".to_owned(), redis.to_owned()]).await
    }

    /// Starts `wsbus serve` with test timings and these Redis arguments.
    pub async fn start_with(id: &str, redis_args: &[String]) -> NodeProcess {
        Self::start_with_flags(id, redis_args, &[]).await
    }

    /// Starts `wsbus serve` with test timings, these Redis arguments and more flags.
    pub async fn start_with_flags(id: &str, redis_args: &[String], flags: &[&str]) -> NodeProcess {
        Self::start_with_flags_env(id, redis_args, flags, &[]).await
    }

    /// As [`NodeProcess::start_with_flags`], with environment variables; `--insecure` is
    /// left to `WSBUS_INSECURE` when `env` sets it.
    pub async fn start_with_flags_env(
        id: &str,
        redis_args: &[String],
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let insecure = if env.iter().any(|(k, _)| *k == "WSBUS_INSECURE") {
            None
        } else {
            Some("--insecure")
        };
        // A port another process took before the node bound it: the node exits, and is
        // started again on another.
        for _ in 0..5 {
            let port = wsbus::dev::free_port().unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
                .args(["serve", "--bind", &addr.to_string()])
                .args(redis_args)
                .args([
                    "--node-id",
                    id,
                    "--heartbeat-interval",
                    "100ms",
                    "--node-ttl",
                    "1500ms",
                ])
                .args(["--inbox-block", "500ms"])
                .args(insecure)
                .args(flags)
                .envs(env.iter().copied())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("run the wsbus binary");
            let mut p = NodeProcess {
                id: id.to_owned(),
                addr,
                child,
            };
            if p.wait_ready().await {
                return p;
            }
        }
        panic!("wsbus serve {id} did not start");
    }

    /// Waits until this process says `/readyz` 200 (true), or exits first (false).
    async fn wait_ready(&mut self) -> bool {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            // Ready, and this node: another process holding the port is not.
            if let Some((200, body)) = http_get(self.addr, "/readyz").await
                && serde_json::from_str::<Value>(&body).is_ok_and(|v| v["node"] == self.id)
            {
                return true;
            }
            assert!(
                Instant::now() < end,
                "process node {} not ready in time",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, user: &str) -> String {
        format!("ws://{}/ws/{user}", self.addr)
    }

    /// The process's resident set size (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id().expect("process running"))
    }

    /// The value of the Prometheus sample `series` (name with labels, as rendered), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(self.addr, series).await
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process running");
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Waits for the process to exit; returns how long it took.
    pub async fn wait_exit(&mut self) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("process exits in time")
            .unwrap();
        (status, start.elapsed())
    }
}

/// A raw TCP connection that has sent `bytes` (e.g. part of a request head) and stops there.
pub async fn stalled_connection(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads until the server closes `stream` (EOF or reset), discarding what arrives; the
/// bytes read, or `None` if it is still open after `wait`.
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read).await.ok().map(|()| got)
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "wsbus-test-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The resident set size (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// A bus envelope: a `message` from `from` (on node `origin`) to `to`, id 1, boot 0.
pub fn message_envelope(
    origin: &str,
    from: &str,
    to: &str,
    text: &str,
) -> wsbus::wire::envelope::Envelope<'static> {
    wsbus::wire::envelope::Envelope {
        id: 1,
        boot: 0,
        origin: origin.to_owned().into(),
        from: from.to_owned().into(),
        to: to.to_owned().into(),
        hops: 0,
        sent_us: 0,
        origin_sid: 0,
        to_recipient: true,
        to_sender: false,
        tried: Vec::new(),
        stamp: None,
        body: wsbus::wire::envelope::Body::Message {
            text: text.to_owned().into(),
        },
    }
}

/// An encoded bus envelope: a `message` from `from` (on node `origin`) to `to`.
pub fn envelope(origin: &str, from: &str, to: &str, text: &str) -> Vec<u8> {
    let mut env = Vec::new();
    message_envelope(origin, from, to, text).encode_into(&mut env);
    env
}

/// Appends `env` (an encoded `message` envelope from `from` to `to`) to `inbox` as an entry
/// in the single layout, the only one nodes before packed entries write:
/// `XADD <inbox> * from <from> to <to> action message env <env>`.
pub async fn append_single_entry(
    conn: &mut redis::aio::MultiplexedConnection,
    inbox: &str,
    from: &str,
    to: &str,
    env: &[u8],
) {
    let _: String = redis::cmd("XADD")
        .arg(inbox)
        .arg("*")
        .arg("from")
        .arg(from)
        .arg("to")
        .arg(to)
        .arg("action")
        .arg("message")
        .arg("env")
        .arg(env)
        .query_async(conn)
        .await
        .unwrap();
}
