//! The HTTP listener: the accept loop, and each connection until it upgrades to a WebSocket
//! or closes. It owns the limits on connections that are not sessions yet: how long a request
//! head may take, how large it may be, how long a connection may stall, and how many may be
//! open at once without having upgraded.
//!
//! `axum::serve` gives hyper no timer, so hyper's header-read timeout never fires, and it
//! bounds neither the request head (hyper's default buffer is ~400 KB) nor the connections
//! that never finish one: dribbling clients (slowloris) held their sockets forever. Here:
//! - the first request head is read here, before hyper sees the connection, within the
//!   header timeout and the head limit (431 past it). A connection still sending its head
//!   costs its task and the bytes it sent, not hyper's buffers;
//! - later heads on a kept-alive connection get the same limits from hyper: its header-read
//!   timeout runs on a Tokio timer whenever it waits for a head (so it also closes a
//!   connection idle between requests), and its read buffer is capped at the head limit
//!   (hyper answers 431 when it fills before the head ends);
//! - a connection that moves no byte for the idle timeout (a client that does not read its
//!   response) is closed;
//! - at most `max_pending` connections per listener are open without having upgraded. Past
//!   that, each new connection closes the *oldest* one. A stalled attacker's connection is
//!   old; a real client's handshake takes milliseconds. So a full table never locks real
//!   clients out, and the accept loop never waits for anything but `accept`.
//!
//! A connection whose request is in a handler is never dropped mid-handler (the WebSocket
//! handler may be claiming the user in Redis): it is asked to close after its response, and
//! dropped once the handler has returned. Upgraded connections are sessions, bounded by
//! `--max-connections` in the edge and closed by the node's shutdown.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::NodeConfig;

/// The limits of one listener (from `--http-header-timeout`, `--http-idle-timeout`,
/// `--max-head-bytes`, `--max-pending-connections`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Most time to receive a request head, and to wait for the next one on a kept-alive
    /// connection.
    pub header_timeout: Duration,
    /// A connection that has not upgraded and moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head in bytes (at least [`MIN_HEAD_BYTES`](crate::config::MIN_HEAD_BYTES)); past it, HTTP 431.
    pub max_head_bytes: usize,
    /// Most connections open without having upgraded; a new one past it closes the oldest.
    pub max_pending: usize,
}

impl HttpLimits {
    /// The limits a node's configuration gives.
    pub fn from_config(config: &NodeConfig) -> Self {
        Self {
            header_timeout: config.http_header_timeout,
            idle_timeout: config.http_idle_timeout,
            max_head_bytes: config.max_head_bytes,
            max_pending: config.max_pending_connections,
        }
    }
}

/// Connections the kernel queues for `accept` (it caps this at `net.core.somaxconn`).
/// Tokio's `TcpListener::bind` asks for 1,024: a node starved of CPU for a moment during a
/// connection flood then drops SYNs, and a real client waits a second for its retry.
pub const ACCEPT_BACKLOG: u32 = 4096;

/// A listener on `addr` with an [`ACCEPT_BACKLOG`]-deep accept queue.
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then closes the connections
/// that have not upgraded (after their handler, if one runs) and returns once they are gone.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes.max(crate::config::MIN_HEAD_BYTES));
    let pending = Arc::new(Pending::new(limits.max_pending));
    let limits = Arc::new(limits);
    let connections = TaskTracker::new();
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e, &shutdown).await;
                    continue;
                }
            },
        };
        // Nagle's algorithm with delayed ACKs would hold small frames for up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let slot = pending.admit(&shutdown);
        connections.spawn(serve_connection(
            http.clone(),
            tcp,
            router.clone(),
            slot,
            limits.clone(),
        ));
    }
    connections.close();
    connections.wait().await;
}

/// Errors from `accept`: a peer that gave up before we accepted is nothing; anything else
/// (out of file descriptors, above all) gets a pause, so the loop does not spin.
async fn accept_failed(e: io::Error, shutdown: &CancellationToken) {
    use io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
        return;
    }
    metrics::counter!("wsbus_http_accept_errors_total").increment(1);
    tracing::warn!(error = %e, "accept failed; pausing 50 ms");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
}

/// One connection, from accept until it upgrades (hyper then hands the socket to the
/// WebSocket task and this future ends) or closes.
async fn serve_connection(
    http: http1::Builder,
    mut tcp: TcpStream,
    router: Router,
    slot: Slot,
    limits: Arc<HttpLimits>,
) {
    let Some(head) = first_head(&mut tcp, &slot, &limits).await else {
        return;
    };
    let state = Arc::new(ConnState::default());
    let peer = tcp.peer_addr().ok();
    let io = TokioIo::new(Watched {
        inner: tcp,
        head,
        head_read: 0,
        state: state.clone(),
    });
    let service = Handler {
        router,
        state: state.clone(),
        peer,
    };
    // Boxed: hyper's connection is large, and a task's future is allocated at its largest.
    let conn = Box::pin(http.serve_connection(io, service).with_upgrades());
    if let Some(reason) = drive(conn, &slot, &state, limits.idle_timeout).await {
        metrics::counter!("wsbus_http_connections_dropped_total", "reason" => reason).increment(1);
    }
}

