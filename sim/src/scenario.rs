//! The scenario file: the fleet, the cluster, the network and the faults of a run, as TOML.
//!
//! Every field is documented here, and these comments are the user documentation. Unknown
//! keys are refused, and [`Scenario::validate`] turns every constraint into a
//! [`ScenarioError`] naming the field, so a bad file never panics the simulator.

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

/// Why a scenario file cannot be used. Nothing was run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Phases of the run.
    pub run: RunConfig,
    /// The collector cluster.
    pub cluster: ClusterConfig,
    /// The simulated network between collectors and from exporters.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Clocks of hosts and collectors.
    #[serde(default)]
    pub clocks: ClockConfig,
    /// How exporters heartbeat and send.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// What each host's exporter core learns of its local IPs, and how it stamps them.
    #[serde(default)]
    pub host: HostConfig,
    /// The IP-assignment event feed that the legacy baseline consumes.
    #[serde(default)]
    pub event_feed: EventFeedConfig,
    /// The legacy event-only attributor(s) compared against.
    #[serde(default)]
    pub legacy: LegacyConfig,
    /// Regions, each with its CIDR, hosts and IP pool.
    pub regions: Vec<RegionConfig>,
    /// Workloads and their instances.
    pub workloads: Vec<WorkloadConfig>,
    /// Who calls whom.
    pub calls: Vec<CallConfig>,
    /// The collectors' disks, where their journals live.
    #[serde(default)]
    pub disk: DiskConfig,
    /// Faults drawn per seed.
    #[serde(default)]
    pub faults: FaultConfig,
    /// Bounds the checks hold the run to.
    #[serde(default)]
    pub checks: CheckConfig,
}

/// Phases: faults, then healed; flows stop at the end of the healed phase and a drain
/// follows (derived: pending deadline plus a few heartbeat intervals) so every accepted
/// flow can be emitted before the final checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Simulated seconds during which faults may be active.
    pub fault_phase_s: u64,
    /// Simulated seconds after every fault has ended.
    pub healed_phase_s: u64,
    /// Seconds at the start of the healed phase that the unattributed-share bound ignores
    /// (membership convergence, handoff, exporters' backlogs). Default 60.
    #[serde(default = "default_settle_s")]
    pub settle_s: u64,
    /// The true time at the start of the run, Unix ms. Default 1,700,000,000,000.
    #[serde(default = "default_start_unix_ms")]
    pub start_unix_ms: u64,
    /// Seconds before the first flow, for the cluster to form. Default 20.
    #[serde(default = "default_warmup_s")]
    pub warmup_s: u64,
}

fn default_settle_s() -> u64 {
    60
}
fn default_start_unix_ms() -> u64 {
    1_700_000_000_000
}
fn default_warmup_s() -> u64 {
    20
}

/// The collectors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Collectors in every region (1 to 64).
    pub collectors_per_region: u16,
    /// Owners per IP on a region's ring (R). Default 2.
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// δ: the most two hosts' clocks may disagree, in ms. Default 1,000.
    #[serde(default = "default_skew_margin_ms")]
    pub skew_margin_ms: u64,
    /// How long a flow waits for coverage, in ms. Default: two heartbeat intervals plus
    /// 5,000 ms of replication delay.
    pub pending_deadline_ms: Option<u64>,
    /// How long a forwarded batch may go unacknowledged, in ms. Default 3,000.
    #[serde(default = "default_forward_ack_timeout_ms")]
    pub forward_ack_timeout_ms: u64,
}

fn default_replication() -> usize {
    2
}
fn default_skew_margin_ms() -> u64 {
    1_000
}
fn default_forward_ack_timeout_ms() -> u64 {
    3_000
}

/// Per-link behaviour in the healed state (faults add to it).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// One-way delay inside a region, uniform between these, in ms.
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
    /// One-way delay between regions, uniform between these, in ms.
    pub cross_region_delay_ms_min: u64,
    pub cross_region_delay_ms_max: u64,
    /// Share of gossip datagrams lost (0 to 1).
    pub datagram_loss: f64,
    /// Share of gossip datagrams delivered twice (0 to 1).
    pub datagram_duplication: f64,
    /// Share of data-plane frames whose connection breaks, losing the frame (0 to 1).
    pub frame_loss: f64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            delay_ms_min: 1,
            delay_ms_max: 10,
            cross_region_delay_ms_min: 40,
            cross_region_delay_ms_max: 90,
            datagram_loss: 0.0,
            datagram_duplication: 0.0,
            frame_loss: 0.0,
        }
    }
}

