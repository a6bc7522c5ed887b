//! Packed inbox entries: what one bus-writer batch sends one node shares one entry, each
//! message in it is handled as if it had an entry of its own, and nodes of the previous
//! version (one entry per message, the single layout) and of this one read each other.

use wsbus::redis::keys::Keys;
use wsbus::wire::envelope::{Body, Envelope, Pack};

use crate::common::*;
use crate::on_both;

on_both!(a_batch_for_one_node_is_one_entry);

/// The `boot` of the process the raw entries below pretend to come from.
const BOOT: u64 = 0x5eed;

/// A direct message from alice (on node `a`) to `to`, as a bus writer encodes it.
fn message(id: u64, to: &str, text: &str) -> Envelope<'static> {
    Envelope {
        id,
        boot: BOOT,
        ..message_envelope("a", "alice", to, text)
    }
}

/// Appends an entry in the single layout, the only one the previous version writes.
async fn append_single(
    conn: &mut redis::aio::MultiplexedConnection,
    inbox: &str,
    id: u64,
    to: &str,
    text: &str,
) {
    let mut env = Vec::new();
    message(id, to, text).encode_into(&mut env);
    append_single_entry(conn, inbox, "alice", to, &env).await;
}

/// Appends a packed entry: `XADD <inbox> * v 2 n <count> envs <array of envelopes>`.
async fn append_packed(
    conn: &mut redis::aio::MultiplexedConnection,
    inbox: &str,
    envs: &[Envelope<'_>],
) {
    let mut pack = Pack::default();
    for env in envs {
        pack.push(env);
    }
    let _: String = redis::cmd("XADD")
        .arg(inbox)
        .arg("*")
        .arg("v")
        .arg("2")
        .arg("n")
        .arg(envs.len())
        .arg("envs")
        .arg(pack.encoded())
        .query_async(conn)
        .await
        .unwrap();
}

/// A node of this version reads what a node of the previous version appends (the single
/// layout, written here field by field as that version does) between the packed entries of
/// a node of this version, in the order they were appended.
#[tokio::test]
async fn a_new_node_reads_the_previous_layout() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut conn = redis_conn(&redis.url()).await;
    let inbox = key_names().inbox("b");

    append_single(&mut conn, &inbox, 1, "bob", "from an old node").await;
    bob.expect_message("alice", "from an old node").await;
    alice.send_to("bob", "from a new node").await;
    bob.expect_message("alice", "from a new node").await;
    append_packed(
        &mut conn,
        &inbox,
        &[message(2, "bob", "p1"), message(3, "bob", "p2")],
    )
    .await;
    append_single(&mut conn, &inbox, 4, "bob", "old again").await;
    for text in ["p1", "p2", "old again"] {
        bob.expect_message("alice", text).await;
    }
    assert_eq!(metric(b.addr, "wsbus_undecodable_entries_total").await, 0.0);
}

/// One packed entry with a message for a user here, one for a user who moved to another
/// node, one for a user who is nowhere, and one more for the user here: delivered, forwarded
/// and answered each as separate entries would be, in order. Appended twice (a retried
/// pipeline), its messages are dropped as repeats, each.
#[tokio::test]
async fn a_packed_entry_is_handled_message_by_message() {
    let redis = Redis::start().await.unwrap();
    let a = Node::start("a", &redis.url()).await;
    let b = Node::start("b", &redis.url()).await;
    let c = Node::start("c", &redis.url()).await;
    let mut alice = a.connect("alice").await;
    let mut bob = b.connect("bob").await;
    let mut carol = c.connect("carol").await;
    let mut conn = redis_conn(&redis.url()).await;
    let inbox = key_names().inbox("b");

    let entry = [
        message(1, "bob", "one"),
        message(2, "carol", "moved"),
        message(3, "nobody", "lost"),
        message(4, "bob", "two"),
    ];
    append_packed(&mut conn, &inbox, &entry).await;
    bob.expect_message("alice", "one").await;
    bob.expect_message("alice", "two").await;
    carol.expect_message("alice", "moved").await;
    alice.expect_error("User 'nobody' not found").await;

    append_packed(&mut conn, &inbox, &entry).await;
    append_single(&mut conn, &inbox, 5, "bob", "after the repeat").await;
    bob.expect_message("alice", "after the repeat").await;
    assert_eq!(metric(b.addr, "wsbus_duplicate_entries_total").await, 4.0);
    carol.expect_nothing().await;
    alice.expect_nothing().await;
}

/// Makes Redis hold write commands for `ms` (every shard of a cluster).
async fn pause_writes(backend: &Backend, ms: u64) {
    for url in backend.shard_urls() {
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query_async(&mut redis_conn(&url).await)
            .await
            .unwrap();
    }
}

/// A node `id` that is alive and has a session of `user`, but whose inbox nobody reads: what
/// other nodes append to it stays there to look at. With `reads_packed`, its hash says it
/// reads packed entries, as a node of this version's does; without, it is a node of a
/// version before them.
async fn parked_node(backend: &Backend, id: &str, user: &str, reads_packed: bool) {
    let keys = Keys::new("wsbus");
    let mut conn = backend.conn().await;
    // Its heartbeat far ahead: alive for the whole test.
    let far_ahead = wsbus::wire::clock::now_ms() + 3_600_000;
    let mut pipe = redis::pipe();
    pipe.cmd("HSET")
        .arg(keys.node(id))
        .arg("addr")
        .arg("127.0.0.1:1")
        .ignore();
    if reads_packed {
        pipe.cmd("HSET")
            .arg(keys.node(id))
            .arg(wsbus::cluster::live::LAYOUTS_FIELD)
            .arg(wsbus::cluster::live::LAYOUTS)
            .ignore();
    }
    let () = pipe
        .cmd("ZADD")
        .arg(keys.nodes())
        .arg(far_ahead)
        .arg(id)
        .ignore()
        .cmd("HSET")
        .arg(keys.user_sessions(user))
        .arg(format!("{id}:1"))
        .arg(1)
        .ignore()
        .cmd("XADD")
        .arg(keys.inbox(id))
        .arg("MAXLEN")
        .arg(0)
        .arg("*")
        .arg("_")
        .arg("_")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// An entry's fields.
type Fields = Vec<(String, Vec<u8>)>;

/// The entries of `node`'s inbox: per entry, its fields.
async fn entries(backend: &Backend, node: &str) -> Vec<Fields> {
    let mut conn = backend.conn().await;
    let all: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(key_names().inbox(node))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    all.into_iter().map(|(_, fields)| fields).collect()
}

fn field<'f>(fields: &'f [(String, Vec<u8>)], name: &str) -> Option<&'f [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

