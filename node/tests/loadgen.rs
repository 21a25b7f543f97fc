//! `tenure loadgen` end to end, small: two regions of one collector process each, a
//! paced load for a few seconds. Checks that the report is sane — flows attributed and
//! measured, none lost, none misattributed — not how fast anything was.

use std::process::Command;

fn field(line: &str, name: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_small_load_run_reports_attributed_flows_and_loses_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args([
            "loadgen",
            "--regions",
            "2",
            "--collectors-per-region",
            "1",
            "--exporters-per-region",
            "2",
            "--ips-per-region",
            "400",
            "--heartbeat-interval-ms",
            "300",
            "--warmup-secs",
            "2",
            "--duration-secs",
            "3",
            "--rate",
            "4000",
            "--batch-flows",
            "500",
            // Flows gathered up to 100 ms per batch (the exporters' gathering is tested too).
            "--send-interval-ms",
            "100",
            // Written into the collectors' configs, which reject a key they do not know.
            "--journal-fsync-interval-ms",
            "20",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("running tenure loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadgen failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    let flows_line = stdout
        .lines()
        .find(|l| l.starts_with("flows: "))
        .unwrap_or_else(|| panic!("no flows line in:\n{stdout}"));
    let get =
        |line: &str, name: &str| field(line, name).unwrap_or_else(|| panic!("{name} in {line:?}"));
    assert!(get(result, "flows_per_cpu_sec") > 0.0, "{result}");
    assert!(get(result, "p99_attribution_delay_ms") > 0.0, "{result}");
    assert!(get(result, "bytes_per_tracked_ip") > 0.0, "{result}");
    let ratio = get(result, "replication_bytes_ratio_vs_broadcast_at_30_nodes");
    assert!(ratio > 0.0 && ratio < 0.2, "{result}");
    let acked = get(flows_line, "acked");
    assert!(
        acked > 5_000.0,
        "most of ~20,000 paced flows are acknowledged: {flows_line}"
    );
    assert_eq!(get(flows_line, "lost"), 0.0, "{flows_line}");
    assert_eq!(get(flows_line, "misattributed"), 0.0, "{flows_line}");
    assert!(
        get(flows_line, "emitted") >= acked,
        "every acknowledged flow is in a sink: {flows_line}"
    );
    let attributed = get(flows_line, "attributed(heartbeat)");
    assert!(
        attributed > 0.9 * acked,
        "nearly every flow is attributed: {flows_line}"
    );
    let batches_line = stdout
        .lines()
        .find(|l| l.starts_with("exporter batches: "))
        .unwrap_or_else(|| panic!("no exporter batches line in:\n{stdout}"));
    let per_batch = get(batches_line, "flows_per_batch");
    assert!(get(batches_line, "acknowledged") > 0.0, "{batches_line}");
    assert!(
        per_batch > 0.0 && per_batch <= 500.0,
        "batches hold flows, at most --batch-flows: {batches_line}"
    );
}
