//! `tenure loadgen`: a local cluster of real `tenure collector` processes driven over real
//! sockets by synthetic exporters (tokio tasks of this process) as fast as the cluster
//! acknowledges, measured by the collectors' CPU time as the kernel counts it.
//!
//! The figure is **flows attributed per collector CPU-second**: attributed flows are
//! counted in the collectors' sink files (emitted inside the measured window, attributed
//! from heartbeat ranges, and every one checked against the fleet's truth), CPU time is
//! `utime + stime` of the collector processes from `/proc/<pid>/stat` over the same window.
//! So the figure does not depend on how many cores the machine has or how busy they are
//! with other work (the exporters included).
//!
//! The run: start the collectors and wait until every ring is whole and handed off; run
//! the exporters for a warm-up (every IP claimed, pending queues at their steady size);
//! measure for `duration_secs`; stop the exporters; wait until every acknowledged flow is
//! emitted; stop the collectors (SIGTERM, their sinks flush); read the sinks back. Ends
//! with the replication comparison ([`replication`]) and one `RESULT` line.

pub mod fleet;
pub mod procs;
pub mod replication;
pub mod sinks;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipnet::Ipv4Net;
use tenure_gossip::seal::SecretKey;
use tenure_gossip::wire::{self, AckStatus, FlowBatch};
use tokio::sync::watch;

use crate::exporter::Client;
use crate::fleet::SplitMix64;
use crate::httpc;
use crate::report::Chain;
use crate::shell::clock;
use crate::shell::transport::Crypto;
use fleet::{BatchDictionary, LoadClaim, LoadFleet, LoadFleetConfig, LoadFlow};
use procs::Collector;

/// Netflix's published figure: about 5 million flows per second on 240 vCPUs.
pub const NETFLIX_FLOWS_PER_VCPU_SEC: f64 = 21_000.0;
/// The region size at which the replication ratio is reported.
pub const REPLICATION_REPORT_NODES: usize = 30;
/// Region sizes of the replication comparison.
pub const REPLICATION_SIZES: [usize; 8] = [3, 5, 10, 20, 30, 50, 75, 100];
/// Claims in one heartbeat round of the replication comparison.
pub const REPLICATION_CLAIMS: usize = 100_000;
/// δ in the load cluster, in ms: the collectors and exporters share one clock.
pub const LOAD_SKEW_MARGIN_MS: u64 = 250;
/// How long the cluster may take to converge, in ms.
const READY_TIMEOUT_MS: u64 = 60_000;
/// How long an exporter waits for an acknowledgement, in ms.
const ACK_TIMEOUT_MS: u64 = 10_000;
/// Key ids of the cluster and exporter keys.
const CLUSTER_KEY_ID: u32 = 1;
const EXPORTER_KEY_ID: u32 = 2;

