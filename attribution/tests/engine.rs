//! The ownership-range rules of docs/design.md, one scenario each.

use std::net::IpAddr;
use std::num::NonZeroUsize;

use tenure_attribution::{
    Attribution, Claim, ClaimEffect, ClaimError, Engine, EngineConfig, FlowQuery, IpEvent, Lookup,
    Outputs, Reason, SegmentOwner, Source, UnixMillis, Verdict, Window,
};

const S: u64 = 1_000; // one second in ms
const T0: u64 = 1_700_000_000_000;

fn t(seconds: u64) -> UnixMillis {
    UnixMillis(T0 + seconds * S)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Harness {
    engine: Engine<u32>,
    out: Outputs<u32>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(EngineConfig::default())
    }

    fn with(config: EngineConfig) -> Harness {
        Harness {
            engine: Engine::new(config).unwrap(),
            out: Outputs::default(),
        }
    }

    /// `workload` heartbeats `addr`: held since `since`, as of `until` (seconds).
    fn heartbeat(&mut self, addr: &str, workload: &str, since: u64, until: u64) -> ClaimEffect {
        let id = self.engine.intern(workload).unwrap();
        let claim = Claim {
            ip: ip(addr),
            workload: id,
            since: t(since),
            until: t(until),
        };
        self.engine
            .apply_claim(claim, t(until), &mut self.out)
            .unwrap()
    }

    /// A flow to `addr` over `[start, end]` (seconds), arriving at `end`.
    fn flow(&mut self, id: u32, addr: &str, start: u64, end: u64) {
        let window = Window::new(t(start), t(end)).unwrap();
        let flow = FlowQuery {
            remote: ip(addr),
            window,
            payload: id,
        };
        self.engine.submit(flow, t(end), &mut self.out);
    }

    fn verdict(&mut self, id: u32) -> Option<Verdict> {
        let index = self.out.resolved.iter().position(|r| r.payload == id)?;
        Some(self.out.resolved.remove(index).verdict)
    }
}

fn heartbeat_of(name: &str) -> Option<Verdict> {
    Some(Verdict::Attributed(Attribution::Heartbeat(name.into())))
}

#[test]
fn a_flow_inside_a_range_is_attributed_at_once() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "api", 0, 30);
    h.flow(1, "10.0.0.1", 10, 12);
    assert_eq!(h.verdict(1), heartbeat_of("api"));
}

#[test]
fn a_flow_past_the_last_heartbeat_waits_and_the_next_heartbeat_attributes_it() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "api", 0, 10);
    h.flow(1, "10.0.0.1", 9, 10); // needs coverage until 11 s (δ = 1 s)
    assert_eq!(h.verdict(1), None);
    assert_eq!(h.engine.pending_len(), 1);
    h.heartbeat("10.0.0.1", "api", 0, 20);
    assert_eq!(h.verdict(1), heartbeat_of("api"));
    assert_eq!(h.engine.pending_len(), 0);
}

#[test]
fn a_flow_never_covered_goes_out_at_its_deadline_as_no_owner() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "api", 0, 10);
    h.flow(1, "10.0.0.1", 30, 31);
    assert_eq!(h.engine.next_deadline(), Some(t(31 + 25)));
    h.engine.tick(t(55), &mut h.out);
    assert_eq!(h.verdict(1), None);
    h.engine.tick(t(56), &mut h.out);
    assert_eq!(h.verdict(1), Some(Verdict::Unattributed(Reason::NoOwner)));
}

#[test]
fn a_reused_ip_is_attributed_to_the_owner_at_the_time_of_the_flow() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "old", 0, 100);
    h.heartbeat("10.0.0.1", "new", 105, 200);
    h.flow(1, "10.0.0.1", 50, 51);
    h.flow(2, "10.0.0.1", 150, 151);
    assert_eq!(h.verdict(1), heartbeat_of("old"));
    assert_eq!(h.verdict(2), heartbeat_of("new"));
}

