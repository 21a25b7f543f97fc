//! `tenure-chaos`: a real cluster of `tenure collector` processes, a synthetic fleet of
//! in-process exporters whose ground truth is recorded, and faults injected while traffic
//! flows: `kill -9` and a restart on the same data directory, SIGSTOP/SIGCONT, clock skew
//! and jumps (the collectors' admin-set clock offset, `POST /admin/clock`), and (as root,
//! with `nft`) a partition of a node and packet loss on its gossip port.
//!
//! Afterwards the history is checked: every flow acknowledged to an exporter is emitted at
//! least once (read from every collector's NDJSON sink files), nothing emitted was never
//! sent, no flow is attributed to a workload other than the one owning its remote IP,
//! duplicates are counted, membership converges after each fault and the unattributed
//! share of the calm phase after the faults stays under its bound.
//!
//! Traffic stays on loopback: fleet IPs (10.x) are data inside records, never dialled.

pub mod cluster;
pub mod fleet;
pub mod net;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

pub use cluster::{Cluster, NodeSpec};
pub use fleet::{Fleet, History};

/// The unattributed share of flows in the calm phase above which the run fails.
pub const UNATTRIBUTED_SHARE_MAX: f64 = 0.05;
/// How long the cluster may take to converge after a fault heals.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long acknowledged flows may take to reach the sinks after traffic stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// δ, the collectors' `skew_margin_ms`: clock faults within it are skew, beyond it jumps.
pub const SKEW_MARGIN_MS: u64 = 200;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `tenure` binary.
    pub tenure_bin: PathBuf,
    /// Where configs, data directories and sinks go (created).
    pub dir: PathBuf,
    /// Seeds the fleet's traffic and the fault schedule.
    pub seed: u64,
    /// Total time of the fault phase; at least one round of every fault kind runs.
    pub duration_secs: u64,
    pub regions: usize,
    pub nodes_per_region: usize,
    pub exporters_per_region: usize,
    /// Run every collector in a network namespace of its own (root); when they cannot be
    /// made, or when false, collectors share loopback.
    pub namespaces: bool,
}

/// A fault the supervisor injects.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// `kill -9`, then a restart on the same data directory after `down_ms`.
    Kill { node: usize, down_ms: u64 },
    /// SIGSTOP, then SIGCONT after `for_ms`.
    Pause { node: usize, for_ms: u64 },
    /// Gossip cut both ways and inbound data refused, for `for_ms` (needs root and nft).
    Partition { node: usize, for_ms: u64 },
    /// Random loss of `percent` of the gossip datagrams to and from a node (root, nft).
    Loss {
        node: usize,
        percent: u8,
        for_ms: u64,
    },
    /// The node's clock set `offset_ms` off (within δ: skew; beyond: a jump forward or
    /// back), then set right again after `for_ms`.
    Clock {
        node: usize,
        offset_ms: i64,
        for_ms: u64,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { node, down_ms } => write!(f, "kill -9 node {node}, down {down_ms} ms"),
            Fault::Pause { node, for_ms } => write!(f, "SIGSTOP node {node} for {for_ms} ms"),
            Fault::Partition { node, for_ms } => {
                write!(f, "partition node {node} for {for_ms} ms")
            }
            Fault::Loss {
                node,
                percent,
                for_ms,
            } => write!(f, "{percent}% gossip loss at node {node} for {for_ms} ms"),
            Fault::Clock {
                node,
                offset_ms,
                for_ms,
            } => write!(
                f,
                "clock of node {node} off by {offset_ms:+} ms for {for_ms} ms"
            ),
        }
    }
}

/// The outcome, printed as one `RESULT` line.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub nodes: usize,
    pub faults: usize,
    pub sent: usize,
    pub acked: usize,
    pub emitted: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub misattributed: usize,
    pub phantom: usize,
    pub unattributed_share: f64,
    pub max_recovery_s: f64,
    pub skipped: Vec<String>,
    /// The faults injected, in order, as printed while they ran.
    pub schedule: Vec<String>,
    /// Up to [`LOST_IDS_SHOWN`] acknowledged flows that no sink holds.
    pub lost_ids: Vec<String>,
}

/// How many lost flow ids a report keeps.
pub const LOST_IDS_SHOWN: usize = 20;

impl Report {
    /// What to read when a run failed: the result, the lost flows, the fault schedule.
    pub fn details(&self) -> String {
        let mut text = format!(
            "{self}\nlost flows (first {LOST_IDS_SHOWN}): {:?}\nfault schedule:\n",
            self.lost_ids
        );
        for fault in &self.schedule {
            text.push_str("  ");
            text.push_str(fault);
            text.push('\n');
        }
        text
    }
}

