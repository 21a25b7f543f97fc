//! The Parquet sink, read back by an independent reader: pyarrow (the Arrow C++
//! implementation), installed with pip into `$CARGO_TARGET_TMPDIR/pyarrow` on first use.
//! Without python3 or pip the pyarrow check prints `SKIPPED (needs pip)` and the rest of
//! the test (rolling, file names, the Rust reader) still runs.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{ensure, Context};
use serde_json::Value;
use tenure_attribution::{Attribution, Reason, Verdict};
use tenure_gossip::wire::{Direction, LocalReason};
use tenure_node::core::{EmittedFlow, FlowRecord, Local};
use tenure_node::sink::ParquetFiles;

/// Writes straight to stderr: libtest captures `eprintln!`, and a skip must be seen.
fn loud(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn flow(id: u128, remote: &str, verdict: Verdict, start_ms: u64) -> EmittedFlow {
    EmittedFlow {
        record: FlowRecord {
            flow_id: id,
            local_ip: "10.1.0.10".parse().expect("ip"),
            local_port: 40_000 + (id as u16),
            remote_ip: remote.parse::<IpAddr>().expect("ip"),
            remote_port: 8080,
            // One local end the exporter vouched for no workload on.
            local: if id == 3 {
                Local::Unattributed(LocalReason::Changed)
            } else {
                Local::Workload(Arc::from("gateway"))
            },
            start_ms,
            end_ms: start_ms + 250,
            bytes_sent: 1_000 * id as u64,
            bytes_received: 7,
            segs_in: 10 + id as u64,
            segs_out: 20 + id as u64,
            retransmits: id as u64 - 1,
            rtt_us: 1_500 * id as u32,
            direction: Direction::Outbound,
            ongoing: id.is_multiple_of(2),
            exporter_id: 4242,
            exporter_region: Arc::from("us-east"),
            hops: 0,
        },
        verdict,
        waited_ms: 12,
        emitted_ms: start_ms + 1_000,
    }
}

/// Python with pyarrow importable: as installed, or with a `pip install --target` of it
/// (kept between runs). `None` (said loudly) when neither works.
fn pyarrow_python() -> Option<(String, Option<PathBuf>)> {
    let has = |pythonpath: Option<&Path>| {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", "import pyarrow.parquet"]);
        if let Some(p) = pythonpath {
            cmd.env("PYTHONPATH", p);
        }
        cmd.output().is_ok_and(|o| o.status.success())
    };
    if has(None) {
        return Some(("python3".to_owned(), None));
    }
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyarrow");
    if has(Some(&target)) {
        return Some(("python3".to_owned(), Some(target)));
    }
    loud(&format!(
        "parquet_sink: installing pyarrow with pip into {}",
        target.display()
    ));
    let install = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&target)
        .arg("pyarrow")
        .output();
    match install {
        Ok(o) if o.status.success() && has(Some(&target)) => {
            Some(("python3".to_owned(), Some(target)))
        }
        Ok(o) => {
            loud(&format!(
                "SKIPPED (needs pip and pyarrow: python3 -m pip install pyarrow): parquet_sink: pyarrow check: {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("pip failed")
            ));
            None
        }
        Err(e) => {
            loud(&format!(
                "SKIPPED (needs python3 with pip): parquet_sink: pyarrow check: {e}"
            ));
            None
        }
    }
}

const READ_BACK: &str = r#"
import glob, json, sys
import pyarrow.parquet as pq
rows, schema = [], None
for path in sorted(glob.glob(sys.argv[1] + "/*.parquet")):
    table = pq.read_table(path)
    schema = {f.name: [str(f.type), f.nullable] for f in table.schema}
    for row in table.to_pylist():
        for k in ("start_time", "end_time", "emitted_time"):
            row[k] = round(row[k].timestamp() * 1000)
        rows.append(row)
print(json.dumps({"schema": schema, "rows": rows}))
"#;

