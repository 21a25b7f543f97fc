//! What the process tests share: starting a `tenure collector` from a config file and
//! reading the addresses it printed.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tenure_node::listening::Listening;

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
    let Listening { gossip, data, http } = Listening::wait(&mut child, Duration::from_secs(20))
        .context("starting tenure collector")?;
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
#[allow(dead_code, reason = "not every process test stamps flows")]
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
