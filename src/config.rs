//! Node configuration: every tunable of a node, its default, and its flag and `WSBUS_*`
//! environment variable. The only place a limit comes from.

use std::time::Duration;

use clap::Args;

/// The smallest head limit hyper accepts (its minimum buffer size).
pub const MIN_HEAD_BYTES: usize = 8192;

/// The most bytes a WebSocket frame's header takes (a server's frames are unmasked: 2 bytes
/// and an 8-byte length; 14 leaves room for a mask).
pub const WS_FRAME_HEAD_BYTES: usize = 14;

/// Room kept for a history stamp on a published frame (`,"room":"<64 bytes>","offset":<20
/// digits>,"epoch":"<epoch>"`): a frame that fits the publish limit still fits once stamped.
pub const STAMP_BYTES: usize = 256;

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// What a connect past the per-user session limit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnSessionLimit {
    /// Refuse the newcomer with `not unique session` and close 4001.
    Reject,
    /// Accept the newcomer and close the user's oldest session with 4006.
    Replace,
}

impl OnSessionLimit {
    /// The mode's name, as the Redis claim function takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnSessionLimit::Reject => "reject",
            OnSessionLimit::Replace => "replace",
        }
    }
}

/// Who may put a client in a room (`--room-access`). A backend may in every mode
/// (`POST /api/join`, ingress `op=join`, the token's `join` claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoomAccess {
    /// Any client may join any room.
    Open,
    /// A client may join the rooms its token's `rooms` claim lists (ids, `prefix*`).
    Token,
    /// Clients cannot join rooms; only the backend puts users in rooms.
    Server,
}

fn parse_head_bytes(s: &str) -> Result<usize, String> {
    let min = MIN_HEAD_BYTES;
    match s.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(format!("at least {min} (hyper's smallest buffer)")),
        Err(e) => Err(e.to_string()),
    }
}

/// Everything a node needs to run. `Default` gives the documented defaults.
#[derive(Debug, Clone, Args)]
pub struct NodeConfig {
    /// Unique id of this node (letters, digits, `_ . -`; default: random).
    #[arg(long, env = "WSBUS_NODE_ID")]
    pub node_id: Option<String>,

    /// Run without authentication (anyone may connect as anyone). Required when no JWT
    /// setting is given, refused beside one; `wsbus dev` implies it.
    #[arg(long, env = "WSBUS_INSECURE", value_parser = clap::builder::BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    pub insecure: bool,

    /// Shared secret for HS256 tokens, at least 32 bytes (RFC 7518 §3.2).
    #[arg(long, env = "WSBUS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key file for RS256 (RSA) or ES256 (EC P-256) tokens.
    #[arg(long, env = "WSBUS_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,

    /// Comma-separated `Origin`s allowed to open WebSockets (e.g. `https://chat.example.com`);
    /// requests with another Origin get HTTP 403. Default: any (clients without an Origin
    /// header, i.e. non-browsers, are always allowed).
    #[arg(long, env = "WSBUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Messages per second one connection may send (token bucket refill rate).
    #[arg(long, env = "WSBUS_RATE_LIMIT", default_value_t = 50.0)]
    pub rate_limit: f64,

    /// Burst size of the per-connection token bucket; after this many refused frames in a
    /// row the connection is closed with 4005.
    #[arg(long, env = "WSBUS_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Messages kept per user stream and per room stream for recovery after a reconnect
    /// (0 = history off: frames carry no offset and nothing is stored).
    #[arg(long, env = "WSBUS_HISTORY", default_value_t = 0)]
    pub history: u32,

    /// A history stream nobody wrote to (and whose user neither connected nor disconnected)
    /// for this long expires.
    #[arg(long, env = "WSBUS_HISTORY_TTL", default_value = "5m", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// Bytes of frames kept per user stream and per room stream, besides `--history`
    /// messages: past it the oldest are trimmed (down to 7/8 of it, the newest always kept).
    /// At least what one frame to a client may be (2 × `--max-frame-bytes` + 1 KiB).
    #[arg(long, env = "WSBUS_HISTORY_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub history_max_bytes: usize,

