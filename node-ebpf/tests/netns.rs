//! A connection inside a network namespace the test creates is captured (the tracepoint
//! sees every namespace) and attributed through the workload map by its namespace-local
//! address. Needs root and iproute2; without them the test prints `SKIPPED` and passes.

mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;
use std::process::Command;

use common::{collect_until, exchange, is_end_of, privileged, Exchange};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use tenure_node_ebpf::{Capture, CaptureOptions, Direction};

/// An address that exists only inside the test's namespace (on its `lo`).
const NS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 213, 7, 1);

/// A named network namespace, deleted on drop even when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Self, String> {
        let name = format!("tenure-ebpf-test-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            &format!("{NS_ADDR}/32"),
            "dev",
            "lo",
        ])?;
        Ok(netns)
    }

    /// Runs `f` on a thread that has moved into the namespace; sockets it opens live there.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {error}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[tokio::test]
async fn connection_inside_a_network_namespace_is_captured_and_attributed() {
    if !privileged("network namespace flow") {
        return;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        common::skipped("SKIPPED (needs iproute2 `ip`): network namespace flow");
        return;
    }
    let netns = Netns::create().expect("create network namespace");
    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    capture
        .set_workloads(&[(IpAddr::V4(NS_ADDR), 77), (Ipv4Addr::LOCALHOST.into(), 1)])
        .expect("set workloads");

    let ex: Exchange = netns
        .run(|| {
            // NS_ADDR exists only in the namespace: binding proves where we are.
            let listener = TcpListener::bind((NS_ADDR, 0))?;
            exchange(&listener, 300, 400)
        })
        .expect("exchange inside the namespace");

    let flows = collect_until(&mut capture, |f| is_end_of(f, &ex), |seen| seen.len() >= 2).await;
    assert_eq!(flows.len(), 2, "{flows:#?}");
    for flow in &flows {
        assert_eq!(flow.local.ip(), IpAddr::V4(NS_ADDR));
        assert_eq!(flow.workload_id, 77, "{flow:#?}");
        assert!(!flow.ongoing && flow.start_exact);
    }
    let client = flows
        .iter()
        .find(|f| f.local == ex.client)
        .expect("client end");
    let server = flows
        .iter()
        .find(|f| f.local == ex.server)
        .expect("server end");
    assert_eq!(client.direction, Direction::Outbound);
    assert_eq!(server.direction, Direction::Inbound);
    // Payload bytes each way, exactly.
    assert_eq!((client.bytes_sent, client.bytes_received), (300, 400));
    assert_eq!((server.bytes_sent, server.bytes_received), (400, 300));
}
