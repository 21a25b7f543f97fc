//! Property tests of the central promise: for any true ownership history with IP reuse,
//! heartbeats delayed, lost, duplicated and reordered, and host clocks skewed within the
//! margin, no flow is ever attributed to the wrong workload, and flows well inside a
//! heartbeat-covered range are attributed.
//!
//! Cases: 10,000 by default (`PROPTEST_CASES` overrides).

use std::net::IpAddr;

use proptest::prelude::*;
use tenure_attribution::{
    Attribution, Claim, Engine, EngineConfig, FlowQuery, Lookup, Outputs, UnixMillis, Verdict,
    Window,
};

const DELTA_MS: u64 = 1_000;
const HEARTBEAT_MS: u64 = 10_000;
const T0: u64 = 1_700_000_000_000;

/// SplitMix64: a tiny deterministic generator, so that one proptest-drawn seed describes a
/// whole history and a failure prints that seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A clock offset within ±δ/2, so that any two hosts disagree by at most δ.
    fn offset(&mut self) -> i64 {
        self.below(DELTA_MS + 1) as i64 - (DELTA_MS / 2) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn skewed(true_ms: u64, offset: i64) -> UnixMillis {
    UnixMillis(
        true_ms
            .checked_add_signed(offset)
            .expect("times are far from zero"),
    )
}

#[derive(Debug)]
struct Tenure {
    ip: usize,
    owner: usize,
    start: u64,
    end: u64,
    offset: i64,
}

#[derive(Debug)]
enum Arrival {
    Claim {
        ip: usize,
        owner: usize,
        since: UnixMillis,
        until: UnixMillis,
        tenure: usize,
    },
    Flow {
        id: usize,
    },
}

#[derive(Debug)]
struct TrueFlow {
    ip: usize,
    start: u64,
    end: u64,
    offset: i64,
}

struct Scenario {
    tenures: Vec<Tenure>,
    flows: Vec<TrueFlow>,
    arrivals: Vec<(u64, Arrival)>,
}

fn ip_of(index: usize) -> IpAddr {
    IpAddr::from([10, 0, 0, index as u8 + 1])
}

fn owner_name(owner: usize) -> String {
    format!("workload-{owner}")
}

/// Draws a history: per IP a sequence of owners with quick reuse, heartbeats every 10 s
/// with loss, duplication and delays up to 3 heartbeat intervals, and flows at random.
fn scenario(seed: u64, loss_percent: u64, max_delay_ms: u64) -> Scenario {
    let mut rng = Rng(seed);
    let ips = 1 + rng.below(3) as usize;
    let mut tenures = Vec::new();
    for ip in 0..ips {
        let mut now = T0 + rng.below(10_000);
        let mut previous_owner = None;
        for _ in 0..1 + rng.below(6) {
            let owner = rng.below(4) as usize;
            // The same owner taking an IP back must leave a gap the clocks can see (2δ);
            // different owners may follow each other within the same millisecond.
            let gap = match (previous_owner == Some(owner), rng.chance(40)) {
                (true, _) => 2 * DELTA_MS + rng.below(20_000),
                (false, true) => 0,
                (false, false) => rng.below(30_000),
            };
            let start = now + gap;
            let end = start + 1_000 + rng.below(90_000);
            tenures.push(Tenure {
                ip,
                owner,
                start,
                end,
                offset: rng.offset(),
            });
            previous_owner = Some(owner);
            now = end;
        }
    }
    let mut arrivals = Vec::new();
    for (index, tenure) in tenures.iter().enumerate() {
        let mut beat = tenure.start;
        loop {
            if !rng.chance(loss_percent) {
                let copies = if rng.chance(10) { 2 } else { 1 };
                for _ in 0..copies {
                    let arrival = beat + rng.below(max_delay_ms + 1);
                    arrivals.push((
                        arrival,
                        Arrival::Claim {
                            ip: tenure.ip,
                            owner: tenure.owner,
                            since: skewed(tenure.start, tenure.offset),
                            until: skewed(beat, tenure.offset),
                            tenure: index,
                        },
                    ));
                }
            }
            if beat == tenure.end {
                break;
            }
            beat = (beat + HEARTBEAT_MS).min(tenure.end);
        }
    }
    let first = tenures.iter().map(|t| t.start).min().unwrap_or(T0);
    let last = tenures.iter().map(|t| t.end).max().unwrap_or(T0);
    let mut flows = Vec::new();
    for _ in 0..rng.below(40) {
        let ip = rng.below(ips as u64) as usize;
        let start = first + rng.below(last - first + 1);
        let end = start + rng.below(5_000);
        let id = flows.len();
        flows.push(TrueFlow {
            ip,
            start,
            end,
            offset: rng.offset(),
        });
        arrivals.push((end + rng.below(5_000), Arrival::Flow { id }));
    }
    // A stable sort keeps simultaneous arrivals in the order they were drawn.
    arrivals.sort_by_key(|(at, _)| *at);
    Scenario {
        tenures,
        flows,
        arrivals,
    }
}

fn true_owner_throughout(tenures: &[Tenure], ip: usize, start: u64, end: u64) -> Option<usize> {
    tenures
        .iter()
        .find(|t| t.ip == ip && t.start <= start && end <= t.end)
        .map(|t| t.owner)
}

fn flow_window(flow: &TrueFlow) -> Window {
    Window::new(
        skewed(flow.start, flow.offset),
        skewed(flow.end, flow.offset),
    )
    .unwrap()
}

/// Runs one scenario through an engine whose tables are seeded with `hash_seed` and whose
/// flows settle `settle_ms` before their first lookup, checks the promises, and returns
/// every verdict in the order emitted.
fn run(
    seed: u64,
    loss_percent: u64,
    max_delay_ms: u64,
    hash_seed: u64,
    settle_ms: u64,
) -> Result<Vec<(usize, Verdict)>, TestCaseError> {
    let s = scenario(seed, loss_percent, max_delay_ms);
    let config = EngineConfig {
        skew_margin_ms: DELTA_MS,
        settle_ms,
        hash_seed,
        ..EngineConfig::default()
    };
    let mut engine: Engine<usize> = Engine::new(config).unwrap();
    let mut out = Outputs::default();
    let mut delivered: Vec<(usize, UnixMillis, UnixMillis)> = Vec::new();
    for (at, arrival) in &s.arrivals {
        let now = UnixMillis(*at);
        engine.tick(now, &mut out);
        match arrival {
            Arrival::Claim {
                ip,
                owner,
                since,
                until,
                tenure,
            } => {
                let workload = engine.intern(&owner_name(*owner)).unwrap();
                let claim = Claim {
                    ip: ip_of(*ip),
                    workload,
                    since: *since,
                    until: *until,
                };
                engine.apply_claim(claim, now, &mut out).unwrap();
                delivered.push((*tenure, *since, *until));
            }
            Arrival::Flow { id } => {
                let flow = &s.flows[*id];
                let query = FlowQuery {
                    remote: ip_of(flow.ip),
                    window: flow_window(flow),
                    payload: *id,
                };
                // Both entry points must keep the promise: alternate between them.
                if id % 2 == 0 {
                    engine.submit(query, now, &mut out);
                } else {
                    engine.submit_many(vec![query], now, &mut out);
                }
            }
        }
    }
    let end = s.arrivals.last().map(|(at, _)| *at).unwrap_or(T0);
    engine.tick(UnixMillis(end + 3_600_000 / 2), &mut out);

    // No flow lost, none emitted twice.
    let mut seen = vec![0; s.flows.len()];
    for resolved in &out.resolved {
        seen[resolved.payload] += 1;
    }
    prop_assert!(
        seen.iter().all(|n| *n == 1),
        "seed {seed}: flows emitted {seen:?}"
    );

    // No flow attributed to anyone but its remote's true owner for the whole flow.
    for resolved in &out.resolved {
        let flow = &s.flows[resolved.payload];
        if let Verdict::Attributed(attribution) = &resolved.verdict {
            let truth = true_owner_throughout(&s.tenures, flow.ip, flow.start, flow.end);
            let named = match attribution {
                Attribution::Heartbeat(name) => name.to_string(),
                other @ (Attribution::Event(_) | Attribution::External) => {
                    return Err(TestCaseError::fail(format!("unexpected {other:?}")));
                }
            };
            prop_assert_eq!(
                truth.map(owner_name),
                Some(named),
                "seed {}: misattributed {:?} (tenures {:?})",
                seed,
                flow,
                s.tenures
            );
        }
    }

    // Grouped lookups answer exactly as single ones do, over several groups (the flows
    // repeated, so that groups whose older segments are still loading follow each other).
    let queries: Vec<(IpAddr, Window)> = (0..5)
        .flat_map(|_| &s.flows)
        .map(|f| (ip_of(f.ip), flow_window(f)))
        .collect();
    let mut grouped = Vec::new();
    engine.lookup_many(&queries, &mut grouped);
    let single: Vec<Lookup> = queries
        .iter()
        .map(|(ip, w)| engine.lookup(*ip, *w))
        .collect();
    prop_assert_eq!(grouped, single, "seed {}", seed);

    // Flows well inside a delivered claim, two margins from any handover, are attributed.
    for flow in &s.flows {
        let window = flow_window(flow).widened(DELTA_MS);
        let covered_by = delivered.iter().find(|(tenure, since, until)| {
            let t = &s.tenures[*tenure];
            t.ip == flow.ip
                && *since <= window.start
                && window.end <= *until
                && flow.start >= t.start + 2 * DELTA_MS
                && flow.end + 2 * DELTA_MS <= t.end
        });
        if let Some((tenure, _, _)) = covered_by {
            let lookup = engine.lookup(ip_of(flow.ip), flow_window(flow));
            let owner = s.tenures[*tenure].owner;
            match lookup {
                Lookup::Attributed { workload, .. } => {
                    let name = engine.workload_name(workload).map(|n| n.to_string());
                    prop_assert_eq!(name, Some(owner_name(owner)), "seed {}", seed);
                }
                Lookup::Pending(_) | Lookup::Unattributed(_) => {
                    return Err(TestCaseError::fail(format!(
                        "seed {seed}: covered flow {flow:?} not attributed: {lookup:?}"
                    )));
                }
            }
        }
    }
    Ok(out
        .resolved
        .iter()
        .map(|r| (r.payload, r.verdict.clone()))
        .collect())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn no_flow_is_ever_misattributed(
        seed in any::<u64>(),
        loss_percent in 0u64..60,
        max_delay_ms in 0u64..(3 * HEARTBEAT_MS),
        hash_seed in any::<u64>(),
        // Half the cases look flows up on arrival; the others let them settle for up to
        // two heartbeat intervals first.
        settle_ms in prop_oneof![Just(0u64), 1u64..(2 * HEARTBEAT_MS)],
    ) {
        // The tables' seed changes where keys land, never what comes out, nor its order.
        let verdicts = run(seed, loss_percent, max_delay_ms, hash_seed, settle_ms)?;
        let again = run(
            seed,
            loss_percent,
            max_delay_ms,
            hash_seed.rotate_left(17) ^ 1,
            settle_ms,
        )?;
        prop_assert_eq!(verdicts, again, "seed {}", seed);
    }
}
