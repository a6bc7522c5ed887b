//! The WebSocket connection itself: the upgrade handshake (RFC 6455 §4.2) and closing
//! politely (§7).
//!
//! The upgrade is done here rather than by axum's `WebSocketUpgrade` so that the node keeps
//! the byte stream under the WebSocket. After a protocol violation or an oversized frame,
//! tungstenite's stream is finished, yet the client may still be sending; unless those bytes
//! are read and discarded, closing the socket makes the kernel send a TCP reset, and the
//! client's stack then throws away what it had not read yet: the error frame and the Close
//! that said why.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::edge::listener::Watched;
use crate::session::socket::Socket;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

/// A request to upgrade to a WebSocket (an extractor), checked per RFC 6455 §4.2.1.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    config: WebSocketConfig,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let refuse = |status: StatusCode, why: &'static str| (status, why).into_response();
        if parts.method != axum::http::Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "WebSocket needs GET\n",
            ));
        }
        let headers = &parts.headers;
        if !has_token(headers, header::CONNECTION, "upgrade")
            || !has_token(headers, header::UPGRADE, "websocket")
        {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "expected a WebSocket upgrade\n",
            ));
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13\n",
            ));
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "missing Sec-WebSocket-Key\n",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "connection cannot be upgraded\n",
            ));
        };
        Ok(Self {
            key,
            on_upgrade,
            config: WebSocketConfig::default(),
        })
    }
}

/// Whether header `name` lists `token` (comma-separated, case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Upgrade {
    /// Uses `config` for the socket (frame and buffer sizes).
    pub fn config(mut self, config: WebSocketConfig) -> Self {
        self.config = config;
        self
    }

    /// Answers `101 Switching Protocols` and runs `session` on the socket once the
    /// connection has switched.
    pub fn on_upgrade<F, Fut>(self, session: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let (on_upgrade, config) = (self.on_upgrade, self.config);
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let Some((tcp, unread)) = into_tcp(upgraded) else {
                tracing::warn!("an upgraded connection did not come from wsbus's listener");
                return;
            };
            let socket =
                WebSocketStream::from_partially_read(tcp, unread, Role::Server, Some(config)).await;
            session(socket).await;
        });
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
                (
                    header::SEC_WEBSOCKET_ACCEPT,
                    HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
                ),
            ],
        )
            .into_response()
    }
}

/// The TCP stream under an upgraded connection, with the bytes already read from it that
/// nobody consumed yet (the start of the WebSocket stream).
fn into_tcp(upgraded: Upgraded) -> Option<(TcpStream, Vec<u8>)> {
    let parts = upgraded.downcast::<TokioIo<Watched>>().ok()?;
    let (tcp, head_left) = parts.io.into_inner().into_parts();
    let mut unread = parts.read_buf.to_vec();
    unread.extend_from_slice(&head_left);
    Some((tcp, unread))
}
