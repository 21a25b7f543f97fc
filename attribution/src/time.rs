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
