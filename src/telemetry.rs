//! Metrics: the process-wide Prometheus recorder behind `GET /metrics`.
//!
//! Counters and histograms are recorded through the `metrics` facade where they happen
//! (`wsbus_*_total`, `*_seconds`). The recorder is global to the process, so nodes that
//! share a process (`wsbus dev`, tests) share one set of series.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder on first use; `None` if another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// The metrics in Prometheus text format.
pub fn render() -> String {
    handle().map(PrometheusHandle::render).unwrap_or_default()
}

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
}

impl HotMetrics {
    /// Registers the handles (installing the recorder first, if nobody has).
    pub fn register() -> Self {
        handle();
        Self {
            received: metrics::counter!("wsbus_messages_received_total"),
            delivered_local: metrics::counter!("wsbus_messages_delivered_local_total"),
            to_bus: metrics::counter!("wsbus_messages_to_bus_total"),
            from_bus: metrics::counter!("wsbus_messages_from_bus_total"),
            xadd_seconds: metrics::histogram!("wsbus_bus_xadd_seconds"),
        }
    }
}