impl Report {
    /// Whether the contract held.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.misattributed == 0
            && self.phantom == 0
            && self.unattributed_share <= UNATTRIBUTED_SHARE_MAX
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RESULT nodes={} faults={} acked={} emitted={} lost={} duplicates={} misattributed={} unattributed_share={:.4} max_recovery_s={:.1}",
            self.nodes,
            self.faults,
            self.acked,
            self.emitted,
            self.lost,
            self.duplicates,
            self.misattributed,
            self.unattributed_share,
            self.max_recovery_s
        )
    }
}

/// splitmix64: the schedule's only randomness, from one seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The fault schedule: one of each kind first (the short scenario), then random ones
/// until `duration_secs` is used.
pub fn schedule(options: &Options, nodes: usize, rng: &mut Rng) -> Vec<Fault> {
    let pick = |rng: &mut Rng| usize::try_from(rng.below(nodes as u64)).unwrap_or(0);
    let mut faults = vec![
        Fault::Kill {
            node: 1,
            down_ms: 2_000,
        },
        Fault::Partition {
            node: nodes - 1,
            for_ms: 6_000,
        },
        Fault::Pause {
            node: nodes / 2 + 1,
            for_ms: 4_000,
        },
        // Back by far more than δ and than the claims' tolerated skew: the node refuses
        // its exporters' claims as future ones and holds flows past their deadline.
        Fault::Clock {
            node: 0,
            offset_ms: -30_000,
            for_ms: 3_000,
        },
        // Forward by more than the pending deadline: flows waiting there time out at once.
        Fault::Clock {
            node: nodes / 2,
            offset_ms: 20_000,
            for_ms: 3_000,
        },
    ];
    // Each fault takes about its length plus ~10 s to converge.
    let mut budget_ms = options.duration_secs.saturating_mul(1_000);
    budget_ms = budget_ms.saturating_sub(2_000 + 6_000 + 4_000 + 3_000 + 3_000 + 30_000);
    // Random jumps alternate between forward and back.
    let mut forward = true;
    while budget_ms > 15_000 {
        let node = pick(rng);
        let len = 2_000 + rng.below(6_000);
        let fault = match rng.below(6) {
            0 => Fault::Kill { node, down_ms: len },
            1 => Fault::Pause { node, for_ms: len },
            2 => Fault::Partition { node, for_ms: len },
            3 => Fault::Loss {
                node,
                percent: 30,
                for_ms: len,
            },
            // Skew within δ: nothing may change.
            4 => Fault::Clock {
                node,
                offset_ms: signed(rng, SKEW_MARGIN_MS / 2),
                for_ms: len,
            },
            // A jump beyond δ, forward or back, by up to two minutes.
            _ => {
                let sign = if forward { 1 } else { -1 };
                forward = !forward;
                let magnitude = SKEW_MARGIN_MS * 5 + rng.below(120_000);
                Fault::Clock {
                    node,
                    offset_ms: sign * i64::try_from(magnitude).unwrap_or(0),
                    for_ms: len,
                }
            }
        };
        faults.push(fault);
        budget_ms = budget_ms.saturating_sub(len + 10_000);
    }
    faults
}

/// A uniform draw in `-max..=max`.
fn signed(rng: &mut Rng, max: u64) -> i64 {
    let draw = i64::try_from(rng.below(2 * max + 1)).unwrap_or(0);
    draw - i64::try_from(max).unwrap_or(0)
}

/// Runs the whole scenario: cluster up, traffic, faults, calm phase, drain, checks.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    let mut rng = Rng::new(options.seed);
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let mut cluster = Cluster::start(options).await?;
    let nodes = cluster.len();
    eprintln!("chaos: {nodes} collectors up and converged");
    let fleet = Arc::new(Fleet::new(options, &cluster, options.seed));
    let traffic = fleet.clone().start();

    // Warm up: flows attributed before any fault.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let faults = schedule(options, nodes, &mut rng);
    let mut report = Report {
        nodes,
        ..Report::default()
    };
    for fault in &faults {
        eprintln!("chaos: {fault}");
        report.schedule.push(fault.to_string());
        let healed = match *fault {
            Fault::Kill { node, down_ms } => {
                cluster.kill9(node)?;
                fleet.set_down(cluster.addrs());
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                cluster.restart(node).await?;
                fleet.set_down(cluster.addrs());
                Instant::now()
            }
            Fault::Pause { node, for_ms } => {
                cluster.signal(node, "STOP")?;
                tokio::time::sleep(Duration::from_millis(for_ms)).await;
                cluster.signal(node, "CONT")?;
                Instant::now()
            }
            Fault::Clock {
                node,
                offset_ms,
                for_ms,
            } => {
                cluster.set_clock_offset(node, offset_ms).await?;
                tokio::time::sleep(Duration::from_millis(for_ms)).await;
                cluster.set_clock_offset(node, 0).await?;
                Instant::now()
            }
            Fault::Partition { node, for_ms } | Fault::Loss { node, for_ms, .. } => {
                let percent = match *fault {
                    Fault::Loss { percent, .. } => percent,
                    Fault::Partition { .. }
                    | Fault::Kill { .. }
                    | Fault::Pause { .. }
                    | Fault::Clock { .. } => 100,
                };
                match cluster.cut(node, percent) {
                    Ok(()) => {
                        tokio::time::sleep(Duration::from_millis(for_ms)).await;
                        cluster.heal(node)?;
                    }
                    Err(e) => {
                        let why = format!("{fault}: skipped ({e})");
                        eprintln!("chaos: {why}");
                        report.skipped.push(why);
                        continue;
                    }
                }
                Instant::now()
            }
        };
        report.faults += 1;
        cluster.wait_converged(CONVERGE_TIMEOUT).await?;
        let recovery = healed.elapsed().as_secs_f64();
        eprintln!("chaos: converged {recovery:.1} s after the fault healed");
        report.max_recovery_s = report.max_recovery_s.max(recovery);
    }

    // Calm: the unattributed share must come back under its bound once faults heal.
    // Wait one pending deadline first, so that calm flows meet converged rings.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calm_from_ms = fleet::now_ms();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let calm_until_ms = fleet::now_ms();
    let history = fleet.stop(traffic).await;

    // Drain: every acknowledged flow reaches a sink, or the deadline says it is lost.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let emitted = loop {
        let emitted = cluster.read_sinks();
        let missing = history
            .acked
            .iter()
            .filter(|id| !emitted.contains_key(*id))
            .count();
        if missing == 0 || Instant::now() > deadline {
            break emitted;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    check(&history, &emitted, calm_from_ms, calm_until_ms, &mut report);
    cluster.stop_all();
    Ok(report)
}