#[test]
fn a_flow_within_the_skew_margin_of_a_handover_is_ambiguous_at_once() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "old", 0, 100);
    h.heartbeat("10.0.0.1", "new", 101, 200);
    let flow = FlowQuery {
        remote: ip("10.0.0.1"),
        window: Window::at(UnixMillis(t(100).0 + 500)),
        payload: 1,
    };
    h.engine.submit(flow, t(150), &mut h.out);
    assert_eq!(h.verdict(1), Some(Verdict::Unattributed(Reason::Ambiguous)));
}

#[test]
fn the_previous_owner_losing_its_last_heartbeats_never_misattributes() {
    // old held the IP until 100 but its heartbeats after 60 were lost; new got it at 101.
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "old", 0, 60);
    h.flow(1, "10.0.0.1", 90, 91); // old's flow-time, but nobody says so
    h.heartbeat("10.0.0.1", "new", 101, 130);
    h.engine.tick(t(200), &mut h.out);
    assert_eq!(h.verdict(1), Some(Verdict::Unattributed(Reason::NoOwner)));
}

#[test]
fn overlapping_claims_make_a_conflict_window_and_name_both_claimants() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "a", 0, 100);
    h.heartbeat("10.0.0.1", "b", 50, 150);
    assert_eq!(h.out.conflicts.len(), 1);
    let conflict = &h.out.conflicts[0];
    assert_eq!((&*conflict.existing, &*conflict.claimant), ("a", "b"));
    assert_eq!(conflict.window, Window::new(t(50), t(100)).unwrap());
    h.flow(1, "10.0.0.1", 70, 71);
    h.flow(2, "10.0.0.1", 20, 21);
    h.flow(3, "10.0.0.1", 120, 121);
    assert_eq!(h.verdict(1), Some(Verdict::Unattributed(Reason::Conflict)));
    assert_eq!(h.verdict(2), heartbeat_of("a"));
    assert_eq!(h.verdict(3), heartbeat_of("b"));
    assert_eq!(h.engine.stats().conflicts_found, 1);
}

#[test]
fn a_flow_before_retained_history_is_expired() {
    let config = EngineConfig {
        retention_ms: 60 * S,
        ..EngineConfig::default()
    };
    let mut h = Harness::with(config);
    h.heartbeat("10.0.0.1", "api", 0, 200);
    h.engine.tick(t(200), &mut h.out);
    // The claim stated since=0, but only the retained hour (here 60 s) was kept.
    let history = h.engine.history(ip("10.0.0.1"));
    assert_eq!(history.segments[0].start, t(140));
    h.flow(1, "10.0.0.1", 150, 151);
    assert_eq!(h.verdict(1), heartbeat_of("api"));
    h.flow(2, "10.0.0.1", 10, 11);
    assert_eq!(h.verdict(2), Some(Verdict::Unattributed(Reason::Expired)));
    h.engine.tick(t(300), &mut h.out);
    assert!(h.engine.history(ip("10.0.0.1")).segments.is_empty());
    assert_eq!(h.engine.memory().segments, 0);
}

#[test]
fn past_the_pending_limit_a_flow_goes_out_as_overload() {
    let config = EngineConfig {
        pending_flows_max: NonZeroUsize::new(1).unwrap(),
        ..EngineConfig::default()
    };
    let mut h = Harness::with(config);
    h.flow(1, "10.0.0.1", 10, 11);
    h.flow(2, "10.0.0.1", 10, 11);
    assert_eq!(h.verdict(1), None);
    assert_eq!(h.verdict(2), Some(Verdict::Unattributed(Reason::Overload)));
    assert_eq!(h.engine.stats().unattributed(Reason::Overload), 1);
}

