//! Headless Chromium through chromedriver (WebDriver), for the browser tests: `tests/browser.rs`
//! and the load test's `loadtest/tests/report_page.rs` (another crate, which includes this
//! file with `#[path]`). Needs `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (`scripts/setup --test` installs them); without them a test fails and says so.

#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const INSTALL: &str = "run scripts/setup --test (apt-get install -y chromium chromium-driver)";

/// A `chromedriver` process (and the browsers it starts, in its process group), killed on
/// drop.
pub struct ChromeDriver {
    pub url: String,
    child: tokio::process::Child,
}

impl ChromeDriver {
    /// Starts chromedriver on a free port and waits until it listens. A port another process
    /// took first makes it exit: it is started again on another.
    pub async fn start() -> ChromeDriver {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the browser tests need Chromium and its WebDriver; {INSTALL}"
            );
        }
        for _ in 0..5 {
            let port = wsbus::dev::free_port().unwrap();
            let child = tokio::process::Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {CHROMEDRIVER} ({e}); {INSTALL}"));
            let mut driver = ChromeDriver {
                url: format!("http://127.0.0.1:{port}"),
                child,
            };
            if driver.wait_listening(port).await {
                return driver;
            }
        }
        panic!("chromedriver did not start");
    }

    /// Waits until chromedriver answers its status endpoint on `port` (true), or exits (false).
    async fn wait_listening(&mut self, port: u16) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            // Ours, not another server on the port: chromedriver's status says so (it keeps
            // the connection open, so the reply is read until it says so).
            let req = "GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                && s.write_all(req.as_bytes()).await.is_ok()
            {
                let mut reply = Vec::new();
                let read = async {
                    let mut buf = [0u8; 4096];
                    while !String::from_utf8_lossy(&reply).contains("ChromeDriver") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => reply.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                };
                if tokio::time::timeout(Duration::from_secs(2), read)
                    .await
                    .unwrap_or(false)
                {
                    return true;
                }
            }
            assert!(
                Instant::now() < end,
                "chromedriver did not listen on port {port} in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new headless browser session with its own profile directory and window size
    /// (`"1000,700"`).
    pub async fn session(&self, profile: &Path, window: &str) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                    format!("--window-size={window}"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"))
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The browsers are in chromedriver's process group: end them all.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}
