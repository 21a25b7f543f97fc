//! One simulated run: the event loop, the collectors (the real [`NodeCore`]s), the
//! exporters (the real sans-io [`Batcher`]), the fleet, the event feed, the legacy
//! baselines, the faults and the checks.
//!
//! Determinism: one seeded [`StdRng`] draws everything, in the order the events are
//! processed; events are ordered by (time, sequence); every map whose order reaches the
//! trace is ordered. The trace hash covers every processed event and every verdict.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::Hasher;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use siphasher::sip::SipHasher13;
use tenure_attribution::{
    EngineConfig, LegacyAttributor, LegacyConfig, LegacyEvent, Reason, UnixMillis, Verdict,
};
use tenure_gossip::frame::{self, FrameDecoder, FrameLimits};
use tenure_gossip::handoff::HandoffConfig;
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::membership::{self, Timer};
use tenure_gossip::ring::RingConfig;
use tenure_gossip::seal::{Channel, Keyring, Opener, OpenerConfig, Sealer, SecretKey};
use tenure_gossip::wire::{
    self, AckStatus, AlignedVec, Direction, LocalReason, Message, WireLimits,
};
use tenure_node::core::{
    ConnId, CoreConfig, Dest, EmittedFlow, Entitlement, Entitlements, NodeCore, Notice, Output,
    Rejection, Sender, TICK_INTERVAL_MS,
};
use tenure_node::exporter::batcher::{Batcher, LocalClaim, Socket};
use tenure_node::exporter::core::{ExporterCore, ExporterCoreConfig};
use tenure_node::exporter::history::{Held, HistoryConfig, Observation};
use tenure_node::report::Chain;

use crate::check::{Class, Edges, FlowTruth, Minute, Owner, Truths, Violation};
use crate::disk::Disk;
use crate::fault::{self, Fault, Planned};
use crate::fleet::{external_ip, Fleet, FleetChange, NEVER_MS};
use crate::net::{Endpoint, LinkState, Network};
use crate::scenario::Scenario;

/// How often flows are started, in simulated ms.
pub const FLOW_STEP_MS: u64 = 100;
/// How long after a failed IP allocation an instance tries again, in ms.
const NO_IP_RETRY_MS: u64 = 1_000;
/// The longest gap between an instance's end and its replacement, in ms.
const REPLACEMENT_GAP_MS_MAX: u64 = 2_000;
/// Events processed in one run at most: a bound on the loop (a run far beyond any
/// scenario's size means a bug, e.g. a timer loop at zero delay).
const EVENTS_PER_RUN_MAX: u64 = 2_000_000_000;
/// The key of the trace hash: fixed, so that traces compare across runs and machines.
const TRACE_KEY: (u64, u64) = (0x7465_6e75_7265_2d73, 0x696d_2d74_7261_6365);
/// How often the views are compared with the truth after healing, to time convergence.
const CONVERGENCE_PROBE_MS: u64 = 1_000;
/// Sender ids of exporters start here in sealed envelopes (collectors count from 1).
const EXPORTER_SENDER_ID_BASE: u64 = 1 << 32;

/// A derived bound on membership convergence after healing, in ms: a member declared
/// down is announced to the WAN pool every `WAN_ANNOUNCE_TO_DOWN_INTERVAL_MS`, LAN
/// members re-announce every `LAN_ANNOUNCE_INTERVAL_MS`, a rejoin retries every
/// `JOIN_RETRY_INTERVAL_MS`, and handoff may wait a rebuild (two heartbeat intervals plus
/// replication delay) once the ring settles.
pub fn convergence_bound_ms(heartbeat_interval_ms: u64) -> u64 {
    membership::WAN_ANNOUNCE_TO_DOWN_INTERVAL_MS
        + membership::LAN_ANNOUNCE_INTERVAL_MS
        + 2 * membership::JOIN_RETRY_INTERVAL_MS
        + 2 * heartbeat_interval_ms
        + HandoffConfig::default().replication_delay_ms
}

#[derive(Debug)]
enum Ev {
    Tick {
        node: u16,
        generation: u32,
    },
    Timer {
        node: u16,
        generation: u32,
        timer: Timer,
    },
    Datagram {
        to: u16,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    /// A frame on a connection. A collector's connections die with it: a frame to a
    /// collector is dropped when `generation` (the receiver's at sending) is no longer
    /// current.
    Frame {
        from: Endpoint,
        to: Endpoint,
        generation: u32,
        bytes: Vec<u8>,
    },
    /// A collector's fsync completes.
    Fsync {
        node: u16,
        generation: u32,
    },
    Heartbeat {
        host: u32,
    },
    /// The compromised exporter's heartbeat: a batch of forged claims.
    Intrusion,
    AckTimeout {
        host: u32,
        batch_id: u64,
    },
    ExporterRetry {
        host: u32,
    },
    InstanceStart {
        workload: u32,
    },
    InstanceEnd {
        instance: u32,
    },
    FlowStep,
    Legacy(LegacyEvent),
    FeedPush {
        region: usize,
    },
    FaultStart(u32),
    FaultEnd(u32),
    Heal,
    /// Are the views right yet? Looked at every [`CONVERGENCE_PROBE_MS`] from the end of
    /// the last fault until they are, to time convergence.
    ConvergenceProbe,
    ConvergenceCheck,
    End,
}

struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Collector {
    node_id: String,
    region: usize,
    gossip_addr: SocketAddr,
    data_addr: SocketAddr,
    core: Option<NodeCore>,
    generation: u32,
    /// The journal's disk: survives crashes.
    disk: Disk,
    data_sealer: Sealer,
    gossip_sealer: Sealer,
    opener: Opener,
    decoder: FrameDecoder,
    offset_ms: i64,
    /// Active `clock-step` episodes: (fault id, step).
    steps: Vec<(u32, i64)>,
    /// Active `clock-slew` episodes: (fault id, start, end, peak), true times.
    slews: Vec<(u32, u64, u64, i64)>,
    paused: bool,
    backlog: Vec<Ev>,
}

struct Exporter {
    region: usize,
    batcher: Batcher,
    sealer: Sealer,
    opener: Opener,
    decoder: FrameDecoder,
    offset_ms: i64,
    /// Active `host-clock-step` episodes: (fault id, step).
    steps: Vec<(u32, i64)>,
    collectors: Vec<u16>,
    current: usize,
    inflight: Option<u64>,
    down: u32,
    /// The real exporter core: local history, stamping, claims.
    core: ExporterCore,
    /// Instances of this host that ended and that its identity source still lists (the
    /// host has not learned of the release yet).
    releasing: Vec<u32>,
    /// When the source says its last change happened, by the host's clock.
    changed_ms: Option<u64>,
    /// Sockets generated here, by true end time, not yet captured.
    closed: Vec<(u64, Socket)>,
    delayed_claims: Vec<LocalClaim>,
}

/// Forged claims per batch of the compromised exporter.
const INTRUDER_CLAIMS_PER_BATCH: usize = 16;

/// The compromised exporter (see `HostConfig::compromised_exporter`): an endpoint after
/// the hosts' exporters, with its own credential, sealer and choices.
struct Intruder {
    /// Its endpoint index, `Endpoint::Exporter(h)`: one past the last host.
    h: u32,
    region: usize,
    collectors: Vec<u16>,
    current: usize,
    sealer: Sealer,
    /// Its choices, apart from the world's draws (a seed of its own).
    rng: StdRng,
    next_batch: u64,
}

/// The exporter id an exporter's credential proves: host `h` is exporter `h + 1`, and so
/// is the compromised exporter, one past the last host.
fn exporter_id_of(h: u32) -> u64 {
    u64::from(h) + 1
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct RunStats {
    pub flows: u64,
    pub accepted: u64,
    pub emitted: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub attributed: u64,
    pub unattributed: u64,
    pub by_reason: Vec<(Reason, u64)>,
    pub bounded_flows: u64,
    pub bounded_unattributed: u64,
    /// Local ends of emitted flows: stamped with a workload, stamped wrongly (the
    /// contract says never), and unattributed by reason ([`LocalReason::ALL`]).
    pub local_stamped: u64,
    pub local_misattributed: u64,
    pub local_unattributed: [u64; LocalReason::ALL.len()],
    /// Generated but never acknowledged by a collector (exporter buffers).
    pub undelivered: u64,
    /// Claims the compromised exporter sent, and claims the collectors that are up at the
    /// end refused as not entitled (restarted ones forgot their counts).
    pub forged_claims: u64,
    pub not_entitled: u64,
    /// Per legacy hold-back: (hold-back ms, flows scored, wrong, unattributed).
    pub legacy: Vec<(u64, u64, u64, u64)>,
    /// Tenure first, then each legacy attributor: (dependencies reported, wrong).
    pub dependencies: Vec<(u64, u64)>,
    pub true_dependencies: u64,
    pub frames: u64,
    pub datagrams: u64,
    pub refused: u64,
    pub conflicts: u64,
    pub defunct: u64,
    pub faults: Vec<String>,
    pub simulated_ms: u64,
    /// Collector restarts after a crash, and the flows they replayed from their journals.
    pub restarts: u64,
    pub recovered: u64,
    /// Journal writes a crash lost before their fsync (never acknowledged).
    pub unsynced_lost: u64,
    /// How long after the last fault ended every view first matched the truth (LAN, WAN,
    /// ring, handoff; looked at every second), if it did before the end of the run.
    pub converged_after_ms: Option<u64>,
}

impl RunStats {
    pub fn unattributed_share(&self) -> f64 {
        ratio(self.bounded_unattributed, self.bounded_flows)
    }
}

pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub seed: u64,
    pub stats: RunStats,
    /// The violation that stopped the run, or one found at its end.
    pub violation: Option<Violation>,
    /// Membership or ring not converged within the bound after healing (the run went on).
    pub convergence: Option<Violation>,
    pub trace_hash: u64,
    pub timeline: Vec<Minute>,
}

/// The simulated world of one run.
#[allow(
    missing_debug_implementations,
    reason = "holds the cores and the queue; a dump would be megabytes"
)]
pub struct World<'s> {
    scenario: &'s Scenario,
    seed: u64,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    rng: StdRng,
    trace: SipHasher13,
    keyring: Keyring,
    net: Network,
    collectors: Vec<Collector>,
    by_node_id: BTreeMap<String, u16>,
    by_gossip: BTreeMap<SocketAddr, u16>,
    exporters: Vec<Exporter>,
    intruder: Option<Intruder>,
    /// What each exporter's credential entitles it to, handed to every collector core.
    entitlements: Entitlements,
    fleet: Fleet,
    truths: Truths,
    name_index: BTreeMap<Arc<str>, u32>,
    edges: Edges,
    legacy: Vec<LegacyAttributor<u32>>,
    legacy_out: Vec<(u32, Option<Arc<str>>)>,
    faults: Vec<Planned>,
    /// Per call: the caller workloads and the callee workloads.
    call_groups: Vec<(Vec<u32>, Vec<u32>)>,
    /// Per link direction: when its last frame arrives (frames of a connection keep order).
    link_last: BTreeMap<(Endpoint, Endpoint), u64>,
    /// Per region: whose turn it is to receive the event feed's push.
    feed_turn: Vec<usize>,
    timeline: Vec<Minute>,
    stats: RunStats,
    out: Vec<Output>,
    plaintext: AlignedVec,
    limits: WireLimits,
    start: u64,
    flows_start: u64,
    heal_at: u64,
    /// When the last fault episode ended (`heal_at` without faults): convergence is timed
    /// from here.
    faults_end: u64,
    bounded_from: u64,
    flows_end: u64,
    end_at: u64,
    engine: EngineConfig,
    violation: Option<Violation>,
    convergence: Option<Violation>,
}

