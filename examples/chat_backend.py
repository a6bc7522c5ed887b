#!/usr/bin/env python3
"""A chat backend for wsbus, in Python with the `redis` package only (pip install redis).

It hears what users do through the events stream (nodes run with `--events all`) and
answers through the ingress stream, with no HTTP server of its own:

- reads the events stream as a member of a consumer group (at-least-once: an event is
  acknowledged with XACK only after it was handled, and handling is idempotent: a stored
  message is keyed by its entry id, so an event read twice after a crash is stored once);
- stores every chat message (`message`, `room_message`) in SQLite;
- joins each user to the lobby room on `connect` (a server-side join through the ingress
  stream: every live session of the user joins, and gets `joined`), and greets the lobby
  when the `join` event says the user is in (so the newcomer gets the greeting too);
- answers the backend action `stats` (nodes run with `--backend-actions stats`): the user
  gets a `stats` frame with how many of its messages are stored.

Run a dev cluster with events and the action on, then this backend:

    wsbus dev --events all --backend-actions stats
    python3 examples/chat_backend.py --redis-url redis://127.0.0.1:<port> --db chat.db

With `--events-shards N` on the nodes, give the same `--shards N` here. Stop it with Ctrl-C
(or SIGTERM); it finishes the event in hand first. Docs: docs/backend.md.
"""

import argparse
import json
import signal
import sqlite3
import sys
import time

import redis

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    entry   TEXT PRIMARY KEY,  -- the event's stream entry id: storing twice is a no-op
    ts      INTEGER NOT NULL,  -- when the node took it (ms since the epoch)
    sender  TEXT NOT NULL,
    to_user TEXT,              -- a direct message
    room    TEXT,              -- a room message
    text    TEXT NOT NULL
);
"""


class Backend:
    def __init__(self, args):
        self.r = redis.Redis.from_url(args.redis_url, decode_responses=True)
        self.prefix = args.prefix
        self.group = args.group
        self.consumer = args.consumer
        self.streams = (
            [f"{args.prefix}:events"]
            if args.shards <= 1
            else [f"{args.prefix}:events:{k}" for k in range(args.shards)]
        )
        self.db = sqlite3.connect(args.db)
        self.db.executescript(SCHEMA)
        self.lobby = args.lobby
        self.stopping = False

    def log(self, **fields):
        print(json.dumps(fields), flush=True)

    def create_groups(self):
        for stream in self.streams:
            try:
                # From the start of the stream: events appended before the first run count.
                self.r.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def publish(self, to, action, data, room=False):
        """Sends a frame to every session of user `to` (or to every member of room `to`),
        through the ingress stream."""
        self.r.xadd(
            f"{self.prefix}:ingress",
            {"room" if room else "to": to, "action": action, "data": json.dumps(data)},
        )

    def join(self, user, room):
        """Puts every live session of `user` in `room` (ingress `op join`)."""
        self.r.xadd(f"{self.prefix}:ingress", {"op": "join", "user": user, "room": room})

    def handle(self, entry_id, event):
        kind, user = event.get("type"), event.get("user")
        if kind == "connect":
            self.join(user, self.lobby)
        elif kind == "join" and event.get("room") == self.lobby:
            # Ingress entries are shared out among the nodes, so a publish written right
            # after the join could overtake it: the `join` event says the user is in.
            self.publish(self.lobby, "greeting", {"text": f"{user} joined the lobby"}, room=True)
        elif kind in ("message", "room_message"):
            data = json.loads(event["data"])
            with self.db:
                self.db.execute(
                    "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                    (entry_id, int(event["ts"]), user, event.get("to"), event.get("room"),
                     data.get("text", "")),
                )
        elif kind == "action" and event.get("action") == "stats":
            (stored,) = self.db.execute(
                "SELECT COUNT(*) FROM messages WHERE sender = ?", (user,)
            ).fetchone()
            self.publish(user, "stats", {"stored": stored})
        self.log(handled=kind, user=user, entry=entry_id)

    def read(self, start, block_ms):
        """One round of reads: `start` is "0" (this consumer's pending events, after a
        crash) or ">" (new ones). One stream blocks; shards are read in turn."""
        block = block_ms if len(self.streams) == 1 else None
        got = 0
        for stream in self.streams:
            reply = self.r.xreadgroup(
                self.group, self.consumer, {stream: start}, count=100, block=block
            )
            for _, entries in reply or []:
                for entry_id, event in entries:
                    self.handle(entry_id, event)
                    self.r.xack(stream, self.group, entry_id)
                    got += 1
        return got

    def run(self):
        self.create_groups()
        while self.read("0", None) > 0:
            pass
        self.log(ready=True, streams=self.streams, group=self.group)
        while not self.stopping:
            if self.read(">", 1000) == 0 and len(self.streams) > 1:
                time.sleep(0.2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    p.add_argument("--prefix", default="wsbus")
    p.add_argument("--shards", type=int, default=1, help="the nodes' --events-shards")
    p.add_argument("--group", default="chat-backend")
    p.add_argument("--consumer", default="backend-1")
    p.add_argument("--db", default="chat.db", help="SQLite file")
    p.add_argument("--lobby", default="lobby", help="the room every user joins on connect")
    backend = Backend(p.parse_args())

    def stop(*_):
        backend.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backend.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
