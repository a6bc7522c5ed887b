//! The HTTP API for backends: publish to users and rooms, disconnect a user, look up users,
//! rooms and nodes. Mounted under `/api/` on the client listener (or on `--admin-bind`)
//! only when `--api-key` is given; every request needs `Authorization: Bearer <key>`.
//!
//! A backend is one more origin of the one dispatch path ([`Origin::Api`]): a publish is
//! validated whole (a batch too, before anything is sent), the recipients are looked up in
//! one pipeline (`HKEYS` per user, `HLEN` per room), each item's frame
//! `{"from":F,"action":A,"data":D}` is encoded once, and [`Node::publish`] delivers it here
//! and hands the rest to the bus writer (one entry per other node). Replies and errors are
//! JSON; an error names the field it is about.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tungstenite::Utf8Bytes;

use crate::cluster::presence::SessionRef;
use crate::delivery::target::{Origin, Target};
use crate::node::Node;
use crate::telemetry::LogSummary;
use crate::wire::client::{RESERVED_ACTIONS, close};
use crate::wire::ids::{RoomId, UserId, is_valid_id};

/// The `from` of a publish that names no user: `@` is outside the id alphabet, so no client
/// can be it, and clients can trust a frame from it.
pub const SERVER_FROM: &str = "@server";

/// How long an `Idempotency-Key` remembers its first reply.
pub const IDEMPOTENCY_TTL_SECS: u64 = 300;

/// Longest `Idempotency-Key` accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Longest `reason` of `/api/disconnect` (a close frame's reason holds 123 bytes).
pub const MAX_REASON_BYTES: usize = 123;

/// Bad API keys logged: the first, then a count every few seconds.
static BAD_KEYS: LogSummary = LogSummary::new(std::time::Duration::from_secs(5));

/// The API's routes, or none without an API key (every `/api/` path is then a 404).
pub fn router(node: Arc<Node>) -> Router {
    if node.config.api_keys.is_empty() {
        return Router::new();
    }
    let failures = Arc::new(AuthFailures::new(
        node.config.api_auth_failure_rate,
        node.config.api_auth_failure_burst,
    ));
    Router::new()
        .route("/api/publish", post(publish))
        .route("/api/disconnect", post(disconnect))
        .route("/api/join", post(join))
        .route("/api/leave", post(leave))
        .route("/api/users/{id}", get(user))
        .route("/api/rooms/{room}", get(room))
        .route("/api/nodes", get(nodes))
        .layer(axum::Extension(failures))
        .with_state(node)
}

/// An API error: an HTTP status and `{"error": "...", "field": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization: Bearer` header, or a key that is not one of `--api-key`.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// The request is not acceptable; `field` names what is wrong.
    #[error("{error}")]
    Invalid {
        /// The field (`to`, `[3].data`, `Idempotency-Key`...), empty for the whole body.
        field: String,
        /// What is wrong with it.
        error: String,
    },
    /// The body is over `--api-max-body-bytes`.
    #[error("body too large (max {0} bytes)")]
    TooLarge(usize),
    /// A publish's frame would be over what a client may receive
    /// ([`crate::config::NodeConfig::max_publish_frame_bytes`]).
    #[error("frame too large (max {limit} bytes)")]
    FrameTooLarge {
        /// The field that makes it large (`data`, `[3].data`).
        field: String,
        /// The largest frame a publish may carry.
        limit: usize,
    },
    /// The same `Idempotency-Key` is being handled by another request right now.
    #[error("a request with this Idempotency-Key is in progress")]
    InProgress,
    /// The `Idempotency-Key` was used (within its 5 minutes) for a request with another body.
    #[error("this Idempotency-Key was used for another request")]
    KeyReused,
    /// The source address failed to authenticate too often (`--api-auth-failure-rate`,
    /// `--api-auth-failure-burst`); nothing was checked.
    #[error("too many failed authentications; retry later")]
    TooManyFailures,
    /// Redis cannot be reached (or the bus writer stopped); nothing was sent.
    #[error("bus unavailable")]
    BusUnavailable,
    /// A server-side join the room's limits refused (`room 'x' is full`, `too many rooms`),
    /// as a client's join would be; `field` names the item's room.
    #[error("{error}")]
    Refused {
        /// The room field (`room`, `[2].room`).
        field: String,
        /// The client error text.
        error: String,
    },
}

