//! Per-exporter credentials against a real `tenure collector` process over loopback, with
//! two exporters (A and B), each holding its own key from the collector's exporter
//! registry and speaking through the exporter's own client (`tenure::exporter::Client`).
//!
//! A is entitled to 10.1.0.0/28 under the name `web` only; B to 10.1.0.16/28 under any
//! name. The test plays a compromised A: claims of B's IP, of an idle IP, of a name A may
//! not use, and a batch that names B as its sender. Then A's credential is revoked at a
//! reload, and B's is rotated under load.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tenure_gossip::wire::{self, AckStatus, Direction, Message, RejectReason};
use tenure_node::exporter::Client;
use tenure_node::httpc;
use tenure_node::shell::transport::Crypto;
use tokio::time::Instant;

const CLUSTER_KEY_HEX: &str = "7465737420636c7573746572206b6579202d206e6f7420666f722070726f6421";
const A_KEY_HEX: &str = "41206578706f72746572206b6579202d206e6f7420666f722070726f64756374";
const B_KEY_HEX: &str = "42206578706f72746572206b6579202d206e6f7420666f722070726f64756374";
const B_NEXT_KEY_HEX: &str = "42206e657874206b6579202d206e6f7420666f722070726f64756374696f6e21";
const A_ID: u64 = 1;
const B_ID: u64 = 2;
const A_KEY_ID: u32 = 101;
const B_KEY_ID: u32 = 201;
const B_NEXT_KEY_ID: u32 = 202;

