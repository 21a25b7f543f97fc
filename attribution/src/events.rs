//! Ownership of non-workload IPs (load balancers, NAT gateways, managed databases) from an
//! event feed of assignments, for IPs that no exporter heartbeats.
//!
//! Events may arrive late and out of order, so each IP keeps a short log of events sorted
//! by their own time, and the feed states a *watermark*: every event at or before it has
//! been delivered. An owner is known for a window only when the log says so for the whole
//! window and the window ends at or before the watermark; past it, an unassignment may
//! still be on its way. A feed that sends no watermark therefore attributes nothing.

use std::hash::Hash;

use crate::ip::{new_map, Map};
use crate::time::{UnixMillis, Window};
use crate::workload::WorkloadId;

/// What the event log says about a window.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum EventJudgement {
    Covered(WorkloadId),
    NotCovered,
}

#[derive(Debug)]
pub(crate) struct EventTable<K> {
    /// Per IP: `(at, owner)` sorted by `at`; `None` is an unassignment.
    logs: Map<K, Vec<(UnixMillis, Option<WorkloadId>)>>,
    events: usize,
}

impl<K: Copy + Eq + Hash> EventTable<K> {
    pub(crate) fn new(seed: u64) -> EventTable<K> {
        EventTable {
            logs: new_map(seed),
            events: 0,
        }
    }

    /// Records an event. Returns true when the oldest event of the IP was dropped to stay
    /// within `events_per_ip_max`; a window before the remaining log is then not covered.
    pub(crate) fn record(
        &mut self,
        key: K,
        at: UnixMillis,
        owner: Option<WorkloadId>,
        events_per_ip_max: usize,
    ) -> bool {
        let log = self.logs.entry(key).or_default();
        let index = log.partition_point(|(t, _)| *t <= at);
        if index > 0 && log[index - 1] == (at, owner) {
            return false; // a duplicate delivery
        }
        log.insert(index, (at, owner));
        self.events += 1;
        debug_assert!(
            log.windows(2).all(|p| p[0].0 <= p[1].0),
            "event log unsorted"
        );
        if log.len() > events_per_ip_max {
            log.remove(0);
            self.events -= 1;
            return true;
        }
        false
    }

    pub(crate) fn judge(&self, key: &K, window: Window, watermark: UnixMillis) -> EventJudgement {
        if window.end > watermark {
            return EventJudgement::NotCovered;
        }
        let Some(log) = self.logs.get(key) else {
            return EventJudgement::NotCovered;
        };
        // The state at window.start is set by the last event at or before it; no event may
        // change it inside the window.
        let at_start = log.partition_point(|(t, _)| *t <= window.start);
        let after_end = log.partition_point(|(t, _)| *t <= window.end);
        if at_start == 0 || at_start != after_end {
            return EventJudgement::NotCovered;
        }
        match log[at_start - 1].1 {
            Some(owner) => EventJudgement::Covered(owner),
            None => EventJudgement::NotCovered,
        }
    }

    pub(crate) fn has(&self, key: &K) -> bool {
        self.logs.contains_key(key)
    }

    /// Drops events no longer needed to answer for time at or after `horizon`: all but the
    /// last event at or before it.
    pub(crate) fn expire(&mut self, horizon: UnixMillis) {
        let mut removed = 0;
        self.logs.retain(|_, log| {
            let at_or_before = log.partition_point(|(t, _)| *t <= horizon);
            if at_or_before > 1 {
                log.drain(..at_or_before - 1);
                removed += at_or_before - 1;
            }
            // An IP whose last word is an old unassignment has nothing left to say.
            let done = log.len() == 1 && log[0].1.is_none() && log[0].0 <= horizon;
            if done {
                removed += 1;
            }
            !done
        });
        self.events -= removed;
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.logs.keys()
    }

    pub(crate) fn owners(&self) -> impl Iterator<Item = WorkloadId> + '_ {
        self.logs.values().flatten().filter_map(|(_, owner)| *owner)
    }

    pub(crate) fn events(&self) -> usize {
        self.events
    }

    pub(crate) fn ips(&self) -> usize {
        self.logs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_HASH_SEED as TEST_SEED;

    fn win(s: u64, e: u64) -> Window {
        Window::new(UnixMillis(s), UnixMillis(e)).unwrap()
    }

    #[test]
    fn covered_only_up_to_the_watermark_and_between_events() {
        let mut t = EventTable::new(TEST_SEED);
        let lb = Some(WorkloadId(7));
        t.record(1u32, UnixMillis(100), lb, 8);
        t.record(1, UnixMillis(300), None, 8);
        assert_eq!(
            t.judge(&1, win(150, 160), UnixMillis(140)),
            EventJudgement::NotCovered
        );
        assert_eq!(
            t.judge(&1, win(150, 160), UnixMillis(1000)),
            EventJudgement::Covered(WorkloadId(7))
        );
        assert_eq!(
            t.judge(&1, win(250, 350), UnixMillis(1000)),
            EventJudgement::NotCovered
        );
        assert_eq!(
            t.judge(&1, win(50, 60), UnixMillis(1000)),
            EventJudgement::NotCovered
        );
        assert_eq!(
            t.judge(&1, win(400, 410), UnixMillis(1000)),
            EventJudgement::NotCovered
        );
    }

    #[test]
    fn a_late_unassignment_is_placed_by_its_own_time() {
        let mut t = EventTable::new(TEST_SEED);
        t.record(1u32, UnixMillis(100), Some(WorkloadId(1)), 8);
        t.record(1, UnixMillis(500), Some(WorkloadId(2)), 8);
        t.record(1, UnixMillis(300), None, 8); // arrives last, happened in between
        assert_eq!(
            t.judge(&1, win(350, 360), UnixMillis(1000)),
            EventJudgement::NotCovered
        );
        t.expire(UnixMillis(400));
        assert_eq!(t.events(), 2);
        assert_eq!(
            t.judge(&1, win(600, 700), UnixMillis(1000)),
            EventJudgement::Covered(WorkloadId(2))
        );
    }
}
