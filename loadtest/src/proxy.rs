//! A TCP proxy in front of one node whose path can be cut, for the `drops` scenario.
//!
//! A *cut* models a phone losing its network: every connection through the proxy is reset on
//! both sides at once (zero linger, so bytes still in flight are dropped, not delivered), and
//! new connections are accepted and reset at once until the path is restored. Resetting,
//! rather than blackholing (forwarding nothing while keeping the sockets open), lets both ends
//! notice at once: a blackholed session would hold the user's one session slot on the node
//! until its ping timeout (two `--ping-interval`s, 40 s by default), refusing the reconnect
//! with `not unique session` far past a 2 s cut, and the client would need its own liveness
//! deadline to notice. What the server must survive is the same: whatever it wrote that the
//! client did not read is gone, and the client comes back with `since`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One cuttable path to one node.
pub(crate) struct Proxy {
    /// Where clients connect instead of the node.
    addr: SocketAddr,
    /// `true` while the path is cut; every forwarding task watches it.
    cut: watch::Sender<bool>,
    /// Connections reset by cuts (open when a cut began, or attempted during one).
    resets: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`. A
    /// connection whose upstream cannot be reached (the node is down) is reset.
    pub(crate) async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let resets = Arc::new(AtomicU64::new(0));
        let accept = tokio::spawn(accept_loop(listener, upstream, cut.clone(), resets.clone()));
        Ok(Self {
            addr,
            cut,
            resets,
            accept,
        })
    }

    /// The proxy's own address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (`true`) or restores (`false`) the path.
    pub(crate) fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Connections reset by cuts so far.
    pub(crate) fn resets(&self) -> u64 {
        self.resets.load(Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Forwarding tasks end with their connections: cut them all.
        self.cut.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: watch::Sender<bool>,
    resets: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut cut_rx = cut.subscribe();
        let resets = resets.clone();
        tokio::spawn(async move {
            if *cut_rx.borrow_and_update() {
                resets.fetch_add(1, Relaxed);
                reset(client);
                return;
            }
            let Ok(server) = TcpStream::connect(upstream).await else {
                reset(client);
                return;
            };
            let _ = server.set_nodelay(true);
            let _ = client.set_nodelay(true);
            let (mut c, mut s) = (client, server);
            let cut_now = tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut c, &mut s) => false,
                r = cut_rx.wait_for(|&cut| cut) => r.is_ok(),
            };
            if cut_now {
                resets.fetch_add(1, Relaxed);
            }
            reset(c);
            reset(s);
        });
    }
}

/// Closes with a reset: what was queued is dropped, as on a lost radio link.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}
