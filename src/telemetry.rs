//! Metrics: the process-wide Prometheus recorder behind `GET /metrics`.
//!
//! Counters and histograms are recorded through the `metrics` facade where they happen
//! (`wsbus_*_total`, `*_seconds`). The recorder is global to the process, so nodes that
//! share a process (`wsbus dev`, tests) share one set of series.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets (seconds), 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Installs the recorder on first use; `None` if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            // Bucketed histograms, not summaries: cheaper per sample, and they aggregate
            // across nodes in Prometheus.
            let recorder = PrometheusBuilder::new()
                .set_buckets(&LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// Drains histogram samples into their summaries every few seconds. The recorder keeps every
/// sample until upkeep runs, so without this a busy node's memory grows with each message
/// (found by `loadtest/soak.sh`: ~20 bytes per message).
pub async fn run_upkeep(stop: tokio_util::sync::CancellationToken) {
    let Some(handle) = handle() else {
        return;
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// The metrics in Prometheus text format.
pub fn render() -> String {
    handle().map(PrometheusHandle::render).unwrap_or_default()
}

/// Counters that can stay at zero for long: connections opened (until the first client),
/// and those that only move on faults.
const ZERO_AT_START: [&str; 11] = [
    "wsbus_connections_opened_total",
    "wsbus_ingress_claimed_total",
    "wsbus_api_published_total",
    "wsbus_slow_consumer_disconnects_total",
    "wsbus_redis_reconnects_total",
    "wsbus_bus_errors_total",
    "wsbus_undecodable_entries_total",
    "wsbus_duplicate_entries_total",
    "wsbus_history_duplicates_dropped_total",
    "wsbus_history_gap_fills_total",
    "wsbus_history_gap_messages_lost_total",
];

/// Handles of the metrics on the per-message paths, registered once per node so that
/// recording does not look the series up each time.
pub struct HotMetrics {
    /// Frames received from clients.
    pub received: Counter,
    /// Messages delivered on the sender's node.
    pub delivered_local: Counter,
    /// Messages appended to other nodes' inboxes.
    pub to_bus: Counter,
    /// Messages from the inbox queued for local sessions.
    pub from_bus: Counter,
    /// Time of one pipelined `XADD` batch.
    pub xadd_seconds: Histogram,
    /// Time of one pipelined batch of history appends (`--history`).
    pub history_append_seconds: Histogram,
    /// Client frame in on the sender's node → frame written to the recipient's socket.
    pub delivery_seconds: Histogram,
    /// Sessions open on this process's nodes.
    pub connections_active: Gauge,
    /// Entries waiting in the inbox, as of the last heartbeat.
    pub inbox_length: Gauge,
    /// Age of the newest inbox entry when it was read.
    pub inbox_read_lag_seconds: Gauge,
    /// Room messages sent by clients on this node.
    pub room_messages: Counter,
    /// Room messages queued for sessions on the sender's node.
    pub room_delivered_local: Counter,
    /// Room messages from the inbox queued for local sessions.
    pub room_delivered_from_bus: Counter,
    /// Sessions joining a room.
    pub room_joins: Counter,
    /// Sessions leaving a room (leave or disconnect).
    pub room_leaves: Counter,
    /// Rooms with members on this node.
    pub rooms_active: Gauge,
}

impl HotMetrics {
    /// Registers the handles (installing the recorder first, if nobody has), and the
    /// counters of [`ZERO_AT_START`]: those are shown at zero from the start, since an
    /// absent series is not a zero to `rate()`, a dashboard or an alert rule
    /// (`deploy/prometheus/alerts.yml`).
    pub fn register() -> Self {
        handle();
        for name in ZERO_AT_START {
            metrics::counter!(name).increment(0);
        }
        // Labelled ones too, with the label every dashboard query can rely on.
        metrics::counter!("wsbus_messages_dropped_total", "reason" => "slow_consumer").increment(0);
        metrics::counter!("wsbus_api_requests_total", "status" => "ok").increment(0);
        for result in ["routed", "invalid"] {
            metrics::counter!("wsbus_ingress_entries_total", "result" => result).increment(0);
        }
        for result in ["recovered", "epoch", "trimmed", "expired", "too_many"] {
            metrics::counter!("wsbus_recoveries_total", "result" => result).increment(0);
        }
        for reason in ["header_timeout", "head_too_large", "idle", "evicted"] {
            metrics::counter!("wsbus_http_connections_dropped_total", "reason" => reason)
                .increment(0);
        }
        Self {
            received: metrics::counter!("wsbus_messages_received_total"),
            delivered_local: metrics::counter!("wsbus_messages_delivered_local_total"),
            to_bus: metrics::counter!("wsbus_messages_to_bus_total"),
            from_bus: metrics::counter!("wsbus_messages_from_bus_total"),
            xadd_seconds: metrics::histogram!("wsbus_bus_xadd_seconds"),
            history_append_seconds: metrics::histogram!("wsbus_history_append_seconds"),
            delivery_seconds: metrics::histogram!("wsbus_delivery_latency_seconds"),
            connections_active: metrics::gauge!("wsbus_connections_active"),
            inbox_length: metrics::gauge!("wsbus_inbox_length"),
            inbox_read_lag_seconds: metrics::gauge!("wsbus_inbox_read_lag_seconds"),
            room_messages: metrics::counter!("wsbus_room_messages_total"),
            room_delivered_local: metrics::counter!("wsbus_room_deliveries_total", "via" => "local"),
            room_delivered_from_bus: metrics::counter!("wsbus_room_deliveries_total", "via" => "bus"),
            room_joins: metrics::counter!("wsbus_room_joins_total"),
            room_leaves: metrics::counter!("wsbus_room_leaves_total"),
            rooms_active: metrics::gauge!("wsbus_rooms_active"),
        }
    }
}

/// A warning that may repeat in a flood (a bad ingress entry, a bad API key): the first is
/// logged, then at most one line per interval saying how many came meanwhile. Metrics keep
/// the exact counts.
pub struct LogSummary {
    interval: std::time::Duration,
    /// When the last line was logged, and how many occurrences were not logged since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogSummary {
    /// A summary that logs at most one line per `interval`.
    pub const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Counts one occurrence: `Some(not logged since the last line)` when this one is to be
    /// logged, `None` when it is only counted.
    pub fn note(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}