#[test]
fn parquet_files_roll_and_read_back_with_pyarrow() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t0 = 1_700_000_000_000u64;
    let flows = [
        flow(
            1,
            "10.1.0.20",
            Verdict::Attributed(Attribution::Heartbeat(Arc::from("checkout"))),
            t0,
        ),
        flow(
            2,
            "10.1.0.21",
            Verdict::Unattributed(Reason::Ambiguous),
            t0 + 1,
        ),
        flow(
            3,
            "93.184.216.34",
            Verdict::Attributed(Attribution::External),
            t0 + 2,
        ),
        flow(
            4,
            "10.1.0.5",
            Verdict::Attributed(Attribution::Event(Arc::from("lb-public"))),
            t0 + 3,
        ),
    ];
    // Rolled by time: two files, 10 s apart with a 5 s interval.
    let mut sink = ParquetFiles::new(dir.path(), 5_000, u64::MAX, 10, 1_024)?;
    sink.write(&flows[..2], t0)?;
    let partial: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        partial.len() == 1 && partial[0].ends_with(".parquet.partial"),
        "an open file is .partial: {partial:?}"
    );
    sink.write(&flows[2..], t0 + 10_000)?;
    sink.close()?;
    let mut names: Vec<String> = std::fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    ensure!(names.len() == 2, "two files after a time roll: {names:?}");
    ensure!(
        names
            .iter()
            .all(|n| n.starts_with("flows-") && n.ends_with(".parquet")),
        "closed files are renamed: {names:?}"
    );

    // Rolled by size, and the oldest pruned past files_max.
    let small = tempfile::tempdir()?;
    let mut sink = ParquetFiles::new(small.path(), u64::MAX, 1, 2, 1)?;
    for (i, f) in flows.iter().enumerate() {
        sink.write(std::slice::from_ref(f), t0 + i as u64)?;
    }
    sink.close()?;
    let kept = std::fs::read_dir(small.path())?.count();
    ensure!(kept == 2, "size rolls keep files_max files, got {kept}");

    let Some((python, pythonpath)) = pyarrow_python() else {
        return Ok(());
    };
    let mut cmd = Command::new(python);
    cmd.args(["-c", READ_BACK]).arg(dir.path());
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let out = cmd.output().context("running pyarrow")?;
    ensure!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Value = serde_json::from_slice(&out.stdout)?;
    let rows = read["rows"].as_array().context("rows")?;
    ensure!(rows.len() == 4, "4 rows, got {}", rows.len());
    let schema = &read["schema"];
    ensure!(
        schema["start_time"][0] == "timestamp[ms, tz=UTC]",
        "{schema}"
    );
    ensure!(schema["local_port"][0] == "uint16", "{schema}");
    for column in ["segs_in", "segs_out", "retransmits"] {
        ensure!(
            schema[column] == serde_json::json!(["uint64", false]),
            "{schema}"
        );
    }
    ensure!(
        schema["rtt_us"] == serde_json::json!(["uint32", false]),
        "{schema}"
    );
    ensure!(schema["remote_workload"][1] == true, "{schema}");
    ensure!(schema["local_workload"][1] == true, "{schema}");
    ensure!(schema["local_reason"][1] == true, "{schema}");
    ensure!(schema["flow_id"][1] == false, "{schema}");

    let expect = [
        ("checkout", "attributed", Some("heartbeat"), None),
        ("", "unattributed", None, Some("ambiguous")),
        ("", "attributed", Some("external"), None),
        ("lb-public", "attributed", Some("event"), None),
    ];
    for (i, (row, (workload, result, source, reason))) in rows.iter().zip(expect).enumerate() {
        let id = i as u64 + 1;
        ensure!(row["flow_id"] == format!("{id:032x}"), "row {i}: {row}");
        let (local, local_reason) = if id == 3 {
            (Value::Null, Value::from("local_changed"))
        } else {
            (Value::from("gateway"), Value::Null)
        };
        ensure!(row["local_workload"] == local, "row {i}: {row}");
        ensure!(row["local_reason"] == local_reason, "row {i}: {row}");
        ensure!(row["local_ip"] == "10.1.0.10", "row {i}: {row}");
        ensure!(row["local_port"] == 40_000 + id, "row {i}: {row}");
        ensure!(row["remote_port"] == 8080, "row {i}: {row}");
        let remote = if workload.is_empty() {
            Value::Null
        } else {
            Value::from(workload)
        };
        ensure!(row["remote_workload"] == remote, "row {i}: {row}");
        ensure!(row["result"] == result, "row {i}: {row}");
        ensure!(
            row["source"] == source.map_or(Value::Null, Value::from),
            "row {i}: {row}"
        );
        ensure!(
            row["reason"] == reason.map_or(Value::Null, Value::from),
            "row {i}: {row}"
        );
        ensure!(row["start_time"] == t0 + i as u64, "row {i}: {row}");
        ensure!(row["end_time"] == t0 + i as u64 + 250, "row {i}: {row}");
        ensure!(
            row["emitted_time"] == t0 + i as u64 + 1_000,
            "row {i}: {row}"
        );
        ensure!(row["waited_ms"] == 12, "row {i}: {row}");
        ensure!(row["bytes_sent"] == 1_000 * id, "row {i}: {row}");
        ensure!(row["bytes_received"] == 7, "row {i}: {row}");
        ensure!(row["segs_in"] == 10 + id, "row {i}: {row}");
        ensure!(row["segs_out"] == 20 + id, "row {i}: {row}");
        ensure!(row["retransmits"] == id - 1, "row {i}: {row}");
        ensure!(row["rtt_us"] == 1_500 * id, "row {i}: {row}");
        ensure!(row["direction"] == "outbound", "row {i}: {row}");
        ensure!(row["ongoing"] == id.is_multiple_of(2), "row {i}: {row}");
        ensure!(row["exporter_id"] == 4242, "row {i}: {row}");
        ensure!(row["exporter_region"] == "us-east", "row {i}: {row}");
    }
    ensure!(rows[2]["remote_ip"] == "93.184.216.34", "{}", rows[2]);
    Ok(())
}
