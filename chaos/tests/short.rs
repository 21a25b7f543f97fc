//! The short scenario against real `tenure collector` processes: `kill -9` of a node under
//! load and its restart on the same data directory, a partition, a pause. No acknowledged
//! flow may be lost and none misattributed.

use std::path::PathBuf;

use anyhow::Context;
use tenure_chaos::{run, Options};

/// The `tenure` binary: `CARGO_BIN_EXE_tenure` when cargo provides it (it does only for
/// the package that defines the binary), else next to this test's directory, built with
/// the cargo running this test when missing.
fn tenure_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = option_env!("CARGO_BIN_EXE_tenure") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary location")?;
    let bin = profile_dir.join("tenure");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-p", "tenure-node", "--bin", "tenure"])
        .status()
        .context("building tenure")?;
    anyhow::ensure!(status.success(), "building tenure failed");
    anyhow::ensure!(bin.exists(), "{} missing after the build", bin.display());
    Ok(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_scenario_loses_and_misattributes_nothing() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tenure-chaos-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options {
        tenure_bin: tenure_bin()?,
        dir: dir.clone(),
        seed: 7,
        duration_secs: 0,
        regions: 2,
        nodes_per_region: 3,
        exporters_per_region: 6,
        namespaces: true,
    };
    let report = run(&options).await?;
    println!("{report}");
    assert!(report.faults >= 2, "faults injected: {report}");
    assert!(report.acked > 100, "traffic flowed: {report}");
    assert_eq!(report.lost, 0, "acknowledged flows lost: {report}");
    assert_eq!(report.misattributed, 0, "misattributed flows: {report}");
    assert_eq!(
        report.phantom, 0,
        "flows emitted that were never sent: {report}"
    );
    assert!(report.passed(), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
