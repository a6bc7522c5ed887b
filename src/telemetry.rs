//! Metrics: the process-wide Prometheus recorder behind `GET /metrics`.
//!
//! Counters and histograms are recorded through the `metrics` facade where they happen
//! (`wsbus_*_total`, `*_seconds`). The recorder is global to the process, so nodes that
//! share a process (`wsbus dev`, tests) share one set of series.

use std::sync::OnceLock;

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
