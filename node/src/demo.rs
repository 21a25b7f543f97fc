//! `tenure demo`: a two-region cluster of three collectors each on loopback (real sockets,
//! ports chosen at run time), a synthetic fleet whose IPs are reused quickly, an event
//! feed with a cloud tracker's delays feeding the legacy event-only attributor on the same
//! flows, and, when eBPF is available, a real exporter of this host's TCP traffic.
//!
//! At the end it prints one line:
//! `RESULT flows=<n> attributed=<n> unattributed=<n> misattributed=<n> legacy_misattributed=<n>`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipnet::IpNet;
use tenure_attribution::{
    EngineConfig, LegacyAttributor, LegacyConfig, LegacyEvent, UnixMillis, Verdict,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{CollectorConfig, ExporterConfig, IdentityConfig, KeyConfig, SourceConfig};
use crate::core::EmittedFlow;
use crate::exporter::batcher::{Batcher, LocalClaim};
use crate::exporter::{synthetic_flow, Sender};
use crate::fleet::{Fleet, FleetConfig};
use crate::httpc;
use crate::report::Chain;
use crate::shell::clock;
use crate::shell::collector::{self, Bound};
use crate::shell::transport::Crypto;

/// The demo's heartbeat interval, in ms: short, so that a 30 s run shows results.
pub const DEMO_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// δ in the demo, in ms: the collectors share one clock here.
pub const DEMO_SKEW_MARGIN_MS: u64 = 250;
/// How long a flow may wait for coverage in the demo, in ms.
pub const DEMO_PENDING_DEADLINE_MS: u64 = 4_000;
/// The legacy attributor's hold-back in the demo, in ms (Netflix held 15 minutes against
/// delays of minutes; here delays are scaled with the run).
pub const DEMO_LEGACY_HOLD_BACK_MS: u64 = 5_000;
/// How long the demo waits for the cluster to converge and hand off, in ms.
pub const DEMO_READY_TIMEOUT_MS: u64 = 60_000;
/// Collectors per region.
pub const DEMO_COLLECTORS_PER_REGION: usize = 3;

/// Options of `tenure demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Run the fleet this long; `None`: until Ctrl-C.
    pub duration_secs: Option<u64>,
    pub seed: u64,
    /// Where the collectors' sink files go.
    pub dir: PathBuf,
    /// Try to capture this host's traffic with eBPF.
    pub capture: bool,
}

/// The final tally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub flows: u64,
    pub attributed: u64,
    pub unattributed: u64,
    pub misattributed: u64,
    pub legacy_flows: u64,
    pub legacy_misattributed: u64,
    pub legacy_unattributed: u64,
    pub host_flows: u64,
    pub duplicates: u64,
}

impl Tally {
    pub fn result_line(&self) -> String {
        format!(
            "RESULT flows={} attributed={} unattributed={} misattributed={} legacy_misattributed={}",
            self.flows, self.attributed, self.unattributed, self.misattributed, self.legacy_misattributed
        )
    }
}

/// Scores tenure's verdicts against the truth.
#[derive(Debug, Default)]
struct Scorer {
    truth: BTreeMap<u128, Option<String>>,
    seen: BTreeSet<u128>,
    wrong: BTreeSet<u128>,
    tally: Tally,
    by_detail: BTreeMap<String, u64>,
    examples: Vec<String>,
}