/// Reads the first request head within the limits; `None` (counted) when the connection
/// ended before it was complete, the node stopped it, or the head was too large (answered
/// 431 with one small write).
async fn first_head(tcp: &mut TcpStream, slot: &Slot, limits: &HttpLimits) -> Option<Vec<u8>> {
    let head = tokio::select! {
        biased;
        _ = slot.stop.cancelled() => Err(if slot.shutdown.is_cancelled() {
            HeadError::Closed
        } else {
            HeadError::Evicted
        }),
        head = read_head(tcp, limits.max_head_bytes, limits.header_timeout) => head,
    };
    match head {
        Ok(head) => Some(head),
        Err(e) => {
            if e == HeadError::TooLarge {
                // One small write on a fresh socket: its buffer takes it, or it is lost.
                let _ = tcp.try_write(TOO_LARGE);
            }
            if let Some(reason) = e.reason() {
                metrics::counter!("wsbus_http_connections_dropped_total", "reason" => reason)
                    .increment(1);
            }
            None
        }
    }
}

/// Runs hyper's connection until it ends, closing it gracefully when the node stops the slot
/// or the connection sat idle for `idle_timeout`; returns why it was dropped, if it counts.
async fn drive(
    mut conn: Pin<Box<http1::UpgradeableConnection<TokioIo<Watched>, Handler>>>,
    slot: &Slot,
    state: &ConnState,
    idle_timeout: Duration,
) -> Option<&'static str> {
    let idle = tokio::time::sleep(idle_timeout);
    let mut idle = pin!(idle);
    let mut seen = state.activity();
    let mut closing: Option<&'static str> = None;
    let result = loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => break Some(result),
            _ = slot.stop.cancelled(), if closing.is_none() => {
                closing = Some(if slot.shutdown.is_cancelled() { "shutdown" } else { "evicted" });
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle => {
                let now = state.activity();
                if now == seen && closing.is_none() {
                    closing = Some("idle");
                    conn.as_mut().graceful_shutdown();
                }
                seen = now;
                idle.as_mut().reset(Instant::now() + idle_timeout);
            }
            _ = state.handler_done.notified(), if closing.is_some() => {}
        }
        if closing.is_some() && !state.in_handler() {
            break None;
        }
    };
    match (&result, closing) {
        (Some(Err(e)), _) if e.is_timeout() => Some("header_timeout"),
        (Some(Err(e)), _) if e.is_parse_too_large() => Some("head_too_large"),
        (Some(Err(e)), _) => {
            tracing::debug!(error = %e, "connection ended with an error");
            None
        }
        (None, Some(reason)) if reason != "shutdown" => Some(reason),
        _ => None,
    }
}

/// The answer to a first request head over the limit (hyper answers later ones itself).
const TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Why a connection ended before its first request head was complete.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    Timeout,
    TooLarge,
    Evicted,
    /// The peer went away, or the listener is shutting down.
    Closed,
}

impl HeadError {
    /// The `reason` label of `wsbus_http_connections_dropped_total`, if it counts.
    fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Timeout => Some("header_timeout"),
            Self::TooLarge => Some("head_too_large"),
            Self::Evicted => Some("evicted"),
            Self::Closed => None,
        }
    }
}

