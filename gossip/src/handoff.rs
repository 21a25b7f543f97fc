//! Handoff of ownership history when the ring changes.
//!
//! When a node comes to own spans it did not own, the history of the IPs in them is held
//! by the previous owners (and, for a restarted node, by its co-owners). This module
//! decides whom to ask for which spans, and tracks each span from *pending* to *ready*,
//! so that the node answers "pending" for an IP whose history it does not have yet, never
//! a guess. It does not move the ranges itself: the node turns a [`Pull`] into the wire
//! engineer's `RangeRequest`, and calls [`Handoff::on_snapshot`] when the matching
//! `RangeSnapshot` has been merged into its engine. A node must answer a `RangeRequest`
//! only for spans that are ready on its side (see [`Handoff::is_span_ready`]); otherwise a
//! snapshot of partial data would end another node's wait early.
//!
//! **When history cannot be fetched.** If no previous owner or co-owner is alive, or none
//! answers, a pending span becomes ready after [`HandoffConfig::rebuild_after_ms`] with a
//! *history floor* at the moment it became pending. The rule, and why it is safe:
//!
//! * Every live owner of an IP heartbeats within one heartbeat interval, and each claim
//!   restates when its ownership began. So once two heartbeat intervals plus the
//!   replication delay have passed (the same deadline a pending flow waits for), every
//!   ownership that was current at or after the floor is known again from its own claims,
//!   and a conflicting claim covering that time would have arrived too.
//! * Ownership that ended before the floor is gone for good. Lookups whose window reaches
//!   before the floor must answer `expired` (before retained history), exactly as for a
//!   trimmed IP: [`Readiness::Ready::history_floor`] gives the instant. They are never
//!   answered from the partial ranges.
//! * A snapshot that arrives later still lifts the floor.
//!
//! A node that starts has no history at all: everything is pending from its start time,
//! and the co-owners it finds once it joins are asked first.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tenure_attribution::{SteadyClock, UnixMillis};

use crate::identity::NodeIdentity;
use crate::ring::{point_of, split_keyspace, Ring, Span};

/// Timing of handoff. The defaults follow the design's attribution defaults.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HandoffConfig {
    /// How often exporters restate their claims, in milliseconds (design default 10 s).
    pub heartbeat_interval_ms: u64,
    /// The most a claim takes to reach all its owners, in milliseconds.
    pub replication_delay_ms: u64,
    /// How long to wait for a snapshot before asking the next source, in milliseconds.
    pub pull_timeout_ms: u64,
    /// How long ranges are retained, in milliseconds; a history floor older than this no
    /// longer matters and is forgotten.
    pub retention_ms: u64,
}

impl Default for HandoffConfig {
    fn default() -> HandoffConfig {
        HandoffConfig {
            heartbeat_interval_ms: 10_000,
            replication_delay_ms: 5_000,
            pull_timeout_ms: 2_000,
            retention_ms: 3_600_000,
        }
    }
}

impl HandoffConfig {
    /// How long a span whose history could not be fetched stays pending: two heartbeat
    /// intervals plus the replication delay (see the module documentation).
    pub fn rebuild_after_ms(&self) -> u64 {
        self.heartbeat_interval_ms
            .saturating_mul(2)
            .saturating_add(self.replication_delay_ms)
    }
}

/// Ask `from` for the ranges of the IPs in `spans`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Pull {
    pub from: NodeIdentity,
    pub spans: Vec<Span>,
}

/// Whether lookups of an IP may be answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Readiness {
    /// The history is being fetched or rebuilt: answer pending.
    Pending,
    /// Answer from the ranges. With a floor, windows reaching before it are `expired`.
    Ready { history_floor: Option<UnixMillis> },
}

