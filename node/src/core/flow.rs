//! Flows as the node carries them between the wire, the engine and the sinks.

use std::net::IpAddr;
use std::sync::Arc;

use tenure_attribution::{Attribution, Reason, Verdict};
use tenure_gossip::wire::{self, Direction, LocalEnd, LocalReason};

/// Who the exporter says held a flow's local end.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Local {
    /// One tenure of this workload covered the whole flow.
    Workload(Arc<str>),
    /// The exporter vouches for no workload, for this reason.
    Unattributed(LocalReason),
}

/// One flow inside a node: the wire's [`wire::Flow`] with its local workload resolved from
/// the batch dictionary, so that it can travel alone (pending queue, forwarding, sinks).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FlowRecord {
    /// Stable across re-sends; duplicates of at-least-once delivery share it.
    pub flow_id: u128,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    /// Who the exporter says the local side is.
    pub local: Local,
    /// Unix ms by the exporter's clock.
    pub start_ms: u64,
    /// Unix ms by the exporter's clock; at least `start_ms`.
    pub end_ms: u64,
    /// Payload bytes the local side sent and the peer acknowledged.
    pub bytes_sent: u64,
    /// Payload bytes the local side received in order.
    pub bytes_received: u64,
    /// Segments received by the local side.
    pub segs_in: u64,
    /// Segments sent by the local side.
    pub segs_out: u64,
    /// Segments the local side retransmitted.
    pub retransmits: u64,
    /// Smoothed RTT at the end (or snapshot), µs; 0 = no sample.
    pub rtt_us: u32,
    pub direction: Direction,
    /// A snapshot of a flow still open (a later one with the same id may follow).
    pub ongoing: bool,
    /// The exporter that reported it.
    pub exporter_id: u64,
    /// The exporter's region.
    pub exporter_region: Arc<str>,
    /// How many collectors forwarded it so far.
    pub hops: u8,
}

impl FlowRecord {
    /// The record of `flow` from a batch whose dictionary is `dictionary` (already
    /// validated by `wire::decode`, so the index is in range; a bad one yields `None`).
    pub fn from_wire(
        flow: &wire::Flow,
        dictionary: &[Arc<str>],
        exporter_id: u64,
        exporter_region: &Arc<str>,
        hops: u8,
    ) -> Option<FlowRecord> {
        let local = match flow.local {
            LocalEnd::Workload(i) => Local::Workload(dictionary.get(i as usize)?.clone()),
            LocalEnd::Unattributed(reason) => Local::Unattributed(reason),
        };
        Some(FlowRecord {
            flow_id: flow.flow_id,
            local_ip: flow.local_ip,
            local_port: flow.local_port,
            remote_ip: flow.remote_ip,
            remote_port: flow.remote_port,
            local,
            start_ms: flow.start_ms,
            end_ms: flow.end_ms.max(flow.start_ms),
            bytes_sent: flow.bytes_sent,
            bytes_received: flow.bytes_received,
            segs_in: flow.segs_in,
            segs_out: flow.segs_out,
            retransmits: flow.retransmits,
            rtt_us: flow.rtt_us,
            direction: flow.direction,
            ongoing: flow.ongoing,
            exporter_id,
            exporter_region: exporter_region.clone(),
            hops,
        })
    }

    /// The local workload, when the exporter vouched for one.
    pub fn local_workload(&self) -> Option<&Arc<str>> {
        match &self.local {
            Local::Workload(w) => Some(w),
            Local::Unattributed(_) => None,
        }
    }

    /// Why the local end has no workload, when it has none.
    pub fn local_reason(&self) -> Option<LocalReason> {
        match &self.local {
            Local::Workload(_) => None,
            Local::Unattributed(reason) => Some(*reason),
        }
    }

    /// The wire form, with the local end as `local` (its workload an index into a
    /// dictionary the caller builds).
    pub fn to_wire(&self, local: LocalEnd) -> wire::Flow {
        wire::Flow {
            flow_id: self.flow_id,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            segs_in: self.segs_in,
            segs_out: self.segs_out,
            retransmits: self.retransmits,
            rtt_us: self.rtt_us,
            local,
            local_ip: self.local_ip,
            remote_ip: self.remote_ip,
            local_port: self.local_port,
            remote_port: self.remote_port,
            direction: self.direction,
            ongoing: self.ongoing,
        }
    }
}

/// A flow with its final verdict, ready for the sinks.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EmittedFlow {
    pub record: FlowRecord,
    pub verdict: Verdict,
    /// How long it waited in this node's pending queue, in ms.
    pub waited_ms: u64,
    /// When it was emitted, Unix ms by this node's clock.
    pub emitted_ms: u64,
}

