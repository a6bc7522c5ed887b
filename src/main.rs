//! The `wsbus` binary: command line, logging, signals. Everything else is in the library.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use wsbus::NodeConfig;
use wsbus::dev::DevOptions;
use wsbus::redis::keys::Keys;

/// jemalloc instead of glibc's malloc: allocation was ~15% of a node's CPU under load. Its
/// background thread (the `background_threads` feature) returns freed pages to the system
/// after its 10 s decay; without it, a node that went idle after a connection flood kept
/// them (measured: 23 MiB a minute after a slowloris siege, against 12 MiB with it and 10 MiB
/// before the siege).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "wsbus",
    version,
    about = "WebSocket messaging over Redis Streams"
)]
struct Cli {
    /// Log format (`RUST_LOG` sets the level; default info).
    #[arg(long, global = true, env = "WSBUS_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "WSBUS_BIND", default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
        #[command(flatten)]
        config: Box<NodeConfig>,
    },
    /// Run a local cluster (and its own redis-server unless --redis-url is given); every
    /// `serve` flag is passed to its nodes (e.g. `--history 100 --events all`).
    Dev {
        #[command(flatten)]
        options: DevOptions,
        #[command(flatten)]
        config: Box<NodeConfig>,
    },
    /// List the registered nodes with their age, users and inbox length.
    Nodes(AdminArgs),
    /// Show which node a user is connected to.
    Whereis {
        /// The user id.
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List rooms with members: member count and nodes, largest first.
    Rooms {
        /// Most rooms to list.
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the members of a room and the nodes each is connected to.
    Members {
        /// The room id.
        room: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a signed token for USER (HS256 with the secret, or RS256/ES256 with a private key).
    Token(TokenArgs),
    /// Exit 0 if `URL` answers HTTP 200 (for container health checks; no curl needed).
    Probe {
        /// The URL to GET (http only).
        #[arg(default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Publish a frame to users and rooms through a node's HTTP API (`POST /api/publish`),
    /// printing its reply (`sent`, `offline`, `rooms`); exits 1 unless it answers 200.
    Publish(PublishArgs),
    /// Put every live session of USER in ROOM, on every node (`POST /api/join`), printing
    /// the reply (`{"user","room","sessions"}`); exits 1 unless it answers 200.
    Join(MemberArgs),
    /// Take every live session of USER out of ROOM (`POST /api/leave`).
    Leave(MemberArgs),
    /// Follow the events stream (`--events`) like `tail -f`, pretty-printed (or as JSON
    /// lines), optionally as a member of a consumer group (acknowledging what it prints).
    Events(EventsArgs),
    /// Print a node's inbox entries, envelopes decoded to JSON (one per line).
    Inspect {
        /// The node id.
        node: String,
        /// Most entries to print (a packed entry prints a line per envelope).
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `wsbus token`: mint a token for a user.
#[derive(clap::Args)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    user: String,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// Shared secret (HS256).
    #[arg(long, env = "WSBUS_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM private key file (RSA → RS256, EC P-256 → ES256).
    #[arg(long, conflicts_with = "jwt_secret")]
    private_key: Option<std::path::PathBuf>,
    /// The `rooms` claim: rooms the client may join itself, ids and `prefix*` patterns
    /// (comma-separated), e.g. `lobby,team-42-*`.
    #[arg(long, value_delimiter = ',')]
    rooms: Option<Vec<String>>,
    /// The `join` claim: rooms the session joins at connect (comma-separated).
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
}

/// `wsbus join|leave`: whose sessions, which room, and where the API is.
#[derive(clap::Args)]
struct MemberArgs {
    /// The user id.
    user: String,
    /// The room id.
    room: String,
    /// The node's base URL (its client address, or `--admin-bind` if the API is there).
    #[arg(long, env = "WSBUS_API_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API key of the node (the first of a comma-separated list is used).
    #[arg(long, env = "WSBUS_API_KEYS", hide_env_values = true)]
    api_key: String,
}

/// `wsbus publish`: what to publish, and where the API is.
#[derive(clap::Args)]
struct PublishArgs {
    /// Users to send to (repeat, or comma-separate).
    #[arg(long, value_delimiter = ',')]
    to: Vec<String>,
    /// Rooms to send to (repeat, or comma-separate).
    #[arg(long, value_delimiter = ',')]
    room: Vec<String>,
    /// The frame's action (not `error`).
    #[arg(long)]
    action: String,
    /// The frame's data, a JSON object.
    #[arg(long, default_value = "{}")]
    data: String,
    /// Publish as this user id instead of `@server`.
    #[arg(long)]
    from: Option<String>,
    /// The node's base URL (its client address, or `--admin-bind` if the API is there).
    #[arg(long, env = "WSBUS_API_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API key of the node (the first of a comma-separated list is used).
    #[arg(long, env = "WSBUS_API_KEYS", hide_env_values = true)]
    api_key: String,
}

/// `wsbus events`: which streams, from where, as whom.
#[derive(clap::Args)]
struct EventsArgs {
    /// The nodes' `--events-shards`: 1 reads `<prefix>:events`, N reads
    /// `<prefix>:events:0` .. `<prefix>:events:<N-1>`.
    #[arg(long, env = "WSBUS_EVENTS_SHARDS", default_value_t = 1)]
    shards: u32,
    /// Start at the beginning of the streams (default: only what comes from now on).
    #[arg(long)]
    from_start: bool,
    /// Read as a member of this consumer group (created if missing), acknowledging each
    /// entry once printed.
    #[arg(long)]
    group: Option<String>,
    /// The consumer's name within `--group`.
    #[arg(long, default_value = "wsbus-cli", requires = "group")]
    consumer: String,
    /// Print one JSON object per line (`stream`, `id` and the fields) instead.
    #[arg(long)]
    json: bool,
    /// Exit after this many events (default: follow until interrupted).
    #[arg(long)]
    count: Option<usize>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Redis URL.
    #[arg(
        long,
        env = "WSBUS_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Key prefix.
    #[arg(long, env = "WSBUS_PREFIX", default_value = "wsbus")]
    prefix: String,
    /// `--redis-url` lists Redis Cluster seed nodes (comma-separated).
    #[arg(long, env = "WSBUS_REDIS_CLUSTER")]
    redis_cluster: bool,
}

impl AdminArgs {
    fn redis(&self) -> anyhow::Result<wsbus::redis::Redis> {
        Ok(wsbus::cli::open(&self.redis_url, self.redis_cluster)?)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    init_logging(cli.log_format);
    match cli.command {
        Cmd::Serve { bind, config } => serve(bind, *config).await,
        Cmd::Dev { options, config } => {
            // Its own redis-server unless a Redis was named (flag or environment).
            let given = matches.subcommand_matches("dev").and_then(|m| {
                let source = m.value_source("redis_url")?;
                (source != clap::parser::ValueSource::DefaultValue).then_some(())
            });
            let redis_url = given.map(|()| config.redis_url.clone());
            if config.jwt_secret.is_none() && config.jwt_public_key.is_none() {
                tracing::warn!("dev mode: no authentication, local use only");
            }
            wsbus::dev::run(options, *config, redis_url, shutdown_signal())
                .await
                .map_err(|e| anyhow::anyhow!(e))
        }
        Cmd::Nodes(admin) => print_nodes(&admin).await,
        Cmd::Whereis { user, admin } => print_where_is(&user, &admin).await,
        Cmd::Rooms { count, admin } => print_rooms(count, &admin).await,
        Cmd::Members { room, admin } => print_members(&room, &admin).await,
        Cmd::Token(args) => print_token(&args),
        Cmd::Probe { url } => probe(&url).await,
        Cmd::Publish(args) => publish(&args).await,
        Cmd::Join(args) => change_membership(&args, "join").await,
        Cmd::Leave(args) => change_membership(&args, "leave").await,
        Cmd::Inspect { node, count, admin } => print_inbox(&node, count, &admin).await,
        Cmd::Events(args) => follow_events(&args).await,
    }
}

/// `wsbus events`: prints events as they are appended, until interrupted (or `--count`).
async fn follow_events(args: &EventsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use std::time::Duration;
    let keys = Keys::new(&args.admin.prefix);
    let redis = args.admin.redis()?;
    let mut conn = redis.conn().await?;
    let streams = keys.all_events(args.shards.max(1));
    let group = args.group.clone().map(|g| (g, args.consumer.clone()));
    let mut follower =
        wsbus::backend::events::Follower::new(&mut conn, streams, args.from_start, group).await?;
    let mut printed = 0;
    let mut stop = std::pin::pin!(shutdown_signal());
    let mut out = std::io::stdout().lock();
    while args.count.is_none_or(|n| printed < n) {
        let left = args.count.map_or(usize::MAX, |n| n - printed);
        let batch = tokio::select! {
            _ = &mut stop => return Ok(()),
            batch = follower.next(&mut conn, Duration::from_secs(1), left) => batch?,
        };
        for entry in batch {
            match args.json {
                true => writeln!(out, "{}", entry.json())?,
                false => writeln!(out, "{}", entry.pretty())?,
            }
            printed += 1;
        }
        out.flush()?;
    }
    Ok(())
}

/// `wsbus serve`: one node until SIGTERM or Ctrl-C.
async fn serve(bind: SocketAddr, config: wsbus::NodeConfig) -> anyhow::Result<()> {
    let listener =
        wsbus::edge::listener::bind(bind).with_context(|| format!("cannot listen on {bind}"))?;
    wsbus::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// `wsbus nodes`: the registry, one line per node.
async fn print_nodes(admin: &AdminArgs) -> anyhow::Result<()> {
    let nodes = wsbus::cli::nodes(&admin.redis()?, &Keys::new(&admin.prefix)).await?;
    println!(
        "{:<24} {:<22} {:>8} {:>10} {:>8} {:>8}",
        "NODE", "ADDR", "AGE(s)", "HEARTBEAT", "USERS", "INBOX"
    );
    for n in nodes {
        println!(
            "{:<24} {:<22} {:>8} {:>8}ms {:>8} {:>8}",
            n.id,
            n.addr.unwrap_or_else(|| "-".into()),
            n.age_secs.map_or("-".into(), |a| a.to_string()),
            n.last_heartbeat_ms,
            n.users,
            n.inbox_len
        );
    }
    Ok(())
}

/// `wsbus whereis`: a user's sessions; exits 1 when it has none.
async fn print_where_is(user: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&admin.prefix);
    let sessions = wsbus::cli::where_is(&admin.redis()?, &keys, user).await?;
    if sessions.is_empty() {
        println!("{user} is not connected");
        std::process::exit(1);
    }
    println!(
        "{:<24} {:>10} {:>15}  status",
        "node", "session", "since (ms)"
    );
    for s in &sessions {
        let status = if s.alive { "live" } else { "node dead" };
        println!("{:<24} {:>10} {:>15}  {status}", s.node, s.sid, s.since);
    }
    Ok(())
}

/// `wsbus rooms`: the largest rooms.
async fn print_rooms(count: usize, admin: &AdminArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&admin.prefix);
    let rooms = wsbus::cli::rooms(&admin.redis()?, &keys, count).await?;
    println!("{:<32} {:>8}  nodes", "room", "members");
    for r in rooms {
        println!("{:<32} {:>8}  {}", r.room, r.members, r.nodes.join(","));
    }
    Ok(())
}

/// `wsbus members`: a room's members; exits 1 when it has none.
async fn print_members(room: &str, admin: &AdminArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&admin.prefix);
    let members = wsbus::cli::members(&admin.redis()?, &keys, room).await?;
    if members.is_empty() {
        println!("room {room} has no members");
        std::process::exit(1);
    }
    for (user, nodes) in members {
        println!("{user} {}", nodes.join(","));
    }
    Ok(())
}

/// `wsbus token`: prints a signed token.
fn print_token(args: &TokenArgs) -> anyhow::Result<()> {
    let pem = match &args.private_key {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    if args.jwt_secret.is_none() && pem.is_none() {
        anyhow::bail!("give WSBUS_JWT_SECRET (or --jwt-secret) or --private-key");
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = wsbus::auth::Claims {
        sub: args.user.clone(),
        exp: now + args.ttl.as_secs(),
        iat: now,
        rooms: args.rooms.clone(),
        join: args.join.clone(),
        ..Default::default()
    };
    let token = wsbus::auth::mint_claims(
        &claims,
        args.jwt_secret.as_deref().map(str::as_bytes),
        pem.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    println!("{token}");
    Ok(())
}

/// `wsbus probe`: exit 0 on HTTP 200.
async fn probe(url: &str) -> anyhow::Result<()> {
    let status = wsbus::cli::probe(url).await?;
    if status != 200 {
        anyhow::bail!("{url} answered HTTP {status}");
    }
    Ok(())
}

/// `wsbus publish`: one `POST /api/publish`, its reply printed.
async fn publish(args: &PublishArgs) -> anyhow::Result<()> {
    let data: serde_json::Value =
        serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let mut body = serde_json::json!({"action": args.action, "data": data});
    if !args.to.is_empty() {
        body["to"] = serde_json::json!(args.to);
    }
    if !args.room.is_empty() {
        body["rooms"] = serde_json::json!(args.room);
    }
    if let Some(from) = &args.from {
        body["from"] = serde_json::json!(from);
    }
    let key = args.api_key.split(',').next().unwrap_or_default();
    let endpoint = format!("{}/api/publish", args.url.trim_end_matches('/'));
    let (status, reply) = wsbus::cli::post_json(&endpoint, key, &body.to_string()).await?;
    println!("{}", reply.trim_end());
    if status != 200 {
        anyhow::bail!("{endpoint} answered HTTP {status}");
    }
    Ok(())
}

/// `wsbus join|leave`: one `POST /api/<op>`, its reply printed.
async fn change_membership(args: &MemberArgs, op: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"user": args.user, "room": args.room});
    let key = args.api_key.split(',').next().unwrap_or_default();
    let endpoint = format!("{}/api/{op}", args.url.trim_end_matches('/'));
    let (status, reply) = wsbus::cli::post_json(&endpoint, key, &body.to_string()).await?;
    println!("{}", reply.trim_end());
    if status != 200 {
        anyhow::bail!("{endpoint} answered HTTP {status}");
    }
    Ok(())
}

/// `wsbus inspect`: a node's inbox entries, decoded, one JSON line per envelope.
async fn print_inbox(node: &str, count: usize, admin: &AdminArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&admin.prefix);
    let Some(entries) = wsbus::cli::inspect(&admin.redis()?, &keys, node, count).await? else {
        eprintln!(
            "no node {node:?} under prefix {:?}: not registered, no inbox (`wsbus nodes` lists them)",
            admin.prefix
        );
        std::process::exit(1);
    };
    if entries.is_empty() {
        eprintln!("the inbox of {node} is empty (a node trims what it delivered)");
    }
    for entry in entries {
        println!("{entry}");
    }
    Ok(())
}

/// Logs go to stderr, so stdout carries only what a command prints (tokens, `inspect`'s JSON
/// lines, `dev`'s instructions); colour only on a terminal, so a redirected log stays plain.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
