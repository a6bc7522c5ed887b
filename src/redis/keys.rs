//! The Redis key layout. Every key wsbus touches is named here, under one prefix.
//!
//! | key | type | holds | lifetime |
//! | --- | --- | --- | --- |
//! | `P:nodes` | sorted set | node id → last heartbeat (Redis server time, ms) | member removed by the reaper or on clean shutdown |
//! | `P:node:<id>` | hash | `addr`, `started`, `version` | TTL = node TTL, refreshed every heartbeat |
//! | `P:node:<id>:users` | set | user ids connected to that node | deleted on clean shutdown or by the reaper |
//! | `P:{u:<uid>}:sessions` | hash | `<node>:<sid>` → claimed at (Redis server time, µs), one field per session | field removed on disconnect; the reaper removes a dead node's |
//! | `P:{u:<uid>}:resume` | hash | `h:<sha256 of a resume secret>` → `<node>:<sid>` and `s:<node>:<sid>` → the hash, one pair per session that asked for a secret | pair removed when used or when its session is released; a dead node's stay (to be resumed); the key expires `--resume-ttl` after the last secret issued |
//! | `P:inbox:<id>` | stream | envelopes for that node: single (`from`, `to`, `action`, `env`) or packed (`v`, `n`, `envs`) entries | trimmed as delivered, `MAXLEN ~` cap (entries) per heartbeat; deleted with its node |
//! | `P:{r:<room>}:members` | hash | user → the nodes (space-separated) where it has sessions in the room | field removed when the user's last session leaves; a dead node's removed by the reaper |
//! | `P:{r:<room>}:nodes` | set | nodes with members in the room | member added/removed on a node's first/last member |
//! | `P:node:<id>:rooms` | set | rooms with members on that node | deleted on clean shutdown or by the reaper |
//! | `P:rooms` | set | rooms with members anywhere (for `wsbus rooms`) | member removed when a room's last node leaves |
//! | `P:ingress` | stream | publishes from backends (`to`/`room`, `action`, `data`, `from`), read by the nodes' consumer group `wsbus` | created by the first `XADD`; `MAXLEN ~` cap per claim interval |
//! | `P:idem:<key>` | string | the first reply to an API publish with that `Idempotency-Key` (empty while it runs) | 5 min TTL |
//! | `P:reap:<id>` | string | which node is reaping dead node `<id>` | short TTL |
//! | `P:events` (or `P:events:<k>`, `k = crc32(user) mod --events-shards`) | stream | what users did (`--events`): `type`, `user`, `node`, `session`, `ts` and per type fields, read by backends with consumer groups | created by the first `XADD`; trimmed to about `--events-maxlen` once a second (`XTRIM ... MAXLEN ~`) |

