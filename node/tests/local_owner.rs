//! The local end of a flow, stamped by the flow's time: a real `tenure collector`, a real
//! `tenure exporter` with the eBPF source and an IP map file, and a server IP whose owner
//! the map changes just before, during and just after connections to it, many times.
//! Every server-side line in the sink that names a local workload must name the one that
//! held the IP for the whole flow (by the map's own `since_ms` times); every other one must
//! say why it names none. The owner at the time the batch was collected is never a guess
//! the exporter may make.
//!
//! Needs root (CAP_BPF and CAP_PERFMON); without it the test says so loudly and returns.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tenure_node::listening::Listening;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY_HEX: &str = "6c6f63616c206f776e657220746573742063616c6c6563746f72206b65792121";
const CLIENT_IP: &str = "127.0.1.10";
const SERVER_IP: &str = "127.0.1.20";
const HEARTBEAT_MS: u64 = 500;
/// How long each connection stays open, in ms.
const CONNECTION_MS: u64 = 150;
const ROUNDS: usize = 32;
const DEADLINE: Duration = Duration::from_secs(90);

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], config: &Path) -> anyhow::Result<(Proc, mpsc::Receiver<String>)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("TENURE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning tenure {args:?}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Ok((Proc(child), rx))
}

/// Every NDJSON line written so far under `dir`.
fn sink_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
            }
        }
    }
    lines
}

#[allow(
    clippy::disallowed_methods,
    reason = "the identity map states since when by the wall clock, as an orchestrator does"
)]
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The map file and the truth it states: the server IP's owners in order, each from its
/// `since_ms`.
struct Map {
    path: PathBuf,
    tmp: PathBuf,
    owners: Vec<(String, u64)>,
}

impl Map {
    /// The server IP now belongs to a new workload, since now (written whole, then renamed
    /// over the old file, as an orchestrator does).
    fn change_owner(&mut self) -> anyhow::Result<()> {
        let owner = format!("owner-{}", self.owners.len());
        let since = now_ms();
        let text = format!(
            r#"{{"{CLIENT_IP}": {{"workload": "client", "since_ms": {}}}, "{SERVER_IP}": {{"workload": "{owner}", "since_ms": {since}}}}}"#,
            since.saturating_sub(3_600_000)
        );
        std::fs::write(&self.tmp, text)?;
        std::fs::rename(&self.tmp, &self.path)?;
        self.owners.push((owner, since));
        Ok(())
    }

    /// The owner that held the server IP over all of `[start_ms, end_ms]`, if one did.
    fn owner_throughout(&self, start_ms: u64, end_ms: u64) -> Option<&str> {
        self.owners
            .iter()
            .enumerate()
            .find_map(|(k, (owner, since))| {
                let until = self.owners.get(k + 1).map_or(u64::MAX, |next| next.1 - 1);
                (*since <= start_ms && end_ms <= until).then_some(owner.as_str())
            })
    }
}

/// When, relative to a connection, the owner changes.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// This many ms before the connection opens.
    Before(u64),
    /// This many ms after it opened (it is still open).
    During(u64),
    /// This many ms after it closed.
    After(u64),
    /// Not near it.
    Far,
}

/// The schedule: every kind of change, near and less near, in turn.
const CHANGES: [Change; 8] = [
    Change::Before(20),
    Change::During(70),
    Change::After(30),
    Change::Far,
    Change::Before(300),
    Change::During(10),
    Change::After(250),
    Change::After(5),
];

/// One connection from the client IP to a fresh listener on the server IP that stays
/// open `CONNECTION_MS`, with the owner changed as `change` says. Returns the server's port.
async fn round(map: &mut Map, change: Change) -> anyhow::Result<u16> {
    if let Change::Before(ms) = change {
        map.change_owner()?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let listener = tokio::net::TcpListener::bind((SERVER_IP, 0)).await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut request = [0u8; 3];
        stream.read_exact(&mut request).await?;
        tokio::time::sleep(Duration::from_millis(CONNECTION_MS)).await;
        stream.write_all(b"answer").await?;
        stream.shutdown().await?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await?;
        anyhow::Ok(())
    });
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{CLIENT_IP}:0").parse()?)?;
    let mut client = socket
        .connect(format!("{SERVER_IP}:{port}").parse()?)
        .await?;
    client.write_all(b"ask").await?;
    if let Change::During(ms) = change {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        map.change_owner()?;
    }
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await?;
    drop(client);
    server.await??;
    if let Change::After(ms) = change {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        map.change_owner()?;
    }
    // The next connection starts well after this one's batch: changes of one round stay
    // away from the others' flows.
    tokio::time::sleep(Duration::from_millis(2 * HEARTBEAT_MS)).await;
    Ok(port)
}