impl ApiError {
    fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            error: error.into(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) | ApiError::FrameTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InProgress => StatusCode::CONFLICT,
            ApiError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BusUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Refused { .. } => StatusCode::CONFLICT,
        }
    }

    /// A short label for `wsbus_api_requests_total{status=...}`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Invalid { .. } => "invalid",
            ApiError::TooLarge(_) => "too_large",
            ApiError::FrameTooLarge { .. } => "frame_too_large",
            ApiError::InProgress => "in_progress",
            ApiError::KeyReused => "key_reused",
            ApiError::TooManyFailures => "too_many_failures",
            ApiError::BusUnavailable => "bus_unavailable",
            ApiError::Refused { .. } => "refused",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("wsbus_api_requests_total", "status" => self.kind()).increment(1);
        let mut body = json!({"error": self.to_string()});
        if let ApiError::Invalid { field, .. }
        | ApiError::Refused { field, .. }
        | ApiError::FrameTooLarge { field, .. } = &self
            && !field.is_empty()
        {
            body["field"] = json!(field);
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if self == ApiError::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        }
        response
    }
}

/// Proof that a request carried a valid API key (an extractor every handler takes first).
pub struct Authorized;

impl FromRequestParts<Arc<Node>> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let source = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let failures = parts.extensions.get::<Arc<AuthFailures>>().cloned();
        let limited = source.zip(failures);
        if let Some((ip, failures)) = &limited
            && failures.exhausted(*ip)
        {
            return Err(ApiError::TooManyFailures);
        }
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| {
                let (scheme, key) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            });
        match given {
            // Never log the key itself.
            Some(key) if key_matches(&node.config.api_keys, key) => Ok(Authorized),
            _ => {
                if let Some(more) = BAD_KEYS.note() {
                    tracing::info!(path = %parts.uri.path(), source = ?source, more_since_last_line = more,
                        "API request refused: bad or missing key");
                }
                if let Some((ip, failures)) = &limited {
                    failures.failed(*ip);
                }
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// Failed API authentications per source address: a token bucket each, refilled at `rate`
/// per second up to `burst`. An address with an empty bucket gets 429 without its key being
/// looked at, so guessing keys goes no faster than `rate`.
pub struct AuthFailures {
    rate: f64,
    burst: f64,
    buckets: std::sync::Mutex<HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

/// Addresses tracked at most; past it, those whose bucket is full again are forgotten.
const MAX_TRACKED_SOURCES: usize = 10_000;

impl AuthFailures {
    /// Buckets of `burst` failures, refilled at `rate` per second.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: f64::from(burst.max(1)),
            buckets: Default::default(),
        }
    }

    /// The tokens of `ip`'s bucket now (refilled), updating it.
    fn refill(&self, bucket: &mut (f64, std::time::Instant), now: std::time::Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
        *bucket = ((bucket.0 + elapsed * self.rate).min(self.burst), now);
        bucket.0
    }

    /// Whether `ip` has used up its failures.
    pub fn exhausted(&self, ip: std::net::IpAddr) -> bool {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get_mut(&ip) {
            Some(bucket) => self.refill(bucket, now) < 1.0,
            None => false,
        }
    }

    /// Counts one failed authentication of `ip`.
    pub fn failed(&self, ip: std::net::IpAddr) {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_SOURCES && !buckets.contains_key(&ip) {
            buckets.retain(|_, bucket| self.refill(bucket, now) < self.burst);
        }
        let bucket = buckets.entry(ip).or_insert((self.burst, now));
        let tokens = self.refill(bucket, now);
        bucket.0 = (tokens - 1.0).max(0.0);
    }
}

/// Whether `given` is one of `keys`, in time independent of where they differ (every key
/// is compared, so the time says nothing about which one nearly matched either).
pub fn key_matches(keys: &[String], given: &str) -> bool {
    use subtle::ConstantTimeEq;
    let mut found = subtle::Choice::from(0);
    for key in keys {
        found |= key.as_bytes().ct_eq(given.as_bytes());
    }
    found.into()
}

/// One validated publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Users whose every session gets the frame (distinct, in the order given).
    pub to: Vec<UserId>,
    /// Rooms whose every member gets the frame (distinct, in the order given).
    pub rooms: Vec<RoomId>,
    /// The frame's `from`: `@server` or a user id.
    pub from: Box<str>,
    /// The frame's action.
    pub action: Box<str>,
    /// The frame, encoded once.
    pub frame: Utf8Bytes,
}

/// The reply to one publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// Users handed to the nodes holding their sessions.
    pub sent: Vec<String>,
    /// Users with no live session anywhere.
    pub offline: Vec<String>,
    /// Each room's member count (users in it on any node) when it was sent.
    pub rooms: HashMap<String, u64>,
}