/// The state of a span we own whose history is not complete.
#[derive(Clone, PartialEq, Eq, Debug)]
enum SpanState {
    /// Waiting for a snapshot.
    Pending {
        /// When we started owning it, by the wall clock: the eventual floor.
        since: UnixMillis,
        /// The same moment in steady time: the deadline counts from here.
        pending_from: UnixMillis,
        /// Whom to ask, previous owners first; all alive when the ring was built.
        sources: Vec<NodeIdentity>,
        /// Index into `sources` of the one asked last.
        next_source: usize,
        /// When it was asked (steady time), or `None` if nobody was asked yet.
        asked_at: Option<UnixMillis>,
    },
    /// Rebuilt from heartbeats after nobody could send it: ready, with a floor.
    Rebuilt { floor: UnixMillis },
}

/// Handoff state of one node. Spans not listed are ready with no floor.
#[derive(Clone, Debug)]
pub struct Handoff {
    local: NodeIdentity,
    config: HandoffConfig,
    /// Disjoint spans by start: `start -> (end, state)`.
    spans: BTreeMap<u64, (u64, SpanState)>,
    /// Deadlines and retries count in steady time, so that a wall clock stepped back
    /// does not keep spans pending for the length of the step.
    steady: SteadyClock,
}

impl Handoff {
    /// A node that just started: every span it owns on `ring` is pending from `now`.
    pub fn new(
        local: NodeIdentity,
        ring: &Ring,
        now: UnixMillis,
        config: HandoffConfig,
    ) -> Handoff {
        let mut steady = SteadyClock::new();
        let at = steady.observe(now);
        let mut handoff = Handoff {
            local,
            config,
            spans: BTreeMap::new(),
            steady,
        };
        for (span, owners) in ring.spans() {
            if owners
                .iter()
                .any(|o| o.node_id() == handoff.local.node_id())
            {
                let sources = handoff.sources(owners, ring);
                handoff.spans.insert(
                    span.start,
                    (
                        span.end,
                        SpanState::Pending {
                            since: now,
                            pending_from: at,
                            sources,
                            next_source: 0,
                            asked_at: None,
                        },
                    ),
                );
            }
        }
        if ring.members().is_empty() {
            // Not even ourselves on the ring yet: treat the whole keyspace as ours-to-be.
            handoff.spans.clear();
            handoff.spans.insert(
                0,
                (
                    u64::MAX,
                    SpanState::Pending {
                        since: now,
                        pending_from: at,
                        sources: Vec::new(),
                        next_source: 0,
                        asked_at: None,
                    },
                ),
            );
        }
        handoff.coalesce();
        handoff
    }

    /// The ring changed from `old` to `new` (both over live LAN members and ourselves).
    /// Spans we no longer own are forgotten; spans we newly own become pending; pending
    /// spans we keep get their sources refreshed. Returns whom to ask for what.
    pub fn on_ring_change(&mut self, old: &Ring, new: &Ring, now: UnixMillis) -> Vec<Pull> {
        let at = self.steady.observe(now);
        let mut ends: Vec<u64> = old.boundaries();
        ends.extend(new.boundaries());
        for (start, (end, _)) in &self.spans {
            if let Some(before) = start.checked_sub(1) {
                ends.push(before);
            }
            ends.push(*end);
        }
        ends.sort_unstable();
        ends.dedup();

        let me = self.local.node_id().to_owned();
        let mut next: BTreeMap<u64, (u64, SpanState)> = BTreeMap::new();
        for segment in split_keyspace(&ends) {
            let new_owners = new.owners_of_point(segment.end);
            if !new_owners.iter().any(|o| o.node_id() == me) {
                continue;
            }
            let old_owners = old.owners_of_point(segment.end);
            let sources = self.sources(old_owners.iter().chain(new_owners), new);
            let state = match self.state_at(segment.start) {
                Some(SpanState::Pending {
                    since,
                    pending_from,
                    next_source,
                    asked_at,
                    sources: previous,
                }) => {
                    // Keep asking whom we asked if it is still a source.
                    let asked = previous.get(*next_source).map(NodeIdentity::node_id);
                    let keep = asked.and_then(|a| sources.iter().position(|s| s.node_id() == a));
                    SpanState::Pending {
                        since: *since,
                        pending_from: *pending_from,
                        next_source: keep.unwrap_or(0),
                        asked_at: keep.and(*asked_at),
                        sources,
                    }
                }
                Some(SpanState::Rebuilt { floor }) => SpanState::Rebuilt { floor: *floor },
                None if old_owners.iter().any(|o| o.node_id() == me) => continue,
                None => SpanState::Pending {
                    since: now,
                    pending_from: at,
                    sources,
                    next_source: 0,
                    asked_at: None,
                },
            };
            next.insert(segment.start, (segment.end, state));
        }
        self.spans = next;
        self.coalesce();
        self.collect_pulls(at)
    }

