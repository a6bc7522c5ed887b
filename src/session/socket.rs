//! The WebSocket a session owns, and how a node closes it: politely, so the client reads
//! every frame sent before the Close, and the Close itself.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

/// An upgraded client connection: the TCP stream itself, taken back from hyper and the
/// listener's wrapper, so a frame costs no layer of either.
pub type Socket = WebSocketStream<TcpStream>;

/// How long closing may take: the Close going out, then the client's Close (or EOF) coming
/// back.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Closes `socket` with `code`: sends the Close frame (after whatever is buffered), then
/// stops acting on input but reads and discards it until the client's Close, EOF, or
/// [`CLOSE_LINGER`]. When tungstenite can no longer read (after a protocol violation), the
/// node sends a FIN behind its Close and discards raw bytes until the client's EOF. Dropping
/// the socket then sends a FIN, not a reset, so the client reads everything sent before the
/// Close, and the Close itself.
pub async fn close_politely(socket: &mut Socket, code: u16, reason: impl Into<Utf8Bytes>) {
    let frame = Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if socket.send(frame).await.is_err() {
            return;
        }
        // The stream ends after the client's Close, or at once if it ended before.
        while let Some(Ok(msg)) = socket.next().await {
            if msg.is_close() {
                return;
            }
        }
        let io = socket.get_mut();
        let _ = io.shutdown().await;
        let mut discard = [0u8; 4096];
        while matches!(io.read(&mut discard).await, Ok(n) if n > 0) {}
    })
    .await;
}
