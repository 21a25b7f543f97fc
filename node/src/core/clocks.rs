//! Exporters whose clocks disagree with the fleet's.
//!
//! Attribution holds one host's flow times against other hosts' heartbeats, so it assumes
//! that any two exporters' clocks agree within δ (`skew_margin_ms`). A host whose clock
//! was stepped far off (an operator, a bad NTP source, a VM restored from a snapshot)
//! would have its flows looked up at the wrong time, and its heartbeats would state the
//! wrong tenures. Every exporter stamps each batch with its clock when it sends it
//! (`sent_ms`); the collector keeps each exporter's latest `sent_ms − now` and compares a
//! batch's with the median of every exporter heard lately. The collector's own clock
//! cancels out (it is in every sample alike), and so does most network delay. A batch
//! more than δ off the median is *out of agreement*: its claims are refused and its flows
//! go out unattributed (`exporter_clock`), never looked up.
//!
//! It needs [`EXPORTERS_MIN`] exporters heard within the window to judge (with fewer, a
//! wrong clock cannot be told from a right one, and nothing is refused). Late processing
//! (a paused collector reading its backlog) makes batches look behind: they are refused
//! for a moment, which leaves flows unattributed but attributes none wrongly.

use std::collections::BTreeMap;

use tenure_attribution::UnixMillis;

/// Exporters heard within the window needed before any batch is judged.
pub const EXPORTERS_MIN: usize = 3;
/// How often the fleet's median is recomputed, in ms of steady time.
pub const MEDIAN_INTERVAL_MS: u64 = 1_000;

/// What a batch's `sent_ms` says about its exporter's clock.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClockVerdict {
    /// Within δ of the fleet's, or nothing to compare with.
    Agrees,
    /// Off the fleet's median by `off_ms` (positive: ahead), beyond δ.
    Disagrees { off_ms: i64 },
}

/// See the module documentation.
#[derive(Debug)]
pub(super) struct ExporterClocks {
    skew_max_ms: u64,
    window_ms: u64,
    tracked_max: usize,
    /// Exporter → (its latest `sent_ms − now`, when it was heard, steady time).
    samples: BTreeMap<u64, (i64, UnixMillis)>,
    /// The median of the samples heard within the window, and when it was computed.
    median: Option<(i64, UnixMillis)>,
}

impl ExporterClocks {
    /// `skew_max_ms`: δ. `window_ms`: how long a sample counts (a few heartbeat
    /// intervals). At most `tracked_max` exporters are remembered.
    pub(super) fn new(skew_max_ms: u64, window_ms: u64, tracked_max: usize) -> ExporterClocks {
        ExporterClocks {
            skew_max_ms,
            window_ms,
            tracked_max: tracked_max.max(EXPORTERS_MIN),
            samples: BTreeMap::new(),
            median: None,
        }
    }

    /// Takes a batch of `exporter_id` stamped `sent_ms` (0: not stated, always agrees),
    /// received at `now` (wall) and `at` (steady).
    pub(super) fn judge(
        &mut self,
        exporter_id: u64,
        sent_ms: u64,
        now: UnixMillis,
        at: UnixMillis,
    ) -> ClockVerdict {
        if sent_ms == 0 {
            return ClockVerdict::Agrees;
        }
        let offset = i64::try_from(sent_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(now.0).unwrap_or(i64::MAX));
        if self.samples.len() >= self.tracked_max && !self.samples.contains_key(&exporter_id) {
            self.forget_old(at);
        }
        if self.samples.len() < self.tracked_max || self.samples.contains_key(&exporter_id) {
            self.samples.insert(exporter_id, (offset, at));
        }
        let stale = self
            .median
            .is_none_or(|(_, computed)| at.since(computed) >= MEDIAN_INTERVAL_MS);
        if stale {
            self.forget_old(at);
            self.median = median(self.samples.values().map(|(o, _)| *o)).map(|m| (m, at));
        }
        match self.median {
            Some((median, _)) => {
                let off_ms = offset.saturating_sub(median);
                if off_ms.unsigned_abs() > self.skew_max_ms {
                    ClockVerdict::Disagrees { off_ms }
                } else {
                    ClockVerdict::Agrees
                }
            }
            None => ClockVerdict::Agrees,
        }
    }

    fn forget_old(&mut self, at: UnixMillis) {
        let window = self.window_ms;
        self.samples
            .retain(|_, (_, heard)| at.since(*heard) < window);
    }
}

/// The median of at least [`EXPORTERS_MIN`] values (the lower of the middle two of an
/// even count).
fn median(values: impl Iterator<Item = i64>) -> Option<i64> {
    let mut v: Vec<i64> = values.collect();
    if v.len() < EXPORTERS_MIN {
        return None;
    }
    let mid = (v.len() - 1) / 2;
    let (_, m, _) = v.select_nth_unstable(mid);
    Some(*m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_800_000_000_000;

    #[test]
    fn a_clock_far_from_the_fleets_is_found_whatever_the_collectors_clock_says() {
        for collector_off in [-120_000i64, 0, 90_000] {
            let mut clocks = ExporterClocks::new(1_000, 30_000, 100);
            let now = UnixMillis(T.saturating_add_signed(collector_off));
            let at = UnixMillis(T);
            // Four exporters within 400 ms of true time, one 60 s ahead.
            for (id, off) in [(1, 0i64), (2, 300), (3, -400), (4, 150)] {
                let v = clocks.judge(id, T.saturating_add_signed(off), now, at);
                assert_eq!(v, ClockVerdict::Agrees, "exporter {id}");
            }
            let v = clocks.judge(5, T + 60_000, now, at);
            assert!(
                matches!(v, ClockVerdict::Disagrees { off_ms } if off_ms > 59_000),
                "{v:?} with the collector {collector_off} ms off"
            );
            // And one 2 minutes behind.
            let v = clocks.judge(6, T - 120_000, now, at);
            assert!(matches!(v, ClockVerdict::Disagrees { off_ms } if off_ms < -119_000));
            assert_eq!(clocks.judge(2, T + 250, now, at), ClockVerdict::Agrees);
        }
    }

    #[test]
    fn too_few_exporters_and_unstated_times_are_not_judged() {
        let mut clocks = ExporterClocks::new(1_000, 30_000, 100);
        let (now, at) = (UnixMillis(T), UnixMillis(T));
        assert_eq!(clocks.judge(1, T, now, at), ClockVerdict::Agrees);
        assert_eq!(clocks.judge(2, T + 60_000, now, at), ClockVerdict::Agrees);
        assert_eq!(clocks.judge(3, 0, now, at), ClockVerdict::Agrees);
    }

    #[test]
    fn samples_leave_with_the_window_and_the_table_is_bounded() {
        let mut clocks = ExporterClocks::new(1_000, 30_000, 4);
        for id in 0..100 {
            let at = UnixMillis(T + id * 1_000);
            clocks.judge(id, at.0, at, at);
            assert!(clocks.samples.len() <= 4, "bounded");
        }
        let late = UnixMillis(T + 200_000);
        clocks.judge(1_000, late.0, late, late);
        assert_eq!(clocks.samples.len(), 1, "older samples left the window");
    }
}
