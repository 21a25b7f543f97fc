//! The dependency graph: caller → callee edges with flow and byte counts, from the flows
//! this node emitted, in per-minute buckets so that a time range can be asked.
//!
//! Unattributed flows make edges too, to or from the pseudo-end [`End::Unattributed`], so
//! that users see how much of a workload's traffic is unknown instead of a graph that
//! silently leaves it out. That holds for either end: a flow whose local end the exporter
//! vouched for no workload on is an edge of `unattributed`, never of the IP's current owner.
//!
//! A connection counts once even when both of its ends run exporters and report it: the
//! client's record counts, and an inbound record (the server's) counts only when its remote
//! end was attributed otherwise than by heartbeat. Heartbeats come only from exporters,
//! and an exporter reports every TCP socket of its host, so a client attributed by
//! heartbeat reports the same connection as its own outbound record. A server's record
//! whose client is external, known by an IP event, or unattributed is the only record of
//! that connection the graph can count, and it counts. Per-flow sink lines are not
//! affected: each socket still has its own line.
//!
//! TCP health per edge: retransmitted segments summed, and the smoothed RTT of the flows
//! that had a sample (`rtt_us > 0`) as minimum, maximum and mean (sum and count kept, so
//! buckets and nodes merge exactly); four numbers per edge and bucket, whatever the
//! traffic. The RTT is the reporting end's: the client's, for a connection counted once.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tenure_attribution::{Attribution, Reason, Verdict};
use tenure_gossip::wire::{Direction, LocalReason};

use crate::core::{EmittedFlow, Local};

/// Bucket width, in ms.
pub const BUCKET_MS: u64 = 60_000;
/// Buckets kept (one day of minutes); older ones are dropped.
pub const BUCKETS_MAX: usize = 1_440;
/// Distinct edges per bucket; past it further edges are counted as dropped.
pub const EDGES_PER_BUCKET_MAX: usize = 100_000;

/// One end of an edge.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum End {
    /// A workload, by name.
    Workload(Arc<str>),
    /// An address outside every region's prefixes.
    External,
    /// A side of a flow that went out unattributed (the remote end by the collectors'
    /// ranges, or the local end by the exporter's history).
    Unattributed,
}

/// Hashed as its [`EndRef`], so that an edge is found by borrowed ends.
impl Hash for End {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.borrowed().hash(state);
    }
}

/// An [`End`] borrowed: what recording a flow looks its edge up with. Cloning the two
/// names' `Arc`s for every flow, only to drop them again when the edge exists (nearly
/// always), cost four atomic operations per flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum EndRef<'a> {
    Workload(&'a Arc<str>),
    External,
    Unattributed,
}

impl EndRef<'_> {
    fn into_end(self) -> End {
        match self {
            EndRef::Workload(w) => End::Workload(w.clone()),
            EndRef::External => End::External,
            EndRef::Unattributed => End::Unattributed,
        }
    }
}

/// An edge: caller and callee.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EdgeKey {
    from: End,
    to: End,
}

/// An [`EdgeKey`] borrowed; hashes as it does (same fields, in the same order).
#[derive(Hash)]
struct EdgeRef<'a> {
    from: EndRef<'a>,
    to: EndRef<'a>,
}

impl hashbrown::Equivalent<EdgeKey> for EdgeRef<'_> {
    fn equivalent(&self, key: &EdgeKey) -> bool {
        self.from == key.from.borrowed() && self.to == key.to.borrowed()
    }
}

impl End {
    fn borrowed(&self) -> EndRef<'_> {
        match self {
            End::Workload(w) => EndRef::Workload(w),
            End::External => EndRef::External,
            End::Unattributed => EndRef::Unattributed,
        }
    }

    /// The name shown for this end: the workload's name, `external` or `unattributed`.
    pub fn name(&self) -> &str {
        match self {
            End::Workload(w) => w,
            End::External => "external",
            End::Unattributed => "unattributed",
        }
    }

    /// `workload`, `external` or `unattributed`; tells a workload named like a pseudo-end
    /// apart from it.
    pub fn kind(&self) -> &'static str {
        match self {
            End::Workload(_) => "workload",
            End::External => "external",
            End::Unattributed => "unattributed",
        }
    }

    /// The end of `name` and `kind` as [`End::name`] and [`End::kind`] give them.
    pub fn from_parts(name: &str, kind: &str) -> Option<End> {
        match kind {
            "workload" => Some(End::Workload(Arc::from(name))),
            "external" => Some(End::External),
            "unattributed" => Some(End::Unattributed),
            _ => None,
        }
    }
}

/// Unattributed flows by reason, indexed as [`Reason::ALL`].
pub type ReasonCounts = [u64; Reason::ALL.len()];

