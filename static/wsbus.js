/**
 * wsbus.js: a tiny, dependency-free browser client for wsbus (an ES module).
 *
 * Every wsbus node serves this file at `/wsbus.js`. Import it straight from a node, or copy
 * it into your app: it has no dependencies and needs no build step.
 *
 *     import { WsbusClient } from "/wsbus.js";
 *
 *     const bus = new WsbusClient(location.origin, "alice", { reconnect: true });
 *     bus.addEventListener("message", (e) => console.log(`${e.detail.from}: ${e.detail.text}`));
 *     bus.addEventListener("error", (e) => console.warn(e.detail.error));
 *     bus.connect();
 *     // ... once the "open" event has fired:
 *     bus.send("bob", "hello");
 *
 * ## `new WsbusClient(baseUrl, userId, options?)`
 *
 * - `baseUrl`: where the node is: `"http://host:8080"`, `"https://chat.example"` or
 *   `"ws://host:8080"`; a path prefix (for a reverse proxy) is kept: `"https://x/bus/"`
 *   connects to `wss://x/bus/ws/<userId>`. Omitted (`undefined`/`""`): the directory of
 *   the page, so a page served by a node (or behind a proxy's prefix) finds that node.
 * - `userId`: 1–64 characters of `[A-Za-z0-9_.-]`; anything else throws a `TypeError`
 *   (the server would refuse it with HTTP 400, which a browser cannot see).
 * - `options.reconnect` (default `true`): reconnect after the connection drops.
 * - `options.minDelayMs` (default `250`) and `options.maxDelayMs` (default `4000`): the
 *   ceiling of the reconnect delay doubles from `minDelayMs` after each failed attempt, up
 *   to `maxDelayMs`, and each delay is drawn at random between 0 and the ceiling (full
 *   jitter: the first retry comes within 250 ms, and clients dropped together by a node that
 *   died or restarted do not all come back at the same moment). The count starts again
 *   after a connection the node accepted (one that opened and was not refused with 4001).
 * - Session resume: every connection asks for a resume secret (`?resume=`); the node's
 *   first frame, `welcome`, carries it, and the next connection presents it
 *   (`?resume=<secret>`), taking the previous session over at once on any node, whether
 *   that session's node is alive or died (no `not unique session` for one's own stale
 *   session). A secret works once; each `welcome` brings the next. `close()` forgets it.
 * - `options.token`: for nodes that require a signed token: the token (a string), or a
 *   function returning it (or a promise of it), called before every connection attempt so
 *   that a fresh token can be fetched for each reconnect. Sent as `?token=`, since browsers
 *   cannot set headers on a WebSocket; it is not part of `url`. If the function throws,
 *   the attempt counts as a failed connection (a `close` with code 1006 and the reason).
 *   See "Token lifetime" for how a function keeps a connection past its token's `exp`.
 * - `options.urls`: more base URLs (same forms as `baseUrl`), other nodes of the cluster.
 *   The client connects to `baseUrl` first; every reconnect attempt goes to the next node
 *   of `[baseUrl, ...urls]` (wrapping around), so a client whose node died (or is down when
 *   the attempt is made) reaches another one. Any node serves any user; with history on
 *   (below), the messages sent while the client was away are recovered from any node.
 * - `options.staleSessionMs` (default `15000`): after a connection that the node had
 *   accepted drops, a refusal with 4001 (`not unique session`) is taken, for this long, for
 *   the client's own previous session: when its node dies, the cluster counts that session
 *   until it notices the node is gone (`--node-ttl`, 5 s by default). The client then retries
 *   (with the backoff, and without an `error` event) instead of giving up; after this long,
 *   4001 ends reconnecting as usual. `0` turns that off.
 * - `options.WebSocket`: a WebSocket constructor to use instead of `globalThis.WebSocket`.
 *
 * ## Methods and properties
 *
 * - `connect()`: opens the connection (also after `close()`); does nothing if it is already
 *   open or connecting. Returns the client.
 * - `send(to, text)`: sends `text` (a string) to user `to`. Throws an `Error` if the
 *   connection is not open. Delivery is not acknowledged: if `to` is not connected
 *   anywhere, an `error` event follows (`User 'bob' not found`).
 * - `join(room)`: enters room `room` (same alphabet as a user id). Returns a promise of the
 *   `joined` event's detail (`members`: how many users are in it now; the other fields are
 *   about history, see the `joined` event). Joining a room this session is in already is
 *   harmless (the server answers `joined`).
 * - `leave(room)`: leaves `room`; a promise of `{room}`. Rejects with `not in room 'lobby'`
 *   if this session is not in it.
 * - `members(room)`: a promise of `{room, users, truncated}`: the users in `room`, sorted;
 *   `truncated` is `true` when the server cut the list. Rejects with `not in room 'lobby'`
 *   unless this session is in the room (only members may read it).
 * - `sendRoom(room, text)`: sends `text` to every other session in `room` (no reply, like
 *   `send()`). Throws an `Error` if the connection is not open or `room` is not in `rooms`.
 * - `rooms`: the rooms this client is in, sorted. The server takes a session out of every
 *   room when it disconnects, so the client keeps the list and joins each room again on
 *   its next connection (the automatic reconnect, or `connect()` after the server closed
 *   the connection): a `joined` event per room; a room it can no longer join (e.g.
 *   `room 'lobby' is full`) is dropped with an `error` event. `close()` forgets them.
 * - `close(code = 1000, reason = "")`: closes the connection and stops reconnecting.
 * - `on(type, handler)`: shorthand for `addEventListener` that calls `handler(detail)`;
 *   returns a function that removes the listener.
 * - `state`: `"idle"` (never connected), `"connecting"`, `"open"`, `"reconnecting"`
 *   (waiting to retry) or `"closed"`.
 * - `userId`: the user id. `url`: the WebSocket URL (without token or `since`) of the node
 *   of the current connection, or of the next attempt; `urls`: those of every node it tries.
 * - `position`: where this client is in its user stream, `{offset, epoch}` (a copy), or
 *   `null` (history off, or not known yet). `roomPositions`: the same per joined room,
 *   `{lobby: {offset, epoch}, ...}`. See "History and recovery".
 * - `historyEnabled`: `true` once a frame showed that the nodes keep history, `false` once
 *   a node said `history is off`, `null` before either.
 *
 * `join`, `leave` and `members` reject at once with an `Error` if the connection is not open
 * and with a `TypeError` for an invalid room id; a promise still pending when the
 * connection closes rejects with `wsbus: connection closed`. The server's error frames carry
 * no request id, so the client matches them like this: the server handles a connection's
 * frames one at a time and answers each `join`/`leave`/`members` (with its reply or an
 * error) before it reads the next frame, so answers come in the order of the requests. The
 * client keeps its pending requests in that order; a reply settles the oldest one if it is
 * of the same action and room, and an error rejects the oldest one if it is an error that
 * request can get: `invalid room id`, `too many rooms`, `room '<room>' is full`,
 * `not allowed to join room '<room>'` (join), `not in room '<room>'` (leave, members), `bus unavailable` and `rate limited` (any). Every other
 * error (e.g. `User 'bob' not found`) is not an answer to a request. The one guess: an
 * earlier `send()`/`sendRoom()` can get `bus unavailable` or `rate limited` too, and if
 * such an error arrives while a request is pending, that request is rejected with it even
 * if the server then carries it out. `rooms` follows the server's `joined`/`left` frames,
 * not the promises, so it stays right in that case. The client's own request for its
 * position (`history`, below) waits in the same queue; what answers it is not passed on as
 * an answer to the app (an `error` event for it has `request: null`).
 *
 * ## History and recovery
 *
 * When the nodes run with `--history N`, every message from a stream (the user's own: direct
 * messages, publishes and relays to the user; or a room's) carries an `offset` (one more per
 * message of that stream) and an `epoch` (changes when the stream's past was lost). The
 * client keeps the offset and epoch of the last message of the user stream (`position`) and
 * of each joined room (`roomPositions`), and after a reconnect it asks for what it missed:
 *
 * - it connects with `?since=<offset>&epoch=<epoch>`; the node sends the user's missed
 *   messages (as `message` events with `replayed: true`), then a `recovered` event;
 * - it joins each of its rooms again with `since`/`epoch`; the node sends the room's missed
 *   messages (`roommessage` events, `replayed: true`), then `joined` (with `recovered`,
 *   `count`) and a `recovered` event for the room.
 *
 * A client that has no position yet (its first connection, or no message came before the
 * drop) asks for it once connected (`{"action":"history","data":{"limit":0}}`) and takes the
 * reply's offset (or a later one it has seen). If the node answers `history is off`, the
 * client stops asking, silently (no `error` event). With history off nothing of this
 * happens and the client behaves as before. A message whose offset the client has had
 * already (same stream and epoch) is dropped, so none shows twice. `close()` forgets the
 * rooms and their positions but keeps the user stream's: a later `connect()` recovers what
 * was sent in between, as far as the nodes keep it (`--history`, `--history-ttl`).
 *
 * When the node cannot recover (`recovered: false`: `reason` is `"epoch"` the stream's past
 * was lost, `"trimmed"` more was sent than it keeps, `"expired"` away longer than it keeps
 * it, `"too_many"` more than `--recover-max`), the messages sent in between are lost to this
 * client: reload the conversation from your backend. Live messages continue either way.
 *
 * ## Token lifetime
 *
 * A node closes a connection with 4008 (`token expired`) when its token's `exp` passes. With
 * `options.token` a function, the client reads `exp` from the token's payload and, about
 * 30 s before it (halfway for a token that lives less than a minute), calls the function
 * and sends the new token (`{"action":"refresh","data":{"token":...}}`); the node answers
 * `refreshed` with the new `exp` (a `refreshed` event) and the connection goes on. A
 * refresh the node refuses answers an `error` event (`invalid token`); after a 4008 the
 * client fetches a new token and reconnects. A string token cannot be refreshed.
 *
 * ## Events (`CustomEvent`s; the fields below are in `event.detail`)
 *
 * - `statechange` `{state}`: `state` changed.
 * - `open` `{url}`: connected (to the node at `url`); messages to this user are delivered
 *   from now on.
 * - `message` `{from, to, text, own, offset, epoch, replayed}`: a message from user `from`
 *   to user `to` (this user). With several sessions per user, what another session of this
 *   user sends arrives here too: `from` is then this user, `to` the recipient, and `own` is
 *   `true`. `offset` and `epoch` are the message's place in the user stream (`null` with
 *   history off, and for the copy of what another session sent); `replayed` is `true` for a
 *   message recovered after a reconnect (sent while this client was away).
 * - `roommessage` `{room, from, text, own, offset, epoch, replayed}`: a message to `room`
 *   from user `from`; `own` is `true` when another session of this user sent it; `offset`,
 *   `epoch` and `replayed` as for `message`, in the room's stream.
 * - `presence` `{room, user, event}`: `event` is `"join"` when `user` entered `room` (its
 *   first session joined) and `"leave"` when it left (its last session left, disconnected
 *   or its node died). Sent to the other members of the room.
 * - `joined` `{room, members, offset, epoch, recovered, count, reason}` and `left` `{room}`:
 *   this session entered or left `room` (the server's replies to `join`/`leave`, including
 *   the re-joins after a reconnect; also when the backend puts this user in a room or takes
 *   it out, `POST /api/join|leave`, or the token's `join` claim). With history on, `offset`/`epoch` are where the room's
 *   stream is (else `null`); for a re-join that recovered, `recovered` (`true`/`false`),
 *   `count` (messages replayed) and `reason` (when `false`) as in `recovered`, else `null`.
 * - `recovered` `{room, recovered, count, reason, offset, epoch}`: the result of recovering
 *   after a reconnect: `room` is `null` for the user stream (after the replayed `message`
 *   events), or the room (after its replayed `roommessage` events, with its `joined`).
 *   `recovered: true`: the `count` missed messages were delivered, none lost. `false`: the
 *   node could not (`reason`, see "History and recovery"); messages were lost.
 *   `offset`/`epoch`: where the stream is now.
 * - `error` `{error, request}`: an error from the server, e.g. `User 'bob' not found`,
 *   `bus unavailable` (the message was not sent) or `not unique session`. `request` is
 *   `{action, room}` when the error was matched to a pending `join`, `leave` or `members`
 *   (whose promise it rejects, see above), otherwise `null`.
 * - `welcome` `{session}`: the node accepted the connection and issued a resume secret
 *   (kept by the client, not shown); `session` is `"<node>:<sid>"`.
 * - `refreshed` `{exp}`: the node took a refreshed token, valid until `exp` (seconds since
 *   the epoch).
 * - `disconnected` `{code, reason}`: the node ended the connection for good and the client
 *   will not reconnect (4001, 4003, 4006, 4007); `reason` is the close frame's (for 4007,
 *   the one the backend gave), or the code's meaning when empty. A `close` event follows.
 * - `close` `{code, reason, wasClean, reconnectInMs}`: the connection closed;
 *   `reconnectInMs` is the delay before the next attempt, or `null` if the client will
 *   not reconnect. Codes: 1000 closed by `close()`, 1001 node shutting down, 1006 dropped
 *   or refused (a browser is not told why: node down, HTTP 401 or 503 ...), 1009 a frame was too
 *   large, 4001 not unique session, 4002 slow consumer, 4003 session replaced,
 *   4004 ping timeout, 4005 rate limit exceeded, 4006 replaced by a newer session,
 *   4007 disconnected by the backend, 4008 token expired.
 *
 * The client does **not** reconnect after close 4001 (`not unique session`: the user holds
 * as many live sessions as the nodes allow; except shortly after a drop, see
 * `options.staleSessionMs`), 4003 (`session replaced`: another session took
 * it over) or 4006 (`replaced by a newer session`: with `--on-session-limit replace`, a
 * newer session of this user closed this one, the oldest), since reconnecting would only
 * fight that session (after 4006 it would replace the next oldest, which would do the same),
 * nor after 4007 (`POST /api/disconnect`: the backend wants this user gone); it reports a
 * `disconnected` event and the close, and goes to `"closed"`. Call `connect()` again to
 * retry deliberately.
 */

