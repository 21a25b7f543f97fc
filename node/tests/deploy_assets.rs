//! The Grafana dashboard in `node/deploy/grafana/` asks only for metrics the node exports,
//! and shows every one of tenure's own (and the process's CPU time).

use std::collections::BTreeSet;

use anyhow::{ensure, Context};
use serde_json::Value;
use tenure_node::shell::metrics as m;

/// Every metric name the node exports (`node/src/shell/metrics.rs`).
const EXPORTED: [&str; 17] = [
    m::FLOWS_IN,
    m::FLOWS_OUT,
    m::FLOWS_PENDING,
    m::FLOWS_FORWARDED,
    m::RANGES,
    m::IPS_TRACKED,
    m::CLAIMS_APPLIED,
    m::CLAIMS_REJECTED,
    m::CONFLICTS,
    m::MEMBERS,
    m::FRAMES_REJECTED,
    m::FRAMES_DROPPED,
    m::BATCHES,
    m::ATTRIBUTION_DELAY,
    m::EXPORTER_BATCHES_DROPPED,
    m::EXPORTER_BATCHES_SENT,
    m::EXPORTER_BUFFERED,
];

/// The process's own metric names that `/metrics` serves (`metrics_process`, through
/// [`m::render`]), read from what it renders in this test's process.
fn served_process_metrics() -> BTreeSet<String> {
    m::render()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split([' ', '{']).next())
        .filter(|name| name.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

#[test]
fn grafana_dashboard_uses_exported_metrics() -> anyhow::Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tenure.json");
    let text = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    let dashboard: Value = serde_json::from_str(&text).context("the dashboard is JSON")?;
    ensure!(dashboard["title"] == "tenure", "title");
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    ensure!(!all.is_empty(), "the dashboard has queries");
    let exported: BTreeSet<&str> = EXPORTED.into_iter().collect();
    let process = served_process_metrics();
    ensure!(
        process.contains("process_cpu_seconds_total"),
        "/metrics serves the process CPU time: {process:?}"
    );
    let mut used = BTreeSet::new();
    for expr in &all {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("process_") {
                ensure!(
                    process.contains(word),
                    "the dashboard queries {word}, which /metrics does not serve: {expr}"
                );
                used.insert(word.to_owned());
                continue;
            }
            if !word.starts_with("tenure_") {
                continue;
            }
            let name = word.strip_suffix("_bucket").unwrap_or(word);
            ensure!(
                exported.contains(name),
                "the dashboard queries {name}, which the node does not export: {expr}"
            );
            used.insert(name.to_owned());
        }
    }
    for name in exported.into_iter().chain(["process_cpu_seconds_total"]) {
        ensure!(used.contains(name), "the dashboard does not show {name}");
    }
    Ok(())
}