impl EmittedFlow {
    /// `"attributed"` or `"unattributed"`.
    pub fn result(&self) -> &'static str {
        match self.verdict {
            Verdict::Attributed(_) => "attributed",
            Verdict::Unattributed(_) => "unattributed",
        }
    }

    /// The remote workload, when attributed to one (external has none).
    pub fn remote_workload(&self) -> Option<&Arc<str>> {
        match &self.verdict {
            Verdict::Attributed(attribution) => attribution.workload(),
            Verdict::Unattributed(_) => None,
        }
    }

    /// The source when attributed, else `None`.
    pub fn source(&self) -> Option<&'static str> {
        match &self.verdict {
            Verdict::Attributed(a) => Some(a.source().as_str()),
            Verdict::Unattributed(_) => None,
        }
    }

    /// The reason when unattributed, else `None`.
    pub fn reason(&self) -> Option<Reason> {
        match &self.verdict {
            Verdict::Attributed(_) => None,
            Verdict::Unattributed(reason) => Some(*reason),
        }
    }

    /// Milliseconds from the flow's end to its emission: the attribution delay.
    pub fn delay_ms(&self) -> u64 {
        self.emitted_ms.saturating_sub(self.record.end_ms)
    }

    /// Whether this is an external attribution.
    pub fn is_external(&self) -> bool {
        matches!(self.verdict, Verdict::Attributed(Attribution::External))
    }
}

/// Builds a dictionary of workload names for an outgoing batch: each name once, in the
/// order first met. Every forwarded flow looks its name up here, so the index is a hash
/// map with the engine's seed (a tree compared whole names a dozen times per flow), with
/// the last name checked first by pointer: flows of one batch share their names' `Arc`s.
#[derive(Debug)]
pub(crate) struct DictionaryBuilder {
    names: Vec<String>,
    index: hashbrown::HashMap<Arc<str>, u32, foldhash::fast::FixedState>,
    last: Option<(Arc<str>, u32)>,
}

impl DictionaryBuilder {
    pub(crate) fn new(hash_seed: u64) -> DictionaryBuilder {
        DictionaryBuilder {
            names: Vec::new(),
            index: hashbrown::HashMap::with_hasher(foldhash::fast::FixedState::with_seed(
                hash_seed,
            )),
            last: None,
        }
    }

    pub(crate) fn index_of(&mut self, name: &Arc<str>) -> u32 {
        if let Some((last, i)) = &self.last {
            if Arc::ptr_eq(last, name) {
                return *i;
            }
        }
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
                self.names.push(name.to_string());
                self.index.insert(name.clone(), i);
                i
            }
        };
        self.last = Some((name.clone(), i));
        i
    }

    pub(crate) fn finish(self) -> Vec<String> {
        self.names
    }
}

/// The names (workloads, regions) of incoming batches, each kept once across batches, so
/// that the flows of every batch share one `Arc` per name instead of each batch allocating
/// its own. A flow is emitted about a heartbeat interval after it arrived: by then a
/// per-batch copy of its names is cold, and the sink line, the dependency table and the
/// journal all read it (a cache miss each, 3 to 5% of a collector's CPU under load).
///
/// Bounded: names come from exporters, so past [`NAMES_KEPT_MAX`] distinct ones the
/// cache starts over (flows hold their own `Arc`s; nothing is lost but sharing).
#[derive(Debug)]
pub(crate) struct Names {
    kept: hashbrown::HashSet<Arc<str>, foldhash::fast::FixedState>,
}

/// Distinct names [`Names`] keeps: a fleet's workloads and regions, with room to spare
/// (a name is at most 256 bytes on the wire: at most ~20 MB).
pub(crate) const NAMES_KEPT_MAX: usize = 65_536;

impl Names {
    pub(crate) fn new(hash_seed: u64) -> Names {
        Names {
            kept: hashbrown::HashSet::with_hasher(foldhash::fast::FixedState::with_seed(hash_seed)),
        }
    }

    /// The shared `Arc` of `name`.
    pub(crate) fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(kept) = self.kept.get(name) {
            return kept.clone();
        }
        if self.kept.len() >= NAMES_KEPT_MAX {
            self.kept.clear();
        }
        let kept: Arc<str> = Arc::from(name);
        self.kept.insert(kept.clone());
        kept
    }

    /// The shared `Arc`s of a batch's dictionary, in its order.
    pub(crate) fn dictionary(&mut self, names: &[String]) -> Vec<Arc<str>> {
        names.iter().map(|name| self.get(name)).collect()
    }

    /// Names kept now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shared_across_batches_and_the_cache_starts_over_when_full() {
        let mut names = Names::new(7);
        let a = names.get("svc-a");
        let again = names.get(&String::from("svc-a"));
        assert!(Arc::ptr_eq(&a, &again), "one Arc per name");
        assert!(!Arc::ptr_eq(&a, &names.get("svc-b")));
        assert_eq!(names.len(), 2);
        for i in 0..NAMES_KEPT_MAX - 2 {
            names.get(&format!("w{i}"));
        }
        assert_eq!(names.len(), NAMES_KEPT_MAX);
        // Full: one more name starts the cache over; earlier Arcs stay valid in flows.
        let c = names.get("svc-c");
        assert_eq!(names.len(), 1);
        assert_eq!(&*a, "svc-a");
        assert!(Arc::ptr_eq(&c, &names.get("svc-c")));
        assert!(
            !Arc::ptr_eq(&a, &names.get("svc-a")),
            "svc-a was dropped with the rest"
        );
    }
}
