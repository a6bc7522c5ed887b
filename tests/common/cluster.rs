//! A local Redis Cluster for tests: three `redis-server --cluster-enabled yes` on free ports,
//! joined with `redis-cli --cluster create`, no replicas.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Three primaries, no replicas.
    pub async fn start() -> RedisCluster {
        Self::start_with_replicas(0).await
    }

    /// Three primaries with `replicas` replicas each.
    pub async fn start_with_replicas(replicas: usize) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("wsbus-cluster-{}", fastrand::u64(..)));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            // A cluster node also listens on port + 10000 (the cluster bus).
            let port = loop {
                let p = wsbus::dev::free_port().unwrap();
                if p < 55_000
                    && !ports.contains(&p)
                    && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
                {
                    break p;
                }
            };
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args([
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    // Replicas sync at once instead of after the default 5 s.
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server");
            ports.push(port);
            children.push(child);
        }
        let cluster = RedisCluster {
            ports,
            children,
            dir,
        };
        for &port in &cluster.ports {
            cluster.wait(port, |_| true).await;
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let known = format!("cluster_known_nodes:{}", cluster.ports.len());
        for &port in &cluster.ports {
            cluster
                .wait(port, |info| {
                    info.contains("cluster_state:ok") && info.contains(&known)
                })
                .await;
        }
        cluster
    }

    async fn wait(&self, port: u16, ok: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        loop {
            if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                && let Ok(mut c) = client.get_multiplexed_async_connection().await
            {
                match redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut c)
                    .await
                {
                    Ok(info) if ok(&info) => return,
                    Ok(info) => last = info,
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > end {
                let log =
                    std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.log"));
                panic!(
                    "cluster node {port} not ready ({last}); its log:\n{}",
                    log.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seed URLs, comma-separated (the `--redis-url` of a cluster node).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A direct connection to one shard.
    pub async fn shard(&self, port: u16) -> redis::aio::MultiplexedConnection {
        crate::common::redis_conn(&format!("redis://127.0.0.1:{port}")).await
    }

    /// Keys under the default prefix on every shard, sorted.
    pub async fn keys(&self) -> Vec<String> {
        let mut all = Vec::new();
        for &port in &self.ports {
            let mut c = self.shard(port).await;
            let k: Vec<String> = redis::cmd("KEYS")
                .arg("wsbus:*")
                .query_async(&mut c)
                .await
                .unwrap();
            all.extend(k);
        }
        all.sort();
        all
    }

    /// The port of a replica of the primary on `port`, once it is in sync.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let id = self.node_id(port).await;
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            for &p in &self.ports {
                let mut c = self.shard(p).await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                // `<id> <addr> <flags> <master id> ...` for this node.
                let mine: Vec<&str> = nodes
                    .lines()
                    .find(|l| l.contains("myself"))
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                let replica_of_port = mine.get(2).is_some_and(|f| f.contains("slave"))
                    && mine.get(3) == Some(&id.as_str());
                if replica_of_port && info.contains("master_link_status:up") {
                    return p;
                }
            }
            assert!(Instant::now() < end, "no synced replica of {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Promotes the replica on `port` with a graceful manual failover and waits for it. A
    /// manual failover gives up after 5 s if the replica cannot catch up (a loaded machine);
    /// it is asked again until it succeeds.
    pub async fn failover_to(&self, port: u16) {
        let mut c = self.shard(port).await;
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            let _: () = redis::cmd("CLUSTER")
                .arg("FAILOVER")
                .query_async(&mut c)
                .await
                .unwrap();
            let attempt_end = Instant::now() + Duration::from_secs(7);
            while Instant::now() < attempt_end {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                if info.contains("role:master") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(Instant::now() < end, "failover to {port} did not complete");
        }
    }

    /// The cluster node id of the shard on `port`.
    pub async fn node_id(&self, port: u16) -> String {
        let mut c = self.shard(port).await;
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// The port of the shard that owns `key`, and its slot.
    pub async fn owner(&self, key: &str) -> (u16, u16) {
        let mut c = self.shard(self.ports[0]).await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        {
            let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut c)
                .await
                .unwrap();
            for range in slots {
                let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                    (range.first(), range.get(1))
                else {
                    continue;
                };
                if (*lo..=*hi).contains(&(slot as i64))
                    && let Some(redis::Value::Array(master)) = range.get(2)
                    && let Some(redis::Value::Int(p)) = master.get(1)
                {
                    return (*p as u16, slot);
                }
            }
        }
        panic!("no owner for slot {slot}");
    }

    /// Moves `slot` (and its keys) from the shard on `from` to the one on `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE the keys, SETSLOT NODE.
    pub async fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let mut src = self.shard(from).await;
        let mut dst = self.shard(to).await;
        let setslot = |state: &str, id: &str| {
            let mut c = redis::cmd("CLUSTER");
            c.arg("SETSLOT").arg(slot).arg(state).arg(id);
            c
        };
        let _: () = setslot("IMPORTING", &from_id)
            .query_async(&mut dst)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &to_id)
            .query_async(&mut src)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for &port in &self.ports {
            let mut c = self.shard(port).await;
            let _: () = setslot("NODE", &to_id).query_async(&mut c).await.unwrap();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