/// Smoothed RTTs of some flows: how many had a sample, their sum, minimum and maximum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RttStats {
    /// Flows with an RTT sample; the other fields are 0 while this is.
    pub samples: u64,
    pub sum_us: u64,
    pub min_us: u32,
    pub max_us: u32,
}

impl RttStats {
    /// The statistics of one flow's RTT; none for 0 (no sample).
    pub fn of(rtt_us: u32) -> RttStats {
        if rtt_us == 0 {
            return RttStats::default();
        }
        RttStats {
            samples: 1,
            sum_us: u64::from(rtt_us),
            min_us: rtt_us,
            max_us: rtt_us,
        }
    }

    /// Merges `other` into `self`.
    pub fn add(&mut self, other: &RttStats) {
        if other.samples == 0 {
            return;
        }
        if self.samples == 0 {
            *self = *other;
            return;
        }
        self.samples += other.samples;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The mean RTT in µs, rounded down; `None` without samples.
    pub fn mean_us(&self) -> Option<u64> {
        self.sum_us.checked_div(self.samples)
    }
}

/// Flows, bytes and TCP health of one edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeTotals {
    pub flows: u64,
    pub bytes: u64,
    /// Of `flows`, those that went out unattributed, by reason.
    pub unattributed: ReasonCounts,
    /// Segments retransmitted by the reporting ends.
    pub retransmits: u64,
    /// Smoothed RTTs reported by the ends.
    pub rtt: RttStats,
    /// Of `flows`, those whose local end the exporter vouched for no workload on, by
    /// reason (indexed as [`LocalReason::ALL`]).
    pub local_unattributed: LocalReasonCounts,
}

impl EdgeTotals {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &EdgeTotals) {
        self.flows += other.flows;
        self.bytes += other.bytes;
        for (a, b) in self.unattributed.iter_mut().zip(other.unattributed) {
            *a += b;
        }
        self.retransmits += other.retransmits;
        self.rtt.add(&other.rtt);
        for (a, b) in self
            .local_unattributed
            .iter_mut()
            .zip(other.local_unattributed)
        {
            *a += b;
        }
    }

    /// Unattributed flows of every reason.
    pub fn unattributed_flows(&self) -> u64 {
        self.unattributed.iter().sum()
    }
}

/// Flows whose local end is unattributed, by reason, indexed as [`LocalReason::ALL`].
pub type LocalReasonCounts = [u64; LocalReason::ALL.len()];

/// The position of `reason` in [`LocalReasonCounts`].
pub fn local_reason_index(reason: LocalReason) -> usize {
    match reason {
        LocalReason::Changed => 0,
        LocalReason::Unknown => 1,
        LocalReason::Expired => 2,
    }
}

/// The position of `reason` in [`ReasonCounts`].
pub fn reason_index(reason: Reason) -> usize {
    match reason {
        Reason::NoOwner => 0,
        Reason::Ambiguous => 1,
        Reason::Conflict => 2,
        Reason::Expired => 3,
        Reason::Overload => 4,
        Reason::RegionUnreachable => 5,
        Reason::ExporterClock => 6,
    }
}

/// Edges of one bucket: (caller, callee) → totals. A hash map: every emitted flow lands
/// here, and comparing names down a tree cost more than the rest of recording (profiled
/// under `tenure loadgen`); [`Dependencies::edges`] sorts what it returns, so the map's
/// order never reaches output. Its keys are workload names exporters send, so its seed is
/// the collector's, drawn from the OS.
type Edges = hashbrown::HashMap<EdgeKey, EdgeTotals, foldhash::fast::FixedState>;

/// The graph.
#[derive(Debug)]
pub struct Dependencies {
    buckets: BTreeMap<u64, Edges>,
    edges_dropped: u64,
    server_ends_skipped: u64,
    hash_seed: u64,
}

impl Dependencies {
    /// An empty graph whose edge tables are seeded with `hash_seed`.
    pub fn new(hash_seed: u64) -> Dependencies {
        Dependencies {
            buckets: BTreeMap::new(),
            edges_dropped: 0,
            server_ends_skipped: 0,
            hash_seed,
        }
    }