/** WebSocket close codes a wsbus node uses. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  TOO_BIG: 1009,
  NOT_UNIQUE: 4001,
  SLOW_CONSUMER: 4002,
  SESSION_REPLACED: 4003,
  PING_TIMEOUT: 4004,
  RATE_LIMITED: 4005,
  REPLACED_BY_NEWER: 4006,
  DISCONNECTED: 4007,
  TOKEN_EXPIRED: 4008,
});

/** Close codes after which reconnecting would only fight another session of the user. */
const NO_RECONNECT = new Set([
  CloseCode.NOT_UNIQUE,
  CloseCode.SESSION_REPLACED,
  CloseCode.REPLACED_BY_NEWER,
  CloseCode.DISCONNECTED,
]);

/** What each close code means, for people. */
export const closeCodeText = Object.freeze({
  1000: "closed",
  1001: "node shutting down",
  1006: "connection lost or refused",
  1009: "frame too large",
  4001: "not unique session",
  4002: "slow consumer",
  4003: "session replaced",
  4004: "ping timeout",
  4005: "rate limit exceeded",
  4006: "replaced by a newer session",
  4007: "disconnected by the server",
  4008: "token expired",
});

const ID = /^[A-Za-z0-9_.-]{1,64}$/;

/** Whether `id` is a valid wsbus user id (also the rule for room ids). */
export function isValidUserId(id) {
  return typeof id === "string" && ID.test(id) && id !== "." && id !== "..";
}