/// Options of `tenure loadgen`: its command-line flags (their defaults are given here, and
/// only here), and a few shape parameters of the fleet that are not flags.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadOptions {
    /// Regions (flows cross regions only with 2 or more).
    #[arg(long, default_value_t = 2)]
    pub regions: usize,
    /// Collector processes per region.
    #[arg(long, default_value_t = 3)]
    pub collectors_per_region: usize,
    /// Exporters (tokio tasks of this process) per region.
    #[arg(long, default_value_t = 4)]
    pub exporters_per_region: u32,
    /// Workload IPs per region, every one heartbeated each interval.
    #[arg(long, default_value_t = 20_000)]
    pub ips_per_region: u32,
    #[arg(skip = 500_u32)]
    pub workloads_per_region: u32,
    /// Heartbeat interval of the exporters and collectors, in ms.
    #[arg(long, default_value_t = 2_000)]
    pub heartbeat_interval_ms: u64,
    /// Owners of each IP on a region's ring.
    #[arg(long, default_value_t = 2)]
    pub replication: usize,
    /// With 2 regions or more, the share of flows whose remote IP is in another region.
    #[arg(skip = 0.01)]
    pub cross_region_share: f64,
    /// IP tenures last between these, in ms (raised to 4 heartbeat intervals at least).
    #[arg(skip = 60_000_u64)]
    pub tenure_ms_min: u64,
    #[arg(skip = 300_000_u64)]
    pub tenure_ms_max: u64,
    /// Seconds of load before the measured window (at least two heartbeat intervals,
    /// so that pending queues reach their steady size).
    #[arg(long, default_value_t = 10)]
    pub warmup_secs: u64,
    /// Seconds measured.
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Flows per second over all exporters; 0: as fast as acknowledged.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Flows per exporter batch (at most 16384).
    #[arg(long, default_value_t = wire::FLOWS_PER_BATCH_MAX_DEFAULT)]
    pub batch_flows: usize,
    /// How long an exporter gathers ended flows before it sends them, in ms (a batch also
    /// goes when it holds `--batch-flows`, or with a heartbeat); 0: as soon as the
    /// previous batch is acknowledged.
    #[arg(long, default_value_t = 0)]
    pub send_interval_ms: u64,
    /// The collectors' `journal_fsync_interval_ms` (their group commit, which their
    /// acknowledgements wait for); unset: the collector's default.
    #[arg(long)]
    pub journal_fsync_interval_ms: Option<u64>,
    /// The collectors' engine `settle_ms` (how long after its end a flow is first looked
    /// up); unset: what a collector derives, heartbeat interval + δ + 250 ms. 0: every
    /// flow looked up on arrival.
    #[arg(long)]
    pub settle_ms: Option<u64>,
    /// The collectors' sink `direct_io` (`false`: NDJSON files written through the page
    /// cache); unset: the collector's default, direct I/O.
    #[arg(long)]
    pub sink_direct_io: Option<bool>,
    /// Remote IPs each workload calls, per region (its dependencies); 0: any IP.
    #[arg(long, default_value_t = 32)]
    pub fanout: u32,
    /// Tokio worker threads of each collector process (TOKIO_WORKER_THREADS); 0: the
    /// machine's cores divided among the collectors, at least 1.
    #[arg(long, default_value_t = 0)]
    pub collector_threads: usize,
    /// Seed of the synthetic fleet.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where configs, journals, logs and sinks go (the command line's `--dir`, or a
    /// temporary folder).
    #[arg(skip)]
    pub dir: PathBuf,
}

impl LoadOptions {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=14).contains(&self.regions), "regions: 1 to 14");
        anyhow::ensure!(
            self.collectors_per_region >= 1,
            "collectors per region: at least 1"
        );
        anyhow::ensure!(
            self.exporters_per_region >= 1,
            "exporters per region: at least 1"
        );
        anyhow::ensure!(
            (self.exporters_per_region..=1_000_000).contains(&self.ips_per_region),
            "IPs per region: at least one per exporter, at most 1,000,000"
        );
        anyhow::ensure!(
            (1..=wire::DICTIONARY_ENTRIES_MAX_DEFAULT as u32).contains(&self.workloads_per_region),
            "workloads per region: 1 to {}",
            wire::DICTIONARY_ENTRIES_MAX_DEFAULT
        );
        anyhow::ensure!(
            (1..=wire::FLOWS_PER_BATCH_MAX_DEFAULT).contains(&self.batch_flows),
            "batch flows: 1 to {}",
            wire::FLOWS_PER_BATCH_MAX_DEFAULT
        );
        anyhow::ensure!(
            self.send_interval_ms <= 60_000,
            "send interval: at most 60,000 ms"
        );
        if let Some(ms) = self.journal_fsync_interval_ms {
            anyhow::ensure!(
                crate::config::JOURNAL_FSYNC_INTERVAL_MS.contains(&ms),
                "journal fsync interval: 1 to 1,000 ms"
            );
        }
        anyhow::ensure!(
            self.heartbeat_interval_ms >= 100,
            "heartbeat interval: at least 100 ms"
        );
        if let Some(settle_ms) = self.settle_ms {
            // The collectors' own check, before any is started.
            tenure_attribution::EngineConfig {
                skew_margin_ms: LOAD_SKEW_MARGIN_MS,
                pending_deadline_ms: self.pending_deadline_ms(),
                settle_ms,
                ..tenure_attribution::EngineConfig::default()
            }
            .validate()
            .map_err(|e| anyhow::anyhow!("settle: {e}"))?;
        }
        anyhow::ensure!(
            self.tenure_ms_max >= self.tenure_ms_min,
            "tenures: min <= max"
        );
        anyhow::ensure!(self.duration_secs >= 1, "duration: at least 1 s");
        Ok(())
    }

    /// `collector_threads`, or the machine's cores shared among the collectors.
    pub fn collector_threads_or_share(&self) -> usize {
        if self.collector_threads > 0 {
            return self.collector_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        (cores / (self.regions * self.collectors_per_region).max(1)).max(1)
    }

    fn pending_deadline_ms(&self) -> u64 {
        2 * self.heartbeat_interval_ms + 3_000
    }
}