/// Clocks. Host offsets stay within ±`host_skew_ms_max` (jumps included), so two hosts
/// disagree by at most twice that, which must not exceed δ: the contract only holds while
/// clocks agree within the margin.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Largest host clock offset from true time, in ms. Default 400.
    pub host_skew_ms_max: u64,
    /// Largest collector clock offset from true time, in ms. Default 2,000.
    pub collector_skew_ms_max: u64,
    /// Largest step of a collector's clock in a `clock-step` episode, either way, in ms
    /// (at least 1,000). Default 120,000.
    pub collector_step_ms_max: u64,
    /// Largest offset a `clock-slew` episode slews a collector's clock to, either way, in
    /// ms. Default 5,000.
    pub collector_slew_ms_max: u64,
    /// Largest step of a host's clock in a `host-clock-step` episode, either way, in ms
    /// (steps are at least three times δ: far enough off the fleet to be told apart); 0
    /// leaves such episodes out. Default 0.
    pub host_step_ms_max: u64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            host_skew_ms_max: 400,
            collector_skew_ms_max: 2_000,
            collector_step_ms_max: 120_000,
            collector_slew_ms_max: 5_000,
            host_step_ms_max: 0,
        }
    }
}

/// The host side: each host's exporter core is fed by an identity source that lists the
/// host's instances as an orchestrator's IP map file would (each with its `since`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// How long after an instance ended its host's source still lists it, in ms: the
    /// delay before the host learns that an IP was released (it may be reused meanwhile,
    /// on another host or on this one). Default 500.
    pub release_learn_delay_ms: u64,
    /// The exporter core's `local_margin_ms`. Default 900: a host's clock may jump by up
    /// to twice `clocks.host_skew_ms_max` between a tenure's start and a flow.
    pub local_margin_ms: u64,
    /// One compromised exporter in the first region, besides its hosts: its credential
    /// (its own exporter id) entitles it to no IP, and at every heartbeat it claims
    /// neighbours' live IPs and idle pool IPs under workload names of its choosing, in
    /// batches that name a neighbour as their sender. Honest exporters are entitled to
    /// their region's CIDR. Default true.
    pub compromised_exporter: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            release_learn_delay_ms: 500,
            local_margin_ms: 900,
            compromised_exporter: true,
        }
    }
}

/// Exporters.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// How often each exporter sends its batch (flows and claims), in ms. Default 10,000.
    pub interval_ms: u64,
    /// Share of claims lost before they reach the batch (0 to 1).
    pub loss: f64,
    /// Share of claims held back to the next interval (0 to 1).
    pub delay: f64,
    /// Share of claims sent twice (0 to 1).
    pub duplication: f64,
    /// How long an exporter waits for an ack before it tries the next collector, in ms.
    /// Default 3,000.
    pub ack_timeout_ms: u64,
    /// Unacknowledged batches an exporter keeps; past it the oldest is dropped, counted
    /// (never acknowledged, so never "accepted"). Default 600.
    pub buffer_batches_max: usize,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_ms: 10_000,
            loss: 0.0,
            delay: 0.0,
            duplication: 0.0,
            ack_timeout_ms: 3_000,
            buffer_batches_max: 600,
        }
    }
}

/// The IP-assignment event feed as a cloud IP tracker delivers it: most events after
/// `delay_ms_min..delay_ms_max`, a `tail_share` of them up to `tail_delay_ms_max`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventFeedConfig {
    pub delay_ms_min: u64,
    pub delay_ms_max: u64,
    /// Share of events in the tail (0 to 1).
    pub tail_share: f64,
    pub tail_delay_ms_max: u64,
    /// How often the feed pushes to tenure's collectors (non-workload IPs), in ms.
    pub push_interval_ms: u64,
}

impl Default for EventFeedConfig {
    fn default() -> Self {
        EventFeedConfig {
            delay_ms_min: 2_000,
            delay_ms_max: 60_000,
            tail_share: 0.1,
            tail_delay_ms_max: 1_200_000,
            push_interval_ms: 5_000,
        }
    }
}

/// The legacy baseline.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LegacyConfig {
    /// Hold-backs to run, one attributor each, in ms. The last one is the RESULT line's.
    /// Default `[0, 900000]` (none, and Netflix's 15 minutes).
    pub hold_back_ms: Vec<u64>,
}

impl Default for LegacyConfig {
    fn default() -> Self {
        LegacyConfig {
            hold_back_ms: vec![0, 900_000],
        }
    }
}