/// What one publish may be, from the node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    /// Most recipients, users and rooms together (`--max-publish-targets`).
    pub max_targets: usize,
    /// Largest frame ([`crate::config::NodeConfig::max_publish_frame_bytes`]).
    pub max_frame_bytes: usize,
}

impl PublishLimits {
    /// The limits of a node with `config`.
    pub fn of(config: &crate::config::NodeConfig) -> Self {
        Self {
            max_targets: config.max_publish_targets as usize,
            max_frame_bytes: config.max_publish_frame_bytes(),
        }
    }
}

/// Parses a publish body: one object, or an array of at most `max_batch` of them (`true`
/// as the second value). The whole body is checked before anything is sent.
pub fn parse_publish(
    body: &[u8],
    max_batch: usize,
    limits: PublishLimits,
) -> Result<(Vec<Publish>, bool), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("", format!("invalid JSON: {e}")))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::invalid("", "empty batch"));
            }
            if items.len() > max_batch {
                return Err(ApiError::invalid(
                    "",
                    format!(
                        "batch of {} items, over the limit of {max_batch}",
                        items.len()
                    ),
                ));
            }
            let items = items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_item(item, &format!("[{i}]."), limits))
                .collect::<Result<_, _>>()?;
            Ok((items, true))
        }
        item => Ok((vec![parse_item(&item, "", limits)?], false)),
    }
}

/// The distinct users (`to`) and rooms (`rooms`) of a publish, at least one and at most
/// `max` together.
fn targets(
    map: &Map<String, Value>,
    at: &str,
    max: usize,
) -> Result<(Vec<UserId>, Vec<RoomId>), ApiError> {
    let field = |name: &str| format!("{at}{name}");
    let over = |name: &str| {
        ApiError::invalid(
            field(name),
            format!("over the limit of {max} recipients (users and rooms together)"),
        )
    };
    let to = id_list(map, "to", &field("to"), UserId::parse, "user id", max)
        .ok_or_else(|| over("to"))??;
    let rooms = id_list(
        map,
        "rooms",
        &field("rooms"),
        RoomId::parse,
        "room id",
        max - to.len(),
    )
    .ok_or_else(|| over("rooms"))??;
    if to.is_empty() && rooms.is_empty() {
        return Err(ApiError::invalid(
            field("to"),
            "no recipient: give `to` (user ids) or `rooms`",
        ));
    }
    Ok((to, rooms))
}

pub(crate) fn parse_item(
    item: &Value,
    at: &str,
    limits: PublishLimits,
) -> Result<Publish, ApiError> {
    let field = |name: &str| format!("{at}{name}");
    let Value::Object(map) = item else {
        return Err(ApiError::invalid(
            at.trim_end_matches('.'),
            "must be a JSON object",
        ));
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "to" | "rooms" | "action" | "data" | "from"))
    {
        return Err(ApiError::invalid(field(unknown), "unknown field"));
    }
    let (to, rooms) = targets(map, at, limits.max_targets)?;
    let action = match map.get("action") {
        None | Some(Value::Null) => return Err(ApiError::invalid(field("action"), "missing")),
        Some(Value::String(a)) if RESERVED_ACTIONS.contains(&a.as_str()) => {
            return Err(ApiError::invalid(
                field("action"),
                format!("`{a}` is a built-in action of the protocol (reserved)"),
            ));
        }
        Some(Value::String(a)) if is_valid_id(a) => a.as_str(),
        Some(_) => {
            return Err(ApiError::invalid(
                field("action"),
                "must be a string of 1-64 letters, digits, `_`, `.` or `-`",
            ));
        }
    };
    let from = match map.get("from") {
        None | Some(Value::Null) => SERVER_FROM,
        Some(Value::String(f)) if is_valid_id(f) => f.as_str(),
        Some(_) => {
            return Err(ApiError::invalid(
                field("from"),
                "must be a user id (or absent, for `@server`)",
            ));
        }
    };
    let empty = Value::Object(Map::new());
    let data = match map.get("data") {
        None => &empty,
        Some(d @ Value::Object(_)) => d,
        Some(_) => return Err(ApiError::invalid(field("data"), "must be a JSON object")),
    };
    let frame = encode_frame(from, action, data);
    if frame.len() > limits.max_frame_bytes {
        return Err(ApiError::FrameTooLarge {
            field: field("data"),
            limit: limits.max_frame_bytes,
        });
    }
    Ok(Publish {
        to,
        rooms,
        from: from.into(),
        action: action.into(),
        frame: frame.into(),
    })
}

/// `{"from":F,"action":A,"data":D}`, the frame every recipient gets.
pub fn encode_frame(from: &str, action: &str, data: &Value) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        from: &'a str,
        action: &'a str,
        data: &'a Value,
    }
    serde_json::to_string(&Frame { from, action, data }).expect("a JSON value serializes")
}

