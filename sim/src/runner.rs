//! Many seeds: whole seeds spread over worker threads (determinism is per seed, so the
//! threads change nothing but wall time), the summary and its RESULT line, and the
//! regressions file of seeds that once failed.

use std::hash::Hasher;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use siphasher::sip::SipHasher13;
use tenure_gossip::wire::LocalReason;

use crate::check::Violation;
use crate::scenario::Scenario;
use crate::world::{ratio, run, RunOutcome};

/// The key of the combined trace hash of many seeds.
const COMBINED_KEY: (u64, u64) = (0x7465_6e75_7265_2d73, 0x7365_6564_732d_7631);

/// Runs `seeds` on `threads` workers; outcomes come back in the order of `seeds`.
/// `on_done` is called after each seed (a progress bar).
pub fn run_seeds(
    scenario: &Scenario,
    seeds: &[u64],
    threads: usize,
    on_done: &(dyn Fn(&RunOutcome) + Sync),
) -> Vec<RunOutcome> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<RunOutcome>>> =
        Mutex::new((0..seeds.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1).min(seeds.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else {
                    break;
                };
                let outcome = run(scenario, seed);
                on_done(&outcome);
                results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(outcome);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .into_iter()
        .flatten()
        .collect()
}

/// Totals over seeds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub seeds: u64,
    pub flows: u64,
    pub misattributed: u64,
    pub lost: u64,
    pub bounded_flows: u64,
    pub bounded_unattributed: u64,
    pub unattributed: u64,
    pub emitted: u64,
    /// Per legacy hold-back: (hold-back ms, flows scored, wrong).
    pub legacy: Vec<(u64, u64, u64)>,
    /// Tenure first, then each legacy attributor: (dependencies reported, wrong).
    pub dependencies: Vec<(u64, u64)>,
    pub trace_hash: u64,
    /// Seeds whose membership had not converged within the bound after healing.
    pub not_converged: u64,
    /// Seeds whose views matched the truth at some point after their last fault, the
    /// longest time that took among them, in ms, and the seed that took it.
    pub converged: u64,
    pub converged_after_ms_max: u64,
    pub slowest_seed: Option<u64>,
    /// Flows emitted more than once (same `flow_id`): at-least-once after crashes,
    /// pauses and ack timeouts. Counted, not failures.
    pub duplicates: u64,
    /// Collector restarts, flows they replayed from their journals, and journal writes
    /// crashes lost before their fsync.
    pub restarts: u64,
    pub recovered: u64,
    pub unsynced_lost: u64,
    /// Local ends: stamped, stamped wrongly, unattributed by reason.
    pub local_stamped: u64,
    pub local_misattributed: u64,
    pub local_unattributed: [u64; LocalReason::ALL.len()],
    /// Claims the compromised exporter sent, and those the collectors up at the end of
    /// their seed refused as not entitled.
    pub forged_claims: u64,
    pub not_entitled: u64,
    pub failures: Vec<(u64, Violation)>,
}

