//! The host's clock frames, sans-io: which wall-clock readings a source's stated time may
//! have been written in, so that the local history can keep its times on the host's
//! monotonic clock.
//!
//! A host has two clocks. Sockets are stamped on the monotonic one, which never steps; an
//! identity source (a map file, a container runtime's events) states its times on the
//! wall clock, which NTP or an operator may step. The *frame* is the wall clock minus the
//! monotonic clock: it is constant between steps. The history keeps every time as
//! monotonic ms, so a flow and a tenure compare the same way whatever the wall clock did
//! between them, and the exporter states them on the wall clock only when it sends them,
//! in the frame in force then.
//!
//! A stated wall-clock time `w` means the monotonic instant `w − f` for the frame `f` in
//! force when the source wrote it. Observations tell when each frame was seen; a step
//! happened somewhere between the last observation in the old frame and the first in the
//! new one. So `w` is read in every frame whose period, that gap included on both sides,
//! contains `w − f`. When several do, a start is read as the latest of them and an end as
//! the earliest: a tenure then vouches for less than the truth, never for more. When none
//! does (the frame was seen too briefly to tell), every retained frame is a candidate.

/// The smallest change of the frame taken as a step, in ms: measuring it reads two clocks
/// in turn and rounds to ms, which moves it by a millisecond or two.
pub const FRAME_STEP_MIN_MS: i64 = 10;

/// One frame and the observations made in it, as monotonic ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Period {
    frame_ms: i64,
    first_ms: u64,
    last_ms: u64,
}

/// The frames seen, oldest first. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frames {
    periods: Vec<Period>,
}

impl Frames {
    /// An observation at monotonic `now_ms`, in frame `frame_ms`. Frames whose period
    /// ended more than `retention_ms` ago are forgotten (the current one never is).
    pub fn observe(&mut self, now_ms: u64, frame_ms: i64, retention_ms: u64) {
        match self.periods.last_mut() {
            Some(p) if (frame_ms - p.frame_ms).abs() < FRAME_STEP_MIN_MS => {
                p.last_ms = p.last_ms.max(now_ms);
            }
            _ => self.periods.push(Period {
                frame_ms,
                first_ms: now_ms,
                last_ms: now_ms,
            }),
        }
        let horizon = now_ms.saturating_sub(retention_ms);
        let stale = self
            .periods
            .iter()
            .take(self.periods.len() - 1)
            .take_while(|p| p.last_ms < horizon)
            .count();
        self.periods.drain(..stale);
    }

    /// Whether the frame stepped since observations began (within retention).
    pub fn stepped(&self) -> bool {
        self.periods.len() > 1
    }

    /// The frame in force at the last observation, if any.
    pub fn current(&self) -> Option<i64> {
        self.periods.last().map(|p| p.frame_ms)
    }

    /// The stated wall-clock time `wall_ms` as a monotonic start: the latest reading.
    pub fn start_of(&self, wall_ms: u64) -> u64 {
        self.readings(wall_ms).max().unwrap_or(wall_ms)
    }

    /// The stated wall-clock time `wall_ms` as a monotonic end: the earliest reading.
    pub fn end_of(&self, wall_ms: u64) -> u64 {
        self.readings(wall_ms).min().unwrap_or(wall_ms)
    }

    /// Every monotonic instant `wall_ms` may mean.
    fn readings(&self, wall_ms: u64) -> impl Iterator<Item = u64> + '_ {
        let read = move |p: &Period| i128::from(wall_ms) - i128::from(p.frame_ms);
        let fitting = self.periods.iter().enumerate().filter(move |&(k, p)| {
            // The step before this frame happened after the previous frame's last
            // observation; the one after it before the next frame's first. Nothing is
            // stated later than the observation that reports it, nor before the boot.
            let lo = match k {
                0 => 0,
                _ => self.periods[k - 1].last_ms,
            };
            let hi = self
                .periods
                .get(k + 1)
                .map_or(p.last_ms, |next| next.first_ms);
            (i128::from(lo)..=i128::from(hi)).contains(&read(p))
        });
        let any_fits = fitting.clone().next().is_some();
        let all = self.periods.iter().enumerate().filter(move |_| !any_fits);
        fitting
            .chain(all)
            .map(move |(_, p)| u64::try_from(read(p).max(0)).unwrap_or(u64::MAX))
    }
}