#[test]
fn bad_claims_are_rejected_and_change_nothing() {
    let mut h = Harness::new();
    let id = h.engine.intern("api").unwrap();
    let inverted = Claim {
        ip: ip("10.0.0.1"),
        workload: id,
        since: t(10),
        until: t(5),
    };
    assert!(matches!(
        h.engine.apply_claim(inverted, t(10), &mut h.out),
        Err(ClaimError::Inverted { .. })
    ));
    let future = Claim {
        ip: ip("10.0.0.1"),
        workload: id,
        since: t(10),
        until: t(1_000),
    };
    assert!(matches!(
        h.engine.apply_claim(future, t(10), &mut h.out),
        Err(ClaimError::FromFuture { .. })
    ));
    assert_eq!(h.engine.memory().segments, 0);
    assert_eq!(h.engine.stats().claims_rejected, 2);
}

#[test]
fn events_attribute_non_workload_ips_up_to_the_watermark_only() {
    let mut h = Harness::new();
    let lb = h.engine.intern("lb/public").unwrap();
    let addr = ip("10.9.0.1");
    h.engine.apply_event(
        IpEvent::Assign {
            ip: addr,
            owner: lb,
            at: t(0),
        },
        t(1),
        &mut h.out,
    );
    h.flow(1, "10.9.0.1", 10, 11);
    assert_eq!(
        h.verdict(1),
        None,
        "past the watermark an unassignment may be in flight"
    );
    h.engine.advance_event_watermark(t(15), t(15), &mut h.out);
    assert_eq!(
        h.verdict(1),
        Some(Verdict::Attributed(Attribution::Event("lb/public".into())))
    );
}

#[test]
fn events_never_override_heartbeat_ranges() {
    let mut h = Harness::new();
    let lb = h.engine.intern("lb/public").unwrap();
    let addr = ip("10.9.0.1");
    h.engine.apply_event(
        IpEvent::Assign {
            ip: addr,
            owner: lb,
            at: t(0),
        },
        t(1),
        &mut h.out,
    );
    h.engine.advance_event_watermark(t(500), t(2), &mut h.out);
    h.heartbeat("10.9.0.1", "api", 100, 200);
    h.flow(1, "10.9.0.1", 150, 151);
    assert_eq!(h.verdict(1), heartbeat_of("api"));
    // Near the heartbeat range, heartbeats decide, and they do not cover it.
    h.flow(2, "10.9.0.1", 99, 100);
    assert_eq!(h.verdict(2), None);
    let lookup = h.engine.lookup(addr, Window::at(t(50)));
    assert!(matches!(
        lookup,
        Lookup::Attributed {
            source: Source::Event,
            ..
        }
    ));
}

#[test]
fn ipv6_and_ipv4_mapped_addresses() {
    let mut h = Harness::new();
    h.heartbeat("fd00::1", "v6", 0, 30);
    h.heartbeat("10.0.0.7", "v4", 0, 30);
    h.flow(1, "fd00::1", 10, 11);
    h.flow(2, "::ffff:10.0.0.7", 10, 11);
    assert_eq!(h.verdict(1), heartbeat_of("v6"));
    assert_eq!(h.verdict(2), heartbeat_of("v4"));
}

#[test]
fn export_and_import_carry_ranges_and_conflicts_to_a_new_owner() {
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "a", 0, 100);
    h.heartbeat("10.0.0.1", "b", 50, 150);
    h.heartbeat("10.0.0.2", "c", 0, 100);
    let exported = h.engine.export(|addr| addr == ip("10.0.0.1"));
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0].segments[1].owner, SegmentOwner::Conflict);

    let mut fresh = Harness::new();
    fresh.flow(1, "10.0.0.1", 70, 71);
    fresh.flow(2, "10.0.0.1", 20, 21);
    for ranges in &exported {
        fresh.engine.import(ranges, t(150), &mut fresh.out).unwrap();
    }
    assert_eq!(
        fresh.verdict(1),
        Some(Verdict::Unattributed(Reason::Conflict))
    );
    assert_eq!(fresh.verdict(2), heartbeat_of("a"));
    assert_eq!(fresh.engine.history(ip("10.0.0.1")), exported[0]);
}

