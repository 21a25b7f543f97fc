//! The dependency graph: caller → callee edges with flow and byte counts, from the flows
//! this node emitted, in per-minute buckets so that a time range can be asked.
//!
//! Unattributed flows make edges too, to or from the pseudo-end [`End::Unattributed`]
//! (the exporter's side is always known), so that users see how much of a workload's
//! traffic is unknown instead of a graph that silently leaves it out.

use std::collections::BTreeMap;
use std::sync::Arc;

use tenure_attribution::Reason;
use tenure_gossip::wire::Direction;

use crate::core::EmittedFlow;

/// Bucket width, in ms.
pub const BUCKET_MS: u64 = 60_000;
/// Buckets kept (one day of minutes); older ones are dropped.
pub const BUCKETS_MAX: usize = 1_440;
/// Distinct edges per bucket; past it further edges are counted as dropped.
pub const EDGES_PER_BUCKET_MAX: usize = 100_000;

/// One end of an edge.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    /// A workload, by name.
    Workload(Arc<str>),
    /// An address outside every region's prefixes.
    External,
    /// The remote side of a flow that went out unattributed.
    Unattributed,
}

impl End {
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

/// Flows and bytes of one edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeTotals {
    pub flows: u64,
    pub bytes: u64,
    /// Of `flows`, those that went out unattributed, by reason.
    pub unattributed: ReasonCounts,
}

impl EdgeTotals {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &EdgeTotals) {
        self.flows += other.flows;
        self.bytes += other.bytes;
        for (a, b) in self.unattributed.iter_mut().zip(other.unattributed) {
            *a += b;
        }
    }

    /// Unattributed flows of every reason.
    pub fn unattributed_flows(&self) -> u64 {
        self.unattributed.iter().sum()
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
    }
}

/// Edges of one bucket: (caller, callee) → totals. A hash map: every emitted flow lands
/// here, and comparing names down a tree cost more than the rest of recording (profiled
/// under `tenure loadgen`); [`Dependencies::edges`] sorts what it returns, so the map's
/// order never reaches output. Its keys are workload names exporters send, so its seed is
/// the collector's, drawn from the OS.
type Edges = hashbrown::HashMap<(End, End), EdgeTotals, foldhash::fast::FixedState>;

/// The graph.
#[derive(Debug)]
pub struct Dependencies {
    buckets: BTreeMap<u64, Edges>,
    edges_dropped: u64,
    hash_seed: u64,
}

impl Dependencies {
    /// An empty graph whose edge tables are seeded with `hash_seed`.
    pub fn new(hash_seed: u64) -> Dependencies {
        Dependencies {
            buckets: BTreeMap::new(),
            edges_dropped: 0,
            hash_seed,
        }
    }

    /// Records an emitted flow.
    pub fn record(&mut self, flow: &EmittedFlow) {
        let mut totals = EdgeTotals {
            flows: 1,
            bytes: flow.record.bytes_sent + flow.record.bytes_received,
            unattributed: [0; Reason::ALL.len()],
        };
        let remote = match (flow.remote_workload(), flow.reason()) {
            (Some(w), _) => End::Workload(w.clone()),
            (None, Some(reason)) => {
                totals.unattributed[reason_index(reason)] = 1;
                End::Unattributed
            }
            (None, None) if flow.is_external() => End::External,
            // An attribution without a workload that is not external does not exist today;
            // should one appear, it is counted as unknown rather than dropped.
            (None, None) => End::Unattributed,
        };
        let local = End::Workload(flow.record.local_workload.clone());
        let key = match flow.record.direction {
            Direction::Outbound => (local, remote),
            Direction::Inbound => (remote, local),
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
                if workload.is_some() && !touches(&key.0) && !touches(&key.1) {
                    continue;
                }
                total.entry(key.clone()).or_default().add(t);
            }
        }
        total.into_iter().map(|((a, b), t)| (a, b, t)).collect()
    }

    pub fn edges_dropped(&self) -> u64 {
        self.edges_dropped
    }
}
