//! Metric names, the recorder and what `/metrics` serves. Every metric of tenure's own
//! carries a `node` label, so that the demo's collectors, which share one process and one
//! recorder, stay apart; the process's metrics ([`render`]) carry none.

use std::sync::OnceLock;

use metrics::Unit;
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
/// Events read from the container runtime (containers identity source).
pub const EXPORTER_CONTAINERS_EVENTS: &str = "tenure_exporter_container_events_total";
/// Reconnects to the container runtime.
pub const EXPORTER_CONTAINERS_RECONNECTS: &str = "tenure_exporter_container_reconnects_total";
/// Container events, listed containers and addresses that could not be read (skipped).
pub const EXPORTER_CONTAINERS_EVENTS_MALFORMED: &str =
    "tenure_exporter_container_events_malformed_total";
/// Flows in forwarded batches that this node had journaled already (a peer's re-sent
/// copies), not taken twice.
pub const FLOWS_ALREADY_HELD: &str = "tenure_flows_already_held_total";
/// Exporter batches whose `sent_ms` was more than δ off the other exporters': claims
/// refused, flows unattributed (`exporter_clock`).
pub const EXPORTER_CLOCK_OFF_BATCHES: &str = "tenure_exporter_clock_off_batches_total";
/// The admin-set clock offset of a collector, in seconds (0 unless fault injection set
/// one).
pub const CLOCK_OFFSET: &str = "tenure_clock_offset_seconds";
/// Data-plane connections closed after `conn_idle_timeout_ms` without a frame: normal
/// (an exporter or a peer with nothing to send), so apart from `FRAMES_REJECTED`.
pub const CONNECTIONS_IDLE_CLOSED: &str = "tenure_connections_idle_closed_total";
pub const JOURNAL_ERRORS: &str = "tenure_journal_errors_total";
pub const JOURNAL_CORRUPT_RECORDS: &str = "tenure_journal_corrupt_records_total";
pub const JOURNAL_RECOVERED_FLOWS: &str = "tenure_journal_recovered_flows_total";

/// `FRAMES_REJECTED`'s `reason`s: every [`super::transport::TransportError::reason`] a
/// rejected frame can have, and `gossip` (a datagram the membership layer refused).
pub const FRAME_REJECT_REASONS: [&str; 9] = [
    "frame",
    "replay",
    "auth",
    "seal",
    "invalid",
    "io",
    "mixed_keys",
    "timeout",
    "gossip",
];

/// `PEER_BYTES_SENT`'s and `PEER_FRAMES_SENT`'s `message`s: the kinds of message a
/// collector sends to another.
pub const PEER_MESSAGE_KINDS: [&str; 7] = [
    "flows",
    "claims",
    "events",
    "range_requests",
    "ranges",
    "acks",
    "directory",
];