#[test]
fn the_sweep_forgets_workloads_nothing_refers_to() {
    let config = EngineConfig {
        retention_ms: 60 * S,
        ..EngineConfig::default()
    };
    let mut h = Harness::with(config);
    h.heartbeat("10.0.0.1", "gone", 0, 10);
    h.heartbeat("10.0.0.2", "here", 0, 100);
    assert_eq!(h.engine.memory().workloads, 2);
    h.engine.tick(t(100), &mut h.out);
    assert_eq!(h.engine.memory().workloads, 1);
    h.flow(1, "10.0.0.2", 80, 81);
    assert_eq!(h.verdict(1), heartbeat_of("here"));
}

#[test]
fn memory_is_reported_per_range() {
    let mut h = Harness::new();
    for i in 0..100 {
        h.heartbeat(&format!("10.0.{}.{}", i / 250, i % 250), "api", 0, 30);
    }
    let memory = h.engine.memory();
    assert_eq!((memory.ips, memory.segments), (100, 100));
    assert!(memory.bytes_per_range() >= 16.0, "{memory:?}");
}

#[test]
fn pending_flows_can_be_taken_out_for_handoff() {
    let mut h = Harness::new();
    h.flow(1, "10.0.0.1", 10, 11);
    h.flow(2, "10.0.0.2", 12, 13);
    assert_eq!(h.engine.take_pending(), vec![1, 2]);
    assert_eq!(h.engine.pending_len(), 0);
    h.heartbeat("10.0.0.1", "api", 0, 30);
    assert_eq!(h.verdict(1), None, "a flow taken out is not emitted again");
}

#[test]
fn grouped_lookups_agree_with_single_ones_over_a_large_table_after_sweeps() {
    // Thousands of IPs (the table grows many times, probes run through clusters), IPv4,
    // IPv6 and IPv4-mapped spellings, IPs nobody claims, and a sweep that removes some IPs
    // and trims the history of others in the middle.
    let config = EngineConfig {
        retention_ms: 100 * S,
        sweep_interval_ms: S,
        ..EngineConfig::default()
    };
    let mut h = Harness::with(config);
    let addr = |i: u32| match i % 3 {
        0 => format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
        1 => format!("fd00::{:x}", i),
        _ => format!(
            "::ffff:10.{}.{}.{}",
            100 + (i >> 16 & 63),
            i >> 8 & 255,
            i & 255
        ),
    };
    let queries: Vec<(IpAddr, Window)> = (0..6_000u32)
        .flat_map(|i| {
            [31, 45, 75, 118, 150].map(|s| (ip(&addr(i)), Window::at(t(s + u64::from(i % 7)))))
        })
        .collect();
    let check = |h: &Harness| {
        let mut grouped = Vec::new();
        h.engine.lookup_many(&queries, &mut grouped);
        let single: Vec<Lookup> = queries
            .iter()
            .map(|(a, w)| h.engine.lookup(*a, *w))
            .collect();
        assert_eq!(grouped, single);
        grouped
    };
    for i in 0..5_000u32 {
        let a = addr(i);
        h.heartbeat(&a, &format!("w{}", i % 50), 0, 40);
        if i % 2 == 0 {
            h.heartbeat(&a, &format!("w{}", i % 50 + 1), 60, 90);
        }
        if i % 5 == 0 {
            h.heartbeat(&a, &format!("w{}", i % 50 + 2), 100, 130);
        }
    }
    let before = check(&h);
    let name = |l: Lookup| match l {
        Lookup::Attributed { workload, .. } => h.engine.workload_name(workload).cloned(),
        Lookup::Pending(_) | Lookup::Unattributed(_) => None,
    };
    // IPv4 at 31 s, IPv4-mapped at 33 s, IPv6 at 79 s, and an IP nobody claimed (claims
    // arrived up to 130 s, so history before 30 s is gone).
    assert_eq!(name(before[0]).as_deref(), Some("w0"));
    assert_eq!(name(before[2 * 5]).as_deref(), Some("w2"));
    assert_eq!(name(before[4 * 5 + 2]).as_deref(), Some("w5"));
    assert_eq!(before[5_500 * 5 + 3], Lookup::Pending(Reason::NoOwner));
    // Retention drops everything before 141 - 100 = 41 s: IPs with one range go.
    h.engine.tick(t(141), &mut h.out);
    assert_eq!(h.engine.memory().ips, 2_500 + 500);
    let after = check(&h);
    assert_eq!(after.len(), before.len());
    assert!(after.contains(&Lookup::Unattributed(Reason::Expired)));
}