/// The distinct ids of list `name`, in the order given; `None` past `max` of them (found
/// without reading the rest: a long list costs no more than `max` ids).
fn id_list<T: std::hash::Hash + Eq + Clone>(
    map: &Map<String, Value>,
    name: &str,
    field: &str,
    parse: fn(&str) -> Option<T>,
    what: &str,
    max: usize,
) -> Option<Result<Vec<T>, ApiError>> {
    let Some(value) = map.get(name) else {
        return Some(Ok(Vec::new()));
    };
    let Value::Array(items) = value else {
        return Some(Err(ApiError::invalid(
            field,
            format!("must be an array of {what}s"),
        )));
    };
    let mut out = Vec::with_capacity(items.len().min(max));
    let mut seen = std::collections::HashSet::with_capacity(items.len().min(max));
    for item in items {
        let Some(id) = item.as_str().and_then(parse) else {
            return Some(Err(ApiError::invalid(
                field,
                format!("invalid {what}: {item}"),
            )));
        };
        if seen.insert(id.clone()) {
            if out.len() == max {
                return None;
            }
            out.push(id);
        }
    }
    Some(Ok(out))
}

/// Reads the body, refusing one over `--api-max-body-bytes` with 413.
async fn read_body(node: &Node, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = node.config.api_max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    axum::body::to_bytes(body, limit)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| ApiError::TooLarge(limit))
}

async fn publish(
    State(node): State<Arc<Node>>,
    _: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&node, &headers, body).await?;
    let limits = PublishLimits::of(&node.config);
    let (items, batch) = parse_publish(&body, node.config.api_max_batch, limits)?;
    let reply = once(&node, &headers, &body, async {
        let replies = publish_all(&node, &items).await?;
        Ok(match batch {
            true => serde_json::to_string(&replies),
            false => serde_json::to_string(&replies[0]),
        }
        .expect("replies serialize"))
    })
    .await?;
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    metrics::counter!("wsbus_api_published_total").increment(items.len() as u64);
    Ok(json_response(reply))
}

/// Runs `work` once per `Idempotency-Key` (when the request has one): a repeat with the same
/// body gets the first reply, one with another body 422; a failure releases the key, so a
/// retry runs again.
async fn once(
    node: &Node,
    headers: &HeaderMap,
    body: &[u8],
    work: impl Future<Output = Result<String, ApiError>>,
) -> Result<String, ApiError> {
    let idempotency = idempotency_key(node, headers)?;
    // The key remembers which body it was used with: another body under it is refused.
    let hash = body_digest(body);
    if let Some(key) = &idempotency
        && let Some(first) = claim_idempotency(node, key, &hash).await?
    {
        metrics::counter!("wsbus_api_requests_total", "status" => "repeat").increment(1);
        return Ok(first);
    }
    let reply = match work.await {
        Ok(reply) => reply,
        Err(e) => {
            if let Some(key) = &idempotency {
                release_idempotency(node, key).await;
            }
            return Err(e);
        }
    };
    if let Some(key) = &idempotency {
        remember_reply(node, key, &format!("{hash}\n{reply}")).await;
    }
    Ok(reply)
}

/// One validated `POST /api/join` or `/api/leave` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Whose sessions.
    pub user: UserId,
    /// Which room.
    pub room: RoomId,
}

/// The body of `POST /api/join|leave`: one `{"user","room"}` or an array of at most
/// `max_batch` (`true` as the second value), checked whole before anything changes.
pub fn parse_membership(
    body: &[u8],
    max_batch: usize,
) -> Result<(Vec<Membership>, bool), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("", format!("invalid JSON: {e}")))?;
    let (items, batch) = match value {
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("", "empty batch"));
        }
        Value::Array(items) if items.len() > max_batch => {
            return Err(ApiError::invalid(
                "",
                format!(
                    "batch of {} items, over the limit of {max_batch}",
                    items.len()
                ),
            ));
        }
        Value::Array(items) => (items, true),
        item => (vec![item], false),
    };
    let items = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            parse_membership_item(
                item,
                if batch {
                    format!("[{i}].")
                } else {
                    String::new()
                },
            )
        })
        .collect::<Result<_, _>>()?;
    Ok((items, batch))
}

