//! The Grafana dashboard (`deploy/grafana/wsbus.json`) and the alert rules
//! (`deploy/prometheus/alerts.yml`) against a real node: every `wsbus_*` metric they query
//! must be on its `/metrics`, so they cannot drift from the code. Names from elsewhere
//! (`up` from Prometheus, `kube_pod_status_ready` from kube-state-metrics) are listed here.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use yaml_rust2::{Yaml, YamlLoader};

use crate::common::*;

/// Metrics the rules may use that a wsbus node does not export.
const EXTERNAL: [&str; 2] = ["up", "kube_pod_status_ready"];

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Metric names (`wsbus_…`) in a PromQL expression.
fn wsbus_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("wsbus_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        into.insert(name);
    }
}

/// Every `expr` of the dashboard's panels and its `node` variable's query; checks on the way
/// that the dashboard imports anywhere (datasource and node are variables, no fixed uid).
fn dashboard_exprs() -> Vec<String> {
    let d: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/wsbus.json")).expect("dashboard JSON");
    let vars = d["templating"]["list"].as_array().expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("dashboard variable `{name}`"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let node = var("node");
    let mut exprs = vec![node["definition"].as_str().expect("node query").to_owned()];
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("$node"),
                "panel {title} ignores the node: {expr}"
            );
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

/// Every rule's `expr`, checking the file's shape as Prometheus reads it: groups with a
/// name and rules, each rule an alert with an expression, a severity and a summary.
fn alert_exprs() -> Vec<String> {
    let docs = YamlLoader::load_from_str(&repo_file("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml is YAML");
    assert_eq!(docs.len(), 1, "one document");
    let groups = docs[0]["groups"].as_vec().expect("groups: a list");
    let mut exprs = Vec::new();
    let mut alerts = BTreeSet::new();
    for g in groups {
        assert!(g["name"].as_str().is_some(), "group without a name");
        for r in g["rules"].as_vec().expect("rules: a list") {
            let name = r["alert"].as_str().expect("every rule is an alert");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            let expr = r["expr"].as_str().expect("expr").to_owned();
            assert!(
                ["wsbus_"]
                    .iter()
                    .chain(EXTERNAL.iter())
                    .any(|m| expr.contains(m)),
                "{name}: {expr}"
            );
            if let Yaml::String(f) = &r["for"] {
                assert!(
                    f.ends_with('m') || f.ends_with('s'),
                    "{name}: `for: {f}` is not a duration"
                );
            }
            assert!(
                matches!(
                    r["labels"]["severity"].as_str(),
                    Some("critical" | "warning")
                ),
                "{name}: severity"
            );
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            exprs.push(expr);
        }
    }
    for wanted in [
        "WsbusNodeNotReady",
        "WsbusInboxGrowing",
        "WsbusInboxReadLagHigh",
        "WsbusBusErrors",
        "WsbusSlowConsumerDisconnects",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} in {alerts:?}");
    }
    exprs
}

/// Sample names (`name{labels} value`, `name value`) on a `/metrics` page.
fn exported(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_use_only_metrics_a_node_exports() {
    let mut used = BTreeSet::new();
    let exprs: Vec<String> = dashboard_exprs().into_iter().chain(alert_exprs()).collect();
    for e in &exprs {
        wsbus_names(e, &mut used);
    }
    assert!(used.len() >= 15, "{used:?}");

    // A real `wsbus serve` (what Prometheus scrapes), exercised so that the labelled series
    // appear: messages both ways between two nodes and on one, an error frame, a refused
    // second session, a close. Fault counters are registered at zero by the node itself.
    let redis = Redis::start().await.unwrap();
    let a = NodeProcess::start("a", &redis.url()).await;
    let b = NodeProcess::start("b", &redis.url()).await;
    let mut alice = Client::connect_url(&a.url("alice"), "alice").await.unwrap();
    let mut carol = Client::connect_url(&a.url("carol"), "carol").await.unwrap();
    let mut bob = Client::connect_url(&b.url("bob"), "bob").await.unwrap();
    alice.send_to("bob", "across").await;
    bob.expect_message("alice", "across").await;
    bob.send_to("alice", "back").await;
    alice.expect_message("bob", "back").await;
    alice.send_to("carol", "local").await;
    carol.expect_message("alice", "local").await;
    alice.send_to("nobody", "lost").await;
    alice.expect_error("User 'nobody' not found").await;
    // bob is held by node b: node a refuses a second session of his (and counts it).
    let mut second = Client::connect_url(&a.url("bob"), "bob").await.unwrap();
    second.expect_error("not unique session").await;
    second.expect_close(4001).await;
    carol.close().await;

    let addr = a.addr;
    let end = Instant::now() + DEADLINE;
    let missing = loop {
        let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
        assert_eq!(status, 200);
        let have = exported(&body);
        let missing: Vec<_> = used.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() || Instant::now() > end {
            break missing;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts query metrics node a does not export: {missing:?}"
    );
    drop(alice);
    drop(bob);
}

/// `deploy/k8s/deployment.yaml`'s container environment, run by the real binary: every
/// `WSBUS_*` setting must be one `wsbus serve` knows and accepts, and the probes' paths must
/// answer on the admin port (and only there). Secrets and addresses are replaced with the
/// test's own.
#[tokio::test]
async fn the_kubernetes_deployment_configures_a_node_that_gets_ready() {
    let docs = YamlLoader::load_from_str(&repo_file("deploy/k8s/deployment.yaml"))
        .expect("deployment.yaml is YAML");
    let container = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    let redis = Redis::start().await.unwrap();
    let (port, admin_port) = (
        wsbus::dev::free_port().unwrap(),
        wsbus::dev::free_port().unwrap(),
    );
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsbus"));
    cmd.env_clear().kill_on_drop(true);
    let mut names = Vec::new();
    for var in container["env"].as_vec().expect("env") {
        let name = var["name"].as_str().expect("env name");
        names.push(name.to_owned());
        let value = match name {
            "WSBUS_NODE_ID" => "wsbus-5d8f7c9b6-x2k4q".to_owned(),
            "WSBUS_BIND" => format!("127.0.0.1:{port}"),
            "WSBUS_ADMIN_BIND" => format!("127.0.0.1:{admin_port}"),
            "WSBUS_REDIS_URL" => redis.url(),
            "WSBUS_JWT_SECRET" => "a test secret of at least thirty-two bytes".to_owned(),
            _ => var["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a plain value"))
                .to_owned(),
        };
        cmd.env(name, value);
    }
    for needed in ["WSBUS_NODE_ID", "WSBUS_ADMIN_BIND", "WSBUS_LOG_FORMAT"] {
        assert!(names.iter().any(|n| n == needed), "no {needed}");
    }
    // An unknown variable would be ignored silently: each must be one of `serve`'s.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_wsbus"))
        .args(["serve", "--help"])
        .output()
        .expect("wsbus serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for name in names.iter().filter(|n| n.starts_with("WSBUS_")) {
        assert!(
            help.contains(&format!("[env: {name}")),
            "`wsbus serve` has no {name}"
        );
    }
    let args: Vec<&str> = container["args"]
        .as_vec()
        .expect("args")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let mut node = cmd
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wsbus");
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let client: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let end = Instant::now() + DEADLINE;
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = container[probe]["httpGet"]["path"].as_str().expect("path");
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"));
        loop {
            if let Some((200, _)) = http_get(admin, path).await {
                break;
            }
            if let Ok(Some(status)) = node.try_wait() {
                panic!("wsbus exited with {status} under the Deployment's settings");
            }
            assert!(Instant::now() < end, "{probe} {path} not 200 in time");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // The client port does not expose the admin endpoints.
    let (status, _) = http_get(client, "/metrics")
        .await
        .expect("client port answers");
    assert_eq!(status, 404);
    // JSON logs (on stderr), as the cluster's log pipeline expects.
    let _ = node.start_kill();
    let out = node.wait_with_output().await.expect("output");
    let first = String::from_utf8_lossy(&out.stderr);
    let line = first.lines().next().expect("the node logged");
    let log: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(log.get("level").is_some(), "{log}");
}