/// `wall_ms` read in frame `frame_ms`, as monotonic ms (0 for instants before it).
pub fn to_monotonic(wall_ms: u64, frame_ms: i64) -> u64 {
    let mono = i128::from(wall_ms) - i128::from(frame_ms);
    u64::try_from(mono.max(0)).unwrap_or(u64::MAX)
}

/// Monotonic `mono_ms` on the wall clock of frame `frame_ms` (0 for instants before the
/// epoch, only possible with a nonsensical frame).
pub fn to_wall(mono_ms: u64, frame_ms: i64) -> u64 {
    let wall = i128::from(mono_ms) + i128::from(frame_ms);
    u64::try_from(wall.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: i64 = 1_700_000_000_000;
    const RETENTION: u64 = 900_000;

    #[test]
    fn one_frame_reads_every_time_in_it() {
        let mut frames = Frames::default();
        frames.observe(1_000, BOOT, RETENTION);
        frames.observe(1_500, BOOT + 1, RETENTION);
        assert!(!frames.stepped());
        assert_eq!(frames.start_of(BOOT as u64 + 700), 700);
        assert_eq!(frames.end_of(BOOT as u64 + 700), 700);
        // Read in the only frame there is, even past the last observation.
        assert_eq!(frames.start_of(BOOT as u64 + 9_000), 9_000);
    }

    #[test]
    fn a_time_the_wall_clock_showed_twice_is_read_late_as_a_start_and_early_as_an_end() {
        let mut frames = Frames::default();
        frames.observe(10_000, BOOT, RETENTION);
        frames.observe(15_000, BOOT, RETENTION);
        // The wall clock went back 5 s somewhere in (15_000, 16_000).
        frames.observe(16_000, BOOT - 5_000, RETENTION);
        frames.observe(30_000, BOOT - 5_000, RETENTION);
        assert!(frames.stepped());
        // The wall clock showed BOOT+14_000 at monotonic 14_000 and again at 19_000.
        let twice = BOOT as u64 + 14_000;
        assert_eq!(frames.start_of(twice), 19_000);
        assert_eq!(frames.end_of(twice), 14_000);
        // BOOT+20_000 only after the step (monotonic 25_000; in the old frame, 20_000 is
        // after its last possible instant).
        let after = BOOT as u64 + 20_000;
        assert_eq!(frames.start_of(after), 25_000);
        assert_eq!(frames.end_of(after), 25_000);
        // BOOT+5_000 only before it (in the new frame, 10_000 is before the step).
        let before = BOOT as u64 + 5_000;
        assert_eq!(frames.start_of(before), 5_000);
        assert_eq!(frames.end_of(before), 5_000);
        // BOOT+40_000: after the last observation in either frame. Nothing fits: every
        // frame is a candidate.
        let unseen = BOOT as u64 + 40_000;
        assert_eq!(frames.start_of(unseen), 45_000);
        assert_eq!(frames.end_of(unseen), 40_000);
    }

    #[test]
    fn a_step_forward_is_read_both_ways_in_its_gap() {
        let mut frames = Frames::default();
        frames.observe(1_000, BOOT, RETENTION);
        frames.observe(2_000, BOOT + 60_000, RETENTION);
        // Monotonic 1_400 written in the old frame: BOOT+1_400; in the new it would be
        // read as −58_600: only the old one fits.
        assert_eq!(frames.start_of(BOOT as u64 + 1_400), 1_400);
        // A time read as 1_400 in the new frame and 61_400 in the old one: the old frame's
        // period ends at the new one's first observation (2_000), so only the new fits.
        assert_eq!(frames.start_of(BOOT as u64 + 61_400), 1_400);
    }

    #[test]
    fn old_frames_are_forgotten_after_retention() {
        let mut frames = Frames::default();
        frames.observe(1_000, BOOT, 10_000);
        frames.observe(2_000, BOOT + 100, 10_000);
        assert!(frames.stepped());
        frames.observe(20_000, BOOT + 100, 10_000);
        assert!(!frames.stepped());
        assert_eq!(frames.current(), Some(BOOT + 100));
    }

    #[test]
    fn conversions_round_trip_and_clamp() {
        assert_eq!(
            to_wall(to_monotonic(BOOT as u64 + 5, BOOT), BOOT),
            BOOT as u64 + 5
        );
        assert_eq!(to_monotonic(5, BOOT), 0);
        assert_eq!(to_wall(5, -10), 0);
    }
}