fn parse_membership_item(item: &Value, at: String) -> Result<Membership, ApiError> {
    let field = |name: &str| format!("{at}{name}");
    let Value::Object(map) = item else {
        return Err(ApiError::invalid(
            at.trim_end_matches('.'),
            "must be a JSON object",
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !matches!(k.as_str(), "user" | "room")) {
        return Err(ApiError::invalid(field(unknown), "unknown field"));
    }
    let user = map
        .get("user")
        .and_then(Value::as_str)
        .and_then(UserId::parse)
        .ok_or_else(|| ApiError::invalid(field("user"), "missing or invalid user id"))?;
    let room = map
        .get("room")
        .and_then(Value::as_str)
        .and_then(RoomId::parse)
        .ok_or_else(|| ApiError::invalid(field("room"), "missing or invalid room id"))?;
    Ok(Membership { user, room })
}

async fn join(
    State(node): State<Arc<Node>>,
    _: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    change_membership(node, headers, body, true).await
}

async fn leave(
    State(node): State<Arc<Node>>,
    _: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    change_membership(node, headers, body, false).await
}

/// `POST /api/join|leave`: every live session of each item's user joins (leaves) its room,
/// in order; a refused item stops the batch there (the items before it stay applied).
async fn change_membership(
    node: Arc<Node>,
    headers: HeaderMap,
    body: Body,
    join: bool,
) -> Result<Response, ApiError> {
    let body = read_body(&node, &headers, body).await?;
    let (items, batch) = parse_membership(&body, node.config.api_max_batch)?;
    let reply = once(&node, &headers, &body, async {
        let mut replies = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = if batch { format!("[{i}].") } else { String::new() };
            let sessions = apply_membership(&node, item, join, &at).await?;
            replies.push(json!({"user": item.user.as_str(), "room": item.room.as_str(), "sessions": sessions}));
        }
        Ok(match batch {
            true => Value::Array(replies).to_string(),
            false => replies[0].to_string(),
        })
    })
    .await?;
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    Ok(json_response(reply))
}

/// One server-side join or leave, its refusal as an API error about field `{at}room`.
pub async fn apply_membership(
    node: &Node,
    item: &Membership,
    join: bool,
    at: &str,
) -> Result<u32, ApiError> {
    use crate::wire::client::ClientError;
    match node.change_membership(&item.user, &item.room, join).await {
        Ok(sessions) => Ok(sessions),
        Err(ClientError::BusUnavailable) => Err(ApiError::BusUnavailable),
        Err(refused) => Err(ApiError::Refused {
            field: format!("{at}room"),
            error: refused.to_string(),
        }),
    }
}

fn json_response(body: String) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// Publishes handed to the dispatch path between two yields to the scheduler: a wide
/// fan-out (a batch, or a publish to `--max-publish-targets` recipients) goes in chunks, so
/// it never holds a worker thread for long.
pub const FAN_OUT_CHUNK: usize = 128;

/// Sends validated publishes: one lookup pipeline for every user and room of the request,
/// then each frame through [`Node::publish`] to the online users and the rooms, in chunks
/// of [`FAN_OUT_CHUNK`] that yield.
pub async fn publish_all(node: &Node, items: &[Publish]) -> Result<Vec<Published>, ApiError> {
    let mut users: Vec<&str> = Vec::new();
    let mut rooms: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in items {
        for u in &item.to {
            if seen.insert((false, u.as_str())) {
                users.push(u.as_str());
            }
        }
        for r in &item.rooms {
            if seen.insert((true, r.as_str())) {
                rooms.push(r.as_str());
            }
        }
    }
    let (online, sizes) = look_up(node, &users, &rooms).await.map_err(|e| {
        tracing::warn!(error = %e, "API publish: lookup failed");
        ApiError::BusUnavailable
    })?;
    let born_us = crate::wire::clock::now_us();
    let mut handed = 0;
    let mut replies = Vec::with_capacity(items.len());
    for item in items {
        let mut reply = Published {
            sent: Vec::new(),
            offline: Vec::new(),
            rooms: HashMap::new(),
        };
        let targets = item
            .to
            .iter()
            .map(|u| Target::User(u.as_str().into()))
            .chain(item.rooms.iter().map(|r| Target::Room(r.as_str().into())));
        for target in targets {
            match &target {
                Target::User(user) if !online[&**user] => {
                    reply.offline.push(user.to_string());
                    if node.history.is_none() {
                        continue;
                    }
                    // With history on it is still appended to the user's stream if that is
                    // alive (the user was connected within --history-ttl): it gets it on
                    // reconnect.
                }
                Target::User(user) => reply.sent.push(user.to_string()),
                Target::Room(room) => {
                    reply.rooms.insert(room.to_string(), sizes[&**room]);
                }
            }
            let origin = Origin::Api {
                from: item.from.clone(),
            };
            node.publish(origin, target, (&item.action, false), &item.frame, born_us)
                .await
                .map_err(|_| ApiError::BusUnavailable)?;
            handed += 1;
            if handed % FAN_OUT_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
        }
        replies.push(reply);
    }
    Ok(replies)
}

/// Which users have a live session anywhere, and how many members each room has: one
/// pipeline (`HKEYS` per user, `HLEN` per room). A user with a session here is online
/// whatever Redis says.
async fn look_up<'a>(
    node: &Node,
    users: &[&'a str],
    rooms: &[&'a str],
) -> Result<(HashMap<&'a str, bool>, HashMap<&'a str, u64>), crate::redis::RedisError> {
    let mut online = HashMap::with_capacity(users.len());
    let mut sizes = HashMap::with_capacity(rooms.len());
    let mut asked: Vec<&str> = Vec::with_capacity(users.len());
    for &user in users {
        if node.hub.contains(user) {
            online.insert(user, true);
        } else {
            asked.push(user);
        }
    }
    if asked.is_empty() && rooms.is_empty() {
        return Ok((online, sizes));
    }
    let mut conn = node.redis.shared_conn().await?;
    // A batch may list many recipients (`--api-max-batch` x `--max-publish-targets`, or an
    // ingress read's entries): one bounded pipeline at a time, not one of them all.
    const CHUNK: usize = FAN_OUT_CHUNK * 8;
    let none: &[&str] = &[];
    let chunks = (asked.chunks(CHUNK).map(|users| (users, none)))
        .chain(rooms.chunks(CHUNK).map(|rooms| (none, rooms)));
    let mut found = Ok(());
    for (users, rooms) in chunks {
        found = look_up_in(node, &mut conn, users, rooms, &mut online, &mut sizes).await;
        if found.is_err() {
            break;
        }
    }
    if let Err(e) = &found
        && crate::redis::is_connection_error(e)
    {
        node.redis.reset_shared();
    }
    found.map(|()| (online, sizes))
}

/// The Redis part of [`look_up`], on `conn`.
async fn look_up_in<'a>(
    node: &Node,
    conn: &mut crate::redis::RedisConn,
    asked: &[&'a str],
    rooms: &[&'a str],
    online: &mut HashMap<&'a str, bool>,
    sizes: &mut HashMap<&'a str, u64>,
) -> Result<(), crate::redis::RedisError> {
    let mut pipe = redis::Pipeline::with_capacity(asked.len() + rooms.len());
    for user in asked {
        pipe.cmd("HKEYS").arg(node.keys.user_sessions(user));
    }
    for room in rooms {
        pipe.cmd("HLEN").arg(node.keys.room_members(room));
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let (user_replies, room_replies) = replies.split_at(asked.len());
    for (&user, reply) in asked.iter().zip(user_replies) {
        let fields: Vec<String> = redis::from_redis_value_ref(reply)?;
        let mut live = false;
        for n in crate::cluster::presence::nodes_of(fields) {
            if node.live.is_alive(conn, &n).await? {
                live = true;
                break;
            }
        }
        online.insert(user, live);
    }
    for (&room, reply) in rooms.iter().zip(room_replies) {
        sizes.insert(room, redis::from_redis_value_ref(reply)?);
    }
    Ok(())
}

fn idempotency_key(node: &Node, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key",
                format!("must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            )
        })?;
    Ok(Some(node.keys.idempotency(key)))
}

/// The SHA-256 (hex) of a request body, stored with its `Idempotency-Key`.
fn body_digest(body: &[u8]) -> String {
    crate::cluster::presence::hex(ring::digest::digest(&ring::digest::SHA256, body).as_ref())
}

/// Claims `key` for this request (`SET NX` of `<body hash>\n`, the reply appended once it is
/// stored). Returns the first reply when the key was used before with the same body; refuses
/// one with another body (422), and while its first request is running (409).
async fn claim_idempotency(
    node: &Node,
    key: &str,
    body_hash: &str,
) -> Result<Option<String>, ApiError> {
    let unavailable = |e: crate::redis::RedisError| {
        tracing::warn!(error = %e, "idempotency key lookup failed");
        ApiError::BusUnavailable
    };
    let mut conn = node.redis.conn().await.map_err(unavailable)?;
    let claimed: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(format!("{body_hash}\n"))
        .arg("NX")
        .arg("EX")
        .arg(IDEMPOTENCY_TTL_SECS)
        .query_async(&mut conn)
        .await
        .map_err(|e| unavailable(e.into()))?;
    if claimed.is_some() {
        return Ok(None);
    }
    let first: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .map_err(|e| unavailable(e.into()))?;
    let Some(first) = first else {
        // Its first request failed and released it, or it just expired.
        return Err(ApiError::InProgress);
    };
    // A value without a hash was stored by a node of an earlier version.
    let (hash, reply) = first.split_once('\n').unwrap_or((body_hash, &first));
    if hash != body_hash {
        return Err(ApiError::KeyReused);
    }
    match reply {
        "" => Err(ApiError::InProgress),
        reply => Ok(Some(reply.to_owned())),
    }
}

async fn remember_reply(node: &Node, key: &str, reply: &str) {
    let stored = async {
        let mut conn = node.redis.conn().await?;
        redis::cmd("SET")
            .arg(key)
            .arg(reply)
            .arg("XX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL_SECS)
            .query_async::<()>(&mut conn)
            .await?;
        Ok::<_, crate::redis::RedisError>(())
    };
    if let Err(e) = stored.await {
        tracing::warn!(error = %e, "could not store an idempotent reply");
    }
}

async fn release_idempotency(node: &Node, key: &str) {
    let released = async {
        let mut conn = node.redis.conn().await?;
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut conn)
            .await?;
        Ok::<_, crate::redis::RedisError>(())
    };
    if let Err(e) = released.await {
        tracing::warn!(error = %e, "could not release an idempotency key");
    }
}

/// The body of `POST /api/disconnect`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    user: String,
    #[serde(default)]
    reason: String,
}

async fn disconnect(
    State(node): State<Arc<Node>>,
    _: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&node, &headers, body).await?;
    let request: DisconnectRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(serde_field(&e.to_string()), e.to_string()))?;
    let user =
        UserId::parse(&request.user).ok_or_else(|| ApiError::invalid("user", "invalid user id"))?;
    if request.reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::invalid(
            "reason",
            format!("longer than {MAX_REASON_BYTES} bytes"),
        ));
    }
    let sessions = user_sessions(&node, user.as_str()).await?;
    let mut closed = 0;
    for (session, _) in &sessions {
        match node
            .close_session(user.as_str(), session, close::DISCONNECTED, &request.reason)
            .await
        {
            Ok(()) => closed += 1,
            Err(e) => {
                tracing::warn!(user = %user, node = %session.node, error = %e, "disconnect failed");
                return Err(ApiError::BusUnavailable);
            }
        }
    }
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    Ok(axum::Json(json!({"user": user.as_str(), "sessions": closed})).into_response())
}

