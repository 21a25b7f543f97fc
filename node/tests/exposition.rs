//! What a Prometheus server scrapes from a running collector and a running exporter: an
//! exposition `promtool check metrics` accepts (HELP on every metric, names by the
//! conventions), the series an alert or a dashboard panel needs present at 0 from start,
//! every metric the Grafana dashboard queries, and an idle connection counted apart from
//! rejected frames.
//!
//! Without `promtool` on the PATH the test says so loudly and skips that check only.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tenure_node::httpc;
use tenure_node::shell::metrics as m;

const CLUSTER_KEY_HEX: &str = "636c7573746572206b657920666f7220746865206578706f736974696f6e2074";
const EXPORTER_KEY_HEX: &str = "6578706f72746572206b657920666f722074686520657870736974696f6e2074";
const IDLE_TIMEOUT_MS: u64 = 1_000;
const DEADLINE: Duration = Duration::from_secs(60);

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Straight to the terminal as well: libtest captures stderr of passing tests.
fn loudly(line: &str) {
    let line = format!("{line}\n");
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| tty.write_all(line.as_bytes()));
    eprint!("{line}");
}

fn scrape(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = rt
        .block_on(httpc::request(
            addr,
            "GET",
            "/metrics",
            None,
            None,
            Duration::from_secs(5),
        ))
        .with_context(|| format!("GET http://{addr}/metrics"))?;
    ensure!(status == 200, "GET http://{addr}/metrics: {status}: {body}");
    Ok(body)
}

/// The value of the sample `name{labels}` (labels exactly as rendered), if present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let found = rest.trim_end_matches('}');
            let all = labels
                .iter()
                .all(|(k, v)| found.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok()).flatten()
        })
}

/// Metric names of the samples in an exposition (histogram series by their family name).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split([' ', '{']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `tenure_*` family in the exposition has HELP and TYPE lines.
fn check_described(text: &str, what: &str) -> anyhow::Result<()> {
    for name in families(text).iter().filter(|n| n.starts_with("tenure_")) {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let base = name.strip_suffix(s)?;
                text.contains(&format!("# TYPE {base} histogram"))
                    .then_some(base)
            })
            .unwrap_or(name);
        ensure!(
            text.contains(&format!("# HELP {family} ")),
            "{what}: {family} has no HELP"
        );
        ensure!(
            text.contains(&format!("# TYPE {family} ")),
            "{what}: {family} has no TYPE"
        );
    }
    Ok(())
}

/// `promtool check metrics` on the exposition; `false` when promtool is not installed.
fn promtool(text: &str, what: &str) -> anyhow::Result<bool> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).context("running promtool"),
    };
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool check metrics on the {what}'s scrape: {}\n{said}",
        out.status
    );
    Ok(true)
}

