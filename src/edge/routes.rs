//! The edge: HTTP routes, the WebSocket upgrade, and what happens before a session starts.
//!
//! The user is claimed in Redis *before* the upgrade completes, so it is reachable from
//! every node the moment the handshake is done. A refused claim still upgrades, sends the
//! `not unique session` error and closes with 4001.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::SinkExt;
use tokio::sync::OwnedSemaphorePermit;
use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;

use crate::cluster::live::NodeStatus;
use crate::cluster::presence::{Claim, ResumeHashes, SessionRef, new_resume_secret, resume_hash};
use crate::edge::websocket::Upgrade;
use crate::node::Node;
use crate::session::socket::{Socket, close_politely};
use crate::session::{Session, SessionGuard, StartAt};
use crate::wire::client::{
    ClientError, Position, close, encode_error, encode_welcome, resume_from_query,
};
use crate::wire::ids::UserId;

/// The routes clients use: the WebSocket endpoint, the page and its client module.
pub fn client_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/ws/{user_id}", get(connect))
        .route("/", get(index_page))
        .route("/wsbus.js", get(client_module))
        .with_state(node)
}

/// The routes operators use: health, readiness and metrics (on `--admin-bind` if given).
pub fn admin_router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// A connect, gate by gate: the user id and its `since`, the origin, the token, a connection
/// slot, where the user's stream starts (history on), the claim (taking a session over with
/// `?resume=<secret>`). Each gate refuses with its own status (a refused claim still
/// upgrades, to say why); past them all the connection upgrades to a session. A client that
/// asked with `?resume` gets `welcome` (its new secret) first.
async fn connect(
    State(node): State<Arc<Node>>,
    Path(user_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Upgrade,
) -> Result<Response, Refused> {
    let Some(user) = UserId::parse(&user_id) else {
        return Err(Refused::new(StatusCode::BAD_REQUEST, "invalid user id"));
    };
    Position::from_query(query.as_deref())
        .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    check_origin(&node, &user, &headers)?;
    let grant = authenticate(&node, &user, query.as_deref(), &headers)?;
    let permit = connection_slot(&node)?;
    let ws = configure(ws, &node);
    let start = stream_start(&node, &user, query.as_deref()).await?;
    let sid = node.next_session_id();
    // In the hub before the claim: once the claim is in Redis, another node may evict this
    // session (`--on-session-limit replace`), and its kick must find the session here.
    let queue = node.hub.insert(user.clone(), sid);
    let resume = ResumeAsk::from_query(query.as_deref());
    let evicted = match claim(&node, &user, sid, resume.as_ref()).await {
        Ok(evicted) => evicted,
        Err(NotClaimed::Bus) => return Err(bus_unavailable()),
        // Refused, but upgraded: the client is told why.
        Err(NotClaimed::NotUnique) => {
            return Ok(ws.on_upgrade(move |socket| refuse_not_unique(socket, user)));
        }
    };
    close_replaced(&node, &user, &evicted).await;
    let guard = SessionGuard::new(node.clone(), user.clone(), sid);
    let tracker = node.sessions.clone();
    metrics::counter!("wsbus_connections_opened_total").increment(1);
    let welcome = resume.map(|r| encode_welcome(user.as_str(), &node.id, sid, &r.secret));
    Ok(ws.on_upgrade(move |socket| {
        let session = Session::new(node, user, queue, guard, permit, start, grant);
        tracker.track_future(session.welcomed(welcome).run(socket))
    }))
}

/// What a connect with `?resume` asks: to take over the session of the secret it presents
/// (if any), and a secret of its own. Only hashes reach Redis; neither is logged.
struct ResumeAsk {
    /// The hash of the presented secret (`?resume=<secret>`); `None` for `?resume=`.
    presented: Option<String>,
    /// The new session's secret, sent in `welcome`.
    secret: String,
    /// Its hash, stored with the claim.
    issued: String,
}

impl ResumeAsk {
    fn from_query(query: Option<&str>) -> Option<Self> {
        let given = resume_from_query(query)?;
        let (secret, issued) = new_resume_secret();
        Some(Self {
            presented: (!given.is_empty()).then(|| resume_hash(given)),
            secret,
            issued,
        })
    }

    fn hashes(ask: Option<&Self>) -> ResumeHashes<'_> {
        ResumeHashes {
            presented: ask.and_then(|a| a.presented.as_deref()),
            issued: ask.map(|a| a.issued.as_str()),
        }
    }
}