/// Builds key names under a prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (default `wsbus`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P:nodes`: the live-node registry.
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// `P:node:<id>`: a node's description, with the heartbeat TTL.
    pub fn node(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }

    /// `P:node:<id>:users`: the users a node holds.
    pub fn node_users(&self, node: &str) -> String {
        format!("{}:node:{node}:users", self.prefix)
    }

    /// `P:{u:<uid>}:sessions`: where a user's sessions are. Hash-tagged by user, so every
    /// key of one user lives in one Redis Cluster slot.
    pub fn user_sessions(&self, user: &str) -> String {
        let mut key = String::new();
        self.user_sessions_into(user, &mut key);
        key
    }

    /// Writes `P:{u:<uid>}:sessions` into `out` (cleared first), to reuse one buffer on hot
    /// paths.
    pub fn user_sessions_into(&self, user: &str, out: &mut String) {
        self.write_into(":{u:", user, out);
        out.push_str("}:sessions");
    }

    /// `P:{u:<uid>}:resume`: the hashes of the user's sessions' resume secrets, in the
    /// user's slot (beside its sessions, so one function takes a session over).
    pub fn user_resume(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:resume", self.prefix)
    }

    /// Writes `P:inbox:<id>` into `out` (cleared first), to reuse one buffer on hot paths.
    pub fn inbox_into(&self, node: &str, out: &mut String) {
        self.write_into(":inbox:", node, out);
    }

    fn write_into(&self, kind: &str, id: &str, out: &mut String) {
        out.clear();
        out.push_str(&self.prefix);
        out.push_str(kind);
        out.push_str(id);
    }

    /// `P:inbox:<id>`: a node's inbox stream.
    pub fn inbox(&self, node: &str) -> String {
        let mut key = String::new();
        self.inbox_into(node, &mut key);
        key
    }

    /// `P:{r:<room>}:members`: a room's members and their nodes. Hash-tagged by room, like
    /// every key of one room.
    pub fn room_members(&self, room: &str) -> String {
        format!("{}:{{r:{room}}}:members", self.prefix)
    }

    /// `P:{r:<room>}:nodes`: the nodes with members in a room.
    pub fn room_nodes(&self, room: &str) -> String {
        let mut key = String::new();
        self.room_nodes_into(room, &mut key);
        key
    }

    /// Writes `P:{r:<room>}:nodes` into `out` (cleared first).
    pub fn room_nodes_into(&self, room: &str, out: &mut String) {
        self.write_into(":{r:", room, out);
        out.push_str("}:nodes");
    }

    /// `P:{u:<uid>}:history`: a user's history stream (`--history`), in its user's slot.
    pub fn user_history(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:history", self.prefix)
    }

    /// `P:{u:<uid>}:hmeta`: the epoch and top offset of a user's history stream.
    pub fn user_history_meta(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:hmeta", self.prefix)
    }

    /// `P:{r:<room>}:history`: a room's history stream, in its room's slot.
    pub fn room_history(&self, room: &str) -> String {
        format!("{}:{{r:{room}}}:history", self.prefix)
    }

    /// `P:{r:<room>}:hmeta`: the epoch and top offset of a room's history stream.
    pub fn room_history_meta(&self, room: &str) -> String {
        format!("{}:{{r:{room}}}:hmeta", self.prefix)
    }

    /// `P:node:<id>:rooms`: the rooms a node has members in.
    pub fn node_rooms(&self, node: &str) -> String {
        format!("{}:node:{node}:rooms", self.prefix)
    }

    /// `P:rooms`: rooms with members anywhere.
    pub fn rooms(&self) -> String {
        format!("{}:rooms", self.prefix)
    }

    /// `P:ingress`: the stream backends publish through.
    pub fn ingress(&self) -> String {
        format!("{}:ingress", self.prefix)
    }

    /// `P:idem:<key>`: the first reply to an API publish with this `Idempotency-Key`.
    pub fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    /// The events stream of `user`'s events: `P:events` with one shard, else
    /// `P:events:<k>` with `k = crc32(user) mod shards`, so one user's events stay in order
    /// in one stream. Events about no user (`ingress_invalid`) go to shard `crc32("") = 0`.
    pub fn events_for(&self, user: &str, shards: u32) -> String {
        if shards <= 1 {
            return self.events(None);
        }
        self.events(Some(crc32fast::hash(user.as_bytes()) % shards))
    }

    /// `P:events` (`None`) or shard `P:events:<k>`.
    pub fn events(&self, shard: Option<u32>) -> String {
        match shard {
            None => format!("{}:events", self.prefix),
            Some(k) => format!("{}:events:{k}", self.prefix),
        }
    }

    /// Every events stream: `P:events`, or `P:events:0` .. `P:events:<shards-1>`.
    pub fn all_events(&self, shards: u32) -> Vec<String> {
        match shards {
            0 | 1 => vec![self.events(None)],
            n => (0..n).map(|k| self.events(Some(k))).collect(),
        }
    }

    /// `P:reap:<id>`: the lock that makes one survivor reap a dead node.
    pub fn reap_lock(&self, node: &str) -> String {
        format!("{}:reap:{node}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_under_the_prefix() {
        let k = Keys::new("wsbus");
        assert_eq!(k.nodes(), "wsbus:nodes");
        assert_eq!(k.node("a"), "wsbus:node:a");
        assert_eq!(k.node_users("a"), "wsbus:node:a:users");
        assert_eq!(k.user_sessions("bob"), "wsbus:{u:bob}:sessions");
        assert_eq!(k.user_resume("bob"), "wsbus:{u:bob}:resume");
        assert_eq!(k.inbox("a"), "wsbus:inbox:a");
        assert_eq!(k.reap_lock("a"), "wsbus:reap:a");
        assert_eq!(k.room_members("lobby"), "wsbus:{r:lobby}:members");
        assert_eq!(k.room_nodes("lobby"), "wsbus:{r:lobby}:nodes");
        assert_eq!(k.node_rooms("a"), "wsbus:node:a:rooms");
        assert_eq!(k.rooms(), "wsbus:rooms");
        assert_eq!(k.idempotency("k1"), "wsbus:idem:k1");
        assert_eq!(k.ingress(), "wsbus:ingress");
        assert_eq!(k.events_for("bob", 1), "wsbus:events");
        // crc32("alice") = 0x278ebc47 (Python: zlib.crc32(b"alice")); mod 4 = 3.
        assert_eq!(k.events_for("alice", 4), "wsbus:events:3");
        assert_eq!(k.events_for("", 4), "wsbus:events:0");
        assert_eq!(k.all_events(2), ["wsbus:events:0", "wsbus:events:1"]);
    }
}