/// The field a serde error is about, if its message names one (`missing field `x``).
fn serde_field(message: &str) -> String {
    message
        .split('`')
        .nth(1)
        .filter(|f| is_valid_id(f))
        .unwrap_or("")
        .to_owned()
}

/// The user's sessions on live nodes, with when each connected (ms since the epoch).
async fn user_sessions(node: &Node, user: &str) -> Result<Vec<(SessionRef, u64)>, ApiError> {
    let found = async {
        let mut conn = node.redis.conn().await?;
        let all: Vec<(String, u64)> = redis::cmd("HGETALL")
            .arg(node.keys.user_sessions(user))
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for (field, since_us) in all {
            if let Some(s) = SessionRef::parse(&field)
                && (s.node == *node.id || node.live.is_alive(&mut conn, &s.node).await?)
            {
                out.push((s, since_us / 1000));
            }
        }
        out.sort_by_key(|(s, since)| (*since, s.sid));
        Ok::<_, crate::redis::RedisError>(out)
    };
    found.await.map_err(|e| {
        tracing::warn!(error = %e, "API user lookup failed");
        ApiError::BusUnavailable
    })
}

async fn user(
    State(node): State<Arc<Node>>,
    _: Authorized,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let user = UserId::parse(&id).ok_or_else(|| ApiError::invalid("id", "invalid user id"))?;
    let sessions = user_sessions(&node, user.as_str()).await?;
    let list: Vec<Value> = sessions
        .iter()
        .map(|(s, since)| json!({"node": s.node, "since": since}))
        .collect();
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    Ok(axum::Json(json!({"online": !list.is_empty(), "sessions": list})).into_response())
}

