//! The local ownership history, sans-io: per local IP, the tenures `(workload, since,
//! until | open)` an identity source stated, kept for a bounded retention, and the rule
//! that stamps a flow's local end.
//!
//! Invariants (checked by `debug_assert!` after every change): the tenures of one IP are
//! sorted by `since`, never overlap, and only the last may be open.
//!
//! - A source gives the whole mapping it knows as of an instant ([`Observation`]). A
//!   mapping that disappears or changes closes the open tenure: at the new owner's stated
//!   `since` (minus one ms), else at the time the source states for the change, else at
//!   the moment the exporter learned of it; a release the source states for the IP
//!   bounds it too. A new mapping opens at its stated `since`, else
//!   when the exporter first saw it (later than the truth, never earlier).
//! - A flow's local end is stamped with W only when one tenure of W covers all of
//!   `[start − margin, end + margin]` (the margin, for the gap between the source's clock
//!   and the socket's, shrinks what is vouched for); an open tenure vouches up to the last
//!   observation. Otherwise the end is unattributed with a [`LocalReason`]: `Changed` when
//!   some tenure touches the widened window, `Expired` when the window reaches before the
//!   retained history, `Unknown` when nobody held the IP then.
//! - Heartbeats: one claim per open tenure, `[since, last observation − source lag]`; a
//!   tenure that closed gets one last claim `[since, until]` and is never claimed again.
//!   The lag is how late the source may learn of a release: a host must not claim time
//!   its workload may already have given the IP up in (the next owner, elsewhere, would
//!   be attributed its flows).
//!
//! - Times: every time here is the host's monotonic clock, in ms, as sockets are stamped.
//!   A source states its times on the wall clock; [`Frames`] reads each in the frame it
//!   was written in (around a step of the wall clock, as late as it may be for a start and
//!   as early as it may be for an end), so a step of the host's wall clock moves neither
//!   a tenure nor a flow. The exporter core states them on the wall clock when it sends.
//!
//! The flow window is the attribution crate's [`Window`], widened as the collectors widen
//! theirs by δ; a host keeps a handful of tenures per IP, so each IP's history is a short
//! sorted vector rather than the collectors' arena of segments.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use tenure_attribution::{UnixMillis, Window};
use tenure_gossip::wire::LocalReason;

use super::batcher::LocalClaim;
use super::frames::Frames;

/// Limits and the margin of the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// How long a closed tenure is kept after it ended, in ms; flows older than what is
    /// kept go out `local_expired`.
    pub retention_ms: u64,
    /// Tenures kept per IP; past it the oldest is dropped (counted).
    pub tenures_per_ip_max: usize,
    /// Local IPs tracked; past it an IP with no open tenure is dropped, the one that
    /// ended first, or, when every IP is held, the new one is not tracked (counted).
    pub ips_max: usize,
    /// The most the source's times and the sockets' may disagree, in ms: a tenure vouches
    /// for a flow only when it covers the flow widened by this on both sides.
    pub margin_ms: u64,
    /// How late the source may learn that an IP was released, in ms: an open tenure
    /// vouches (in claims and for flows) only up to the last observation minus this, and a
    /// release the source gives no time for is taken to have happened this long before
    /// the source's stated change.
    pub source_lag_ms: u64,
}

/// Default [`HistoryConfig::retention_ms`]: 15 minutes.
pub const RETENTION_MS_DEFAULT: u64 = 15 * 60_000;
/// Default [`HistoryConfig::tenures_per_ip_max`].
pub const TENURES_PER_IP_MAX_DEFAULT: usize = 64;
/// Default [`HistoryConfig::ips_max`].
pub const IPS_MAX_DEFAULT: usize = 65_536;
/// Default [`HistoryConfig::margin_ms`].
pub const MARGIN_MS_DEFAULT: u64 = 100;

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            retention_ms: RETENTION_MS_DEFAULT,
            tenures_per_ip_max: TENURES_PER_IP_MAX_DEFAULT,
            ips_max: IPS_MAX_DEFAULT,
            margin_ms: MARGIN_MS_DEFAULT,
            source_lag_ms: 0,
        }
    }
}

/// One mapping as a source states it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub workload: Arc<str>,
    /// Since when the workload has held the IP, if the source says.
    pub since_ms: Option<u64>,
}

/// Everything a source knows, as of one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Every local IP the source maps, with its holder.
    pub held: BTreeMap<IpAddr, Held>,
    /// When the source says its last change happened (a file's modification time), if it
    /// says: a mapping that is gone or changed ended no later than this.
    pub changed_ms: Option<u64>,
    /// IPs the source says were released, with when (a container's stop, a pod's
    /// deletion): the tenure ends there.
    pub released: BTreeMap<IpAddr, u64>,
}