/// A region.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Its name (1 to 64 bytes).
    pub name: String,
    /// The prefix its IPs come from.
    pub cidr: IpNet,
    /// Hosts, one exporter each.
    pub hosts: u32,
    /// Workload IPs: small, so that IPs are reused quickly.
    pub ip_pool: u32,
    /// How long a freed IP stays free at least, in ms. Default 0.
    #[serde(default)]
    pub reuse_delay_ms_min: u64,
    /// Non-workload IPs (load balancers): no exporter, covered only by events.
    #[serde(default)]
    pub non_workload_ips: u32,
}

/// A workload, or `count` of them named `<name>-<k>`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    pub region: String,
    /// Workloads of this shape; more than one are named `<name>-<k>`. Default 1.
    #[serde(default = "one")]
    pub count: u32,
    /// Live instances per workload, each on a host and holding one pool IP.
    pub instances: u32,
    /// Instance lifetime, uniform between these, in s; 0 and 0: the whole run.
    #[serde(default)]
    pub lifetime_s_min: u64,
    #[serde(default)]
    pub lifetime_s_max: u64,
    /// A gateway: its reported dependencies are scored (Netflix's Zuul measure).
    #[serde(default)]
    pub gateway: bool,
}

fn one() -> u32 {
    1
}

/// Flows from the instances of `from` to those of `to`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// A workload name (or the base name of a group).
    pub from: String,
    /// Workload names or group base names called.
    #[serde(default)]
    pub to: Vec<String>,
    /// Flows per second, summed over the caller's instances.
    pub flows_per_s: f64,
    /// Flow duration, uniform 1 ms to this, in ms.
    pub flow_ms_max: u64,
    /// Share of flows to external addresses.
    #[serde(default)]
    pub external_share: f64,
    /// Share of flows to the caller region's non-workload IPs.
    #[serde(default)]
    pub non_workload_share: f64,
}

/// Faults. Each seed enables each allowed kind with probability `kind_probability`
/// (swarm testing), then draws `episodes` episodes of enabled kinds in the fault phase.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    pub enabled: bool,
    pub kind_probability: f64,
    pub episodes: u32,
    pub duration_s_min: u64,
    pub duration_s_max: u64,
    /// Collector crash and restart: the collector's memory is dropped, its disk keeps
    /// what was fsynced (and a random prefix of the rest), and it boots again at the end
    /// of the episode with a renewed incarnation and replays its journal. Default off.
    pub crash: bool,
    /// Datagram loss and frame loss during a loss episode (0 to 1).
    pub loss: f64,
    /// Extra one-way delay during a delay episode, uniform up to this, in ms.
    pub delay_ms_max: u64,
    /// The kinds episodes may be of, by name (`clock-step`, `crash`, ...); empty: every
    /// kind the scenario allows. Default empty.
    pub kinds: Vec<String>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            enabled: false,
            kind_probability: 0.5,
            episodes: 4,
            duration_s_min: 5,
            duration_s_max: 60,
            crash: false,
            loss: 0.3,
            delay_ms_max: 2_000,
            kinds: Vec::new(),
        }
    }
}

/// The disk under each collector's journal. Acknowledgements of accepted flows wait for
/// an fsync, so its delay is on the path of every exporter's ack.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Delay from a journal write to the fsync that makes it (and every write before it
    /// completes) durable, uniform in this range, in ms. Default 1 to 5.
    pub fsync_ms_min: u64,
    pub fsync_ms_max: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            fsync_ms_min: 1,
            fsync_ms_max: 5,
        }
    }
}

/// The longest fsync delay a scenario may ask for, in ms: beyond it, acks would time out
/// at any plausible `heartbeat.ack_timeout_ms` and the run would test nothing.
pub const FSYNC_MS_MAX: u64 = 1_000;

/// Bounds of the checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// The most flows well inside heartbeat-covered ranges, after healing, that may go
    /// out unattributed (0 to 1). Default 0.05.
    pub unattributed_share_max: f64,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            unattributed_share_max: 0.05,
        }
    }
}

fn share(field: &str, value: f64) -> Result<(), ScenarioError> {
    if !(0.0..=1.0).contains(&value) {
        return Err(invalid(field, format!("must be 0 to 1, got {value}")));
    }
    Ok(())
}

fn ordered(field: &str, lo: u64, hi: u64) -> Result<(), ScenarioError> {
    if lo > hi {
        return Err(invalid(field, format!("minimum {lo} above maximum {hi}")));
    }
    Ok(())
}