fn collector_addr(region: usize, index: u16, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(
            172,
            16 + region as u8,
            (index >> 8) as u8,
            index as u8,
        )),
        port,
    )
}

impl<'s> World<'s> {
    /// Builds the world of `seed`; nothing has run yet.
    pub fn new(scenario: &'s Scenario, seed: u64) -> World<'s> {
        let mut rng = StdRng::seed_from_u64(seed);
        let key = SecretKey::generate(&mut rng);
        let start = scenario.run.start_unix_ms;
        let hb = scenario.heartbeat.interval_ms;
        let flows_start = start + scenario.run.warmup_s * 1_000;
        let heal_at = flows_start + scenario.run.fault_phase_s * 1_000;
        let flows_end = heal_at + scenario.run.healed_phase_s * 1_000;
        let pending = scenario.pending_deadline_ms();
        let drain = 2 * pending + 2 * hb + 30_000;
        // As a collector derives it (unless its `[engine]` section writes it); a scenario
        // whose deadline is shorter looks every flow up on arrival.
        let settle = tenure_node::config::settle_ms_for(hb, scenario.cluster.skew_margin_ms);
        let engine = EngineConfig {
            skew_margin_ms: scenario.cluster.skew_margin_ms,
            pending_deadline_ms: pending,
            settle_ms: if settle < pending { settle } else { 0 },
            ..EngineConfig::default()
        };
        let fleet = Fleet::new(scenario, start);
        let mut collectors = Vec::new();
        let mut by_node_id = BTreeMap::new();
        let mut by_gossip = BTreeMap::new();
        let per_region = scenario.cluster.collectors_per_region;
        let skew = scenario.clocks.collector_skew_ms_max as i64;
        for (r, region) in scenario.regions.iter().enumerate() {
            for k in 0..per_region {
                let index = collectors.len() as u16;
                let node_id = format!("{}-c{k}", region.name);
                let gossip_addr = collector_addr(r, k + 1, 7946);
                by_node_id.insert(node_id.clone(), index);
                by_gossip.insert(gossip_addr, index);
                collectors.push(Collector {
                    node_id,
                    region: r,
                    gossip_addr,
                    data_addr: collector_addr(r, k + 1, 7947),
                    core: None,
                    generation: 0,
                    disk: Disk::default(),
                    data_sealer: Sealer::new(Channel::Data, u64::from(index) + 1, 0),
                    gossip_sealer: Sealer::new(Channel::Gossip, u64::from(index) + 1, 0),
                    opener: Opener::new(OpenerConfig::default()),
                    decoder: FrameDecoder::new(FrameLimits::default()),
                    offset_ms: rng.random_range(-skew..=skew),
                    steps: Vec::new(),
                    slews: Vec::new(),
                    paused: false,
                    backlog: Vec::new(),
                });
            }
        }
        let host_skew = scenario.clocks.host_skew_ms_max as i64;
        let mut exporters = Vec::new();
        for (h, host) in fleet.hosts.iter().enumerate() {
            let region = host.region;
            let mine: Vec<u16> = collectors
                .iter()
                .enumerate()
                .filter(|(_, c)| c.region == region)
                .map(|(i, _)| i as u16)
                .collect();
            let exporter_id = h as u64 + 1;
            exporters.push(Exporter {
                region,
                batcher: Batcher::new(
                    exporter_id,
                    &scenario.regions[region].name,
                    exporter_id << 32,
                    wire::FLOWS_PER_BATCH_MAX_DEFAULT,
                    scenario.heartbeat.buffer_batches_max,
                ),
                sealer: Sealer::new(Channel::Data, EXPORTER_SENDER_ID_BASE + h as u64, 1),
                opener: Opener::new(OpenerConfig::default()),
                decoder: FrameDecoder::new(FrameLimits::default()),
                offset_ms: rng.random_range(-host_skew..=host_skew),
                steps: Vec::new(),
                current: h % mine.len().max(1),
                collectors: mine,
                inflight: None,
                down: 0,
                core: ExporterCore::new(ExporterCoreConfig {
                    history: HistoryConfig {
                        margin_ms: scenario.host.local_margin_ms,
                        source_lag_ms: scenario.host.release_learn_delay_ms,
                        ..HistoryConfig::default()
                    },
                    ..ExporterCoreConfig::default()
                }),
                releasing: Vec::new(),
                changed_ms: None,
                closed: Vec::new(),
                delayed_claims: Vec::new(),
            });
        }
        let mut by_exporter: BTreeMap<u64, Entitlement> = exporters
            .iter()
            .enumerate()
            .map(|(h, e)| {
                (
                    exporter_id_of(h as u32),
                    Entitlement {
                        prefixes: vec![scenario.regions[e.region].cidr],
                        workloads: None,
                        revoked: false,
                    },
                )
            })
            .collect();
        let intruder =
            (scenario.host.compromised_exporter && !scenario.regions.is_empty()).then(|| {
                let h = exporters.len() as u32;
                by_exporter.insert(exporter_id_of(h), Entitlement::default());
                let collectors: Vec<u16> = collectors
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.region == 0)
                    .map(|(i, _)| i as u16)
                    .collect();
                Intruder {
                    h,
                    region: 0,
                    collectors,
                    current: 0,
                    sealer: Sealer::new(Channel::Data, EXPORTER_SENDER_ID_BASE + u64::from(h), 1),
                    rng: StdRng::seed_from_u64(seed ^ 0x696e_7472_7564_6572),
                    next_batch: 0,
                }
            });
        let mut exporter_region: Vec<usize> = exporters.iter().map(|e| e.region).collect();
        if let Some(i) = &intruder {
            exporter_region.push(i.region);
        }
        let net = Network {
            config: scenario.network.clone(),
            cuts: Vec::new(),
            degraded: Vec::new(),
            collector_region: collectors.iter().map(|c| c.region).collect(),
            exporter_region,
        };
        let name_index = fleet
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        let legacy = scenario
            .legacy
            .hold_back_ms
            .iter()
            .map(|&hold_back_ms| {
                LegacyAttributor::new(LegacyConfig {
                    hold_back_ms,
                    held_flows_max: 50_000_000,
                })
            })
            .collect();
        let faults = fault::plan(scenario, &mut rng, flows_start, collectors.len(), &fleet);
        let attributors = 1 + scenario.legacy.hold_back_ms.len();
        World {
            scenario,
            seed,
            now: start,
            seq: 0,
            queue: BinaryHeap::new(),
            rng,
            trace: SipHasher13::new_with_keys(TRACE_KEY.0, TRACE_KEY.1),
            keyring: Keyring::new(1, &key),
            net,
            by_node_id,
            by_gossip,
            exporters,
            intruder,
            entitlements: Entitlements::new(by_exporter),
            truths: Truths {
                id_prefix: seed,
                ..Truths::default()
            },
            name_index,
            edges: Edges::new(attributors),
            legacy,
            legacy_out: Vec::new(),
            faults,
            call_groups: scenario
                .calls
                .iter()
                .map(|c| {
                    (
                        World::group(&fleet, &c.from),
                        c.to.iter().flat_map(|t| World::group(&fleet, t)).collect(),
                    )
                })
                .collect(),
            link_last: BTreeMap::new(),
            feed_turn: vec![0; scenario.regions.len()],
            timeline: Vec::new(),
            stats: RunStats::default(),
            out: Vec::new(),
            plaintext: AlignedVec::new(),
            limits: WireLimits::default(),
            start,
            flows_start,
            heal_at,
            faults_end: heal_at,
            bounded_from: heal_at + scenario.run.settle_s * 1_000,
            flows_end,
            end_at: flows_end + drain,
            engine,
            violation: None,
            convergence: None,
            fleet,
            collectors,
        }
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn trace(&mut self, tag: u8, a: u64, b: u64) {
        self.trace.write_u64(self.now);
        self.trace.write_u8(tag);
        self.trace.write_u64(a);
        self.trace.write_u64(b);
    }

    /// Runs to the end or to the first violation.
    pub fn run(mut self) -> RunOutcome {
        self.setup();
        let mut processed = 0u64;
        while let Some(Reverse(item)) = self.queue.pop() {
            if item.at > self.end_at || processed >= EVENTS_PER_RUN_MAX {
                break;
            }
            processed += 1;
            self.now = item.at;
            self.handle(item.ev);
            if self.violation.is_some() {
                break;
            }
        }
        self.finish()
    }

    fn setup(&mut self) {
        let start = self.start;
        for i in 0..self.collectors.len() {
            self.boot(i as u16);
        }
        // Non-workload IPs: assigned long before the run, known to both attributors.
        for r in 0..self.fleet.non_workload.len() {
            for &ip in &self.fleet.non_workload[r].clone() {
                let slot = &self.fleet.ips[ip as usize];
                let owner = self.fleet.names[slot.history[0].2 as usize].clone();
                let event = LegacyEvent::Assign {
                    ip: slot.addr,
                    owner,
                    at: UnixMillis(start - 3_600_000),
                };
                for l in &mut self.legacy {
                    l.apply(&event);
                }
            }
            let first = self
                .rng
                .random_range(0..self.scenario.event_feed.push_interval_ms);
            self.push(start + first, Ev::FeedPush { region: r });
        }
        for w in 0..self.fleet.workloads.len() as u32 {
            for _ in 0..self.fleet.workloads[w as usize].instances {
                self.start_instance(w, true);
            }
        }
        let hb = self.scenario.heartbeat.interval_ms;
        for h in 0..self.exporters.len() as u32 {
            let phase = self.rng.random_range(0..hb);
            self.push(start + phase, Ev::Heartbeat { host: h });
        }
        if self.intruder.is_some() {
            self.push(self.flows_start, Ev::Intrusion);
        }
        self.push(self.flows_start, Ev::FlowStep);
        for (id, f) in self.faults.clone().iter().enumerate() {
            self.push(f.start_ms, Ev::FaultStart(id as u32));
            self.push(f.end_ms, Ev::FaultEnd(id as u32));
        }
        self.stats.faults = fault::describe_enabled(&self.faults);
        self.faults_end = self
            .faults
            .iter()
            .map(|f| f.end_ms)
            .max()
            .map_or(self.heal_at, |end| end.min(self.heal_at));
        self.push(self.faults_end, Ev::ConvergenceProbe);
        self.push(self.heal_at, Ev::Heal);
        self.push(self.end_at, Ev::End);
    }

    /// How long after the faults around its acceptance healed an accepted flow may take
    /// to be emitted: membership converging again, then the pending deadline (which bounds
    /// settling too), a few forwarding retries and a heartbeat. A clock stepped and set
    /// right must not stretch it by the step.
    fn emit_bound_ms(&self) -> u64 {
        let hb = self.scenario.heartbeat.interval_ms;
        convergence_bound_ms(hb)
            + self.scenario.pending_deadline_ms()
            + 4 * self.scenario.cluster.forward_ack_timeout_ms
            + hb
    }

    fn collector_now(&self, i: u16) -> UnixMillis {
        let c = &self.collectors[i as usize];
        let stepped: i64 = c.steps.iter().map(|(_, s)| s).sum();
        let slewed: i64 = c
            .slews
            .iter()
            .map(|&(_, start, end, peak)| slew_at(self.now, start, end, peak))
            .sum();
        UnixMillis(
            self.now
                .saturating_add_signed(c.offset_ms + stepped + slewed),
        )
    }

    /// Host `h`'s clock offset from true time: its skew plus any step in force.
    fn host_offset(&self, h: u32) -> i64 {
        let e = &self.exporters[h as usize];
        e.offset_ms + e.steps.iter().map(|(_, s)| s).sum::<i64>()
    }

    fn host_now(&self, h: u32) -> u64 {
        self.now.saturating_add_signed(self.host_offset(h))
    }

    /// Starts (or restarts, with a new generation: fresh state, a higher incarnation and
    /// sealing epoch) collector `i`.
    fn boot(&mut self, i: u16) {
        let now = self.collector_now(i);
        let scenario = self.scenario;
        let c = &mut self.collectors[i as usize];
        c.generation += 1;
        let generation = c.generation;
        let identity = match NodeIdentity::new(
            &c.node_id,
            &scenario.regions[c.region].name,
            c.gossip_addr,
            c.data_addr,
            u64::from(generation),
        ) {
            Ok(id) => id,
            Err(e) => unreachable!("identities are validated with the scenario: {e}"),
        };
        c.data_sealer = Sealer::new(Channel::Data, u64::from(i) + 1, u64::from(generation));
        c.gossip_sealer = Sealer::new(Channel::Gossip, u64::from(i) + 1, u64::from(generation))
            .with_sealed_bytes_max(FrameLimits::default().datagram_bytes_max);
        c.opener = Opener::new(OpenerConfig::default());
        c.decoder = FrameDecoder::new(FrameLimits::default());
        c.paused = false;
        c.backlog.clear();
        let region = c.region;
        let seeds: Vec<SocketAddr> = (0..scenario.regions.len())
            .map(|r| collector_addr(r, 1, 7946))
            .collect();
        let static_regions = scenario
            .regions
            .iter()
            .filter(|r| r.name != scenario.regions[region].name)
            .map(|r| (r.cidr, r.name.clone()))
            .collect();
        let per_region = u32::from(scenario.cluster.collectors_per_region);
        let config = CoreConfig {
            identity,
            seeds,
            rng_seed: self.rng.random::<u64>(),
            region_size_hint: NonZeroU32::new(per_region).unwrap_or(NonZeroU32::MIN),
            fleet_size_hint: NonZeroU32::new(per_region * scenario.regions.len() as u32)
                .unwrap_or(NonZeroU32::MIN),
            region_prefixes: vec![scenario.regions[region].cidr],
            region_version: 1,
            static_regions,
            engine: self.engine.clone(),
            ring: RingConfig {
                replication: NonZeroUsize::new(scenario.cluster.replication)
                    .unwrap_or(NonZeroUsize::MIN),
                ..RingConfig::default()
            },
            handoff: HandoffConfig {
                heartbeat_interval_ms: scenario.heartbeat.interval_ms,
                retention_ms: self.engine.retention_ms,
                ..HandoffConfig::default()
            },
            forward_ack_timeout_ms: scenario.cluster.forward_ack_timeout_ms,
            held_flows_max: 1_000_000,
            inflight_flows_max: 1_000_000,
            busy_flows_threshold: 2_000_000,
            busy_retry_after_ms: scenario.heartbeat.interval_ms.min(5_000),
        };
        let mut core = match NodeCore::new(config, now) {
            Ok(core) => core,
            Err(e) => {
                unreachable!(
                    "the core configuration is built from a validated scenario: {}",
                    Chain(&e)
                )
            }
        };
        core.set_entitlements(Some(self.entitlements.clone()));
        let mut out = std::mem::take(&mut self.out);
        core.start(now, &mut out);
        // A restarted collector replays what its journal kept, as the shell does after
        // `Journal::open`.
        let entries = self.collectors[i as usize].disk.replay();
        if !entries.is_empty() {
            self.stats.restarts += u64::from(generation > 1);
            let flows: usize = entries.iter().map(|(_, f)| f.len()).sum();
            self.stats.recovered += flows as u64;
            self.trace(18, u64::from(i), flows as u64);
            core.recover(entries, now, &mut out);
        } else if generation > 1 {
            self.stats.restarts += 1;
        }
        self.collectors[i as usize].core = Some(core);
        self.dispatch(i, &mut out);
        self.out = out;
        let phase = self.rng.random_range(1..=TICK_INTERVAL_MS);
        self.push(
            self.now + phase,
            Ev::Tick {
                node: i,
                generation,
            },
        );
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, generation } => {
                self.trace(1, u64::from(node), 0);
                let c = &self.collectors[node as usize];
                if c.generation != generation || c.core.is_none() || c.paused {
                    return; // a resumed or restarted node arms a new tick
                }
                self.with_core(node, |core, now, out| core.tick(now, out));
                self.push(self.now + TICK_INTERVAL_MS, Ev::Tick { node, generation });
            }
            Ev::Timer {
                node,
                generation,
                timer,
            } => {
                self.trace(2, u64::from(node), 0);
                let c = &mut self.collectors[node as usize];
                if c.generation != generation || c.core.is_none() {
                    return;
                }
                if c.paused {
                    c.backlog.push(Ev::Timer {
                        node,
                        generation,
                        timer,
                    });
                    return;
                }
                self.with_core(node, |core, now, out| core.handle_timer(timer, now, out));
            }
            Ev::Datagram { to, from, bytes } => {
                self.trace(3, u64::from(to), bytes.len() as u64);
                self.on_datagram(to, from, bytes);
            }
            Ev::Frame {
                from,
                to,
                generation,
                bytes,
            } => {
                self.trace(4, endpoint_code(to), bytes.len() as u64);
                match to {
                    Endpoint::Collector(i) => {
                        self.on_collector_frame(i, from, generation, bytes);
                    }
                    Endpoint::Exporter(h) => self.on_exporter_frame(h, bytes),
                }
            }
            Ev::Fsync { node, generation } => {
                self.trace(19, u64::from(node), 0);
                let c = &mut self.collectors[node as usize];
                if c.generation != generation || c.core.is_none() {
                    return; // the crash decided what reached the disk
                }
                if c.paused {
                    // The fsync completes in the kernel, but the process learns it only
                    // when it runs again.
                    c.backlog.push(Ev::Fsync { node, generation });
                    return;
                }
                if let Some(upto) = c.disk.fsync() {
                    self.with_core(node, |core, now, out| core.journal_synced(upto, now, out));
                }
            }
            Ev::Heartbeat { host } => {
                self.trace(5, u64::from(host), 0);
                self.on_heartbeat(host);
                let next = self.now + self.scenario.heartbeat.interval_ms;
                self.push(next, Ev::Heartbeat { host });
            }
            Ev::Intrusion => {
                self.trace(22, 0, 0);
                self.intrude();
                let next = self.now + self.scenario.heartbeat.interval_ms;
                if next < self.flows_end {
                    self.push(next, Ev::Intrusion);
                }
            }
            Ev::AckTimeout { host, batch_id } => {
                self.trace(6, u64::from(host), batch_id);
                let e = &mut self.exporters[host as usize];
                if e.inflight == Some(batch_id) {
                    e.inflight = None;
                    e.current = (e.current + 1) % e.collectors.len().max(1);
                    self.try_send(host);
                }
            }
            Ev::ExporterRetry { host } => {
                self.trace(7, u64::from(host), 0);
                self.try_send(host);
            }
            Ev::InstanceStart { workload } => {
                self.trace(8, u64::from(workload), 0);
                self.start_instance(workload, false);
            }
            Ev::InstanceEnd { instance } => {
                self.trace(9, u64::from(instance), 0);
                self.end_instance(instance);
            }
            Ev::FlowStep => {
                self.trace(10, 0, 0);
                self.flow_step();
                if self.now + FLOW_STEP_MS < self.flows_end {
                    self.push(self.now + FLOW_STEP_MS, Ev::FlowStep);
                }
            }
            Ev::Legacy(event) => {
                self.trace(11, 0, 0);
                for l in &mut self.legacy {
                    l.apply(&event);
                }
            }
            Ev::FeedPush { region } => {
                self.trace(12, region as u64, 0);
                self.feed_push(region);
                let next = self.now + self.scenario.event_feed.push_interval_ms;
                self.push(next, Ev::FeedPush { region });
            }
            Ev::FaultStart(id) => {
                self.trace(13, u64::from(id), 0);
                self.fault_start(id);
            }
            Ev::FaultEnd(id) => {
                self.trace(14, u64::from(id), 0);
                self.fault_end(id);
            }
            Ev::Heal => {
                self.trace(15, 0, 0);
                let bound = convergence_bound_ms(self.scenario.heartbeat.interval_ms);
                self.push(self.now + bound, Ev::ConvergenceCheck);
            }
            Ev::ConvergenceProbe => {
                if self.convergence_gaps().is_empty() {
                    self.stats.converged_after_ms = Some(self.now - self.faults_end);
                } else {
                    self.push(self.now + CONVERGENCE_PROBE_MS, Ev::ConvergenceProbe);
                }
            }
            Ev::ConvergenceCheck => {
                self.trace(16, 0, 0);
                self.check_convergence();
            }
            Ev::End => {
                self.trace(17, 0, 0);
                self.recheck_convergence();
            }
        }
    }

    /// Calls into a live, unpaused collector's core and acts on its outputs.
    fn with_core(&mut self, i: u16, f: impl FnOnce(&mut NodeCore, UnixMillis, &mut Vec<Output>)) {
        let now = self.collector_now(i);
        let mut out = std::mem::take(&mut self.out);
        let Some(core) = self.collectors[i as usize].core.as_mut() else {
            self.out = out;
            return;
        };
        f(core, now, &mut out);
        self.dispatch(i, &mut out);
        self.out = out;
    }

    fn dispatch(&mut self, i: u16, out: &mut Vec<Output>) {
        for output in out.drain(..) {
            match output {
                Output::Frame { to, message } => {
                    let to = match to {
                        Dest::Conn(conn) => endpoint_of_conn(conn),
                        Dest::Peer { node_id, .. } => match self.by_node_id.get(&node_id) {
                            Some(&j) => Endpoint::Collector(j),
                            None => continue,
                        },
                    };
                    self.send_frame(Endpoint::Collector(i), to, &message);
                }
                Output::Datagram { to, bytes } => self.send_datagram(i, to, &bytes),
                Output::Timer { after_ms, timer } => {
                    let generation = self.collectors[i as usize].generation;
                    self.push(
                        self.now + after_ms,
                        Ev::Timer {
                            node: i,
                            generation,
                            timer,
                        },
                    );
                }
                Output::Emit(flow) => self.on_emit(&flow),
                Output::Journal(op) => {
                    // The emits before a release are already with the checker: the sim's
                    // sink is durable at once, as the journal's contract requires.
                    if self.collectors[i as usize].disk.write(op) {
                        let d = &self.scenario.disk;
                        let delay = self.rng.random_range(d.fsync_ms_min..=d.fsync_ms_max);
                        let generation = self.collectors[i as usize].generation;
                        self.push(
                            self.now + delay,
                            Ev::Fsync {
                                node: i,
                                generation,
                            },
                        );
                    }
                }
                Output::Notice(notice) => match notice {
                    Notice::Conflict(_) => self.stats.conflicts += 1,
                    Notice::Defunct => self.stats.defunct += 1,
                    Notice::MemberUp { .. }
                    | Notice::MemberDown { .. }
                    | Notice::RingChanged { .. }
                    | Notice::RegionUpdated { .. }
                    | Notice::ClaimDropped { .. } => {}
                },
            }
        }
    }

    fn on_emit(&mut self, flow: &EmittedFlow) {
        let verdict_code = match &flow.verdict {
            Verdict::Attributed(_) => 0,
            Verdict::Unattributed(r) => 1 + r.as_str().len() as u64,
        };
        self.trace(20, flow.record.flow_id as u64, verdict_code);
        if let Err(v) = self.truths.on_emit(flow, &self.fleet, self.now) {
            self.violation = Some(v);
            return;
        }
        let index = (flow.record.flow_id & u128::from(u64::MAX)) as usize;
        let truth = &self.truths.flows[index];
        let (emitted, start, class) = (truth.emitted, truth.start_ms, truth.tenure);
        if emitted == 1 && class == Class::Unattributed {
            self.minute(start).tenure_unattributed += 1;
        }
        let caller = self.truths.flows[index].caller;
        if let (Some(w), true) = (flow.remote_workload(), self.counted(caller)) {
            if let Some(&o) = self.name_index.get(w) {
                self.edges.reported[0].insert((caller, o));
            }
        }
    }

    /// Whether the dependencies of `caller` are scored: the gateways', or everyone's when
    /// the scenario names no gateway.
    fn counted(&self, caller: u32) -> bool {
        self.fleet.workloads[caller as usize].gateway
            || !self.fleet.workloads.iter().any(|w| w.gateway)
    }

    fn minute(&mut self, true_ms: u64) -> &mut Minute {
        let m = (true_ms.saturating_sub(self.flows_start) / 60_000) as usize;
        let variants = self.legacy.len();
        while self.timeline.len() <= m {
            self.timeline.push(Minute {
                legacy_wrong: vec![0; variants],
                ..Minute::default()
            });
        }
        &mut self.timeline[m]
    }

    // ----- network -----

    fn send_frame(&mut self, from: Endpoint, to: Endpoint, message: &Message) {
        let plain = match wire::encode(message) {
            Ok(p) => p,
            Err(e) => unreachable!(
                "the core and the batcher build messages within the wire's limits: {}",
                Chain(&e)
            ),
        };
        let limits = FrameLimits::default();
        let mut bytes = Vec::with_capacity(plain.len() + 128);
        let keyring = &self.keyring;
        let rng = &mut self.rng;
        let sealer = match (from, self.intruder.as_mut()) {
            (Endpoint::Collector(i), _) => &mut self.collectors[i as usize].data_sealer,
            (Endpoint::Exporter(h), Some(intruder)) if h == intruder.h => &mut intruder.sealer,
            (Endpoint::Exporter(h), _) => &mut self.exporters[h as usize].sealer,
        };
        let sealed =
            frame::encode_frame_with::<SendError, _>(&mut bytes, limits.frame_bytes_max, |body| {
                Ok(sealer.seal(keyring, rng, &plain, body)?)
            });
        if sealed.is_err() {
            self.stats.refused += 1;
            return;
        }
        self.stats.frames += 1;
        if !self.net.reachable(from, to) || self.net.frame_lost(&mut self.rng) {
            return;
        }
        // One connection per pair: frames arrive in order, so the delay is drawn once per
        // link direction and frames queue behind each other.
        let delay = self.net.delay_ms(from, to, &mut self.rng);
        let last = self.link_last.entry((from, to)).or_insert(0);
        let at = (self.now + delay).max(*last);
        *last = at;
        let generation = match to {
            Endpoint::Collector(j) => self.collectors[j as usize].generation,
            Endpoint::Exporter(_) => 0,
        };
        self.push(
            at,
            Ev::Frame {
                from,
                to,
                generation,
                bytes,
            },
        );
    }

    fn send_datagram(&mut self, from: u16, to: SocketAddr, plaintext: &[u8]) {
        let Some(&j) = self.by_gossip.get(&to) else {
            return;
        };
        let mut sealed = Vec::with_capacity(plaintext.len() + 128);
        let c = &mut self.collectors[from as usize];
        if c.gossip_sealer
            .seal(&self.keyring, &mut self.rng, plaintext, &mut sealed)
            .is_err()
        {
            self.stats.refused += 1;
            return;
        }
        let mut bytes = Vec::with_capacity(sealed.len() + frame::FRAME_HEADER_BYTES);
        if frame::encode_datagram(
            &sealed,
            FrameLimits::default().datagram_bytes_max,
            &mut bytes,
        )
        .is_err()
        {
            self.stats.refused += 1;
            return;
        }
        self.stats.datagrams += 1;
        let (src, dst) = (Endpoint::Collector(from), Endpoint::Collector(j));
        if !self.net.reachable(src, dst) || self.net.datagram_lost(&mut self.rng) {
            return;
        }
        let gossip_from = c.gossip_addr;
        let copies = if self.net.datagram_duplicated(&mut self.rng) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.net.delay_ms(src, dst, &mut self.rng);
            self.push(
                self.now + delay,
                Ev::Datagram {
                    to: j,
                    from: gossip_from,
                    bytes: bytes.clone(),
                },
            );
        }
    }

    fn on_datagram(&mut self, to: u16, from: SocketAddr, bytes: Vec<u8>) {
        let c = &mut self.collectors[to as usize];
        if c.core.is_none() {
            return;
        }
        if c.paused {
            c.backlog.push(Ev::Datagram { to, from, bytes });
            return;
        }
        let body = match frame::decode_datagram(&bytes, FrameLimits::default().datagram_bytes_max) {
            Ok(b) => b,
            Err(_) => {
                self.stats.refused += 1;
                return;
            }
        };
        let mut plaintext = std::mem::take(&mut self.plaintext);
        if c.opener
            .open(&self.keyring, Channel::Gossip, body, &mut plaintext)
            .is_err()
        {
            // Duplicates end here: the replay window refuses them.
            self.stats.refused += 1;
            self.plaintext = plaintext;
            return;
        }
        let now = self.collector_now(to);
        let mut out = std::mem::take(&mut self.out);
        if let Some(core) = self.collectors[to as usize].core.as_mut() {
            if core
                .handle_datagram(from, &plaintext, now, &mut out)
                .is_err()
            {
                self.stats.refused += 1;
            }
        }
        self.dispatch(to, &mut out);
        self.out = out;
        self.plaintext = plaintext;
    }

    /// Opens a sealed frame into a message, as a receiver does: frame, seal, validation.
    fn open_frame(
        decoder: &mut FrameDecoder,
        opener: &mut Opener,
        keyring: &Keyring,
        limits: &WireLimits,
        bytes: &[u8],
        plaintext: &mut AlignedVec,
    ) -> Option<Message> {
        let mut input = bytes;
        let body = decoder.decode(&mut input).ok()??;
        opener.open(keyring, Channel::Data, body, plaintext).ok()?;
        let archived = wire::decode(plaintext, limits).ok()?;
        wire::to_owned(archived).ok()
    }

    fn on_collector_frame(&mut self, i: u16, from: Endpoint, generation: u32, bytes: Vec<u8>) {
        let c = &mut self.collectors[i as usize];
        if c.core.is_none() || c.generation != generation {
            return; // the connection died with the process it reached
        }
        if c.paused {
            c.backlog.push(Ev::Frame {
                from,
                to: Endpoint::Collector(i),
                generation,
                bytes,
            });
            return;
        }
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let message = World::open_frame(
            &mut c.decoder,
            &mut c.opener,
            &self.keyring,
            &self.limits,
            &bytes,
            &mut plaintext,
        );
        self.plaintext = plaintext;
        let Some(message) = message else {
            self.stats.refused += 1;
            return;
        };
        let conn = conn_of(from);
        // The simulator seals everything with one key: its transport stands in for the
        // credential check (tested with real keys in `tenure-gossip` and the node's
        // process tests). An exporter's frame comes from the exporter its endpoint is.
        let sender = match from {
            Endpoint::Exporter(h) => Sender::ProvenExporter(exporter_id_of(h)),
            Endpoint::Collector(_) => Sender::Collector,
        };
        self.with_core(i, |core, now, out| {
            core.handle_message_from(conn, sender, message, now, out)
        });
    }

    /// The compromised exporter's batch: claims of neighbours' live IPs and of idle pool
    /// IPs of its region, under workload names of its choosing, stated as from exporter 1.
    /// Its own clock is true, so that its claims are judged on their entitlement alone.
    fn intrude(&mut self) {
        let Some(intruder) = self.intruder.as_mut() else {
            return;
        };
        if intruder.collectors.is_empty() {
            return;
        }
        let region = intruder.region;
        let held: Vec<IpAddr> = self
            .fleet
            .ips
            .iter()
            .filter(|s| s.region == region && s.holder.is_some())
            .map(|s| s.addr)
            .collect();
        let idle: Vec<IpAddr> = self
            .fleet
            .ips
            .iter()
            .filter(|s| s.region == region && s.holder.is_none())
            .map(|s| s.addr)
            .collect();
        let names = &self.fleet.names;
        let mut claims = Vec::new();
        let mut dictionary: Vec<String> = Vec::new();
        for k in 0..INTRUDER_CLAIMS_PER_BATCH {
            let pool = if k % 2 == 0 { &held } else { &idle };
            if pool.is_empty() || names.is_empty() {
                continue;
            }
            let ip = pool[intruder.rng.random_range(0..pool.len())];
            let name = names[intruder.rng.random_range(0..names.len())].to_string();
            let workload = match dictionary.iter().position(|n| *n == name) {
                Some(p) => p as u32,
                None => {
                    dictionary.push(name);
                    (dictionary.len() - 1) as u32
                }
            };
            claims.push(wire::Claim {
                ip,
                workload,
                instance: 0,
                since_ms: self.now.saturating_sub(self.scenario.heartbeat.interval_ms),
                until_ms: self.now,
            });
        }
        if claims.is_empty() {
            return;
        }
        self.stats.forged_claims += claims.len() as u64;
        let batch_id = (exporter_id_of(intruder.h) << 32) | intruder.next_batch;
        intruder.next_batch += 1;
        let to = Endpoint::Collector(intruder.collectors[intruder.current]);
        intruder.current = (intruder.current + 1) % intruder.collectors.len();
        let from = Endpoint::Exporter(intruder.h);
        let message = Message::FlowBatch(wire::FlowBatch {
            batch_id,
            exporter_id: exporter_id_of(0),
            hops: 0,
            sent_ms: self.now,
            region: self.scenario.regions[region].name.clone(),
            dictionary,
            flows: Vec::new(),
            claims,
        });
        self.send_frame(from, to, &message);
    }

    // ----- exporters -----

    fn on_exporter_frame(&mut self, h: u32, bytes: Vec<u8>) {
        if self.intruder.as_ref().is_some_and(|i| i.h == h) {
            // Its answers change nothing: it sends its next batch at its next heartbeat.
            return;
        }
        let e = &mut self.exporters[h as usize];
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let message = World::open_frame(
            &mut e.decoder,
            &mut e.opener,
            &self.keyring,
            &self.limits,
            &bytes,
            &mut plaintext,
        );
        self.plaintext = plaintext;
        let ack = match message {
            Some(Message::Ack(ack)) => ack,
            Some(
                Message::ClaimBatch(_)
                | Message::FlowBatch(_)
                | Message::IpEventBatch(_)
                | Message::RangeSnapshot(_)
                | Message::RangeRequest(_)
                | Message::RegionDirectory(_),
            ) => return,
            None => {
                self.stats.refused += 1;
                return;
            }
        };
        let e = &mut self.exporters[h as usize];
        let front = e.batcher.front().map(|b| b.batch_id);
        match ack.status {
            AckStatus::Accepted => {
                if front == Some(ack.batch_id) {
                    if let Some(batch) = e.batcher.front() {
                        for f in &batch.flows {
                            let index = (f.flow_id & u128::from(u64::MAX)) as usize;
                            if let Some(t) = self.truths.flows.get_mut(index) {
                                if !t.accepted {
                                    t.accepted = true;
                                    t.accepted_at_ms = self.now;
                                    self.stats.accepted += 1;
                                }
                            }
                        }
                    }
                    e.batcher.acked(ack.batch_id);
                }
                if e.inflight == Some(ack.batch_id) || front == Some(ack.batch_id) {
                    e.inflight = None;
                    self.try_send(h);
                }
            }
            AckStatus::Busy { retry_after_ms } => {
                if e.inflight == Some(ack.batch_id) {
                    e.inflight = None;
                    self.push(
                        self.now + retry_after_ms.max(1),
                        Ev::ExporterRetry { host: h },
                    );
                }
            }
            AckStatus::Rejected(_) => {
                e.batcher.rejected(ack.batch_id);
                if e.inflight == Some(ack.batch_id) {
                    e.inflight = None;
                    self.try_send(h);
                }
            }
        }
    }

    fn try_send(&mut self, h: u32) {
        let e = &self.exporters[h as usize];
        if e.down > 0 || e.inflight.is_some() || e.collectors.is_empty() {
            return;
        }
        // Every attempt states when it was sent, its times by the same clock.
        let Some(copy) = e.batcher.outgoing(self.host_now(h), self.host_offset(h)) else {
            return;
        };
        let batch_id = copy.batch_id;
        let message = Message::FlowBatch(copy);
        let e = &self.exporters[h as usize];
        let to = Endpoint::Collector(e.collectors[e.current]);
        self.exporters[h as usize].inflight = Some(batch_id);
        self.send_frame(Endpoint::Exporter(h), to, &message);
        let timeout = self.scenario.heartbeat.ack_timeout_ms;
        self.push(self.now + timeout, Ev::AckTimeout { host: h, batch_id });
    }

    fn on_heartbeat(&mut self, h: u32) {
        if self.exporters[h as usize].down > 0 {
            return;
        }
        let host_now = self.host_now(h);
        let now = self.now;
        // Sockets that closed by now reach the exporter core.
        let e = &mut self.exporters[h as usize];
        let mut sockets = Vec::new();
        let mut i = 0;
        while i < e.closed.len() {
            if e.closed[i].0 <= now {
                sockets.push(e.closed.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        sockets.sort_by_key(|f| f.flow_id);
        // The simulated monotonic clock is true time, and sockets are stamped on it, as
        // the kernel stamps them; the host's wall clock is its frame ahead.
        let offset_now = e.offset_ms + e.steps.iter().map(|(_, s)| s).sum::<i64>();
        e.core.capture(sockets);
        // The host's identity source, as an IP map file: the instances it runs, each with
        // its `since`, and those that ended less than the learn delay ago.
        let delay = self.scenario.host.release_learn_delay_ms;
        let host = &mut self.fleet.hosts[h as usize];
        e.releasing.append(&mut host.ended);
        let fleet = &self.fleet;
        let mut changed = e.changed_ms;
        let mut released = BTreeMap::new();
        e.releasing.retain(|&inst| {
            let instance = &fleet.instances[inst as usize];
            let still_listed = instance.end_ms.saturating_add(delay) > now;
            if !still_listed {
                // The source states when the instance stopped, as a container runtime's
                // event does.
                // Ends are in order: an IP released twice since the last heartbeat (a short
                // tenure in between) keeps the first, which ends the tenure the history
                // knows.
                let end = instance.end_stamped_ms.unwrap_or(host_now);
                released
                    .entry(fleet.ips[instance.ip as usize].addr)
                    .or_insert(end);
                let learned = (end + delay).min(host_now);
                changed = Some(changed.map_or(learned, |c| c.max(learned)));
            }
            still_listed
        });
        let mut held = BTreeMap::new();
        // A live instance replaces a listed ended one on the same IP.
        for &inst in e.releasing.iter().chain(&fleet.hosts[h as usize].instances) {
            let instance = &fleet.instances[inst as usize];
            changed = Some(changed.map_or(instance.since_stamped_ms, |c| {
                c.max(instance.since_stamped_ms)
            }));
            held.insert(
                fleet.ips[instance.ip as usize].addr,
                Held {
                    workload: fleet.names[instance.workload as usize].clone(),
                    since_ms: Some(instance.since_stamped_ms),
                },
            );
        }
        e.changed_ms = changed;
        let observation = Observation {
            held,
            changed_ms: changed,
            released,
        };
        e.core.observe(now, offset_now, &observation);
        let (flows, core_claims) = e.core.heartbeat(offset_now);
        for f in &flows {
            let index = (f.socket.flow_id & u128::from(u64::MAX)) as u32;
            for (variant, l) in self.legacy.iter_mut().enumerate() {
                // The variant rides in the payload's high bits (see `drain_legacy`).
                let payload = (variant as u32) << 28 | index;
                l.submit(
                    f.socket.remote_ip,
                    payload,
                    UnixMillis(now),
                    &mut self.legacy_out,
                );
            }
        }
        self.drain_legacy();
        // Claims, with the scenario's heartbeat faults.
        let hb = &self.scenario.heartbeat;
        let mut claims = std::mem::take(&mut self.exporters[h as usize].delayed_claims);
        let mut delayed = Vec::new();
        for claim in core_claims {
            if hb.loss > 0.0 && self.rng.random_bool(hb.loss) {
                continue;
            }
            if hb.delay > 0.0 && self.rng.random_bool(hb.delay) {
                delayed.push(claim);
                continue;
            }
            if hb.duplication > 0.0 && self.rng.random_bool(hb.duplication) {
                claims.push(claim.clone());
            }
            claims.push(claim);
        }
        let e = &mut self.exporters[h as usize];
        e.delayed_claims = delayed;
        let dropped_before = e.batcher.stats().flows_dropped;
        e.batcher.push(flows, claims, offset_now);
        let dropped = e.batcher.stats().flows_dropped - dropped_before;
        self.stats.undelivered += dropped;
        self.try_send(h);
    }

    /// Scores what the legacy attributors answered. Payloads are flow indexes below
    /// 2^28 with the attributor's position above.
    fn drain_legacy(&mut self) {
        let out = std::mem::take(&mut self.legacy_out);
        // Variant numbers are carried in the high bits of the payload.
        for (payload, said) in &out {
            let variant = (payload >> 28) as usize;
            let index = (payload & 0x0fff_ffff) as usize;
            self.score_legacy(variant, index, said.as_ref());
        }
        self.legacy_out = out;
        self.legacy_out.clear();
    }

    fn score_legacy(&mut self, variant: usize, index: usize, said: Option<&Arc<str>>) {
        self.truths.on_legacy(variant, index, said, &self.fleet);
        let t = &self.truths.flows[index];
        let (caller, start, class) = (t.caller, t.start_ms, t.legacy[variant]);
        if class == Class::Wrong {
            self.minute(start).legacy_wrong[variant] += 1;
        }
        if let (Some(o), true) = (
            said.and_then(|s| self.name_index.get(s)),
            self.counted(caller),
        ) {
            self.edges.reported[1 + variant].insert((caller, *o));
        }
    }

    // ----- fleet -----

    fn start_instance(&mut self, workload: u32, first: bool) {
        let offsets: Vec<i64> = (0..self.exporters.len() as u32)
            .map(|h| self.host_offset(h))
            .collect();
        let change = self
            .fleet
            .start_instance(workload, self.now, first, &mut self.rng, |h| {
                offsets[h as usize]
            });
        match change {
            FleetChange::Started { instance } => {
                let inst = &self.fleet.instances[instance as usize];
                let (end, ip, at) = (inst.end_ms, inst.ip, inst.start_ms);
                if end != NEVER_MS {
                    self.push(end, Ev::InstanceEnd { instance });
                }
                let event = LegacyEvent::Assign {
                    ip: self.fleet.ips[ip as usize].addr,
                    owner: self.fleet.names[workload as usize].clone(),
                    at: UnixMillis(at),
                };
                let delay = self.event_delay();
                self.push(self.now + delay, Ev::Legacy(event));
            }
            FleetChange::NoIp { workload } => {
                self.push(self.now + NO_IP_RETRY_MS, Ev::InstanceStart { workload });
            }
        }
    }

    fn end_instance(&mut self, instance: u32) {
        let host = self.fleet.instances[instance as usize].host;
        let offset = self.host_offset(host);
        self.fleet.end_instance(instance, offset);
        let inst = &self.fleet.instances[instance as usize];
        let (workload, ip, end) = (inst.workload, inst.ip, inst.end_ms);
        let event = LegacyEvent::Unassign {
            ip: self.fleet.ips[ip as usize].addr,
            at: UnixMillis(end),
        };
        let delay = self.event_delay();
        self.push(self.now + delay, Ev::Legacy(event));
        let gap = self.rng.random_range(0..=REPLACEMENT_GAP_MS_MAX);
        self.push(self.now + gap, Ev::InstanceStart { workload });
    }

    /// A delivery delay of the IP-assignment feed: most within the body, some in the tail.
    fn event_delay(&mut self) -> u64 {
        let f = &self.scenario.event_feed;
        if f.tail_share > 0.0 && self.rng.random_bool(f.tail_share) {
            self.rng.random_range(f.delay_ms_max..=f.tail_delay_ms_max)
        } else {
            self.rng.random_range(f.delay_ms_min..=f.delay_ms_max)
        }
    }

    fn flow_step(&mut self) {
        // Legacy hold-backs release as time passes.
        for (variant, l) in self.legacy.iter_mut().enumerate() {
            let mut out = Vec::new();
            l.tick(UnixMillis(self.now), &mut out);
            for (index, said) in out {
                self.legacy_out.push(((variant as u32) << 28 | index, said));
            }
        }
        self.drain_legacy();
        let scenario = self.scenario;
        for (c, call) in scenario.calls.iter().enumerate() {
            let expected = call.flows_per_s * FLOW_STEP_MS as f64 / 1_000.0;
            let whole = expected.floor() as u64;
            let extra = u64::from(
                self.rng
                    .random_bool((expected - expected.floor()).clamp(0.0, 1.0)),
            );
            for _ in 0..whole + extra {
                self.one_flow(c, call);
            }
        }
    }

    /// The workloads a call's `from` or `to` name stands for.
    fn group(fleet: &Fleet, name: &str) -> Vec<u32> {
        let prefix = format!("{name}-");
        (0..fleet.workloads.len() as u32)
            .filter(|&w| {
                let n = &*fleet.workloads[w as usize].name;
                n == name
                    || (n.starts_with(&prefix)
                        && n[prefix.len()..].bytes().all(|b| b.is_ascii_digit()))
            })
            .collect()
    }

    fn one_flow(&mut self, c: usize, call: &crate::scenario::CallConfig) {
        let callers = &self.call_groups[c].0;
        let caller_w = callers[self.rng.random_range(0..callers.len())];
        let live = &self.fleet.workloads[caller_w as usize].live;
        if live.is_empty() {
            return;
        }
        let caller = live[self.rng.random_range(0..live.len())];
        let duration = self.rng.random_range(1..=call.flow_ms_max);
        let start = self.now + self.rng.random_range(0..FLOW_STEP_MS);
        let ci = &self.fleet.instances[caller as usize];
        if ci.end_ms <= start {
            return;
        }
        // A connection closes when its workload stops: its local IP's tenure ends with it.
        let end = (start + duration).min(ci.end_ms);
        let (host, local_ip, region) = (
            ci.host,
            self.fleet.ips[ci.ip as usize].addr,
            self.fleet.workloads[caller_w as usize].region,
        );
        let roll: f64 = self.rng.random();
        let delta = self.scenario.cluster.skew_margin_ms;
        let hb = self.scenario.heartbeat.interval_ms;
        let (remote, owner, bounded) = if roll < call.external_share {
            (external_ip(&mut self.rng), Owner::External, false)
        } else if roll < call.external_share + call.non_workload_share {
            let nw = &self.fleet.non_workload[region];
            if nw.is_empty() {
                return;
            }
            let ip = nw[self.rng.random_range(0..nw.len())];
            let slot = &self.fleet.ips[ip as usize];
            (slot.addr, Owner::Named(slot.history[0].2), false)
        } else {
            let targets = &self.call_groups[c].1;
            let target_w = targets[self.rng.random_range(0..targets.len())];
            let live = &self.fleet.workloads[target_w as usize].live;
            if live.is_empty() {
                return;
            }
            let target = live[self.rng.random_range(0..live.len())];
            let ti = &self.fleet.instances[target as usize];
            // A connection lives inside the tenure of the IP it reaches.
            if ti.start_ms > start || ti.end_ms <= end {
                return;
            }
            let margin = delta + hb;
            let bounded = start >= self.bounded_from
                && start >= ti.start_ms + margin
                && end.saturating_add(margin) <= ti.end_ms;
            (
                self.fleet.ips[ti.ip as usize].addr,
                Owner::Named(target_w),
                bounded,
            )
        };
        let index = self.truths.flows.len();
        if index >= 0x0fff_ffff {
            return; // the legacy payload's index bits are full: stop generating
        }
        let flow_id = self.truths.flow_id(index);
        self.truths.flows.push(FlowTruth {
            start_ms: start,
            end_ms: end,
            local: local_ip,
            remote,
            owner,
            caller: caller_w,
            bounded,
            accepted: false,
            accepted_at_ms: 0,
            emitted: 0,
            first_emitted_at_ms: 0,
            tenure: Class::Unscored,
            reason: None,
            legacy: vec![Class::Unscored; self.legacy.len()],
        });
        self.stats.flows += 1;
        self.minute(start).flows += 1;
        if let (Owner::Named(o), true) = (owner, self.counted(caller_w)) {
            self.edges.truth.insert((caller_w, o));
        }
        let local_port = 30_000 + (index % 30_000) as u16;
        let flow = Socket {
            flow_id,
            local_ip,
            local_port,
            remote_ip: remote,
            remote_port: 8080,
            // True times: the host's clock is applied when capture reads them.
            start_ms: start,
            end_ms: end,
            bytes_sent: 100 + (index as u64 % 5_000),
            bytes_received: 200 + (index as u64 % 50_000),
            segs_in: 5,
            segs_out: 5,
            retransmits: 0,
            rtt_us: 0,
            direction: Direction::Outbound,
            ongoing: false,
        };
        self.exporters[host as usize].closed.push((end, flow));
    }

    // ----- event feed -----

    fn feed_push(&mut self, region: usize) {
        let collectors: Vec<u16> = (0..self.collectors.len() as u16)
            .filter(|&i| self.collectors[i as usize].region == region)
            .collect();
        // The feed posts to the next collector that answers (a paused or crashed one
        // does not).
        for _ in 0..collectors.len() {
            let turn = self.feed_turn[region] % collectors.len();
            self.feed_turn[region] += 1;
            let i = collectors[turn];
            let c = &self.collectors[i as usize];
            if c.core.is_none() || c.paused {
                continue;
            }
            let start = self.start;
            let events: Vec<wire::IpEvent> = self.fleet.non_workload[region]
                .iter()
                .map(|&ip| {
                    let slot = &self.fleet.ips[ip as usize];
                    wire::IpEvent {
                        ip: slot.addr,
                        kind: wire::IpEventKind::Assign,
                        owner: self.fleet.names[slot.history[0].2 as usize].to_string(),
                        at_ms: start - 3_600_000,
                    }
                })
                .collect();
            let watermark = self.now;
            self.with_core(i, |core, now, out| {
                core.handle_events(events, watermark, now, out)
            });
            return;
        }
    }

    // ----- faults -----

    fn fault_start(&mut self, id: u32) {
        let planned = self.faults[id as usize].clone();
        match planned.fault {
            Fault::Degrade { loss, delay_ms_max } => self.net.degraded.push((
                id,
                LinkState {
                    extra_delay_ms_max: delay_ms_max,
                    loss_extra: loss,
                },
            )),
            Fault::Cut { cuts } => {
                for c in cuts {
                    self.net.cuts.push((id, c));
                }
            }
            Fault::Pause { node } => self.collectors[node as usize].paused = true,
            Fault::Crash { node } => {
                let unsynced = self.collectors[node as usize].disk.unsynced_len();
                let kept = self.rng.random_range(0..=unsynced);
                let c = &mut self.collectors[node as usize];
                c.core = None;
                c.backlog.clear();
                c.paused = false;
                let loss = c.disk.crash(kept);
                self.stats.unsynced_lost += loss.lost as u64;
                self.trace(21, u64::from(node), loss.kept as u64);
            }
            Fault::ClockJump {
                collector,
                collector_offset_ms,
                ref hosts,
            } => {
                self.collectors[collector as usize].offset_ms = collector_offset_ms;
                for &(h, offset) in hosts {
                    self.exporters[h as usize].offset_ms = offset;
                }
            }
            Fault::ClockStep { collector, step_ms } => {
                self.collectors[collector as usize]
                    .steps
                    .push((id, step_ms));
            }
            Fault::HostClockStep { ref hosts } => {
                for &(h, step) in hosts {
                    self.exporters[h as usize].steps.push((id, step));
                }
            }
            Fault::ClockSlew { collector, peak_ms } => {
                self.collectors[collector as usize].slews.push((
                    id,
                    planned.start_ms,
                    planned.end_ms,
                    peak_ms,
                ));
            }
            Fault::ExporterOutage { ref hosts } => {
                for &h in hosts {
                    self.exporters[h as usize].down += 1;
                }
            }
        }
    }

    fn fault_end(&mut self, id: u32) {
        let planned = self.faults[id as usize].clone();
        match planned.fault {
            Fault::Degrade { .. } => self.net.degraded.retain(|(f, _)| *f != id),
            Fault::Cut { .. } => self.net.cuts.retain(|(f, _)| *f != id),
            Fault::Pause { node } => {
                let c = &mut self.collectors[node as usize];
                if !c.paused || c.core.is_none() {
                    return;
                }
                c.paused = false;
                let backlog = std::mem::take(&mut c.backlog);
                let generation = c.generation;
                for ev in backlog {
                    self.handle(ev);
                }
                self.push(self.now + 1, Ev::Tick { node, generation });
            }
            Fault::Crash { node } => {
                if self.collectors[node as usize].core.is_none() {
                    self.boot(node);
                }
            }
            Fault::ClockJump { .. } => {}
            Fault::ClockStep { collector, .. } => {
                self.collectors[collector as usize]
                    .steps
                    .retain(|(f, _)| *f != id);
            }
            Fault::ClockSlew { collector, .. } => {
                self.collectors[collector as usize]
                    .slews
                    .retain(|(f, ..)| *f != id);
            }
            Fault::HostClockStep { ref hosts } => {
                for &(h, _) in hosts {
                    self.exporters[h as usize].steps.retain(|(f, _)| *f != id);
                }
            }
            Fault::ExporterOutage { ref hosts } => {
                for &h in hosts {
                    let e = &mut self.exporters[h as usize];
                    e.down = e.down.saturating_sub(1);
                    if e.down == 0 {
                        e.inflight = None;
                        self.try_send(h);
                    }
                }
            }
        }
    }

    // ----- checks -----

    fn check_convergence(&mut self) {
        let gaps = self.convergence_gaps();
        if let Some((node, _)) = gaps.first() {
            // Recorded, not stopping: the run goes on so that the other invariants (no
            // misattribution, no loss) are still checked on this seed, and the view is
            // looked at again at the end to tell slow convergence from none.
            self.convergence = Some(Violation::NotConverged {
                node: node.clone(),
                what: describe_gaps(&gaps),
                bound_ms: convergence_bound_ms(self.scenario.heartbeat.interval_ms),
            });
        }
    }

    /// At the end of the run: how a recorded convergence failure turned out.
    fn recheck_convergence(&mut self) {
        let later = (self.now - self.heal_at) / 1_000;
        let gaps = self.convergence_gaps();
        if let Some(Violation::NotConverged { what, .. }) = self.convergence.as_mut() {
            if gaps.is_empty() {
                what.push_str(&format!(
                    " | converged by the end ({later} s after healing)"
                ));
            } else {
                what.push_str(&format!(
                    " | still at the end ({later} s after healing): {}",
                    describe_gaps(&gaps)
                ));
            }
        }
    }

    /// Every live collector's differences from the truth: LAN and WAN members it misses
    /// (or holds though they are down), a ring that is not the live region, and handoff
    /// still pending. Empty when the cluster has converged.
    fn convergence_gaps(&self) -> Vec<(String, String)> {
        let live: Vec<u16> = (0..self.collectors.len() as u16)
            .filter(|&i| self.collectors[i as usize].core.is_some())
            .collect();
        let mut gaps = Vec::new();
        for &i in &live {
            let c = &self.collectors[i as usize];
            let Some(core) = c.core.as_ref() else {
                continue;
            };
            let live_lan: Vec<&str> = live
                .iter()
                .map(|&j| &self.collectors[j as usize])
                .filter(|o| o.region == c.region && o.node_id != c.node_id)
                .map(|o| o.node_id.as_str())
                .collect();
            let live_wan: Vec<&str> = live
                .iter()
                .map(|&j| self.collectors[j as usize].node_id.as_str())
                .filter(|n| *n != c.node_id)
                .collect();
            let lan: Vec<&str> = core
                .membership()
                .lan_members()
                .map(|m| m.node_id())
                .filter(|n| *n != c.node_id)
                .collect();
            let wan: Vec<&str> = core
                .membership()
                .wan_members()
                .map(|m| m.node_id())
                .filter(|n| *n != c.node_id)
                .collect();
            let ring: Vec<&str> = core.ring().members().iter().map(|m| m.node_id()).collect();
            let mut what = Vec::new();
            for (pool, have, want) in [("LAN", &lan, &live_lan), ("WAN", &wan, &live_wan)] {
                let missing: Vec<&str> =
                    want.iter().filter(|n| !have.contains(n)).copied().collect();
                let dead: Vec<&str> = have.iter().filter(|n| !want.contains(n)).copied().collect();
                if !missing.is_empty() {
                    what.push(format!("{pool} misses {missing:?}"));
                }
                if !dead.is_empty() {
                    what.push(format!("{pool} holds down {dead:?}"));
                }
            }
            let ring_missing: Vec<&str> = live_lan
                .iter()
                .chain(std::iter::once(&c.node_id.as_str()))
                .filter(|n| !ring.contains(n))
                .copied()
                .collect();
            if !ring_missing.is_empty() {
                what.push(format!("ring misses {ring_missing:?}"));
            }
            if what.is_empty() && !core.is_ready() {
                what.push(format!(
                    "handoff still has {} pending spans",
                    core.handoff().pending_spans()
                ));
            }
            if !what.is_empty() {
                gaps.push((c.node_id.clone(), what.join(", ")));
            }
        }
        gaps
    }

    fn finish(mut self) -> RunOutcome {
        let completed = self.violation.is_none();
        if completed {
            for (variant, l) in self.legacy.iter_mut().enumerate() {
                let mut out = Vec::new();
                l.flush(&mut out);
                for (index, said) in out {
                    self.legacy_out.push(((variant as u32) << 28 | index, said));
                }
            }
            self.drain_legacy();
            if let Some(v) = self.truths.lost() {
                self.violation = Some(v);
            } else if let Some(v) = self
                .truths
                .late(self.emit_bound_ms(), |at| sane_after(&self.faults, at))
            {
                self.violation = Some(v);
            }
        }
        if self.violation.is_none() {
            self.violation = self.truths.local_misattributed();
        }
        let s = &mut self.stats;
        s.simulated_ms = self.now - self.start;
        s.duplicates = self.truths.duplicates;
        s.local_stamped = self.truths.local_stamped;
        s.local_misattributed = self.truths.local_misattributed;
        s.local_unattributed = self.truths.local_by_reason;
        s.by_reason = Reason::ALL
            .iter()
            .zip(self.truths.by_reason)
            .map(|(r, n)| (*r, n))
            .collect();
        s.legacy = self
            .scenario
            .legacy
            .hold_back_ms
            .iter()
            .map(|&h| (h, 0, 0, 0))
            .collect();
        s.not_entitled = self
            .collectors
            .iter()
            .filter_map(|c| c.core.as_ref())
            .filter_map(|core| {
                core.admission_stats()
                    .claims_rejected
                    .get(&Rejection::NotEntitled)
                    .copied()
            })
            .sum();
        for t in &self.truths.flows {
            if t.emitted > 0 {
                s.emitted += 1;
            }
            // A run stopped early has not drained: its unemitted flows are not lost.
            if completed && t.accepted && t.emitted == 0 {
                s.lost += 1;
            }
            if !t.accepted && t.emitted == 0 {
                s.undelivered += 1;
            }
            match t.tenure {
                Class::Correct | Class::Wrong => s.attributed += 1,
                Class::Unattributed => s.unattributed += 1,
                Class::Unscored => {}
            }
            if t.bounded && t.emitted > 0 {
                s.bounded_flows += 1;
                if t.tenure == Class::Unattributed {
                    s.bounded_unattributed += 1;
                }
            }
            for (v, class) in t.legacy.iter().enumerate() {
                let entry = &mut s.legacy[v];
                match class {
                    Class::Correct => entry.1 += 1,
                    Class::Wrong => {
                        entry.1 += 1;
                        entry.2 += 1;
                    }
                    Class::Unattributed => {
                        entry.1 += 1;
                        entry.3 += 1;
                    }
                    Class::Unscored => {}
                }
            }
        }
        s.dependencies = self.edges.scores();
        s.true_dependencies = self.edges.truth.len() as u64;
        if self.violation.is_none() && s.bounded_flows > 0 {
            let share = s.unattributed_share();
            let bound = self.scenario.checks.unattributed_share_max;
            if share > bound {
                self.violation = Some(Violation::UnattributedShare {
                    share,
                    bound,
                    flows: s.bounded_flows,
                });
            }
        }
        RunOutcome {
            seed: self.seed,
            stats: self.stats,
            violation: self.violation,
            convergence: self.convergence,
            trace_hash: self.trace.finish(),
            timeline: self.timeline,
        }
    }
}

/// Why a frame could not be built (counted as refused; the message stays unsent).
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("framing")]
    Frame(#[from] tenure_gossip::frame::FrameError),
    #[error("sealing")]
    Seal(#[from] tenure_gossip::seal::SealError),
}

/// "node: what; node: what".
fn describe_gaps(gaps: &[(String, String)]) -> String {
    gaps.iter()
        .map(|(node, what)| format!("{node}: {what}"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn endpoint_code(e: Endpoint) -> u64 {
    conn_of(e)
}

/// Connections are named by the endpoint at their other end.
fn conn_of(e: Endpoint) -> ConnId {
    match e {
        Endpoint::Exporter(h) => u64::from(h),
        Endpoint::Collector(i) => (1 << 40) | u64::from(i),
    }
}

fn endpoint_of_conn(conn: ConnId) -> Endpoint {
    if conn & (1 << 40) != 0 {
        Endpoint::Collector((conn & 0xffff) as u16)
    } else {
        Endpoint::Exporter(conn as u32)
    }
}

/// Runs one seed of `scenario`.
pub fn run(scenario: &Scenario, seed: u64) -> RunOutcome {
    World::new(scenario, seed).run()
}

/// A slew's offset at true time `now`: zero at `start`, `peak` halfway, zero at `end`,
/// moving steadily in between.
fn slew_at(now: u64, start: u64, end: u64, peak: i64) -> i64 {
    if now <= start || now >= end {
        return 0;
    }
    let half = (end - start) / 2;
    let from_edge = (now - start).min(end - now);
    if half == 0 {
        return 0;
    }
    (i128::from(peak) * i128::from(from_edge) / i128::from(half)) as i64
}

/// The first true time at or after `at` when no fault episode is active.
fn sane_after(faults: &[Planned], at: u64) -> u64 {
    let mut t = at;
    // Episodes may overlap and chain: move past each one active at `t` until none is.
    loop {
        let Some(end) = faults
            .iter()
            .filter(|f| f.start_ms <= t && t < f.end_ms)
            .map(|f| f.end_ms)
            .max()
        else {
            return t;
        };
        t = end;
    }
}
