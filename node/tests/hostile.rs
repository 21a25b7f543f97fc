//! Hostile input against a real `tenure collector` process over real loopback sockets:
//! random bytes, truncated and oversized frames, wrong keys, a key family switched mid
//! connection, replayed frames, slow and half-open connections, connection floods, floods
//! of tiny batches, claims from the far future and past or for another region's CIDR,
//! claims outside an exporter's entitlement, batches under a revoked credential, and
//! peer-only messages sealed with an exporter's key.
//!
//! Afterwards the node must still serve (healthz, a legitimate batch accepted), no
//! rejected input may have changed its ranges or an attribution, and its memory must have
//! stayed bounded. The test prints how many inputs of each kind it tried.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tenure_gossip::frame::FRAME_VERSION;
use tenure_gossip::wire::{self, AckStatus, Direction, Message};
use tenure_node::exporter::Client;
use tenure_node::httpc;
use tenure_node::shell::transport::Crypto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const CLUSTER_KEY_HEX: &str = "7465737420636c7573746572206b6579202d206e6f7420666f722070726f6421";
/// Exporters of the registry, each with a key of its own ([`exporter_key_hex`]) under key
/// id `KEY_ID_BASE + id`, entitled to the whole region but for [`NEIGHBOUR`] and
/// [`REVOKED`].
const EXPORTERS: [u64; 8] = [1, 2, 5, 7, 66, 666, NEIGHBOUR, REVOKED];
/// The mixed-key case's exporters: `MIXED_BASE..MIXED_BASE + 20`.
const MIXED_BASE: u64 = 80;
const KEY_ID_BASE: u32 = 10_000;
/// Entitled to 10.1.0.200 only, under the name `mallory` only.
const NEIGHBOUR: u64 = 9;
/// Its credential is revoked.
const REVOKED: u64 = 10;

fn exporter_key_hex(exporter_id: u64) -> String {
    format!("{:064x}", 0x6b65_7900_0000_0000u64 | exporter_id)
}

fn registry_text() -> String {
    let mut text = String::new();
    for id in EXPORTERS.into_iter().chain(MIXED_BASE..MIXED_BASE + 20) {
        let (prefixes, extra) = match id {
            NEIGHBOUR => ("10.1.0.200/32", "workloads = [\"mallory\"]\n"),
            REVOKED => ("10.1.0.0/16", "revoked = true\n"),
            _ => ("10.1.0.0/16", ""),
        };
        text.push_str(&format!(
            "[[exporter]]\nid = {id}\nkeys = [{{ key_id = {}, key_hex = \"{}\" }}]\nprefixes = [\"{prefixes}\"]\n{extra}\n",
            KEY_ID_BASE + id as u32,
            exporter_key_hex(id),
        ));
    }
    text
}
/// The node's read deadlines in this test, short so that the test is quick.
const FRAME_READ_TIMEOUT_MS: u64 = 1_000;
const CONN_IDLE_TIMEOUT_MS: u64 = 1_500;
const CONNECTIONS_PER_IP_MAX: usize = 32;
/// The node's HTTP deadline (headers, then the answer).
const HTTP_REQUEST_TIMEOUT_MS: u64 = 1_500;
/// How much the collector's resident memory may grow over the whole hostile run.
const RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;

