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
 * - `options.minDelayMs` (default `500`) and `options.maxDelayMs` (default `30000`): the
 *   reconnect delay doubles from `minDelayMs` after each failed attempt, up to `maxDelayMs`,
 *   and each delay is drawn at random between half of it and all of it (jitter, so that
 *   clients dropped together by a restarting node do not all come back at the same
 *   moment). The count starts again once a connection opens.
 * - `options.token`: for nodes that require a signed token: the token (a string), or a
 *   function returning it (or a promise of it), called before every connection attempt so
 *   that a fresh token can be fetched for each reconnect. Sent as `?token=`, since browsers
 *   cannot set headers on a WebSocket; it is not part of `url`. If the function throws,
 *   the attempt counts as a failed connection (a `close` with code 1006 and the reason).
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
 *   `joined` reply's data, `{room, members}` (`members`: how many users are in it now).
 *   Joining a room this session is in already is harmless (the server answers `joined`).
 * - `leave(room)`: leaves `room`; a promise of `{room}`. Rejects with `not in room 'lobby'`
 *   if this session is not in it.
 * - `members(room)`: a promise of `{room, users, truncated}`: the users in `room`, sorted;
 *   `truncated` is `true` when the server cut the list. Works for any room, joined or not.
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
 * - `userId`, `url`: the user id and the WebSocket URL (without the token).
 *
 * `join`, `leave` and `members` reject at once with an `Error` if the connection is not open
 * and with a `TypeError` for an invalid room id; a promise still pending when the
 * connection closes rejects with `wsbus: connection closed`. The server's error frames carry
 * no request id, so the client matches them like this: the server handles a connection's
 * frames one at a time and answers each `join`/`leave`/`members` (with its reply or an
 * error) before it reads the next frame, so answers come in the order of the requests. The
 * client keeps its pending requests in that order; a reply settles the oldest one if it is
 * of the same action and room, and an error rejects the oldest one if it is an error that
 * request can get: `invalid room id`, `too many rooms`, `room '<room>' is full` (join),
 * `not in room '<room>'` (leave), `bus unavailable` and `rate limited` (any). Every other
 * error (e.g. `User 'bob' not found`) is not an answer to a request. The one guess: an
 * earlier `send()`/`sendRoom()` can get `bus unavailable` or `rate limited` too, and if
 * such an error arrives while a request is pending, that request is rejected with it even
 * if the server then carries it out. `rooms` follows the server's `joined`/`left` frames,
 * not the promises, so it stays right in that case.
 *
 * ## Events (`CustomEvent`s; the fields below are in `event.detail`)
 *
 * - `statechange` `{state}`: `state` changed.
 * - `open` `{url}`: connected; messages to this user are delivered from now on.
 * - `message` `{from, to, text, own}`: a message from user `from` to user `to` (this user).
 *   With several sessions per user, what another session of this user sends arrives here
 *   too: `from` is then this user, `to` the recipient, and `own` is `true`.
 * - `roommessage` `{room, from, text, own}`: a message to `room` from user `from`; `own`
 *   is `true` when another session of this user sent it.
 * - `presence` `{room, user, event}`: `event` is `"join"` when `user` entered `room` (its
 *   first session joined) and `"leave"` when it left (its last session left, disconnected
 *   or its node died). Sent to the other members of the room.
 * - `joined` `{room, members}` and `left` `{room}`: this session entered or left `room`
 *   (the server's replies to `join`/`leave`, including the re-joins after a reconnect).
 * - `error` `{error, request}`: an error from the server, e.g. `User 'bob' not found`,
 *   `bus unavailable` (the message was not sent) or `not unique session`. `request` is
 *   `{action, room}` when the error was matched to a pending `join`, `leave` or `members`
 *   (whose promise it rejects, see above), otherwise `null`.
 * - `close` `{code, reason, wasClean, reconnectInMs}`: the connection closed;
 *   `reconnectInMs` is the delay before the next attempt, or `null` if the client will
 *   not reconnect. Codes: 1000 closed by `close()`, 1001 node shutting down, 1006 dropped
 *   or refused (a browser is not told why: node down, HTTP 401 or 503 ...), 1009 a frame was too
 *   large, 4001 not unique session, 4002 slow consumer, 4003 session replaced,
 *   4004 ping timeout, 4005 rate limit exceeded, 4006 replaced by a newer session.
 *
 * The client does **not** reconnect after close 4001 (`not unique session`: the user holds
 * as many live sessions as the nodes allow), 4003 (`session replaced`: another session took
 * it over) or 4006 (`replaced by a newer session`: with `--on-session-limit replace`, a
 * newer session of this user closed this one, the oldest), since reconnecting would only
 * fight that session (after 4006 it would replace the next oldest, which would do the same);
 * it reports the close and goes to `"closed"`. Call `connect()` again to retry deliberately.
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
});

/** Close codes after which reconnecting would only fight another session of the user. */
const NO_RECONNECT = new Set([CloseCode.NOT_UNIQUE, CloseCode.SESSION_REPLACED, CloseCode.REPLACED_BY_NEWER]);

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