fn write_collector_config(dir: &Path, sink: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("collector.toml");
    std::fs::write(
        &path,
        format!(
            r#"node_id = "solo"
region = "local"
prefixes = ["127.0.0.0/8"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = {HEARTBEAT_MS}
shutdown_grace_ms = 1000
cluster_key = {{ key_hex = "{KEY_HEX}" }}
# Exporters here seal with the cluster key (test setup, not a deployment).
dev_exporters_use_cluster_key = true
sink = {{ kind = "files", dir = "{}" }}
data_dir = "{}"

[engine]
skew_margin_ms = 200
pending_deadline_ms = 5000
"#,
            sink.display(),
            dir.join("data").display()
        ),
    )?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::disallowed_methods,
    reason = "a process test waits against the wall clock"
)]
async fn a_local_end_names_only_the_workload_that_held_the_ip_for_the_whole_flow(
) -> anyhow::Result<()> {
    if let Err(why) = tenure_node_ebpf::check_privileges() {
        let line = format!("SKIPPED (needs root): local owner changes under eBPF capture: {why}\n");
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/tty")
            .and_then(|mut tty| tty.write_all(line.as_bytes()));
        eprint!("{line}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let sink = dir.path().join("sink");
    let mut map = Map {
        path: dir.path().join("ips.json"),
        tmp: dir.path().join("ips.json.tmp"),
        owners: Vec::new(),
    };
    map.change_owner()?;
    let collector_config = write_collector_config(dir.path(), &sink)?;
    let (_collector, lines) = spawn(&["collector"], &collector_config)?;
    let listening = lines
        .recv_timeout(Duration::from_secs(30))
        .context("waiting for the collector's LISTENING line")?;
    let data = Listening::parse(&listening)?.data;
    let exporter_config = dir.path().join("exporter.toml");
    std::fs::write(
        &exporter_config,
        format!(
            r#"exporter_id = 78
region = "local"
collectors = ["{data}"]
heartbeat_interval_ms = {HEARTBEAT_MS}
key = {{ key_hex = "{KEY_HEX}" }}
identity = {{ kind = "map_file", path = "{}" }}
source = {{ kind = "ebpf", births_max = 65536 }}
"#,
            map.path.display()
        ),
    )?;
    let (_exporter, _exporter_lines) = spawn(&["exporter"], &exporter_config)?;

    // The capture is attached once a connection of ours reaches the sink. A flow reaches
    // it a settle time (about two heartbeats) and a sink flush after it ends, later than
    // the next round starts: any warm-up connection counts, not only the latest.
    let deadline = Instant::now() + DEADLINE;
    let mut warm_up = Vec::new();
    loop {
        warm_up.push(round(&mut map, Change::Far).await?);
        let seen = sink_lines(&sink).iter().any(|l| {
            l["local"]["ip"] == SERVER_IP
                && l["local"]["port"]
                    .as_u64()
                    .is_some_and(|p| warm_up.iter().any(|w| u64::from(*w) == p))
        });
        if seen {
            break;
        }
        if Instant::now() > deadline {
            bail!("no connection reached the sink in {DEADLINE:?}");
        }
    }

    let mut ports = Vec::new();
    for k in 0..ROUNDS {
        ports.push(round(&mut map, CHANGES[k % CHANGES.len()]).await?);
    }
    // Every round's server side reaches the sink (a snapshot of it while open, at least).
    let deadline = Instant::now() + DEADLINE;
    let server_lines = loop {
        let found: Vec<serde_json::Value> = sink_lines(&sink)
            .into_iter()
            .filter(|l| l["local"]["ip"] == SERVER_IP)
            .collect();
        let missing: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !found.iter().any(|l| l["local"]["port"] == *p))
            .collect();
        if missing.is_empty() {
            break found;
        }
        if Instant::now() > deadline {
            bail!("the server sides of ports {missing:?} never reached the sink");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let mut stamped = 0;
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrong = Vec::new();
    for line in sink_lines(&sink)
        .iter()
        .filter(|l| l["local"]["ip"] == SERVER_IP)
    {
        let start = line["start_ms"].as_u64().context("start_ms")?;
        let end = line["end_ms"].as_u64().context("end_ms")?;
        match line["local"]["workload"].as_str() {
            Some(said) => {
                stamped += 1;
                let truth = map.owner_throughout(start, end);
                if truth != Some(said) {
                    wrong.push(format!("stamped {said}, truth {truth:?}: {line}"));
                }
            }
            None => {
                let reason = line["local"]["reason"].as_str().unwrap_or("none");
                if !["local_changed", "local_unknown", "local_expired"].contains(&reason) {
                    wrong.push(format!("no local workload and no reason: {line}"));
                }
                *reasons.entry(reason.to_owned()).or_default() += 1;
            }
        }
    }
    println!(
        "{} owner changes, {} server-side flows: stamped={stamped} unattributed={reasons:?}",
        map.owners.len(),
        server_lines.len()
    );
    assert!(
        wrong.is_empty(),
        "{} local ends named a workload that did not hold the IP throughout:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        stamped >= ROUNDS / CHANGES.len(),
        "flows far from a change are stamped"
    );
    assert!(
        reasons.get("local_changed").copied().unwrap_or(0) >= 1,
        "flows next to a change go out local_changed: {reasons:?}"
    );
    Ok(())
}
