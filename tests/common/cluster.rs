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
    pub async fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("wsbus-cluster-{}", fastrand::u64(..)));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..3 {
            let port = wsbus::dev::free_port().unwrap();
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
                ])
                .arg("--dir")
                .arg(&node_dir)
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
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for &port in &cluster.ports {
            cluster
                .wait(port, |info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
                })
                .await;
        }
        cluster
    }

    async fn wait(&self, port: u16, ok: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                && let Ok(mut c) = client.get_multiplexed_async_connection().await
                && let Ok(info) = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut c)
                    .await
                && ok(&info)
            {
                return;
            }
            assert!(Instant::now() < end, "cluster node {port} not ready");
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