/// One tenure: `workload` held the IP over `[since_ms, until_ms]` (both included), or
/// from `since_ms` on while `until_ms` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenure {
    pub workload: Arc<str>,
    pub since_ms: u64,
    pub until_ms: Option<u64>,
    /// The `since` the source stated, on its wall clock: a later one means the workload
    /// took the IP again.
    stated_ms: Option<u64>,
    /// A closed tenure whose last claim has not gone out yet.
    final_claim_owed: bool,
}

#[derive(Clone, Debug, Default)]
struct IpHistory {
    tenures: Vec<Tenure>,
    /// History before this instant was dropped (retention or the per-IP limit).
    floor_ms: Option<u64>,
}

impl IpHistory {
    fn open(&self) -> Option<&Tenure> {
        self.tenures.last().filter(|t| t.until_ms.is_none())
    }

    /// The end of the newest tenure, if it closed; `None` when open or empty.
    fn ended_ms(&self) -> Option<u64> {
        match self.tenures.last() {
            Some(t) => t.until_ms,
            None => self.floor_ms,
        }
    }

    fn is_well_formed(&self) -> bool {
        let ordered = self.tenures.windows(2).all(|pair| {
            pair[0]
                .until_ms
                .is_some_and(|until| pair[0].since_ms <= until && until < pair[1].since_ms)
        });
        ordered
            && self
                .tenures
                .last()
                .is_none_or(|t| t.until_ms.is_none_or(|u| t.since_ms <= u))
    }
}

/// What stamping found for a flow's local end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// One tenure of this workload covers the whole flow.
    Workload(Arc<str>),
    /// No workload is vouched for.
    Unattributed(LocalReason),
    /// The flow ended after the last observation: ask again after the next one.
    NotYet,
    /// The source never mapped this IP (within retention): not a local workload's flow.
    NotLocal,
}

/// Counters of the history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryStats {
    pub tenures_opened: u64,
    pub tenures_closed: u64,
    /// Closed tenures dropped by the per-IP limit (not by retention).
    pub tenures_dropped: u64,
    /// IPs dropped, or not tracked, because of `ips_max`.
    pub ips_dropped: u64,
}

/// The history. See the module documentation.
#[derive(Debug)]
pub struct LocalHistory {
    config: HistoryConfig,
    ips: BTreeMap<IpAddr, IpHistory>,
    /// The instant of the last observation: open tenures vouch up to here.
    observed_ms: Option<u64>,
    /// The host's clock frames the observations were made in.
    frames: Frames,
    stats: HistoryStats,
}

impl LocalHistory {
    pub fn new(config: HistoryConfig) -> LocalHistory {
        LocalHistory {
            config,
            ips: BTreeMap::new(),
            observed_ms: None,
            frames: Frames::default(),
            stats: HistoryStats::default(),
        }
    }

    pub fn stats(&self) -> HistoryStats {
        self.stats
    }

    /// The retained tenures of `ip`, oldest first.
    pub fn tenures(&self, ip: IpAddr) -> &[Tenure] {
        self.ips
            .get(&ip.to_canonical())
            .map_or(&[], |h| h.tenures.as_slice())
    }

