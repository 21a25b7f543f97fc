//! The systemd units in `node/deploy/` verify (`systemd-analyze verify`, no warning) and
//! rate at or under 5.0 in `systemd-analyze security --offline=true`.
//!
//! `verify` checks that `ExecStart`'s binary exists, so it reads a copy of each unit whose
//! `/usr/local/bin/tenure` (where the deployment guide installs it) names the binary this
//! test build made; nothing else in the copy differs. Without `systemd-analyze` the test
//! says so loudly and returns.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context};

const UNITS: [&str; 2] = ["tenure-collector.service", "tenure-exporter.service"];
/// The highest exposure the units may rate ("OK" in systemd's words).
const EXPOSURE_MAX: f64 = 5.0;
const INSTALLED_BINARY: &str = "/usr/local/bin/tenure";

/// Straight to the terminal as well: libtest captures stderr of passing tests.
fn loudly(line: &str) {
    let line = format!("{line}\n");
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| tty.write_all(line.as_bytes()));
    eprint!("{line}");
}

fn analyze(args: &[&str], unit: &Path) -> anyhow::Result<(bool, String)> {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        // Relative paths in messages, and no unit of the working directory picked up.
        .current_dir(unit.parent().context("unit directory")?)
        .output()
        .with_context(|| format!("systemd-analyze {args:?} {}", unit.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn units_verify_and_rate_ok() -> anyhow::Result<()> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        loudly("SKIPPED (systemd-analyze not installed): systemd-analyze verify and security on node/deploy/*.service");
        return Ok(());
    }
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let copies = tempfile::tempdir()?;
    for unit in UNITS {
        let path = deploy.join(unit);
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        ensure!(
            text.contains(&format!("ExecStart={INSTALLED_BINARY} ")),
            "{unit}: ExecStart runs {INSTALLED_BINARY}"
        );
        let copy = copies.path().join(unit);
        std::fs::write(
            &copy,
            text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_tenure")),
        )?;
        let (ok, said) = analyze(&["verify"], &copy)?;
        ensure!(
            ok && said.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{said}"
        );

        let (ok, said) = analyze(&["security", "--offline=true"], &path)?;
        ensure!(
            ok,
            "systemd-analyze security --offline=true {unit}:\n{said}"
        );
        let score: f64 = said
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no overall exposure for {unit}:\n{said}"))?;
        eprintln!("{unit}: exposure {score}");
        ensure!(
            score <= EXPOSURE_MAX,
            "{unit} rates {score}, above {EXPOSURE_MAX}:\n{said}"
        );
    }
    Ok(())
}
