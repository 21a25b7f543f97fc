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

/// Flows remembered at most; at least the latest half of them are. 32 bytes each in a
/// hash set: about 2.5 MiB with the sets' spare room.
pub const RECENT_FLOWS_MAX: usize = 65_536;

type Key = (u64, u128);
type Set = hashbrown::HashSet<Key, foldhash::fast::FixedState>;

/// See the module documentation.
///
/// Two generations instead of a set and a queue of insertion order: a flow goes into the
/// current one; when it holds half of [`RECENT_FLOWS_MAX`] it becomes the previous one and
/// the old previous one is cleared (its memory kept). One hash probe per remembered flow
/// and nothing to evict one by one: forgetting is a clear per generation, and the oldest
/// half are still forgotten first.
#[derive(Debug)]
pub(super) struct Recent {
    current: Set,
    previous: Set,
}

impl Recent {
    /// Keys are chosen by exporters: `hash_seed` must be one they cannot know.
    pub(super) fn new(hash_seed: u64) -> Recent {
        let set = || Set::with_hasher(foldhash::fast::FixedState::with_seed(hash_seed));
        Recent {
            current: set(),
            previous: set(),
        }
    }

    /// Whether `(exporter_id, flow_id)` was journaled here lately.
    #[cfg(test)]
    fn contains(&self, exporter_id: u64, flow_id: u128) -> bool {
        let key = (exporter_id, flow_id);
        self.current.contains(&key) || self.previous.contains(&key)
    }

    /// Remembers a journaled flow; `false` when it was remembered already.
    pub(super) fn insert(&mut self, exporter_id: u64, flow_id: u128) -> bool {
        let key = (exporter_id, flow_id);
        if !self.previous.is_empty() && self.previous.contains(&key) {
            return false;
        }
        if !self.current.insert(key) {
            return false;
        }
        if self.current.len() >= RECENT_FLOWS_MAX / 2 {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_bound_then_forgets_the_oldest() {
        let mut recent = Recent::new(tenure_attribution::DEFAULT_HASH_SEED);
        assert!(recent.insert(1, 10));
        assert!(!recent.insert(1, 10), "a second insert finds it");
        assert!(recent.contains(1, 10));
        assert!(!recent.contains(2, 10), "keyed by exporter too");
        assert_eq!(recent.len(), 1);
        for i in 0..RECENT_FLOWS_MAX as u128 {
            assert!(recent.insert(3, i));
            assert!(recent.len() <= RECENT_FLOWS_MAX, "bounded");
        }
        assert!(!recent.contains(1, 10), "the oldest is forgotten");
        let n = RECENT_FLOWS_MAX as u128;
        for i in n / 2..n {
            assert!(recent.contains(3, i), "the latest half is remembered: {i}");
        }
        assert!(!recent.insert(3, n - 1));
        // A flow of the previous generation is found there, not taken again.
        assert!(!recent.insert(3, n / 2));
    }
}