/// An engine whose flows settle `seconds` after their end before their first lookup.
fn settling(seconds: u64) -> Harness {
    Harness::with(EngineConfig {
        settle_ms: seconds * S,
        ..EngineConfig::default()
    })
}

/// How long the flow `id` waited, when it has been emitted.
fn waited_ms(h: &Harness, id: u32) -> Option<u64> {
    h.out
        .resolved
        .iter()
        .find(|r| r.payload == id)
        .map(|r| r.waited_ms)
}

#[test]
fn a_settling_flow_is_first_looked_up_settle_ms_after_its_end_and_not_by_claims() {
    let mut h = settling(12);
    h.heartbeat("10.0.0.1", "api", 0, 10);
    h.flow(1, "10.0.0.1", 9, 10); // arrives at 10 s, first looked up at 22 s
    assert_eq!(h.engine.settling_len(), 1);
    assert_eq!(h.engine.pending_len(), 1);
    assert_eq!(h.engine.next_deadline(), Some(t(22)));
    // A claim that covers it does not reach it while it settles.
    h.heartbeat("10.0.0.1", "api", 0, 20);
    assert_eq!(h.verdict(1), None);
    h.engine.tick(t(21), &mut h.out);
    assert_eq!(h.verdict(1), None);
    h.engine.tick(t(22), &mut h.out);
    assert_eq!(waited_ms(&h, 1), Some(12 * S));
    assert_eq!(h.verdict(1), heartbeat_of("api"));
    assert_eq!(h.engine.pending_len(), 0);
    assert_eq!(h.engine.stats().flows_settled, 1);
    assert_eq!(h.engine.stats().flows_pending, 0);
}

#[test]
fn a_flow_that_ended_settle_ms_ago_is_looked_up_on_arrival() {
    let mut h = settling(12);
    h.heartbeat("10.0.0.1", "api", 0, 30);
    let flow = FlowQuery {
        remote: ip("10.0.0.1"),
        window: Window::new(t(10), t(18)).unwrap(),
        payload: 1,
    };
    h.engine.submit_many(vec![flow], t(30), &mut h.out);
    assert_eq!(h.verdict(1), heartbeat_of("api"));
    assert_eq!(h.engine.stats().flows_settled, 0);
}

#[test]
fn a_settled_flow_still_not_covered_waits_with_the_deadline_of_its_arrival() {
    let mut h = settling(12);
    h.heartbeat("10.0.0.1", "api", 0, 10);
    h.flow(1, "10.0.0.1", 30, 31); // arrives at 31 s, settles until 43 s
    h.engine.tick(t(43), &mut h.out);
    assert_eq!(h.verdict(1), None);
    assert_eq!(h.engine.settling_len(), 0);
    assert_eq!(h.engine.pending_len(), 1);
    // Its deadline counts from its arrival (31 + 25), not from when it settled.
    assert_eq!(h.engine.next_deadline(), Some(t(31 + 25)));
    h.engine.tick(t(55), &mut h.out);
    assert_eq!(h.verdict(1), None);
    h.engine.tick(t(56), &mut h.out);
    assert_eq!(waited_ms(&h, 1), Some(25 * S));
    assert_eq!(h.verdict(1), Some(Verdict::Unattributed(Reason::NoOwner)));
}