    /// Takes in what the source knows as of monotonic `now_ms`, when the host's wall
    /// clock was `frame_ms` ahead of its monotonic clock (the observation's times are on
    /// the wall clock).
    pub fn observe(&mut self, now_ms: u64, frame_ms: i64, observation: &Observation) {
        self.frames
            .observe(now_ms, frame_ms, self.config.retention_ms);
        let frames = &self.frames;
        // A source's stated time may not be later than now (a clock ahead) nor earlier
        // than a tenure's start; a release it gives no time for may have happened up to
        // the source's lag before it.
        let changed_ms = observation
            .changed_ms
            .map_or(now_ms, |c| frames.end_of(c).min(now_ms))
            .saturating_sub(self.config.source_lag_ms);
        let held: BTreeMap<IpAddr, &Held> = observation
            .held
            .iter()
            .map(|(ip, h)| (ip.to_canonical(), h))
            .collect();
        // Close what is gone or changed.
        for (ip, history) in &mut self.ips {
            let Some(open) = history.tenures.last_mut().filter(|t| t.until_ms.is_none()) else {
                continue;
            };
            // A release the source states ends the tenure there, also when a new owner
            // already holds the IP.
            let released = observation
                .released
                .get(ip)
                .map(|r| frames.end_of(*r).min(now_ms));
            let end = match held.get(ip) {
                Some(h) if h.workload == open.workload => match h.since_ms {
                    // The same workload took the IP again later: the old tenure ended.
                    Some(since)
                        if open
                            .stated_ms
                            .map_or(frames.start_of(since) > open.since_ms, |s| since > s) =>
                    {
                        let before_new = frames.end_of(since).saturating_sub(1).min(now_ms);
                        Some(released.map_or(before_new, |r| r.min(before_new)))
                    }
                    Some(_) | None => None,
                },
                Some(h) => {
                    let before_new = h.since_ms.map_or(changed_ms, |since| {
                        frames.end_of(since).saturating_sub(1).min(changed_ms)
                    });
                    Some(released.map_or(before_new, |r| r.min(before_new)))
                }
                None => Some(released.unwrap_or(changed_ms)),
            };
            // A release the source states for the old owner bounds its end, also when the
            // IP is held again already.
            let released = observation.released.get(ip).map(|r| (*r).min(now_ms));
            let end = end.map(|e| released.map_or(e, |r| e.min(r)));
            if let Some(end) = end {
                open.until_ms = Some(end.max(open.since_ms));
                open.final_claim_owed = true;
                self.stats.tenures_closed += 1;
            }
        }
        // Open what is new.
        for (ip, h) in held {
            let history = match self.ips.get(&ip) {
                Some(history) => history,
                None => {
                    if !self.make_room() {
                        self.stats.ips_dropped += 1;
                        continue;
                    }
                    self.ips.entry(ip).or_default()
                }
            };
            if history.open().is_some() {
                continue;
            }
            // Never before the previous tenure's end: tenures do not overlap.
            let after = history.ended_ms().map_or(0, |e| e + 1);
            let since = h
                .since_ms
                .map_or(now_ms, |s| self.frames.start_of(s))
                .max(after);
            let history = self.ips.entry(ip).or_default();
            history.tenures.push(Tenure {
                workload: h.workload.clone(),
                since_ms: since,
                until_ms: None,
                stated_ms: h.since_ms,
                final_claim_owed: false,
            });
            self.stats.tenures_opened += 1;
            while history.tenures.len() > self.config.tenures_per_ip_max.max(1) {
                let dropped = history.tenures.remove(0);
                history.floor_ms = dropped.until_ms.map(|u| u + 1);
                self.stats.tenures_dropped += 1;
            }
            debug_assert!(history.is_well_formed(), "tenures of {ip} out of order");
        }
        self.observed_ms = Some(self.observed_ms.map_or(now_ms, |o| o.max(now_ms)));
        self.expire(now_ms);
    }

    /// Makes room for one more IP; false when every tracked IP is held.
    fn make_room(&mut self) -> bool {
        if self.ips.len() < self.config.ips_max.max(1) {
            return true;
        }
        let oldest = self
            .ips
            .iter()
            .filter(|(_, h)| h.open().is_none())
            .min_by_key(|(_, h)| h.ended_ms())
            .map(|(ip, _)| *ip);
        match oldest {
            Some(ip) => {
                self.ips.remove(&ip);
                self.stats.ips_dropped += 1;
                true
            }
            None => false,
        }
    }

    /// Drops closed tenures that ended more than the retention ago (once their last claim
    /// went out), and IPs left with nothing.
    fn expire(&mut self, now_ms: u64) {
        let horizon = now_ms.saturating_sub(self.config.retention_ms);
        self.ips.retain(|_, history| {
            while let Some(first) = history.tenures.first() {
                match first.until_ms {
                    Some(until) if until < horizon && !first.final_claim_owed => {
                        history.floor_ms = Some(until + 1);
                        history.tenures.remove(0);
                    }
                    Some(_) | None => break,
                }
            }
            !history.tenures.is_empty() || history.floor_ms.is_some_and(|f| f >= horizon)
        });
    }

    /// How far open tenures vouch: the last observation minus the source's lag.
    fn vouched_ms(&self) -> Option<u64> {
        self.observed_ms
            .map(|o| o.saturating_sub(self.config.source_lag_ms))
    }