/// What a load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Flows the collectors acknowledged (journaled), over the whole run.
    pub flows_acked: u64,
    /// Exporter batches acknowledged, over the whole run.
    pub batches_acked: u64,
    /// Claims in acknowledged batches.
    pub claims_acked: u64,
    pub batches_busy: u64,
    pub send_errors: u64,
    /// Acknowledged flows found in no sink.
    pub flows_lost: u64,
    pub sinks: sinks::SinkTally,
    pub window_ms: u64,
    pub collector_cpu_secs: f64,
    /// Of `collector_cpu_secs`, the time in the kernel (system calls: sockets, the
    /// journal's and the sinks' writes and syncs).
    pub collector_system_cpu_secs: f64,
    pub flows_per_cpu_sec: f64,
    pub delay_p50_ms: u64,
    pub delay_p99_ms: u64,
    pub ips_tracked: f64,
    pub engine_table_bytes: f64,
    pub collector_rss_bytes: u64,
    /// Claim batches between collectors, in sealed bytes, per claim from exporters.
    pub peer_claim_bytes_per_claim: f64,
    /// Forwarded flow batches between collectors, in sealed bytes, per acknowledged flow.
    pub peer_flow_bytes_per_flow: f64,
    pub replication: Vec<replication::ReplicationRow>,
}

impl LoadReport {
    pub fn netflix_ratio(&self) -> f64 {
        self.flows_per_cpu_sec / NETFLIX_FLOWS_PER_VCPU_SEC
    }

    pub fn bytes_per_tracked_ip(&self) -> f64 {
        if self.ips_tracked == 0.0 {
            0.0
        } else {
            self.engine_table_bytes / self.ips_tracked
        }
    }

    pub fn replication_ratio(&self) -> f64 {
        self.replication
            .iter()
            .find(|r| r.nodes == REPLICATION_REPORT_NODES)
            .map_or(0.0, replication::ReplicationRow::bytes_ratio)
    }

    pub fn result_line(&self) -> String {
        format!(
            "RESULT flows_per_cpu_sec={:.0} netflix_ratio={:.2} p99_attribution_delay_ms={} bytes_per_tracked_ip={:.0} replication_bytes_ratio_vs_broadcast_at_30_nodes={:.4}",
            self.flows_per_cpu_sec,
            self.netflix_ratio(),
            self.delay_p99_ms,
            self.bytes_per_tracked_ip(),
            self.replication_ratio()
        )
    }
}

/// Counters the exporter tasks share with the driver.
#[derive(Debug, Default)]
struct Counters {
    flows_acked: AtomicU64,
    batches_acked: AtomicU64,
    claims_acked: AtomicU64,
    batches_busy: AtomicU64,
    send_errors: AtomicU64,
}

/// What one exporter task hands back: the sequence numbers of its acknowledged flows.
#[derive(Debug, Default)]
struct ExporterOutcome {
    exporter_id: u64,
    acked: Vec<(u64, u64)>,
}

fn random_hex(bytes: usize) -> String {
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rand::RngExt::random::<u8>(&mut rng)))
        .collect()
}

fn prefix_of(region: usize) -> anyhow::Result<Ipv4Net> {
    Ok(format!("10.{}.0.0/12", 16 * (region + 1)).parse()?)
}