/** Whether `room` is a valid wsbus room id. */
export function isValidRoomId(room) {
  return isValidUserId(room);
}

/**
 * The errors that answer a `history` request when the nodes keep no history: `history is off`,
 * or, from a node older than history, the unknown action.
 */
const HISTORY_OFF = new Set(["history is off", "unknown action 'history'"]);

/** Whether error text `error` can be the server's answer to pending request `req`. */
function answers(req, error) {
  if (error === "bus unavailable" || error === "rate limited") return true;
  switch (req.action) {
    case "history":
      return HISTORY_OFF.has(error);
    case "join":
      return (
        error === "invalid room id" ||
        error === "too many rooms" ||
        error === `room '${req.room}' is full` ||
        error === `not allowed to join room '${req.room}'`
      );
    case "leave":
    case "members":
      return error === `not in room '${req.room}'` || error === "invalid room id";
    default:
      return error === "invalid room id";
  }
}

/** The WebSocket URL of `userId` on the node at `baseUrl` (see the header). */
export function wsUrl(baseUrl, userId) {
  // Relative to the page (so a page under a path prefix finds the node behind it).
  const page = globalThis.location?.href;
  const base = baseUrl ? new URL(baseUrl, page) : new URL(".", page);
  if (base.protocol === "http:") base.protocol = "ws:";
  else if (base.protocol === "https:") base.protocol = "wss:";
  else if (base.protocol !== "ws:" && base.protocol !== "wss:") {
    throw new TypeError(`wsbus: unsupported URL scheme ${base.protocol}`);
  }
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  base.search = "";
  base.hash = "";
  return new URL(`ws/${encodeURIComponent(userId)}`, base).href;
}

