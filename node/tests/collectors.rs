//! Real `tenure collector` processes on loopback: configuration files, ports chosen at run
//! time, exporter batches over real sealed sockets, results read back from the sink files
//! and over HTTP. Waits poll against deadlines; children are killed on drop.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{bail, Context};
use tenure_gossip::wire::{self, AckStatus, Direction, Message};
use tenure_node::exporter::Client;
use tenure_node::httpc;
use tenure_node::shell::transport::Crypto;

const KEY_HEX: &str = "7465737420636c7573746572206b6579202d206e6f7420666f722070726f6421";
const TOKEN: &str = "test-token";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const RESULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A collector process of the cluster (killed on drop), with its name and sink.
struct Collector {
    process: common::Collector,
    node_id: String,
    sink: PathBuf,
}

impl std::ops::Deref for Collector {
    type Target = common::Collector;
    fn deref(&self) -> &common::Collector {
        &self.process
    }
}

impl std::ops::DerefMut for Collector {
    fn deref_mut(&mut self) -> &mut common::Collector {
        &mut self.process
    }
}

fn config_text(
    node_id: &str,
    region: &str,
    prefix: &str,
    other: (&str, &str),
    seed: Option<SocketAddr>,
    sink: &Path,
) -> String {
    format!(
        r#"node_id = "{node_id}"
region = "{region}"
prefixes = ["{prefix}"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
seeds = [{seeds}]
heartbeat_interval_ms = 500
event_feed_token = "{TOKEN}"
shutdown_grace_ms = 2000
cluster_key = {{ key_hex = "{KEY_HEX}" }}
# Exporters here seal with the cluster key (test setup, not a deployment).
dev_exporters_use_cluster_key = true
# The scenarios state claims up to ~20 s ahead of now, so that no clock wait is needed.
claim_skew_max_ms = 60000
sink = {{ kind = "files", dir = "{sink}", roll_interval_ms = 3600000 }}
data_dir = "{sink}-data"

[engine]
skew_margin_ms = 200
pending_deadline_ms = 3000

[regions]
"{other_region}" = ["{other_prefix}"]
"#,
        seeds = seed.map(|s| format!("\"{s}\"")).unwrap_or_default(),
        sink = sink.display(),
        other_region = other.0,
        other_prefix = other.1,
    )
}

fn start(
    dir: &Path,
    node_id: &str,
    region: &str,
    prefix: &str,
    other: (&str, &str),
    seed: Option<SocketAddr>,
) -> anyhow::Result<Collector> {
    let sink = dir.join(format!("sink-{node_id}"));
    let path = dir.join(format!("{node_id}.toml"));
    std::fs::write(
        &path,
        config_text(node_id, region, prefix, other, seed, &sink),
    )?;
    Ok(Collector {
        process: common::spawn_collector(&path, "warn")?,
        node_id: node_id.to_owned(),
        sink,
    })
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, body) =
        httpc::request(addr, "GET", path, None, None, Duration::from_secs(5)).await?;
    let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    Ok((status, value))
}

/// Every collector sees the others in the WAN pool, its region's ring is complete and its
/// handoff is done.
async fn wait_ready(collectors: &[&Collector], ring_sizes: &[usize]) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let mut ready = 0;
        for (c, ring) in collectors.iter().zip(ring_sizes) {
            let (_, cluster) = get(c.http, "/v1/cluster").await?;
            let wan = cluster["wan_members"].as_array().map_or(0, Vec::len);
            let members = cluster["ring"]["members"].as_array().map_or(0, Vec::len);
            if wan == collectors.len() - 1 && members == *ring && cluster["ready"] == true {
                ready += 1;
            }
        }
        if ready == collectors.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("collectors not ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn flow(id: u128, local: &str, remote: &str, start_ms: u64) -> wire::Flow {
    wire::Flow {
        flow_id: id,
        start_ms,
        end_ms: start_ms + 100,
        bytes_sent: 1_000,
        bytes_received: 5_000,
        segs_in: 5,
        segs_out: 5,
        retransmits: 0,
        rtt_us: 0,
        local: wire::LocalEnd::Workload(0),
        local_ip: local.parse().expect("ip"),
        remote_ip: remote.parse().expect("ip"),
        local_port: 40_000,
        remote_port: 8080,
        direction: Direction::Outbound,
        ongoing: false,
    }
}

