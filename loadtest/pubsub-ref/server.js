// pubsub-ref: a lean reference node speaking wsbus's client protocol over Redis pub/sub, for
// benchmarks only (`loadtest/bench.sh` and `loadtest/ab.sh` with PEER=pubsub / BASE_REV=pubsub).
// It is not the product and keeps none of its guarantees: no auth (a `?token=` is ignored), no
// history, no dead-node cleanup, no rate limits or slow-consumer handling, one session per user
// checked on this node only. What it does (see loadtest/README.md, "pub/sub reference"):
//
// - `GET /ws/<user>`: the user is written to the hash `<P>:users` (user -> node id) before the
//   upgrade completes, and removed when it disconnects.
// - `message`: a recipient on this node gets the frame directly (no Redis). Otherwise the
//   recipient's node comes from a route cache (`ROUTE_TTL_MS`, filled by `HGET <P>:users`),
//   and the frame is `PUBLISH`ed on that node's channel `<P>:node:<id>`. A node that no
//   longer holds the recipient answers `User '<id>' not found` to the sender's node, which
//   tells the sender and forgets the route.
// - rooms: members are in the hash `<P>:room:<room>` (user -> node; its length is `joined`'s
//   `members`); a node subscribes to the room's channel `<P>:room:<room>` while it has a
//   member. A room message goes to the sender node's other members directly and is published
//   once on the room channel; every other subscribed node delivers it to its members (the
//   sender's node gets its own publish back and drops it). Presence join/leave events go the
//   same way.
'use strict';

const http = require('node:http');
const { WebSocketServer } = require('ws');
const { createClient } = require('redis');

const ROUTE_TTL_MS = 5000;
const ID = /^[A-Za-z0-9_.-]{1,64}$/;

function parseArgs(argv) {
  const opts = { bind: '127.0.0.1:8080', nodeId: `ref-${process.pid}`, redisUrl: 'redis://127.0.0.1:6379', prefix: 'ref' };
  for (let i = 2; i < argv.length; i += 2) {
    const [k, v] = [argv[i], argv[i + 1]];
    if (v === undefined) throw new Error(`${k} needs a value`);
    if (k === '--bind') opts.bind = v;
    else if (k === '--node-id') opts.nodeId = v;
    else if (k === '--redis-url') opts.redisUrl = v;
    else if (k === '--prefix') opts.prefix = v;
    else throw new Error(`unknown option ${k} (--bind HOST:PORT --node-id ID --redis-url URL --prefix P)`);
  }
  return opts;
}

const validId = (s) => typeof s === 'string' && ID.test(s) && s !== '.' && s !== '..';