/** What `#stamp` returns for a frame this client has had already. */
const DUPLICATE = Symbol("duplicate");

/** `pos` moved to `offset` in `epoch`: the later of the two in one epoch; a new epoch wins. */
function advance(pos, offset, epoch) {
  return pos && pos.epoch === epoch && pos.offset >= offset ? pos : { offset, epoch };
}

/** The `{offset, epoch}` that reply data `d` carries, or `null`. */
function positionOf(d) {
  return Number.isSafeInteger(d.offset) && typeof d.epoch === "string" ? { offset: d.offset, epoch: d.epoch } : null;
}

/** The `recovered` event's detail from a `recovered` or `joined` frame's data. */
function recovery(d, room) {
  const pos = positionOf(d);
  return {
    room,
    recovered: d.recovered === true,
    count: Number.isSafeInteger(d.count) ? d.count : 0,
    reason: typeof d.reason === "string" ? d.reason : null,
    offset: pos?.offset ?? null,
    epoch: pos?.epoch ?? null,
  };
}

/** The fields a `message`/`roommessage` event adds for stamp `s` (see `#stamp`). */
function stampDetail(s) {
  return { offset: s?.offset ?? null, epoch: s?.epoch ?? null, replayed: s?.replayed ?? false };
}

/** The `exp` claim (seconds since the epoch) of JWT `token`, or `null` if it has none. */
export function tokenExp(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "="))).exp;
    return Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** How long before its `exp` a token is refreshed: 30 s, or half of a shorter life. */