fn start(dir: &Path) -> anyhow::Result<common::Collector> {
    let sink = dir.join("sink");
    let path = dir.join("collector.toml");
    let registry = dir.join("exporters.toml");
    std::fs::write(&registry, registry_text())?;
    let text = format!(
        r#"node_id = "h0"
region = "a"
prefixes = ["10.1.0.0/16"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
cluster_key = {{ key_id = 1, key_hex = "{CLUSTER_KEY_HEX}" }}
exporter_registry = "{registry}"
claim_delay_max_ms = 60000
claim_skew_max_ms = 5000
exporter_flows_per_sec_max = 100
exporter_flows_burst_max = 16384
conn_idle_timeout_ms = {CONN_IDLE_TIMEOUT_MS}
frame_read_timeout_ms = {FRAME_READ_TIMEOUT_MS}
connections_per_ip_max = {CONNECTIONS_PER_IP_MAX}
http_request_timeout_ms = {HTTP_REQUEST_TIMEOUT_MS}
sink = {{ kind = "files", dir = "{sink}" }}
data_dir = "{sink}-data"

[engine]
skew_margin_ms = 200
pending_deadline_ms = 3000

[regions]
"b" = ["10.2.0.0/16"]
"#,
        sink = sink.display(),
        registry = registry.display(),
    );
    std::fs::write(&path, text)?;
    common::spawn_collector(&path, "error")
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(httpc::request(addr, "GET", path, None, None, Duration::from_secs(5)).await?)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in /proc/<pid>/status")
}

/// The counter `name{...reason="<reason>"...}` summed over the node's series.
async fn counter(http: SocketAddr, name: &str, reason: &str) -> anyhow::Result<u64> {
    let (_, text) = get(http, "/metrics").await?;
    let label = format!("reason=\"{reason}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
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

fn flow(id: u128, local: &str, remote: &str, start_ms: u64) -> wire::Flow {
    wire::Flow {
        flow_id: id,
        start_ms,
        end_ms: start_ms + 10,
        bytes_sent: 1,
        bytes_received: 1,
        segs_in: 1,
        segs_out: 1,
        retransmits: 0,
        rtt_us: 0,
        local: wire::LocalEnd::Workload(0),
        local_ip: local.parse().expect("ip"),
        remote_ip: remote.parse().expect("ip"),
        local_port: 40_000,
        remote_port: 80,
        direction: Direction::Outbound,
        ongoing: false,
    }
}

fn batch(
    id: u64,
    exporter_id: u64,
    names: &[&str],
    flows: Vec<wire::Flow>,
    claims: Vec<wire::Claim>,
) -> Message {
    Message::FlowBatch(wire::FlowBatch {
        batch_id: id,
        exporter_id,
        hops: 0,
        sent_ms: 0,
        region: "a".into(),
        dictionary: names.iter().map(|s| (*s).to_owned()).collect(),
        flows,
        claims,
    })
}

/// Exporter `exporter_id` with its own key from the registry.
fn exporter_crypto(exporter_id: u64) -> anyhow::Result<Crypto> {
    let key = tenure_node::config::parse_key(&exporter_key_hex(exporter_id))?;
    Ok(Crypto::new(
        KEY_ID_BASE + exporter_id as u32,
        &key,
        None,
        exporter_id,
        common::now_ms(),
    ))
}

/// Sends `message` as exporter `crypto` and waits for the ack of `batch_id`.
async fn send(addr: SocketAddr, crypto: &Crypto, message: &Message) -> anyhow::Result<AckStatus> {
    let Message::FlowBatch(b) = message else {
        bail!("send() takes flow batches")
    };
    let id = b.batch_id;
    let mut client = Client::connect(addr, crypto, Duration::from_secs(5)).await?;
    client.send(crypto, message).await?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), client.recv(crypto)).await??;
        if let Message::Ack(a) = m {
            if a.batch_id == id {
                return Ok(a.status);
            }
        }
    }
}

/// Writes `bytes` on a new connection and waits (bounded) for the node to close it.
/// Returns whether it closed within `within`.
async fn write_and_wait_close(addr: SocketAddr, bytes: &[u8], within: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(bytes).await.is_err() {
        return true;
    }
    read_until_closed(&mut stream, within).await
}

async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Whether the node cuts off a connection that sends `bytes` one every 200 ms: the write
/// fails or the connection closes within 5 s of the last byte, and the node does not take
/// trickled bytes for more than 6 s.
async fn trickled_is_cut_off(addr: SocketAddr, bytes: Vec<u8>) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let started = Instant::now();
    for b in bytes {
        if s.write_all(&[b]).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_secs(6) {
            return false;
        }
    }
    read_until_closed(&mut s, Duration::from_secs(5)).await
}

/// Slow and silent connections opened per kind of listener.
const CONNECTIONS_CUT_OFF: usize = 10;