/** Whether error text `error` can be the server's answer to pending request `req`. */
function answers(req, error) {
  if (error === "bus unavailable" || error === "rate limited") return true;
  switch (req.action) {
    case "join":
      return (
        error === "invalid room id" || error === "too many rooms" || error === `room '${req.room}' is full`
      );
    case "leave":
      return error === `not in room '${req.room}'`;
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

/** A wsbus connection for one user; see the file header for the API. */
export class WsbusClient extends EventTarget {
  #url;
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

  constructor(baseUrl, userId, options = {}) {
    super();
    if (!isValidUserId(userId)) {
      throw new TypeError("wsbus: a user id is 1-64 characters of A-Z a-z 0-9 _ . -");
    }
    const minDelayMs = Math.max(1, Number(options.minDelayMs ?? 500));
    this.#opts = {
      reconnect: options.reconnect ?? true,
      minDelayMs,
      maxDelayMs: Math.max(minDelayMs, Number(options.maxDelayMs ?? 30000)),
    };
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#token = options.token ?? null;
    this.#userId = userId;
    this.#url = wsUrl(baseUrl, userId);
  }

  get userId() {
    return this.#userId;
  }

  get url() {
    return this.#url;
  }

  get state() {
    return this.#state;
  }

  get rooms() {
    return [...this.#rooms].sort();
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
    this.#rooms.clear();
    this.#rejectPending();
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
    let url = this.#url;
    if (this.#token !== null) {
      let token;
      try {
        token = typeof this.#token === "function" ? await this.#token() : this.#token;
      } catch (e) {
        if (gen === this.#gen) this.#closed(CloseCode.ABNORMAL, `no token: ${e?.message ?? e}`, false);
        return;
      }
      // close() (or another connect()) while the token was being fetched.
      if (gen !== this.#gen || this.#state !== "connecting") return;
      if (token) url += `?token=${encodeURIComponent(token)}`;
    }
    let ws;
    try {
      ws = new this.#WebSocket(url);
    } catch (e) {
      this.#closed(CloseCode.ABNORMAL, String(e?.message ?? e), false);
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      if (this.#ws !== ws) return;
      this.#attempt = 0;
      this.#setState("open");
      this.#rejoin();
      this.#emit("open", { url: this.#url });
    };
    ws.onmessage = (e) => {
      if (this.#ws === ws) this.#frame(e.data);
    };
    ws.onclose = (e) => {
      if (this.#ws === ws) this.#closed(e.code, e.reason, e.wasClean);
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
    const d = frame?.data ?? {};
    const from = frame?.from;
    switch (frame?.action) {
      case "message":
        // A message to oneself is incoming; other messages from oneself are another session's.
        this.#emit("message", { from, to: d.to, text: d.text, own: from === this.#userId && d.to !== from });
        break;
      case "room_message":
        this.#emit("roommessage", { room: d.room, from, text: d.text, own: from === this.#userId });
        break;
      case "presence":
        this.#emit("presence", { room: d.room, user: from, event: d.event });
        break;
      case "joined":
        this.#rooms.add(d.room);
        this.#settle("join", d, { room: d.room, members: d.members });
        this.#emit("joined", { room: d.room, members: d.members });
        break;
      case "left":
        this.#rooms.delete(d.room);
        this.#settle("leave", d, { room: d.room });
        this.#emit("left", { room: d.room });
        break;
      case "members":
        this.#settle("members", d, { room: d.room, users: d.users ?? [], truncated: d.truncated === true });
        break;
      case "error": {
        const error = String(d.error);
        const req = this.#pending[0];
        let request = null;
        if (req && answers(req, error)) {
          this.#pending.shift();
          // A room that cannot be joined again after a reconnect is gone.
          if (req.rejoin) this.#rooms.delete(req.room);
          req.reject(new Error(error));
          request = { action: req.action, room: req.room };
        }
        this.#emit("error", { error, request });
        break;
      }
    }
  }

  /** Sends request `action` for `room`; a promise of its reply (see the header). */
  #request(action, room, rejoin = false) {
    if (!isValidRoomId(room)) {
      return Promise.reject(new TypeError("wsbus: a room id is 1-64 characters of A-Z a-z 0-9 _ . -"));
    }
    if (this.#state !== "open") return Promise.reject(new Error(`wsbus: not connected (${this.#state})`));
    return new Promise((resolve, reject) => {
      this.#pending.push({ action, room, rejoin, resolve, reject });
      this.#ws.send(JSON.stringify({ action, data: { room } }));
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

  /** Joins every room in `rooms` again on a new connection. */
  #rejoin() {
    for (const room of this.#rooms) {
      // Failures are reported by the error event (and drop the room, see #frame).
      this.#request("join", room, true).catch(() => {});
    }
  }

  #rejectPending() {
    const pending = this.#pending;
    this.#pending = [];
    for (const req of pending) req.reject(new Error("wsbus: connection closed"));
  }

  #closed(code, reason, wasClean) {
    this.#ws = null;
    this.#rejectPending();
    const final = NO_RECONNECT.has(code);
    let delay = null;
    if (this.#opts.reconnect && !final) {
      const { minDelayMs, maxDelayMs } = this.#opts;
      const ceiling = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(this.#attempt, 30));
      delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
      this.#attempt += 1;
    }
    this.#setState(delay === null ? "closed" : "reconnecting");
    this.#emit("close", { code, reason, wasClean, reconnectInMs: delay });
    if (delay !== null && this.#state === "reconnecting") {
      this.#timer = setTimeout(() => this.#open(), delay);
    }
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
