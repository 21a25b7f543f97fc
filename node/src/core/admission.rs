//! Admission of exporter input: the checks a batch from an exporter passes before any of
//! its claims reaches the engine.
//!
//! A forged or wild claim is the one input that can make tenure misattribute, so the core
//! checks every exporter claim itself rather than trusting the channel it came on:
//!
//! - its timestamps lie in `[now − claim_delay_max_ms, now + claim_skew_max_ms]` (an
//!   exporter's heartbeat is about *now*; a claim from the far future would extend an
//!   ownership that nobody has vouched for yet, and one from the far past is either a
//!   replay or too late to matter, since every heartbeat restates `since`);
//! - its IP is in a prefix of this collector's own region (an exporter only talks to the
//!   collectors of its region, so it has no business claiming another region's IPs);
//! - its exporter stays under a claims-per-second and a flows-per-second budget (token
//!   buckets keyed by exporter id, in a bounded table);
//! - when exporters hold their own credentials, its IP (and, where restricted, its
//!   workload name) lies within what the registry entitles the exporter to, the exporter
//!   being the one its credential proves ([`super::entitlement`]); a revoked credential
//!   sends nothing.
//!
//! Everything here is sans-io: `now` is an argument and the table is ordered.
//! Every refusal is counted by reason ([`AdmissionStats`]); none changes the engine.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use tenure_attribution::UnixMillis;

use super::entitlement::Entitlements;

/// How often the refusals of one exporter are logged, at most, in ms: a compromised or
/// misconfigured host refused at every heartbeat makes one line per interval, not one per
/// claim.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

/// Limits on what exporters may send. Defaults are in [`AdmissionConfig::default`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AdmissionConfig {
    /// How far behind `now` a claim's `until_ms` may be, in ms. Default 600,000 (10 min):
    /// well above the heartbeat interval and a collector fail-over, and a late claim loses
    /// nothing because the next heartbeat restates `since`.
    pub claim_delay_max_ms: u64,
    /// How far ahead of `now` a claim's `since_ms` or `until_ms` may be, in ms: the clock
    /// skew tolerated between an exporter and a collector. Default 10,000.
    pub claim_skew_max_ms: u64,
    /// Claims per second one exporter may send, sustained. Default 2,000 (a host with
    /// 20,000 local IPs at a 10 s heartbeat).
    pub exporter_claims_per_sec_max: u32,
    /// Claims one exporter may send at once (bucket size). At least one batch's worth.
    /// Default 8,192.
    pub exporter_claims_burst_max: u32,
    /// Flows per second one exporter may send, sustained; each batch costs at least one,
    /// so that floods of empty batches are limited too. Default 50,000.
    pub exporter_flows_per_sec_max: u32,
    /// Flows one exporter may send at once (bucket size). At least one batch's worth.
    /// Default 65,536.
    pub exporter_flows_burst_max: u32,
    /// Exporters whose buckets are kept. Past it, idle exporters (full buckets, which a
    /// fresh bucket would equal) are forgotten; when none is idle, the newcomers share one
    /// overflow bucket, so that cycling exporter ids cannot reset anyone's budget.
    /// Default 65,536.
    pub exporters_tracked_max: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            claim_delay_max_ms: 600_000,
            claim_skew_max_ms: 10_000,
            exporter_claims_per_sec_max: 2_000,
            exporter_claims_burst_max: 8_192,
            exporter_flows_per_sec_max: 50_000,
            exporter_flows_burst_max: 65_536,
            exporters_tracked_max: 65_536,
        }
    }
}

/// Why a claim (or a whole exporter message) was refused. Also the `reason` label of
/// `tenure_claims_rejected_total` and `tenure_exporter_messages_rejected_total`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Rejection {
    /// `until_ms` is more than `claim_delay_max_ms` behind now.
    Stale,
    /// `since_ms` or `until_ms` is more than `claim_skew_max_ms` ahead of now.
    Future,
    /// `since_ms` is after `until_ms`.
    Inverted,
    /// The IP is not in a prefix of this collector's region.
    ForeignCidr,
    /// The exporter is over its claims or flows budget; the batch is answered `busy`.
    RateLimited,
    /// The exporter key was used for a message only collectors send (claim batches,
    /// range requests and snapshots, event batches, acks, directories).
    PeerOnly,
    /// The exporter key was used for a batch marked as forwarded by a collector.
    Relayed,
    /// The batch's `sent_ms` was more than δ off the other exporters' (see
    /// [`super::clocks`]): its claims are refused and its flows go out unattributed.
    ExporterClock,
    /// The exporter's credential does not entitle it to the claim's IP or workload name.
    NotEntitled,
    /// The batch came under a credential the registry lists as revoked (or under one the
    /// entitlements do not list); the batch is answered `rejected: revoked`.
    Revoked,
}

