//! Authentication, origins, rate limits, and Redis with a password and over TLS.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::*;

/// A fresh temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("wsbus-test-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An HS256 secret of the minimum length (32 bytes).
const SECRET: &str = "test-secret-test-secret-test-sec";

/// `wsbus token` through the binary.
async fn mint(user: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .arg("token")
        .arg(user)
        .args(args)
        .env_remove("WSBUS_JWT_SECRET")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn hs256_tokens_are_checked_before_the_upgrade() {
    let redis = Redis::start().await.unwrap();
    let mut c = config("a", &redis.url());
    c.insecure = false;
    c.jwt_secret = Some(SECRET.into());
    let a = Node::start_with(c).await;
    let good = mint("alice", &["--jwt-secret", SECRET]).await;
    let other_user = mint("bob", &["--jwt-secret", SECRET]).await;
    let forged = mint(
        "alice",
        &["--jwt-secret", "a-different-secret-of-32-bytes-or-more"],
    )
    .await;
    let now = jsonwebtoken::get_current_timestamp();
    let signed = |exp: u64, nbf: Option<u64>| {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = wsbus::auth::Claims {
            sub: "alice".into(),
            exp,
            iat: now - 120,
            nbf,
            ..Default::default()
        };
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    // A minute past or ahead (the node allows 5 s of leeway).
    let claims_exp_in_past = signed(now - 60, None);
    let claims_nbf_ahead = signed(now + 3600, Some(now + 60));
    let url = a.url("alice");
    for (query, why) in [
        (String::new(), "missing"),
        (format!("?token={forged}"), "forged"),
        (format!("?token={other_user}"), "another user's"),
        (format!("?token={claims_exp_in_past}"), "expired"),
        (format!("?token={claims_nbf_ahead}"), "not yet valid"),
        ("?token=garbage".to_owned(), "garbage"),
    ] {
        let status = Client::connect_url(&format!("{url}{query}"), "alice")
            .await
            .err();
        assert_eq!(status, Some(401), "{why} token");
    }
    assert_eq!(
        where_is(&redis.url(), "alice").await,
        None,
        "refused before the claim"
    );

    let mut alice = Client::connect_url(&format!("{url}?token={good}"), "alice")
        .await
        .expect("a valid token in the query is accepted");
    let mut request = a.url("bob").into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("BEARER {other_user}")).unwrap(),
    );
    let mut bob = Client::connect_request(request, "bob")
        .await
        .expect("a valid token in the Authorization header is accepted, scheme in any case");
    alice.send_to("bob", "authenticated").await;
    bob.expect_message("alice", "authenticated").await;
}

#[tokio::test]
async fn rs256_and_es256_public_keys_verify_tokens_from_private_keys() {
    let dir = TempDir::new();
    openssl(
        &dir.0,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(
        &dir.0,
        &["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"],
    );
    openssl(
        &dir.0,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
    );
    openssl(
        &dir.0,
        &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"],
    );
    let redis = Redis::start().await.unwrap();
    for (kind, private, public) in [
        ("RS256", "rsa.pem", "rsa.pub"),
        ("ES256", "ec.pem", "ec.pub"),
    ] {
        let mut c = config(&format!("node-{kind}"), &redis.url());
        c.insecure = false;
        c.jwt_public_key = Some(dir.path(public));
        let node = Node::start_with(c).await;
        let user = format!("user-{kind}");
        let private = dir.path(private);
        let token = mint(&user, &["--private-key", private.to_str().unwrap()]).await;
        let ok = Client::connect_url(&format!("{}?token={token}", node.url(&user)), &user).await;
        assert!(
            ok.is_ok(),
            "{kind}: a token signed with the private key is accepted"
        );
        let hs = wsbus::auth::mint(&user, 60, Some(SECRET.as_bytes()), None).unwrap();
        let refused =
            Client::connect_url(&format!("{}?token={hs}", node.url("other")), "other").await;
        assert_eq!(
            refused.err(),
            Some(401),
            "{kind}: an HS256 token is refused"
        );
    }
}

/// `wsbus serve` with these extra arguments and environment; its stderr once it exited.
async fn serve_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["serve", "--bind", "127.0.0.1:0"])
        .args(["--redis-url", "redis://127.0.0.1:1"])
        .args(args)
        .env_remove("WSBUS_JWT_SECRET")
        .env_remove("WSBUS_JWT_PUBLIC_KEY")
        .env_remove("WSBUS_INSECURE")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, out)
        .await
        .expect("serve exits at once")
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} {env:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn serve_refuses_to_start_without_authentication() {
    let err = serve_fails(&[], &[]).await;
    assert!(
        err.contains("refusing to start without authentication"),
        "{err}"
    );
    // WSBUS_INSECURE takes the usual spellings of false, too.
    for off in ["0", "false", "no", "off"] {
        let err = serve_fails(&[], &[("WSBUS_INSECURE", off)]).await;
        assert!(err.contains("refusing to start"), "{off}: {err}");
    }
}

/// WSBUS_INSECURE=1 (as containers set it) starts a node, like `true`.
#[tokio::test]
async fn insecure_from_the_environment_takes_1_and_yes() {
    let redis = Redis::start().await.unwrap();
    for on in ["1", "yes", "true"] {
        let mut p = NodeProcess::start_with_flags_env(
            "envnode",
            &["--redis-url".to_owned(), redis.url()],
            &[],
            &[("WSBUS_INSECURE", on)],
        )
        .await;
        p.signal("TERM");
        let (status, _) = p.wait_exit().await;
        assert!(status.success(), "WSBUS_INSECURE={on}: {status}");
    }
}

#[tokio::test]
async fn short_or_empty_hs256_secrets_are_refused() {
    for secret in ["", "short", &SECRET[..31]] {
        let err = serve_fails(&[], &[("WSBUS_JWT_SECRET", secret)]).await;
        assert!(
            err.contains(&format!(
                "secret (WSBUS_JWT_SECRET / --jwt-secret) is {} bytes",
                secret.len()
            )) && err.contains("at least 32"),
            "{secret:?}: {err}"
        );
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
            .args(["token", "alice"])
            .env("WSBUS_JWT_SECRET", secret)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "token with {secret:?}");
        assert!(out.stdout.is_empty(), "no token printed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("at least 32"), "{err}");
    }
}

#[tokio::test]
async fn insecure_beside_a_jwt_setting_is_a_startup_error() {
    let err = serve_fails(&["--insecure"], &[("WSBUS_JWT_SECRET", SECRET)]).await;
    assert!(err.contains("drop --insecure"), "{err}");
    let err = serve_fails(
        &["--jwt-public-key", "/nonexistent.pub"],
        &[("WSBUS_INSECURE", "true")],
    )
    .await;
    assert!(
        err.contains("--insecure contradicts --jwt-public-key"),
        "{err}"
    );
}

#[tokio::test]
async fn origins_outside_the_allow_list_are_refused() {
    let redis = Redis::start().await.unwrap();
    let mut c = config("a", &redis.url());
    c.allowed_origins = vec!["https://chat.example".into()];
    let a = Node::start_with(c).await;
    let with_origin = |user: &str, origin: &str| {
        let mut request = a.url(user).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).unwrap());
        request
    };
    let evil = Client::connect_request(with_origin("x", "https://evil.example"), "x").await;
    assert_eq!(evil.err(), Some(403));
    assert!(
        Client::connect_request(with_origin("y", "https://chat.example"), "y")
            .await
            .is_ok()
    );
    // Non-browser clients send no Origin at all.
    assert!(Client::connect(&a, "z").await.is_ok());
}

