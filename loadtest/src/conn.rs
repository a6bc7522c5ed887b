//! Connection helpers: URL resolution, source-address spreading, connecting,
//! and minimal frame encoding/decoding.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Error as WsError};

use crate::token::Minter;

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Length of every message text the tool sends.
pub(crate) const TEXT_LEN: usize = 64;

/// A resolved node.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `ws://host:port` without trailing slash.
    pub(crate) base: String,
    pub(crate) addr: SocketAddr,
}

impl Target {
    pub(crate) async fn resolve(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("node URL {url:?} must start with ws://"))?;
        let hostport = rest.split('/').next().unwrap_or_default();
        if hostport.is_empty() {
            bail!("node URL {url:?} has no host");
        }
        let with_port = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            hostport.to_owned()
        } else {
            format!("{hostport}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} resolved to nothing"))?;
        Ok(Self {
            base: format!("ws://{hostport}"),
            addr,
        })
    }

    /// Source address number `i` (0-based) out of `k` for this target, when the
    /// target is an IPv4 loopback address and more than one source is wanted.
    pub(crate) fn source_addr(&self, i: usize, k: usize) -> Option<IpAddr> {
        match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_loopback() && k > 1 => {
                let n = (i % k) as u32 + 1; // 127.0.0.1, 127.0.0.2, ...
                Some(IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 + n)))
            }
            _ => None,
        }
    }
}

/// WebSocket config with small buffers (memory per connection matters at 100k).
pub(crate) fn ws_config(read_buf: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buf)
        .write_buffer_size(4096)
        .max_write_buffer_size(4 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Connects `user_id` to `target`, optionally from `source` IP, with a timeout; with `auth`,
/// with a token minted for the user (`?token=`). `user_id` may carry a query string of its
/// own (`alice?since=3&epoch=e`). On failure returns a short error kind (`http 503`,
/// `io ConnectionRefused`, `timeout`, ...).
pub(crate) async fn connect(
    target: &Target,
    user_id: &str,
    auth: Option<&Minter>,
    source: Option<IpAddr>,
    read_buf: usize,
    timeout: Duration,
) -> Result<Ws, String> {
    let url = ws_url(target, user_id, auth);
    match tokio::time::timeout(timeout, connect_inner(target, url, source, read_buf)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".to_owned()),
    }
}

/// `ws://host:port/ws/<user_id>`, with `token=` added to its query when `auth` is given.
fn ws_url(target: &Target, user_id: &str, auth: Option<&Minter>) -> String {
    let mut url = format!("{}/ws/{}", target.base, user_id);
    if let Some(m) = auth {
        let (user, sep) = match user_id.split_once('?') {
            Some((user, _)) => (user, '&'),
            None => (user_id, '?'),
        };
        let _ = write!(url, "{sep}token={}", m.token(user));
    }
    url
}

async fn connect_inner(
    target: &Target,
    url: String,
    source: Option<IpAddr>,
    read_buf: usize,
) -> Result<Ws, String> {
    let io_kind = |e: std::io::Error| format!("io {:?}", e.kind());
    let sock = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io_kind)?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0)).map_err(io_kind)?;
    }
    let stream = sock.connect(target.addr).await.map_err(io_kind)?;
    stream.set_nodelay(true).map_err(io_kind)?;
    let (ws, _resp) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config(read_buf)))
            .await
            .map_err(|e| ws_error_kind(&e))?;
    Ok(ws)
}

/// Short, aggregatable description of a WebSocket error.
pub(crate) fn ws_error_kind(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("http {}", resp.status().as_u16()),
        WsError::Io(io) => format!("io {:?}", io.kind()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".to_owned(),
        WsError::Protocol(p) => format!("protocol: {p}"),
        other => {
            let mut s = other.to_string();
            s.truncate(60);
            s
        }
    }
}

/// Describes a close frame for aggregation (`close 4002`, `close 1001`, ...).
pub(crate) fn close_kind(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) => format!("close {}", u16::from(f.code)),
        None => "close (no code)".to_owned(),
    }
}