/// Refuses a browser page from an origin not in `--allowed-origins` (when that is set).
fn check_origin(node: &Node, user: &UserId, headers: &HeaderMap) -> Result<(), Refused> {
    if let Some(origin) = headers.get(header::ORIGIN)
        && !node.config.allowed_origins.is_empty()
        && !node
            .config
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    {
        tracing::info!(user = %user, origin = ?origin, "refused: origin not allowed");
        metrics::counter!("wsbus_connections_refused_total", "reason" => "origin").increment(1);
        return Err(Refused::new(StatusCode::FORBIDDEN, "origin not allowed"));
    }
    Ok(())
}

/// Refuses a connect without a valid token for `user` (unless the node runs `--insecure`);
/// what the token grants the session.
fn authenticate(
    node: &Node,
    user: &UserId,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<crate::auth::Grant, Refused> {
    let Some(verifier) = &node.auth else {
        return Ok(crate::auth::Grant::default());
    };
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let checked = match crate::auth::token_from(query, authorization) {
        None => Err(crate::auth::AuthError::Missing),
        Some(token) => verifier.verify(token, user.as_str()),
    };
    checked.map_err(|e| {
        // Never log the token itself.
        tracing::info!(user = %user, reason = %e, "refused: authentication");
        metrics::counter!("wsbus_connections_refused_total", "reason" => "auth").increment(1);
        Refused::new(StatusCode::UNAUTHORIZED, e.to_string())
    })
}

/// A connection slot, unless the node is shutting down or has `--max-connections`.
fn connection_slot(node: &Node) -> Result<OwnedSemaphorePermit, Refused> {
    if node.shutdown.is_cancelled() {
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node shutting down",
        ));
    }
    let Ok(permit) = node.connections.clone().try_acquire_owned() else {
        metrics::counter!("wsbus_connections_refused_total", "reason" => "limit").increment(1);
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections",
        ));
    };
    Ok(permit)
}

/// With history on, where the user's stream starts for this session: where the client
/// says (`?since=&epoch=`), or where the stream is now, before the session registers, so
/// that what is sent meanwhile reaches it too.
async fn stream_start(
    node: &Node,
    user: &UserId,
    query: Option<&str>,
) -> Result<Option<StartAt>, Refused> {
    let stream = crate::history::Stream::User(user.as_str());
    // Validated by the first gate.
    let asked = Position::from_query(query).ok().flatten();
    StartAt::of(node.history.as_ref(), stream, asked)
        .await
        .map_err(|e| {
            tracing::warn!(user = %user, error = %e, "history read failed; refusing connection");
            bus_unavailable()
        })
}

/// Why a claim did not register the session.
enum NotClaimed {
    /// Redis could not be asked.
    Bus,
    /// The user is at its session limit (`--on-session-limit reject`).
    NotUnique,
}

/// Claims `user` for session `sid` (already in the hub); returns the sessions it replaced.
/// A session not claimed leaves the hub again.
async fn claim(
    node: &Node,
    user: &UserId,
    sid: u64,
    resume: Option<&ResumeAsk>,
) -> Result<Vec<SessionRef>, NotClaimed> {
    let claim = claim_patiently(node, user, sid, ResumeAsk::hashes(resume)).await;
    tracing::debug!(user = %user, sid, ?claim, "claim");
    if !matches!(
        claim,
        Ok(Claim::Claimed | Claim::Replaced { .. } | Claim::Resumed { .. })
    ) {
        let last_here = node.hub.remove(user.as_str(), sid);
        // The claim's pipeline added the user to this node's user set; a refused user with
        // no other session here leaves it again.
        if last_here
            && matches!(claim, Ok(Claim::Refused { .. }))
            && let Err(e) = node.presence.release(user, sid, true).await
        {
            tracing::warn!(user = %user, error = %e, "could not undo a refused claim");
        }
    }
    match claim {
        Err(e) => {
            tracing::warn!(user = %user, error = %e, "claim failed; refusing connection");
            Err(NotClaimed::Bus)
        }
        Ok(Claim::Refused { holders }) => {
            tracing::debug!(user = %user, ?holders, "refused: not unique session");
            metrics::counter!("wsbus_connections_refused_total", "reason" => "not_unique")
                .increment(1);
            ClientError::NotUniqueSession.count();
            Err(NotClaimed::NotUnique)
        }
        Ok(Claim::Claimed) => Ok(Vec::new()),
        Ok(Claim::Replaced { evicted }) => Ok(evicted),
        Ok(Claim::Resumed { evicted }) => {
            metrics::counter!("wsbus_sessions_resumed_total").increment(1);
            Ok(evicted)
        }
    }
}