#[tokio::test]
async fn senders_over_their_rate_get_errors_then_a_close() {
    let redis = Redis::start().await.unwrap();
    let mut c = config("a", &redis.url());
    c.rate_limit = 1.0;
    c.rate_burst = 5;
    let a = Node::start_with(c).await;
    let mut flooder = a.connect("flooder").await;
    let mut sink = a.connect("sink").await;
    for i in 0..5 {
        flooder.send_to("sink", &i.to_string()).await;
    }
    for i in 0..5 {
        sink.expect_message("flooder", &i.to_string()).await;
    }
    // The bucket is empty: the next frames are refused, not delivered.
    flooder.send_to("sink", "too fast").await;
    flooder.expect_error("rate limited").await;
    // A whole burst refused in a row closes the connection.
    for _ in 0..5 {
        flooder.send_to("sink", "still too fast").await;
    }
    for _ in 0..4 {
        flooder.expect_error("rate limited").await;
    }
    flooder.expect_close(4005).await;
}

#[tokio::test]
async fn redis_with_a_password() {
    let port = wsbus::dev::free_port().unwrap();
    let _redis = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--requirepass", "pa55word"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("redis://:pa55word@127.0.0.1:{port}");
    let a = Node::start("a", &url).await;
    let b = Node::start("b", &url).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "through an authenticated Redis").await;
    bob.expect_message("alice", "through an authenticated Redis")
        .await;
    // A wrong password never becomes ready and refuses clients with 503.
    let mut bad = config("c", &format!("redis://:nope@127.0.0.1:{port}"));
    bad.redis_timeout = std::time::Duration::from_millis(200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(wsbus::run(bad, listener, stop.clone().cancelled_owned()));
    let status = eventually(DEADLINE, "readyz answers", || async move {
        http_get(addr, "/readyz").await.map(|(s, _)| s)
    })
    .await;
    assert_eq!(status, 503);
    let refused = Client::connect_url(&format!("ws://{addr}/ws/carol"), "carol").await;
    assert_eq!(refused.err(), Some(503));
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca() {
    let dir = TempDir::new();
    openssl(
        &dir.0,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=wsbus-test-ca",
        ],
    );
    openssl(
        &dir.0,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.path("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &dir.0,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    let port = wsbus::dev::free_port().unwrap();
    let _redis = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(dir.path("server.crt"))
        .arg("--tls-key-file")
        .arg(dir.path("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.path("ca.crt"))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("rediss://127.0.0.1:{port}");
    let tls_config = |id: &str| {
        let mut c = config(id, &url);
        c.redis_ca_file = Some(dir.path("ca.crt"));
        c
    };
    let a = Node::start_with(tls_config("a")).await;
    let b = Node::start_with(tls_config("b")).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    alice.send_to("bob", "encrypted bus").await;
    bob.expect_message("alice", "encrypted bus").await;
}

#[tokio::test]
async fn connections_past_the_node_limit_get_503() {
    let redis = Redis::start().await.unwrap();
    let mut c = config("a", &redis.url());
    c.max_connections = 2;
    let a = Node::start_with(c).await;
    let first = a.connect("one").await;
    let _second = a.connect("two").await;
    assert_eq!(Client::connect(&a, "three").await.err(), Some(503));
    // A slot frees up when a connection ends.
    first.close().await;
    let a = &a;
    eventually(DEADLINE, "a slot frees up", || async move {
        Client::connect(a, "three").await.ok()
    })
    .await;
}