impl Rejection {
    /// Every reason, for metrics.
    pub const ALL: [Rejection; 10] = [
        Rejection::Stale,
        Rejection::Future,
        Rejection::Inverted,
        Rejection::ForeignCidr,
        Rejection::RateLimited,
        Rejection::PeerOnly,
        Rejection::Relayed,
        Rejection::ExporterClock,
        Rejection::NotEntitled,
        Rejection::Revoked,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Stale => "stale",
            Rejection::Future => "future",
            Rejection::Inverted => "inverted",
            Rejection::ForeignCidr => "foreign_cidr",
            Rejection::RateLimited => "rate_limited",
            Rejection::PeerOnly => "peer_only",
            Rejection::Relayed => "relayed",
            Rejection::ExporterClock => "exporter_clock",
            Rejection::NotEntitled => "not_entitled",
            Rejection::Revoked => "revoked",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of refusals, monotonic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Claims refused, by reason (a rate-limited batch counts each of its claims).
    pub claims_rejected: BTreeMap<Rejection, u64>,
    /// Exporter messages refused as a whole, by reason.
    pub messages_rejected: BTreeMap<Rejection, u64>,
    /// Exporters whose buckets are held now.
    pub exporters_tracked: usize,
}

/// Refusals of one exporter's claims and batches since they were last logged.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RefusalTally {
    /// Claims refused as not entitled.
    pub claims_not_entitled: u64,
    /// Batches refused under a revoked credential.
    pub batches_revoked: u64,
    /// One IP it claimed without entitlement, for the log line.
    pub example_ip: Option<IpAddr>,
}

/// A token bucket in thousandths of a token, so that refill is exact integer arithmetic:
/// `r` tokens per second are `r` milli-tokens per millisecond.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Bucket {
    milli_tokens: u64,
    refilled_at: UnixMillis,
}

impl Bucket {
    fn full(capacity: u32, now: UnixMillis) -> Bucket {
        Bucket {
            milli_tokens: u64::from(capacity) * 1_000,
            refilled_at: now,
        }
    }

    fn refill(&mut self, per_sec: u32, capacity: u32, now: UnixMillis) {
        let elapsed_ms = now.0.saturating_sub(self.refilled_at.0);
        let cap = u64::from(capacity) * 1_000;
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed_ms.saturating_mul(u64::from(per_sec)))
            .min(cap);
        // A clock that went backwards refills nothing and does not move the mark back.
        self.refilled_at = UnixMillis(self.refilled_at.0.max(now.0));
    }

    fn has(&self, tokens: u64) -> bool {
        self.milli_tokens >= tokens.saturating_mul(1_000)
    }

    fn take(&mut self, tokens: u64) {
        self.milli_tokens = self
            .milli_tokens
            .saturating_sub(tokens.saturating_mul(1_000));
    }

    fn is_full(&self, capacity: u32) -> bool {
        self.milli_tokens >= u64::from(capacity) * 1_000
    }
}

/// The claims and flows buckets of one exporter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Budget {
    claims: Bucket,
    flows: Bucket,
}

/// The admission state of a core: config, buckets, counters.
#[derive(Debug)]
pub(crate) struct Admission {
    config: AdmissionConfig,
    budgets: BTreeMap<u64, Budget>,
    /// Shared by exporters that arrive while the table is full of busy ones.
    overflow: Option<Budget>,
    stats: AdmissionStats,
    /// What each exporter may claim; `None` when exporters share a key (or the cluster
    /// key), and then nothing proves who sent a batch.
    entitlements: Option<Entitlements>,
    /// Refusals by exporter not logged yet; bounded like the buckets.
    unlogged: BTreeMap<u64, RefusalTally>,
    logged_at: Option<UnixMillis>,
}

impl Admission {
    pub(crate) fn new(config: AdmissionConfig) -> Admission {
        Admission {
            config,
            budgets: BTreeMap::new(),
            overflow: None,
            stats: AdmissionStats::default(),
            entitlements: None,
            unlogged: BTreeMap::new(),
            logged_at: None,
        }
    }

    /// Replaces what exporters may claim (a registry reload); `None` turns the checks off.
    pub(crate) fn set_entitlements(&mut self, entitlements: Option<Entitlements>) {
        self.entitlements = entitlements;
    }