/// Largest IP pool per region, so the oracle and the fleet stay small.
pub const IP_POOL_MAX: u32 = 1 << 20;
/// Largest number of hosts per region.
pub const HOSTS_PER_REGION_MAX: u32 = 100_000;
/// Largest number of collectors per region.
pub const COLLECTORS_PER_REGION_MAX: u16 = 64;
/// Longest run, in simulated seconds (a bound on the event loop).
pub const RUN_S_MAX: u64 = 7 * 24 * 3_600;

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// The pending deadline in force, in ms.
    pub fn pending_deadline_ms(&self) -> u64 {
        self.cluster
            .pending_deadline_ms
            .unwrap_or(2 * self.heartbeat.interval_ms + 5_000)
    }

    /// Checks every constraint documented on the fields.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let run = &self.run;
        if run.fault_phase_s + run.healed_phase_s + run.warmup_s > RUN_S_MAX {
            return Err(invalid("run", format!("longer than {RUN_S_MAX} s")));
        }
        if run.healed_phase_s == 0 {
            return Err(invalid("run.healed_phase_s", "must be at least 1"));
        }
        let c = &self.cluster;
        if c.collectors_per_region == 0 || c.collectors_per_region > COLLECTORS_PER_REGION_MAX {
            return Err(invalid(
                "cluster.collectors_per_region",
                format!("must be 1 to {COLLECTORS_PER_REGION_MAX}"),
            ));
        }
        if c.replication == 0 {
            return Err(invalid("cluster.replication", "must be at least 1"));
        }
        if c.skew_margin_ms == 0 {
            return Err(invalid("cluster.skew_margin_ms", "must be at least 1"));
        }
        let n = &self.network;
        ordered("network.delay_ms_*", n.delay_ms_min, n.delay_ms_max)?;
        ordered(
            "network.cross_region_delay_ms_*",
            n.cross_region_delay_ms_min,
            n.cross_region_delay_ms_max,
        )?;
        share("network.datagram_loss", n.datagram_loss)?;
        share("network.datagram_duplication", n.datagram_duplication)?;
        share("network.frame_loss", n.frame_loss)?;
        if 2 * self.clocks.host_skew_ms_max > c.skew_margin_ms {
            return Err(invalid(
                "clocks.host_skew_ms_max",
                "twice it must not exceed cluster.skew_margin_ms: the contract assumes clocks agree within the margin",
            ));
        }
        if self.clocks.collector_skew_ms_max > 30_000 {
            return Err(invalid("clocks.collector_skew_ms_max", "at most 30000"));
        }
        if self.clocks.collector_step_ms_max > 86_400_000
            || self.clocks.collector_slew_ms_max > 86_400_000
            || self.clocks.host_step_ms_max > 86_400_000
        {
            return Err(invalid(
                "clocks.collector_step_ms_max",
                "steps and slews of at most a day (86400000)",
            ));
        }
        let h = &self.heartbeat;
        if h.interval_ms < 100 {
            return Err(invalid("heartbeat.interval_ms", "at least 100"));
        }
        share("heartbeat.loss", h.loss)?;
        share("heartbeat.delay", h.delay)?;
        share("heartbeat.duplication", h.duplication)?;
        if h.ack_timeout_ms == 0 || h.buffer_batches_max == 0 {
            return Err(invalid(
                "heartbeat",
                "ack_timeout_ms and buffer_batches_max must be at least 1",
            ));
        }
        let e = &self.event_feed;
        ordered("event_feed.delay_ms_*", e.delay_ms_min, e.delay_ms_max)?;
        ordered(
            "event_feed.tail_delay_ms_max",
            e.delay_ms_max,
            e.tail_delay_ms_max,
        )?;
        share("event_feed.tail_share", e.tail_share)?;
        if e.push_interval_ms == 0 {
            return Err(invalid("event_feed.push_interval_ms", "at least 1"));
        }
        if self.legacy.hold_back_ms.is_empty() {
            return Err(invalid("legacy.hold_back_ms", "at least one hold-back"));
        }
        if self.regions.is_empty() {
            return Err(invalid("regions", "at least one region"));
        }
        for (i, r) in self.regions.iter().enumerate() {
            let field = format!("regions[{i}]");
            if r.name.is_empty() || r.name.len() > 64 {
                return Err(invalid(format!("{field}.name"), "1 to 64 bytes"));
            }
            if self.regions[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(format!("{field}.name"), "duplicate region"));
            }
            if self.regions[..i]
                .iter()
                .any(|o| o.cidr.contains(&r.cidr.network()) || r.cidr.contains(&o.cidr.network()))
            {
                return Err(invalid(format!("{field}.cidr"), "overlaps another region"));
            }
            if r.hosts == 0 || r.hosts > HOSTS_PER_REGION_MAX {
                return Err(invalid(
                    format!("{field}.hosts"),
                    format!("1 to {HOSTS_PER_REGION_MAX}"),
                ));
            }
            if r.ip_pool == 0 || r.ip_pool > IP_POOL_MAX {
                return Err(invalid(
                    format!("{field}.ip_pool"),
                    format!("1 to {IP_POOL_MAX}"),
                ));
            }
            let needed = u128::from(r.ip_pool) + u128::from(r.non_workload_ips) + 64;
            let size = match r.cidr {
                IpNet::V4(n) => 1u128 << (32 - n.prefix_len()),
                IpNet::V6(n) => 1u128 << (128 - n.prefix_len()).min(100),
            };
            if needed > size {
                return Err(invalid(
                    format!("{field}.cidr"),
                    "too small for ip_pool plus non_workload_ips plus 64",
                ));
            }
        }
        if self.workloads.is_empty() {
            return Err(invalid("workloads", "at least one workload"));
        }
        for (i, w) in self.workloads.iter().enumerate() {
            let field = format!("workloads[{i}]");
            if w.name.is_empty() || w.name.len() > 200 {
                return Err(invalid(format!("{field}.name"), "1 to 200 bytes"));
            }
            if !self.regions.iter().any(|r| r.name == w.region) {
                return Err(invalid(
                    format!("{field}.region"),
                    format!("unknown region {}", w.region),
                ));
            }
            if w.count == 0 || w.instances == 0 {
                return Err(invalid(field, "count and instances must be at least 1"));
            }
            ordered(
                &format!("{field}.lifetime_s_*"),
                w.lifetime_s_min,
                w.lifetime_s_max,
            )?;
        }
        for (i, call) in self.calls.iter().enumerate() {
            let field = format!("calls[{i}]");
            if !self.workloads.iter().any(|w| w.name == call.from) {
                return Err(invalid(
                    format!("{field}.from"),
                    format!("unknown workload {}", call.from),
                ));
            }
            for to in &call.to {
                if !self.workloads.iter().any(|w| &w.name == to) {
                    return Err(invalid(
                        format!("{field}.to"),
                        format!("unknown workload {to}"),
                    ));
                }
            }
            if !(call.flows_per_s.is_finite() && call.flows_per_s >= 0.0) {
                return Err(invalid(
                    format!("{field}.flows_per_s"),
                    "a finite rate >= 0",
                ));
            }
            if call.flow_ms_max == 0 {
                return Err(invalid(format!("{field}.flow_ms_max"), "at least 1"));
            }
            share(&format!("{field}.external_share"), call.external_share)?;
            share(
                &format!("{field}.non_workload_share"),
                call.non_workload_share,
            )?;
            if call.external_share + call.non_workload_share > 1.0 {
                return Err(invalid(field, "external plus non-workload shares above 1"));
            }
            if call.to.is_empty() && call.external_share + call.non_workload_share < 1.0 {
                return Err(invalid(
                    format!("{field}.to"),
                    "empty, but external and non-workload shares leave flows for workloads",
                ));
            }
        }
        let d = &self.disk;
        ordered("disk.fsync_ms_*", d.fsync_ms_min, d.fsync_ms_max)?;
        if d.fsync_ms_max > FSYNC_MS_MAX {
            return Err(invalid(
                "disk.fsync_ms_max",
                format!("at most {FSYNC_MS_MAX}"),
            ));
        }
        let f = &self.faults;
        if let Some(unknown) = f.kinds.iter().find(|k| {
            !crate::fault::FaultKind::ALL
                .iter()
                .any(|known| known.as_str() == k.as_str())
        }) {
            return Err(invalid(
                "faults.kinds",
                format!(
                    "unknown kind {unknown:?}; known: {}",
                    crate::fault::FaultKind::ALL.map(|k| k.as_str()).join(", ")
                ),
            ));
        }
        share("faults.kind_probability", f.kind_probability)?;
        share("faults.loss", f.loss)?;
        ordered("faults.duration_s_*", f.duration_s_min, f.duration_s_max)?;
        if f.enabled && f.duration_s_max > run.fault_phase_s {
            return Err(invalid(
                "faults.duration_s_max",
                "longer than run.fault_phase_s",
            ));
        }
        share(
            "checks.unattributed_share_max",
            self.checks.unattributed_share_max,
        )?;
        Ok(())
    }
}

/// The `index`-th address of `prefix`.
pub fn ip_in(prefix: &IpNet, index: u64) -> IpAddr {
    match prefix {
        IpNet::V4(net) => IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from(net.network()).wrapping_add(index as u32),
        )),
        IpNet::V6(net) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(net.network()).wrapping_add(u128::from(index)),
        )),
    }
}