    /// Records an emitted flow, unless it is the server's record of a connection whose
    /// client reports it too (see the module documentation).
    pub fn record(&mut self, flow: &EmittedFlow) {
        if flow.record.direction == Direction::Inbound
            && matches!(flow.verdict, Verdict::Attributed(Attribution::Heartbeat(_)))
        {
            self.server_ends_skipped += 1;
            return;
        }
        let mut totals = EdgeTotals {
            flows: 1,
            bytes: flow.record.bytes_sent + flow.record.bytes_received,
            unattributed: [0; Reason::ALL.len()],
            retransmits: flow.record.retransmits,
            rtt: RttStats::of(flow.record.rtt_us),
            local_unattributed: [0; LocalReason::ALL.len()],
        };
        let remote = match (flow.remote_workload(), flow.reason()) {
            (Some(w), _) => EndRef::Workload(w),
            (None, Some(reason)) => {
                totals.unattributed[reason_index(reason)] = 1;
                EndRef::Unattributed
            }
            (None, None) if flow.is_external() => EndRef::External,
            // An attribution without a workload that is not external does not exist today;
            // should one appear, it is counted as unknown rather than dropped.
            (None, None) => EndRef::Unattributed,
        };
        // A local end the exporter vouched for no workload on is no edge from a workload.
        let local = match &flow.record.local {
            Local::Workload(w) => EndRef::Workload(w),
            Local::Unattributed(reason) => {
                totals.local_unattributed[local_reason_index(*reason)] = 1;
                EndRef::Unattributed
            }
        };
        let key = match flow.record.direction {
            Direction::Outbound => EdgeRef {
                from: local,
                to: remote,
            },
            Direction::Inbound => EdgeRef {
                from: remote,
                to: local,
            },
        };
        let bucket = flow.record.start_ms / BUCKET_MS;
        let edges = self.buckets.entry(bucket).or_insert_with(|| {
            Edges::with_hasher(foldhash::fast::FixedState::with_seed(self.hash_seed))
        });
        if let Some(edge) = edges.get_mut(&key) {
            edge.add(&totals);
        } else if edges.len() >= EDGES_PER_BUCKET_MAX {
            self.edges_dropped += 1;
            return;
        } else {
            let key = EdgeKey {
                from: key.from.into_end(),
                to: key.to.into_end(),
            };
            edges.insert(key, totals);
        }
        while self.buckets.len() > BUCKETS_MAX {
            self.buckets.pop_first();
        }
    }

    /// Edges of flows that started in `[since_ms, until_ms]` (to minute granularity),
    /// sorted by caller then callee; with `workload`, only the edges that touch it.
    pub fn edges(
        &self,
        since_ms: u64,
        until_ms: u64,
        workload: Option<&str>,
    ) -> Vec<(End, End, EdgeTotals)> {
        let touches = |e: &End| matches!(e, End::Workload(w) if Some(&**w) == workload);
        let mut total: BTreeMap<(End, End), EdgeTotals> = BTreeMap::new();
        if until_ms < since_ms {
            return Vec::new();
        }
        for (_, edges) in self
            .buckets
            .range(since_ms / BUCKET_MS..=until_ms / BUCKET_MS)
        {
            for (key, t) in edges {
                if workload.is_some() && !touches(&key.from) && !touches(&key.to) {
                    continue;
                }
                total
                    .entry((key.from.clone(), key.to.clone()))
                    .or_default()
                    .add(t);
            }
        }
        total.into_iter().map(|((a, b), t)| (a, b, t)).collect()
    }

    pub fn edges_dropped(&self) -> u64 {
        self.edges_dropped
    }