    /// Messages one recovery replays at most; a client that missed more is told
    /// `recovered: false, reason: "too_many"` (and `history` pages are capped at this).
    #[arg(long, env = "WSBUS_RECOVER_MAX", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub recover_max: u32,

    /// Sessions one user may hold at once, across the cluster (phone, laptop, tabs). `1` keeps
    /// one session per user.
    #[arg(long, env = "WSBUS_MAX_SESSIONS_PER_USER", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_sessions_per_user: u32,

    /// What a connect past `--max-sessions-per-user` does: `reject` refuses the newcomer
    /// (`not unique session`, close 4001); `replace` accepts it and closes the user's oldest
    /// session with 4006 (with 1 session per user: "last login wins").
    #[arg(long, env = "WSBUS_ON_SESSION_LIMIT", value_enum, default_value_t = OnSessionLimit::Reject)]
    pub on_session_limit: OnSessionLimit,

    /// How long a user's session resume secrets (`?resume=`) stay valid after the last one
    /// was issued to it; a session whose node died keeps its secret this long at most.
    #[arg(long, env = "WSBUS_RESUME_TTL", default_value = "1h", value_parser = parse_duration)]
    pub resume_ttl: Duration,

    /// Who may join rooms: `open` (any client, any room), `token` (the rooms in the token's
    /// `rooms` claim), `server` (only the backend). Default: `token` with authentication,
    /// `open` with `--insecure`.
    #[arg(long, env = "WSBUS_ROOM_ACCESS", value_enum)]
    pub room_access: Option<RoomAccess>,

    /// Most users in one room; a join past it gets `room '<id>' is full`.
    #[arg(long, env = "WSBUS_MAX_ROOM_MEMBERS", default_value_t = 10_000)]
    pub max_room_members: u32,

    /// Most rooms one session may be in; a join past it gets `too many rooms`.
    #[arg(long, env = "WSBUS_MAX_ROOMS_PER_SESSION", default_value_t = 100)]
    pub max_rooms_per_session: usize,

    /// Most users a `members` reply lists (sorted); longer lists are cut and say
    /// `"truncated": true`.
    #[arg(long, env = "WSBUS_MAX_MEMBERS_LISTED", default_value_t = 1_000)]
    pub max_members_listed: usize,