    pub(crate) fn entitlements(&self) -> Option<&Entitlements> {
        self.entitlements.as_ref()
    }

    /// Notes a refusal for the next log line of `exporter_id`.
    pub(crate) fn note_refusal(&mut self, exporter_id: u64, reason: Rejection, ip: Option<IpAddr>) {
        if !self.unlogged.contains_key(&exporter_id)
            && self.unlogged.len() >= self.config.exporters_tracked_max
        {
            // Counted in the metrics all the same; only the log line is skipped.
            return;
        }
        let tally = self.unlogged.entry(exporter_id).or_default();
        match reason {
            Rejection::NotEntitled => {
                tally.claims_not_entitled += 1;
                if tally.example_ip.is_none() {
                    tally.example_ip = ip;
                }
            }
            Rejection::Revoked => tally.batches_revoked += 1,
            Rejection::Stale
            | Rejection::Future
            | Rejection::Inverted
            | Rejection::ForeignCidr
            | Rejection::RateLimited
            | Rejection::PeerOnly
            | Rejection::Relayed
            | Rejection::ExporterClock => {}
        }
    }

    /// The refusals to log now, by exporter: all of them once per
    /// [`REFUSAL_LOG_INTERVAL_MS`], nothing in between.
    pub(crate) fn refusals_to_log(&mut self, now: UnixMillis) -> Vec<(u64, RefusalTally)> {
        if self.unlogged.is_empty() {
            return Vec::new();
        }
        if let Some(at) = self.logged_at {
            if now.0.saturating_sub(at.0) < REFUSAL_LOG_INTERVAL_MS {
                return Vec::new();
            }
        }
        self.logged_at = Some(now);
        std::mem::take(&mut self.unlogged).into_iter().collect()
    }

    pub(crate) fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    pub(crate) fn stats(&self) -> &AdmissionStats {
        &self.stats
    }

    /// Whether a claim's timestamps are acceptable at `now`.
    pub(crate) fn check_times(
        &self,
        since_ms: u64,
        until_ms: u64,
        now: UnixMillis,
    ) -> Result<(), Rejection> {
        let latest = now.0.saturating_add(self.config.claim_skew_max_ms);
        let earliest = now.0.saturating_sub(self.config.claim_delay_max_ms);
        if since_ms > until_ms {
            return Err(Rejection::Inverted);
        }
        if until_ms > latest {
            return Err(Rejection::Future);
        }
        if until_ms < earliest {
            return Err(Rejection::Stale);
        }
        Ok(())
    }

    /// Takes `claims` claim tokens and `max(flows, 1)` flow tokens from `exporter_id`'s
    /// budget, or nothing when either is short.
    pub(crate) fn take(
        &mut self,
        exporter_id: u64,
        claims: usize,
        flows: usize,
        now: UnixMillis,
    ) -> Result<(), Rejection> {
        let c = self.config;
        let fresh = Budget {
            claims: Bucket::full(c.exporter_claims_burst_max, now),
            flows: Bucket::full(c.exporter_flows_burst_max, now),
        };
        if !self.budgets.contains_key(&exporter_id) && self.budgets.len() >= c.exporters_tracked_max
        {
            self.forget_idle(now);
        }
        let budget = if self.budgets.len() < c.exporters_tracked_max
            || self.budgets.contains_key(&exporter_id)
        {
            self.budgets.entry(exporter_id).or_insert(fresh)
        } else {
            self.overflow.get_or_insert(fresh)
        };
        budget.claims.refill(
            c.exporter_claims_per_sec_max,
            c.exporter_claims_burst_max,
            now,
        );
        budget.flows.refill(
            c.exporter_flows_per_sec_max,
            c.exporter_flows_burst_max,
            now,
        );
        let claims = claims as u64;
        let flows = (flows as u64).max(1);
        let result = if budget.claims.has(claims) && budget.flows.has(flows) {
            budget.claims.take(claims);
            budget.flows.take(flows);
            Ok(())
        } else {
            Err(Rejection::RateLimited)
        };
        self.stats.exporters_tracked = self.budgets.len();
        debug_assert!(
            self.budgets.len() <= c.exporters_tracked_max,
            "the exporter table is bounded"
        );
        result
    }

    /// Drops every exporter whose buckets have refilled: a fresh entry would be the same.
    fn forget_idle(&mut self, now: UnixMillis) {
        let c = self.config;
        self.budgets.retain(|_, b| {
            b.claims.refill(
                c.exporter_claims_per_sec_max,
                c.exporter_claims_burst_max,
                now,
            );
            b.flows.refill(
                c.exporter_flows_per_sec_max,
                c.exporter_flows_burst_max,
                now,
            );
            !(b.claims.is_full(c.exporter_claims_burst_max)
                && b.flows.is_full(c.exporter_flows_burst_max))
        });
    }