    /// Inbound records left out because the connection's client reports it.
    pub fn server_ends_skipped(&self) -> u64 {
        self.server_ends_skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenure_attribution::{Attribution, Verdict};

    fn flow(local: &str, direction: Direction, verdict: Verdict) -> EmittedFlow {
        EmittedFlow {
            record: crate::core::FlowRecord {
                flow_id: 1,
                local_ip: "10.1.2.3".parse().unwrap(),
                local_port: 40_000,
                remote_ip: "10.1.9.9".parse().unwrap(),
                remote_port: 443,
                local: crate::core::Local::Workload(Arc::from(local)),
                start_ms: 1_700_000_000_000,
                end_ms: 1_700_000_000_250,
                bytes_sent: 10,
                bytes_received: 5,
                segs_in: 1,
                segs_out: 2,
                retransmits: 0,
                rtt_us: 0,
                direction,
                ongoing: false,
                exporter_id: 7,
                exporter_region: Arc::from("r"),
                hops: 0,
            },
            verdict,
            waited_ms: 0,
            emitted_ms: 1_700_000_001_000,
        }
    }

    fn calls(name: &str) -> Verdict {
        // A new allocation each time: edges are found by the names, not by their `Arc`s.
        Verdict::Attributed(Attribution::Heartbeat(Arc::from(name)))
    }

    /// Flows of one edge land in one entry however their names were allocated, in either
    /// direction; the borrowed lookup hashes exactly as the stored key does.
    #[test]
    fn flows_of_one_edge_share_one_entry() {
        let mut deps = Dependencies::new(42);
        for _ in 0..3 {
            deps.record(&flow("web", Direction::Outbound, calls("db")));
            // Known by an IP event: web runs no exporter, so db's record is the only one.
            deps.record(&flow(
                "db",
                Direction::Inbound,
                Verdict::Attributed(Attribution::Event(Arc::from("web"))),
            ));
            deps.record(&flow(
                "web",
                Direction::Outbound,
                Verdict::Unattributed(Reason::NoOwner),
            ));
            deps.record(&flow(
                "web",
                Direction::Outbound,
                Verdict::Attributed(Attribution::External),
            ));
        }
        let bucket = 1_700_000_000_000 / BUCKET_MS;
        assert_eq!(
            deps.buckets[&bucket].len(),
            3,
            "web→db, web→unattributed, web→external"
        );
        let edges = deps.edges(0, u64::MAX / 2, None);
        let web = End::Workload(Arc::from("web"));
        let db = End::Workload(Arc::from("db"));
        let find = |from: &End, to: &End| {
            edges
                .iter()
                .find(|(a, b, _)| a == from && b == to)
                .map(|(_, _, t)| *t)
        };
        let both_ways = find(&web, &db).expect("web calls db");
        assert_eq!((both_ways.flows, both_ways.bytes), (6, 90));
        let unknown = find(&web, &End::Unattributed).expect("web calls something unknown");
        assert_eq!(unknown.unattributed_flows(), 3);
        assert_eq!(find(&web, &End::External).map(|t| t.flows), Some(3));
    }

    /// Both ends of each connection reported: the client's record counts, the server's
    /// (its client attributed by heartbeat) does not; RTT and retransmits are the client's.
    #[test]
    fn a_connection_reported_by_both_ends_counts_once() {
        let mut deps = Dependencies::new(7);
        for (i, rtt_us) in [(0u64, 300u32), (1, 100), (2, 0), (3, 500)] {
            let mut client = flow("web", Direction::Outbound, calls("db"));
            client.record.rtt_us = rtt_us;
            client.record.retransmits = i;
            let mut server = flow("db", Direction::Inbound, calls("web"));
            server.record.rtt_us = 9_999;
            server.record.retransmits = 1_000;
            deps.record(&client);
            deps.record(&server);
        }
        let edges = deps.edges(0, u64::MAX / 2, None);
        assert_eq!(edges.len(), 1, "{edges:?}");
        let (from, to, t) = &edges[0];
        assert_eq!((from.name(), to.name()), ("web", "db"));
        assert_eq!((t.flows, t.bytes, t.retransmits), (4, 60, 6));
        assert_eq!(
            t.rtt,
            RttStats {
                samples: 3,
                sum_us: 900,
                min_us: 100,
                max_us: 500
            }
        );
        assert_eq!(t.rtt.mean_us(), Some(300));
        assert_eq!(deps.server_ends_skipped(), 4);
    }

    #[test]
    fn rtt_stats_merge_like_one_set() {
        let mut a = RttStats::default();
        a.add(&RttStats::of(0));
        assert_eq!((a, a.mean_us()), (RttStats::default(), None));
        a.add(&RttStats::of(40));
        let mut b = RttStats::of(10);
        b.add(&RttStats::of(70));
        a.add(&b);
        assert_eq!(
            (a.samples, a.min_us, a.max_us, a.mean_us()),
            (3, 10, 70, Some(40))
        );
    }

    /// A flow whose local end the exporter vouched for no workload on is an edge of
    /// `unattributed`, never of a workload, in either direction.
    #[test]
    fn an_unattributed_local_end_is_no_edge_from_a_workload() {
        let mut deps = Dependencies::new(7);
        let mut outbound = flow("web", Direction::Outbound, calls("db"));
        outbound.record.local = Local::Unattributed(LocalReason::Changed);
        // An inbound record from an external client: the only record of its connection.
        let mut inbound = flow(
            "web",
            Direction::Inbound,
            Verdict::Attributed(Attribution::External),
        );
        inbound.record.local = Local::Unattributed(LocalReason::Unknown);
        deps.record(&outbound);
        deps.record(&inbound);
        let edges = deps.edges(0, u64::MAX / 2, None);
        let db = End::Workload(Arc::from("db"));
        assert_eq!(edges.len(), 2, "{edges:?}");
        assert!(edges
            .iter()
            .all(|(a, b, _)| !matches!(a, End::Workload(w) if &**w == "web")
                && !matches!(b, End::Workload(w) if &**w == "web")));
        let out = edges
            .iter()
            .find(|(a, b, _)| *a == End::Unattributed && *b == db)
            .expect("unattributed → db");
        assert_eq!(
            out.2.local_unattributed[local_reason_index(LocalReason::Changed)],
            1
        );
        let back = edges
            .iter()
            .find(|(a, b, _)| *a == End::External && *b == End::Unattributed)
            .expect("external → unattributed");
        assert_eq!(
            back.2.local_unattributed[local_reason_index(LocalReason::Unknown)],
            1
        );
    }
}