    /// A snapshot of `span` has been merged: the pending and rebuilt parts of
    /// `span` are ready with no floor.
    pub fn on_snapshot(&mut self, span: Span) {
        self.split_at(span.start);
        if let Some(after) = span.end.checked_add(1) {
            self.split_at(after);
        }
        let covered: Vec<u64> = self
            .spans
            .range(span.start..=span.end)
            .filter(|(_, (end, _))| *end <= span.end)
            .map(|(start, _)| *start)
            .collect();
        for start in covered {
            self.spans.remove(&start);
        }
        self.coalesce();
    }

    /// Time passed: pending spans past their deadline are rebuilt (with a floor), unanswered
    /// requests go to the next source, and floors older than retention are forgotten.
    pub fn tick(&mut self, now: UnixMillis) -> Vec<Pull> {
        let at = self.steady.observe(now);
        let rebuild_after_ms = self.config.rebuild_after_ms();
        let retention_ms = self.config.retention_ms;
        let pull_timeout_ms = self.config.pull_timeout_ms;
        let mut forget = Vec::new();
        for (start, (_, state)) in self.spans.iter_mut() {
            match state {
                SpanState::Pending {
                    since,
                    pending_from,
                    sources,
                    next_source,
                    asked_at,
                } => {
                    if at.since(*pending_from) >= rebuild_after_ms {
                        *state = SpanState::Rebuilt { floor: *since };
                    } else if asked_at.is_some_and(|t| at.since(t) >= pull_timeout_ms)
                        && !sources.is_empty()
                    {
                        *next_source = (*next_source + 1) % sources.len();
                        *asked_at = None;
                    }
                }
                SpanState::Rebuilt { floor } => {
                    if now.since(*floor) >= retention_ms {
                        forget.push(*start);
                    }
                }
            }
        }
        for start in forget {
            self.spans.remove(&start);
        }
        self.coalesce();
        self.collect_pulls(at)
    }

    /// Whether lookups of `ip` may be answered now.
    pub fn readiness(&self, ip: IpAddr) -> Readiness {
        match self.state_at(point_of(ip)) {
            Some(SpanState::Pending { .. }) => Readiness::Pending,
            Some(SpanState::Rebuilt { floor }) => Readiness::Ready {
                history_floor: Some(*floor),
            },
            None => Readiness::Ready {
                history_floor: None,
            },
        }
    }

    /// Whether lookups of `ip` may be answered now (a floor may still apply, see
    /// [`Handoff::readiness`]).
    pub fn is_ready(&self, ip: IpAddr) -> bool {
        match self.readiness(ip) {
            Readiness::Pending => false,
            Readiness::Ready { .. } => true,
        }
    }

    /// Whether no point of `span` is pending or rebuilt: only then may this node send a
    /// snapshot of `span` to another, since a snapshot ends the other's wait.
    pub fn is_span_ready(&self, span: Span) -> bool {
        !self
            .spans
            .iter()
            .any(|(start, (end, _))| *start <= span.end && span.start <= *end)
    }

    /// How many spans are waiting for a snapshot.
    pub fn pending_spans(&self) -> usize {
        self.spans
            .values()
            .filter(|(_, state)| matches!(state, SpanState::Pending { .. }))
            .count()
    }