/// Opens [`CONNECTIONS_CUT_OFF`] connections to `addr` that trickle `bytes` and as many
/// that send nothing (`what` names the listener in failures): all must be cut off, the
/// silent ones within `silent_within`.
async fn slow_and_silent_are_cut_off(
    addr: SocketAddr,
    bytes: &[u8],
    silent_within: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let mut slow = Vec::new();
    for _ in 0..CONNECTIONS_CUT_OFF {
        slow.push(tokio::spawn(trickled_is_cut_off(addr, bytes.to_vec())));
    }
    let mut silent = Vec::new();
    for _ in 0..CONNECTIONS_CUT_OFF {
        silent.push(TcpStream::connect(addr).await?);
    }
    for task in slow {
        assert!(task.await?, "a slow {what} connection was not cut off");
    }
    for mut s in silent {
        assert!(
            read_until_closed(&mut s, silent_within).await,
            "a silent {what} connection was not closed"
        );
    }
    Ok(())
}

/// xorshift64*: the test's only randomness, from one printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_survives_hostile_input_and_keeps_its_ranges() -> anyhow::Result<()> {
    let seed = 0x7e47_5e11_u64 ^ common::now_ms();
    println!("hostile input seed: {seed}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir()?;
    let collector = start(dir.path())?;
    let (data, http) = (collector.data, collector.http);

    // Ready: a lone node completes its handoff after two heartbeat intervals.
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(http, "/readyz").await.map(|(s, _)| s).unwrap_or(0) != 200 {
        if Instant::now() > deadline {
            bail!("collector not ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The legitimate owner of 10.1.0.7: "web", from 30 s ago until now.
    let t0 = common::now_ms();
    let web = exporter_crypto(1)?;
    let status = send(
        data,
        &web,
        &batch(
            1,
            1,
            &["web"],
            Vec::new(),
            vec![claim("10.1.0.7", 0, t0 - 30_000, t0)],
        ),
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    let ranges_path = "/v1/ips/10.1.0.7/ranges";
    let owner_path = format!("/v1/ips/10.1.0.7/owner?at={}", t0 - 10_000);
    let ranges_before = get(http, ranges_path).await?;
    let owner_before = get(http, &owner_path).await?;
    assert!(ranges_before.1.contains("web"), "{ranges_before:?}");
    assert!(owner_before.1.contains("web"), "{owner_before:?}");
    let rss_before = rss_kib(collector.child.id())?;

    let mut tried: BTreeMap<&str, usize> = BTreeMap::new();
    let mut count = |kind: &'static str, n: usize| *tried.entry(kind).or_default() += n;
    let closed_within = Duration::from_secs(5);

    // 1. Random bytes, some starting with the frame magic byte so they reach the opener.
    for i in 0..200 {
        let n = (rng.next() % 8_192) as usize + 1;
        let mut bytes = rng.bytes(n);
        if i % 2 == 0 {
            bytes[0] = FRAME_VERSION;
            if let Some(len) = bytes.get_mut(1..5) {
                let body = (n.saturating_sub(5) as u32).to_be_bytes();
                len.copy_from_slice(&body);
            }
        }
        assert!(
            write_and_wait_close(data, &bytes, closed_within).await,
            "random bytes #{i}: connection not closed"
        );
        count("random_bytes", 1);
    }

    // 2. Truncated frames: a real sealed batch cut anywhere, then the sender goes quiet
    //    (the node's frame deadline closes it) or hangs up.
    let mallory = exporter_crypto(66)?;
    let mut truncated = Vec::new();
    for i in 0..100 {
        let frame = mallory.frame(&batch(
            1_000 + i,
            66,
            &["mallory"],
            Vec::new(),
            vec![claim("10.1.0.7", 0, t0 - 5_000, t0)],
        ))?;
        let cut = 1 + (rng.next() as usize % (frame.len() - 1));
        if i % 2 == 0 {
            // Each waits for the node's frame deadline: in parallel.
            let cut_frame = frame[..cut].to_vec();
            truncated.push(tokio::spawn(async move {
                write_and_wait_close(data, &cut_frame, closed_within).await
            }));
        } else {
            let mut s = TcpStream::connect(data).await?;
            s.write_all(&frame[..cut]).await?;
            drop(s);
        }
        count("truncated_frames", 1);
    }

    for (i, task) in truncated.into_iter().enumerate() {
        assert!(task.await?, "truncated frame #{i}: connection not closed");
    }

    // 3. Oversized frames: a header stating far more than the 4 MiB limit.
    for i in 0..50u32 {
        let mut bytes = vec![FRAME_VERSION];
        bytes.extend_from_slice(&(5 * 1024 * 1024 + i * 1_000_000).to_be_bytes());
        bytes.extend(rng.bytes(1_024));
        assert!(
            write_and_wait_close(data, &bytes, closed_within).await,
            "oversized #{i}"
        );
        count("oversized_frames", 1);
    }

    // 4. Wrong keys: a batch claiming 10.1.0.7 for "mallory", sealed with a key nobody has,
    //    under an exporter's key id and the cluster key id.
    for i in 0..100u64 {
        let mut raw = [0u8; 32];
        raw.iter_mut().for_each(|b| *b = rng.next() as u8);
        let key = tenure_gossip::seal::SecretKey::from_bytes(raw);
        let key_id = if i % 2 == 0 { KEY_ID_BASE + 1 } else { 1 };
        let forger = Crypto::new(key_id, &key, None, 77, common::now_ms());
        let frame = forger.frame(&batch(
            2_000 + i,
            77,
            &["mallory"],
            Vec::new(),
            vec![claim("10.1.0.7", 0, t0 - 5_000, t0)],
        ))?;
        assert!(
            write_and_wait_close(data, &frame, closed_within).await,
            "wrong key #{i}"
        );
        count("wrong_key", 1);
    }

    // 5. Key families mixed on one connection: an exporter frame first, then a frame sealed
    //    with the cluster key (as if the exporter had it). The second is refused.
    let cluster_key = tenure_node::config::parse_key(CLUSTER_KEY_HEX)?;
    for i in 0..20u64 {
        let exporter = exporter_crypto(80 + i)?;
        let peer = Crypto::new(1, &cluster_key, None, 90 + i, common::now_ms());
        let mut bytes =
            exporter.frame(&batch(3_000 + i, 80 + i, &["x"], Vec::new(), Vec::new()))?;
        bytes.extend(peer.frame(&batch(3_100 + i, 80 + i, &["x"], Vec::new(), Vec::new()))?);
        assert!(
            write_and_wait_close(data, &bytes, closed_within).await,
            "mixed keys #{i}"
        );
        count("mixed_key_families", 1);
    }

    // 6. Replays: one authentic frame, then the same bytes again on new connections.
    let replayer = exporter_crypto(5)?;
    let authentic = replayer.frame(&batch(
        4_000,
        5,
        &["web"],
        Vec::new(),
        vec![claim("10.1.0.7", 0, t0 - 30_000, t0)],
    ))?;
    // Accepted once (the node keeps the connection open, so no close is awaited).
    write_and_wait_close(data, &authentic, Duration::from_millis(300)).await;
    for i in 0..100 {
        assert!(
            write_and_wait_close(data, &authentic, closed_within).await,
            "replay #{i}"
        );
        count("replayed_frames", 1);
    }

    // 7. Slow connections: a frame trickling in one byte every 200 ms is cut off by the
    //    frame deadline; half-open ones (connected, silent) by the idle deadline.
    let slow = mallory.frame(&batch(5_000, 66, &["m"], Vec::new(), Vec::new()))?;
    let silent_within = Duration::from_millis(CONN_IDLE_TIMEOUT_MS * 3);
    slow_and_silent_are_cut_off(data, &slow, silent_within, "data-plane").await?;
    count("slow_connections", CONNECTIONS_CUT_OFF);
    count("half_open_connections", CONNECTIONS_CUT_OFF);

    // 8. A connection flood from one address: past the per-address limit, new connections
    //    are closed at once.
    let mut held = Vec::new();
    for _ in 0..(CONNECTIONS_PER_IP_MAX * 2) {
        held.push(TcpStream::connect(data).await?);
    }
    let mut refused = 0;
    for s in &mut held {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
            refused += 1;
        }
    }
    count("connection_flood", held.len());
    drop(held);
    assert!(
        refused >= CONNECTIONS_PER_IP_MAX / 2,
        "only {refused} connections refused"
    );

    // 9. A flood of tiny (empty) batches on one connection from one exporter: past its
    //    budget they are answered busy.
    let flooder = exporter_crypto(666)?;
    let flood_batches = 20_000u64;
    let mut busy = 0u64;
    let mut acked = 0u64;
    // Sent in windows below the node's per-connection queue of replies, so that every ack
    // comes back (past that queue a reply is dropped, and a real exporter re-sends).
    let window = 512u64;
    let mut raw = TcpStream::connect(data).await?;
    let mut decoder = flooder.decoder();
    let mut buf = vec![0u8; 64 * 1024];
    let mut plain = tenure_gossip::wire::AlignedVec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for start in (0..flood_batches).step_by(window as usize) {
        let mut bytes = Vec::new();
        for id in start..(start + window).min(flood_batches) {
            bytes.extend(flooder.frame(&batch(10_000 + id, 666, &[], Vec::new(), Vec::new()))?);
        }
        raw.write_all(&bytes).await?;
        let expected = (start + window).min(flood_batches);
        while acked < expected {
            let n = match tokio::time::timeout_at(deadline, raw.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) => bail!("flood: {acked} of {expected} acks, then nothing"),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e.into()),
            };
            let mut input = &buf[..n];
            while let Some(body) = decoder.decode(&mut input)? {
                let (_, m) = flooder.open_frame(body, &mut plain)?;
                if let Message::Ack(a) = m {
                    acked += 1;
                    if matches!(a.status, AckStatus::Busy { .. }) {
                        busy += 1;
                    }
                }
            }
        }
    }
    drop(raw);
    let limited = counter(
        http,
        "tenure_exporter_messages_rejected_total",
        "rate_limited",
    )
    .await?;
    assert!(
        busy > 0 && limited >= busy,
        "the flood was not limited ({busy} busy, {limited} counted)"
    );
    count("tiny_batch_flood", flood_batches as usize);
    // 10. Authentic exporter, forged claims: far future, far past, inverted, another
    //     region's CIDR, an external IP. The batch is accepted; its claims are not. (An
    //     inverted claim cannot even be encoded: the wire refuses it on both sides.)
    let forger = exporter_crypto(7)?;
    let now = common::now_ms();
    let mut claims = Vec::new();
    for i in 0..100u64 {
        claims.push(claim("10.1.0.7", 0, now + 60_000 + i, now + 3_600_000));
        claims.push(claim("10.1.0.7", 0, now - 7_200_000, now - 3_600_000 + i));
        claims.push(claim("10.2.0.7", 0, now - 1_000, now));
        claims.push(claim("198.51.100.7", 0, now - 1_000, now));
    }
    let status = send(
        data,
        &forger,
        &batch(6_000, 7, &["mallory"], Vec::new(), claims),
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    count("future_claims", 100);
    count("past_claims", 100);
    count("foreign_cidr_claims", 200);

    // 10b. Authentic exporters, claims they are not entitled to: the neighbour (entitled to
    //     10.1.0.200 as "mallory" only) claims the owner's 10.1.0.7, idle IPs, and its own
    //     IP as "web", in batches naming exporter 1 (web's) as their sender: the batch is
    //     the neighbour's, and each claim is refused. The revoked exporter's batches are
    //     answered rejected.
    let neighbour = exporter_crypto(NEIGHBOUR)?;
    let mut claims = Vec::new();
    for i in 0..50u64 {
        claims.push(claim("10.1.0.7", 0, now - 1_000, now));
        claims.push(claim(&format!("10.1.3.{}", i + 1), 0, now - 1_000, now));
        claims.push(claim("10.1.0.200", 1, now - 1_000 + i, now));
    }
    let status = send(
        data,
        &neighbour,
        &batch(6_500, 1, &["mallory", "web"], Vec::new(), claims),
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    count("not_entitled_claims", 150);
    let revoked = exporter_crypto(REVOKED)?;
    for i in 0..10u64 {
        let status = send(
            data,
            &revoked,
            &batch(
                6_600 + i,
                1,
                &["mallory"],
                Vec::new(),
                vec![claim("10.1.0.7", 0, now - 1_000, now)],
            ),
        )
        .await?;
        assert_eq!(
            status,
            AckStatus::Rejected(wire::RejectReason::Revoked),
            "revoked #{i}"
        );
        count("revoked_batches", 1);
    }

    // 11. Peer-only messages under an exporter's key: a range snapshot giving 10.1.0.7 to
    //     mallory, a claim batch, a relayed flow batch.
    for i in 0..20u64 {
        let snapshot = Message::RangeSnapshot(wire::RangeSnapshot {
            request_id: i,
            region: "a".into(),
            last: true,
            ips: vec![wire::SnapshotIp {
                floor_ms: None,
                ip: "10.1.0.7".parse()?,
                segments: vec![wire::SnapshotSegment {
                    start_ms: now - 60_000,
                    end_ms: now + 3_600_000,
                    owner: wire::SnapshotOwner::Workload("mallory".into()),
                }],
            }],
        });
        let claims = Message::ClaimBatch(wire::ClaimBatch {
            batch_id: 7_000 + i,
            dictionary: vec!["mallory".into()],
            claims: vec![claim("10.1.0.7", 0, now - 1_000, now)],
        });
        let Message::FlowBatch(mut relayed) = batch(
            7_100 + i,
            7,
            &["mallory"],
            Vec::new(),
            vec![claim("10.1.0.7", 0, now - 1_000, now)],
        ) else {
            bail!("batch() builds flow batches")
        };
        relayed.hops = 1;
        let mut bytes = forger.frame(&snapshot)?;
        bytes.extend(forger.frame(&claims)?);
        bytes.extend(forger.frame(&Message::FlowBatch(relayed))?);
        let mut s = TcpStream::connect(data).await?;
        s.write_all(&bytes).await?;
        read_until_closed(&mut s, Duration::from_millis(300)).await;
        count("peer_only_messages", 3);
    }

    // 12. Bad HTTP parameters on every handler: a 4xx with a message, never a 5xx.
    let at_max = format!("/v1/ips/10.1.0.7/owner?at={}", u64::MAX);
    let long_ip = format!("/v1/ips/{}/ranges", "9".repeat(10_000));
    let bad_paths: Vec<&str> = vec![
        "/v1/ips/not-an-ip/ranges",
        "/v1/ips/not-an-ip/owner?at=1",
        "/v1/ips/10.1.0.7/owner",
        "/v1/ips/10.1.0.7/owner?at=abc",
        "/v1/ips/10.1.0.7/owner?at=99999999999999999999999",
        "/v1/ips/10.1.0.7/owner?at=2025-13-45T99:99:99Z",
        "/v1/ips/10.1.0.7/owner?at=%ff%fe",
        "/v1/ips/10.1.0.7/owner?at=1&at=2",
        &at_max,
        &long_ip,
        "/v1/dependencies?since=x",
        "/v1/dependencies?since=10&until=5",
        "/v1/dependencies?since=%00",
        "/v1/dependencies?until=18446744073709551615",
        "/v1/cluster?x=%zz",
        "/v1/ips//ranges",
    ];
    for path in &bad_paths {
        let (status, body) = get(http, path).await?;
        assert!(status < 500, "{path}: {status} {body}");
        count("http_bad_parameters", 1);
    }
    for (body, token) in [
        (Some("not json\n{\"ip\":1}\n"), Some("wrong-token")),
        (Some("{\"ip\":\"10.1.0.7\",\"kind\":\"assign\"}\n"), None),
    ] {
        let (status, text) = httpc::request(
            http,
            "POST",
            "/v1/ip-events?watermark=zz",
            body,
            token,
            Duration::from_secs(5),
        )
        .await?;
        assert!((400..500).contains(&status), "event feed: {status} {text}");
        count("http_bad_parameters", 1);
    }

    // Slow HTTP clients: headers trickling in one byte every 200 ms, and a connection
    // that never sends any, are cut off by the header deadline.
    let slow_headers: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: tenure\r\nX-Slow: waiting";
    let silent_within = Duration::from_millis(HTTP_REQUEST_TIMEOUT_MS * 3);
    slow_and_silent_are_cut_off(http, slow_headers, silent_within, "HTTP").await?;
    count("slow_http_clients", CONNECTIONS_CUT_OFF);
    count("silent_http_connections", CONNECTIONS_CUT_OFF);

    // The node still serves: health, and a legitimate batch of another exporter.
    let (health, _) = get(http, "/healthz").await?;
    assert_eq!(health, 200);
    let api = exporter_crypto(2)?;
    let now = common::now_ms();
    let status = send(
        data,
        &api,
        &batch(
            8_000,
            2,
            &["api"],
            vec![flow(1, "10.1.0.9", "10.1.0.7", t0 - 10_000)],
            vec![claim("10.1.0.9", 0, now - 5_000, now)],
        ),
    )
    .await?;
    assert_eq!(status, AckStatus::Accepted);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ranges) = get(http, "/v1/ips/10.1.0.9/ranges").await?;
        if ranges.contains("api") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the legitimate claim after the attack was not applied: {ranges}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Ranges and the attribution of 10.1.0.7 are what they were.
    assert_eq!(
        get(http, ranges_path).await?,
        ranges_before,
        "ranges changed"
    );
    assert_eq!(
        get(http, &owner_path).await?,
        owner_before,
        "attribution changed"
    );
    let (_, ranges_now) = get(http, ranges_path).await?;
    assert!(!ranges_now.contains("mallory"), "{ranges_now}");
    for ip in ["10.1.3.1", "10.1.3.50", "10.1.0.200"] {
        let (_, r) = get(http, &format!("/v1/ips/{ip}/ranges")).await?;
        assert!(!r.contains("mallory") && !r.contains("web"), "{ip}: {r}");
    }

    // Every kind of refusal was counted.
    for reason in ["future", "stale", "foreign_cidr", "not_entitled"] {
        let n = counter(http, "tenure_claims_rejected_total", reason).await?;
        assert!(n > 0, "no claim refused as {reason}");
    }
    for reason in ["peer_only", "relayed", "rate_limited", "revoked"] {
        let n = counter(http, "tenure_exporter_messages_rejected_total", reason).await?;
        assert!(n > 0, "no exporter message refused as {reason}");
    }
    for reason in ["auth", "replay", "frame", "timeout", "mixed_keys"] {
        let n = counter(http, "tenure_frames_rejected_total", reason).await?;
        assert!(n > 0, "no frame refused as {reason}");
    }
    // The silent connections were closed as idle, apart from the refused frames.
    let (_, text) = get(http, "/metrics").await?;
    let idle: f64 = text
        .lines()
        .filter(|l| l.starts_with("tenure_connections_idle_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        idle >= CONNECTIONS_CUT_OFF as f64,
        "{idle} idle connections closed, expected {CONNECTIONS_CUT_OFF} or more"
    );

    let rss_after = rss_kib(collector.child.id())?;
    println!();
    println!("{:<24} {:>8}", "hostile input", "tried");
    println!("{:<24} {:>8}", "-".repeat(24), "-".repeat(8));
    let mut total = 0;
    for (kind, n) in &tried {
        println!("{kind:<24} {n:>8}");
        total += n;
    }
    println!("{:<24} {:>8}", "total", total);
    println!("tiny batches: {flood_batches} sent, {acked} answered ({busy} busy), {limited} refused as rate_limited");
    println!("collector RSS: {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after <= rss_before + RSS_GROWTH_MAX_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    Ok(())
}
