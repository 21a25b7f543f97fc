//! Flows this node has journaled lately, so that a copy forwarded again by a peer is not
//! taken (and emitted) twice.
//!
//! A peer re-sends forwarded flows whose ack is late (this node paused, partitioned, busy):
//! the copies queue on the same TCP connection and all arrive once the fault heals. Every
//! copy used to be journaled and emitted: with a one-second ack timeout, a six-second
//! partition emitted most forwarded flows six times. A flow whose `(exporter, flow id)` is
//! here was journaled by this node in this run, so it is emitted (or was, durably) without
//! the copy; the copy's ack waits until that earlier append is durable
//! ([`super::journal::Ledger::withhold_behind_last`]).
//!
//! Only copies from peers (forwarded batches, sealed with the cluster key) are dropped:
//! an exporter could otherwise pre-empt another exporter's flow ids. The table is bounded
//! ([`RECENT_FLOWS_MAX`], oldest forgotten first) and empty after a restart; a copy it
//! misses is a duplicate, never a loss.

use std::collections::VecDeque;

/// Flows remembered; past it the oldest are forgotten. 32 bytes each, twice (set and
/// queue): about 4 MiB.
pub const RECENT_FLOWS_MAX: usize = 65_536;

type Key = (u64, u128);
type Set = hashbrown::HashSet<Key, foldhash::fast::FixedState>;

/// See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Recent {
    set: Set,
    order: VecDeque<Key>,
}

impl Recent {
    /// Whether `(exporter_id, flow_id)` was journaled here lately.
    #[cfg(test)]
    fn contains(&self, exporter_id: u64, flow_id: u128) -> bool {
        self.set.contains(&(exporter_id, flow_id))
    }

    /// Remembers a journaled flow, forgetting the oldest past [`RECENT_FLOWS_MAX`]; `false`
    /// when it was remembered already.
    pub(super) fn insert(&mut self, exporter_id: u64, flow_id: u128) -> bool {
        if !self.set.insert((exporter_id, flow_id)) {
            return false;
        }
        self.order.push_back((exporter_id, flow_id));
        while self.order.len() > RECENT_FLOWS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        debug_assert_eq!(self.set.len(), self.order.len(), "set and queue agree");
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_bound_then_forgets_the_oldest() {
        let mut recent = Recent::default();
        recent.insert(1, 10);
        recent.insert(1, 10);
        assert!(recent.contains(1, 10));
        assert!(!recent.contains(2, 10), "keyed by exporter too");
        assert_eq!(recent.len(), 1);
        for i in 0..RECENT_FLOWS_MAX as u128 {
            recent.insert(3, i);
        }
        assert_eq!(recent.len(), RECENT_FLOWS_MAX);
        assert!(!recent.contains(1, 10), "the oldest is forgotten");
        assert!(recent.contains(3, 0));
        assert!(recent.contains(3, RECENT_FLOWS_MAX as u128 - 1));
    }
}