/// One sink line, reduced to what the checks need.
#[derive(Clone, Debug)]
pub struct Emitted {
    /// The collector whose sink holds the line.
    pub node: usize,
    pub attributed_to: Option<String>,
    pub source: Option<String>,
    pub unattributed: bool,
}

/// Compares the history with what the sinks hold.
pub fn check(
    history: &History,
    emitted: &BTreeMap<u128, Vec<Emitted>>,
    calm_from_ms: u64,
    calm_until_ms: u64,
    report: &mut Report,
) {
    report.sent = history.sent.len();
    report.acked = history.acked.len();
    report.emitted = emitted.len();
    report.lost = history
        .acked
        .iter()
        .filter(|id| !emitted.contains_key(*id))
        .count();
    let mut phantom = BTreeSet::new();
    let (mut calm, mut calm_unattributed) = (0usize, 0usize);
    // Flows to roaming IPs: emitted, attributed, and with no owner for their whole window.
    let (mut roaming, mut roaming_attributed, mut roaming_ownerless) = (0usize, 0usize, 0usize);
    // Duplicates written by one node (a replay, a batch taken twice) or by several.
    let (mut dup_same_node, mut dup_across_nodes) = (0usize, 0usize);
    for (id, lines) in emitted {
        report.duplicates += lines.len().saturating_sub(1);
        let nodes: BTreeSet<usize> = lines.iter().map(|l| l.node).collect();
        dup_same_node += lines.len() - nodes.len();
        dup_across_nodes += nodes.len().saturating_sub(1);
        let Some(truth) = history.sent.get(id) else {
            phantom.insert(*id);
            continue;
        };
        for line in lines {
            if line.source.as_deref() == Some("heartbeat")
                && line.attributed_to.as_deref() != truth.remote_workload.as_deref()
            {
                report.misattributed += 1;
                eprintln!(
                    "chaos: flow {id:032x} to {} attributed to {:?}, owner {:?}",
                    truth.remote_ip, line.attributed_to, truth.remote_workload
                );
            }
        }
        if truth.roaming {
            roaming += 1;
            roaming_ownerless += usize::from(truth.remote_workload.is_none());
            roaming_attributed += usize::from(lines.iter().any(|l| !l.unattributed));
        }
        // Flows near a handover may rightly stay unattributed: the share counts the rest.
        if truth.attributable && (calm_from_ms..calm_until_ms).contains(&truth.start_ms) {
            calm += 1;
            if lines.iter().all(|l| l.unattributed) {
                calm_unattributed += 1;
            }
        }
    }
    report.phantom = phantom.len();
    eprintln!(
        "chaos: duplicates: {dup_same_node} written again by the same node, {dup_across_nodes} by another node"
    );
    eprintln!(
        "chaos: {roaming} flows to roaming IPs, {roaming_attributed} attributed, {roaming_ownerless} with no single owner over their window (must not be attributed)"
    );
    report.unattributed_share = if calm == 0 {
        1.0
    } else {
        calm_unattributed as f64 / calm as f64
    };
    if report.lost > 0 {
        report.lost_ids = history
            .acked
            .iter()
            .filter(|id| !emitted.contains_key(*id))
            .take(LOST_IDS_SHOWN)
            .map(|id| format!("{id:032x}"))
            .collect();
        eprintln!("chaos: lost flows, e.g. {:?}", report.lost_ids);
    }
}
