//! The Redis connection layer: a pool for ordinary commands, dedicated connections for
//! blocking reads, and the Redis functions from `migrations/` (loaded at start and reloaded
//! whenever Redis reports them missing).

use std::time::Duration;

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, Pipeline, RedisError};

/// The Redis function library, versioned by file name and library name.
pub const FUNCTIONS: &str = include_str!("../migrations/wsbus_v1.lua");

/// Function names of [`FUNCTIONS`].
pub mod func {
    /// Claim a user for a session.
    pub const CLAIM: &str = "wsbus_v1_claim";
    /// Compare-and-set a user away from a dead holder.
    pub const TAKE_OVER: &str = "wsbus_v1_take_over";
    /// Release a user held by a session.
    pub const RELEASE: &str = "wsbus_v1_release";
    /// Release a user held by any session of a node.
    pub const RELEASE_NODE: &str = "wsbus_v1_release_node";
    /// Record a heartbeat and list the nodes.
    pub const HEARTBEAT: &str = "wsbus_v1_heartbeat";
}

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The URL or another setting is unusable.
    #[error("invalid Redis configuration: {0}")]
    Config(String),
    /// No connection could be had from the pool.
    #[error("no Redis connection: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
    /// Redis answered something this version does not understand.
    #[error("unexpected Redis reply: {0}")]
    Reply(&'static str),
    /// A reply did not have the expected type.
    #[error("unexpected Redis reply: {0}")]
    Parse(#[from] redis::ParsingError),
}

/// A pooled connection.
pub type PooledConn = deadpool_redis::Connection;

/// Access to one Redis deployment.
pub struct Bus {
    pool: Pool,
    client: redis::Client,
    timeout: Duration,
}

impl Bus {
    /// Prepares connections to `url` (`redis://` or `rediss://`, verified against `ca_file`
    /// if given, else the system roots); connects lazily.
    pub fn new(
        url: &str,
        ca_file: Option<&std::path::Path>,
        timeout: Duration,
        pool_size: usize,
    ) -> Result<Self, BusError> {
        // rustls needs one process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config_error = |e: RedisError| BusError::Config(e.to_string());
        let client = match ca_file {
            None => redis::Client::open(url).map_err(config_error)?,
            Some(path) => {
                let root_cert = std::fs::read(path)
                    .map_err(|e| BusError::Config(format!("{}: {e}", path.display())))?;
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
            .map_err(|e| BusError::Config(e.to_string()))?;
        Ok(Self {
            pool,
            client,
            timeout,
        })
    }

    /// A connection from the pool (checked with a PING on reuse).
    pub async fn conn(&self) -> Result<PooledConn, BusError> {
        Ok(self.pool.get().await?)
    }

    /// A fresh connection for one task's exclusive use, without a response timeout, for
    /// blocking commands. The caller must put its own deadline on every call.
    pub async fn dedicated_conn(&self) -> Result<MultiplexedConnection, BusError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Loads (or replaces) the function library.
    pub async fn load_functions(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), BusError> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(FUNCTIONS)
            .query_async::<()>(conn)
            .await?;
        Ok(())
    }

    /// Runs `pipe`; if Redis lost the functions, loads them and runs it once more.
    pub async fn query<T: FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        pipe: &Pipeline,
    ) -> Result<T, BusError> {
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
pub fn is_missing_function(e: &RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// Whether a pooled connection should be thrown away rather than reused after `e`.
pub fn is_connection_error(e: &BusError) -> bool {
    match e {
        BusError::Redis(e) => {
            e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_unrecoverable_error()
        }
        BusError::Pool(_) => true,
        _ => false,
    }
}