fn claim(ip: &str, workload: u32, since_ms: u64, until_ms: u64) -> wire::Claim {
    wire::Claim {
        ip: ip.parse().expect("ip"),
        workload,
        instance: 0,
        since_ms,
        until_ms,
    }
}

async fn send(
    addr: SocketAddr,
    exporter_id: u64,
    batch: wire::FlowBatch,
) -> anyhow::Result<AckStatus> {
    let key = tenure_node::config::parse_key(KEY_HEX)?;
    let crypto = Crypto::new(1, &key, None, exporter_id, common::now_ms());
    let mut client = Client::connect(addr, &crypto, Duration::from_secs(5)).await?;
    let id = batch.batch_id;
    client.send(&crypto, &Message::FlowBatch(batch)).await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), client.recv(&crypto)).await??;
        if let Message::Ack(a) = message {
            if a.batch_id == id {
                return Ok(a.status);
            }
        }
    }
}

/// Every sink line of every collector, by flow id.
fn sink_lines(collectors: &[&Collector]) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut lines: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for c in collectors {
        let Ok(entries) = std::fs::read_dir(&c.sink) else {
            continue;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    let id = v["flow_id"].as_str().unwrap_or_default().to_owned();
                    lines.entry(id).or_default().push(v);
                }
            }
        }
    }
    lines
}