fn region_name(region: usize) -> String {
    format!("load-{region}")
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site writes one collector's file"
)]
fn collector_toml(
    options: &LoadOptions,
    node_id: &str,
    region: usize,
    seed: Option<SocketAddr>,
    cluster_hex: &str,
    exporter_hex: &str,
    sink_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> anyhow::Result<String> {
    let mut text = format!(
        r#"node_id = "{node_id}"
region = "{region_name}"
prefixes = ["{prefix}"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
seeds = [{seeds}]
heartbeat_interval_ms = {heartbeat}
replication = {replication}
region_size_hint = {region_size}
fleet_size_hint = {fleet_size}
cluster_key = {{ key_id = {CLUSTER_KEY_ID}, key_hex = "{cluster_hex}" }}
exporter_key = {{ key_id = {EXPORTER_KEY_ID}, key_hex = "{exporter_hex}" }}
exporter_claims_per_sec_max = 1000000000
exporter_claims_burst_max = 1000000000
exporter_flows_per_sec_max = 1000000000
exporter_flows_burst_max = 1000000000
shutdown_grace_ms = 3000
sink = {{ kind = "files", dir = "{sink}"{direct_io} }}
data_dir = "{data}"
{fsync}
[engine]
skew_margin_ms = {LOAD_SKEW_MARGIN_MS}
pending_deadline_ms = {deadline}
{settle}
[regions]
"#,
        region_name = region_name(region),
        prefix = prefix_of(region)?,
        seeds = seed.map(|s| format!("\"{s}\"")).unwrap_or_default(),
        heartbeat = options.heartbeat_interval_ms,
        replication = options.replication,
        region_size = options.collectors_per_region,
        fleet_size = options.collectors_per_region * options.regions,
        sink = sink_dir.display(),
        direct_io = options
            .sink_direct_io
            .map(|on| format!(", direct_io = {on}"))
            .unwrap_or_default(),
        data = data_dir.display(),
        deadline = options.pending_deadline_ms(),
        settle = options
            .settle_ms
            .map(|ms| format!("settle_ms = {ms}"))
            .unwrap_or_default(),
        fsync = options
            .journal_fsync_interval_ms
            .map(|ms| format!("journal_fsync_interval_ms = {ms}"))
            .unwrap_or_default(),
    );
    for other in (0..options.regions).filter(|r| *r != region) {
        text.push_str(&format!(
            "\"{}\" = [\"{}\"]\n",
            region_name(other),
            prefix_of(other)?
        ));
    }
    Ok(text)
}

/// Starts the cluster: every region's collectors, the very first one the seed of all.
fn start_cluster(
    options: &LoadOptions,
    cluster_hex: &str,
    exporter_hex: &str,
) -> anyhow::Result<Vec<Collector>> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let threads = options.collector_threads_or_share();
    let mut collectors: Vec<Collector> = Vec::new();
    for region in 0..options.regions {
        for i in 0..options.collectors_per_region {
            let node_id = format!("{}-{i}", region_name(region));
            let sink_dir = options.dir.join(&node_id).join("sink");
            let text = collector_toml(
                options,
                &node_id,
                region,
                collectors.first().map(|c| c.gossip),
                cluster_hex,
                exporter_hex,
                &sink_dir,
                &options.dir.join("data"),
            )?;
            let path = options.dir.join(format!("{node_id}.toml"));
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            let collector = Collector::spawn(
                &exe,
                &path,
                &node_id,
                &region_name(region),
                sink_dir,
                threads,
            )?;
            println!(
                "collector {node_id} pid={} data={} http=http://{}",
                collector.pid(),
                collector.data,
                collector.http
            );
            collectors.push(collector);
        }
    }
    Ok(collectors)
}

/// Waits until every collector is ready (handoff done) and sees the whole cluster.
async fn wait_ready(collectors: &[Collector], per_region: usize) -> anyhow::Result<()> {
    let deadline = clock::now().0 + READY_TIMEOUT_MS;
    loop {
        let mut ready = 0;
        for c in collectors {
            let readyz =
                httpc::request(c.http, "GET", "/readyz", None, None, Duration::from_secs(2)).await;
            let cluster = httpc::request(
                c.http,
                "GET",
                "/v1/cluster",
                None,
                None,
                Duration::from_secs(2),
            )
            .await;
            if let (Ok((200, _)), Ok((200, body))) = (readyz, cluster) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let wan = v["wan_members"].as_array().map_or(0, Vec::len);
                let ring = v["ring"]["members"].as_array().map_or(0, Vec::len);
                if wan + 1 == collectors.len() && ring == per_region {
                    ready += 1;
                }
            }
        }
        if ready == collectors.len() {
            return Ok(());
        }
        anyhow::ensure!(
            clock::now().0 < deadline,
            "the cluster did not converge within {READY_TIMEOUT_MS} ms ({ready} of {} ready)",
            collectors.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Who sends a batch: an exporter of one region of the fleet.
struct Speaker<'a> {
    fleet: &'a LoadFleet,
    region: usize,
    region_name: &'a str,
    exporter_id: u64,
}

/// One exporter's batch: claims first (the flows may need them), then flows.
fn build_batch(
    who: &Speaker<'_>,
    batch_id: u64,
    flows: &[LoadFlow],
    claims: &[LoadClaim],
    dictionary: &mut BatchDictionary,
) -> FlowBatch {
    let claims = claims
        .iter()
        .map(|c| wire::Claim {
            ip: c.ip,
            workload: dictionary.index(who.fleet, who.region, c.workload),
            instance: 0,
            since_ms: c.since_ms,
            until_ms: c.until_ms,
        })
        .collect();
    let flows = flows
        .iter()
        .map(|f| {
            let w = dictionary.index(who.fleet, who.region, f.local_workload);
            fleet::wire_flow(f, who.exporter_id, w)
        })
        .collect();
    FlowBatch {
        batch_id,
        exporter_id: who.exporter_id,
        hops: 0,
        sent_ms: 0,
        region: who.region_name.to_owned(),
        dictionary: dictionary.take(),
        flows,
        claims,
    }
}

/// A batch waiting for its acknowledgement, with the sequence numbers of its flows.
struct Outgoing {
    batch: FlowBatch,
    seqs: Option<(u64, u64)>,
}

/// The exporter of hosts `e` of region `region`: heartbeats every interval, flows as fast
/// as acknowledged (or at `rate_per_sec`), gathered up to the send interval, one batch in
/// flight, re-sent while busy.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site starts every exporter"
)]
async fn exporter(
    fleet: Arc<LoadFleet>,
    region: usize,
    e: u32,
    exporter_id: u64,
    collectors: Vec<SocketAddr>,
    key: SecretKey,
    options: LoadOptions,
    rate_per_sec: u64,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> ExporterOutcome {
    let start = clock::now().0;
    let crypto = Crypto::new(EXPORTER_KEY_ID, &key, None, exporter_id, start);
    let name = region_name(region);
    let who = Speaker {
        fleet: &fleet,
        region,
        region_name: &name,
        exporter_id,
    };
    let mut rng = SplitMix64::new(options.seed ^ exporter_id.wrapping_mul(0x9e37_79b9));
    let mut dictionary = BatchDictionary::new(options.workloads_per_region);
    let mut outcome = ExporterOutcome {
        exporter_id,
        acked: Vec::new(),
    };
    let mut current = (e as usize) % collectors.len().max(1);
    let mut client: Option<Client> = None;
    let mut queue: VecDeque<Outgoing> = VecDeque::new();
    let mut seq = 0u64;
    let mut batch_id = start << 8;
    let mut last_heartbeat: Option<u64> = None;
    // Exporters heartbeat out of phase with each other, as hosts do.
    let interval = options.heartbeat_interval_ms;
    let mut next_heartbeat =
        start + interval * u64::from(e) / u64::from(options.exporters_per_region.max(1));
    let mut claims = Vec::new();
    // The flows gathered for the next batch: their first sequence number, and when the
    // first of them was gathered.
    let mut flows = Vec::new();
    let mut first = seq;
    let mut gathering_since: Option<u64> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let now = clock::now().0;
        if queue.is_empty() {
            claims.clear();
            if now >= next_heartbeat {
                fleet.claims(region, e, last_heartbeat, now, &mut claims);
                last_heartbeat = Some(now);
                next_heartbeat = (next_heartbeat + interval).max(now + 1);
            }
            let room = options.batch_flows.saturating_sub(flows.len()) as u64;
            let due = if rate_per_sec == 0 {
                room
            } else {
                (now.saturating_sub(start) * rate_per_sec / 1_000)
                    .saturating_sub(seq)
                    .min(room)
            };
            if due > 0 && gathering_since.is_none() {
                gathering_since = Some(now);
                first = seq;
            }
            for _ in 0..due {
                if let Some(flow) = fleet.flow(region, e, seq, now, &mut rng) {
                    flows.push(flow);
                }
                seq += 1;
            }
            // The gathered flows go when the batch is full, when they have waited the send
            // interval, or with a heartbeat; otherwise they wait for more.
            let ripe = !flows.is_empty()
                && gathering_since.is_some_and(|since| {
                    flows.len() >= options.batch_flows
                        || now >= since + options.send_interval_ms
                        || !claims.is_empty()
                });
            let mut chunks = claims.chunks(wire::CLAIMS_PER_BATCH_MAX_DEFAULT);
            // The first chunk of claims rides with the flows; more claims go ahead alone.
            let with_flows = chunks.next().unwrap_or(&[]);
            for chunk in chunks {
                batch_id += 1;
                let batch = build_batch(&who, batch_id, &[], chunk, &mut dictionary);
                queue.push_back(Outgoing { batch, seqs: None });
            }
            if ripe || !with_flows.is_empty() {
                let sent_flows: &[_] = if ripe { &flows } else { &[] };
                batch_id += 1;
                let batch = build_batch(&who, batch_id, sent_flows, with_flows, &mut dictionary);
                queue.push_front(Outgoing {
                    batch,
                    seqs: (ripe && seq > first).then_some((first, seq)),
                });
                if ripe {
                    flows.clear();
                    gathering_since = None;
                }
            }
            if queue.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
        }
        let Some(next) = queue.front() else { continue };
        let sent = send(&mut client, collectors[current], &crypto, &next.batch).await;
        match sent {
            Ok(AckStatus::Accepted) => {
                if let Some(done) = queue.pop_front() {
                    counters.batches_acked.fetch_add(1, Ordering::Relaxed);
                    counters
                        .flows_acked
                        .fetch_add(done.batch.flows.len() as u64, Ordering::Relaxed);
                    counters
                        .claims_acked
                        .fetch_add(done.batch.claims.len() as u64, Ordering::Relaxed);
                    if let Some(range) = done.seqs {
                        outcome.acked.push(range);
                    }
                }
            }
            Ok(AckStatus::Busy { retry_after_ms }) => {
                counters.batches_busy.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(5, 200))).await;
            }
            Ok(AckStatus::Rejected(reason)) => {
                tracing::error!(?reason, exporter_id, "a load batch was rejected");
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
                queue.pop_front();
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&*e), exporter_id, "sending a load batch failed; next collector");
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
                client = None;
                current = (current + 1) % collectors.len().max(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // A last heartbeat once the last flows' windows (widened by δ) are in the past, as an
    // exporter sends when it stops: without it, flows waiting for their remote IPs' next
    // heartbeat would wait in vain.
    tokio::time::sleep(Duration::from_millis(LOAD_SKEW_MARGIN_MS + 50)).await;
    claims.clear();
    fleet.claims(region, e, last_heartbeat, clock::now().0, &mut claims);
    for chunk in claims.chunks(wire::CLAIMS_PER_BATCH_MAX_DEFAULT) {
        batch_id += 1;
        let batch = build_batch(&who, batch_id, &[], chunk, &mut dictionary);
        for _ in 0..3 {
            match send(&mut client, collectors[current], &crypto, &batch).await {
                Ok(AckStatus::Accepted) => break,
                Ok(_) | Err(_) => {
                    client = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    outcome
}

async fn send(
    client: &mut Option<Client>,
    addr: SocketAddr,
    crypto: &Crypto,
    batch: &FlowBatch,
) -> anyhow::Result<AckStatus> {
    let timeout = Duration::from_millis(ACK_TIMEOUT_MS);
    let c = match client {
        Some(c) => c,
        None => client.insert(Client::connect(addr, crypto, timeout).await?),
    };
    let mut batch = batch.clone();
    batch.sent_ms = crate::shell::clock::now().0;
    Ok(c.send_batch(crypto, batch, timeout).await?)
}

fn cpu_ticks(collectors: &[Collector]) -> anyhow::Result<procs::CpuTicks> {
    collectors.iter().map(|c| procs::cpu_ticks(c.pid())).sum()
}

/// Sums one metric over every collector.
async fn metric_total(collectors: &[Collector], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for c in collectors {
        if let Ok(text) = procs::scrape(c.http).await {
            total += procs::metric_sum(&text, name, labels);
        }
    }
    total
}

/// Runs the load; see the module documentation.
pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    options.validate()?;
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let cluster_hex = random_hex(32);
    let exporter_hex = random_hex(32);
    let exporter_key = crate::config::parse_key(&exporter_hex)?;

    let mut collectors = start_cluster(&options, &cluster_hex, &exporter_hex)?;
    wait_ready(&collectors, options.collectors_per_region).await?;
    println!(
        "cluster ready: {} collectors, {} tokio worker thread(s) each",
        collectors.len(),
        options.collector_threads_or_share()
    );

    let start_ms = clock::now().0;
    let regions = (0..options.regions)
        .map(|r| Ok((region_name(r), prefix_of(r)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let fleet = Arc::new(LoadFleet::new(LoadFleetConfig {
        seed: options.seed,
        regions,
        ips_per_region: options.ips_per_region,
        exporters_per_region: options.exporters_per_region,
        workloads_per_region: options.workloads_per_region,
        tenure_ms_min: options.tenure_ms_min.max(4 * options.heartbeat_interval_ms),
        tenure_ms_max: options.tenure_ms_max.max(4 * options.heartbeat_interval_ms),
        gap_ms: options.heartbeat_interval_ms / 2,
        cross_region_share: options.cross_region_share,
        flow_ms_max: 2_000,
        fanout: options.fanout,
        start_ms,
    }));
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let exporters_total = options.exporters_per_region as u64 * options.regions as u64;
    let rate_per_exporter = options.rate.div_ceil(exporters_total.max(1));
    let mut tasks = Vec::new();
    let mut exporter_ids = Vec::new();
    for region in 0..options.regions {
        let addrs: Vec<SocketAddr> = collectors
            .iter()
            .filter(|c| c.region == region_name(region))
            .map(|c| c.data)
            .collect();
        for e in 0..options.exporters_per_region {
            let exporter_id = 1_000 * (region as u64 + 1) + u64::from(e);
            exporter_ids.push(exporter_id);
            tasks.push(tokio::spawn(exporter(
                fleet.clone(),
                region,
                e,
                exporter_id,
                addrs.clone(),
                exporter_key.clone(),
                options.clone(),
                rate_per_exporter,
                counters.clone(),
                stop_rx.clone(),
            )));
        }
    }
    println!(
        "exporters: {exporters_total} ({} per region), {} IPs per region, heartbeat every {} ms, rate {}, {}",
        options.exporters_per_region,
        options.ips_per_region,
        options.heartbeat_interval_ms,
        if options.rate == 0 {
            "as fast as acknowledged".to_owned()
        } else {
            format!("{} flows/s", options.rate)
        },
        if options.send_interval_ms == 0 {
            "each batch once the previous one is acknowledged".to_owned()
        } else {
            format!("flows gathered up to {} ms per batch", options.send_interval_ms)
        }
    );
    tokio::time::sleep(Duration::from_secs(options.warmup_secs)).await;

    // The measured window.
    let cpu_before = cpu_ticks(&collectors)?;
    let window_from = clock::now().0;
    let acked_before = counters.flows_acked.load(Ordering::Relaxed);
    for second in 1..=options.duration_secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "t={second:>3}s acked={} busy={} errors={}",
            counters.flows_acked.load(Ordering::Relaxed) - acked_before,
            counters.batches_busy.load(Ordering::Relaxed),
            counters.send_errors.load(Ordering::Relaxed)
        );
    }
    let cpu_after = cpu_ticks(&collectors)?;
    let window_to = clock::now().0;
    let mut report = LoadReport {
        window_ms: window_to - window_from,
        collector_cpu_secs: cpu_after.total().saturating_sub(cpu_before.total()) as f64
            / procs::USER_HZ as f64,
        collector_system_cpu_secs: cpu_after.system.saturating_sub(cpu_before.system) as f64
            / procs::USER_HZ as f64,
        ..LoadReport::default()
    };
    report.collector_rss_bytes = collectors
        .iter()
        .map(|c| procs::rss_bytes(c.pid()).unwrap_or(0))
        .sum();
    report.ips_tracked = metric_total(&collectors, crate::shell::metrics::IPS_TRACKED, &[]).await;
    report.engine_table_bytes =
        metric_total(&collectors, crate::shell::metrics::ENGINE_TABLE_BYTES, &[]).await;

    // Stop sending; every acknowledged flow must come out.
    let _ = stop_tx.send(true);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.context("an exporter task")?);
    }
    report.flows_acked = counters.flows_acked.load(Ordering::Relaxed);
    report.batches_acked = counters.batches_acked.load(Ordering::Relaxed);
    report.claims_acked = counters.claims_acked.load(Ordering::Relaxed);
    report.batches_busy = counters.batches_busy.load(Ordering::Relaxed);
    report.send_errors = counters.send_errors.load(Ordering::Relaxed);
    let drain_deadline = clock::now().0 + options.pending_deadline_ms() + 15_000;
    loop {
        let out = metric_total(&collectors, crate::shell::metrics::FLOWS_OUT, &[]).await;
        if out >= report.flows_acked as f64 || clock::now().0 > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let claim_bytes = metric_total(
        &collectors,
        crate::shell::metrics::PEER_BYTES_SENT,
        &[("message", "claims")],
    )
    .await;
    let flow_bytes = metric_total(
        &collectors,
        crate::shell::metrics::PEER_BYTES_SENT,
        &[("message", "flows")],
    )
    .await;
    report.peer_claim_bytes_per_claim = claim_bytes / (report.claims_acked.max(1) as f64);
    report.peer_flow_bytes_per_flow = flow_bytes / (report.flows_acked.max(1) as f64);
    for c in &mut collectors {
        if !c.stop(Duration::from_secs(20)) {
            println!("collector {} did not stop within 20 s; killed", c.node_id);
        }
    }

    // Read the sinks back.
    let dirs: Vec<PathBuf> = collectors.iter().map(|c| c.sink_dir.clone()).collect();
    let tally = tokio::task::spawn_blocking({
        let fleet = fleet.clone();
        let ids = exporter_ids.clone();
        move || sinks::read(&dirs, &fleet, &ids, (window_from, window_to))
    })
    .await
    .context("the sink reader")??;
    for outcome in &outcomes {
        for (from, to) in &outcome.acked {
            for seq in *from..*to {
                if !tally.seen.contains(outcome.exporter_id, seq) {
                    report.flows_lost += 1;
                }
            }
        }
    }
    report.delay_p50_ms = tally.delay_quantile_ms(0.5).unwrap_or(0);
    report.delay_p99_ms = tally.delay_quantile_ms(0.99).unwrap_or(0);
    report.flows_per_cpu_sec = if report.collector_cpu_secs > 0.0 {
        tally.attributed_in_window as f64 / report.collector_cpu_secs
    } else {
        0.0
    };
    report.sinks = tally;
    report.replication = replication::compare(
        &REPLICATION_SIZES,
        options.replication,
        REPLICATION_CLAIMS,
        options.seed,
    )?;
    Ok(report)
}

/// The human part of the report (the caller prints the RESULT line after it).
pub fn describe(report: &LoadReport) -> String {
    let s = &report.sinks;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!(
        "window: {:.1} s; collectors used {:.2} CPU-s ({:.0}% in the kernel); attributed in window: {} flows -> {:.0} flows per collector CPU-second ({:.2} x Netflix's {:.0})",
        report.window_ms as f64 / 1_000.0,
        report.collector_cpu_secs,
        100.0 * report.collector_system_cpu_secs / report.collector_cpu_secs.max(f64::MIN_POSITIVE),
        s.attributed_in_window,
        report.flows_per_cpu_sec,
        report.netflix_ratio(),
        NETFLIX_FLOWS_PER_VCPU_SEC
    ));
    line(format!(
        "flows: acked={} emitted={} lost={} duplicates={} attributed(heartbeat)={} attributed(other)={} unattributed={} {:?} misattributed={} malformed_lines={} foreign_lines={}",
        report.flows_acked,
        s.flows,
        report.flows_lost,
        s.duplicates,
        s.attributed_heartbeat,
        s.attributed_other,
        s.unattributed,
        s.unattributed_by_reason,
        s.misattributed,
        s.malformed,
        s.foreign
    ));
    line(format!(
        "exporter batches: acknowledged={} flows_per_batch={:.0}",
        report.batches_acked,
        report.flows_acked as f64 / report.batches_acked.max(1) as f64
    ));
    for example in &s.misattributed_examples {
        line(format!("misattributed: {example}"));
    }
    line(format!(
        "attribution delay (flow end to emission, window's attributed flows): p50={} ms p99={} ms",
        report.delay_p50_ms, report.delay_p99_ms
    ));
    line(format!(
        "memory: {:.0} IPs tracked (replicas counted), engine tables {:.0} bytes = {:.0} bytes per tracked IP; collectors' RSS {} MiB = {:.0} bytes per tracked IP (everything included)",
        report.ips_tracked,
        report.engine_table_bytes,
        report.bytes_per_tracked_ip(),
        report.collector_rss_bytes / (1 << 20),
        if report.ips_tracked > 0.0 { report.collector_rss_bytes as f64 / report.ips_tracked } else { 0.0 }
    ));
    line(format!(
        "between collectors: {:.1} bytes of claim batches per claim ({} claims), {:.1} bytes of forwarded flow batches per flow; exporter batches answered busy: {}, send errors: {}",
        report.peer_claim_bytes_per_claim,
        report.claims_acked,
        report.peer_flow_bytes_per_flow,
        report.batches_busy,
        report.send_errors
    ));
    line(format!(
        "replication per claim, one heartbeat round of {REPLICATION_CLAIMS} claims (sealed bytes between collectors):"
    ));
    line(format!(
        "{:>6} {:>12} {:>8} {:>8} {:>14} {:>8} {:>8} {:>8}",
        "nodes", "ring_bytes", "copies", "frames", "broadcast_bytes", "copies", "frames", "ratio"
    ));
    for r in &report.replication {
        line(format!(
            "{:>6} {:>12.1} {:>8.3} {:>8.4} {:>14.1} {:>8.1} {:>8.4} {:>8.4}",
            r.nodes,
            r.ring_bytes_per_claim,
            r.ring_copies_per_claim,
            r.ring_frames_per_claim,
            r.broadcast_bytes_per_claim,
            r.broadcast_copies_per_claim,
            r.broadcast_frames_per_claim,
            r.bytes_ratio()
        ));
    }
    out
}