fn collector_text(dir: &Path) -> String {
    let sink = dir.join("sink");
    format!(
        r#"node_id = "c0"
region = "a"
prefixes = ["10.1.0.0/16"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
cluster_key = {{ key_id = 1, key_hex = "{CLUSTER_KEY_HEX}" }}
exporter_registry = "{registry}"
sink = {{ kind = "files", dir = "{sink}" }}
data_dir = "{sink}-data"

[engine]
skew_margin_ms = 200
"#,
        sink = sink.display(),
        registry = dir.join("registry.toml").display(),
    )
}

/// The registry: A (maybe revoked), and B with the keys given.
fn registry_text(a_revoked: bool, b_keys: &[(u32, &str)]) -> String {
    let keys: Vec<String> = b_keys
        .iter()
        .map(|(id, hex)| format!("{{ key_id = {id}, key_hex = \"{hex}\" }}"))
        .collect();
    format!(
        r#"[[exporter]]
id = {A_ID}
name = "host-a"
keys = [{{ key_id = {A_KEY_ID}, key_hex = "{A_KEY_HEX}" }}]
prefixes = ["10.1.0.0/28"]
workloads = ["web"]
revoked = {a_revoked}

[[exporter]]
id = {B_ID}
name = "host-b"
keys = [{keys}]
prefixes = ["10.1.0.16/28"]
"#,
        keys = keys.join(", "),
    )
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(httpc::request(addr, "GET", path, None, None, Duration::from_secs(5)).await?)
}

/// The counter `name{...reason="<reason>"...}` summed over the node's series.
async fn counter(http: SocketAddr, name: &str, label: &str) -> anyhow::Result<u64> {
    let (_, text) = get(http, "/metrics").await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}

/// Waits (10 s at most) until `counter` reaches `at_least`.
async fn counter_reaches(
    http: SocketAddr,
    name: &str,
    label: &str,
    at_least: u64,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = counter(http, name, label).await?;
        if n >= at_least {
            return Ok(n);
        }
        if Instant::now() > deadline {
            bail!("{name}{{{label}}} is {n}, expected at least {at_least}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rewrites the registry, sends SIGHUP and waits until the collector reports reload `n`.
async fn reload(
    collector: &common::Collector,
    dir: &Path,
    registry: &str,
    n: u64,
) -> anyhow::Result<()> {
    std::fs::write(dir.join("registry.toml"), registry)?;
    let status = Command::new("kill")
        .args(["-HUP", &collector.child.id().to_string()])
        .status()?;
    assert!(status.success(), "kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(collector.http, "tenure_key_reloads_total", "result=\"ok\"").await? < n {
        if Instant::now() > deadline {
            bail!("reload {n} not reported");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// An exporter's transport state: its own key, its id as the envelope's sender.
fn exporter(exporter_id: u64, key_id: u32, hex: &str) -> anyhow::Result<Arc<Crypto>> {
    let key = tenure_node::config::parse_key(hex)?;
    Ok(Arc::new(Crypto::new(
        key_id,
        &key,
        None,
        exporter_id,
        common::now_ms(),
    )))
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

/// A batch stating `named_id` as its exporter, with one flow to an external IP (attributed
/// at once, so that it reaches the sink quickly) and `claims` over `dictionary`.
fn batch(batch_id: u64, named_id: u64, dictionary: &[&str], claims: Vec<wire::Claim>) -> Message {
    let t = common::now_ms();
    Message::FlowBatch(wire::FlowBatch {
        batch_id,
        exporter_id: named_id,
        hops: 0,
        sent_ms: 0,
        region: "a".into(),
        dictionary: dictionary.iter().map(|n| (*n).into()).collect(),
        flows: vec![wire::Flow {
            flow_id: u128::from(batch_id) | (u128::from(named_id) << 64),
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
            remote_ip: "198.51.100.9".parse().expect("ip"),
            local_port: 40_000,
            remote_port: 443,
            direction: Direction::Outbound,
            ongoing: false,
        }],
        claims,
    })
}

/// Sends one batch and waits for its answer.
async fn send(
    addr: SocketAddr,
    crypto: &Crypto,
    message: &Message,
    batch_id: u64,
) -> anyhow::Result<AckStatus> {
    let mut client = Client::connect(addr, crypto, Duration::from_secs(2)).await?;
    client.send(crypto, message).await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), client.recv(crypto)).await??;
        if let Message::Ack(a) = m {
            if a.batch_id == batch_id {
                return Ok(a.status);
            }
        }
    }
}

/// One batch until it is answered other than busy (a collector still joining says busy).
async fn deliver(
    addr: SocketAddr,
    crypto: &Mutex<Arc<Crypto>>,
    make: impl Fn() -> Message,
    batch_id: u64,
) -> anyhow::Result<(AckStatus, u32)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let c = crypto.lock().expect("key lock").clone();
        match send(addr, &c, &make(), batch_id).await {
            Ok(AckStatus::Busy { .. }) | Err(_) if attempts < 100 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(status) => return Ok((status, attempts)),
            Err(e) => return Err(e.context(format!("batch {batch_id}"))),
        }
    }
}

/// What `/v1/ips/{ip}/owner?at=` says: (result, workload).
async fn owner(http: SocketAddr, ip: &str, at: u64) -> anyhow::Result<(String, String)> {
    let (status, body) = get(http, &format!("/v1/ips/{ip}/owner?at={at}")).await?;
    anyhow::ensure!(status == 200, "owner of {ip}: {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok((
        v["result"].as_str().unwrap_or_default().to_owned(),
        v["workload"].as_str().unwrap_or_default().to_owned(),
    ))
}

async fn ranges(http: SocketAddr, ip: &str) -> anyhow::Result<String> {
    Ok(get(http, &format!("/v1/ips/{ip}/ranges")).await?.1)
}

/// The sink's flows: flow id (32 hex digits, as written) → exporter id.
fn sink_flows(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut flows = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir.join("sink"))?.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let (Some(id), Some(exporter)) =
                    (v["flow_id"].as_str(), v["exporter_id"].as_u64())
                {
                    flows.insert(id.to_owned(), exporter);
                }
            }
        }
    }
    Ok(flows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_claims_only_what_its_credential_entitles_it_to() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("collector.toml");
    std::fs::write(
        dir.path().join("registry.toml"),
        registry_text(false, &[(B_KEY_ID, B_KEY_HEX)]),
    )?;
    std::fs::write(&path, collector_text(dir.path()))?;
    let collector = common::spawn_collector(&path, "warn")?;
    let (data, http) = (collector.data, collector.http);
    let a = Mutex::new(exporter(A_ID, A_KEY_ID, A_KEY_HEX)?);
    let b = Mutex::new(exporter(B_ID, B_KEY_ID, B_KEY_HEX)?);
    let t = common::now_ms();
    let (since, until) = (t - 2_000, t + 1_000);
    let at = t - 1_000;

    // B claims its own IP as `db`; A its own as `web`.
    let (status, _) = deliver(
        data,
        &b,
        || batch(1, B_ID, &["db"], vec![claim("10.1.0.20", 0, since, until)]),
        1,
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    let (status, _) = deliver(
        data,
        &a,
        || batch(2, A_ID, &["web"], vec![claim("10.1.0.3", 0, since, until)]),
        2,
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    assert_eq!(
        owner(http, "10.1.0.20", at).await?,
        ("attributed".into(), "db".into())
    );
    assert_eq!(
        owner(http, "10.1.0.3", at).await?,
        ("attributed".into(), "web".into())
    );
    let b_ranges = ranges(http, "10.1.0.20").await?;

    // A, compromised: B's IP, an idle IP of the region, its own IP under a name it may not
    // use. Each is refused; the batch (its flow) is taken.
    let (status, _) = deliver(
        data,
        &a,
        || {
            batch(
                3,
                A_ID,
                &["web", "db"],
                vec![
                    claim("10.1.0.20", 0, since, until),
                    claim("10.1.0.99", 0, since, until),
                    claim("10.1.0.4", 1, since, until),
                ],
            )
        },
        3,
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    let refused = counter_reaches(
        http,
        "tenure_claims_rejected_total",
        "reason=\"not_entitled\"",
        3,
    )
    .await?;
    assert_eq!(refused, 3);
    assert_eq!(
        ranges(http, "10.1.0.20").await?,
        b_ranges,
        "B's ranges unchanged"
    );
    assert_eq!(
        owner(http, "10.1.0.20", at).await?,
        ("attributed".into(), "db".into()),
        "B's IP is still B's workload's"
    );
    assert_ne!(owner(http, "10.1.0.99", at).await?.0, "attributed");
    assert_ne!(owner(http, "10.1.0.4", at).await?.0, "attributed");

    // A's batch naming B as its sender is A's: B's IP is refused, A's own accepted, and
    // its flow carries A's id.
    let (status, _) = deliver(
        data,
        &a,
        || {
            batch(
                4,
                B_ID,
                &["web"],
                vec![
                    claim("10.1.0.21", 0, since, until),
                    claim("10.1.0.6", 0, since, until),
                ],
            )
        },
        4,
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    counter_reaches(
        http,
        "tenure_claims_rejected_total",
        "reason=\"not_entitled\"",
        4,
    )
    .await?;
    assert_ne!(owner(http, "10.1.0.21", at).await?.0, "attributed");
    assert_eq!(
        owner(http, "10.1.0.6", at).await?,
        ("attributed".into(), "web".into())
    );
    let forged_flow = format!("{:032x}", u128::from(4u64) | (u128::from(B_ID) << 64));
    let deadline = Instant::now() + Duration::from_secs(10);
    let exporter_of_forged = loop {
        if let Some(e) = sink_flows(dir.path())?.get(&forged_flow) {
            break *e;
        }
        if Instant::now() > deadline {
            bail!("flow {forged_flow} not in the sink");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        exporter_of_forged, A_ID,
        "the flow is A's, whatever the batch said"
    );

    // A is revoked at a reload: its next batch is refused (and says why); B is unaffected.
    reload(
        &collector,
        dir.path(),
        &registry_text(true, &[(B_KEY_ID, B_KEY_HEX)]),
        1,
    )
    .await?;
    let (status, _) = deliver(
        data,
        &a,
        || batch(5, A_ID, &["web"], vec![claim("10.1.0.7", 0, since, until)]),
        5,
    )
    .await?;
    assert_eq!(status, AckStatus::Rejected(RejectReason::Revoked));
    counter_reaches(
        http,
        "tenure_exporter_messages_rejected_total",
        "reason=\"revoked\"",
        1,
    )
    .await?;
    assert_ne!(owner(http, "10.1.0.7", at).await?.0, "attributed");
    let (status, _) = deliver(
        data,
        &b,
        || batch(6, B_ID, &["db"], vec![claim("10.1.0.22", 0, since, until)]),
        6,
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);

    // B's credential rotates under load: the collector accepts B's next key next to the
    // current one, B moves to it, the collector drops the old one. No batch is lost or
    // retried, and nothing changes for A (still revoked) or anyone else.
    let b = Arc::new(b);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (b, stop) = (b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut retries = 0u32;
            while !stop.load(Ordering::SeqCst) {
                sent += 1;
                let id = 1_000 + sent;
                let (status, attempts) =
                    deliver(data, &b, || batch(id, B_ID, &["db"], Vec::new()), id).await?;
                if status != AckStatus::Accepted {
                    bail!("batch {id}: {status:?}");
                }
                retries += attempts - 1;
            }
            anyhow::Ok((sent, retries))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    reload(
        &collector,
        dir.path(),
        &registry_text(
            true,
            &[(B_KEY_ID, B_KEY_HEX), (B_NEXT_KEY_ID, B_NEXT_KEY_HEX)],
        ),
        2,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    *b.lock().expect("key lock") = exporter(B_ID, B_NEXT_KEY_ID, B_NEXT_KEY_HEX)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    reload(
        &collector,
        dir.path(),
        &registry_text(true, &[(B_NEXT_KEY_ID, B_NEXT_KEY_HEX)]),
        3,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let (sent, retries) = load.await??;
    println!("B's batches during its rotation: {sent}, retries: {retries}");
    assert!(sent > 10, "too little load to mean anything: {sent}");
    assert_eq!(
        retries, 0,
        "no batch of B's needed a retry across the rotation"
    );
    // B's old key is refused now: the frame does not open, so the connection closes.
    let old = exporter(B_ID, B_KEY_ID, B_KEY_HEX)?;
    assert!(
        send(data, &old, &batch(9_999, B_ID, &["db"], Vec::new()), 9_999)
            .await
            .is_err()
    );
    // Every flow B sent under load reached the sink, as B's.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let flows = sink_flows(dir.path())?;
        let b_load: BTreeSet<u64> = (1_001..=1_000 + sent)
            .filter(|id| {
                flows.get(&format!(
                    "{:032x}",
                    u128::from(*id) | (u128::from(B_ID) << 64)
                )) == Some(&B_ID)
            })
            .collect();
        if b_load.len() as u64 == sent {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} of B's {sent} flows in the sink", b_load.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A removed from the registry: its key is unknown, its frames do not open.
    reload(
        &collector,
        dir.path(),
        "[[exporter]]\nid = 2\nkeys = [{ key_id = 202, key_hex = \"42206e657874206b6579202d206e6f7420666f722070726f64756374696f6e21\" }]\nprefixes = [\"10.1.0.16/28\"]\n",
        4,
    )
    .await?;
    let a_now = a.lock().expect("key lock").clone();
    assert!(send(
        data,
        &a_now,
        &batch(10_000, A_ID, &["web"], Vec::new()),
        10_000
    )
    .await
    .is_err());
    // A bad registry is refused as a whole; the running one stays.
    std::fs::write(
        dir.path().join("registry.toml"),
        "[[exporter]]\nid = 2\nkeys = []\n",
    )?;
    let status = Command::new("kill")
        .args(["-HUP", &collector.child.id().to_string()])
        .status()
        .context("kill -HUP")?;
    assert!(status.success());
    counter_reaches(http, "tenure_key_reloads_total", "result=\"error\"", 1).await?;
    let (status, _) = deliver(
        data,
        &b,
        || batch(10_001, B_ID, &["db"], Vec::new()),
        10_001,
    )
    .await?;
    assert_eq!(
        status,
        AckStatus::Accepted,
        "B still speaks after a bad reload"
    );
    Ok(())
}