fn sigterm(c: &Collector) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_attribute_cross_region_and_reused_ips() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = ("a", "10.1.0.0/16");
    let b = ("b", "10.2.0.0/16");
    let a0 = start(dir.path(), "a0", a.0, a.1, b, None)?;
    let a1 = start(dir.path(), "a1", a.0, a.1, b, Some(a0.gossip))?;
    let b0 = start(dir.path(), "b0", b.0, b.1, a, Some(a0.gossip))?;
    let all = [&a0, &a1, &b0];
    wait_ready(&all, &[2, 2, 1]).await?;

    // Ownership: 10.1.0.100 belonged to old-svc, was freed and reused by new-svc. Times
    // are ahead of now (claims may state up to a minute ahead), so no clock wait is needed.
    let t0 = common::now_ms() + 1_000;
    let reused = "10.1.0.100";
    let a_batch = wire::FlowBatch {
        batch_id: 1,
        exporter_id: 11,
        hops: 0,
        sent_ms: 0,
        region: "a".into(),
        dictionary: vec!["gateway".into(), "old-svc".into(), "new-svc".into()],
        flows: vec![
            flow(1, "10.1.0.10", reused, t0 + 5_000),
            flow(2, "10.1.0.10", reused, t0 + 15_000),
            flow(3, "10.1.0.10", "10.2.0.50", t0 + 5_000),
            flow(4, "10.1.0.10", "198.51.100.7", t0 + 5_000),
            // Inside the gap between the two tenures: must never be attributed.
            flow(5, "10.1.0.10", reused, t0 + 10_200),
        ],
        claims: vec![
            claim("10.1.0.10", 0, t0, t0 + 20_000),
            claim(reused, 1, t0, t0 + 10_000),
            claim(reused, 2, t0 + 10_500, t0 + 20_000),
        ],
    };
    let b_batch = wire::FlowBatch {
        batch_id: 1,
        exporter_id: 21,
        hops: 0,
        sent_ms: 0,
        region: "b".into(),
        dictionary: vec!["b-svc".into()],
        flows: Vec::new(),
        claims: vec![claim("10.2.0.50", 0, t0, t0 + 20_000)],
    };
    assert_eq!(send(b0.data, 21, b_batch).await?, AckStatus::Accepted);
    assert_eq!(send(a1.data, 11, a_batch).await?, AckStatus::Accepted);

    // A batch for the wrong region is refused.
    let wrong = wire::FlowBatch {
        batch_id: 2,
        exporter_id: 21,
        hops: 0,
        sent_ms: 0,
        region: "b".into(),
        dictionary: Vec::new(),
        flows: Vec::new(),
        claims: Vec::new(),
    };
    assert!(matches!(
        send(a0.data, 21, wrong).await?,
        AckStatus::Rejected(_)
    ));

    let ids = |n: u128| format!("{n:032x}");
    let deadline = Instant::now() + RESULT_TIMEOUT;
    let lines = loop {
        let lines = sink_lines(&all);
        if (1..=5).all(|n| lines.contains_key(&ids(n))) {
            break lines;
        }
        if Instant::now() > deadline {
            bail!(
                "flows missing from the sinks after {RESULT_TIMEOUT:?}: have {:?}",
                lines.keys().collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let verdict = |n: u128| -> (String, serde_json::Value) {
        let v = &lines[&ids(n)][0];
        (
            v["result"].as_str().unwrap_or_default().to_owned(),
            v["remote"]["workload"].clone(),
        )
    };
    assert_eq!(
        verdict(1),
        ("attributed".into(), "old-svc".into()),
        "before the reuse: the old owner"
    );
    assert_eq!(
        verdict(2),
        ("attributed".into(), "new-svc".into()),
        "after the reuse: the new owner"
    );
    assert_eq!(
        verdict(3),
        ("attributed".into(), "b-svc".into()),
        "cross-region flow attributed in region b"
    );
    assert_eq!(lines[&ids(4)][0]["source"], "external");
    assert_eq!(
        verdict(5).0,
        "unattributed",
        "a flow in the gap is never attributed"
    );
    let reason = lines[&ids(5)][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason == "no_owner" || reason == "ambiguous", "{reason}");
    assert_eq!(lines[&ids(1)][0]["local"]["workload"], "gateway");

    // HTTP: ownership at a time, ranges, dependencies, metrics, bad parameters.
    let mut answers = Vec::new();
    for c in [&a0, &a1] {
        let (status, v) = get(c.http, &format!("/v1/ips/{reused}/owner?at={}", t0 + 5_000)).await?;
        assert_eq!(status, 200);
        if v["this_node_owns"] == true {
            answers.push(v);
        }
    }
    assert!(!answers.is_empty(), "some node owns the IP");
    for v in &answers {
        assert_eq!(v["result"], "attributed", "{v}");
        assert_eq!(v["workload"], "old-svc", "{v}");
    }
    let owner = answers[0]["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let owner_http = if owner == a0.node_id {
        a0.http
    } else {
        a1.http
    };
    let (_, ranges) = get(owner_http, &format!("/v1/ips/{reused}/ranges")).await?;
    assert_eq!(
        ranges["segments"].as_array().map_or(0, Vec::len),
        2,
        "{ranges}"
    );
    let (status, _) = get(owner_http, "/v1/ips/not-an-ip/ranges").await?;
    assert_eq!(status, 400);
    let (status, v) = get(owner_http, &format!("/v1/ips/{reused}/owner")).await?;
    assert_eq!(status, 400, "{v}");
    let (status, v) = get(owner_http, &format!("/v1/ips/{reused}/owner?at=yesterday")).await?;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap_or_default().contains("RFC 3339"),
        "{v}"
    );
    let (status, _) = get(owner_http, "/v1/dependencies?since=5&until=1").await?;
    assert_eq!(status, 400);

    let mut edges = Vec::new();
    for c in all {
        let (status, v) = get(
            c.http,
            &format!("/v1/dependencies?since={}&until={}", t0, t0 + 60_000),
        )
        .await?;
        assert_eq!(status, 200);
        edges.extend(v["edges"].as_array().cloned().unwrap_or_default());
    }
    assert!(
        edges
            .iter()
            .any(|e| e["from"] == "gateway" && e["to"] == "old-svc" && e["flows"] == 1),
        "{edges:?}"
    );
    let mut all_metrics = String::new();
    for c in all {
        let (status, metrics) = httpc::request(
            c.http,
            "GET",
            "/metrics",
            None,
            None,
            Duration::from_secs(5),
        )
        .await?;
        assert_eq!(status, 200);
        all_metrics.push_str(&metrics);
    }
    assert!(
        all_metrics.contains("tenure_flows_out_total{"),
        "{all_metrics}"
    );
    assert!(
        all_metrics.contains("tenure_claims_applied_total{"),
        "{all_metrics}"
    );
    // The process's own, for flows per CPU-second and memory in production.
    for name in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
    ] {
        assert!(all_metrics.contains(name), "{name}in {all_metrics}");
    }
    assert!(
        all_metrics.contains("tenure_attribution_delay_seconds_bucket{"),
        "{all_metrics}"
    );
    let (status, _) = get(a0.http, "/healthz").await?;
    assert_eq!(status, 200);

    // The event feed needs the token.
    let event =
        format!("{{\"ip\":\"10.1.0.5\",\"kind\":\"assign\",\"owner\":\"lb\",\"at\":{t0}}}\n");
    let (status, _) = httpc::request(
        a0.http,
        "POST",
        "/v1/ip-events",
        Some(&event),
        Some("wrong"),
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(status, 401);
    let (status, body) = httpc::request(
        a0.http,
        "POST",
        "/v1/ip-events",
        Some(&event),
        Some(TOKEN),
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = httpc::request(
        a0.http,
        "POST",
        "/v1/ip-events",
        Some("{not json"),
        Some(TOKEN),
        Duration::from_secs(5),
    )
    .await?;
    assert_eq!(status, 400);

    // Graceful shutdown on SIGTERM.
    for c in all {
        sigterm(c)?;
    }
    let mut collectors = vec![a0, a1, b0];
    let deadline = Instant::now() + Duration::from_secs(20);
    for c in &mut collectors {
        loop {
            if let Some(status) = c.child.try_wait()? {
                assert!(status.success(), "{} exited with {status}", c.node_id);
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not exit after SIGTERM", c.node_id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[test]
fn demo_reports_no_misattribution() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args(["demo", "--duration-secs", "8", "--no-capture", "--dir"])
        .arg(dir.path())
        .env("TENURE_LOG", "error")
        .output()
        .context("running tenure demo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .with_context(|| {
            format!(
                "no RESULT line in:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let field = |name: &str| -> u64 {
        result
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    assert_eq!(field("misattributed"), 0, "{result}");
    assert!(
        field("flows") > 100 && field("flows") != u64::MAX,
        "{result}"
    );
    assert_eq!(
        field("flows"),
        field("attributed") + field("unattributed"),
        "{result}"
    );
    assert!(output.status.success(), "{stdout}");
    Ok(())
}

/// A member whose HTTP address is unknown (no `peer_http_addrs`, different ports) makes
/// the cluster-wide dependency answer `partial`, naming the member, instead of a silently
/// smaller graph; and an address that reaches the wrong node is not merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_say_partial_when_a_member_cannot_be_asked() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let other = ("eu-west", "10.2.0.0/16");
    let a = start(dir.path(), "part-a", "us-east", "10.1.0.0/16", other, None)?;
    let b = start(
        dir.path(),
        "part-b",
        "us-east",
        "10.1.0.0/16",
        other,
        Some(a.gossip),
    )?;
    wait_ready(&[&a, &b], &[2, 2]).await?;
    // a asks b at a's own HTTP port (the default guess), where a itself answers.
    let (status, answer) = get(a.http, "/v1/dependencies").await?;
    anyhow::ensure!(status == 200, "{status} {answer}");
    anyhow::ensure!(answer["partial"] == true, "{answer}");
    anyhow::ensure!(
        answer["nodes_answered"] == serde_json::json!(["part-a"]),
        "{answer}"
    );
    let missing = &answer["nodes_missing"];
    anyhow::ensure!(missing[0]["node_id"] == "part-b", "{answer}");
    anyhow::ensure!(
        missing[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("answered as node")),
        "{answer}"
    );
    // The local scope never fans out.
    let (status, local) = get(b.http, "/v1/dependencies?scope=local").await?;
    anyhow::ensure!(status == 200 && local["scope"] == "local", "{local}");
    anyhow::ensure!(local.get("partial").is_none(), "{local}");
    Ok(())
}

/// Both ends of each connection run exporters and report it: the sink keeps one line per
/// socket, with its TCP health, and `/v1/dependencies` counts each connection once (the
/// client's record), with the client's RTT and retransmits. A server's record whose client
/// runs no exporter (an external address) still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reported_by_both_ends_counts_once() -> anyhow::Result<()> {
    const CONNECTIONS: u16 = 5;
    let dir = tempfile::tempdir()?;
    let c = start(
        dir.path(),
        "both",
        "us-east",
        "10.1.0.0/16",
        ("eu-west", "10.2.0.0/16"),
        None,
    )?;
    wait_ready(&[&c], &[1]).await?;
    let t0 = common::now_ms() + 1_000;
    let (web, db) = ("10.1.0.10", "10.1.0.20");
    let mut client_flows = Vec::new();
    let mut server_flows = Vec::new();
    for i in 0..CONNECTIONS {
        let start_ms = t0 + 1_000 + u64::from(i);
        let mut client = flow(100 + u128::from(i), web, db, start_ms);
        client.local_port = 41_000 + i;
        client.remote_port = 5432;
        client.rtt_us = 200 + 100 * u32::from(i);
        client.retransmits = 1;
        let mut server = flow(200 + u128::from(i), db, web, start_ms);
        server.direction = Direction::Inbound;
        server.local_port = 5432;
        server.remote_port = 41_000 + i;
        server.rtt_us = 50_000;
        server.retransmits = 7;
        client_flows.push(client);
        server_flows.push(server);
    }
    let mut external = flow(300, db, "198.51.100.7", t0 + 1_000);
    external.direction = Direction::Inbound;
    external.rtt_us = 30_000;
    server_flows.push(external);
    let batch = |exporter_id: u64, name: &str, ip: &str, flows: Vec<wire::Flow>| wire::FlowBatch {
        batch_id: 1,
        exporter_id,
        hops: 0,
        sent_ms: 0,
        region: "us-east".into(),
        dictionary: vec![name.into()],
        flows,
        claims: vec![claim(ip, 0, t0, t0 + 20_000)],
    };
    let web_batch = batch(31, "web", web, client_flows);
    let db_batch = batch(32, "db", db, server_flows);
    assert_eq!(send(c.data, 31, web_batch).await?, AckStatus::Accepted);
    assert_eq!(send(c.data, 32, db_batch).await?, AckStatus::Accepted);

    let wanted = 2 * usize::from(CONNECTIONS) + 1;
    let deadline = Instant::now() + RESULT_TIMEOUT;
    let lines = loop {
        let lines = sink_lines(&[&c]);
        if lines.len() >= wanted {
            break lines;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {wanted} sink lines after {RESULT_TIMEOUT:?}",
                lines.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(lines.len(), wanted, "one line per socket: {lines:?}");
    for line in lines.values().flatten() {
        assert_eq!(line["result"], "attributed", "{line}");
        for field in ["segs_in", "segs_out", "retransmits", "rtt_us"] {
            assert!(line[field].is_u64(), "{field} in {line}");
        }
    }
    let client_line = &lines[&format!("{:032x}", 101)][0];
    assert_eq!(
        (&client_line["rtt_us"], &client_line["retransmits"]),
        (&serde_json::json!(300), &serde_json::json!(1)),
        "{client_line}"
    );

    let (status, answer) = get(
        c.http,
        &format!("/v1/dependencies?since={t0}&until={}", t0 + 60_000),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let edges = answer["edges"].as_array().context("edges")?;
    let edge = |from: &str, to: &str| {
        edges
            .iter()
            .find(|e| e["from"] == from && e["to"] == to)
            .cloned()
    };
    let web_db = edge("web", "db").context("web → db")?;
    assert_eq!(web_db["flows"], u64::from(CONNECTIONS), "{answer}");
    assert_eq!(web_db["bytes"], 6_000 * u64::from(CONNECTIONS), "{web_db}");
    assert_eq!(web_db["retransmits"], u64::from(CONNECTIONS), "{web_db}");
    assert_eq!(web_db["rtt_samples"], u64::from(CONNECTIONS), "{web_db}");
    assert_eq!(
        (
            &web_db["rtt_us_min"],
            &web_db["rtt_us_mean"],
            &web_db["rtt_us_max"]
        ),
        (
            &serde_json::json!(200),
            &serde_json::json!(400),
            &serde_json::json!(600)
        ),
        "the clients' RTTs: {web_db}"
    );
    let ext = edge("external", "db").context("external → db")?;
    assert_eq!(ext["flows"], 1, "{answer}");
    assert_eq!(ext["rtt_us_max"], 30_000, "{ext}");
    assert_eq!(
        answer["totals"]["flows"],
        u64::from(CONNECTIONS) + 1,
        "{answer}"
    );
    Ok(())
}