    pub(crate) fn count_claims(&mut self, reason: Rejection, n: u64) {
        *self.stats.claims_rejected.entry(reason).or_default() += n;
    }

    pub(crate) fn count_message(&mut self, reason: Rejection) {
        *self.stats.messages_rejected.entry(reason).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate_and_cap_at_their_burst() {
        let config = AdmissionConfig {
            exporter_claims_per_sec_max: 10,
            exporter_claims_burst_max: 20,
            exporter_flows_per_sec_max: 100,
            exporter_flows_burst_max: 100,
            ..AdmissionConfig::default()
        };
        let mut a = Admission::new(config);
        let t = UnixMillis(1_000_000);
        assert_eq!(a.take(1, 20, 0, t), Ok(()));
        assert_eq!(a.take(1, 1, 0, t), Err(Rejection::RateLimited));
        // 500 ms refill 5 claims.
        assert_eq!(a.take(1, 5, 0, UnixMillis(t.0 + 500)), Ok(()));
        assert_eq!(
            a.take(1, 1, 0, UnixMillis(t.0 + 500)),
            Err(Rejection::RateLimited)
        );
        // Another exporter has its own budget.
        assert_eq!(a.take(2, 20, 0, t), Ok(()));
        // A long pause refills only up to the burst.
        assert_eq!(
            a.take(1, 21, 0, UnixMillis(t.0 + 100_000)),
            Err(Rejection::RateLimited)
        );
        assert_eq!(a.take(1, 20, 0, UnixMillis(t.0 + 100_000)), Ok(()));
    }

    #[test]
    fn the_table_is_bounded_and_cycling_ids_does_not_reset_budgets() {
        let config = AdmissionConfig {
            exporter_flows_per_sec_max: 1,
            exporter_flows_burst_max: 2,
            exporters_tracked_max: 4,
            ..AdmissionConfig::default()
        };
        let mut a = Admission::new(config);
        let t = UnixMillis(5_000);
        for id in 0..4 {
            assert_eq!(a.take(id, 0, 2, t), Ok(()));
        }
        // The table is full of busy exporters: newcomers share the overflow bucket.
        assert_eq!(a.take(100, 0, 2, t), Ok(()));
        assert_eq!(a.take(101, 0, 1, t), Err(Rejection::RateLimited));
        assert_eq!(a.stats().exporters_tracked, 4);
        // Once idle (refilled), old entries make room again.
        assert_eq!(a.take(102, 0, 1, UnixMillis(t.0 + 10_000)), Ok(()));
        assert!(a.stats().exporters_tracked <= 4);
    }

    #[test]
    fn refusals_are_logged_once_per_exporter_and_interval() {
        let mut a = Admission::new(AdmissionConfig::default());
        let t = UnixMillis(1_000_000);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        for _ in 0..3 {
            a.note_refusal(7, Rejection::NotEntitled, Some(ip));
        }
        a.note_refusal(8, Rejection::Revoked, None);
        let first = a.refusals_to_log(t);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].0, 7);
        assert_eq!(first[0].1.claims_not_entitled, 3);
        assert_eq!(first[0].1.example_ip, Some(ip));
        assert_eq!(first[1].1.batches_revoked, 1);
        a.note_refusal(7, Rejection::NotEntitled, Some(ip));
        assert!(a.refusals_to_log(UnixMillis(t.0 + 1_000)).is_empty());
        let later = a.refusals_to_log(UnixMillis(t.0 + REFUSAL_LOG_INTERVAL_MS));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].1.claims_not_entitled, 1);
    }

    #[test]
    fn claim_times_must_be_near_now() {
        let a = Admission::new(AdmissionConfig {
            claim_delay_max_ms: 1_000,
            claim_skew_max_ms: 100,
            ..AdmissionConfig::default()
        });
        let now = UnixMillis(10_000);
        assert_eq!(a.check_times(0, 10_000, now), Ok(()));
        assert_eq!(a.check_times(9_000, 10_100, now), Ok(()));
        assert_eq!(a.check_times(9_000, 10_101, now), Err(Rejection::Future));
        assert_eq!(a.check_times(0, 8_999, now), Err(Rejection::Stale));
        assert_eq!(a.check_times(10_001, 10_000, now), Err(Rejection::Inverted));
        assert_eq!(a.check_times(0, u64::MAX, now), Err(Rejection::Future));
    }
}