    /// Who held `ip` for the whole of `[start_ms, end_ms]`.
    pub fn stamp(&self, ip: IpAddr, start_ms: u64, end_ms: u64) -> Stamp {
        let Some(history) = self.ips.get(&ip.to_canonical()) else {
            return Stamp::NotLocal;
        };
        let observed = self.vouched_ms().unwrap_or(0);
        if end_ms > observed {
            return Stamp::NotYet;
        }
        let window = Window {
            start: UnixMillis(start_ms),
            end: UnixMillis(end_ms.max(start_ms)),
        }
        .widened(self.config.margin_ms);
        for t in &history.tenures {
            // An open tenure vouches up to the last observation, which the exporter made by
            // the sockets' own clock: no margin at that end.
            let covers_end = match t.until_ms {
                Some(until) => window.end.0 <= until,
                None => end_ms <= observed,
            };
            if t.since_ms <= window.start.0 && covers_end {
                return Stamp::Workload(t.workload.clone());
            }
        }
        if history.floor_ms.is_some_and(|floor| window.start.0 < floor) {
            return Stamp::Unattributed(LocalReason::Expired);
        }
        let touches = history.tenures.iter().any(|t| {
            t.since_ms <= window.end.0 && t.until_ms.is_none_or(|until| until >= window.start.0)
        });
        Stamp::Unattributed(if touches {
            LocalReason::Changed
        } else {
            LocalReason::Unknown
        })
    }

    /// This heartbeat's claims: one per open tenure, as of the last observation, and the
    /// last one of each tenure that closed since the previous heartbeat.
    pub fn claims(&mut self) -> Vec<LocalClaim> {
        let Some(observed) = self.vouched_ms() else {
            return Vec::new();
        };
        let mut claims = Vec::new();
        for (ip, history) in &mut self.ips {
            for t in &mut history.tenures {
                let until = match t.until_ms {
                    None if t.since_ms <= observed => observed,
                    None => continue,
                    Some(until) if t.final_claim_owed => {
                        t.final_claim_owed = false;
                        until
                    }
                    Some(_) => continue,
                };
                claims.push(LocalClaim {
                    ip: *ip,
                    workload: t.workload.to_string(),
                    since_ms: t.since_ms,
                    until_ms: until,
                });
            }
        }
        claims
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn observation(entries: &[(u8, &str, Option<u64>)], changed_ms: Option<u64>) -> Observation {
        Observation {
            held: entries
                .iter()
                .map(|(last, w, since)| {
                    (
                        ip(*last),
                        Held {
                            workload: Arc::from(*w),
                            since_ms: *since,
                        },
                    )
                })
                .collect(),
            changed_ms,
            released: BTreeMap::new(),
        }
    }

    fn history(margin_ms: u64) -> LocalHistory {
        LocalHistory::new(HistoryConfig {
            margin_ms,
            ..HistoryConfig::default()
        })
    }

    #[test]
    fn a_step_of_the_wall_clock_neither_ends_nor_moves_a_tenure() {
        const BOOT: i64 = 1_700_000_000_000;
        let since = BOOT as u64 + 100;
        let mut h = history(0);
        h.observe(1_000, BOOT, &observation(&[(1, "web", Some(since))], None));
        // The same statement read after steps back and forward.
        h.observe(
            9_000,
            BOOT - 5_000,
            &observation(&[(1, "web", Some(since))], None),
        );
        h.observe(
            20_000,
            BOOT + 60_000,
            &observation(&[(1, "web", Some(since))], None),
        );
        let t = h.tenures(ip(1));
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!((t[0].since_ms, t[0].until_ms), (100, None));
        assert_eq!(h.stamp(ip(1), 200, 19_000), Stamp::Workload("web".into()));
        // The source restates since on the stepped clock: the workload took the IP again
        // at monotonic 21_000.
        let again = (BOOT + 60_000) as u64 + 21_000;
        h.observe(
            22_000,
            BOOT + 60_000,
            &observation(&[(1, "web", Some(again))], None),
        );
        let t = h.tenures(ip(1));
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!((t[0].until_ms, t[1].since_ms), (Some(20_999), 21_000));
    }

    #[test]
    fn a_flow_is_stamped_only_by_a_tenure_that_covers_it_with_the_margin() {
        let mut h = history(10);
        h.observe(1_000, 0, &observation(&[(1, "web", Some(100))], None));
        // web until the source says db took over at 2_000.
        h.observe(
            3_000,
            0,
            &observation(&[(1, "db", Some(2_000))], Some(2_500)),
        );
        let stamp = |s, e| h.stamp(ip(1), s, e);
        assert_eq!(stamp(200, 1_900), Stamp::Workload(Arc::from("web")));
        assert_eq!(
            stamp(200, 1_995),
            Stamp::Unattributed(LocalReason::Changed),
            "within the margin of the change"
        );
        assert_eq!(
            stamp(1_500, 2_500),
            Stamp::Unattributed(LocalReason::Changed)
        );
        assert_eq!(stamp(2_010, 2_900), Stamp::Workload(Arc::from("db")));
        assert_eq!(
            stamp(2_010, 3_001),
            Stamp::NotYet,
            "after the last observation"
        );
        assert_eq!(stamp(50, 80), Stamp::Unattributed(LocalReason::Unknown));
        assert_eq!(
            stamp(50, 90),
            Stamp::Unattributed(LocalReason::Changed),
            "touches web"
        );
        assert_eq!(h.stamp(ip(9), 200, 300), Stamp::NotLocal);
    }

    #[test]
    fn a_change_without_times_closes_at_the_stated_change_or_when_learned() {
        let mut h = history(0);
        h.observe(
            1_000,
            0,
            &observation(&[(1, "web", None), (2, "api", None)], None),
        );
        h.observe(
            5_000,
            0,
            &observation(&[(1, "db", None)], Some(4_000)), // 2 is gone, 1 changed
        );
        let t1 = h.tenures(ip(1));
        assert_eq!(t1[0].since_ms, 1_000, "first seen");
        assert_eq!(t1[0].until_ms, Some(4_000), "the source's stated change");
        assert_eq!(t1[1].since_ms, 5_000, "the new one from when it was seen");
        assert_eq!(h.tenures(ip(2))[0].until_ms, Some(4_000));
        h.observe(6_000, 0, &observation(&[(1, "db", None)], Some(9_999)));
        assert_eq!(h.tenures(ip(1)).len(), 2, "unchanged");
        h.observe(7_000, 0, &observation(&[], None));
        assert_eq!(
            h.tenures(ip(1))[1].until_ms,
            Some(7_000),
            "no stated time: when learned"
        );
    }

    #[test]
    fn claims_state_since_and_a_closed_tenure_is_claimed_once_with_its_end() {
        let mut h = history(0);
        h.observe(1_000, 0, &observation(&[(1, "web", Some(500))], None));
        let c = h.claims();
        assert_eq!((c[0].since_ms, c[0].until_ms), (500, 1_000));
        h.observe(2_000, 0, &observation(&[(1, "db", Some(1_600))], None));
        let c = h.claims();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (&*c[0].workload, c[0].since_ms, c[0].until_ms),
            ("web", 500, 1_599)
        );
        assert_eq!(
            (&*c[1].workload, c[1].since_ms, c[1].until_ms),
            ("db", 1_600, 2_000)
        );
        h.observe(3_000, 0, &observation(&[(1, "db", Some(1_600))], None));
        let c = h.claims();
        assert_eq!(c.len(), 1, "web is never claimed again");
        assert_eq!(&*c[0].workload, "db");
    }