/// Appends a `message` action frame to `buf`; the text is `header` padded
/// with `.` to exactly [`TEXT_LEN`] bytes. `header` must be plain ASCII
/// without `"` or `\`.
pub(crate) fn encode_message(buf: &mut String, to: &str, header: std::fmt::Arguments<'_>) {
    buf.push_str(r#"{"action":"message","data":{"to":""#);
    buf.push_str(to);
    buf.push_str(r#"","text":""#);
    let start = buf.len();
    let _ = buf.write_fmt(header);
    let len = buf.len() - start;
    for _ in len..TEXT_LEN {
        buf.push('.');
    }
    buf.push_str(r#""}}"#);
}

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<InData<'a>>,
}

#[derive(Deserialize)]
struct InData<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
}

/// A parsed server frame.
pub(crate) enum Incoming<'a> {
    Message(Cow<'a, str>),
    Error(Cow<'a, str>),
    Other,
}

pub(crate) fn parse(frame: &str) -> Incoming<'_> {
    let Ok(f) = serde_json::from_str::<InFrame<'_>>(frame) else {
        return Incoming::Other;
    };
    match (f.action.as_ref(), f.data) {
        ("message", Some(InData { text: Some(t), .. })) => Incoming::Message(t),
        ("error", Some(InData { error: Some(e), .. })) => Incoming::Error(e),
        ("error", _) => Incoming::Error(Cow::Borrowed("(no error text)")),
        _ => Incoming::Other,
    }
}

/// Aggregation key of an error text: quoted parts (user ids) become `*`,
/// so `User 'lt1-7' not found` counts as `User '*' not found`.
pub(crate) fn error_key(e: &str) -> Cow<'_, str> {
    if !e.contains('\'') {
        return Cow::Borrowed(e);
    }
    let mut out = String::with_capacity(e.len());
    for (i, part) in e.split('\'').enumerate() {
        if i > 0 {
            out.push('\'');
        }
        out.push_str(if i % 2 == 1 { "*" } else { part });
    }
    Cow::Owned(out)
}

/// Splits a text of the form `a:b:c:...` into its first three numeric fields.
/// The first field may carry a one-letter tag (`c17`).
pub(crate) fn decode_text(text: &str) -> Option<(u64, u64, u64)> {
    let mut it = text.splitn(4, ':');
    let a = it
        .next()?
        .trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let a = a.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let c = it.next()?.parse().ok()?;
    Some((a, b, c))
}

/// Reads VmRSS (KiB) of a process from `/proc/PID/status`.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Open file descriptors of a process (its sockets, for a server), from `/proc`.
pub(crate) fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// A random run prefix such as `ltk3x9q2`.
pub(crate) fn run_prefix() -> String {
    let mut s = String::from("lt");
    for _ in 0..6 {
        s.push(fastrand::alphanumeric().to_ascii_lowercase());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_pads_to_64_and_parses() {
        let mut buf = String::new();
        encode_message(
            &mut buf,
            "bob",
            format_args!("{}:{}:{}:", 7, 42, 123_456_789),
        );
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        let text = v["data"]["text"].as_str().unwrap();
        assert_eq!(text.len(), TEXT_LEN);
        assert_eq!(decode_text(text), Some((7, 42, 123_456_789)));
        assert_eq!(decode_text("c9:1:2:...."), Some((9, 1, 2)));
    }

    #[test]
    fn urls_carry_the_token_after_any_query() {
        let target = Target {
            base: "ws://127.0.0.1:9".to_owned(),
            addr: "127.0.0.1:9".parse().unwrap(),
        };
        assert_eq!(ws_url(&target, "a-1", None), "ws://127.0.0.1:9/ws/a-1");
        let m = Minter::for_run(Some("0123456789abcdef0123456789abcdef"), Vec::new()).unwrap();
        let plain = ws_url(&target, "a-1", Some(&m));
        assert!(
            plain.starts_with("ws://127.0.0.1:9/ws/a-1?token=ey"),
            "{plain}"
        );
        let recover = ws_url(&target, "a-1?since=4&epoch=e", Some(&m));
        assert!(
            recover.starts_with("ws://127.0.0.1:9/ws/a-1?since=4&epoch=e&token=ey"),
            "{recover}"
        );
    }

    #[test]
    fn parse_frames() {
        let m = r#"{"from":"a","action":"message","data":{"to":"b","text":"1:2:3:.."}}"#;
        assert!(matches!(parse(m), Incoming::Message(t) if t == "1:2:3:.."));
        let e = r#"{"from":"a","action":"error","data":{"error":"User 'x' not found"}}"#;
        assert!(matches!(parse(e), Incoming::Error(t) if t == "User 'x' not found"));
        assert!(matches!(parse("nope"), Incoming::Other));
        assert_eq!(error_key("User 'x-1' not found"), "User '*' not found");
        assert_eq!(error_key("bus unavailable"), "bus unavailable");
    }
}