#[test]
fn a_flow_ending_in_the_future_settles_no_longer_than_one_ending_now() {
    let mut h = settling(12);
    // Its host's clock is 9 s ahead: it ends at 40 s, arriving at 31 s.
    let flow = FlowQuery {
        remote: ip("10.0.0.1"),
        window: Window::new(t(39), t(40)).unwrap(),
        payload: 1,
    };
    h.engine.submit(flow, t(31), &mut h.out);
    assert_eq!(h.engine.next_deadline(), Some(t(43)));
}

#[test]
fn settling_flows_count_against_the_pending_limit_and_leave_with_take_pending() {
    let mut h = Harness::with(EngineConfig {
        settle_ms: 12 * S,
        pending_flows_max: NonZeroUsize::new(2).unwrap(),
        ..EngineConfig::default()
    });
    h.flow(1, "10.0.0.1", 10, 11);
    h.flow(2, "10.0.0.2", 10, 11);
    h.flow(3, "10.0.0.3", 10, 11);
    assert_eq!(h.verdict(3), Some(Verdict::Unattributed(Reason::Overload)));
    assert_eq!(h.engine.take_pending(), vec![1, 2]);
    assert_eq!(h.engine.pending_len(), 0);
    assert_eq!(h.engine.next_deadline(), None);
}

#[test]
fn settling_must_end_before_the_pending_deadline() {
    let config = EngineConfig {
        settle_ms: 25 * S,
        ..EngineConfig::default()
    };
    assert!(matches!(
        Engine::<u32>::new(config),
        Err(tenure_attribution::ConfigError::Settle { .. })
    ));
}

#[test]
fn a_clock_stepped_forward_and_back_does_not_hold_waiting_flows_for_the_step() {
    // The collector's clock runs 100 s ahead while a flow arrives, then is set right.
    let mut h = Harness::new();
    h.heartbeat("10.0.0.1", "api", 0, 10);
    let window = Window::new(t(30), t(31)).unwrap();
    let flow = FlowQuery {
        remote: ip("10.0.0.1"),
        window,
        payload: 1,
    };
    h.engine.submit(flow, t(131), &mut h.out);
    assert_eq!(h.verdict(1), None, "waits for coverage");
    // Set right: the deadline (25 s) counts from the arrival in time that passed, not
    // from the arrival's reading of a wrong clock.
    h.engine.tick(t(32), &mut h.out);
    assert_eq!(h.verdict(1), None);
    h.engine.tick(t(55), &mut h.out);
    assert_eq!(h.verdict(1), None, "23 s have passed");
    h.engine.tick(t(57), &mut h.out);
    assert_eq!(
        h.verdict(1),
        Some(Verdict::Unattributed(Reason::NoOwner)),
        "25 s after it arrived, not 100 s later"
    );
}

#[test]
fn a_clock_stepped_back_does_not_stretch_settling() {
    let mut h = Harness::with(EngineConfig {
        settle_ms: 2_000,
        ..EngineConfig::default()
    });
    h.heartbeat("10.0.0.1", "api", 0, 40);
    // Arrives as it ends, so it settles for 2 s; then the clock steps back by 30 s.
    let window = Window::new(t(30), t(31)).unwrap();
    let flow = FlowQuery {
        remote: ip("10.0.0.1"),
        window,
        payload: 1,
    };
    h.engine.submit(flow, t(31), &mut h.out);
    assert_eq!(h.verdict(1), None, "settling");
    h.engine.tick(t(1), &mut h.out);
    assert_eq!(h.verdict(1), None, "no time passed");
    h.engine.tick(t(3), &mut h.out);
    assert_eq!(
        h.verdict(1),
        heartbeat_of("api"),
        "looked up 2 s after it arrived, by the time that passed"
    );
}
