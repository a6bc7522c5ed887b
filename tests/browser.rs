//! End to end in a real browser: headless Chromium, driven through chromedriver (WebDriver),
//! uses the chat page (`static/index.html`) and the client module (`static/wsbus.js`) served
//! by two in-process nodes, and two users chat across the nodes: directly, and in a room. A
//! third test kills (SIGKILL) the node of a page whose nodes keep history and checks that the
//! page, back on another node, shows every message sent meanwhile, once and in order; a
//! fourth that a page that missed more than the node keeps says the history is lost.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian: `apt-get install -y chromium
//! chromium-driver`); without them the test fails and says so. Set `WSBUS_SCREENSHOT_DIR` to
//! also save screenshots of the pages there (`a-chat.png`, `b-chat.png`, `a-room.png`, ...).

#![allow(unreachable_pub)]

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

use common::proxy::{Mode, Proxy};
use common::{DEADLINE, Node, NodeProcess, Redis};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const INSTALL: &str = "run `apt-get install -y chromium chromium-driver`";

/// A `chromedriver` process (and the browsers it starts, in its process group), killed on drop.
struct ChromeDriver {
    url: String,
    child: tokio::process::Child,
}

impl ChromeDriver {
    async fn start() -> ChromeDriver {
        for bin in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the browser test needs Chromium and its WebDriver; {INSTALL}"
            );
        }
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
        let end = Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!("chromedriver exited ({status}) before listening on port {port}");
            }
            assert!(
                Instant::now() < end,
                "chromedriver did not listen on port {port} in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        driver
    }

    /// A new browser session with its own profile directory.
    async fn session(&self, profile: &TempDir) -> Client {
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
                    "--window-size=1000,700",
                    format!("--user-data-dir={}", profile.0.display()),
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

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "wsbus-browser-{name}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One browser tab on the chat page of a node.
struct Page {
    name: &'static str,
    client: Client,
}

impl Page {
    /// Loads the chat page of the node at `addr` in this tab.
    async fn goto(&self, addr: SocketAddr) {
        self.goto_with(addr, "").await;
    }

    /// Loads the chat page of the node at `addr` with query string `query` (`?...` or "").
    async fn goto_with(&self, addr: SocketAddr, query: &str) {
        let url = format!("http://{addr}/{query}");
        self.client
            .goto(&url)
            .await
            .unwrap_or_else(|e| panic!("page {}: cannot load {url}: {e}", self.name));
        assert_eq!(
            self.text("#node").await,
            addr.to_string(),
            "page shows its node"
        );
    }

    /// Waits for an element matching `css`.
    async fn wait(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(DEADLINE)
            .every(Duration::from_millis(25))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("page {}: no `{css}` in time: {e}", self.name))
    }

    async fn text(&self, css: &str) -> String {
        self.wait(css).await.text().await.unwrap()
    }

    /// The visible texts of the elements matching `css`, in document order; `None` if the
    /// page changed them while they were being read.
    async fn texts(&self, css: &str) -> Option<Vec<String>> {
        let mut texts = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await.ok()? {
            texts.push(element.text().await.ok()?);
        }
        Some(texts)
    }

    /// The values of attribute `name` of the elements matching `css`, in document order.
    async fn attrs(&self, css: &str, name: &str) -> Vec<Option<String>> {
        let mut values = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await.unwrap() {
            values.push(element.attr(name).await.unwrap());
        }
        values
    }

    /// Whether an element matches `css` now.
    async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .is_empty()
    }

    /// Waits until the elements matching `css` show exactly `expected`.
    async fn wait_texts(&self, css: &str, expected: &[&str]) {
        let end = Instant::now() + DEADLINE;
        loop {
            let got = self.texts(css).await;
            if got.as_deref().is_some_and(|got| got == expected) {
                return;
            }
            assert!(
                Instant::now() < end,
                "page {}: `{css}` shows {got:?}, not {expected:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Replaces the value of the input `css` with `value` by typing it.
    async fn type_into(&self, css: &str, value: &str) {
        let input = self.wait(css).await;
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.wait(css).await.click().await.unwrap();
    }

    async fn wait_state(&self, state: &str) {
        self.wait(&format!(r#"#status[data-state="{state}"]"#))
            .await;
    }

    async fn connect_as(&self, user: &str) {
        self.type_into("#user", user).await;
        self.click("#connect").await;
        self.wait_state("open").await;
    }

    async fn send(&self, to: &str, text: &str) {
        self.type_into("#to", to).await;
        self.type_into("#text", text).await;
        self.click("#send").await;
    }

    /// Joins `room` through the rooms panel and waits until the page lists it.
    async fn join(&self, room: &str) {
        self.type_into("#room", room).await;
        self.click("#join").await;
        self.wait(&format!(r#"#rooms li[data-room="{room}"]"#))
            .await;
    }

    /// Selects `room` in the rooms panel and sends `text` to it.
    async fn send_to_room(&self, room: &str, text: &str) {
        self.click(&format!(r#"#rooms li[data-room="{room}"] .room"#))
            .await;
        assert_eq!(
            self.value("#to").await,
            format!("#{room}"),
            "selecting a room"
        );
        self.type_into("#text", text).await;
        self.click("#send").await;
    }

    async fn value(&self, css: &str) -> String {
        self.wait(css)
            .await
            .prop("value")
            .await
            .unwrap()
            .unwrap_or_default()
    }

    /// Saves a screenshot as `<dir>/<page>-<label>.png` if `WSBUS_SCREENSHOT_DIR` is set.
    async fn screenshot(&self, label: &str) {
        let Some(dir) = std::env::var_os("WSBUS_SCREENSHOT_DIR") else {
            return;
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{}-{label}.png", self.name)), png).unwrap();
    }
}

/// Runs `body` with two browser tabs, on the pages of `a` and `b`, and always ends both
/// browser sessions afterwards (also when `body` panics).
async fn with_two_pages<F, Fut>(a: SocketAddr, b: SocketAddr, body: F)
where
    F: FnOnce(Page, Page) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let driver = ChromeDriver::start().await;
    let (profile_a, profile_b) = (TempDir::new("a"), TempDir::new("b"));
    let (client_a, client_b) = tokio::join!(driver.session(&profile_a), driver.session(&profile_b));
    let page_a = Page {
        name: "a",
        client: client_a.clone(),
    };
    let page_b = Page {
        name: "b",
        client: client_b.clone(),
    };
    let outcome = tokio::spawn(async move {
        tokio::join!(page_a.goto(a), page_b.goto(b));
        body(page_a, page_b).await;
    })
    .await;
    end_sessions([client_a, client_b], outcome).await;
}

/// Runs `body` with one browser tab (not on any page yet), and always ends its browser
/// session afterwards (also when `body` panics).
async fn with_page<F, Fut>(name: &'static str, body: F)
where
    F: FnOnce(Page) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let driver = ChromeDriver::start().await;
    let profile = TempDir::new(name);
    let client = driver.session(&profile).await;
    let page = Page {
        name,
        client: client.clone(),
    };
    let outcome = tokio::spawn(body(page)).await;
    end_sessions([client], outcome).await;
}

/// Ends the browser sessions of `clients`, then passes on a panic of the test's body.
async fn end_sessions<const N: usize>(
    clients: [Client; N],
    outcome: Result<(), tokio::task::JoinError>,
) {
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_across_nodes_in_the_browser() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
    // Holds `carol` on node a, to see the page refuse a second session of her.
    let carol = a.connect("carol").await;
    let a_addr = a.addr;

    with_two_pages(a.addr, b.addr, move |alice, bob| async move {
        alice.connect_as("alice").await;
        bob.connect_as("bob").await;

        // alice (node a) → bob (node b); the text is shown as text, never as HTML.
        alice.send("bob", "hello from a <b>not bold</b>").await;
        let got = bob.text(r#"#log li.msg[data-from="alice"] .body"#).await;
        assert_eq!(got, "hello from a <b>not bold</b>");
        let sent = alice.text(r#"#log li.out[data-to="bob"] .body"#).await;
        assert_eq!(sent, "hello from a <b>not bold</b>");

        // bob (node b) → alice (node a).
        bob.send("alice", "hi alice, from b").await;
        let got = alice.text(r#"#log li.msg[data-from="bob"] .body"#).await;
        assert_eq!(got, "hi alice, from b");

        // A recipient connected nowhere: the page shows the server's error.
        alice.send("nobody", "anyone there?").await;
        let error = alice.text("#log li.err .body").await;
        assert_eq!(error, "User 'nobody' not found");
        alice.screenshot("chat").await;
        bob.screenshot("chat").await;

        // Node b shuts down (close 1001): bob's page keeps trying to reconnect.
        b.stop().await;
        bob.wait_state("reconnecting").await;
        bob.screenshot("reconnecting").await;
        bob.click("#connect").await; // "Disconnect" stops trying.
        bob.wait_state("closed").await;

        // An id that another live session holds: the error shows, and the page does not
        // reconnect (it ends up disconnected, not reconnecting).
        bob.goto(a_addr).await;
        bob.type_into("#user", "carol").await;
        bob.click("#connect").await;
        let error = bob.text("#log li.err .body").await;
        assert_eq!(error, "not unique session");
        bob.wait_state("closed").await;
        assert_eq!(bob.text("#connect").await, "Connect");
        bob.screenshot("refused").await;
    })
    .await;

    carol.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_across_nodes_in_the_browser() {
    let redis = Redis::start().await.unwrap();
    let node = |id: &str| {
        let mut config = common::config(id, &redis.url());
        // alice also has other sessions (other "tabs"): raw WebSocket clients. The newest
        // two win, so that the page's session can be replaced at the end.
        config.max_sessions_per_user = 2;
        config.on_session_limit = wsbus::config::OnSessionLimit::Replace;
        Node::start_with(config)
    };
    let a = node("a").await;
    let b = node("b").await;
    let a_node = a.addr;
    let other_tab = move || async move {
        common::Client::connect_url(&format!("ws://{a_node}/ws/alice"), "alice").await
    };
    // alice's page reaches node a through a proxy, so that its connection can be cut.
    let proxy = Proxy::start(a.addr.port()).await;
    let alice_page: SocketAddr = ([127, 0, 0, 1], proxy.port).into();

    with_two_pages(alice_page, b.addr, move |alice, bob| async move {
        alice.connect_as("alice").await;
        bob.connect_as("bob").await;

        // alice (node a) opens the room; bob (node b) joins it: each sees both members,
        // and alice sees bob's presence event.
        alice.join("lobby").await;
        alice.wait_texts("#members li", &["alice"]).await;
        bob.join("lobby").await;
        bob.wait_texts("#members li", &["alice", "bob"]).await;
        alice
            .wait_texts(
                r#"#log li.presence[data-room="lobby"] .body"#,
                &["bob joined lobby"],
            )
            .await;
        alice.wait_texts("#members li", &["alice", "bob"]).await;

        // Room messages both ways, shown as text.
        alice
            .send_to_room("lobby", "hello lobby <i>from a</i>")
            .await;
        bob.wait_texts(
            r#"#log li.msg[data-room="lobby"][data-from="alice"] .body"#,
            &["hello lobby <i>from a</i>"],
        )
        .await;
        alice
            .wait_texts(
                r#"#log li.out[data-room="lobby"] .body"#,
                &["hello lobby <i>from a</i>"],
            )
            .await;
        bob.send_to_room("lobby", "hi from b").await;
        alice
            .wait_texts(
                r#"#log li.msg[data-room="lobby"][data-from="bob"] .body"#,
                &["hi from b"],
            )
            .await;

        // alice's connection drops: her user leaves the room; her page reconnects by itself
        // and joins the room again.
        proxy.set(Mode::Cut);
        alice.wait_state("reconnecting").await;
        proxy.set(Mode::Forward);
        alice.wait_state("open").await;
        bob.wait_texts(
            r#"#log li.presence[data-room="lobby"] .body"#,
            &["alice left lobby", "alice joined lobby"],
        )
        .await;
        alice.wait_texts("#rooms li .room", &["#lobby"]).await;
        alice.wait_texts("#members li", &["alice", "bob"]).await;
        bob.send_to_room("lobby", "welcome back").await;
        alice
            .wait_texts(
                r#"#log li.msg[data-room="lobby"][data-from="bob"] .body"#,
                &["hi from b", "welcome back"],
            )
            .await;

        // What alice's other session sends shows on her page as hers, sent elsewhere.
        let mut tab = other_tab().await.expect("alice's second session");
        tab.send_to("bob", "direct, from another tab").await;
        tab.send_raw(r#"{"action":"join","data":{"room":"lobby"}}"#)
            .await;
        let joined = tab.recv().await;
        assert_eq!(joined["action"], "joined", "{joined}");
        tab.send_raw(
            r#"{"action":"room_message","data":{"room":"lobby","text":"room, from another tab"}}"#,
        )
        .await;
        alice
            .wait_texts(
                r#"#log li.out[data-own][data-to="bob"] .body"#,
                &["direct, from another tab"],
            )
            .await;
        alice
            .wait_texts(
                r#"#log li.out[data-own][data-room="lobby"] .body"#,
                &["room, from another tab"],
            )
            .await;
        assert_eq!(
            alice
                .text(r#"#log li.out[data-own][data-to="bob"] .meta b"#)
                .await,
            "bob"
        );
        bob.wait_texts(
            r#"#log li.msg[data-from="alice"]:not([data-room]) .body"#,
            &["direct, from another tab"],
        )
        .await;
        bob.wait_texts(
            r#"#log li.msg[data-room="lobby"][data-from="alice"] .body"#,
            &["hello lobby <i>from a</i>", "room, from another tab"],
        )
        .await;
        tab.close().await;

        alice.screenshot("room").await;
        bob.screenshot("room").await;

        // bob leaves: his page drops the room, alice sees the leave and the member list shrink.
        bob.click(r#"#rooms li[data-room="lobby"] .leave"#).await;
        bob.wait_texts("#rooms li", &[]).await;
        alice
            .wait_texts(
                r#"#log li.presence[data-room="lobby"] .body"#,
                &["bob joined lobby", "bob left lobby"],
            )
            .await;
        alice.wait_texts("#members li", &["alice"]).await;
        alice.screenshot("room-left").await;

        // Two newer sessions of alice replace the page's (close 4006): the page must not
        // reconnect, which would replace one of them in turn, and so on.
        let newer = [other_tab().await.unwrap(), other_tab().await.unwrap()];
        alice.wait_state("closed").await;
        assert_eq!(alice.text("#connect").await, "Connect");
        alice
            .wait_texts(
                "#log li.info:last-child .body",
                &["disconnected (4006 replaced by a newer session): alice connected in another tab or device"],
            )
            .await;
        for tab in newer {
            tab.close().await;
        }
    })
    .await;
}

/// A `wsbus serve` process on `redis` that keeps 100 messages of history per stream (a
/// process, so that it can be killed).
async fn history_node(id: &str, redis: &Redis) -> NodeProcess {
    let redis_args = ["--redis-url".to_owned(), redis.url()];
    NodeProcess::start_with_flags(id, &redis_args, &["--history", "100"]).await
}

/// bob, a plain WebSocket client, writing numbered messages to alice and to `lobby`.
struct Writer {
    client: common::Client,
    /// The direct messages sent, in order.
    direct: Vec<String>,
    /// The room messages sent, in order.
    room: Vec<String>,
}

impl Writer {
    /// Sends the next direct message and the next room message.
    async fn send_next(&mut self) {
        let n = self.direct.len() + 1;
        let text = format!("direct {n:03}");
        self.client.send_to("alice", &text).await;
        self.direct.push(text);
        let text = format!("room {n:03}");
        let frame = json!({"action": "room_message", "data": {"room": "lobby", "text": text}});
        self.client.send_raw(&frame.to_string()).await;
        self.room.push(text);
    }
}

/// The page's line after a successful recovery of `n` messages; `what` is `reconnected` or
/// `rejoined <room>`.
fn recovered_line(what: &str, n: usize) -> String {
    let messages = if n == 1 { "message" } else { "messages" };
    format!("{what}, {n} missed {messages} recovered")
}

/// The offsets (`data-offset`) of the entries matching `css`; each must have one.
async fn offsets(page: &Page, css: &str) -> Vec<u64> {
    page.attrs(css, "data-offset")
        .await
        .into_iter()
        .map(|o| {
            o.expect("a message with history on has an offset")
                .parse()
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_recovers_what_was_sent_while_its_node_was_killed() {
    let redis = Redis::start().await.unwrap();
    let (n1, n2, n3) = tokio::join!(
        history_node("n1", &redis),
        history_node("n2", &redis),
        history_node("n3", &redis)
    );
    let mut bob = common::Client::connect_url(&n3.url("bob"), "bob")
        .await
        .expect("bob connects to n3");
    bob.send_raw(r#"{"action":"join","data":{"room":"lobby"}}"#)
        .await;
    let joined = bob.recv().await;
    assert_eq!(joined["action"], "joined", "{joined}");
    // alice's page comes from n1 and knows the other two nodes.
    let query = format!("?nodes={},{}", n2.addr, n3.addr);
    let survivors = [n2.addr.to_string(), n3.addr.to_string()];

    with_page("alice", move |alice| async move {
        const DIRECT: &str = r#"#log li.msg[data-from="bob"]:not([data-room])"#;
        const ROOM: &str = r#"#log li.msg[data-from="bob"][data-room="lobby"]"#;
        let direct = format!("{DIRECT} .body");
        let room = format!("{ROOM} .body");
        alice.goto_with(n1.addr, &query).await;
        alice.connect_as("alice").await;
        alice.join("lobby").await;
        let mut bob = Writer {
            client: bob,
            direct: Vec::new(),
            room: Vec::new(),
        };

        // Live, while n1 is up.
        for _ in 0..3 {
            bob.send_next().await;
        }
        alice.wait_texts(&direct, &strs(&bob.direct)).await;
        alice.wait_texts(&room, &strs(&bob.room)).await;

        // n1 dies while bob keeps writing, every 100 ms, until the page is back on another
        // node and has recovered both streams, and a few more rounds after that.
        n1.signal("KILL");
        let killed = Instant::now();
        let mut back = None;
        let end = Instant::now() + 3 * DEADLINE;
        let mut after = 0;
        while after < 3 {
            bob.send_next().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if alice.has("#log li.recovery:not([data-room])").await
                && alice.has(r#"#log li.recovery[data-room="lobby"]"#).await
            {
                back.get_or_insert(killed.elapsed());
                after += 1;
            }
            assert!(
                Instant::now() < end,
                "page a did not recover in time; bob sent {} rounds",
                bob.direct.len()
            );
        }

        // Every message, exactly once, in order, and consecutive in its stream.
        alice.wait_texts(&direct, &strs(&bob.direct)).await;
        alice.wait_texts(&room, &strs(&bob.room)).await;
        for css in [DIRECT, ROOM] {
            let offsets = offsets(&alice, css).await;
            assert!(
                offsets.windows(2).all(|w| w[1] == w[0] + 1),
                "offsets of `{css}`: {offsets:?}"
            );
        }

        // The page says what it recovered: the messages it shows as recovered, at least one
        // each (bob wrote every 100 ms while the page was away).
        let replayed = alice
            .attrs(&format!("{DIRECT}[data-replayed]"), "data-offset")
            .await
            .len();
        let replayed_room = alice
            .attrs(&format!("{ROOM}[data-replayed]"), "data-offset")
            .await
            .len();
        assert!(
            replayed >= 1 && replayed_room >= 1,
            "recovered {replayed} and {replayed_room}"
        );
        alice
            .wait_texts(
                "#log li.recovery:not([data-room]) .body",
                &[&recovered_line("reconnected", replayed)],
            )
            .await;
        alice
            .wait_texts(
                r#"#log li.recovery[data-room="lobby"] .body"#,
                &[&recovered_line("rejoined lobby", replayed_room)],
            )
            .await;
        let node = alice.text("#node").await;
        assert!(
            survivors.contains(&node),
            "page a is on {node}, not n2 or n3"
        );
        alice.wait_state("open").await;
        // It resumed its session on another node at once (it used to be refused with 4001
        // until the dead node's session expired, and took 14 s to come back).
        let back = back.expect("recovered");
        println!("page back on another node, both streams recovered, {back:?} after the kill");
        assert!(back < Duration::from_secs(3), "back after {back:?}");
        assert!(!alice.has("#log li.err").await, "page a shows an error");
        alice.screenshot("recovered").await;

        // None of bob's messages was refused.
        while let Some(event) = bob
            .client
            .next_event_within(Duration::from_millis(300))
            .await
        {
            match event {
                common::Event::Json(frame) => assert_ne!(frame["action"], "error", "bob: {frame}"),
                common::Event::Closed(code) => panic!("bob's connection closed ({code:?})"),
            }
        }
    })
    .await;
}

/// `strings` as `&str`s, for [`Page::wait_texts`].
fn strs(strings: &[String]) -> Vec<&str> {
    strings.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_when_it_missed_more_than_history_keeps() {
    let redis = Redis::start().await.unwrap();
    let mut config = common::config("a", &redis.url());
    config.history = 3;
    let a = Node::start_with(config).await;
    let mut bob = a.connect("bob").await;
    // alice's page reaches the node through a proxy, so that her connection can be cut.
    let proxy = Proxy::start(a.addr.port()).await;
    let alice_page: SocketAddr = ([127, 0, 0, 1], proxy.port).into();

    with_page("alice", move |alice| async move {
        const DIRECT: &str = r#"#log li.msg[data-from="bob"] .body"#;
        alice.goto(alice_page).await;
        alice.connect_as("alice").await;

        // Cut before any message came: the page knows its position all the same (it asked
        // for it once connected), and recovers what bob sent meanwhile.
        proxy.set(Mode::Cut);
        alice.wait_state("reconnecting").await;
        bob.send_to("alice", "before").await;
        proxy.set(Mode::Forward);
        alice
            .wait_texts(
                "#log li.recovery .body",
                &["reconnected, 1 missed message recovered"],
            )
            .await;
        alice.wait_texts(DIRECT, &["before"]).await;

        // While alice is away, bob sends more than the node keeps (3): the page cannot
        // recover them, and says so.
        proxy.set(Mode::Cut);
        alice.wait_state("reconnecting").await;
        for n in 1..=5 {
            bob.send_to("alice", &format!("missed {n}")).await;
        }
        proxy.set(Mode::Forward);
        alice
            .wait_texts(
                "#log li.recovery .body",
                &[
                    "reconnected, 1 missed message recovered",
                    "reconnected; history lost (trimmed) — reload",
                ],
            )
            .await;
        assert_eq!(
            alice.attrs("#log li.recovery", "data-recovered").await,
            [Some("true".to_owned()), Some("false".to_owned())]
        );
        alice.wait_state("open").await;

        // Live messages go on.
        bob.send_to("alice", "after").await;
        alice.wait_texts(DIRECT, &["before", "after"]).await;
        alice.screenshot("history-lost").await;
        assert!(!alice.has("#log li.err").await, "page a shows an error");
    })
    .await;
}

const SECRET: &str = "browser-test-secret-of-at-least-32-bytes";

/// A token for `user` valid until `exp` (seconds since the epoch).
fn token_until(user: &str, exp: u64) -> String {
    let claims = wsbus::auth::Claims {
        sub: user.to_owned(),
        exp,
        iat: now_secs(),
        ..Default::default()
    };
    wsbus::auth::mint_claims(&claims, Some(SECRET.as_bytes()), None).unwrap()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts, in the page, a client for `user` whose token function hands out `tokens` in turn
/// (the last one again when they run out), recording its events in `window.events[user]`.
async fn start_client(page: &Page, user: &str, tokens: Vec<String>) {
    let script = r#"
        const [user, tokens] = arguments;
        window.events = window.events || {};
        window.events[user] = [];
        import("./wsbus.js").then(({ WsbusClient }) => {
            const token = () => Promise.resolve(tokens.length > 1 ? tokens.shift() : tokens[0]);
            const bus = new WsbusClient(undefined, user, { token, minDelayMs: 50, maxDelayMs: 200 });
            for (const type of ["open", "close", "refreshed", "disconnected", "error"]) {
                bus.addEventListener(type, (e) => window.events[user].push({ type, ...e.detail }));
            }
            bus.connect();
        });
    "#;
    page.client
        .execute(script, vec![json!(user), json!(tokens)])
        .await
        .unwrap();
}

/// The types of the events recorded for `user` so far.
async fn event_types(page: &Page, user: &str) -> Vec<String> {
    let got = page
        .client
        .execute(
            "return (window.events?.[arguments[0]] ?? []).map((e) => e.type);",
            vec![json!(user)],
        )
        .await
        .unwrap();
    serde_json::from_value(got).unwrap()
}

/// Waits until the events recorded for `user` satisfy `done`; returns them.
async fn wait_events(
    page: &Page,
    user: &str,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let end = Instant::now() + DEADLINE;
    loop {
        let got = event_types(page, user).await;
        if done(&got) {
            return got;
        }
        assert!(
            Instant::now() < end,
            "{user}: {what}; events so far {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A page whose token expires in a few seconds keeps its one connection by refreshing it
/// (a token function hands out new tokens); a page whose refresh is refused is closed with
/// 4008 when the token expires, fetches a new token and connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_refreshes_its_token_and_reconnects_after_expiry() {
    let redis = Redis::start().await.unwrap();
    let mut config = common::config("a", &redis.url());
    config.insecure = false;
    config.jwt_secret = Some(SECRET.to_owned());
    let a = Node::start_with(config).await;
    let addr = a.addr;
    with_page("refresh", move |page| async move {
        page.goto(addr).await;
        let first_exp = now_secs() + 4;
        let alice = vec![
            token_until("alice", first_exp),
            token_until("alice", now_secs() + 600),
        ];
        start_client(&page, "alice", alice).await;
        // bob's refresh is refused (not a token): his connection ends at its expiry.
        let bob = vec![
            token_until("bob", now_secs() + 3),
            "not-a-token".to_owned(),
            token_until("bob", now_secs() + 600),
        ];
        start_client(&page, "bob", bob).await;
        wait_events(&page, "alice", "refreshed", |e| e.contains(&"refreshed".to_owned())).await;
        let bob_events = wait_events(&page, "bob", "a second open after 4008", |e| {
            e.iter().filter(|t| *t == "open").count() == 2
        })
        .await;
        assert_eq!(
            bob_events,
            ["open", "error", "close", "open"],
            "bob: refused refresh, expiry, reconnect"
        );
        let closes = page
            .client
            .execute(
                "return window.events.bob.filter((e) => e.type === 'close').map((e) => [e.code, e.reason]);",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(closes, json!([[4008, "token expired"]]));
        // Past alice's first token's expiry (and its second): still the one connection.
        while now_secs() <= first_exp + 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(event_types(&page, "alice").await, ["open", "refreshed"]);
    })
    .await;
}

/// A page disconnected by the backend (4007) does not reconnect, and shows why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_stays_disconnected_after_4007_and_shows_why() {
    const KEY: &str = "browser-api-key";
    let redis = Redis::start().await.unwrap();
    let mut config = common::config("a", &redis.url());
    config.api_keys = vec![KEY.to_owned()];
    let a = Node::start_with(config).await;
    let addr = a.addr;
    let redis_url = redis.url();
    with_page("kicked", move |page| async move {
        page.goto(addr).await;
        page.connect_as("mallory").await;
        let auth = format!("Bearer {KEY}");
        let body = json!({"user": "mallory", "reason": "banned for spam"}).to_string();
        let (status, reply) = common::http_request(
            addr,
            "POST",
            "/api/disconnect",
            &[("Authorization", &auth)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        page.wait_state("closed").await;
        page.wait_texts("#status", &["disconnected: banned for spam"])
            .await;
        assert_eq!(
            page.attrs("#status", "data-code").await,
            [Some("4007".to_owned())]
        );
        // It stays so: no session of mallory comes back within a few reconnect delays.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            assert!(
                common::where_is(&redis_url, "mallory").await.is_none(),
                "reconnected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(page.text("#status").await, "disconnected: banned for spam");
        assert_eq!(page.text("#connect").await, "Connect");
    })
    .await;
}
