//! Where the collectors live on the network, and how the supervisor cuts them off.
//!
//! - **Namespaces** (root, with `ip`): every collector runs in a network namespace of its
//!   own, `eth0` there a veth pair whose other end sits on a bridge that this run creates
//!   in the supervisor's namespace. Addresses come from 198.18.0.0/15 (the benchmarking
//!   range), one /24 per run, and exist only inside what this run created. A partition
//!   takes the node's `eth0` down; loss is an nftables rule in the node's namespace that
//!   drops a share of everything crossing `eth0`. Everything is deleted on drop (and so on
//!   a panic); namespaces left by a run that was killed are deleted by the next one.
//! - **Loopback** (no namespaces): every collector on 127.0.0.1. As root with `nft`, a
//!   table of ours drops the node's gossip datagrams and inbound data segments; without
//!   root, network faults are skipped, loudly.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

/// Why a network fault or the namespaces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("nft is not available or not permitted: {0}")]
    Unavailable(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

/// Runs a command, mapping a non-zero exit to [`NetError::Command`].
fn run(program: &str, args: &[&str]) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Command {
            command: command.clone(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Feeds `script` to `nft -f -` (in namespace `netns` when given).
fn nft(netns: Option<&str>, script: &str) -> Result<(), NetError> {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Unavailable(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| NetError::Unavailable(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NetError::Unavailable(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Unavailable(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// One nftables table on loopback, named after our process.
#[derive(Debug)]
pub struct Nft {
    table: String,
}

impl Nft {
    pub fn new(pid: u32) -> Nft {
        Nft {
            table: format!("tenure_chaos_{pid}"),
        }
    }

    /// Drops `percent`% of the gossip datagrams to and from `gossip_port`, and (at 100%)
    /// every inbound data-plane segment to `data_port`: the node hears nobody and nobody
    /// reaches it.
    pub fn cut(&self, (gossip_port, data_port): (u16, u16), percent: u8) -> Result<(), NetError> {
        let verdict = if percent >= 100 {
            "drop".to_owned()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let mut rules =
            format!("  udp dport {gossip_port} {verdict}\n  udp sport {gossip_port} {verdict}\n");
        if percent >= 100 {
            rules.push_str(&format!("  tcp dport {data_port} drop\n"));
        }
        let script = format!(
            "table inet {t} {{\n chain input {{\n  type filter hook input priority -10; policy accept;\n{rules} }}\n}}\n",
            t = self.table
        );
        nft(None, &script)
    }

    /// Removes every rule.
    pub fn heal(&self) -> Result<(), NetError> {
        nft(None, &format!("delete table inet {}\n", self.table))
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

/// The prefix of every namespace this supervisor creates: `tchaos<pid>-<node>`.
const NETNS_PREFIX: &str = "tchaos";
/// The nftables table of a loss fault inside a node's namespace.
const LOSS_TABLE: &str = "tenure_chaos_loss";

/// One network namespace per collector on a bridge of this run. See the module docs.
#[derive(Debug)]
pub struct Netns {
    pid: u32,
    bridge: String,
    /// The run's /24: `198.{18 + (pid / 256) % 2}.{pid % 256}.0`.
    subnet: [u8; 3],
    nodes: usize,
}

impl Netns {
    /// Creates the bridge and `nodes` namespaces, each with `lo` and `eth0` up. On an
    /// error, whatever was created is deleted again.
    pub fn create(nodes: usize) -> Result<Netns, NetError> {
        remove_stale();
        let pid = std::process::id();
        let subnet = [
            198,
            18 + u8::try_from((pid / 256) % 2).unwrap_or(0),
            u8::try_from(pid % 256).unwrap_or(0),
        ];
        let netns = Netns {
            pid,
            bridge: format!("tcb{pid}"),
            subnet,
            nodes: 0,
        };
        let mut netns = netns;
        let gateway = format!("{}/24", netns.gateway());
        run("ip", &["link", "add", &netns.bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &gateway, "dev", &netns.bridge])?;
        run("ip", &["link", "set", &netns.bridge, "up"])?;
        for i in 0..nodes {
            let ns = netns.name(i);
            let veth = format!("tcv{pid}-{i}");
            let addr = format!("{}/24", netns.addr(i));
            run("ip", &["netns", "add", &ns])?;
            netns.nodes = i + 1;
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", &netns.bridge, "up"])?;
            run_in(&ns, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
            run_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
            run_in(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(netns)
    }

    /// The namespace of node `i`.
    pub fn name(&self, i: usize) -> String {
        format!("{NETNS_PREFIX}{}-{i}", self.pid)
    }

    /// The bridge's address, the supervisor's side.
    pub fn gateway(&self) -> IpAddr {
        let [a, b, c] = self.subnet;
        IpAddr::V4(Ipv4Addr::new(a, b, c, 1))
    }

    /// Node `i`'s address on `eth0`.
    pub fn addr(&self, i: usize) -> IpAddr {
        let [a, b, c] = self.subnet;
        IpAddr::V4(Ipv4Addr::new(
            a,
            b,
            c,
            u8::try_from(10 + i).unwrap_or(u8::MAX),
        ))
    }

    /// Cuts node `i` off: `eth0` down at 100%, else `percent`% of what crosses `eth0`
    /// (both ways, gossip and data alike) dropped.
    pub fn cut(&self, i: usize, percent: u8) -> Result<(), NetError> {
        let ns = self.name(i);
        if percent >= 100 {
            return run_in(&ns, &["ip", "link", "set", "eth0", "down"]);
        }
        let script = format!(
            "table inet {LOSS_TABLE} {{\n chain input {{\n  type filter hook input priority -10; policy accept;\n  iifname \"eth0\" numgen random mod 100 < {percent} drop\n }}\n chain output {{\n  type filter hook output priority -10; policy accept;\n  oifname \"eth0\" numgen random mod 100 < {percent} drop\n }}\n}}\n"
        );
        nft(Some(&ns), &script)
    }

    /// Undoes [`Netns::cut`]: `eth0` up, the loss table gone.
    pub fn heal(&self, i: usize) -> Result<(), NetError> {
        let ns = self.name(i);
        let _ = nft(Some(&ns), &format!("delete table inet {LOSS_TABLE}\n"));
        run_in(&ns, &["ip", "link", "set", "eth0", "up"])
    }
}

fn run_in(ns: &str, command: &[&str]) -> Result<(), NetError> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(command);
    run("ip", &args)
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and so the pair.
        for i in 0..self.nodes {
            let _ = run("ip", &["netns", "del", &self.name(i)]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// Deletes namespaces and bridges of earlier runs whose supervisor is gone (killed before
/// its drop could run).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("chaos: deleting namespace {name} left by a run that was killed");
            let _ = run("ip", &["netns", "del", name]);
            let _ = run("ip", &["link", "del", &format!("tcb{pid}")]);
        }
    }
}
