//! CLI of the wsbus load tester. See `loadtest/README.md`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use wsbus_loadtest::{Config, Scenario};

/// Load-test a running wsbus cluster.
#[derive(Parser, Debug)]
#[command(name = "wsbus-loadtest", version)]
struct Cli {
    /// Scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Node URL (required except for sched-noise), repeatable (`--node ws://127.0.0.1:8080 --node ws://127.0.0.1:8081`)
    /// or comma-separated.
    #[arg(long = "node", env = "WSBUS_LOADTEST_NODES", value_delimiter = ',')]
    nodes: Vec<String>,
    /// Simulated users (dm-*: senders+recipients; idle-connections: connections;
    /// churn: held partner users).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Connect ramp in users per second.
    #[arg(long, default_value_t = 1000.0)]
    hatch_rate: f64,
    /// Measuring phase in seconds, after all users are connected.
    #[arg(long, default_value_t = 10.0)]
    run_time: f64,
    /// dm-*: open loop at this total rate (messages/s). churn: cycles/s (required).
    /// room-*: room messages/s in total (required by room-churn).
    #[arg(long)]
    rate: Option<f64>,
    /// dm-*, room-fanout: closed loop with this many messages in flight per user (when no
    /// --rate; room-fanout: a message is done when every other member has it).
    #[arg(long, default_value_t = 8)]
    in_flight: u32,
    /// dm-*, room-*: most frames a sender writes to its socket at once. 1 (default) is what
    /// browsers and phones do, one write per message; 64 coalesces what is due at once, as
    /// this tool did before. drops, churn and slowloris always write one frame at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    frames_per_write: u32,
    /// Server pid, repeatable. idle-connections: VmRSS before/after connecting and during the
    /// ramp. dm-*, room-*: RSS, and CPU time over the sending phase and drain per delivery.
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Seconds to wait for outstanding messages after sending stops.
    #[arg(long, default_value_t = 2.0)]
    grace: f64,
    /// Loopback source addresses to spread client sockets over (127.0.0.1..=127.0.0.K);
    /// default: one per 25,000 connections.
    #[arg(long)]
    source_addrs: Option<usize>,
    /// Hard deadline of the whole run in seconds (default: 2×ramp + run time + grace + 30).
    #[arg(long)]
    deadline: Option<f64>,
    /// churn: maximum cycles in flight.
    #[arg(long, default_value_t = 2000)]
    max_cycles_in_flight: usize,
    /// dm-*: list the messages slower than this many µs in the report (at most 1,000).
    #[arg(long)]
    slow_us: Option<u64>,
    /// room-*: rooms the --users members are spread over (room by room, each room over
    /// every node).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// room-churn: join/leave cycles per second, in total.
    #[arg(long)]
    join_rate: Option<f64>,
    /// room-churn: users doing the join/leave cycles, besides the --users members.
    #[arg(long, default_value_t = 20)]
    churners: usize,
    /// room-*: Redis address (`host:port`; repeatable, every shard of a cluster) whose
    /// `INFO commandstats` is read around the sending phase (Redis calls per room message).
    #[arg(long = "redis", value_delimiter = ',')]
    redis: Vec<String>,
    /// api-publish: an API key of the nodes.
    #[arg(long, env = "WSBUS_API_KEYS")]
    api_key: Option<String>,
    /// api-publish: publishes per HTTP request (1 = single publishes) or per XADD pipeline.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// api-publish: through the HTTP API or the ingress stream (on the first --redis).
    #[arg(long, value_enum, default_value_t = wsbus_loadtest::Via::Http)]
    via: wsbus_loadtest::Via,
    /// api-publish: concurrent publishing connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// drops: seconds between the starts of two cuts of the cut path.
    #[arg(long, default_value_t = 10.0)]
    cut_every: f64,
    /// drops: seconds each cut lasts.
    #[arg(long, default_value_t = 2.0)]
    cut_for: f64,
    /// drops: shell command (`sh -c`) that kills a node mid-run (e.g. `kill -9 $(cat node.pid)`).
    #[arg(long)]
    kill_cmd: Option<String>,
    /// drops: shell command that starts the killed node again; it must return at once.
    #[arg(long)]
    restart_cmd: Option<String>,
    /// drops: which --node (0-based) the commands kill and restart [default: the last].
    #[arg(long)]
    kill_node: Option<usize>,
    /// drops: seconds into the sending phase of the kill [default: 40 % of --run-time].
    #[arg(long)]
    kill_at: Option<f64>,
    /// drops: seconds the killed node stays down.
    #[arg(long, default_value_t = 3.0)]
    down_for: f64,
    /// dm-*: consume the nodes' events stream (`--events` on) on the first --redis with a
    /// consumer group while messages flow; check every message sent is in it exactly once,
    /// and report the consumer's lag.
    #[arg(long)]
    events_check: bool,
    /// --events-check: the nodes' `--events-shards`.
    #[arg(long, default_value_t = 1)]
    events_shards: u32,
    /// dm-*: once every user is connected, wait until this wall-clock time (Unix seconds)
    /// before sending: several load-tester processes then send together, and the servers can
    /// be measured idle before (loadtest/100k.sh). Give --deadline with it.
    #[arg(long)]
    start_at: Option<f64>,
    /// HS256 secret of the nodes (their --jwt-secret, at least 32 bytes): each simulated user
    /// connects with `?token=<JWT>` minted with it (`sub` = user id, `exp` in 1 h, `rooms` =
    /// the room ids its scenario joins, as a `<run prefix>-r*` pattern).
    #[arg(long, env = "WSBUS_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the report as one self-contained HTML page with charts (latency
    /// percentiles per second, latency histogram, messages and connections per second,
    /// errors by kind, parameters and machine) to this file.
    #[arg(long, value_name = "FILE")]
    report_file: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.rate.is_some() && cli.scenario == Scenario::IdleConnections {
        eprintln!("note: --rate is ignored by idle-connections");
    }
    let cfg = Config {
        nodes: cli.nodes,
        users: cli.users,
        hatch_rate: cli.hatch_rate,
        run_time: Duration::from_secs_f64(cli.run_time.max(0.0)),
        rate: cli.rate,
        in_flight: cli.in_flight,
        frames_per_write: cli.frames_per_write,
        server_pids: cli.server_pids,
        grace: Duration::from_secs_f64(cli.grace.max(0.0)),
        source_addrs: cli.source_addrs,
        connect_timeout: Duration::from_secs(10),
        deadline: cli.deadline.map(|d| Duration::from_secs_f64(d.max(1.0))),
        max_cycles_in_flight: cli.max_cycles_in_flight.max(1),
        slow_us: cli.slow_us,
        rooms: cli.rooms,
        join_rate: cli.join_rate,
        churners: cli.churners,
        redis: cli.redis,
        api_key: cli
            .api_key
            .map(|k| k.split(',').next().unwrap_or_default().to_owned()),
        batch: cli.batch,
        via: cli.via,
        connections: cli.connections,
        drops: wsbus_loadtest::Drops {
            cut_every: Duration::from_secs_f64(cli.cut_every.max(0.0)),
            cut_for: Duration::from_secs_f64(cli.cut_for.max(0.0)),
            kill_cmd: cli.kill_cmd,
            restart_cmd: cli.restart_cmd,
            kill_node: cli.kill_node,
            kill_at: cli.kill_at.map(|s| Duration::from_secs_f64(s.max(0.0))),
            down_for: Duration::from_secs_f64(cli.down_for.max(0.0)),
        },
        events_check: cli.events_check,
        events_shards: cli.events_shards,
        start_at: cli.start_at,
        jwt_secret: cli.jwt_secret,
    };
    match wsbus_loadtest::run(cli.scenario, &cfg).await {
        Ok(mut report) => {
            report.command = std::env::args().collect();
            if let Some(path) = &cli.report_file
                && let Err(e) = std::fs::write(path, wsbus_loadtest::render_html(&report))
            {
                eprintln!("error: writing {}: {e}", path.display());
                return ExitCode::from(2);
            }
            if cli.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.to_human());
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
