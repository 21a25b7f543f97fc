//! The admin surface of a real `tenure collector`: `/admin/clock` does not exist unless
//! `[admin] enable_faults` (404), wants the configured bearer token (401 otherwise), and
//! once set, its offset is the time the node's core runs on: a clock set two minutes back
//! refuses an exporter's claim about the real now as one from the future, and healing the
//! offset accepts the next.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tenure_gossip::wire::{self, AckStatus, Message};
use tenure_node::exporter::Client;
use tenure_node::httpc;
use tenure_node::shell::transport::Crypto;

const CLUSTER_KEY_HEX: &str = "61646d696e207465737420636c7573746572206b6579202d206e6f742070726f";
const EXPORTER_KEY_HEX: &str = "61646d696e2074657374206578706f72746572206b6579202d206e6f74207072";
const TOKEN: &str = "admin-test-token-0123456789";
/// How far ahead of the node's clock a claim may reach, in this test.
const CLAIM_SKEW_MAX_MS: u64 = 5_000;

fn start(dir: &Path, admin: &str) -> anyhow::Result<common::Collector> {
    std::fs::create_dir_all(dir)?;
    let sink = dir.join("sink");
    let path = dir.join("collector.toml");
    let text = format!(
        r#"node_id = "adm0"
region = "a"
prefixes = ["10.1.0.0/16"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
cluster_key = {{ key_id = 1, key_hex = "{CLUSTER_KEY_HEX}" }}
exporter_key = {{ key_id = 2, key_hex = "{EXPORTER_KEY_HEX}" }}
claim_skew_max_ms = {CLAIM_SKEW_MAX_MS}
sink = {{ kind = "files", dir = "{sink}" }}
data_dir = "{sink}-data"
{admin}
"#,
        sink = sink.display(),
    );
    std::fs::write(&path, text)?;
    common::spawn_collector(&path, "error")
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, text) =
        httpc::request(addr, method, path, body, token, Duration::from_secs(5)).await?;
    let value = if path == "/metrics" {
        serde_json::Value::String(text)
    } else {
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {text:?}"))?
    };
    Ok((status, value))
}

/// The counter `tenure_claims_rejected_total{reason="<reason>"}`.
async fn claims_rejected(addr: SocketAddr, reason: &str) -> anyhow::Result<u64> {
    let (_, text) = http(addr, "GET", "/metrics", None, None).await?;
    let label = format!("reason=\"{reason}\"");
    Ok(text
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("tenure_claims_rejected_total") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}

/// Sends one heartbeat (a claim for 10.1.0.5 until the real now) as exporter 7.
async fn heartbeat(addr: SocketAddr, batch_id: u64) -> anyhow::Result<AckStatus> {
    let key = tenure_node::config::parse_key(EXPORTER_KEY_HEX)?;
    let crypto = Crypto::new(2, &key, None, 7, common::now_ms() + batch_id);
    let now = common::now_ms();
    let message = Message::FlowBatch(wire::FlowBatch {
        batch_id,
        exporter_id: 7,
        hops: 0,
        sent_ms: 0,
        region: "a".into(),
        dictionary: vec!["web".into()],
        claims: vec![wire::Claim {
            ip: "10.1.0.5".parse()?,
            workload: 0,
            instance: 0,
            since_ms: now - 1_000,
            until_ms: now,
        }],
        flows: Vec::new(),
    });
    let mut client = Client::connect(addr, &crypto, Duration::from_secs(5)).await?;
    client.send(&crypto, &message).await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), client.recv(&crypto)).await??;
        if let Message::Ack(a) = m {
            if a.batch_id == batch_id {
                return Ok(a.status);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_clock_is_off_by_default_authenticated_and_shifts_the_core() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // Disabled (the default): the route does not exist, whatever the token.
    let off = start(&dir.path().join("off"), "")?;
    for token in [None, Some(TOKEN)] {
        let (status, _) = http(off.http, "GET", "/admin/clock", None, token).await?;
        assert_eq!(status, 404, "disabled GET with {token:?}");
        let (status, _) = http(
            off.http,
            "POST",
            "/admin/clock",
            Some(r#"{"offset_ms": 5000}"#),
            token,
        )
        .await?;
        assert_eq!(status, 404, "disabled POST with {token:?}");
    }
    drop(off);

    let on = start(
        &dir.path().join("on"),
        &format!("[admin]\nenable_faults = true\ntoken = \"{TOKEN}\"\n"),
    )?;
    // Wrong, truncated, extended or missing tokens: 401, and nothing changes.
    let wrong = TOKEN.replace('0', "1");
    for token in [
        None,
        Some(wrong.as_str()),
        Some(&TOKEN[..TOKEN.len() - 1]),
        Some(&format!("{TOKEN}x")),
    ] {
        let (status, _) = http(
            on.http,
            "POST",
            "/admin/clock",
            Some(r#"{"offset_ms": 5000}"#),
            token,
        )
        .await?;
        assert_eq!(status, 401, "POST with {token:?}");
        let (status, _) = http(on.http, "GET", "/admin/clock", None, token).await?;
        assert_eq!(status, 401, "GET with {token:?}");
    }
    let (status, state) = http(on.http, "GET", "/admin/clock", None, Some(TOKEN)).await?;
    assert_eq!(status, 200);
    assert_eq!(state["offset_ms"], 0, "{state}");

    // Bad bodies and offsets past a day: 400, the offset stays.
    for body in [
        "",
        "{}",
        r#"{"offset_ms": "soon"}"#,
        r#"{"offset_ms": 1, "x": 2}"#,
        r#"{"offset_ms": 86400001}"#,
        r#"{"offset_ms": -9223372036854775808}"#,
    ] {
        let (status, _) = http(on.http, "POST", "/admin/clock", Some(body), Some(TOKEN)).await?;
        assert_eq!(status, 400, "body {body:?}");
    }

    // Healthy clock: the claim is applied.
    assert_eq!(heartbeat(on.data, 1).await?, AckStatus::Accepted);
    let future_before = claims_rejected(on.http, "future").await?;

    // Two minutes back: a claim about the real now is from this node's future.
    let (status, state) = http(
        on.http,
        "POST",
        "/admin/clock",
        Some(r#"{"offset_ms": -120000}"#),
        Some(TOKEN),
    )
    .await?;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["offset_ms"], -120_000, "{state}");
    let (now, system) = (
        state["now_ms"].as_i64().context("now_ms")?,
        state["system_now_ms"].as_i64().context("system_now_ms")?,
    );
    assert!(
        (system - now - 120_000).abs() < 1_000,
        "node time {now} should be 120 s behind {system}"
    );
    assert_eq!(heartbeat(on.data, 2).await?, AckStatus::Accepted);
    let future_after = claims_rejected(on.http, "future").await?;
    if future_after != future_before + 1 {
        bail!("the claim from the node's future was not refused: {future_before} → {future_after}");
    }

    // Healed: the next claim is applied again.
    let (status, _) = http(
        on.http,
        "POST",
        "/admin/clock",
        Some(r#"{"offset_ms": 0}"#),
        Some(TOKEN),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(heartbeat(on.data, 3).await?, AckStatus::Accepted);
    assert_eq!(claims_rejected(on.http, "future").await?, future_after);
    Ok(())
}