    /// Rooms with more members than this send no presence join/leave events (the member
    /// count stays available through `joined` and `members`).
    #[arg(
        long,
        env = "WSBUS_PRESENCE_EVENTS_MAX_MEMBERS",
        default_value_t = 1_000
    )]
    pub presence_events_max_members: u64,

    /// CA certificate (PEM) to verify a `rediss://` Redis server with, instead of the
    /// system's roots.
    #[arg(long, env = "WSBUS_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// Serve `/healthz`, `/readyz` and `/metrics` on this address instead of the client one.
    #[arg(long, env = "WSBUS_ADMIN_BIND")]
    pub admin_bind: Option<std::net::SocketAddr>,

    /// Keys that open the HTTP API (`/api/`), comma-separated so a key can be rotated (old
    /// and new both valid meanwhile). Sent as `Authorization: Bearer <key>`. Without one,
    /// every `/api/` path answers 404.
    #[arg(
        long = "api-key",
        env = "WSBUS_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Most publishes in one batched `POST /api/publish` (a JSON array); more is a 400.
    #[arg(long, env = "WSBUS_API_MAX_BATCH", default_value_t = 1000)]
    pub api_max_batch: usize,

    /// Largest HTTP API request body in bytes; a larger one gets 413.
    #[arg(long, env = "WSBUS_API_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub api_max_body_bytes: usize,

    /// Most recipients (users and rooms together) of one publish, through the API (400 past
    /// it) or ingress (the entry is counted invalid). A batch is checked per item.
    #[arg(long, env = "WSBUS_MAX_PUBLISH_TARGETS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_publish_targets: u32,

    /// Custom client actions relayed as they are (comma-separated, e.g. `typing,read`): a
    /// client sends `{"action":"typing","data":{"to":"bob",...}}` (or `"room"` instead of
    /// `to`) and the recipients get `{"from":"alice","action":"typing","data":<data>}`,
    /// routed like `message`. Built-in action names (and `error`) are refused. Default: none.
    #[arg(long, env = "WSBUS_RELAY_ACTIONS", value_delimiter = ',')]
    pub relay_actions: Vec<String>,

    /// Relayed actions (each also in `--relay-actions`) kept in history (`--history`) like
    /// messages, with an offset. Others are transient: delivered to whoever is connected,
    /// never stored. Default: none.
    #[arg(long, env = "WSBUS_STORED_RELAY_ACTIONS", value_delimiter = ',')]
    pub stored_relay_actions: Vec<String>,

    /// Failed API authentications one source address may make per second, on average; past
    /// the burst, its requests get 429 until the bucket refills.
    #[arg(long, env = "WSBUS_API_AUTH_FAILURE_RATE", default_value_t = 1.0)]
    pub api_auth_failure_rate: f64,

    /// Failed API authentications one source address may make in a burst.
    #[arg(long, env = "WSBUS_API_AUTH_FAILURE_BURST", default_value_t = 20)]
    pub api_auth_failure_burst: u32,
    /// Custom client actions for the application's backend (comma-separated, e.g.
    /// `order,vote`): `{"action":"order","data":{...}}` is appended to the events stream as
    /// `type=action` and delivered to nobody. Turns on the `action` event type. A name may
    /// not be a relay action nor a built-in one. Default: none.
    #[arg(long, env = "WSBUS_BACKEND_ACTIONS", value_delimiter = ',')]
    pub backend_actions: Vec<String>,

    /// Which events the node appends to the events stream for the application's backend:
    /// `all`, or a comma list of `connect`, `disconnect`, `join`, `leave`, `message`,
    /// `room_message`, `action`, `ingress_invalid`. Default: none (no stream is written).
    #[arg(long, env = "WSBUS_EVENTS", default_value = "none")]
    pub events: crate::wire::event::EventKinds,

    /// Approximate cap on each events stream's length (`XTRIM ... MAXLEN ~` once a second by
    /// each node: a stream may pass it by a second of events).
    #[arg(long, env = "WSBUS_EVENTS_MAXLEN", default_value_t = 1_000_000)]
    pub events_maxlen: usize,

    /// Events streams: 1 writes `P:events`; N > 1 writes `P:events:<k>` with
    /// `k = crc32(user) mod N` (a Redis Cluster spreads them; one user's events stay in
    /// order in one stream).
    #[arg(long, env = "WSBUS_EVENTS_SHARDS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub events_shards: u32,

    /// How long an ingress entry may stay read but unacknowledged (its node died while
    /// routing it) before another node claims it (`XAUTOCLAIM` min-idle); also how often
    /// each node looks for such entries.
    #[arg(long, env = "WSBUS_INGRESS_CLAIM_IDLE", default_value = "10s", value_parser = parse_duration)]
    pub ingress_claim_idle: Duration,

    /// Approximate cap on the ingress stream's length (`XTRIM MAXLEN ~`, every claim
    /// interval): routed entries are only acknowledged, so this is what removes them.
    #[arg(long, env = "WSBUS_INGRESS_MAXLEN", default_value_t = 100_000)]
    pub ingress_maxlen: usize,

    /// Redis URL (`redis://[user:pass@]host:port[/db]`).
    #[arg(
        long,
        env = "WSBUS_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Treat `--redis-url` as a comma-separated list of Redis Cluster seed nodes.
    #[arg(long, env = "WSBUS_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Prefix of every Redis key.
    #[arg(long, env = "WSBUS_PREFIX", default_value = "wsbus")]
    pub prefix: String,

    /// Largest client frame (and message) in bytes; larger ones are refused, never buffered.
    #[arg(long, env = "WSBUS_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Messages queued for one client before it is disconnected as a slow consumer (4002).
    #[arg(long, env = "WSBUS_SESSION_QUEUE", default_value_t = 1024)]
    pub session_queue: usize,

    /// Bytes of frames queued for one client before it is disconnected as a slow consumer
    /// (4002). Bounds what a client that stops reading pins: about this plus its socket
    /// buffers. One frame always fits into an empty queue.
    #[arg(long, env = "WSBUS_SESSION_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    pub session_queue_bytes: usize,

    /// Per-socket read chunk in bytes (tungstenite's default is 128 KiB). Small saves memory
    /// per connection (idle: 9.9 → 7.5 KiB going from 4 KiB/8 KiB to 1 KiB/2 KiB) at no
    /// measured throughput cost; larger frames just take several reads.
    #[arg(long, env = "WSBUS_WS_READ_BUFFER", default_value_t = 1024)]
    pub ws_read_buffer: usize,

    /// Per-socket write buffer in bytes before a write is forced.
    #[arg(long, env = "WSBUS_WS_WRITE_BUFFER", default_value_t = 2048)]
    pub ws_write_buffer: usize,

    /// How often the node pings each client; a client silent for two intervals is dropped.
    #[arg(long, env = "WSBUS_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// How often the node refreshes its registration and its view of live nodes.
    #[arg(long, env = "WSBUS_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// A node whose last heartbeat is older than this is dead: its users read as not found.
    #[arg(long, env = "WSBUS_NODE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub node_ttl: Duration,

    /// Approximate cap on an inbox stream's length in entries, applied by its node's
    /// heartbeat (`XTRIM MAXLEN ~`): a backstop against an inbox nobody reads, not flow
    /// control. An entry holds up to `--bus-pack` messages, so an unread inbox keeps between
    /// this many messages (one per entry, light traffic) and this many times `--bus-pack`.
    #[arg(long, env = "WSBUS_INBOX_MAXLEN", default_value_t = 10_000)]
    pub inbox_maxlen: usize,

    /// How long one blocking `XREAD` waits; the read deadline is this plus a margin.
    #[arg(long, env = "WSBUS_INBOX_BLOCK", default_value = "2s", value_parser = parse_duration)]
    pub inbox_block: Duration,

    /// Entries read per `XREAD` (`COUNT`).
    #[arg(long, env = "WSBUS_INBOX_READ_COUNT", default_value_t = 1024)]
    pub inbox_read_count: usize,

    /// Outgoing cross-node messages queued for the bus writer before senders wait.
    #[arg(long, env = "WSBUS_BUS_QUEUE", default_value_t = 16384)]
    pub bus_queue: usize,

    /// Most messages the bus writer sends in one pipeline.
    #[arg(long, env = "WSBUS_BUS_BATCH", default_value_t = 1024)]
    pub bus_batch: usize,

    /// Most messages in one inbox entry: what one bus batch sends one node is packed into
    /// entries of up to this many (the default, as `--bus-batch`'s, makes it one entry). 1
    /// writes every message as an entry of its own, the only layout a node that predates
    /// packed entries reads: use it while such nodes run (a rolling upgrade).
    #[arg(long, env = "WSBUS_BUS_PACK", default_value_t = 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub bus_pack: usize,

    /// Timeout of ordinary Redis commands (connects and replies).
    #[arg(long, env = "WSBUS_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Most connections this node holds; past it, new ones get HTTP 503.
    #[arg(long, env = "WSBUS_MAX_CONNECTIONS", default_value_t = 200_000)]
    pub max_connections: usize,

    /// Most time a client may take to send a request head (request line and headers), and
    /// that a kept-alive HTTP connection may wait for its next request; then it is closed.
    /// Slow-header clients (slowloris) hold a socket no longer than this.
    #[arg(long, env = "WSBUS_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// A connection that has not upgraded to a WebSocket and moves no byte for this long
    /// (e.g. a client that does not read its response) is closed.
    #[arg(long, env = "WSBUS_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,

    /// Largest request head (request line and headers) in bytes; a larger one gets HTTP 431.
    /// The default leaves room for an 8 KiB token in the query; hyper's own is ~400 KB.
    #[arg(long, env = "WSBUS_MAX_HEAD_BYTES", default_value_t = 16 * 1024, value_parser = parse_head_bytes)]
    pub max_head_bytes: usize,

    /// Connections per listener open without having upgraded to a WebSocket (sending a
    /// request head, or plain HTTP). Past it, each new connection closes the oldest of them,
    /// so stalled connections cannot lock real clients out.
    #[arg(long, env = "WSBUS_MAX_PENDING_CONNECTIONS", default_value_t = 8192)]
    pub max_pending_connections: usize,

    /// How long shutdown waits for sockets to close and the bus to drain.
    #[arg(long, env = "WSBUS_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl Default for NodeConfig {
    /// The documented defaults, from the clap attributes above (one source of truth), with
    /// the environment ignored: `WSBUS_*` variables apply to `wsbus serve` only.
    fn default() -> Self {
        use clap::FromArgMatches;
        let command = Self::augment_args(clap::Command::new("wsbus")).mut_args(|a| a.env(None));
        let matches = command
            .try_get_matches_from(["wsbus"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults parse")
    }
}

impl NodeConfig {
    /// The largest frame (its JSON text) a client may receive: twice the largest client
    /// frame plus 1 KiB, so that whatever a node makes of a client's frame (a message, a
    /// relay, with its history stamp) fits. A frame over it is never written: a publish that
    /// would make one is refused, a `history` reply is split to fit, and anything else closes
    /// the connection with 1009.
    pub fn max_out_frame_bytes(&self) -> usize {
        self.max_frame_bytes.saturating_mul(2).saturating_add(1024)
    }

    /// The socket's write buffer limit (tungstenite's `max_write_buffer_size`): what may sit
    /// buffered (`--ws-write-buffer`) plus one largest frame and its header, so a frame
    /// within [`NodeConfig::max_out_frame_bytes`] is always accepted.
    pub fn ws_max_write_buffer(&self) -> usize {
        self.ws_write_buffer
            .saturating_add(self.max_out_frame_bytes())
            .saturating_add(WS_FRAME_HEAD_BYTES)
    }

    /// The largest frame a publish (API, ingress, relay) may carry: what a client may
    /// receive, less the room its history stamp takes.
    pub fn max_publish_frame_bytes(&self) -> usize {
        self.max_out_frame_bytes().saturating_sub(STAMP_BYTES)
    }

    /// Whether a user may have more than one session (so messages fan out to sessions on
    /// several nodes and route lookups cannot be cached).
    pub fn multi_session(&self) -> bool {
        self.max_sessions_per_user > 1
    }

    /// The `--room-access` in force: as given, else `open` with `--insecure` and `token`
    /// with authentication.
    pub fn room_access(&self) -> RoomAccess {
        match (self.room_access, self.insecure) {
            (Some(access), _) => access,
            (None, true) => RoomAccess::Open,
            (None, false) => RoomAccess::Token,
        }
    }

    /// A config for a node with this id and Redis URL, without authentication (for tests
    /// and embedding), other fields at their defaults.
    pub fn new(node_id: impl Into<String>, redis_url: impl Into<String>) -> Self {
        Self {
            node_id: Some(node_id.into()),
            redis_url: redis_url.into(),
            insecure: true,
            ..Self::default()
        }
    }
}
