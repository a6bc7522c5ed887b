//! A WebSocket client on a raw TCP socket: it writes hand-made frames (protocol violations,
//! floods) and reports how the server ended the connection, FIN or reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::DEADLINE;

/// Frame opcodes.
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;

/// One frame, encoded as a client would (masked unless told otherwise).
#[derive(Clone, Debug)]
pub struct Frame {
    pub fin: bool,
    /// RSV1..3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A final, masked frame.
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>) -> Frame {
        Frame {
            fin: true,
            rsv: 0,
            opcode,
            masked: true,
            payload: payload.into(),
        }
    }

    pub fn text(text: &str) -> Frame {
        Frame::new(TEXT, text.as_bytes())
    }

    /// A Close frame with `code` and `reason`.
    pub fn close(code: u16, reason: &str) -> Frame {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        Frame::new(CLOSE, payload)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 14);
        out.push(u8::from(self.fin) << 7 | (self.rsv & 0b111) << 4 | (self.opcode & 0xf));
        let mask_bit = u8::from(self.masked) << 7;
        match self.payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if self.masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&key);
            out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(&self.payload);
        }
        out
    }
}

/// How the server's side of the connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// FIN after everything it sent.
    Eof,
    /// A TCP reset (`ECONNRESET`): whatever the client had not read yet may be lost.
    Reset,
    /// Still open at the deadline.
    Open,
}

/// What the server sent until it ended the connection.
#[derive(Debug)]
pub struct Closing {
    /// Text frames, in order.
    pub texts: Vec<String>,
    /// The code of the server's Close frame (`Some(None)` for a Close without a code).
    pub close: Option<Option<u16>>,
    pub ending: Ending,
}

impl Closing {
    /// The `error` texts among the text frames.
    pub fn errors(&self) -> Vec<String> {
        self.texts
            .iter()
            .filter_map(|t| {
                let v: serde_json::Value = serde_json::from_str(t).ok()?;
                v["data"]["error"].as_str().map(str::to_owned)
            })
            .collect()
    }
}

/// A raw WebSocket connection after a successful upgrade.
pub struct RawClient {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
}

impl RawClient {
    /// Upgrades `GET /ws/{user}` on `addr` by hand.
    pub async fn connect(addr: SocketAddr, user: &str) -> RawClient {
        Self::connect_sending(addr, user, &[]).await
    }

    /// Upgrades, writing `early` (frames) right behind the request without waiting for the
    /// response, so they are in flight whatever the server does first.
    pub async fn connect_sending(addr: SocketAddr, user: &str, early: &[u8]) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let request = format!(
            "GET /ws/{user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(early);
        stream.write_all(&bytes).await.unwrap();
        // Read the response head byte by byte, so no frame after it is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = tokio::time::timeout(DEADLINE, stream.read_u8())
                .await
                .expect("upgrade response in time")
                .unwrap();
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let (read, write) = stream.into_split();
        RawClient { read, write }
    }

    /// Writes bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, frame: &Frame) {
        self.send_bytes(&frame.encode()).await;
    }

    /// Reads until the server ends the connection, answering its Close the way a client
    /// library does (and sending nothing else).
    pub async fn read_until_end(self) -> Closing {
        self.flood_until_end(Vec::new()).await
    }

    /// Writes `flood` (as fast as the socket takes it) while reading what the server sends
    /// until it ends the connection. Like a client library, it stops flooding and answers
    /// once the server's Close has arrived.
    pub async fn flood_until_end(self, flood: Vec<u8>) -> Closing {
        let RawClient {
            mut read,
            mut write,
        } = self;
        let closed = Arc::new(AtomicBool::new(false));
        let writer = {
            let closed = closed.clone();
            tokio::spawn(async move {
                for chunk in flood.chunks(16 * 1024) {
                    if closed.load(Ordering::Acquire) {
                        break;
                    }
                    // A reset shows up here when the writer meets it first (a socket's
                    // error is reported once, to whichever call comes first).
                    write.write_all(chunk).await?;
                }
                Ok::<_, std::io::Error>(write)
            })
        };
        let mut closing = Closing {
            texts: Vec::new(),
            close: None,
            ending: Ending::Open,
        };
        let got_close = read_frames(&mut read, |opcode, payload| {
            match opcode {
                TEXT => closing
                    .texts
                    .push(String::from_utf8(payload.to_vec()).unwrap()),
                CLOSE => {
                    closing.close = Some(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                    );
                    return true;
                }
                _ => {}
            }
            false
        });
        let got_close = tokio::time::timeout(DEADLINE, got_close).await;
        closed.store(true, Ordering::Release);
        let result = match got_close {
            Ok(Ok(true)) => match writer.await.unwrap() {
                Ok(mut write) => {
                    let code = closing.close.flatten().unwrap_or(1000);
                    match write.write_all(&Frame::close(code, "").encode()).await {
                        Ok(()) => {
                            let drained = read_frames(&mut read, |_, _| false);
                            tokio::time::timeout(DEADLINE, drained).await
                        }
                        Err(e) => Ok(Err(e)),
                    }
                }
                Err(e) => Ok(Err(e)),
            },
            other => other,
        };
        closing.ending = match result {
            Ok(Ok(_)) => Ending::Eof,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Ending::Reset
            }
            Ok(Err(e)) => panic!("socket: {e}"),
            Err(_) => Ending::Open,
        };
        closing
    }
}

/// Reads server frames, passing each to `on_frame`, until it returns true (`Ok(true)`) or
/// the connection ends (`Ok(false)` on EOF).
async fn read_frames(
    read: &mut OwnedReadHalf,
    mut on_frame: impl FnMut(u8, &[u8]) -> bool,
) -> std::io::Result<bool> {
    loop {
        let mut head = [0u8; 2];
        match read.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        // EOF inside a frame is an error here: the server cut a frame short.
        let len = match head[1] & 0x7f {
            126 => u64::from(read.read_u16().await?),
            127 => read.read_u64().await?,
            n => u64::from(n),
        };
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let mut payload = vec![0; len as usize];
        read.read_exact(&mut payload).await?;
        if on_frame(head[0] & 0x0f, &payload) {
            return Ok(true);
        }
    }
}
