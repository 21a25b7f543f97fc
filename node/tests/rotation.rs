//! Exporter key rotation without downtime, against a real collector process under load:
//! the collector accepts the new key next to the old (SIGHUP), the exporter moves to the new
//! key, the collector retires the old one (SIGHUP). Every batch is acknowledged and every
//! flow reaches the sink; the retired key is refused afterwards.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use tenure_gossip::wire::{self, AckStatus, Direction, Message};
use tenure_node::exporter::Client;
use tenure_node::httpc;
use tenure_node::shell::transport::Crypto;
use tokio::time::Instant;

const CLUSTER_KEY_HEX: &str = "7465737420636c7573746572206b6579202d206e6f7420666f722070726f6421";
const OLD_KEY_HEX: &str = "6f6c64206578706f72746572206b6579202d206e6f7420666f722070726f6421";
const NEW_KEY_HEX: &str = "6e6577206578706f72746572206b6579202d206e6f7420666f722070726f6421";
const OLD_KEY_ID: u32 = 2;
const NEW_KEY_ID: u32 = 3;

fn config_text(dir: &Path, exporter_keys: &str) -> String {
    let sink = dir.join("sink");
    format!(
        r#"node_id = "r0"
region = "a"
prefixes = ["10.1.0.0/16"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
cluster_key = {{ key_id = 1, key_hex = "{CLUSTER_KEY_HEX}" }}
{exporter_keys}
sink = {{ kind = "files", dir = "{sink}" }}
data_dir = "{sink}-data"
"#,
        sink = sink.display(),
    )
}

fn key_line(name: &str, id: u32, hex: &str) -> String {
    format!("{name} = {{ key_id = {id}, key_hex = \"{hex}\" }}\n")
}

fn start(path: &Path) -> anyhow::Result<common::Collector> {
    common::spawn_collector(path, "error")
}

async fn reloads(http: SocketAddr) -> anyhow::Result<u64> {
    let (_, text) =
        httpc::request(http, "GET", "/metrics", None, None, Duration::from_secs(5)).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tenure_key_reloads_total") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}

/// Rewrites the config, sends SIGHUP and waits until the collector reports reload `n`.
async fn reload(
    collector: &common::Collector,
    path: &Path,
    text: &str,
    n: u64,
) -> anyhow::Result<()> {
    std::fs::write(path, text)?;
    let status = Command::new("kill")
        .args(["-HUP", &collector.child.id().to_string()])
        .status()?;
    assert!(status.success(), "kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(collector.http).await? < n {
        if Instant::now() > deadline {
            bail!("reload {n} not reported");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn exporter(id: u32, hex: &str) -> anyhow::Result<Arc<Crypto>> {
    let key = tenure_node::config::parse_key(hex)?;
    Ok(Arc::new(Crypto::new(id, &key, None, 1, common::now_ms())))
}

fn one_flow_batch(batch_id: u64) -> Message {
    let t = common::now_ms();
    Message::FlowBatch(wire::FlowBatch {
        batch_id,
        exporter_id: 1,
        hops: 0,
        sent_ms: 0,
        region: "a".into(),
        dictionary: vec!["web".into()],
        flows: vec![wire::Flow {
            flow_id: u128::from(batch_id),
            start_ms: t - 100,
            end_ms: t,
            bytes_sent: 1,
            bytes_received: 1,
            segs_in: 1,
            segs_out: 1,
            retransmits: 0,
            rtt_us: 0,
            local: wire::LocalEnd::Workload(0),
            local_ip: "10.1.0.5".parse().expect("ip"),
            // External: attributed at once, so every flow reaches the sink quickly.
            remote_ip: "198.51.100.9".parse().expect("ip"),
            local_port: 40_000,
            remote_port: 443,
            direction: Direction::Outbound,
            ongoing: false,
        }],
        claims: Vec::new(),
    })
}

/// One batch until it is accepted, with whatever key the exporter uses at the time.
async fn deliver(addr: SocketAddr, key: &Mutex<Arc<Crypto>>, batch_id: u64) -> anyhow::Result<u32> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let crypto = key.lock().expect("key lock").clone();
        let result = async {
            let mut client = Client::connect(addr, &crypto, Duration::from_secs(2)).await?;
            client.send(&crypto, &one_flow_batch(batch_id)).await?;
            loop {
                let m =
                    tokio::time::timeout(Duration::from_secs(5), client.recv(&crypto)).await??;
                if let Message::Ack(a) = m {
                    if a.batch_id == batch_id {
                        return anyhow::Ok(a.status);
                    }
                }
            }
        }
        .await;
        match result {
            Ok(AckStatus::Accepted) => return Ok(attempts),
            Ok(AckStatus::Rejected(r)) => bail!("batch {batch_id} rejected: {r:?}"),
            Ok(AckStatus::Busy { .. }) | Err(_) if attempts < 50 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(status) => bail!("batch {batch_id}: {status:?} after {attempts} attempts"),
            Err(e) => return Err(e.context(format!("batch {batch_id}"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_keys_rotate_under_load_without_losing_a_batch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("collector.toml");
    let old = key_line("exporter_key", OLD_KEY_ID, OLD_KEY_HEX);
    std::fs::write(&path, config_text(dir.path(), &old))?;
    let collector = start(&path)?;
    let data = collector.data;

    let key = Arc::new(Mutex::new(exporter(OLD_KEY_ID, OLD_KEY_HEX)?));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (key, stop) = (key.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut retries = 0u32;
            while !stop.load(Ordering::SeqCst) {
                sent += 1;
                retries += deliver(data, &key, sent).await? - 1;
            }
            anyhow::Ok((sent, retries))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Collectors accept the new key next to the old.
    let both = format!(
        "{old}{}",
        key_line("exporter_key_also_accepted", NEW_KEY_ID, NEW_KEY_HEX)
    );
    reload(&collector, &path, &config_text(dir.path(), &both), 1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 2. The exporter seals with the new key.
    *key.lock().expect("key lock") = exporter(NEW_KEY_ID, NEW_KEY_HEX)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 3. Collectors retire the old key.
    let new = key_line("exporter_key", NEW_KEY_ID, NEW_KEY_HEX);
    reload(&collector, &path, &config_text(dir.path(), &new), 2).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (sent, retries) = load.await??;
    println!("batches sent during the rotation: {sent}, retries: {retries}");
    assert!(sent > 20, "too little load to mean anything: {sent}");
    assert_eq!(retries, 0, "no batch needed a retry across the rotation");

    // The retired key is refused.
    let retired = Mutex::new(exporter(OLD_KEY_ID, OLD_KEY_HEX)?);
    assert!(deliver(data, &retired, 1_000_000).await.is_err());

    // Every flow reached the sink.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir(dir.path().join("sink"))?.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    if let Some(id) = v["flow_id"].as_str() {
                        ids.insert(id.to_owned());
                    }
                }
            }
        }
        if ids.len() as u64 >= sent {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} of {sent} flows in the sink", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