/// The `tenure_*` and `process_*` names the dashboard's queries use.
fn dashboard_metrics() -> anyhow::Result<BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/tenure.json");
    let text = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    let dashboard: serde_json::Value = serde_json::from_str(&text).context(path)?;
    let mut queries = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(e)) => {
                            out.push(e.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Null
            | serde_json::Value::Bool(_)
            | serde_json::Value::Number(_)
            | serde_json::Value::String(_) => {}
        }
    }
    walk(&dashboard, &mut queries);
    Ok(queries
        .iter()
        .flat_map(|q| q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("tenure_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn write_collector(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            r#"node_id = "solo"
region = "local"
prefixes = ["10.99.0.0/16"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
shutdown_grace_ms = 1000
conn_idle_timeout_ms = {IDLE_TIMEOUT_MS}
cluster_key = {{ key_id = 1, key_hex = "{CLUSTER_KEY_HEX}" }}
exporter_key = {{ key_id = 2, key_hex = "{EXPORTER_KEY_HEX}" }}
sink = {{ kind = "files", dir = "{sink}" }}
data_dir = "{data}"

[engine]
skew_margin_ms = 200
pending_deadline_ms = 5000
settle_ms = 0

[regions]
"elsewhere" = ["10.98.0.0/16"]
"#,
            sink = dir.join("sink").display(),
            data = dir.join("data").display(),
        ),
    )?;
    Ok(path)
}

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "a process test waits against the wall clock"
)]
fn scrapes_pass_promtool_and_serve_the_dashboard() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let collector = common::spawn_collector(&write_collector(dir.path())?, "warn")?;

    // From start, before any exporter, peer or flow: the series alerts and panels use.
    let first = scrape(&rt, collector.http)?;
    let node = [("node", "solo")];
    for (name, labels) in [
        (m::BATCHES, &[("node", "solo"), ("status", "busy")][..]),
        (m::CONFLICTS, &node[..]),
        (m::FRAMES_DROPPED, &node[..]),
        (m::CLOCK_OFFSET, &node[..]),
        (m::KEY_RELOADS, &[("node", "solo"), ("result", "error")][..]),
        (
            m::CONNECTIONS_REFUSED,
            &[("node", "solo"), ("reason", "per_ip")][..],
        ),
        (
            m::FRAMES_REJECTED,
            &[("node", "solo"), ("reason", "timeout")][..],
        ),
        (
            m::FRAMES_REJECTED,
            &[("node", "solo"), ("reason", "auth")][..],
        ),
        (m::CONNECTIONS_IDLE_CLOSED, &node[..]),
        (m::FLOWS_IN, &node[..]),
        (m::FLOWS_PENDING, &node[..]),
        (
            m::FLOWS_OUT,
            &[
                ("node", "solo"),
                ("result", "unattributed"),
                ("detail", "no_owner"),
            ][..],
        ),
        (
            m::FLOWS_FORWARDED,
            &[("node", "solo"), ("region", "elsewhere")][..],
        ),
        (
            m::PEER_BYTES_SENT,
            &[("node", "solo"), ("message", "ranges")][..],
        ),
        (
            m::MEMBERS,
            &[("node", "solo"), ("region", "local"), ("state", "down")][..],
        ),
    ] {
        ensure!(
            sample(&first, name, labels) == Some(0.0),
            "{name}{labels:?} is not 0 from start:\n{first}"
        );
    }
    check_described(&first, "collector at start")?;

    // A connection that sends nothing is closed after the idle timeout: counted as idle,
    // not as a rejected frame.
    let idle = TcpStream::connect(collector.data)?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(&rt, collector.http)?;
        if sample(&text, m::CONNECTIONS_IDLE_CLOSED, &node) == Some(1.0) {
            ensure!(
                sample(
                    &text,
                    m::FRAMES_REJECTED,
                    &[("node", "solo"), ("reason", "timeout")]
                ) == Some(0.0),
                "an idle close counted as a rejected frame:\n{text}"
            );
            break;
        }
        ensure!(
            Instant::now() < until,
            "the idle connection was not counted as closed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(idle);

    let exporter_http = free_port()?;
    let exporter_config = dir.path().join("exporter.toml");
    std::fs::write(
        &exporter_config,
        format!(
            r#"exporter_id = 7
region = "local"
collectors = ["{data}"]
heartbeat_interval_ms = 500
key = {{ key_id = 2, key_hex = "{EXPORTER_KEY_HEX}" }}
http_addr = "{exporter_http}"
source = {{ kind = "synthetic", prefix = "10.99.0.0/16", flows_per_sec = 50 }}
"#,
            data = collector.data
        ),
    )?;
    let _exporter = Proc(
        Command::new(env!("CARGO_BIN_EXE_tenure"))
            .args(["exporter", "--config"])
            .arg(&exporter_config)
            .env("TENURE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning tenure exporter")?,
    );

    // Until flows came out attributed and the exporter's batches were acknowledged.
    let deadline = Instant::now() + DEADLINE;
    let (collector_text, exporter_text) = loop {
        let c = scrape(&rt, collector.http)?;
        let e = scrape(&rt, exporter_http).ok();
        let attributed = sample(
            &c,
            m::FLOWS_OUT,
            &[("result", "attributed"), ("detail", "heartbeat")],
        )
        .unwrap_or(0.0);
        let acked = e
            .as_deref()
            .and_then(|e| sample(e, m::EXPORTER_BATCHES_SENT, &[("exporter", "7")]))
            .unwrap_or(0.0);
        if let (true, true, Some(e)) = (attributed > 0.0, acked > 0.0, e) {
            break (c, e);
        }
        if Instant::now() > deadline {
            bail!("no attributed flow and acked batch in {DEADLINE:?}: attributed {attributed}, acked {acked}\n{c}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    check_described(&collector_text, "collector")?;
    check_described(&exporter_text, "exporter")?;

    let mut promtool_ran = true;
    for (text, what) in [
        (&first, "collector at start"),
        (&collector_text, "collector"),
        (&exporter_text, "exporter"),
    ] {
        promtool_ran &= promtool(text, what)?;
    }
    if !promtool_ran {
        loudly("SKIPPED (promtool not installed): promtool check metrics on the collector's and the exporter's scrapes");
    }

    let scraped: BTreeSet<String> = families(&collector_text)
        .union(&families(&exporter_text))
        .cloned()
        .collect();
    let wanted = dashboard_metrics()?;
    ensure!(
        wanted.contains(m::FLOWS_PENDING),
        "the dashboard's queries: {wanted:?}"
    );
    let missing: Vec<_> = wanted.difference(&scraped).collect();
    ensure!(
        missing.is_empty(),
        "the dashboard queries metrics absent from the scrapes: {missing:?}"
    );
    Ok(())
}
