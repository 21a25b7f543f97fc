//! The collector processes: configuration, start, `kill -9`, restart on the same data
//! directory, signals, convergence and the sink files.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tenure_node::listening::Listening;
use tokio::time::Instant;

use crate::net::{NetError, Netns, Nft};
use crate::{Emitted, Options};

/// The cluster key every process and exporter shares (a test key).
pub const KEY_HEX: &str = "6368616f7320636c7573746572206b6579202d206e6f7420666f722070726f64";
/// The admin bearer token of every collector here (fault injection is on: a test setup).
pub const ADMIN_TOKEN: &str = "chaos-admin-token-not-for-production";
/// How long a started process may take to print its LISTENING line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a node stands in the cluster.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub node_id: String,
    pub region: String,
    pub prefix: String,
}

/// A running (or killed) collector process; killed on drop.
#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    config: PathBuf,
    sink: PathBuf,
    child: Option<Child>,
    gossip: SocketAddr,
    data: SocketAddr,
    http: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The region of each exporter and node: region `r` serves `10.{r+1}.0.0/16`.
pub fn region_name(r: usize) -> String {
    format!("r{r}")
}

pub fn region_prefix(r: usize) -> String {
    format!("10.{}.0.0/16", r + 1)
}

/// Where the collectors live on the network (see [`crate::net`]).
#[derive(Debug)]
pub enum Network {
    /// A namespace per collector, on a bridge of this run.
    Namespaces(Netns),
    /// Everyone on 127.0.0.1; network faults through nftables on ports (root only).
    Loopback(Nft),
}

/// All collectors of the run.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    regions: usize,
    /// Dropped before `network`: processes die before their namespaces go.
    nodes: Vec<Node>,
    network: Network,
}

