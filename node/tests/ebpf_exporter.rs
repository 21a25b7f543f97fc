//! The eBPF exporter end to end: a real `tenure collector`, a real `tenure exporter` with
//! the eBPF source, and a loopback connection with a known number of bytes each way. The
//! collector must accept the exporter's batches and write both sides of the connection to
//! its sink, each attributed to the workload the identity map names.
//!
//! Needs root (CAP_BPF and CAP_PERFMON); without it the test says so loudly and returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tenure_node::listening::Listening;

const KEY_HEX: &str = "6562706620746573742063616c6c6563746f72206b6579202d2074657374212e";
const DEADLINE: Duration = Duration::from_secs(60);
const CLIENT_BYTES: usize = 1_234;
const SERVER_BYTES: usize = 4_321;

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tenure` with `args` and returns it with the channel of its stdout lines.
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

/// One loopback connection: the client sends CLIENT_BYTES, the server answers with
/// SERVER_BYTES, both close. Returns the client's and the server's local ports.
fn one_connection() -> anyhow::Result<(u16, u16)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server_port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; CLIENT_BYTES];
        stream.read_exact(&mut buffer)?;
        stream.write_all(&vec![7u8; SERVER_BYTES])?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest)?;
        Ok(())
    });
    let mut client = TcpStream::connect(("127.0.0.1", server_port))?;
    let client_port = client.local_addr()?.port();
    client.write_all(&vec![1u8; CLIENT_BYTES])?;
    let mut answer = vec![0u8; SERVER_BYTES];
    client.read_exact(&mut answer)?;
    client.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    client.read_to_end(&mut rest)?;
    drop(client);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok((client_port, server_port))
}

#[allow(
    clippy::disallowed_methods,
    reason = "the identity map states since when, by the wall clock, as an orchestrator does"
)]
fn write_configs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sink = dir.join("sink");
    let collector = dir.join("collector.toml");
    std::fs::write(
        &collector,
        format!(
            r#"node_id = "solo"
region = "local"
prefixes = ["127.0.0.0/8"]
gossip_addr = "127.0.0.1:0"
data_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
heartbeat_interval_ms = 500
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
    // The loopback address belongs to one workload since a minute ago, as an
    // orchestrator's map would say.
    let since_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        - 60_000;
    std::fs::write(
        dir.join("ips.json"),
        format!(r#"{{"127.0.0.1": {{"workload": "loopback-svc", "since_ms": {since_ms}}}}}"#),
    )?;
    Ok((collector, sink))
}

#[test]
#[allow(
    clippy::disallowed_methods,
    reason = "a process test waits against the wall clock"
)]
fn ebpf_exporter_batches_reach_a_real_collector() -> anyhow::Result<()> {
    if let Err(why) = tenure_node_ebpf::check_privileges() {
        // Straight to the terminal: libtest captures stderr of passing tests.
        let line = format!("SKIPPED (needs root): eBPF exporter end to end: {why}\n");
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/tty")
            .and_then(|mut tty| tty.write_all(line.as_bytes()));
        eprint!("{line}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (collector_config, sink) = write_configs(dir.path())?;
    let (_collector, lines) = spawn(&["collector"], &collector_config)?;
    let listening = lines
        .recv_timeout(Duration::from_secs(30))
        .context("waiting for the collector's LISTENING line")?;
    let data = Listening::parse(&listening)?.data;

    let exporter_config = dir.path().join("exporter.toml");
    std::fs::write(
        &exporter_config,
        format!(
            r#"exporter_id = 77
region = "local"
collectors = ["{data}"]
heartbeat_interval_ms = 500
key = {{ key_hex = "{KEY_HEX}" }}
identity = {{ kind = "map_file", path = "{}" }}
source = {{ kind = "ebpf", births_max = 65536 }}
"#,
            dir.path().join("ips.json").display()
        ),
    )?;
    let (_exporter, _exporter_lines) = spawn(&["exporter"], &exporter_config)?;

    // The capture is attached once the exporter has sent its first batch; connect until
    // one of our connections shows up in the sink.
    let deadline = Instant::now() + DEADLINE;
    let mut ports = Vec::new();
    loop {
        if Instant::now() > deadline {
            bail!("no connection of ports {ports:?} reached the sink in {DEADLINE:?}");
        }
        let (client_port, server_port) = one_connection()?;
        ports.push((client_port, server_port));
        let poll_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < poll_until {
            let found = sink_lines(&sink);
            let side = |port: u16| {
                found
                    .iter()
                    .find(|l| l["local"]["port"] == port && l["local"]["ip"] == "127.0.0.1")
                    .cloned()
            };
            if let (Some(client), Some(server)) = (side(client_port), side(server_port)) {
                for (line, sent, received, direction) in [
                    (&client, CLIENT_BYTES, SERVER_BYTES, "outbound"),
                    (&server, SERVER_BYTES, CLIENT_BYTES, "inbound"),
                ] {
                    assert_eq!(line["local"]["workload"], "loopback-svc", "{line}");
                    assert_eq!(line["remote"]["workload"], "loopback-svc", "{line}");
                    assert_eq!(line["result"], "attributed", "{line}");
                    assert_eq!(line["direction"], direction, "{line}");
                    // Payload bytes, exactly: no SYN or FIN counted.
                    assert_eq!(line["bytes_sent"], sent as u64, "{line}");
                    assert_eq!(line["bytes_received"], received as u64, "{line}");
                    // TCP health from the kernel: segments both ways and a smoothed RTT.
                    for field in ["segs_in", "segs_out", "rtt_us"] {
                        let value = line[field].as_u64().context("health field")?;
                        assert!(value > 0, "{field} is {value}: {line}");
                    }
                }
                assert_eq!(client["remote"]["port"], server_port);
                assert_eq!(server["remote"]["port"], client_port);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