function refreshDelayMs(exp) {
  const left = exp * 1000 - Date.now();
  return Math.max(0, left - Math.min(30000, left / 2));
}

/** A wsbus connection for one user; see the file header for the API. */
export class WsbusClient extends EventTarget {
  /** The WebSocket URLs of the nodes to try, in turn (`baseUrl`, then `options.urls`). */
  #urls;
  /** Index in `#urls` of the current connection's node, or of the next attempt's. */
  #index = 0;
  #userId;
  #opts;
  #WebSocket;
  #token;
  #ws = null;
  #gen = 0;
  #state = "idle";
  #attempt = 0;
  #timer = null;
  /** Rooms to be in: joined and not left; re-joined after a reconnect. */
  #rooms = new Set();
  /** Requests sent on this connection and not answered yet, oldest first. */
  #pending = [];
  /** Whether the nodes keep history: `null` until a frame tells (see `historyEnabled`). */
  #history = null;
  /** The user stream's position, `{offset, epoch}`: the `since` of the next connection. */
  #position = null;
  /** Room → its position: the `since` of the room's next re-join. */
  #roomPositions = new Map();
  /**
   * Stream (`null` for the user's, else the room) → `{offset, epoch}` of the last stamped
   * frame received from it. Kept apart from the positions, which also move on replies
   * (`history`, `joined`) that can overtake frames still on their way.
   */
  #seen = new Map();
  /** This connection asked to recover the user stream and its `recovered` has not come. */
  #recovering = false;
  /** Rooms joined again with `since` whose `joined` has not come. */
  #recoveringRooms = new Set();
  /**
   * Until when (`Date.now()` ms) a refusal with 4001 is taken for this user's previous
   * session, still counted on a node that died, and retried (see `options.staleSessionMs`).
   */
  #staleUntil = 0;
  /** The resume secret of the current (or last) session, presented by the next connection. */
  #resume = null;
  /** The timer that refreshes the connection's token before it expires (see "Token lifetime"). */
  #refreshTimer = null;

