//! The reconnecting stream consumer: the one loop every reader of a Redis stream runs (the
//! inbox reader, ingress). It opens a dedicated connection, lets the reader set itself up on
//! it, then reads with a deadline (block time + [`READ_MARGIN`], so a half-open connection
//! is dropped rather than waited on forever) and hands each reply to the reader, until an
//! error. Then it reports the loss, waits ([`BACKOFF_MIN`], doubling up to [`BACKOFF_MAX`];
//! a successful connect resets it) and connects again. It stops as soon as the shutdown
//! token is cancelled, whatever it is waiting on.
//!
//! What is read, and how entries are handled and acknowledged, is the reader's: it
//! implements [`StreamReader`].

use std::future::Future;
use std::time::Duration;

use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::redis::{Redis, RedisConn, RedisError};

/// Extra time allowed past the block time before a read counts as hung.
pub const READ_MARGIN: Duration = Duration::from_secs(1);
/// The first wait before reconnecting.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait before reconnecting.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// One stream's side of the [`consume`] loop. Its steps run in this order on each
/// connection: [`on_connect`](Self::on_connect) once, then rounds of
/// [`before_read`](Self::before_read), [`read`](Self::read) (under the deadline) and
/// [`process`](Self::process). An error from any step drops the connection.
pub trait StreamReader: Send {
    /// The stream's name in log lines (`inbox`, `ingress`).
    const NAME: &'static str;

    /// Readies the reader for a fresh connection, which may reach a different server than
    /// the last one (a restart or a failover). An error counts as a failed connect.
    fn on_connect(
        &mut self,
        conn: &mut RedisConn,
    ) -> impl Future<Output = Result<(), RedisError>> + Send;

    /// Work before each read (ingress: create its group, claim idle entries). `Ok(false)`:
    /// skip this read and start the round again. Default: nothing.
    fn before_read(
        &mut self,
        conn: &mut RedisConn,
    ) -> impl Future<Output = Result<bool, RedisError>> + Send {
        let _ = conn;
        async { Ok(true) }
    }

    /// Sends one blocking read (`... BLOCK <block time>`) and returns its reply; the loop
    /// puts the deadline on it. `Value::Nil` reads as nothing arrived.
    fn read(
        &mut self,
        conn: &mut RedisConn,
    ) -> impl Future<Output = Result<Value, RedisError>> + Send;

    /// Takes the entries of one reply.
    fn process(
        &mut self,
        conn: &mut RedisConn,
        reply: Value,
    ) -> impl Future<Output = Result<(), RedisError>> + Send;

    /// Health: the reader is connected and a read returned (called after each connect and
    /// each read). Default: nothing.
    fn report_alive(&mut self) {}

    /// Health: the connection was lost or could not be made (called before each backoff).
    /// Default: nothing.
    fn report_lost(&mut self) {}
}

/// Runs `reader` on dedicated connections from `redis` until `shutdown` is cancelled;
/// `block` is the block time of its reads.
pub async fn consume<R: StreamReader>(
    redis: &Redis,
    reader: &mut R,
    block: Duration,
    shutdown: CancellationToken,
) {
    let deadline = block + READ_MARGIN;
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect(redis, reader) => c,
        };
        match connected {
            Ok(mut conn) => {
                backoff = BACKOFF_MIN;
                reader.report_alive();
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = read_until_error(reader, &mut conn, deadline) => e,
                };
                tracing::warn!(error = %outcome, "{} connection lost; reconnecting", R::NAME);
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect the {} reader", R::NAME),
        }
        reader.report_lost();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A dedicated connection the reader is set up on.
async fn connect<R: StreamReader>(redis: &Redis, reader: &mut R) -> Result<RedisConn, RedisError> {
    let mut conn = redis.dedicated_conn().await?;
    reader.on_connect(&mut conn).await?;
    Ok(conn)
}

/// Reads and processes until a step fails; returns why.
async fn read_until_error<R: StreamReader>(
    reader: &mut R,
    conn: &mut RedisConn,
    deadline: Duration,
) -> RedisError {
    loop {
        match reader.before_read(conn).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return e,
        }
        let reply = match tokio::time::timeout(deadline, reader.read(conn)).await {
            Err(_) => {
                return RedisError::Reply("a read passed its deadline (half-open connection?)");
            }
            Ok(Err(e)) => return e,
            Ok(Ok(reply)) => reply,
        };
        reader.report_alive();
        if let Err(e) = reader.process(conn, reply).await {
            return e;
        }
    }
}