/// Reads a connection's first request head, up to its blank line, within `timeout` and
/// `max` bytes; returns what was read (the head, and whatever followed it).
///
/// This happens before hyper sees the connection, so a connection that is still sending
/// its head costs only its task and the bytes it sent: hyper would give it an 8 KiB read
/// buffer, an 8 KiB write buffer and its connection state at once (~30 KiB each, measured
/// with 4,096 stalled connections).
async fn read_head(
    tcp: &mut TcpStream,
    max: usize,
    timeout: Duration,
) -> Result<Vec<u8>, HeadError> {
    let read = async {
        tcp.readable().await.map_err(|_| HeadError::Closed)?;
        let mut buf = Vec::with_capacity(1024.min(max));
        loop {
            if buf.capacity() - buf.len() < 256 {
                buf.reserve(buf.len().min(max));
            }
            let searched = buf.len().saturating_sub(2);
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(HeadError::Closed),
                Ok(_) => {}
            }
            if let Some(end) = head_end(&buf[searched..]) {
                // A complete head over the limit is refused too, even when its end came in
                // the same read that crossed it.
                return match searched + end > max {
                    true => Err(HeadError::TooLarge),
                    false => Ok(buf),
                };
            }
            if buf.len() >= max {
                return Err(HeadError::TooLarge);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(HeadError::Timeout))
}

/// Where the blank line that ends a head (`\r\n\r\n`, or bare `\n`s, which hyper's parser
/// accepts too) ends in `bytes`: the head's length, counted from the start of `bytes`.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).enumerate().find_map(|(i, w)| match w {
        b"\n\n" => Some(i + 2),
        b"\n\r" if bytes.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// What the connection task learns from the socket and the handler.
#[derive(Default)]
struct ConnState {
    /// Reads and writes that moved bytes, so far (the idle check compares two samples).
    activity: AtomicU64,
    /// Handlers running (a connection handles one request at a time; a count is simplest).
    in_handler: AtomicUsize,
    /// Signalled when a handler returns, so a closing connection can go at once.
    handler_done: Notify,
}

impl ConnState {
    fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    fn in_handler(&self) -> bool {
        self.in_handler.load(Ordering::Acquire) != 0
    }
}

/// Marks a handler as running while it lives.
struct InHandler(Arc<ConnState>);

impl InHandler {
    fn enter(state: Arc<ConnState>) -> Self {
        state.in_handler.fetch_add(1, Ordering::AcqRel);
        Self(state)
    }
}

impl Drop for InHandler {
    fn drop(&mut self) {
        self.0.in_handler.fetch_sub(1, Ordering::AcqRel);
        self.0.handler_done.notify_one();
    }
}

/// The router as a hyper service, marking each request's handler as running.
struct Handler {
    router: Router,
    state: Arc<ConnState>,
    /// The client's address, given to handlers as axum's `ConnectInfo` (the API limits
    /// failed authentications per source address).
    peer: Option<std::net::SocketAddr>,
}

impl hyper::service::Service<Request<Incoming>> for Handler {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(peer) = self.peer {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let running = InHandler::enter(self.state.clone());
        let response = tower_service::Service::call(&mut self.router.clone(), request);
        Box::pin(async move {
            let response = response.await;
            drop(running);
            response
        })
    }
}

/// The socket as hyper reads it: first the bytes [`read_head`] read, then the socket. It
/// counts reads and writes that move bytes (for the idle check), and stays under the
/// WebSocket after an upgrade, where one relaxed increment per read or write is all it costs.
pub(crate) struct Watched {
    inner: TcpStream,
    /// The first head (and what followed it), read before hyper took over.
    head: Vec<u8>,
    /// How much of `head` hyper has read.
    head_read: usize,
    state: Arc<ConnState>,
}

impl Watched {
    /// The TCP stream, and what is left unread of the first head (after an upgrade: the
    /// WebSocket stream takes both).
    pub(crate) fn into_parts(mut self) -> (TcpStream, Vec<u8>) {
        let left = self.head.split_off(self.head_read.min(self.head.len()));
        (self.inner, left)
    }

    fn moved(&self) {
        self.state.activity.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.head_read < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.head_read);
            buf.put_slice(&self.head[self.head_read..self.head_read + n]);
            self.head_read += n;
            if self.head_read == self.head.len() {
                self.head = Vec::new();
                self.head_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The connections of one listener that have not upgraded, oldest first.
struct Pending {
    max: usize,
    /// Held only to insert or remove one entry; never across an `.await`.
    table: Mutex<PendingTable>,
}

struct PendingTable {
    next_id: u64,
    /// Accept order → the token that closes that connection.
    open: BTreeMap<u64, CancellationToken>,
}

/// A connection's place in [`Pending`]; leaving it (drop) frees the place.
struct Slot {
    pending: Arc<Pending>,
    id: u64,
    /// Cancelled to close this connection: by the listener's shutdown (its parent) or by
    /// eviction.
    stop: CancellationToken,
    shutdown: CancellationToken,
}

impl Pending {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            table: Mutex::new(PendingTable {
                next_id: 0,
                open: BTreeMap::new(),
            }),
        }
    }

    /// Registers a new connection; if that makes one too many, closes the oldest.
    fn admit(self: &Arc<Self>, shutdown: &CancellationToken) -> Slot {
        let stop = shutdown.child_token();
        let (id, evicted) = {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            let id = table.next_id;
            table.next_id += 1;
            table.open.insert(id, stop.clone());
            let evicted = (table.open.len() > self.max)
                .then(|| table.open.pop_first())
                .flatten();
            (id, evicted)
        };
        match evicted {
            Some((_, oldest)) => oldest.cancel(),
            None => metrics::gauge!("wsbus_http_connections_pending").increment(1.0),
        }
        Slot {
            pending: self.clone(),
            id,
            stop,
            shutdown: shutdown.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let removed = self
            .pending
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(&self.id);
        if removed.is_some() {
            metrics::gauge!("wsbus_http_connections_pending").decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_a_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(27));
        assert_eq!(head_end(b"\r\n\r\nafter"), Some(4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r"), None);
    }

    #[test]
    fn a_full_table_closes_the_oldest_connection() {
        let pending = Arc::new(Pending::new(2));
        let shutdown = CancellationToken::new();
        let first = pending.admit(&shutdown);
        let second = pending.admit(&shutdown);
        assert!(!first.stop.is_cancelled());
        let third = pending.admit(&shutdown);
        assert!(first.stop.is_cancelled(), "the oldest is closed");
        assert!(!second.stop.is_cancelled() && !third.stop.is_cancelled());
        drop(second);
        let fourth = pending.admit(&shutdown);
        assert!(!third.stop.is_cancelled(), "a freed place is reused first");
        shutdown.cancel();
        assert!(third.stop.is_cancelled() && fourth.stop.is_cancelled());
        drop((first, third, fourth));
        assert!(pending.table.lock().unwrap().open.is_empty());
    }
}
