//! Kernel monotonic time to wall-clock time.
//!
//! The program stamps flows with `bpf_ktime_get_ns`, which is `CLOCK_MONOTONIC`. The
//! exporter needs Unix time, so the loader measures `CLOCK_REALTIME − CLOCK_MONOTONIC`
//! when it reads records (NTP may step the wall clock, so the offset is re-measured for
//! each batch rather than once at start). Measuring is the only part that reads a clock;
//! the conversion is a pure function.

use rustix::time::{clock_gettime, ClockId, Timespec};

const NANOS_PER_SEC: i128 = 1_000_000_000;
const NANOS_PER_MS: i128 = 1_000_000;

/// `CLOCK_REALTIME − CLOCK_MONOTONIC` in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    realtime_minus_monotonic_ns: i128,
}

impl ClockOffset {
    /// An offset from a known difference, for tests and replays.
    pub const fn from_ns(realtime_minus_monotonic_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns,
        }
    }

    /// Reads both clocks now. The monotonic clock is read on both sides of the wall
    /// clock and averaged, which keeps the error within one clock read (well under a
    /// millisecond).
    pub fn measure() -> Self {
        let before = timespec_ns(clock_gettime(ClockId::Monotonic));
        let real = timespec_ns(clock_gettime(ClockId::Realtime));
        let after = timespec_ns(clock_gettime(ClockId::Monotonic));
        let monotonic = before + (after - before) / 2;
        Self::from_ns(real - monotonic)
    }

    /// The clock frame: Unix ms at monotonic 0 (the wall clock minus the monotonic clock,
    /// in ms, rounded down). It changes only when the wall clock is stepped.
    pub fn frame_ms(self) -> i64 {
        i64::try_from(self.realtime_minus_monotonic_ns.div_euclid(NANOS_PER_MS)).unwrap_or(i64::MAX)
    }

    /// The monotonic instant `monotonic_ns` as Unix milliseconds, clamped to 0 for
    /// instants before the epoch (only possible with a nonsensical offset).
    pub fn to_unix_ms(self, monotonic_ns: u64) -> u64 {
        let unix_ns = i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns;
        let unix_ms = unix_ns.div_euclid(NANOS_PER_MS);
        u64::try_from(unix_ms.max(0)).unwrap_or(u64::MAX)
    }
}

fn timespec_ns(ts: Timespec) -> i128 {
    i128::from(ts.tv_sec) * NANOS_PER_SEC + i128::from(ts.tv_nsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_offset() {
        let offset = ClockOffset::from_ns(1_700_000_000_000_000_000 - 5_000_000_000);
        assert_eq!(offset.to_unix_ms(5_000_000_000), 1_700_000_000_000);
        assert_eq!(offset.to_unix_ms(5_001_999_999), 1_700_000_000_001);
        assert_eq!(offset.frame_ms(), 1_700_000_000_000 - 5_000);
        assert_eq!(ClockOffset::from_ns(-1).frame_ms(), -1);
    }

    #[test]
    fn clamps_before_epoch() {
        assert_eq!(ClockOffset::from_ns(-10_000_000_000).to_unix_ms(1), 0);
    }

    #[test]
    fn measured_offset_is_plausible() {
        // Boot happened after 2020-01-01 and before the year 2200.
        let ms = ClockOffset::measure().to_unix_ms(0);
        assert!(ms > 1_577_836_800_000, "offset puts boot at {ms} ms");
        assert!(ms < 7_258_118_400_000, "offset puts boot at {ms} ms");
    }
}