impl Cluster {
    /// Starts `regions × nodes_per_region` collectors (the first is every other's seed)
    /// and waits until they converge.
    pub async fn start(options: &Options) -> anyhow::Result<Cluster> {
        let count = options.regions * options.nodes_per_region;
        let network = if options.namespaces {
            match Netns::create(count) {
                Ok(netns) => {
                    eprintln!(
                        "chaos: one network namespace per collector ({}..), bridge at {}",
                        netns.name(0),
                        netns.gateway()
                    );
                    Network::Namespaces(netns)
                }
                Err(e) => {
                    eprintln!("chaos: NETWORK NAMESPACES UNAVAILABLE ({e}); collectors share loopback, and partitions and loss fall back to nftables on their ports, which needs root and nft (skipped otherwise)");
                    Network::Loopback(Nft::new(std::process::id()))
                }
            }
        } else {
            eprintln!("chaos: collectors share loopback (namespaces not asked for); partitions and loss use nftables on their ports (root and nft, skipped otherwise)");
            Network::Loopback(Nft::new(std::process::id()))
        };
        let mut cluster = Cluster {
            bin: options.tenure_bin.clone(),
            dir: options.dir.clone(),
            regions: options.regions,
            nodes: Vec::new(),
            network,
        };
        for r in 0..options.regions {
            for n in 0..options.nodes_per_region {
                let spec = NodeSpec {
                    node_id: format!("{}n{n}", region_name(r)),
                    region: region_name(r),
                    prefix: region_prefix(r),
                };
                let seeds: Vec<SocketAddr> = cluster
                    .nodes
                    .first()
                    .map(|n| n.gossip)
                    .into_iter()
                    .collect();
                let index = cluster.nodes.len();
                let node = cluster.spawn(index, spec, &seeds)?;
                cluster.nodes.push(node);
            }
        }
        cluster.wait_converged(crate::CONVERGE_TIMEOUT).await?;
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// (region, data address) of every running node.
    pub fn addrs(&self) -> Vec<(String, SocketAddr, bool)> {
        self.nodes
            .iter()
            .map(|n| (n.spec.region.clone(), n.data, n.child.is_some()))
            .collect()
    }

    /// Whether collectors run in namespaces of their own.
    pub fn in_namespaces(&self) -> bool {
        matches!(self.network, Network::Namespaces(_))
    }

    /// Cuts a node off the network (`percent` = 100) or drops that share of its packets.
    pub fn cut(&self, node: usize, percent: u8) -> Result<(), NetError> {
        let i = node % self.nodes.len();
        match &self.network {
            Network::Namespaces(netns) => netns.cut(i, percent),
            Network::Loopback(nft) => {
                let n = &self.nodes[i];
                nft.cut((n.gossip.port(), n.data.port()), percent)
            }
        }
    }

    /// Undoes [`Cluster::cut`].
    pub fn heal(&self, node: usize) -> Result<(), NetError> {
        match &self.network {
            Network::Namespaces(netns) => netns.heal(node % self.nodes.len()),
            Network::Loopback(nft) => nft.heal(),
        }
    }

    /// The address node `i` binds.
    fn host(&self, i: usize) -> IpAddr {
        match &self.network {
            Network::Namespaces(netns) => netns.addr(i),
            Network::Loopback(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    fn config_text(
        &self,
        host: IpAddr,
        spec: &NodeSpec,
        seeds: &[SocketAddr],
        sink: &std::path::Path,
    ) -> String {
        let others: String = (0..self.regions)
            .filter(|r| region_name(*r) != spec.region)
            .map(|r| format!("\"{}\" = [\"{}\"]\n", region_name(r), region_prefix(r)))
            .collect();
        let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            r#"node_id = "{id}"
region = "{region}"
prefixes = ["{prefix}"]
gossip_addr = "{host}:0"
data_addr = "{host}:0"
http_addr = "{host}:0"
seeds = [{seeds}]
heartbeat_interval_ms = 500
forward_ack_timeout_ms = 1000
shutdown_grace_ms = 2000
region_size_hint = 3
fleet_size_hint = 6
data_dir = "{data}"
journal_fsync_interval_ms = 5
cluster_key = {{ key_hex = "{KEY_HEX}" }}
# Exporters here seal with the cluster key (test setup, not a deployment).
dev_exporters_use_cluster_key = true
sink = {{ kind = "files", dir = "{sink}", roll_interval_ms = 3600000 }}

[engine]
skew_margin_ms = {skew}
pending_deadline_ms = 3000

[admin]
enable_faults = true
token = "{ADMIN_TOKEN}"

[regions]
{others}"#,
            id = spec.node_id,
            region = spec.region,
            prefix = spec.prefix,
            seeds = seeds.join(", "),
            data = self.dir.join("data").display(),
            sink = sink.display(),
            skew = crate::SKEW_MARGIN_MS,
        )
    }

    fn spawn(&self, index: usize, spec: NodeSpec, seeds: &[SocketAddr]) -> anyhow::Result<Node> {
        let sink = self.dir.join(format!("sink-{}", spec.node_id));
        let config = self.dir.join(format!("{}.toml", spec.node_id));
        std::fs::write(
            &config,
            self.config_text(self.host(index), &spec, seeds, &sink),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", spec.node_id)))?;
        // `ip netns exec` execs the binary in the namespace: the child's pid is the
        // collector's, so kill -9 and SIGSTOP reach it.
        let mut command = match &self.network {
            Network::Namespaces(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &netns.name(index)]).arg(&self.bin);
                c
            }
            Network::Loopback(_) => Command::new(&self.bin),
        };
        let mut child = command
            .args(["collector", "--config"])
            .arg(&config)
            .env("TENURE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let listening = Listening::wait(&mut child, LISTEN_TIMEOUT)
            .with_context(|| format!("starting {}", spec.node_id))?;
        Ok(Node {
            gossip: listening.gossip,
            data: listening.data,
            http: listening.http,
            spec,
            config,
            sink,
            child: Some(child),
        })
    }

    /// `kill -9`: no shutdown, no flush; only what reached the kernel survives.
    pub fn kill9(&mut self, node: usize) -> anyhow::Result<()> {
        let len = self.nodes.len();
        let n = &mut self.nodes[node % len];
        if let Some(mut child) = n.child.take() {
            child.kill().context("kill -9")?;
            child.wait()?;
        }
        Ok(())
    }

    /// Restarts a killed node on the same data directory, seeded by the others.
    pub async fn restart(&mut self, node: usize) -> anyhow::Result<()> {
        let i = node % self.nodes.len();
        let seeds: Vec<SocketAddr> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.child.is_some())
            .map(|(_, n)| n.gossip)
            .collect();
        let spec = self.nodes[i].spec.clone();
        let fresh = self.spawn(i, spec, &seeds)?;
        let _ = &fresh.config;
        self.nodes[i] = fresh;
        Ok(())
    }

    /// Sets a node's clock offset through its admin endpoint (0 heals).
    pub async fn set_clock_offset(&self, node: usize, offset_ms: i64) -> anyhow::Result<()> {
        let n = &self.nodes[node % self.nodes.len()];
        let body = format!("{{\"offset_ms\": {offset_ms}}}");
        let (status, text) = tenure_node::httpc::request(
            n.http,
            "POST",
            "/admin/clock",
            Some(&body),
            Some(ADMIN_TOKEN),
            HTTP_TIMEOUT,
        )
        .await
        .with_context(|| format!("{}: POST /admin/clock", n.spec.node_id))?;
        anyhow::ensure!(
            status == 200,
            "{}: POST /admin/clock answered {status}: {text}",
            n.spec.node_id
        );
        Ok(())
    }

    /// Sends `kill -<sig>` (STOP, CONT) to a node.
    pub fn signal(&self, node: usize, sig: &str) -> anyhow::Result<()> {
        let n = &self.nodes[node % self.nodes.len()];
        let Some(child) = &n.child else {
            bail!("{} is not running", n.spec.node_id);
        };
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} failed");
        Ok(())
    }

    /// Every running node sees every other in the WAN pool, its region's ring is whole
    /// and its handoff is done.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let per_region = self.nodes.len() / self.regions.max(1);
        loop {
            let mut ready = 0;
            for n in &self.nodes {
                let Ok((_, body)) = tenure_node::httpc::request(
                    n.http,
                    "GET",
                    "/v1/cluster",
                    None,
                    None,
                    HTTP_TIMEOUT,
                )
                .await
                else {
                    continue;
                };
                let Ok(cluster) = serde_json::from_str::<serde_json::Value>(&body) else {
                    continue;
                };
                let wan = cluster["wan_members"].as_array().map_or(0, Vec::len);
                let ring = cluster["ring"]["members"].as_array().map_or(0, Vec::len);
                if wan + 1 == self.nodes.len() && ring == per_region && cluster["ready"] == true {
                    ready += 1;
                }
            }
            if ready == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster did not converge within {timeout:?} ({ready} of {} ready)",
                    self.nodes.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every line of every sink file, by flow id.
    pub fn read_sinks(&self) -> BTreeMap<u128, Vec<Emitted>> {
        let mut out: BTreeMap<u128, Vec<Emitted>> = BTreeMap::new();
        for (index, n) in self.nodes.iter().enumerate() {
            let Ok(entries) = std::fs::read_dir(&n.sink) else {
                continue;
            };
            for entry in entries.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in text.lines() {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                        continue;
                    };
                    let Some(id) = v["flow_id"]
                        .as_str()
                        .and_then(|s| u128::from_str_radix(s, 16).ok())
                    else {
                        continue;
                    };
                    out.entry(id).or_default().push(Emitted {
                        node: index,
                        attributed_to: v["remote"]["workload"].as_str().map(str::to_owned),
                        source: v["source"].as_str().map(str::to_owned),
                        unattributed: v["result"] == "unattributed",
                    });
                }
            }
        }
        out
    }

    /// Kills every process.
    pub fn stop_all(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
