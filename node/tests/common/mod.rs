//! What the process tests share: starting a `tenure collector` from a config file and
//! reading the addresses it printed.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

/// A collector process, killed on drop, with the addresses it printed on its `LISTENING`
/// line once its sockets were bound.
pub(crate) struct Collector {
    pub(crate) child: Child,
    pub(crate) data: SocketAddr,
    pub(crate) http: SocketAddr,
    #[allow(dead_code, reason = "only the multi-node tests join through it")]
    pub(crate) gossip: SocketAddr,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tenure collector --config <config>` with `TENURE_LOG=<log>` and waits (20 s at
/// most) for its `LISTENING` line.
pub(crate) fn spawn_collector(config: &Path, log: &str) -> anyhow::Result<Collector> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args(["collector", "--config"])
        .arg(config)
        .env("TENURE_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning tenure collector")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => line,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e).context("waiting for the LISTENING line");
        }
    };
    let field = |name: &str| -> anyhow::Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .with_context(|| format!("{name} in {line:?}"))?
            .parse()
            .with_context(|| format!("{name} address"))
    };
    let addresses = (field("data"), field("http"), field("gossip"));
    let (data, http, gossip) = match addresses {
        (Ok(data), Ok(http), Ok(gossip)) => (data, http, gossip),
        (data, http, gossip) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(data.and(http).and(gossip).unwrap_err());
        }
    };
    Ok(Collector {
        child,
        data,
        http,
        gossip,
    })
}

/// Milliseconds since the Unix epoch: tests stamp their flows and claims with the wall
/// clock, as an exporter does.
#[allow(
    clippy::disallowed_methods,
    reason = "the tests stamp flows and claims with the wall clock, as an exporter does"
)]
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
