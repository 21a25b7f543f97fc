//! Collector processes for the load generator: started from this executable, stopped with
//! SIGTERM (killed if they linger, and on drop), measured from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::httpc;
use crate::listening::Listening;
use crate::shell::clock;

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel's `USER_HZ`, which is
/// 100 on every Linux architecture tenure runs on.
pub const USER_HZ: u64 = 100;

/// How long a collector may take to print its `LISTENING` line, in ms.
const LISTEN_TIMEOUT_MS: u64 = 20_000;

/// One running `tenure collector`.
#[derive(Debug)]
pub struct Collector {
    pub node_id: String,
    pub region: String,
    pub data: SocketAddr,
    pub http: SocketAddr,
    pub gossip: SocketAddr,
    pub sink_dir: PathBuf,
    child: Child,
}

impl Drop for Collector {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Collector {
    /// Starts `<exe> collector --config <config>` and waits for its `LISTENING` line. Its
    /// log (warnings and errors) goes to `<config>.log`.
    pub fn spawn(
        exe: &Path,
        config: &Path,
        node_id: &str,
        region: &str,
        sink_dir: PathBuf,
        worker_threads: usize,
    ) -> anyhow::Result<Collector> {
        let log = std::fs::File::create(config.with_extension("log"))
            .with_context(|| format!("creating the log of {node_id}"))?;
        let mut child = Command::new(exe)
            .args(["collector", "--config"])
            .arg(config)
            .env("TENURE_LOG", "warn")
            // tokio's own setting of a runtime's worker threads.
            .env("TOKIO_WORKER_THREADS", worker_threads.max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning collector {node_id}"))?;
        let listening = Listening::wait(&mut child, Duration::from_millis(LISTEN_TIMEOUT_MS))
            .with_context(|| {
                format!(
                    "collector {node_id} did not start; see {}",
                    config.with_extension("log").display()
                )
            })?;
        Ok(Collector {
            node_id: node_id.to_owned(),
            region: region.to_owned(),
            data: listening.data,
            http: listening.http,
            gossip: listening.gossip,
            sink_dir,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the collector to leave (SIGTERM) and waits up to `timeout` for it to exit;
    /// kills it past that. Returns whether it exited by itself.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = clock::now().0 + u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if clock::now().0 > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// CPU time of a process (all its threads), in clock ticks (`USER_HZ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// In the process's own code (`utime`).
    pub user: u64,
    /// In the kernel on its behalf (`stime`): system calls, page faults.
    pub system: u64,
}

impl CpuTicks {
    pub fn total(self) -> u64 {
        self.user + self.system
    }
}

impl std::iter::Sum for CpuTicks {
    fn sum<I: Iterator<Item = CpuTicks>>(iter: I) -> CpuTicks {
        iter.fold(CpuTicks::default(), |a, b| CpuTicks {
            user: a.user + b.user,
            system: a.system + b.system,
        })
    }
}

/// The CPU time a process has used so far.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the
    // last ')'. Field 3 (state) is the first after it; utime and stime are fields 14, 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("/proc stat field")
    };
    Ok(CpuTicks {
        user: number(11)?,
        system: number(12)?,
    })
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("VmRSS in /proc status")?;
    Ok(kb * 1024)
}

/// The sum of every sample of metric `name` in Prometheus text whose labels contain all
/// of `labels` (`key="value"` pairs).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let matches = labels.iter().all(|(k, v)| {
            label_text
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if matches {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// `GET /metrics` of a collector.
pub async fn scrape(http: SocketAddr) -> anyhow::Result<String> {
    match httpc::request(http, "GET", "/metrics", None, None, Duration::from_secs(5)).await {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => anyhow::bail!("metrics of {http}: status {status}"),
        Err(e) => Err(anyhow::Error::new(e).context(format!("metrics of {http}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_labels() {
        let text = "# TYPE x counter\nx{node=\"a\",result=\"attributed\"} 5\nx{node=\"b\",result=\"attributed\"} 7\nx{node=\"b\",result=\"unattributed\"} 1\nxy{node=\"a\"} 100\nx 2\n";
        assert_eq!(metric_sum(text, "x", &[("result", "attributed")]), 12.0);
        assert_eq!(metric_sum(text, "x", &[]), 15.0);
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(rss_bytes(pid).unwrap() > 0);
    }
}