/// Closes the sessions a claim replaced or a resume took over (4006), wherever they are; a
/// session on a node known dead has nobody to close it.
async fn close_replaced(node: &Node, user: &UserId, evicted: &[SessionRef]) {
    for old in evicted {
        metrics::counter!("wsbus_sessions_replaced_total").increment(1);
        if node.live.status(&old.node) == NodeStatus::Dead {
            continue;
        }
        if let Err(e) = node
            .close_session(user.as_str(), old, close::REPLACED_BY_NEWER, "")
            .await
        {
            tracing::warn!(user = %user, node = %old.node, error = %e, "could not close a replaced session");
        }
    }
}

/// `503 bus unavailable`: Redis could not be asked (counted as such).
fn bus_unavailable() -> Refused {
    metrics::counter!("wsbus_connections_refused_total", "reason" => "bus").increment(1);
    Refused::new(StatusCode::SERVICE_UNAVAILABLE, "bus unavailable")
}

/// A connect refused before any upgrade: its status, and a line saying why.
struct Refused {
    status: StatusCode,
    why: Cow<'static, str>,
}

impl Refused {
    fn new(status: StatusCode, why: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            why: why.into(),
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.status, format!("{}\n", self.why)).into_response()
    }
}

/// Claims a session for `user`. A refusal is retried briefly: the session holding the user
/// may be closing right now (a page reload, a reconnect to another node), and its release is
/// one Redis round trip away. A refusal that stands costs the refused client ~350 ms.
async fn claim_patiently(
    node: &Node,
    user: &UserId,
    sid: u64,
    mut resume: ResumeHashes<'_>,
) -> Result<Claim, crate::redis::RedisError> {
    const PATIENCE: [u64; 3] = [50, 100, 200];
    let mut claim = node.presence.claim(user, sid, resume).await?;
    // A refused claim did not take a session over: the secret was wrong or used.
    resume.presented = None;
    for wait_ms in PATIENCE {
        if !matches!(claim, Claim::Refused { .. }) || node.shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        claim = node.presence.claim(user, sid, resume).await?;
    }
    Ok(claim)
}

fn configure(ws: Upgrade, node: &Node) -> Upgrade {
    let c = &node.config;
    ws.config(
        WebSocketConfig::default()
            .max_message_size(Some(c.max_frame_bytes))
            .max_frame_size(Some(c.max_frame_bytes))
            .read_buffer_size(c.ws_read_buffer)
            .write_buffer_size(c.ws_write_buffer)
            .max_write_buffer_size(c.ws_max_write_buffer()),
    )
}

async fn refuse_not_unique(mut socket: Socket, user: UserId) {
    let error = encode_error(user.as_str(), &ClientError::NotUniqueSession.to_string());
    let _ = socket.feed(Message::Text(error.into())).await;
    close_politely(&mut socket, close::NOT_UNIQUE, "not unique session").await;
}

/// The demo chat page and the client module, embedded in the binary.
async fn index_page() -> impl IntoResponse {
    axum::response::Html(include_str!("../../static/index.html"))
}

async fn client_module() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("../../static/wsbus.js"),
    )
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::telemetry::render(),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let shutting_down = node.shutdown.is_cancelled();
    let redis = node.health.redis_ok();
    // The reader returns at least once per block period when healthy.
    let inbox = node.health.inbox_read_within(node.config.inbox_block * 3);
    let mut reasons = Vec::new();
    if shutting_down {
        reasons.push("shutting down");
    }
    if !redis {
        reasons.push("last heartbeat did not reach Redis");
    }
    if !inbox {
        reasons.push("inbox reader has not read within 3 block periods");
    }
    let ready = reasons.is_empty();
    let body = axum::Json(serde_json::json!({
        "ready": ready,
        "node": &*node.id,
        "redis": redis,
        "inbox_reader": inbox,
        "shutting_down": shutting_down,
        "sessions": node.hub.len(),
        "reasons": reasons,
    }));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body).into_response()
}