    #[test]
    fn retention_and_the_per_ip_limit_are_bounded_and_counted() {
        let mut h = LocalHistory::new(HistoryConfig {
            retention_ms: 10_000,
            tenures_per_ip_max: 2,
            ips_max: 2,
            margin_ms: 0,
            source_lag_ms: 0,
        });
        for (k, w) in ["a", "b", "c"].iter().enumerate() {
            let at = 1_000 * (k as u64 + 1);
            h.observe(at, 0, &observation(&[(1, w, Some(at))], None));
        }
        assert_eq!(h.tenures(ip(1)).len(), 2);
        assert_eq!(h.stats().tenures_dropped, 1);
        assert_eq!(
            h.stamp(ip(1), 1_200, 1_300),
            Stamp::Unattributed(LocalReason::Expired)
        );
        h.observe(
            4_000,
            0,
            &observation(&[(1, "c", Some(3_000)), (2, "x", None)], None),
        );
        // 1 is gone (closed): dropped to make room for 3.
        h.observe(
            4_500,
            0,
            &observation(&[(2, "x", None), (3, "y", None)], None),
        );
        assert_eq!(h.stats().ips_dropped, 1);
        assert_eq!(h.stamp(ip(1), 1_200, 1_300), Stamp::NotLocal);
        // Both held: 4 is not tracked.
        h.observe(
            5_000,
            0,
            &observation(&[(2, "x", None), (3, "y", None), (4, "z", None)], None),
        );
        assert_eq!(h.stats().ips_dropped, 2);
        assert_eq!(h.stamp(ip(4), 4_900, 5_000), Stamp::NotLocal);
        h.observe(6_000, 0, &observation(&[(3, "y", None)], None));
        let _ = h.claims();
        h.observe(17_000, 0, &observation(&[(3, "y", None)], None));
        assert!(h.tenures(ip(2)).is_empty(), "past retention");
        assert_eq!(h.stamp(ip(2), 5_000, 5_500), Stamp::NotLocal);
    }
}