async function main() {
  const opts = parseArgs(process.argv);
  const P = opts.prefix;
  const me = opts.nodeId;
  const usersKey = `${P}:users`;
  const nodeChannel = (node) => `${P}:node:${node}`;
  const roomKey = (room) => `${P}:room:${room}`;

  const redis = createClient({ url: opts.redisUrl });
  const sub = redis.duplicate();
  for (const c of [redis, sub]) c.on('error', (e) => console.error(`redis: ${e.message}`));
  await Promise.all([redis.connect(), sub.connect()]);

  /** user -> { user, ws, rooms: Set<room> } on this node. */
  const sessions = new Map();
  /** room -> Set of this node's sessions in it. */
  const rooms = new Map();
  /** room -> the SUBSCRIBE of its channel (a promise while it is under way). */
  const roomSubs = new Map();
  /** user -> { node, until } or { pending: Promise<node|null> }: callers queue on a pending
   *  lookup in order, so one sender's messages to one user keep their order. */
  const routes = new Map();

  const frame = (from, action, data) => JSON.stringify({ from, action, data });
  // Fire-and-forget commands: a failure is logged, never an unhandled rejection.
  const bg = (p) => p.catch((e) => console.error(`redis: ${e.message}`));
  const sendError = (s, text) => s.ws.send(frame(s.user, 'error', { error: text }));

  // Direct messages from other nodes: `M<from node>\t<sender>\t<to>\n<frame>`; a miss goes
  // back to the sender's node as `N<from node>\t<sender>\t<to>`.
  await sub.subscribe(nodeChannel(me), (msg) => {
    const nl = msg.indexOf('\n');
    const [node, from, to] = msg.slice(1, nl < 0 ? msg.length : nl).split('\t');
    if (msg[0] === 'M') {
      const s = sessions.get(to);
      if (s) s.ws.send(msg.slice(nl + 1));
      else bg(redis.publish(nodeChannel(node), `N${me}\t${from}\t${to}`));
    } else if (msg[0] === 'N') {
      routes.delete(to);
      const s = sessions.get(from);
      if (s) sendError(s, `User '${to}' not found`);
    }
  });

  function publishTo(node, from, to, out) {
    bg(redis.publish(nodeChannel(node), `M${me}\t${from}\t${to}\n${out}`));
  }

  function direct(s, to, text) {
    const out = frame(s.user, 'message', { to, text });
    const local = sessions.get(to);
    if (local) {
      local.ws.send(out);
      return;
    }
    let r = routes.get(to);
    if (r && !r.pending && r.until < Date.now()) r = undefined;
    if (!r) {
      const pending = redis.hGet(usersKey, to).then((node) => {
        if (node && node !== me) routes.set(to, { node, until: Date.now() + ROUTE_TTL_MS });
        else routes.delete(to);
        return node;
      });
      r = { pending };
      routes.set(to, r);
    }
    if (!r.pending) return publishTo(r.node, s.user, to, out);
    bg(
      r.pending.then((node) => {
        if (!node || node === me) sendError(s, `User '${to}' not found`);
        else publishTo(node, s.user, to, out);
      }),
    );
  }

  // Room channel messages: `<from node>\t<sender>\n<frame>`.
  function onRoomMessage(room, msg) {
    const nl = msg.indexOf('\n');
    const [node, from] = msg.slice(0, nl).split('\t');
    if (node === me) return;
    deliverLocal(room, from, msg.slice(nl + 1));
  }

  function deliverLocal(room, except, out) {
    const members = rooms.get(room);
    if (!members) return;
    for (const m of members) if (m.user !== except) m.ws.send(out);
  }

  function toRoom(room, from, out) {
    deliverLocal(room, from, out);
    bg(redis.publish(roomKey(room), `${me}\t${from}\n${out}`));
  }

  async function join(s, room) {
    if (s.rooms.has(room)) {
      const members = await redis.hLen(roomKey(room));
      s.ws.send(frame(s.user, 'joined', { room, members }));
      return;
    }
    s.rooms.add(room);
    // In the local set before the subscription lands: a message right behind the SUBSCRIBE
    // reply finds the member.
    let set = rooms.get(room);
    if (!set) rooms.set(room, (set = new Set()));
    set.add(s);
    let subscribed = roomSubs.get(room);
    if (!subscribed) {
      subscribed = sub.subscribe(roomKey(room), (msg) => onRoomMessage(room, msg));
      roomSubs.set(room, subscribed);
    }
    const [, members] = await Promise.all([subscribed, redis.hSet(roomKey(room), s.user, me), redis.hLen(roomKey(room))]);
    if (!s.rooms.has(room)) return; // left (or disconnected) meanwhile
    s.ws.send(frame(s.user, 'joined', { room, members }));
    toRoom(room, s.user, frame(s.user, 'presence', { room, event: 'join' }));
  }

  function leave(s, room) {
    s.rooms.delete(room);
    const set = rooms.get(room);
    if (set) {
      set.delete(s);
      if (set.size === 0) {
        rooms.delete(room);
        roomSubs.delete(room);
        bg(sub.unsubscribe(roomKey(room)));
      }
    }
    bg(redis.hDel(roomKey(room), s.user));
    toRoom(room, s.user, frame(s.user, 'presence', { room, event: 'leave' }));
  }

  function onFrame(s, data, isBinary) {
    if (isBinary) return sendError(s, 'binary frames are not supported');
    let f;
    try {
      f = JSON.parse(data.toString());
    } catch {
      return sendError(s, 'invalid JSON');
    }
    if (typeof f !== 'object' || f === null || Array.isArray(f)) return sendError(s, 'frame must be a JSON object');
    const { action, data: d } = f;
    if (action === undefined || action === null) return sendError(s, 'missing action');
    if (typeof action !== 'string') return sendError(s, 'action must be a string');
    if (action === '') return sendError(s, 'empty action');
    const obj = typeof d === 'object' && d !== null && !Array.isArray(d);
    switch (action) {
      case 'message':
        if (!obj || typeof d.to !== 'string' || typeof d.text !== 'string')
          return sendError(s, 'malformed data: expected {"to": "<user id>", "text": "<string>"}');
        if (!validId(d.to)) return sendError(s, 'invalid recipient id');
        return direct(s, d.to, d.text);
      case 'join':
      case 'leave':
        if (!obj || typeof d.room !== 'string') return sendError(s, 'malformed data: expected {"room": "<room id>"}');
        if (!validId(d.room)) return sendError(s, 'invalid room id');
        if (action === 'join') return void join(s, d.room).catch((e) => sendError(s, `bus unavailable (${e.message})`));
        if (!s.rooms.has(d.room)) return sendError(s, `not in room '${d.room}'`);
        leave(s, d.room);
        return s.ws.send(frame(s.user, 'left', { room: d.room }));
      case 'room_message':
        if (!obj || typeof d.room !== 'string' || typeof d.text !== 'string')
          return sendError(s, 'malformed data: expected {"room": "<room id>", "text": "<string>"}');
        if (!validId(d.room)) return sendError(s, 'invalid room id');
        if (!s.rooms.has(d.room)) return sendError(s, `not in room '${d.room}'`);
        return toRoom(d.room, s.user, frame(s.user, 'room_message', { room: d.room, text: d.text }));
      default:
        return sendError(s, `unknown action '${action}'`);
    }
  }

  const wss = new WebSocketServer({ noServer: true, maxPayload: 1 << 20, perMessageDeflate: false, clientTracking: false });
  const server = http.createServer((req, res) => {
    res.writeHead(404).end();
  });
  server.on('upgrade', async (req, socket, head) => {
    const path = req.url.split('?')[0];
    const user = path.startsWith('/ws/') ? decodeURIComponent(path.slice(4)) : '';
    if (!validId(user)) {
      socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    const taken = sessions.has(user);
    if (!taken) {
      // Reachable from every node before the client sees 101.
      try {
        await redis.hSet(usersKey, user, me);
      } catch {
        socket.end('HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
        return;
      }
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      if (taken || sessions.has(user)) {
        ws.send(frame(user, 'error', { error: 'not unique session' }));
        ws.close(4001, 'not unique session');
        return;
      }
      const s = { user, ws, rooms: new Set() };
      sessions.set(user, s);
      ws.on('message', (data, isBinary) => onFrame(s, data, isBinary));
      ws.on('error', () => {});
      ws.on('close', () => {
        sessions.delete(user);
        bg(redis.hDel(usersKey, user));
        for (const room of [...s.rooms]) leave(s, room);
      });
    });
  });
  const colon = opts.bind.lastIndexOf(':');
  server.listen(Number(opts.bind.slice(colon + 1)), opts.bind.slice(0, colon), () => {
    console.error(`pubsub-ref ${me} listening on ${opts.bind}, redis ${opts.redisUrl}, prefix ${P}`);
  });
  const stop = () => {
    for (const s of sessions.values()) s.ws.close(1001, 'going away');
    server.close();
    const users = [...sessions.keys()];
    (users.length ? bg(redis.hDel(usersKey, users)) : Promise.resolve()).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(`pubsub-ref: ${e.stack || e}`);
  process.exit(2);
});
