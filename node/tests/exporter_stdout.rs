//! `tenure exporter --output stdout` is a host's flows as NDJSON: one object a line, and
//! an orderly exit when its reader goes away (`| head`), as Unix tools do.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "a process test waits against the wall clock"
)]
fn stdout_output_is_ndjson_and_a_closed_pipe_ends_it_cleanly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("exporter.toml");
    std::fs::write(
        &config,
        r#"exporter_id = 5
region = "local"
collectors = ["127.0.0.1:9"]
heartbeat_interval_ms = 200
source = { kind = "synthetic", prefix = "10.9.0.0/16", flows_per_sec = 2000 }
"#,
    )?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args(["exporter", "--output", "stdout", "--config"])
        .arg(&config)
        .env("TENURE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning tenure exporter")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for _ in 0..3 {
        let line = lines.next().context("a line of output")??;
        let flow: serde_json::Value = serde_json::from_str(&line).context("an NDJSON line")?;
        for field in [
            "flow_id",
            "local",
            "remote",
            "start_ms",
            "end_ms",
            "bytes_sent",
        ] {
            anyhow::ensure!(flow.get(field).is_some(), "{field} missing: {line}");
        }
    }
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the exporter went on writing to a closed pipe");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    anyhow::ensure!(status.success(), "exit {status}: {stderr}");
    Ok(())
}
