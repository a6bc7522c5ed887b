//! The Redis connection layer: a pool for ordinary commands (or one multiplexed Redis
//! Cluster connection), dedicated connections for blocking reads, and the Redis functions
//! from `migrations/` (loaded at start, on every primary of a cluster, and reloaded whenever
//! Redis reports them missing).

use std::time::Duration;

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{AsyncConnectionConfig, FromRedisValue, Pipeline, Value};

/// The Redis function libraries, versioned by file name and library name. Every version still
/// in use is loaded, so nodes of two versions can run side by side during an upgrade; this
/// version calls only the newest.
pub const FUNCTIONS: [&str; 5] = [
    include_str!("../../migrations/wsbus_v1.lua"),
    include_str!("../../migrations/wsbus_v2.lua"),
    include_str!("../../migrations/wsbus_v3.lua"),
    include_str!("../../migrations/wsbus_v4.lua"),
    include_str!("../../migrations/wsbus_v5.lua"),
];

/// Function names (libraries `wsbus_v2` and `wsbus_v4`).
pub mod func {
    /// Claim a session of a user, within the per-user limit, or by presenting the resume
    /// secret of one of its sessions; stores the new session's secret.
    pub const CLAIM: &str = "wsbus_v4_claim";
    /// Release one session of a user and forget its resume secret.
    pub const RELEASE: &str = "wsbus_v4_release";
    /// Release every session a node holds of a user.
    pub const RELEASE_NODE: &str = "wsbus_v2_release_node";
    /// Record a heartbeat and list the nodes.
    pub const HEARTBEAT: &str = "wsbus_v2_heartbeat";
    /// Add a node of a user to a room (its first session there in the room).
    pub const ROOM_JOIN: &str = "wsbus_v2_room_join";
    /// Remove a node of a user from a room (its last session there left the room).
    pub const ROOM_LEAVE: &str = "wsbus_v2_room_leave";
    /// Remove a node from a room altogether (the node died or shut down).
    pub const ROOM_DROP_NODE: &str = "wsbus_v2_room_drop_node";
}

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL or another setting is unusable.
    #[error("invalid Redis configuration: {0}")]
    Config(String),
    /// No connection could be had from the pool.
    #[error("no Redis connection: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something this version does not understand.
    #[error("unexpected Redis reply: {0}")]
    Reply(&'static str),
    /// A reply did not have the expected type.
    #[error("unexpected Redis reply: {0}")]
    Parse(#[from] redis::ParsingError),
}

/// A connection to the bus: pooled (single Redis), dedicated (single Redis, no response
/// timeout, for blocking reads), or a Redis Cluster connection (which routes every command
/// to the shard owning its key and follows `MOVED`/`ASK`).
pub enum RedisConn {
    /// From the pool (checked with a PING on reuse).
    Pooled(deadpool_redis::Connection),
    /// A multiplexed connection to a single Redis: a task's own, or the shared one.
    Dedicated(MultiplexedConnection),
    /// A cluster connection.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            RedisConn::Pooled(c) => c.req_packed_command(cmd),
            RedisConn::Dedicated(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Pooled(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            // redis-rs sends a cluster pipeline to one slot only; ours span slots (users,
            // inboxes and node keys live all over the cluster). Split it by slot, keeping each
            // slot's commands in order in one sub-pipeline (so XADDs to one inbox stay in
            // order), send the sub-pipelines at once, and put the replies back in order.
            // Only non-transactional pipelines are used.
            RedisConn::Cluster(c) => {
                let mut groups: Vec<(Option<Slot>, Pipeline, Vec<usize>)> = Vec::new();
                for (i, cmd) in pipeline.cmd_iter().enumerate() {
                    let slot = routing_key(cmd).map(Slot::for_key);
                    // Keyless commands (TIME) go alone to any node.
                    let group =
                        slot.and_then(|s| groups.iter_mut().find(|(g, _, _)| *g == Some(s)));
                    match group {
                        Some((_, sub, idx)) => {
                            sub.add_command(cmd.clone());
                            idx.push(i);
                        }
                        None => {
                            let mut sub = redis::pipe();
                            sub.add_command(cmd.clone());
                            groups.push((slot, sub, vec![i]));
                        }
                    }
                }
                let total = pipeline.len();
                let conn = c.clone();
                Box::pin(async move {
                    let sends = groups.iter().map(|(_, sub, _)| {
                        let mut conn = conn.clone();
                        async move { conn.req_packed_commands(sub, 0, sub.len()).await }
                    });
                    let replies = futures_util::future::join_all(sends).await;
                    let mut out = vec![Value::Nil; total];
                    for ((_, _, idx), reply) in groups.iter().zip(replies) {
                        for (i, value) in idx.iter().zip(reply?) {
                            out[*i] = value;
                        }
                    }
                    Ok(out.into_iter().skip(offset).take(count).collect())
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Pooled(c) => c.get_db(),
            RedisConn::Dedicated(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The key a command is routed by on a cluster (for the commands wsbus sends).
fn routing_key(cmd: &redis::Cmd) -> Option<&[u8]> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"TIME" | b"PING" | b"INFO" | b"FUNCTION" => None,
        b"FCALL" | b"FCALL_RO" | b"EVAL" | b"EVALSHA" => (*args.get(2)? != b"0")
            .then(|| args.get(3).copied())
            .flatten(),
        b"XREAD" | b"XREADGROUP" => {
            let at = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STREAMS"))?;
            args.get(at + 1).copied()
        }
        _ => args.get(1).copied(),
    }
}

enum Backend {
    Single {
        pool: Pool,
        client: redis::Client,
        /// One multiplexed connection shared by cloning (see [`Redis::shared_conn`]); boxed,
        /// as the cluster variant's fields are.
        shared: Box<std::sync::Mutex<Option<MultiplexedConnection>>>,
    },
    Cluster {
        client: Box<ClusterClient>,
        /// Same seeds, without a (practical) response timeout: for the blocking reader.
        /// (A per-connection `ClusterConfig` does not lift the client's overall timeout.)
        blocking_client: Box<ClusterClient>,
        /// One multiplexed cluster connection, shared by cloning; made on first use.
        shared: tokio::sync::OnceCell<ClusterConnection>,
    },
}

/// Access to one Redis deployment: a single server, or a Redis Cluster.
pub struct Redis {
    backend: Backend,
    timeout: Duration,
}

impl Redis {
    /// Prepares connections to `url` (`redis://` or `rediss://`, verified against `ca_file`
    /// if given, else the system roots); with `cluster`, `url` is a comma-separated list of
    /// seed nodes. Connects lazily.
    pub fn new(
        url: &str,
        cluster: bool,
        ca_file: Option<&std::path::Path>,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, RedisError> {
        // rustls needs one process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config_error = |e: redis::RedisError| RedisError::Config(e.to_string());
        if cluster {
            if ca_file.is_some() {
                return Err(RedisError::Config(
                    "--redis-ca-file is not supported with --redis-cluster".into(),
                ));
            }
            let seeds: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let build = |response_timeout| {
                ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(timeout)
                    .response_timeout(response_timeout)
                    .build()
                    .map(Box::new)
                    .map_err(config_error)
            };
            return Ok(Self {
                backend: Backend::Cluster {
                    client: build(timeout)?,
                    blocking_client: build(Duration::from_secs(24 * 3600))?,
                    shared: tokio::sync::OnceCell::new(),
                },
                timeout,
            });
        }
        let client = match ca_file {
            None => redis::Client::open(url).map_err(config_error)?,
            Some(path) => {
                let root_cert = std::fs::read(path)
                    .map_err(|e| RedisError::Config(format!("{}: {e}", path.display())))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(url, certs).map_err(config_error)?
            }
        };
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager = deadpool_redis::Manager::new_with_config(
            client.get_connection_info().clone(),
            conn_config,
        )
        .map_err(config_error)?;
        let pool = Pool::builder(manager)
            .config(PoolConfig {
                max_size: pool_size,
                timeouts: Timeouts {
                    wait: Some(timeout),
                    create: Some(timeout),
                    recycle: Some(timeout),
                },
                ..PoolConfig::default()
            })
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| RedisError::Config(e.to_string()))?;
        Ok(Self {
            backend: Backend::Single {
                pool,
                client,
                shared: Box::new(std::sync::Mutex::new(None)),
            },
            timeout,
        })
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// A connection for ordinary commands.
    pub async fn conn(&self) -> Result<RedisConn, RedisError> {
        match &self.backend {
            Backend::Single { pool, .. } => Ok(RedisConn::Pooled(pool.get().await?)),
            Backend::Cluster { client, shared, .. } => {
                let conn = shared
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                Ok(RedisConn::Cluster(conn.clone()))
            }
        }
    }

    /// A multiplexed connection shared by cloning, for request paths (the HTTP API) where a
    /// pool checkout's PING would double the round trips of a request. Made on first use,
    /// and again after [`Redis::reset_shared`] (call it when a command on it failed with a
    /// connection error).
    pub async fn shared_conn(&self) -> Result<RedisConn, RedisError> {
        let Backend::Single { client, shared, .. } = &self.backend else {
            return self.conn().await;
        };
        let cached = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(conn) = cached {
            return Ok(RedisConn::Dedicated(conn));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(RedisConn::Dedicated(conn))
    }

    /// Forgets the shared connection, so the next [`Redis::shared_conn`] makes a new one.
    pub fn reset_shared(&self) {
        if let Backend::Single { shared, .. } = &self.backend {
            shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// A fresh connection for one task's exclusive use, with the ordinary timeouts: the
    /// heartbeat's, so that its commands never wait for a pooled connection or queue behind
    /// another task's pipeline on a shared one.
    pub async fn own_conn(&self) -> Result<RedisConn, RedisError> {
        match &self.backend {
            Backend::Single { client, .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                Ok(RedisConn::Dedicated(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Backend::Cluster { client, .. } => {
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A fresh connection for one task's exclusive use, without a (practical) response
    /// timeout, for blocking commands. The caller must put its own deadline on every call.
    pub async fn dedicated_conn(&self) -> Result<RedisConn, RedisError> {
        match &self.backend {
            Backend::Single { client, .. } => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(None);
                Ok(RedisConn::Dedicated(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Backend::Cluster {
                blocking_client, ..
            } => Ok(RedisConn::Cluster(
                blocking_client.get_async_connection().await?,
            )),
        }
    }

    /// Loads (or replaces) the function libraries.
    pub async fn load_functions(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), RedisError> {
        for library in FUNCTIONS {
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(library)
                .query_async::<()>(conn)
                .await?;
        }
        Ok(())
    }

    /// Runs `pipe`; if Redis lost the functions, loads them and runs it once more.
    pub async fn query<T: FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        pipe: &Pipeline,
    ) -> Result<T, RedisError> {
        match pipe.query_async(conn).await {
            Err(e) if is_missing_function(&e) => {
                tracing::info!("Redis lost the wsbus functions; loading them again");
                self.load_functions(conn).await?;
                Ok(pipe.query_async(conn).await?)
            }
            other => Ok(other?),
        }
    }
}

/// Whether `e` says a function of ours is not loaded.
pub fn is_missing_function(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Whether a pooled connection should be thrown away rather than reused after `e`.
pub fn is_connection_error(e: &RedisError) -> bool {
    match e {
        RedisError::Redis(e) => {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
        }
        RedisError::Pool(_) => true,
        _ => false,
    }
}
