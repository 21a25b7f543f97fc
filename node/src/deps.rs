//! The dependency graph: workload → workload edges with flow and byte counts, from the
//! flows this node attributed, in per-minute buckets so that a time range can be asked.

use std::collections::BTreeMap;
use std::sync::Arc;

use tenure_gossip::wire::Direction;

use crate::core::EmittedFlow;

/// Bucket width, in ms.
pub const BUCKET_MS: u64 = 60_000;
/// Buckets kept (one day of minutes); older ones are dropped.
pub const BUCKETS_MAX: usize = 1_440;
/// Distinct edges per bucket; past it further edges are counted as dropped.
pub const EDGES_PER_BUCKET_MAX: usize = 100_000;

/// Flows and bytes of one edge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EdgeTotals {
    pub flows: u64,
    pub bytes: u64,
}

/// Edges of one bucket: (caller, callee) → totals.
type Edges = BTreeMap<(Arc<str>, Arc<str>), EdgeTotals>;

/// The graph. Edges are (caller, callee) workload names; an external callee is
/// `"external"`.
#[derive(Debug, Default)]
pub struct Dependencies {
    buckets: BTreeMap<u64, Edges>,
    edges_dropped: u64,
}

impl Dependencies {
    /// Records an emitted flow; unattributed flows make no edge.
    pub fn record(&mut self, flow: &EmittedFlow) {
        let remote: Arc<str> = match flow.remote_workload() {
            Some(w) => w.clone(),
            None if flow.is_external() => Arc::from("external"),
            None => return,
        };
        let local = flow.record.local_workload.clone();
        let (from, to) = match flow.record.direction {
            Direction::Outbound => (local, remote),
            Direction::Inbound => (remote, local),
        };
        let bucket = flow.record.start_ms / BUCKET_MS;
        let edges = self.buckets.entry(bucket).or_default();
        let key = (from, to);
        if !edges.contains_key(&key) && edges.len() >= EDGES_PER_BUCKET_MAX {
            self.edges_dropped += 1;
            return;
        }
        let totals = edges.entry(key).or_default();
        totals.flows += 1;
        totals.bytes += flow.record.bytes_sent + flow.record.bytes_received;
        while self.buckets.len() > BUCKETS_MAX {
            self.buckets.pop_first();
        }
    }

    /// Edges of flows that started in `[since_ms, until_ms]` (to minute granularity),
    /// sorted by caller then callee.
    pub fn edges(&self, since_ms: u64, until_ms: u64) -> Vec<(Arc<str>, Arc<str>, EdgeTotals)> {
        let mut total: BTreeMap<(Arc<str>, Arc<str>), EdgeTotals> = BTreeMap::new();
        for (_, edges) in self
            .buckets
            .range(since_ms / BUCKET_MS..=until_ms / BUCKET_MS)
        {
            for (key, t) in edges {
                let e = total.entry(key.clone()).or_default();
                e.flows += t.flows;
                e.bytes += t.bytes;
            }
        }
        total.into_iter().map(|((a, b), t)| (a, b, t)).collect()
    }

    pub fn edges_dropped(&self) -> u64 {
        self.edges_dropped
    }
}
