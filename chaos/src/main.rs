//! `tenure-chaos`: runs a real cluster under faults and prints one RESULT line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tenure_chaos::{run, Options};

#[derive(Parser, Debug)]
#[command(
    name = "tenure-chaos",
    about = "Fault injection against real tenure collectors"
)]
struct Args {
    /// Length of the fault phase, in seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// The `tenure` binary; default: next to this one.
    #[arg(long)]
    tenure_bin: Option<PathBuf>,
    /// Working directory for configs, data and sinks; default: a new one under /tmp.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 2)]
    regions: usize,
    #[arg(long, default_value_t = 3)]
    nodes_per_region: usize,
    #[arg(long, default_value_t = 8)]
    exporters_per_region: usize,
    /// Keep every collector on loopback instead of a network namespace of its own.
    #[arg(long)]
    loopback: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    match chaos(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the harness; false when the history broke a promise.
async fn chaos(args: Args) -> anyhow::Result<bool> {
    let tenure_bin = match args.tenure_bin {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("tenure"),
    };
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tenure-chaos-{}-{}", std::process::id(), args.seed))
    });
    eprintln!("chaos: seed {} in {}", args.seed, dir.display());
    let options = Options {
        tenure_bin,
        dir,
        seed: args.seed,
        duration_secs: args.duration_secs,
        regions: args.regions.max(1),
        nodes_per_region: args.nodes_per_region.max(1),
        exporters_per_region: args.exporters_per_region.max(2),
        namespaces: !args.loopback,
    };
    let report = run(&options).await?;
    for s in &report.skipped {
        eprintln!("chaos: {s}");
    }
    println!("{report}");
    Ok(report.passed())
}
