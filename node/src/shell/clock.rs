//! The one place the node reads the wall clock. Everything else takes `now` as an argument.
//!
//! A collector reads it through its [`Clock`], which adds an offset that an operator (or
//! the chaos supervisor) may set through the admin endpoint when fault injection is
//! enabled: skew within δ, or jumps forward and backward beyond it. The offset lives in
//! memory only, so a restart starts from the system clock again.

use std::sync::atomic::{AtomicI64, Ordering};

use tenure_attribution::UnixMillis;

/// The largest offset the admin endpoint accepts, either way, in ms: one day. Past it a
/// request is refused; a clock wrong by more than that is not a fault worth simulating.
pub const OFFSET_MS_MAX: i64 = 86_400_000;

/// The system clock, in Unix milliseconds.
#[allow(
    clippy::disallowed_methods,
    reason = "the shell's single wall-clock read; cores take `now` from here"
)]
pub fn now() -> UnixMillis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}

/// Why an offset was refused. Nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("clock offset {offset_ms} ms is beyond ±{OFFSET_MS_MAX} ms")]
pub struct OffsetError {
    pub offset_ms: i64,
}

/// The system clock plus an adjustable offset: what one collector believes the time is.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// The system clock, no offset.
    pub fn new() -> Clock {
        Clock::default()
    }

    /// The system clock plus the offset, saturating at the ends of the range.
    pub fn now(&self) -> UnixMillis {
        shifted(now(), self.offset_ms())
    }

    /// The offset in force, in ms (negative: behind the system clock).
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }

    /// Replaces the offset. A jump is one call with a large value; skew, a small one.
    pub fn set_offset_ms(&self, offset_ms: i64) -> Result<(), OffsetError> {
        if !(-OFFSET_MS_MAX..=OFFSET_MS_MAX).contains(&offset_ms) {
            return Err(OffsetError { offset_ms });
        }
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
        Ok(())
    }
}

fn shifted(t: UnixMillis, offset_ms: i64) -> UnixMillis {
    let magnitude = offset_ms.unsigned_abs();
    if offset_ms >= 0 {
        UnixMillis(t.0.saturating_add(magnitude))
    } else {
        UnixMillis(t.0.saturating_sub(magnitude))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_shift_both_ways_and_saturate() {
        assert_eq!(shifted(UnixMillis(10_000), 250), UnixMillis(10_250));
        assert_eq!(shifted(UnixMillis(10_000), -250), UnixMillis(9_750));
        assert_eq!(shifted(UnixMillis(100), -250), UnixMillis(0));
        assert_eq!(shifted(UnixMillis(u64::MAX - 1), 250), UnixMillis(u64::MAX));
    }

    #[test]
    fn offsets_beyond_a_day_are_refused_and_change_nothing() {
        let clock = Clock::new();
        assert_eq!(clock.offset_ms(), 0);
        clock.set_offset_ms(-30_000).unwrap();
        assert_eq!(clock.offset_ms(), -30_000);
        assert_eq!(
            clock.set_offset_ms(OFFSET_MS_MAX + 1),
            Err(OffsetError {
                offset_ms: OFFSET_MS_MAX + 1
            })
        );
        assert!(clock.set_offset_ms(i64::MIN).is_err());
        assert_eq!(clock.offset_ms(), -30_000);
        clock.set_offset_ms(OFFSET_MS_MAX).unwrap();
        assert_eq!(clock.offset_ms(), OFFSET_MS_MAX);
    }
}
