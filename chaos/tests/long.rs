//! Five minutes of faults against real `tenure collector` processes, each in a network
//! namespace of its own: kills, pauses, partitions, gossip loss, clock skew and clock
//! steps of up to two minutes either way, twice: once with a fixed seed and once with a
//! seed drawn for this run (printed; `TENURE_CHAOS_SEED` replays one). No acknowledged
//! flow may be lost and none misattributed; a failure prints the lost flow ids and the
//! fault schedule.
//!
//! Needs root (namespaces, nftables): without it the test says `SKIPPED (needs root)` and
//! passes. CI runs as root.

mod common;

use tenure_chaos::{run, Options};

/// The seed that once lost flows to a collector's clock stepped forward and back.
const FIXED_SEED: u64 = 20_261_207;
/// The length of each run's fault phase.
const DURATION_SECS: u64 = 300;

/// A seed for this run: `TENURE_CHAOS_SEED` when set, else drawn from the kernel.
fn drawn_seed() -> anyhow::Result<u64> {
    if let Ok(s) = std::env::var("TENURE_CHAOS_SEED") {
        return Ok(s.trim().parse()?);
    }
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?;
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    Ok(u64::from_str_radix(&hex, 16)?)
}

async fn five_minutes(seed: u64) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tenure-chaos-long-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "chaos: seed {seed} ({DURATION_SECS} s), in {}",
        dir.display()
    );
    let options = Options {
        tenure_bin: common::tenure_bin()?,
        dir: dir.clone(),
        seed,
        duration_secs: DURATION_SECS,
        regions: 2,
        nodes_per_region: 3,
        exporters_per_region: 8,
        namespaces: true,
    };
    let report = run(&options).await?;
    println!("{report}");
    anyhow::ensure!(
        report.skipped.is_empty(),
        "seed {seed}: faults skipped: {:?}",
        report.skipped
    );
    anyhow::ensure!(
        report.acked > 1_000,
        "seed {seed}: traffic flowed: {report}"
    );
    anyhow::ensure!(report.passed(), "seed {seed}:\n{}", report.details());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_minutes_of_faults_lose_and_misattribute_nothing() -> anyhow::Result<()> {
    if !common::is_root() {
        println!("SKIPPED (needs root): five minutes of chaos in network namespaces");
        eprintln!("SKIPPED (needs root): five minutes of chaos in network namespaces");
        return Ok(());
    }
    let drawn = drawn_seed()?;
    println!("chaos: seeds {FIXED_SEED} (fixed) and {drawn} (drawn for this run)");
    eprintln!("chaos: seeds {FIXED_SEED} (fixed) and {drawn} (drawn for this run)");
    five_minutes(FIXED_SEED).await?;
    five_minutes(drawn).await
}