    /// Previous owners first, then co-owners, without ourselves, only those on `alive`.
    fn sources<'o>(
        &self,
        owners: impl IntoIterator<Item = &'o NodeIdentity>,
        alive: &Ring,
    ) -> Vec<NodeIdentity> {
        let mut sources: Vec<NodeIdentity> = Vec::new();
        for owner in owners {
            if owner.node_id() != self.local.node_id()
                && alive.contains(owner.node_id())
                && !sources.iter().any(|s| s.node_id() == owner.node_id())
            {
                sources.push(owner.clone());
            }
        }
        sources
    }

    fn state_at(&self, point: u64) -> Option<&SpanState> {
        self.spans
            .range(..=point)
            .next_back()
            .filter(|(_, (end, _))| point <= *end)
            .map(|(_, (_, state))| state)
    }

    /// Splits the entry containing `point` so that an entry starts at `point`.
    fn split_at(&mut self, point: u64) {
        let Some((&start, (end, state))) = self.spans.range(..point).next_back() else {
            return;
        };
        if *end < point {
            return;
        }
        let (end, state) = (*end, state.clone());
        self.spans.insert(start, (point - 1, state.clone()));
        self.spans.insert(point, (end, state));
    }

    /// Merges adjacent entries with equal states, keeping the map small.
    fn coalesce(&mut self) {
        let mut merged: BTreeMap<u64, (u64, SpanState)> = BTreeMap::new();
        let mut last: Option<u64> = None;
        for (start, (end, state)) in std::mem::take(&mut self.spans) {
            if let Some(prev) = last.and_then(|s| merged.get_mut(&s)) {
                if prev.0.checked_add(1) == Some(start) && prev.1 == state {
                    prev.0 = end;
                    continue;
                }
            }
            merged.insert(start, (end, state));
            last = Some(start);
        }
        self.spans = merged;
    }

    /// Asks a source for every pending span nobody was asked for, grouped by source; `at`
    /// is steady time.
    fn collect_pulls(&mut self, at: UnixMillis) -> Vec<Pull> {
        let mut by_source: BTreeMap<String, Pull> = BTreeMap::new();
        for (start, (end, state)) in self.spans.iter_mut() {
            let SpanState::Pending {
                sources,
                next_source,
                asked_at,
                ..
            } = state
            else {
                continue;
            };
            if asked_at.is_some() {
                continue;
            }
            let Some(source) = sources.get(*next_source) else {
                continue;
            };
            *asked_at = Some(at);
            by_source
                .entry(source.node_id().to_owned())
                .or_insert_with(|| Pull {
                    from: source.clone(),
                    spans: Vec::new(),
                })
                .spans
                .push(Span {
                    start: *start,
                    end: *end,
                });
        }
        by_source.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RingConfig;

    fn node(name: &str) -> NodeIdentity {
        let addr = "127.0.0.1:1".parse().unwrap();
        NodeIdentity::new(name, "r", addr, addr, 1).unwrap()
    }

    fn ring(names: &[&str]) -> Ring {
        let members: Vec<_> = names.iter().map(|n| node(n)).collect();
        Ring::new(&members, RingConfig::default())
    }

    fn ips() -> impl Iterator<Item = IpAddr> {
        (0..2000u32).map(|i| IpAddr::V4((0x0a00_0000 + i * 13).into()))
    }

    #[test]
    fn a_new_node_is_pending_until_the_snapshots_arrive() {
        let t0 = UnixMillis(1_000_000);
        let alone = ring(&["c"]);
        let mut handoff = Handoff::new(node("c"), &alone, t0, HandoffConfig::default());
        assert!(ips().all(|ip| !handoff.is_ready(ip)));
        let joined = ring(&["a", "b", "c"]);
        let pulls = handoff.on_ring_change(&alone, &joined, t0);
        assert!(!pulls.is_empty());
        assert!(pulls.iter().all(|p| p.from.node_id() != "c"));
        for pull in &pulls {
            for span in &pull.spans {
                handoff.on_snapshot(*span);
            }
        }
        assert_eq!(handoff.pending_spans(), 0);
        assert!(ips().all(|ip| handoff.readiness(ip)
            == Readiness::Ready {
                history_floor: None
            }));
    }

    #[test]
    fn spans_taken_over_from_a_dead_node_are_asked_from_the_survivor() {
        let t0 = UnixMillis(1_000_000);
        let before = ring(&["a", "b", "c"]);
        let mut handoff = Handoff::new(node("a"), &before, t0, HandoffConfig::default());
        for (span, _) in before.spans() {
            handoff.on_snapshot(span);
        }
        assert_eq!(handoff.pending_spans(), 0);
        let after = ring(&["a", "b"]);
        let pulls = handoff.on_ring_change(&before, &after, t0);
        assert_eq!(pulls.len(), 1);
        assert_eq!(pulls[0].from.node_id(), "b");
        // Exactly the IPs a did not own before are pending.
        for ip in ips() {
            let owned_before = before.owners(ip).iter().any(|o| o.node_id() == "a");
            assert_eq!(handoff.is_ready(ip), owned_before, "{ip}");
        }
    }

    #[test]
    fn unanswered_requests_rotate_and_end_rebuilt_with_a_floor() {
        let config = HandoffConfig::default();
        let t0 = UnixMillis(1_000_000);
        // "a" joins a running region: each span it takes has two sources, the previous
        // owners, so a request that times out goes to the other one.
        let before = ring(&["b", "c", "d"]);
        let mut handoff = Handoff::new(node("a"), &before, t0, config);
        assert_eq!(handoff.pending_spans(), 0, "a owns nothing before it joins");
        let joined = ring(&["a", "b", "c", "d"]);
        let first = handoff.on_ring_change(&before, &joined, t0);
        let retry = handoff.tick(t0.plus(config.pull_timeout_ms));
        assert!(!first.is_empty() && !retry.is_empty());
        assert_ne!(first, retry, "a timed-out request goes to another source");
        assert!(ips().any(|ip| !handoff.is_ready(ip)));
        handoff.tick(t0.plus(config.rebuild_after_ms()));
        assert_eq!(handoff.pending_spans(), 0);
        assert!(ips().all(|ip| handoff.readiness(ip)
            == Readiness::Ready {
                history_floor: Some(t0)
            }
            || handoff.readiness(ip)
                == Readiness::Ready {
                    history_floor: None
                }));
        assert!(ips().any(|ip| handoff.readiness(ip)
            == Readiness::Ready {
                history_floor: Some(t0)
            }));
        handoff.tick(t0.plus(config.retention_ms));
        assert!(ips().all(|ip| handoff.readiness(ip)
            == Readiness::Ready {
                history_floor: None
            }));
    }

    #[test]
    fn spans_no_longer_owned_are_forgotten() {
        let t0 = UnixMillis(5);
        let alone = ring(&["a"]);
        let mut handoff = Handoff::new(node("a"), &alone, t0, HandoffConfig::default());
        let bigger = ring(&["a", "b", "c", "d"]);
        handoff.on_ring_change(&alone, &bigger, t0);
        for ip in ips() {
            let owns = bigger.owners(ip).iter().any(|o| o.node_id() == "a");
            assert_eq!(!handoff.is_ready(ip), owns, "{ip}");
        }
        assert!(!handoff.is_span_ready(Span::FULL));
    }

    #[test]
    fn a_clock_stepped_back_does_not_keep_spans_pending_for_the_step() {
        let config = HandoffConfig::default();
        let t0 = UnixMillis(10_000_000);
        let before = ring(&["b", "c", "d"]);
        let mut handoff = Handoff::new(node("a"), &before, t0, config);
        let joined = ring(&["a", "b", "c", "d"]);
        handoff.on_ring_change(&before, &joined, t0);
        assert!(handoff.pending_spans() > 0);
        // The wall clock steps back by five minutes, then goes on at its pace.
        let back = t0.minus(300_000);
        handoff.tick(back);
        handoff.tick(back.plus(config.rebuild_after_ms()));
        assert_eq!(
            handoff.pending_spans(),
            0,
            "rebuilt once rebuild_after_ms has passed, whatever the clock read"
        );
        assert!(ips().any(|ip| handoff.readiness(ip)
            == Readiness::Ready {
                history_floor: Some(t0)
            }));
    }
}