impl Summary {
    pub fn of(outcomes: &[RunOutcome]) -> Summary {
        let mut s = Summary::default();
        let mut combined = SipHasher13::new_with_keys(COMBINED_KEY.0, COMBINED_KEY.1);
        for o in outcomes {
            s.seeds += 1;
            s.flows += o.stats.flows;
            s.lost += o.stats.lost;
            s.bounded_flows += o.stats.bounded_flows;
            s.bounded_unattributed += o.stats.bounded_unattributed;
            s.unattributed += o.stats.unattributed;
            s.emitted += o.stats.emitted;
            s.duplicates += o.stats.duplicates;
            s.restarts += o.stats.restarts;
            s.recovered += o.stats.recovered;
            s.unsynced_lost += o.stats.unsynced_lost;
            s.local_stamped += o.stats.local_stamped;
            s.local_misattributed += o.stats.local_misattributed;
            s.forged_claims += o.stats.forged_claims;
            s.not_entitled += o.stats.not_entitled;
            for (acc, n) in s
                .local_unattributed
                .iter_mut()
                .zip(o.stats.local_unattributed)
            {
                *acc += n;
            }
            if s.legacy.is_empty() {
                s.legacy = o.stats.legacy.iter().map(|l| (l.0, 0, 0)).collect();
                s.dependencies = vec![(0, 0); o.stats.dependencies.len()];
            }
            for (acc, l) in s.legacy.iter_mut().zip(&o.stats.legacy) {
                acc.1 += l.1;
                acc.2 += l.2;
            }
            for (acc, d) in s.dependencies.iter_mut().zip(&o.stats.dependencies) {
                acc.0 += d.0;
                acc.1 += d.1;
            }
            if let Some(v) = &o.violation {
                if matches!(v, Violation::Misattributed { .. }) {
                    s.misattributed += 1;
                }
                s.failures.push((o.seed, v.clone()));
            }
            if let Some(ms) = o.stats.converged_after_ms {
                s.converged += 1;
                if s.slowest_seed.is_none() || ms > s.converged_after_ms_max {
                    s.converged_after_ms_max = ms;
                    s.slowest_seed = Some(o.seed);
                }
            }
            if let Some(v) = &o.convergence {
                s.not_converged += 1;
                if o.violation.is_none() {
                    s.failures.push((o.seed, v.clone()));
                }
            }
            combined.write_u64(o.seed);
            combined.write_u64(o.trace_hash);
        }
        s.trace_hash = match outcomes {
            [one] => one.trace_hash,
            _ => combined.finish(),
        };
        s
    }

    /// The share of the last legacy attributor's flows that were wrong.
    pub fn legacy_share(&self) -> f64 {
        self.legacy.last().map_or(0.0, |l| ratio(l.2, l.1))
    }

    /// The share of the last legacy attributor's reported dependencies that were wrong.
    pub fn legacy_dependency_share(&self) -> f64 {
        self.dependencies.last().map_or(0.0, |d| ratio(d.1, d.0))
    }

    pub fn unattributed_share(&self) -> f64 {
        ratio(self.bounded_unattributed, self.bounded_flows)
    }

    /// Emitted flows whose local end went out unattributed, of all emitted flows.
    pub fn local_unattributed_share(&self) -> f64 {
        let unattributed: u64 = self.local_unattributed.iter().sum();
        ratio(unattributed, unattributed + self.local_stamped)
    }

    /// The local ends' unattributed reasons: `local_changed=12 local_unknown=0 ...`.
    pub fn local_reasons(&self) -> String {
        LocalReason::ALL
            .iter()
            .zip(self.local_unattributed)
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The line every run ends with.
    pub fn result_line(&self) -> String {
        format!(
            "RESULT seeds={} flows={} misattributed={} local_misattributed={} lost={} unattributed_share={:.4} local_unattributed_share={:.4} legacy_misattributed_share={:.4} legacy_dependency_error_share={:.4} trace_hash={:016x}",
            self.seeds,
            self.flows,
            self.misattributed,
            self.local_misattributed,
            self.lost,
            self.unattributed_share(),
            self.local_unattributed_share(),
            self.legacy_share(),
            self.legacy_dependency_share(),
            self.trace_hash
        )
    }
}

/// The command that replays one seed.
pub fn replay_command(scenario_path: &Path, seed: u64) -> String {
    format!(
        "cargo run --release -p tenure-sim -- --scenario {} --seed {seed}",
        scenario_path.display()
    )
}

/// Seeds of `scenario_path` recorded in the regressions file (lines
/// `<scenario file name> <seed> [# note]`).
pub fn regression_seeds(regressions: &Path, scenario_path: &Path) -> Vec<u64> {
    let Ok(text) = std::fs::read_to_string(regressions) else {
        return Vec::new();
    };
    let name = file_name(scenario_path);
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let mut parts = line.split_whitespace();
            let (file, seed) = (parts.next()?, parts.next()?);
            (file == name).then(|| seed.parse().ok()).flatten()
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Appends failing seeds not yet recorded.
pub fn record_failures(
    regressions: &Path,
    scenario_path: &Path,
    failures: &[(u64, Violation)],
) -> std::io::Result<()> {
    let known = regression_seeds(regressions, scenario_path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(regressions)?;
    for (seed, violation) in failures {
        if known.contains(seed) {
            continue;
        }
        let note: String = violation.to_string().chars().take(120).collect();
        writeln!(file, "{} {seed} # {note}", file_name(scenario_path))?;
    }
    Ok(())
}