async fn room(
    State(node): State<Arc<Node>>,
    _: Authorized,
    Path(room): Path<String>,
) -> Result<Response, ApiError> {
    let id = RoomId::parse(&room).ok_or_else(|| ApiError::invalid("room", "invalid room id"))?;
    let list = node
        .room_member_list(&id)
        .await
        .map_err(|_| ApiError::BusUnavailable)?;
    let mut data = json!({"room": room, "users": list.users});
    if list.truncated {
        data["truncated"] = json!(true);
    }
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    Ok(axum::Json(data).into_response())
}

async fn nodes(State(node): State<Arc<Node>>, _: Authorized) -> Result<Response, ApiError> {
    let list = crate::cluster::registry::nodes(&node.redis, &node.keys)
        .await
        .map_err(|_| ApiError::BusUnavailable)?;
    metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(1);
    Ok(axum::Json(json!({"nodes": list})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PublishLimits = PublishLimits {
        max_targets: 4,
        max_frame_bytes: 100,
    };

    fn parse(body: &str) -> Result<(Vec<Publish>, bool), ApiError> {
        parse_publish(body.as_bytes(), 3, LIMITS)
    }

    fn field_of(body: &str) -> String {
        match parse(body) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn parses_one_publish_and_encodes_its_frame_once() {
        let (items, batch) = parse(
            r#"{"to":["alice","bob","alice"],"rooms":["lobby"],"action":"notice","data":{"x":1}}"#,
        )
        .unwrap();
        assert!(!batch);
        let item = &items[0];
        assert_eq!(
            item.to.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["alice", "bob"]
        );
        assert_eq!(&*item.from, "@server");
        assert_eq!(
            item.frame.as_str(),
            r#"{"from":"@server","action":"notice","data":{"x":1}}"#
        );
        let (items, _) = parse(r#"{"to":["a"],"action":"n","from":"billing"}"#).unwrap();
        assert_eq!(
            items[0].frame.as_str(),
            r#"{"from":"billing","action":"n","data":{}}"#
        );
    }

    #[test]
    fn names_the_field_of_bad_input() {
        assert_eq!(field_of(r#"{"to":["a"],"action":"n","extra":1}"#), "extra");
        assert_eq!(field_of(r#"{"to":["a b"],"action":"n"}"#), "to");
        assert_eq!(field_of(r#"{"to":"a","action":"n"}"#), "to");
        assert_eq!(field_of(r#"{"rooms":["@x"],"action":"n"}"#), "rooms");
        assert_eq!(field_of(r#"{"to":["a"],"action":"error"}"#), "action");
        assert_eq!(field_of(r#"{"to":["a"]}"#), "action");
        assert_eq!(field_of(r#"{"to":["a"],"action":"n","data":[1]}"#), "data");
        assert_eq!(
            field_of(r#"{"to":["a"],"action":"n","from":"@server"}"#),
            "from"
        );
        assert_eq!(field_of(r#"{"action":"n"}"#), "to");
        assert_eq!(
            field_of(r#"[{"to":["a"],"action":"n"},{"to":["a"],"action":"n","data":"x"}]"#),
            "[1].data"
        );
        assert_eq!(field_of("{"), "");
        assert_eq!(field_of("[1,2,3,4]"), "", "over the batch limit");
        assert_eq!(field_of("[]"), "");
    }

    #[test]
    fn caps_recipients_and_frame_size_per_publish() {
        assert!(parse(r#"{"to":["a","b","a","c"],"rooms":["r"],"action":"n"}"#).is_ok());
        assert_eq!(
            field_of(r#"{"to":["a","b","c","d","e"],"action":"n"}"#),
            "to"
        );
        assert_eq!(
            field_of(r#"{"to":["a","b"],"rooms":["r","s","t"],"action":"n"}"#),
            "rooms"
        );
        let text = parse(r#"{"to":["a","b","c","d","e"],"action":"n"}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            text,
            "over the limit of 4 recipients (users and rooms together)"
        );
        let fits = format!(
            r#"{{"to":["a"],"action":"n","data":{{"x":"{}"}}}}"#,
            "y".repeat(53)
        );
        assert_eq!(parse(&fits).unwrap().0[0].frame.len(), 100);
        let over = format!(
            r#"[{{"to":["a"],"action":"n","data":{{"x":"{}"}}}}]"#,
            "y".repeat(54)
        );
        let err = parse(&over).unwrap_err();
        assert_eq!(
            err,
            ApiError::FrameTooLarge {
                field: "[0].data".into(),
                limit: 100
            }
        );
        assert_eq!(err.to_string(), "frame too large (max 100 bytes)");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn a_batch_is_an_array() {
        let (items, batch) =
            parse(r#"[{"to":["a"],"action":"n"},{"rooms":["r"],"action":"m"}]"#).unwrap();
        assert!(batch);
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn any_of_several_keys_opens_the_api() {
        let keys = vec!["old-key".to_owned(), "new-key".to_owned()];
        assert!(key_matches(&keys, "old-key"));
        assert!(key_matches(&keys, "new-key"));
        assert!(!key_matches(&keys, "new-ke"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "x"));
    }
}