impl Scorer {
    fn score(&mut self, flow: &EmittedFlow) {
        let id = flow.record.flow_id;
        let Some(truth) = self.truth.get(&id) else {
            self.tally.host_flows += 1;
            return;
        };
        let wrong = match &flow.verdict {
            Verdict::Attributed(a) => match (a.workload(), truth) {
                (Some(w), Some(t)) => **w != **t,
                (None, None) => false,
                (Some(_), None) | (None, Some(_)) => true,
            },
            Verdict::Unattributed(_) => false,
        };
        if wrong && self.wrong.insert(id) {
            self.tally.misattributed += 1;
            if self.examples.len() < 5 {
                self.examples.push(format!(
                    "flow {id:x} to {} at {}: said {:?}, truth {truth:?}",
                    flow.record.remote_ip, flow.record.start_ms, flow.verdict
                ));
            }
        }
        if !self.seen.insert(id) {
            self.tally.duplicates += 1;
            return;
        }
        self.tally.flows += 1;
        let detail = match (flow.source(), flow.reason()) {
            (Some(s), _) => format!("attributed/{s}"),
            (None, Some(r)) => format!("unattributed/{r}"),
            (None, None) => "none".to_owned(),
        };
        *self.by_detail.entry(detail).or_default() += 1;
        match flow.verdict {
            Verdict::Attributed(_) => self.tally.attributed += 1,
            Verdict::Unattributed(_) => self.tally.unattributed += 1,
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut rng: rand::rngs::StdRng = rand::make_rng();
    let mut out = String::new();
    for _ in 0..bytes {
        let b: u8 = rand::RngExt::random(&mut rng);
        out.push_str(&format!("{b:02x}"));
    }
    out
}

struct Node {
    bound: Bound,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Runs the demo; returns the tally (the caller prints the RESULT line).
pub async fn run(
    options: DemoOptions,
    ctrl_c: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Tally> {
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let key_hex = random_hex(32);
    let token = random_hex(16);
    let regions: Vec<(String, IpNet)> = vec![
        ("us-east".to_owned(), "10.1.0.0/16".parse()?),
        ("eu-west".to_owned(), "10.2.0.0/16".parse()?),
    ];

    // Real capture of this host's traffic, when possible.
    let capture = if options.capture {
        match tenure_node_ebpf::check_privileges() {
            Ok(()) => {
                println!("capture: eBPF available; exporting this host's own TCP traffic as workload demo-host (127.0.0.0/8 joins region us-east)");
                true
            }
            Err(e) => {
                println!("capture: not capturing this host's traffic: {}", Chain(&e));
                false
            }
        }
    } else {
        println!("capture: disabled by --no-capture");
        false
    };
    let mut prefixes_of: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
    for (r, p) in &regions {
        prefixes_of.entry(r.clone()).or_default().push(*p);
    }
    if capture {
        prefixes_of
            .entry("us-east".to_owned())
            .or_default()
            .push("127.0.0.0/8".parse()?);
    }

    // HTTP ports are chosen before the collectors start, so that every collector can be
    // told where the others serve HTTP (`peer_http_addrs`, for cluster-wide dependency
    // queries): the gossip identity carries no HTTP address. The ports are released just
    // before the collectors bind them again; on loopback the window is a few ms.
    let http_addrs = reserve_http_addrs(&regions)?;

    // Collectors: the first of us-east is everyone's seed.
    let (tap_tx, mut tap_rx) = mpsc::channel::<EmittedFlow>(65_536);
    let mut nodes: Vec<Node> = Vec::new();
    let mut seed: Option<SocketAddr> = None;
    for (region, _) in &regions {
        for i in 0..DEMO_COLLECTORS_PER_REGION {
            let node_id = format!("{region}-{i}");
            let others: BTreeMap<String, Vec<IpNet>> = prefixes_of
                .iter()
                .filter(|(r, _)| *r != region)
                .map(|(r, p)| (r.clone(), p.clone()))
                .collect();
            let text = collector_toml(
                &node_id,
                region,
                &prefixes_of[region],
                &others,
                seed,
                &key_hex,
                &token,
                &options.dir.join(&node_id),
                &http_addrs,
            );
            let config: CollectorConfig =
                crate::config::parse(&text, std::path::Path::new("demo"))?;
            let (bound_tx, bound_rx) = oneshot::channel();
            let (stop_tx, mut stop_rx) = watch::channel(false);
            let tap = tap_tx.clone();
            let task = tokio::spawn(async move {
                collector::run(
                    config,
                    async move { collector::stopped(&mut stop_rx).await },
                    Some(bound_tx),
                    Some(tap),
                )
                .await
            });
            let bound = match bound_rx.await {
                Ok(b) => b,
                Err(_) => {
                    let err = task
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r.err().map_or_else(|| Ok(anyhow::anyhow!("stopped")), Ok))?;
                    return Err(err.context(format!("starting collector {node_id}")));
                }
            };
            seed.get_or_insert(bound.gossip_addr);
            println!(
                "node {} region={} http=http://{} data={} gossip={}",
                bound.node_id, bound.region, bound.http_addr, bound.data_addr, bound.gossip_addr
            );
            nodes.push(Node {
                bound,
                stop: stop_tx,
                task,
            });
        }
    }
    drop(tap_tx);

    // Wait until every node sees the whole cluster and has finished its handoff.
    print!("waiting for the cluster to converge and hand off");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DEMO_READY_TIMEOUT_MS);
    loop {
        let mut ready = 0;
        for node in &nodes {
            if let Ok((200, body)) = httpc::request(
                node.bound.http_addr,
                "GET",
                "/readyz",
                None,
                None,
                Duration::from_secs(2),
            )
            .await
            {
                if let Ok((200, cluster)) = httpc::request(
                    node.bound.http_addr,
                    "GET",
                    "/v1/cluster",
                    None,
                    None,
                    Duration::from_secs(2),
                )
                .await
                {
                    let v: serde_json::Value = serde_json::from_str(&cluster).unwrap_or_default();
                    let wan = v["wan_members"].as_array().map_or(0, Vec::len);
                    let ring = v["ring"]["members"].as_array().map_or(0, Vec::len);
                    if wan == nodes.len() - 1
                        && ring == DEMO_COLLECTORS_PER_REGION
                        && body.contains("true")
                    {
                        ready += 1;
                    }
                }
            }
        }
        if ready == nodes.len() {
            println!(" ... ready");
            if let Some(first) = nodes.first() {
                println!(
                    "service map: http://{}/ (any node's / shows the whole cluster)",
                    first.bound.http_addr
                );
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            println!();
            anyhow::bail!("the cluster did not converge within {DEMO_READY_TIMEOUT_MS} ms");
        }
        print!(".");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The fleet, its exporters (one per region, each speaking for the region's hosts) and
    // the legacy baseline.
    let start = clock::now();
    let mut fleet = Fleet::new(FleetConfig::demo(options.seed, regions.clone()), start.0);
    let key = crate::config::parse_key(&key_hex)?;
    let mut exporters = Vec::new();
    for (index, (region, _)) in regions.iter().enumerate() {
        let exporter_id = 1_000 + index as u64;
        let collectors: Vec<SocketAddr> = nodes
            .iter()
            .filter(|n| &n.bound.region == region)
            .map(|n| n.bound.data_addr)
            .collect();
        let config = ExporterConfig {
            exporter_id,
            region: region.clone(),
            collectors,
            heartbeat_interval_ms: DEMO_HEARTBEAT_INTERVAL_MS,
            key: KeyConfig {
                key_id: 1,
                key_hex: Some(key_hex.clone()),
                key_file: None,
            },
            identity: None,
            source: SourceConfig::default(),
            buffer_batches_max: 600,
            batch_flows_max: 16_384,
            ack_timeout_ms: 3_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            http_addr: None,
            state_dir: None,
            local_margin_ms: crate::exporter::history::MARGIN_MS_DEFAULT,
            local_retention_ms: crate::exporter::history::RETENTION_MS_DEFAULT,
            local_source_lag_ms: 0,
        };
        exporters.push((
            Sender::new(&config),
            Batcher::new(
                exporter_id,
                region,
                start.0 << 8,
                config.batch_flows_max,
                config.buffer_batches_max,
            ),
            Crypto::new(1, &key, None, exporter_id, start.0),
        ));
    }
    let mut legacy: LegacyAttributor<u128> = LegacyAttributor::new(LegacyConfig {
        hold_back_ms: DEMO_LEGACY_HOLD_BACK_MS,
        held_flows_max: 1_000_000,
    });

    // Load balancers: IPs with no exporter, known from the event feed.
    for (region, ip, owner) in fleet.load_balancers() {
        let at = start.0.saturating_sub(60_000);
        legacy.apply(&LegacyEvent::Assign {
            ip,
            owner: Arc::from(owner.as_str()),
            at: UnixMillis(at),
        });
        if let Some(node) = nodes.iter().find(|n| n.bound.region == region) {
            let line = format!(
                "{{\"ip\":\"{ip}\",\"kind\":\"assign\",\"owner\":\"{owner}\",\"at\":{at}}}\n"
            );
            let path = format!("/v1/ip-events?watermark={}", start.0);
            match httpc::request(
                node.bound.http_addr,
                "POST",
                &path,
                Some(&line),
                Some(&token),
                Duration::from_secs(5),
            )
            .await
            {
                Ok((200, _)) => {}
                Ok((status, body)) => println!("event feed: {status} {body}"),
                Err(e) => println!("event feed: {e}"),
            }
        }
    }

    // The real exporter of this host's traffic.
    let (host_stop_tx, mut host_stop_rx) = watch::channel(false);
    let mut host_task = None;
    if capture {
        let map = options.dir.join("host-identity.json");
        std::fs::write(
            &map,
            format!(
                "{{\"127.0.0.1\": {{\"workload\": \"demo-host\", \"since_ms\": {}}}}}",
                start.0
            ),
        )?;
        let collectors: Vec<SocketAddr> = nodes
            .iter()
            .filter(|n| n.bound.region == "us-east")
            .map(|n| n.bound.data_addr)
            .collect();
        let config = ExporterConfig {
            exporter_id: 9_999,
            region: "us-east".to_owned(),
            collectors,
            heartbeat_interval_ms: DEMO_HEARTBEAT_INTERVAL_MS,
            key: KeyConfig {
                key_id: 1,
                key_hex: Some(key_hex.clone()),
                key_file: None,
            },
            identity: Some(IdentityConfig::MapFile { path: map }),
            source: SourceConfig::default(),
            buffer_batches_max: 600,
            batch_flows_max: 16_384,
            ack_timeout_ms: 3_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            http_addr: None,
            state_dir: None,
            local_margin_ms: crate::exporter::history::MARGIN_MS_DEFAULT,
            local_retention_ms: crate::exporter::history::RETENTION_MS_DEFAULT,
            local_source_lag_ms: 0,
        };
        host_task = Some(tokio::spawn(async move {
            if let Err(e) = crate::exporter::run(config, false, async move {
                collector::stopped(&mut host_stop_rx).await
            })
            .await
            {
                println!("capture: the host exporter stopped: {e:#}");
            }
        }));
    }

    println!(
        "fleet: {} regions, gateway workloads calling short-lived backends on reused IPs; event feed delays {}..{} ms ({}% up to {} ms); legacy hold-back {} ms",
        regions.len(),
        FleetConfig::demo(0, Vec::new()).event_delay_ms_min,
        FleetConfig::demo(0, Vec::new()).event_delay_ms_max,
        (FleetConfig::demo(0, Vec::new()).event_late_share * 100.0) as u32,
        FleetConfig::demo(0, Vec::new()).event_late_delay_ms_max,
        DEMO_LEGACY_HOLD_BACK_MS
    );
    let mut scorer = Scorer::default();
    let mut legacy_out: Vec<(u128, Option<Arc<str>>)> = Vec::new();
    let score_legacy = |scorer: &mut Scorer, out: &mut Vec<(u128, Option<Arc<str>>)>| {
        for (id, owner) in out.drain(..) {
            scorer.tally.legacy_flows += 1;
            match (owner, scorer.truth.get(&id)) {
                (Some(o), Some(Some(t))) if *o != **t => scorer.tally.legacy_misattributed += 1,
                (Some(_), Some(None)) => scorer.tally.legacy_misattributed += 1,
                (None, _) => scorer.tally.legacy_unattributed += 1,
                (Some(_), Some(Some(_))) | (Some(_), None) => {}
            }
        }
    };
    let end_at = options
        .duration_secs
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut heartbeat = tokio::time::interval(Duration::from_millis(DEMO_HEARTBEAT_INTERVAL_MS));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(ctrl_c);
    let mut generated = 0u64;
    let mut second = 0u64;
    let lb_token = token.clone();
    loop {
        let stop = async {
            match end_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = heartbeat.tick() => {}
            Some(flow) = tap_rx.recv() => {
                scorer.score(&flow);
                continue;
            }
            _ = stop => break,
            _ = &mut ctrl_c => {
                println!("interrupted: finishing");
                break;
            }
        }
        let now = clock::now().0;
        second += 1;
        generated += step_fleet(&mut fleet, now, &mut exporters, &mut scorer, &mut legacy).await;
        legacy.tick(UnixMillis(now), &mut legacy_out);
        score_legacy(&mut scorer, &mut legacy_out);
        // Keep the event feed's watermark moving.
        for (region, _, _) in fleet.load_balancers() {
            if let Some(node) = nodes.iter().find(|n| n.bound.region == region) {
                let path = format!("/v1/ip-events?watermark={now}");
                let _ = httpc::request(
                    node.bound.http_addr,
                    "POST",
                    &path,
                    Some(""),
                    Some(&lb_token),
                    Duration::from_secs(2),
                )
                .await;
            }
        }
        while let Ok(flow) = tap_rx.try_recv() {
            scorer.score(&flow);
        }
        let t = scorer.tally;
        println!(
            "t={second:>3}s generated={generated} emitted={} attributed={} unattributed={} misattributed={} legacy_misattributed={} legacy_scored={} host_flows={}",
            t.flows, t.attributed, t.unattributed, t.misattributed, t.legacy_misattributed, t.legacy_flows, t.host_flows
        );
    }

    // Wind down: a final batch, then wait for every generated flow to be emitted.
    let now = clock::now().0;
    generated += step_fleet(&mut fleet, now, &mut exporters, &mut scorer, &mut legacy).await;
    let _ = host_stop_tx.send(true);
    let drain_deadline =
        tokio::time::Instant::now() + Duration::from_millis(DEMO_PENDING_DEADLINE_MS * 2 + 6_000);
    while (scorer.seen.len() as u64) < generated && tokio::time::Instant::now() < drain_deadline {
        for (sender, batcher, crypto) in exporters.iter_mut() {
            if batcher.buffered() > 0 {
                sender.drain(crypto, batcher).await;
            }
        }
        if let Ok(Some(flow)) =
            tokio::time::timeout(Duration::from_millis(200), tap_rx.recv()).await
        {
            scorer.score(&flow);
        }
        while let Ok(flow) = tap_rx.try_recv() {
            scorer.score(&flow);
        }
    }
    legacy.flush(&mut legacy_out);
    score_legacy(&mut scorer, &mut legacy_out);
    if let Some(task) = host_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    for node in &nodes {
        let _ = node.stop.send(true);
    }
    // Keep scoring while the collectors leave (flows they hand over or emit on the way out).
    let mut remaining: Vec<_> = nodes.into_iter().map(|n| n.task).collect();
    let shutdown_deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !remaining.is_empty() && tokio::time::Instant::now() < shutdown_deadline {
        while let Ok(flow) = tap_rx.try_recv() {
            scorer.score(&flow);
        }
        let mut still = Vec::new();
        for task in remaining {
            if task.is_finished() {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => println!("collector: {e:#}"),
                    Err(e) => println!("collector task: {e}"),
                }
            } else {
                still.push(task);
            }
        }
        remaining = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Ok(flow) = tap_rx.try_recv() {
        scorer.score(&flow);
    }
    let missing = generated.saturating_sub(scorer.seen.len() as u64);
    println!("verdicts: {:?}", scorer.by_detail);
    println!(
        "generated={generated} emitted={} missing={missing} duplicates={} host_flows={} legacy: scored={} misattributed={} unattributed={}",
        scorer.tally.flows, scorer.tally.duplicates, scorer.tally.host_flows, scorer.tally.legacy_flows, scorer.tally.legacy_misattributed, scorer.tally.legacy_unattributed
    );
    for example in &scorer.examples {
        println!("misattributed: {example}");
    }
    println!("sink files: {}", options.dir.display());
    Ok(scorer.tally)
}

/// Advances the fleet to `now`, records the truth, sends each region's batch and feeds
/// the legacy attributor its events and flows. Returns the flows generated.
async fn step_fleet(
    fleet: &mut Fleet,
    now: u64,
    exporters: &mut [(Sender, Batcher, Crypto)],
    scorer: &mut Scorer,
    legacy: &mut LegacyAttributor<u128>,
) -> u64 {
    let steps = fleet.advance(now);
    let mut generated = 0;
    let mut legacy_out = Vec::new();
    for event in fleet.take_events(now) {
        let e = match event.owner {
            Some(owner) => LegacyEvent::Assign {
                ip: event.ip,
                owner: Arc::from(owner.as_str()),
                at: UnixMillis(event.at_ms),
            },
            None => LegacyEvent::Unassign {
                ip: event.ip,
                at: UnixMillis(event.at_ms),
            },
        };
        legacy.apply(&e);
    }
    for (step, (sender, batcher, crypto)) in steps.into_iter().zip(exporters.iter_mut()) {
        let mut flows = Vec::new();
        for f in step.flows {
            scorer.truth.insert(f.flow_id, f.truth.clone());
            legacy.submit(f.remote_ip, f.flow_id, UnixMillis(now), &mut legacy_out);
            generated += 1;
            flows.push(synthetic_flow(f));
        }
        let claims = step
            .claims
            .into_iter()
            .map(|c| LocalClaim {
                ip: c.ip,
                workload: c.workload,
                since_ms: c.since_ms,
                until_ms: c.until_ms,
            })
            .collect();
        let frame = crate::exporter::clock_frame_ms();
        batcher.push(flows, claims, frame);
        sender.drain(crypto, batcher).await;
    }
    debug_assert!(
        legacy_out.is_empty(),
        "the legacy attributor holds flows back"
    );
    generated
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site builds one demo node"
)]
fn collector_toml(
    node_id: &str,
    region: &str,
    prefixes: &[IpNet],
    others: &BTreeMap<String, Vec<IpNet>>,
    seed: Option<SocketAddr>,
    key_hex: &str,
    token: &str,
    sink_dir: &std::path::Path,
    http_addrs: &BTreeMap<String, SocketAddr>,
) -> String {
    let list = |nets: &[IpNet]| {
        nets.iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "node_id = \"{node_id}\"\nregion = \"{region}\"\nprefixes = [{}]\ngossip_addr = \"127.0.0.1:0\"\ndata_addr = \"127.0.0.1:0\"\nhttp_addr = \"{}\"\nseeds = [{}]\nheartbeat_interval_ms = {DEMO_HEARTBEAT_INTERVAL_MS}\nevent_feed_token = \"{token}\"\nforward_ack_timeout_ms = 2000\nshutdown_grace_ms = 3000\nregion_size_hint = 3\nfleet_size_hint = 6\ncluster_key = {{ key_hex = \"{key_hex}\" }}\ndev_exporters_use_cluster_key = true\nsink = {{ kind = \"files\", dir = \"{}\" }}\ndata_dir = \"{}\"\n",
        list(prefixes),
        http_addrs
            .get(node_id)
            .map_or_else(|| "127.0.0.1:0".to_owned(), SocketAddr::to_string),
        seed.map(|s| format!("\"{s}\"")).unwrap_or_default(),
        sink_dir.display(),
        // The journals live beside the sinks, in the demo's own directory, so that a demo
        // never replays another run's journal.
        sink_dir
            .parent()
            .unwrap_or(sink_dir)
            .join("journal")
            .display(),
    );
    let engine = EngineConfig::default();
    text.push_str(&format!(
        "[engine]\nskew_margin_ms = {DEMO_SKEW_MARGIN_MS}\npending_deadline_ms = {DEMO_PENDING_DEADLINE_MS}\nretention_ms = {}\n",
        engine.retention_ms
    ));
    text.push_str("[regions]\n");
    for (r, nets) in others {
        text.push_str(&format!("\"{r}\" = [{}]\n", list(nets)));
    }
    text.push_str("[peer_http_addrs]\n");
    for (node, addr) in http_addrs {
        text.push_str(&format!("\"{node}\" = \"{addr}\"\n"));
    }
    text
}

/// Picks a free loopback HTTP port for every demo collector (named `<region>-<i>`), by
/// binding them all at once and releasing them.
fn reserve_http_addrs(regions: &[(String, IpNet)]) -> anyhow::Result<BTreeMap<String, SocketAddr>> {
    let mut held = Vec::new();
    let mut addrs = BTreeMap::new();
    for (region, _) in regions {
        for i in 0..DEMO_COLLECTORS_PER_REGION {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")
                .context("reserving a loopback port for a demo collector's HTTP")?;
            addrs.insert(format!("{region}-{i}"), listener.local_addr()?);
            held.push(listener);
        }
    }
    drop(held);
    Ok(addrs)
}
