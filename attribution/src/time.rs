//! Time as the cores see it: Unix milliseconds passed in by the caller, never read here.

use std::fmt;

/// A point in time, in milliseconds since the Unix epoch, as stated by some host's clock.
///
/// The cores never read a clock: every operation takes the current time as an argument,
/// so that the simulator can drive them with simulated, skewed clocks.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// The latest time the engine accepts (year 2255): far enough for any real clock, and
    /// low enough that adding any configured margin or duration cannot overflow.
    pub const MAX: UnixMillis = UnixMillis(1 << 53);

    /// This time plus `ms`, saturating at [`UnixMillis::MAX`].
    #[inline]
    pub fn plus(self, ms: u64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(ms).min(Self::MAX.0))
    }

    /// This time minus `ms`, saturating at zero.
    #[inline]
    pub fn minus(self, ms: u64) -> UnixMillis {
        UnixMillis(self.0.saturating_sub(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: UnixMillis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Debug for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Time that never runs backwards, measured from the wall-clock readings a core is given:
/// a reading ahead of the previous one counts as that much time passed, one behind it as
/// none. Until a reading steps back it equals the wall clock.
///
/// Everything a core waits *for a while* (a flow's settling and pending deadline, an
/// unacknowledged batch's timeout, a token bucket's refill, a handoff's retry) is counted
/// in steady time; what a timestamp of a flow or a claim is compared with stays the wall
/// clock. A wall clock stepped forward and then back (an operator, NTP, a VM migration)
/// therefore ends those waits early, never holds them for the length of the step.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct SteadyClock {
    /// The latest wall-clock reading; `None` before the first.
    wall: Option<UnixMillis>,
    /// Steady time at that reading.
    steady: UnixMillis,
}

impl SteadyClock {
    /// A clock that starts at the first reading it is given.
    pub fn new() -> SteadyClock {
        SteadyClock::default()
    }

    /// Takes the wall clock's reading `wall`; returns the steady time now.
    #[inline]
    pub fn observe(&mut self, wall: UnixMillis) -> UnixMillis {
        self.steady = match self.wall {
            None => wall,
            Some(last) => self.steady.plus(wall.since(last)),
        };
        self.wall = Some(wall);
        self.steady
    }

    /// Steady time at the latest reading (zero before the first).
    pub fn now(&self) -> UnixMillis {
        self.steady
    }

    /// The wall-clock time at which steady time `at` comes, if the wall clock keeps its
    /// pace from the latest reading.
    pub fn to_wall(&self, at: UnixMillis) -> UnixMillis {
        let wall = self.wall.unwrap_or(self.steady);
        if at >= self.steady {
            wall.plus(at.since(self.steady))
        } else {
            wall.minus(self.steady.since(at))
        }
    }
}

/// A closed interval of time, `[start, end]`, both ends included.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Window {
    pub start: UnixMillis,
    pub end: UnixMillis,
}

impl Window {
    /// The window `[start, end]`, or `None` when `end` is before `start`.
    pub fn new(start: UnixMillis, end: UnixMillis) -> Option<Window> {
        (start <= end).then_some(Window { start, end })
    }

    /// The single instant `t`.
    pub fn at(t: UnixMillis) -> Window {
        Window { start: t, end: t }
    }

    /// This window widened by `margin_ms` on both sides.
    #[inline]
    pub fn widened(self, margin_ms: u64) -> Window {
        Window {
            start: self.start.minus(margin_ms),
            end: self.end.plus(margin_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_time_follows_forward_steps_and_ignores_backward_ones() {
        let mut clock = SteadyClock::new();
        assert_eq!(clock.observe(UnixMillis(1_000)), UnixMillis(1_000));
        assert_eq!(clock.observe(UnixMillis(1_500)), UnixMillis(1_500));
        // Forward by 100 s: that much passed.
        assert_eq!(clock.observe(UnixMillis(101_500)), UnixMillis(101_500));
        // Back by 100 s: nothing passed, and the pace goes on from the new reading.
        assert_eq!(clock.observe(UnixMillis(1_600)), UnixMillis(101_500));
        assert_eq!(clock.observe(UnixMillis(1_700)), UnixMillis(101_600));
        assert_eq!(clock.to_wall(UnixMillis(101_650)), UnixMillis(1_750));
        assert_eq!(clock.to_wall(UnixMillis(101_550)), UnixMillis(1_650));
        assert_eq!(clock.now(), UnixMillis(101_600));
    }
}
