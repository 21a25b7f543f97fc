//! What the chaos tests share.

use std::path::PathBuf;

use anyhow::Context;

/// The `tenure` binary: `CARGO_BIN_EXE_tenure` when cargo provides it (it does only for
/// the package that defines the binary), else next to this test's directory, built with
/// the cargo running this test when missing.
pub(crate) fn tenure_bin() -> anyhow::Result<PathBuf> {
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

/// Whether this process runs as root (network namespaces and nftables need it).
#[allow(dead_code, reason = "only the long scenario insists on root")]
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