/// Every metric of tenure's own, with its kind, unit and HELP text, described once to the
/// recorder: what `/metrics` shows as `# HELP` and `# TYPE`. The collector's and the
/// exporter's metrics share one list, as they share one recorder in the demo.
const DESCRIPTIONS: &[(Kind, &str, Unit, &str)] = &[
    (Kind::Counter, FLOWS_IN, Unit::Count, "Flows received in exporter and forwarded batches."),
    (Kind::Counter, FLOWS_OUT, Unit::Count, "Flows emitted to the sink, by result (attributed, unattributed) and detail (the source when attributed, the reason when not)."),
    (Kind::Gauge, FLOWS_PENDING, Unit::Count, "Flows waiting: settling, pending coverage, or held for handoff."),
    (Kind::Gauge, FLOWS_SETTLING, Unit::Count, "Flows not looked up yet (settling until settle_ms after their end)."),
    (Kind::Counter, FLOWS_FORWARDED, Unit::Count, "Flows sent to a collector of another region, by that region."),
    (Kind::Gauge, RANGES, Unit::Count, "Ownership ranges held."),
    (Kind::Gauge, IPS_TRACKED, Unit::Count, "IPs with ownership history held."),
    (Kind::Gauge, ENGINE_TABLE_BYTES, Unit::Bytes, "Bytes of the engine's ownership tables (map and segment storage)."),
    (Kind::Counter, PEER_BYTES_SENT, Unit::Bytes, "Sealed bytes sent to other collectors, by message kind."),
    (Kind::Counter, PEER_FRAMES_SENT, Unit::Count, "Frames sent to other collectors, by message kind."),
    (Kind::Counter, CLAIMS_APPLIED, Unit::Count, "Ownership claims applied."),
    (Kind::Counter, CLAIMS_REJECTED, Unit::Count, "Ownership claims refused, by reason."),
    (Kind::Counter, EXPORTER_MESSAGES_REJECTED, Unit::Count, "Whole exporter messages refused, by reason."),
    (Kind::Gauge, EXPORTERS_TRACKED, Unit::Count, "Exporters whose rate budgets are tracked."),
    (Kind::Counter, CONNECTIONS_REFUSED, Unit::Count, "Inbound data-plane connections closed at once, by the limit hit (total, per_ip)."),
    (Kind::Counter, CONNECTIONS_IDLE_CLOSED, Unit::Count, "Data-plane connections closed after conn_idle_timeout_ms without a frame (normal)."),
    (Kind::Counter, KEY_RELOADS, Unit::Count, "Key reloads on SIGHUP, by result (ok, error)."),
    (Kind::Counter, CONFLICTS, Unit::Count, "Conflicting ownership claims for one IP."),
    (Kind::Gauge, MEMBERS, Unit::Count, "Cluster members seen, by region and state (alive, down)."),
    (Kind::Counter, FRAMES_REJECTED, Unit::Count, "Frames and datagrams failing checks, by reason; the connection is closed."),
    (Kind::Counter, FRAMES_DROPPED, Unit::Count, "Frames not sent: their connection was gone or its queue full."),
    (Kind::Counter, BATCHES, Unit::Count, "Exporter batches answered with a status other than ok (busy)."),
    (Kind::Histogram, ATTRIBUTION_DELAY, Unit::Seconds, "Time from a flow's arrival to its verdict."),
    (Kind::Counter, EXPORTER_BATCHES_DROPPED, Unit::Count, "Exporter batches dropped past buffer_batches_max."),
    (Kind::Counter, EXPORTER_BATCHES_SENT, Unit::Count, "Exporter batches acknowledged by a collector."),
    (Kind::Gauge, EXPORTER_BUFFERED, Unit::Count, "Exporter batches waiting for an acknowledgement."),
    (Kind::Counter, EXPORTER_LOCAL_STAMPED, Unit::Count, "Flows whose local end the exporter stamped with the workload that held the IP for the whole flow."),
    (Kind::Counter, EXPORTER_LOCAL_UNATTRIBUTED, Unit::Count, "Flows whose local end went out unattributed, by reason (local_changed, local_unknown, local_expired)."),
    (Kind::Counter, EXPORTER_FLOWS_NOT_LOCAL, Unit::Count, "Captured flows of IPs the identity source never mapped (not a local workload's; not reported)."),
    (Kind::Counter, EXPORTER_CONTAINERS_EVENTS, Unit::Count, "Events read from the container runtime's events stream."),
    (Kind::Counter, EXPORTER_CONTAINERS_RECONNECTS, Unit::Count, "Connections to the container runtime lost or refused, each followed by a reconnect and a relisting."),
    (Kind::Counter, EXPORTER_CONTAINERS_EVENTS_MALFORMED, Unit::Count, "Container events, listed containers and addresses that could not be read (skipped)."),
    (Kind::Counter, FLOWS_ALREADY_HELD, Unit::Count, "Flows a peer re-sent that this node had journaled already (not taken twice)."),
    (Kind::Counter, EXPORTER_CLOCK_OFF_BATCHES, Unit::Count, "Exporter batches whose clock was more than the skew margin off the other exporters' (claims refused, flows unattributed)."),
    (Kind::Gauge, CLOCK_OFFSET, Unit::Seconds, "Clock offset set through /admin/clock (0 unless fault injection set one)."),
    (Kind::Counter, JOURNAL_ERRORS, Unit::Count, "Journal appends or syncs that failed."),
    (Kind::Counter, JOURNAL_CORRUPT_RECORDS, Unit::Count, "Corrupt journal records skipped at start."),
    (Kind::Counter, JOURNAL_RECOVERED_FLOWS, Unit::Count, "Flows replayed from the journal at start."),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Installs the recorder ([`handle`]) and describes every metric ([`DESCRIPTIONS`]), once
/// per process.
pub fn describe() {
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    let _ = handle();
    DESCRIBED.get_or_init(|| {
        for &(kind, name, unit, help) in DESCRIPTIONS {
            match kind {
                Kind::Counter => metrics::describe_counter!(name, unit, help),
                Kind::Gauge => metrics::describe_gauge!(name, unit, help),
                Kind::Histogram => metrics::describe_histogram!(name, unit, help),
            }
        }
    });
}

/// Registers a collector's series whose label sets are known at start, at 0, so that a
/// rate or an alert over them reads 0 rather than nothing before the first event.
/// `region` is its own, `other_regions` the others its config names.
pub fn init_collector<'a>(
    node: &str,
    region: &str,
    other_regions: impl IntoIterator<Item = &'a str>,
) {
    describe();
    let n = || node.to_owned();
    for name in [
        FLOWS_IN,
        CONFLICTS,
        FRAMES_DROPPED,
        CONNECTIONS_IDLE_CLOSED,
        FLOWS_ALREADY_HELD,
        EXPORTER_CLOCK_OFF_BATCHES,
        CLAIMS_APPLIED,
        JOURNAL_ERRORS,
    ] {
        metrics::counter!(name, "node" => n()).increment(0);
    }
    for name in [
        FLOWS_PENDING,
        FLOWS_SETTLING,
        RANGES,
        IPS_TRACKED,
        ENGINE_TABLE_BYTES,
        CLOCK_OFFSET,
    ] {
        metrics::gauge!(name, "node" => n()).increment(0.0);
    }
    metrics::counter!(BATCHES, "node" => n(), "status" => "busy").increment(0);
    for reason in FRAME_REJECT_REASONS {
        metrics::counter!(FRAMES_REJECTED, "node" => n(), "reason" => reason).increment(0);
    }
    for reason in ["total", "per_ip"] {
        metrics::counter!(CONNECTIONS_REFUSED, "node" => n(), "reason" => reason).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(KEY_RELOADS, "node" => n(), "result" => result).increment(0);
    }
    for source in tenure_attribution::Source::ALL {
        metrics::counter!(FLOWS_OUT, "node" => n(), "result" => "attributed", "detail" => source.as_str())
            .increment(0);
    }
    for reason in tenure_attribution::Reason::ALL {
        metrics::counter!(FLOWS_OUT, "node" => n(), "result" => "unattributed", "detail" => reason.as_str())
            .increment(0);
    }
    let others: Vec<&str> = other_regions.into_iter().collect();
    for other in &others {
        metrics::counter!(FLOWS_FORWARDED, "node" => n(), "region" => other.to_string())
            .increment(0);
    }
    // The other members of every region known; in a region of one, none of its own yet.
    for r in others.iter().copied().chain([region]) {
        for state in ["alive", "down"] {
            metrics::gauge!(MEMBERS, "node" => n(), "region" => r.to_owned(), "state" => state)
                .increment(0.0);
        }
    }
    for kind in PEER_MESSAGE_KINDS {
        for name in [PEER_BYTES_SENT, PEER_FRAMES_SENT] {
            metrics::counter!(name, "node" => n(), "message" => kind).increment(0);
        }
    }
    // Registered without a sample: the histogram's series appear at the first verdict.
    let _ = metrics::histogram!(ATTRIBUTION_DELAY, "node" => n());
}

/// Registers an exporter's series at 0 (see [`init_collector`]); `exporter` is its id.
pub fn init_exporter(exporter: &str) {
    describe();
    for name in [EXPORTER_BATCHES_DROPPED, EXPORTER_BATCHES_SENT] {
        metrics::counter!(name, "exporter" => exporter.to_owned()).increment(0);
    }
    metrics::gauge!(EXPORTER_BUFFERED, "exporter" => exporter.to_owned()).increment(0.0);
}

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
