//! Metric names, the recorder and what `/metrics` serves. Every metric of tenure's own
//! carries a `node` label, so that the demo's collectors, which share one process and one
//! recorder, stay apart; the process's metrics ([`render`]) carry none.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const FLOWS_IN: &str = "tenure_flows_in_total";
pub const FLOWS_OUT: &str = "tenure_flows_out_total";
/// Flows waiting: settling before their first lookup, pending, or held for handoff.
pub const FLOWS_PENDING: &str = "tenure_flows_pending";
/// Of those, the flows settling (not looked up yet: the engine's `settle_ms`).
pub const FLOWS_SETTLING: &str = "tenure_flows_settling";
pub const FLOWS_FORWARDED: &str = "tenure_flows_forwarded_total";
pub const RANGES: &str = "tenure_ranges";
pub const IPS_TRACKED: &str = "tenure_ips_tracked";
/// Bytes of the engine's ownership tables (map and segment storage).
pub const ENGINE_TABLE_BYTES: &str = "tenure_engine_table_bytes";
/// Sealed bytes sent to other collectors (`message`: flows, claims, acks, ranges...).
pub const PEER_BYTES_SENT: &str = "tenure_peer_bytes_sent_total";
/// Frames sent to other collectors (`message` as above).
pub const PEER_FRAMES_SENT: &str = "tenure_peer_frames_sent_total";
pub const CLAIMS_APPLIED: &str = "tenure_claims_applied_total";
pub const CLAIMS_REJECTED: &str = "tenure_claims_rejected_total";
/// Whole exporter messages refused by the core (`reason`: rate_limited, peer_only...).
pub const EXPORTER_MESSAGES_REJECTED: &str = "tenure_exporter_messages_rejected_total";
/// Exporters whose rate budgets the core tracks.
pub const EXPORTERS_TRACKED: &str = "tenure_exporters_tracked";
/// Inbound data-plane connections closed at once (`reason`: total, per_ip).
pub const CONNECTIONS_REFUSED: &str = "tenure_connections_refused_total";
/// Configuration reloads on SIGHUP (`result`: ok, error).
pub const KEY_RELOADS: &str = "tenure_key_reloads_total";
pub const CONFLICTS: &str = "tenure_conflicts_total";
pub const MEMBERS: &str = "tenure_members";
pub const FRAMES_REJECTED: &str = "tenure_frames_rejected_total";
pub const FRAMES_DROPPED: &str = "tenure_frames_dropped_total";
pub const BATCHES: &str = "tenure_batches_total";
pub const ATTRIBUTION_DELAY: &str = "tenure_attribution_delay_seconds";
pub const EXPORTER_BATCHES_DROPPED: &str = "tenure_exporter_batches_dropped_total";
pub const EXPORTER_BATCHES_SENT: &str = "tenure_exporter_batches_acked_total";
pub const EXPORTER_BUFFERED: &str = "tenure_exporter_batches_buffered";
/// Flows whose local end the exporter stamped with a workload.
pub const EXPORTER_LOCAL_STAMPED: &str = "tenure_exporter_local_stamped_total";
/// Flows whose local end went out unattributed, by `reason`.
pub const EXPORTER_LOCAL_UNATTRIBUTED: &str = "tenure_exporter_local_unattributed_total";
/// Captured flows of IPs the identity source never mapped: not reported.
pub const EXPORTER_FLOWS_NOT_LOCAL: &str = "tenure_exporter_flows_not_local_total";
/// Flows in forwarded batches that this node had journaled already (a peer's re-sent
/// copies), not taken twice.
pub const FLOWS_ALREADY_HELD: &str = "tenure_flows_already_held_total";
/// The admin-set clock offset of a collector, in ms (0 unless fault injection set one).
pub const CLOCK_OFFSET: &str = "tenure_clock_offset_ms";

/// The process-wide Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(ATTRIBUTION_DELAY.to_owned()),
                &[
                    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (tests); ours then only renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// What `/metrics` serves: every recorded metric, and the process's own as Prometheus
/// clients name them (`process_cpu_seconds_total`, `process_resident_memory_bytes`, open
/// and maximum file descriptors, threads, start time), read from `/proc` at each scrape.
/// Those carry no `node` label: they are the process's, whichever collectors it runs
/// (one in a deployment, so that flows per CPU-second is a ratio of two series).
pub fn render() -> String {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    let handle = handle();
    let process = PROCESS.get_or_init(|| {
        let collector = metrics_process::Collector::default();
        collector.describe();
        collector
    });
    process.collect();
    handle.render()
}
