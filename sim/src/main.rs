//! `tenure-sim`: replays one seed, or runs many on all cores, and ends with one RESULT
//! line. A failing seed prints the command that replays it and is recorded in
//! `sim/regressions.txt`, whose seeds of the same scenario run first next time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use tenure_sim::runner::{self, Summary};
use tenure_sim::scenario::Scenario;
use tenure_sim::world::{convergence_bound_ms, RunOutcome};

#[derive(Parser, Debug)]
#[command(
    name = "tenure-sim",
    about = "Deterministic simulation of a tenure fleet and cluster"
)]
struct Args {
    /// The scenario file (TOML).
    #[arg(long)]
    scenario: PathBuf,
    /// Replay one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run seeds `A..B` (B excluded), after the recorded regressions of this scenario.
    #[arg(long)]
    seeds: Option<String>,
    /// Write a Markdown summary with plots into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Worker threads, each running whole seeds. Default: the cores available.
    #[arg(long)]
    threads: Option<usize>,
    /// The regressions file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/regressions.txt"))]
    regressions: PathBuf,
}

fn parse_range(text: &str) -> anyhow::Result<Vec<u64>> {
    let (a, b) = text
        .split_once("..")
        .context("--seeds takes a range A..B")?;
    let a: u64 = a.trim().parse().context("the start of --seeds")?;
    let b: u64 = b.trim().parse().context("the end of --seeds")?;
    anyhow::ensure!(a < b, "--seeds {a}..{b} is empty");
    Ok((a..b).collect())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tenure-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    let scenario = Scenario::load(&args.scenario)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    #[allow(
        clippy::disallowed_methods,
        reason = "wall time of the binary, for the report; never reaches the simulation"
    )]
    let started = Instant::now();
    let (seeds, single) = match (&args.seed, &args.seeds) {
        (Some(seed), _) => (vec![*seed], true),
        (None, Some(range)) => {
            let mut seeds = runner::regression_seeds(&args.regressions, &args.scenario);
            for s in parse_range(range)? {
                if !seeds.contains(&s) {
                    seeds.push(s);
                }
            }
            (seeds, false)
        }
        (None, None) => (vec![0], true),
    };
    let bar = if single {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(seeds.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} seeds, {elapsed} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let on_done = |o: &RunOutcome| {
        bar.inc(1);
        if let Some(v) = &o.violation {
            bar.println(format!("seed {} FAILED: {v}", o.seed));
        }
    };
    let outcomes = runner::run_seeds(&scenario, &seeds, threads, &on_done);
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    let summary = Summary::of(&outcomes);
    if single {
        if let Some(o) = outcomes.first() {
            print_one(o, wall_s);
        }
    }
    println!(
        "convergence: {} of {} seeds converged within the bound ({} ms after healing); {} converged at some point, the slowest (seed {}) {} ms after its last fault ended",
        summary.seeds - summary.not_converged,
        summary.seeds,
        convergence_bound_ms(scenario.heartbeat.interval_ms),
        summary.converged,
        summary
            .slowest_seed
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        summary.converged_after_ms_max
    );
    if summary.not_converged > 0 {
        println!(
            "membership not converged within the bound after healing on {} of {} seeds",
            summary.not_converged, summary.seeds
        );
        for o in &outcomes {
            if let Some(v) = &o.convergence {
                println!("NOT CONVERGED seed={}: {v}", o.seed);
            }
        }
    }
    println!(
        "journal: restarts={} recovered_flows={} duplicates={} unsynced_writes_lost={}",
        summary.restarts, summary.recovered, summary.duplicates, summary.unsynced_lost
    );
    for (seed, violation) in &summary.failures {
        println!("FAILED seed={seed}: {violation}");
        println!(
            "  replay: {}",
            runner::replay_command(&args.scenario, *seed)
        );
    }
    if !summary.failures.is_empty() {
        runner::record_failures(&args.regressions, &args.scenario, &summary.failures)
            .with_context(|| format!("recording failures in {}", args.regressions.display()))?;
    }
    if let Some(dir) = &args.report {
        tenure_sim::report::write(dir, &args.scenario, &outcomes, &summary, wall_s)?;
        println!("report: {}", dir.join("summary.md").display());
    }
    let simulated_s: f64 = outcomes
        .iter()
        .map(|o| o.stats.simulated_ms as f64 / 1_000.0)
        .sum();
    println!(
        "wall={wall_s:.2}s simulated={simulated_s:.0}s ratio={:.1}x threads={threads}",
        simulated_s / wall_s.max(1e-9)
    );
    println!(
        "local ends: stamped={} unattributed_share={:.4} {}",
        summary.local_stamped,
        summary.local_unattributed_share(),
        summary.local_reasons()
    );
    println!("{}", summary.result_line());
    Ok(summary.failures.is_empty())
}

fn print_one(o: &RunOutcome, wall_s: f64) {
    let s = &o.stats;
    println!(
        "seed={} faults=[{}] flows={} accepted={} emitted={} duplicates={} undelivered={} attributed={} unattributed={} conflicts={} frames={} datagrams={} refused={} defunct={} restarts={} recovered={} wall={wall_s:.2}s",
        o.seed,
        s.faults.join(","),
        s.flows,
        s.accepted,
        s.emitted,
        s.duplicates,
        s.undelivered,
        s.attributed,
        s.unattributed,
        s.conflicts,
        s.frames,
        s.datagrams,
        s.refused,
        s.defunct,
        s.restarts,
        s.recovered
    );
    let reasons: Vec<String> = s
        .by_reason
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.as_str()))
        .collect();
    println!("unattributed reasons: {}", reasons.join(" "));
    for (hold, flows, wrong, unattributed) in &s.legacy {
        println!(
            "legacy hold_back_ms={hold}: flows={flows} wrong={wrong} ({:.4}) unattributed={unattributed}",
            tenure_sim::world::ratio(*wrong, *flows)
        );
    }
    println!(
        "dependencies: true={} reported/wrong: {:?} (tenure first, then legacy)",
        s.true_dependencies, s.dependencies
    );
    match s.converged_after_ms {
        Some(ms) => println!("converged {ms} ms after the last fault ended"),
        None => println!("never converged after the last fault ended"),
    }
}
