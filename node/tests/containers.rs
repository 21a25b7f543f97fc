//! The containers identity source, for real: Podman serving the Docker API on a socket of
//! the test's own, a network of the test's own with a /29 subnet (five usable addresses, so
//! addresses pass from container to container within seconds), a server container
//! replaced every few rounds and short-lived client containers fetching from it, a real
//! `tenure collector` and a real `tenure exporter` (eBPF capture, `identity = { kind =
//! "containers" }`). Every sink line naming a workload, at either end, must name the
//! container that held the address over the whole flow, by Podman's own start and finish
//! times; every local end naming none must say why.
//!
//! Needs root (eBPF, Podman as root), `podman`, `runc` and busybox (Debian's `podman`,
//! `runc`, `busybox-static`); without them the test says so loudly and returns.
//! Everything it creates is removed, also when it fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tenure_node::listening::Listening;

const KEY_HEX: &str = "636f6e7461696e657273207465737420636c7573746572206b65792121212121";
const HEARTBEAT_MS: u64 = 500;
/// Client containers started, one after another.
const ROUNDS: usize = 30;
/// The server is replaced every this many rounds.
const SERVER_EVERY: usize = 6;
/// Client rounds after the API service was down while the server was replaced.
const AFTER_OUTAGE_ROUNDS: usize = 4;
const DEADLINE: Duration = Duration::from_secs(120);
const BUSYBOX: &str = "/bin/busybox";

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skip(why: &str) {
    let line =
        format!("SKIPPED (needs root/podman): containers identity source under Podman: {why}\n");
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| tty.write_all(line.as_bytes()));
    eprint!("{line}");
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Podman with the test's own storage, and everything it made, removed on drop.
struct Podman {
    dir: PathBuf,
    network: String,
    service: Option<Proc>,
}

impl Podman {
    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--runtime")
            .arg("runc")
            .arg("--cgroup-manager=cgroupfs")
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"));
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running podman {args:?}"))?;
        ensure!(
            out.status.success(),
            "podman {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Serves the Docker API on [`Podman::socket`] (stopping a previous service first).
    fn serve(&mut self) -> anyhow::Result<()> {
        self.service = None;
        let socket = self.socket();
        let _ = std::fs::remove_file(&socket);
        let service = self
            .command()
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting podman system service")?;
        self.service = Some(Proc(service));
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Starts a container in the background; returns once it runs.
    fn start(&self, name: &str, labels: &[&str], command: &[&str]) -> anyhow::Result<()> {
        let rootfs = self.rootfs();
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.network,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--stop-timeout",
            "0",
        ];
        for l in labels {
            args.extend(["--label", l]);
        }
        let rootfs = rootfs.to_str().context("rootfs path")?;
        args.extend(["--rootfs", rootfs]);
        args.extend(command);
        self.run(&args).map(|_| ())
    }

    fn ip_of(&self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            self.network
        );
        let text = self.run(&["inspect", "--format", &format, name])?;
        text.parse()
            .with_context(|| format!("the address of {name}: {text:?}"))
    }

    /// Podman's own start and finish times of a container that exited, in ms.
    fn times_of(&self, name: &str) -> anyhow::Result<(u64, u64)> {
        let text = self.run(&[
            "inspect",
            "--format",
            "{{.State.StartedAt.UnixNano}} {{.State.FinishedAt.UnixNano}}",
            name,
        ])?;
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>());
        match (parts.next(), parts.next()) {
            (Some(Ok(s)), Some(Ok(f))) if f >= s => Ok((s / 1_000_000, f / 1_000_000)),
            _ => bail!("the times of {name}: {text:?}"),
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["rm", "-af", "-t", "0"]).output();
        let _ = self
            .command()
            .args(["network", "rm", "-f", &self.network])
            .output();
        self.service = None;
    }
}

/// A /29 of 10.89.0.0/16 no route of this host touches, chosen from the process id.
fn free_subnet() -> anyhow::Result<u8> {
    let routes = Command::new("ip").args(["-4", "route", "show"]).output()?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let start = (std::process::id() % 200) as u8;
    (0..200u8)
        .map(|k| 20 + (start.wrapping_add(k) % 200))
        .find(|x| !routes.contains(&format!("10.89.{x}.")))
        .context("no free 10.89.x.0/29")
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

/// The exporter's `/metrics`.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    ensure!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "GET /metrics: {body}"
    );
    Ok(body)
}

/// One container's hold on an address, by Podman's times.
#[derive(Clone, Debug)]
struct Hold {
    workload: String,
    ip: Ipv4Addr,
    started_ms: u64,
    finished_ms: u64,
}

/// The workload that held `ip` over all of `[start_ms, end_ms]`, if one did.
fn holder(holds: &[Hold], ip: Ipv4Addr, start_ms: u64, end_ms: u64) -> Option<&str> {
    holds
        .iter()
        .find(|h| h.ip == ip && h.started_ms <= start_ms && end_ms <= h.finished_ms)
        .map(|h| h.workload.as_str())
}