  constructor(baseUrl, userId, options = {}) {
    super();
    if (!isValidUserId(userId)) {
      throw new TypeError("wsbus: a user id is 1-64 characters of A-Z a-z 0-9 _ . -");
    }
    const minDelayMs = Math.max(1, Number(options.minDelayMs ?? 250));
    this.#opts = {
      reconnect: options.reconnect ?? true,
      minDelayMs,
      maxDelayMs: Math.max(minDelayMs, Number(options.maxDelayMs ?? 4000)),
      staleSessionMs: Math.max(0, Number(options.staleSessionMs ?? 15000)),
    };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#token = options.token ?? null;
    this.#userId = userId;
    const bases = [baseUrl, ...(options.urls ?? [])];
    this.#urls = [...new Set(bases.map((base) => wsUrl(base, userId)))];
  }

  get userId() {
    return this.#userId;
  }

  get url() {
    return this.#urls[this.#index];
  }

  get urls() {
    return [...this.#urls];
  }

  get state() {
    return this.#state;
  }

  get rooms() {
    return [...this.#rooms].sort();
  }

  get position() {
    return this.#position && { ...this.#position };
  }

  get roomPositions() {
    return Object.fromEntries([...this.#roomPositions].map(([room, pos]) => [room, { ...pos }]));
  }

  get historyEnabled() {
    return this.#history;
  }

  connect() {
    if (this.#state === "open" || this.#state === "connecting") return this;
    this.#attempt = 0;
    this.#open();
    return this;
  }

  send(to, text) {
    if (this.#state !== "open") throw new Error(`wsbus: not connected (${this.#state})`);
    const frame = { action: "message", data: { to: String(to), text: String(text) } };
    this.#ws.send(JSON.stringify(frame));
  }

  join(room) {
    return this.#request("join", room);
  }

  leave(room) {
    return this.#request("leave", room);
  }

  members(room) {
    return this.#request("members", room);
  }

  sendRoom(room, text) {
    if (this.#state !== "open") throw new Error(`wsbus: not connected (${this.#state})`);
    room = String(room);
    if (!this.#rooms.has(room)) throw new Error(`wsbus: not in room '${room}' (join it first)`);
    this.#ws.send(JSON.stringify({ action: "room_message", data: { room, text: String(text) } }));
  }

  close(code = CloseCode.NORMAL, reason = "") {
    this.#gen += 1;
    clearTimeout(this.#refreshTimer);
    for (const room of this.#rooms) this.#forgetRoom(room);
    this.#rejectPending();
    this.#recovering = false;
    this.#staleUntil = 0;
    this.#resume = null;
    clearTimeout(this.#timer);
    this.#timer = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
      this.#setState("closed");
      this.#emit("close", { code, reason, wasClean: true, reconnectInMs: null });
    } else if (this.#state !== "closed" && this.#state !== "idle") {
      this.#setState("closed");
    }
  }

  on(type, handler) {
    const listener = (e) => handler(e.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  async #open() {
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#setState("connecting");
    const gen = ++this.#gen;
    // A secret is used once: the next `welcome` brings another.
    const params = [`resume=${this.#resume ?? ""}`];
    this.#resume = null;
    let token = null;
    const since = this.#history === false ? null : this.#position;
    if (since) params.push(`since=${since.offset}`, `epoch=${encodeURIComponent(since.epoch)}`);
    if (this.#token !== null) {
      try {
        token = typeof this.#token === "function" ? await this.#token() : this.#token;
      } catch (e) {
        if (gen === this.#gen) this.#closed(CloseCode.ABNORMAL, `no token: ${e?.message ?? e}`, false);
        return;
      }
      // close() (or another connect()) while the token was being fetched.
      if (gen !== this.#gen || this.#state !== "connecting") return;
      if (token) params.push(`token=${encodeURIComponent(token)}`);
    }
    const url = `${this.url}?${params.join("&")}`;
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (e) {
      this.#closed(CloseCode.ABNORMAL, String(e?.message ?? e), false);
      return;
    }
    this.#ws = ws;
    this.#recovering = since !== null;
    let opened = false;
    ws.onopen = () => {
      if (this.#ws !== ws) return;
      opened = true;
      this.#scheduleRefresh(tokenExp(token));
      this.#setState("open");
      if (this.#position === null && this.#history !== false) this.#askPosition();
      this.#rejoin();
      this.#emit("open", { url: this.url });
    };
    ws.onmessage = (e) => {
      if (this.#ws === ws) this.#frame(e.data);
    };
    ws.onclose = (e) => {
      if (this.#ws === ws) this.#closed(e.code, e.reason, e.wasClean, opened);
    };
    // A failed connection also fires `close` (1006), which is where it is handled.
    ws.onerror = () => {};
  }

  #frame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    const stamp = this.#stamp(frame);
    if (stamp === DUPLICATE) return;
    const d = frame?.data ?? {};
    const from = frame?.from;
    switch (frame?.action) {
      case "message":
        // A message to oneself is incoming; other messages from oneself are another session's.
        this.#emit("message", {
          from,
          to: d.to,
          text: d.text,
          own: from === this.#userId && d.to !== from,
          ...stampDetail(stamp),
        });
        break;
      case "room_message":
        this.#emit("roommessage", {
          room: d.room,
          from,
          text: d.text,
          own: from === this.#userId,
          ...stampDetail(stamp),
        });
        break;
      case "presence":
        this.#emit("presence", { room: d.room, user: from, event: d.event });
        break;
      case "joined":
        this.#joined(d);
        break;
      case "left":
        this.#rooms.delete(d.room);
        this.#forgetRoom(d.room);
        this.#settle("leave", d, { room: d.room });
        this.#emit("left", { room: d.room });
        break;
      case "members":
        this.#settle("members", d, { room: d.room, users: d.users ?? [], truncated: d.truncated === true });
        break;
      case "recovered": {
        this.#recovering = false;
        this.#history = true;
        const result = recovery(d, null);
        // The server's word on where the stream is, also when it could not recover.
        if (result.offset !== null) this.#position = { offset: result.offset, epoch: result.epoch };
        this.#emit("recovered", result);
        break;
      }
      case "history": {
        // Only the user stream's position is asked for (see #askPosition).
        if (d.room != null) break;
        const req = this.#pending[0];
        if (req?.action === "history") {
          this.#pending.shift();
          req.resolve();
        }
        const pos = positionOf(d);
        if (pos) {
          this.#history = true;
          this.#position = advance(this.#position, pos.offset, pos.epoch);
        }
        break;
      }
      case "welcome":
        if (typeof d.resume === "string") this.#resume = d.resume;
        this.#emit("welcome", { session: d.session ?? null });
      case "refreshed":
        this.#scheduleRefresh(d.exp);
        this.#emit("refreshed", { exp: d.exp });
        break;
      case "error":
        this.#error(String(d.error));
        break;
    }
  }

  /**
   * Notes the offset of a stamped frame (top-level `offset` and `epoch`; a top-level `room`
   * names a room's stream, none the user's): `{offset, epoch, replayed}`, `DUPLICATE` for a
   * frame already received, `null` for a frame without offset.
   */
  #stamp(frame) {
    const { offset, epoch } = frame ?? {};
    if (!Number.isSafeInteger(offset) || typeof epoch !== "string") return null;
    const room = typeof frame.room === "string" ? frame.room : null;
    const seen = this.#seen.get(room);
    if (seen && seen.epoch === epoch && offset <= seen.offset) return DUPLICATE;
    this.#seen.set(room, { offset, epoch });
    this.#history = true;
    if (room === null) {
      this.#position = advance(this.#position, offset, epoch);
      return { offset, epoch, replayed: this.#recovering };
    }
    this.#roomPositions.set(room, advance(this.#roomPositions.get(room) ?? null, offset, epoch));
    return { offset, epoch, replayed: this.#recoveringRooms.has(room) };
  }

  /** A `joined` reply: to a `join`, or to a re-join after a reconnect (with its recovery). */
  #joined(d) {
    const room = d.room;
    this.#rooms.add(room);
    this.#recoveringRooms.delete(room);
    const pos = positionOf(d);
    const result = typeof d.recovered === "boolean" ? recovery(d, room) : null;
    if (pos) {
      this.#history = true;
      // After a recovery the reply says where the room is; a plain join only moves forward.
      const known = result ? null : (this.#roomPositions.get(room) ?? null);
      this.#roomPositions.set(room, advance(known, pos.offset, pos.epoch));
    }
    const detail = () => ({
      room,
      members: d.members,
      offset: pos?.offset ?? null,
      epoch: pos?.epoch ?? null,
      recovered: result?.recovered ?? null,
      count: result?.count ?? null,
      reason: result?.reason ?? null,
    });
    this.#settle("join", d, detail());
    this.#emit("joined", detail());
    if (result) this.#emit("recovered", result);
  }

  #error(error) {
    const req = this.#pending[0];
    let request = null;
    if (req && answers(req, error)) {
      this.#pending.shift();
      // A room that cannot be joined again after a reconnect is gone.
      if (req.rejoin) {
        this.#rooms.delete(req.room);
        this.#forgetRoom(req.room);
      }
      req.reject(new Error(error));
      // The position request is the client's own: its errors are not answers to the app.
      if (req.action !== "history") request = { action: req.action, room: req.room };
    }
    if (HISTORY_OFF.has(error)) {
      // The nodes keep no history (or predate it): stop asking, quietly.
      this.#history = false;
      return;
    }
    // Most likely this user's previous session, held for a node that has died (see #closed).
    if (error === "not unique session" && Date.now() < this.#staleUntil) return;
    this.#emit("error", { error, request });
  }

  /** Asks for the user stream's position (`history` with `limit` 0); see `#frame`. */
  #askPosition() {
    const ignore = () => {};
    this.#pending.push({ action: "history", room: null, rejoin: false, resolve: ignore, reject: ignore });
    this.#ws.send(JSON.stringify({ action: "history", data: { limit: 0 } }));
  }

  /** Sends request `action` for `room`; a promise of its reply (see the header). */
  #request(action, room, rejoin = false) {
    if (!isValidRoomId(room)) {
      return Promise.reject(new TypeError("wsbus: a room id is 1-64 characters of A-Z a-z 0-9 _ . -"));
    }
    if (this.#state !== "open") return Promise.reject(new Error(`wsbus: not connected (${this.#state})`));
    const data = { room };
    const since = rejoin && this.#history !== false ? this.#roomPositions.get(room) : undefined;
    if (since) {
      data.since = since.offset;
      data.epoch = since.epoch;
      this.#recoveringRooms.add(room);
    }
    return new Promise((resolve, reject) => {
      this.#pending.push({ action, room, rejoin, resolve, reject });
      this.#ws.send(JSON.stringify({ action, data }));
    });
  }

  /** Resolves the oldest pending request with `value` if `data` is its reply. */
  #settle(action, data, value) {
    const req = this.#pending[0];
    // Otherwise its request was already rejected by an ambiguous error (see the header).
    if (req && req.action === action && req.room === data.room) {
      this.#pending.shift();
      req.resolve(value);
    }
  }

  /** Joins every room in `rooms` again on a new connection, from where each was left. */
  #rejoin() {
    for (const room of this.#rooms) {
      // Failures are reported by the error event (and drop the room, see #error).
      this.#request("join", room, true).catch(() => {});
    }
  }

  /** Drops what the client knows of `room`'s stream (when it is no longer in it). */
  #forgetRoom(room) {
    this.#rooms.delete(room);
    this.#roomPositions.delete(room);
    this.#seen.delete(room);
    this.#recoveringRooms.delete(room);
  }

  #rejectPending() {
    const pending = this.#pending;
    this.#pending = [];
    for (const req of pending) req.reject(new Error("wsbus: connection closed"));
  }

  /** The connection closed; `opened`: it had opened (the node accepted it, or refused it late). */
  #closed(code, reason, wasClean, opened = false) {
    this.#ws = null;
    clearTimeout(this.#refreshTimer);
    this.#rejectPending();
    this.#recovering = false;
    this.#recoveringRooms.clear();
    const now = Date.now();
    if (opened && code !== CloseCode.NOT_UNIQUE) {
      // A session that was accepted: the backoff starts again. If its node died, the
      // cluster counts the session until it notices (the node TTL), so for a while a
      // refusal (4001) is most likely this very session.
      this.#attempt = 0;
      this.#staleUntil = now + this.#opts.staleSessionMs;
    }
    const stale = code === CloseCode.NOT_UNIQUE && now < this.#staleUntil;
    const final = NO_RECONNECT.has(code) && !stale;
    let delay = null;
    if (this.#opts.reconnect && !final) {
      const { minDelayMs, maxDelayMs } = this.#opts;
      const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(this.#attempt, 30));
      delay = Math.round(Math.random() * ceiling);
      this.#attempt += 1;
      // Each attempt goes to the next node in the list: the last one may be down.
      this.#index = (this.#index + 1) % this.#urls.length;
    }
    this.#setState(delay === null ? "closed" : "reconnecting");
    if (final) this.#emit("disconnected", { code, reason: reason || closeCodeText[code] || "" });
    this.#emit("close", { code, reason, wasClean, reconnectInMs: delay });
    if (delay !== null && this.#state === "reconnecting") {
      this.#timer = setTimeout(() => this.#open(), delay);
    }
  }

  /** Refreshes the token about 30 s before `exp` (only a token function can give a new one). */
  #scheduleRefresh(exp) {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (typeof this.#token !== "function" || !Number.isFinite(exp)) return;
    const ws = this.#ws;
    this.#refreshTimer = setTimeout(async () => {
      let token;
      try {
        token = await this.#token();
      } catch (e) {
        this.#emit("error", { error: `no token: ${e?.message ?? e}`, request: null });
        return;
      }
      // A new connection has its own timer; a failed refresh ends in 4008 and a reconnect.
      if (this.#ws === ws && this.#state === "open" && token) {
        ws.send(JSON.stringify({ action: "refresh", data: { token: String(token) } }));
      }
    }, refreshDelayMs(exp));
  }

  #setState(state) {
    if (state === this.#state) return;
    this.#state = state;
    this.#emit("statechange", { state });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