/// A burst that queued up while Redis paused writes goes to a node in one entry per batch
/// (fewer `XADD`s than messages), in order; with `--bus-pack 1`, or to a node whose hash does
/// not say it reads packed entries (a node of the previous version, in a rolling upgrade), in
/// one entry per message, each in the single layout, which such a node reads (its `env` field
/// decodes alone).
async fn a_batch_for_one_node_is_one_entry(backend: Backend) {
    const N: usize = 100;
    for (case, (pack, reads_packed)) in [(1024, true), (1, true), (1024, false)]
        .into_iter()
        .enumerate()
    {
        let old = format!("old{case}");
        let user = format!("olga{case}");
        parked_node(&backend, &old, &user, reads_packed).await;
        let packed = pack > 1 && reads_packed;
        let a = backend
            .node_with(&format!("a{case}"), |c| c.bus_pack = pack)
            .await;
        let mut alice = a.connect("alice").await;
        alice.send_to(&user, "warm up").await;
        eventually(DEADLINE, "the warm-up appended", || async {
            (entries(&backend, &old).await.len() == 1).then_some(())
        })
        .await;
        let xadds = backend.command_calls("xadd").await;
        // Writes wait 300 ms: the burst queues up in the bus writer meanwhile.
        pause_writes(&backend, 300).await;
        for i in 0..N {
            alice.feed_to(&user, &i.to_string()).await;
        }
        alice.flush().await;
        let found = eventually(DEADLINE, "the burst appended", || async {
            let found = entries(&backend, &old).await;
            let n: usize = found.iter().skip(1).map(|e| count(e)).sum();
            (n == N).then_some(found)
        })
        .await;
        let xadds = backend.command_calls("xadd").await - xadds;
        let texts: Vec<String> = found[1..]
            .iter()
            .flat_map(|e| decoded(e))
            .map(|env| match env.body {
                Body::Message { text } => text.into_owned(),
                other => panic!("{other:?}"),
            })
            .collect();
        let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
        assert_eq!(texts, want, "in order, once each");
        if !packed {
            assert_eq!(xadds, N as u64);
            for entry in &found[1..] {
                let env = field(entry, "env").expect("the single layout");
                Envelope::decode(env).expect("an old node decodes it");
                assert_eq!(field(entry, "to"), Some(user.as_bytes()));
                assert!(field(entry, "v").is_none());
            }
        } else {
            assert!(xadds < N as u64 / 2, "{xadds} XADDs for {N} messages");
            assert!(found[1..].iter().any(|e| field(e, "v") == Some(b"2")));
        }
        // Every message reached olga's node: none is answered. (The writer answers a batch
        // before it takes the next: once a later message is in, the answers are queued.)
        alice.send_to(&user, "end").await;
        eventually(DEADLINE, "the end appended", || async {
            let found = entries(&backend, &old).await;
            (found.iter().skip(1).map(|e| count(e)).sum::<usize>() == N + 1).then_some(())
        })
        .await;
        alice.expect_nothing().await;
        alice.close().await;
        a.stop().await;
    }
}

/// How many envelopes an entry holds.
fn count(entry: &[(String, Vec<u8>)]) -> usize {
    decoded(entry).len()
}

/// An entry's envelopes, as a node of this version reads them.
fn decoded(entry: &[(String, Vec<u8>)]) -> Vec<Envelope<'_>> {
    let mut out = Vec::new();
    wsbus::wire::envelope::decode_entry(|name| field(entry, name), &mut out).unwrap();
    out
}

/// `wsbus inspect` prints each envelope of a packed entry, saying which part it is.
#[tokio::test]
async fn inspect_decodes_packed_entries() {
    let redis = Redis::start().await.unwrap();
    let url = redis.url();
    let mut conn = redis_conn(&url).await;
    let inbox = key_names().inbox("parked");
    append_single(&mut conn, &inbox, 1, "bob", "single").await;
    append_packed(
        &mut conn,
        &inbox,
        &[message(2, "bob", "p1"), message(3, "carol", "p2")],
    )
    .await;

    let handle = wsbus::cli::open(&url, false).unwrap();
    let found = wsbus::cli::inspect(&handle, &Keys::new("wsbus"), "parked", 10)
        .await
        .unwrap()
        .unwrap();
    let seen: Vec<_> = found
        .iter()
        .map(|e| {
            (
                e["to"].clone(),
                e["data"]["text"].clone(),
                e["part"].clone(),
                e["of"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "bob".into(),
                "single".into(),
                serde_json::Value::Null,
                serde_json::Value::Null
            ),
            ("bob".into(), "p1".into(), 1.into(), 2.into()),
            ("carol".into(), "p2".into(), 2.into(), 2.into()),
        ]
    );
    assert_eq!(found[1]["id"], found[2]["id"], "one entry");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["inspect", "parked", "--redis-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, found);
}