fn write_configs(
    dir: &Path,
    sink: &Path,
    data: Option<&str>,
    socket: &Path,
    http: &str,
) -> anyhow::Result<PathBuf> {
    match data {
        None => {
            let path = dir.join("collector.toml");
            std::fs::write(
                &path,
                format!(
                    r#"node_id = "solo"
region = "local"
prefixes = ["10.89.0.0/16"]
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
        Some(data) => {
            let path = dir.join("exporter.toml");
            std::fs::write(
                &path,
                format!(
                    r#"exporter_id = 79
region = "local"
collectors = ["{data}"]
heartbeat_interval_ms = {HEARTBEAT_MS}
key = {{ key_hex = "{KEY_HEX}" }}
local_source_lag_ms = 500
http_addr = "{http}"
identity = {{ kind = "containers", socket = "{}" }}
source = {{ kind = "ebpf", births_max = 65536 }}
"#,
                    socket.display()
                ),
            )?;
            Ok(path)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::disallowed_methods,
    reason = "a process test waits against the wall clock"
)]
async fn every_attributed_end_names_the_container_that_held_the_address() -> anyhow::Result<()> {
    if let Err(why) = tenure_node_ebpf::check_privileges() {
        skip(&why.to_string());
        return Ok(());
    }
    for program in ["podman", "runc"] {
        if !on_path(program) && !Path::new("/usr/sbin").join(program).is_file() {
            skip(&format!("{program} is not installed"));
            return Ok(());
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        skip(&format!("{BUSYBOX} is not there (busybox-static)"));
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let x = free_subnet()?;
    let subnet = format!("10.89.{x}.0/29");
    let mut podman = Podman {
        dir: dir.path().to_path_buf(),
        network: format!("tenure-test-{}", std::process::id()),
        service: None,
    };
    // A root filesystem of busybox alone.
    let bin = podman.rootfs().join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(podman.rootfs().join("www"))?;
    std::fs::write(podman.rootfs().join("www/index.html"), "tenure\n")?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    for applet in ["sh", "httpd", "wget", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let socket = podman.socket();
    podman.serve()?;
    podman.run(&[
        "network",
        "create",
        "--subnet",
        &subnet,
        &podman.network.clone(),
    ])?;
    let deadline = Instant::now() + DEADLINE;
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "the podman socket never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sink = dir.path().join("sink");
    let collector_config = write_configs(dir.path(), &sink, None, &socket, "")?;
    let (_collector, lines) = spawn(&["collector"], &collector_config)?;
    let listening = lines
        .recv_timeout(Duration::from_secs(30))
        .context("waiting for the collector's LISTENING line")?;
    let data = Listening::parse(&listening)?.data.to_string();
    // A free port for the exporter's /metrics.
    let http = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let exporter_config = write_configs(dir.path(), &sink, Some(&data), &socket, &http)?;
    let (_exporter, _exporter_lines) = spawn(&["exporter"], &exporter_config)?;

    let mut holds: Vec<Hold> = Vec::new();
    let mut stopped: Vec<(String, String, Ipv4Addr)> = Vec::new();
    let mut server: Option<(String, String, Ipv4Addr)> = None;
    // Clients wait before and after fetching: a flow far enough inside its container's
    // life to be vouched for.
    let client = "sleep 0.5; wget -q -O /dev/null http://{SERVER}/; sleep 0.5";
    let mut k = 0;
    let mut warmed = false;
    let mut seq = 0;
    let mut rounds = ROUNDS;
    let mut outage_server: Option<String> = None;
    while k < rounds {
        if server.is_none() || (warmed && k < ROUNDS && k % SERVER_EVERY == 0) {
            if let Some(old) = server.take() {
                podman.run(&["stop", "-t", "0", &old.0])?;
                stopped.push(old);
            }
            seq += 1;
            let name = format!("srv-{seq}");
            let workload = format!("web-{seq}");
            let label = format!("tenure.workload={workload}");
            podman.start(
                &name,
                &[&label],
                &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
            )?;
            let ip = podman.ip_of(&name)?;
            server = Some((name, workload, ip));
        }
        let server_ip = server.as_ref().map(|s| s.2).context("a server")?;
        seq += 1;
        let name = format!("cli-{seq}-{}", u8::from(warmed));
        let script = client.replace("{SERVER}", &server_ip.to_string());
        podman.start(&name, &[], &["/bin/sh", "-c", &script])?;
        let ip = podman.ip_of(&name)?;
        podman.run(&["wait", &name])?;
        stopped.push((name.clone(), name, ip));
        if !warmed {
            // The capture and the source are up once a client's flow reaches the sink.
            let seen = sink_lines(&sink)
                .iter()
                .any(|l| l["local"]["ip"] == ip.to_string() && l["local"]["workload"].is_string());
            if seen {
                warmed = true;
                k = 0;
                continue;
            }
            ensure!(
                Instant::now() < deadline,
                "no client flow was attributed in {DEADLINE:?}"
            );
            continue;
        }
        k += 1;
        if k == ROUNDS && outage_server.is_none() {
            // The runtime's API goes away; meanwhile the server is replaced, so that only
            // the relisting after the reconnect can tell.
            podman.service = None;
            let old = server.take().context("a server")?;
            podman.run(&["stop", "-t", "0", &old.0])?;
            stopped.push(old);
            seq += 1;
            let name = format!("srv-{seq}");
            let workload = format!("web-{seq}");
            let label = format!("tenure.workload={workload}");
            podman.start(
                &name,
                &[&label],
                &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
            )?;
            let ip = podman.ip_of(&name)?;
            server = Some((name, workload.clone(), ip));
            outage_server = Some(workload);
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            podman.serve()?;
            let back = Instant::now() + DEADLINE;
            while !socket.exists() {
                ensure!(Instant::now() < back, "the podman socket never came back");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            rounds += AFTER_OUTAGE_ROUNDS;
        }
    }
    if let Some(old) = server.take() {
        podman.run(&["stop", "-t", "0", &old.0])?;
        stopped.push(old);
    }
    for (name, workload, ip) in &stopped {
        let (started_ms, finished_ms) = podman.times_of(name)?;
        holds.push(Hold {
            workload: workload.clone(),
            ip: *ip,
            started_ms,
            finished_ms,
        });
    }
    holds.sort_by_key(|h| h.started_ms);
    let mut reuses = 0;
    let mut last: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for h in &holds {
        if last.insert(h.ip, &h.workload).is_some() {
            reuses += 1;
        }
    }

    // Every measured client's flow reaches the sink at both ends.
    let clients: Vec<&Hold> = holds
        .iter()
        .filter(|h| h.workload.starts_with("cli-") && h.workload.ends_with("-1"))
        .collect();
    let deadline = Instant::now() + DEADLINE;
    let all = loop {
        let all = sink_lines(&sink);
        let missing: Vec<&str> = clients
            .iter()
            .filter(|c| {
                !all.iter().any(|l| {
                    l["local"]["ip"] == c.ip.to_string()
                        && l["start_ms"]
                            .as_u64()
                            .is_some_and(|s| s >= c.started_ms && s <= c.finished_ms)
                })
            })
            .map(|c| c.workload.as_str())
            .collect();
        if missing.is_empty() {
            break all;
        }
        if Instant::now() > deadline {
            bail!("the flows of {missing:?} never reached the sink");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let net: ipnet::Ipv4Net = subnet.parse()?;
    let (mut flows, mut stamped, mut remote_named) = (0, 0, 0);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrong = Vec::new();
    for line in &all {
        let Ok(local_ip) = line["local"]["ip"]
            .as_str()
            .unwrap_or("")
            .parse::<Ipv4Addr>()
        else {
            continue;
        };
        if !net.contains(&local_ip) {
            continue;
        }
        flows += 1;
        let start = line["start_ms"].as_u64().context("start_ms")?;
        let end = line["end_ms"].as_u64().context("end_ms")?;
        match line["local"]["workload"].as_str() {
            Some(said) => {
                stamped += 1;
                let truth = holder(&holds, local_ip, start, end);
                if truth != Some(said) {
                    wrong.push(format!("local {said}, truth {truth:?}: {line}"));
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
        if let Some(said) = line["remote"]["workload"].as_str() {
            remote_named += 1;
            let remote_ip: Ipv4Addr = line["remote"]["ip"].as_str().unwrap_or("").parse()?;
            let truth = holder(&holds, remote_ip, start, end);
            if truth != Some(said) {
                wrong.push(format!("remote {said}, truth {truth:?}: {line}"));
            }
        }
    }
    let metrics = scrape(&http).await?;
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    };
    let (events, reconnects, malformed) = (
        counter("tenure_exporter_container_events_total"),
        counter("tenure_exporter_container_reconnects_total"),
        counter("tenure_exporter_container_events_malformed_total"),
    );
    println!("containers: the exporter read {events} events, reconnected {reconnects} times, skipped {malformed} malformed");
    assert!(events >= ROUNDS as f64, "the events stream was followed");
    assert!(reconnects >= 1.0, "the outage was a reconnect");
    assert_eq!(malformed, 0.0, "Podman's events are all readable");
    let outage_server = outage_server.context("the outage happened")?;
    let after_outage = all
        .iter()
        .filter(|l| l["local"]["workload"] == outage_server.as_str())
        .count();
    println!(
        "containers: the server started while the API was down ({outage_server}) has {after_outage} stamped ends after the reconnect"
    );
    assert!(
        after_outage >= 1,
        "the relisting after the reconnect found the server started meanwhile"
    );
    println!(
        "containers: {} containers, {reuses} address reuses, {flows} flow ends in {subnet}: stamped={stamped} remote_named={remote_named} unattributed={reasons:?} misattributed={}",
        holds.len(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} ends named a workload that did not hold the address throughout:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(reuses >= 20, "only {reuses} address reuses");
    assert!(
        stamped >= ROUNDS,
        "most client and server ends are vouched for: {stamped} of {flows}"
    );
    Ok(())
}
