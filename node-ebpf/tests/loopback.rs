//! Closed loopback flows are reported once per side with exact ports, direction, byte
//! counts and the workload from the maps. Needs root; without it each test prints
//! `SKIPPED (needs root)` and passes.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};

use common::{collect_until, exchange, is_end_of, privileged};
use tenure_node_ebpf::{Capture, CaptureOptions, CapturedFlow, Direction};

const UP: usize = 1000;
const DOWN: usize = 3000;

async fn closed_flow_is_reported_per_side(loopback: IpAddr, test: &str) {
    if !privileged(test) {
        return;
    }
    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    let listener = TcpListener::bind((loopback, 0)).expect("bind");
    let server = listener.local_addr().expect("addr");
    capture
        .set_workloads(&[(loopback, 11)])
        .expect("set workloads");
    // The server's port is owned by another workload: the endpoint map wins.
    capture
        .set_port_workloads(&[(server, 22)])
        .expect("set port workloads");

    let ex = exchange(&listener, UP, DOWN).expect("exchange");
    let flows = collect_until(&mut capture, |f| is_end_of(f, &ex), |seen| seen.len() >= 2).await;

    let client: Vec<&CapturedFlow> = flows.iter().filter(|f| f.local == ex.client).collect();
    let server: Vec<&CapturedFlow> = flows.iter().filter(|f| f.local == ex.server).collect();
    assert_eq!(client.len(), 1, "client side reported once: {flows:#?}");
    assert_eq!(server.len(), 1, "server side reported once: {flows:#?}");
    let (client, server) = (client[0], server[0]);

    assert_eq!(client.remote, ex.server);
    assert_eq!(client.direction, Direction::Outbound);
    // Payload only: the SYN and FIN the kernel counts are taken off (tests/payload.rs).
    assert_eq!(client.bytes_sent, UP as u64, "{client:#?}");
    assert_eq!(client.bytes_received, DOWN as u64, "{client:#?}");
    assert_eq!(client.workload_id, 11);

    assert_eq!(server.remote, ex.client);
    assert_eq!(server.direction, Direction::Inbound);
    assert_eq!(server.bytes_sent, DOWN as u64, "{server:#?}");
    assert_eq!(server.bytes_received, UP as u64, "{server:#?}");
    assert_eq!(server.workload_id, 22);

    for flow in [client, server] {
        assert!(!flow.ongoing);
        assert!(flow.start_exact);
        assert!(flow.start_unix_ms <= flow.end_unix_ms);
        assert!(flow.segs_in > 0 && flow.segs_out > 0, "{flow:#?}");
        assert_eq!(flow.local.ip(), loopback, "v4 stays v4, v6 stays v6");
    }
    let stats = capture.stats().expect("stats");
    assert_eq!(stats.malformed_records, 0);
}

#[tokio::test]
async fn ipv4_loopback_flow_is_reported_once_per_side() {
    closed_flow_is_reported_per_side(IpAddr::V4(Ipv4Addr::LOCALHOST), "ipv4 loopback").await;
}

#[tokio::test]
async fn ipv6_loopback_flow_is_reported_once_per_side() {
    closed_flow_is_reported_per_side(IpAddr::V6(Ipv6Addr::LOCALHOST), "ipv6 loopback").await;
}

/// Emptying a workload map lowers the flag that lets a close skip its lookup, and filling
/// it again raises the flag: the reported ids follow every change.
#[tokio::test]
async fn workload_maps_can_be_emptied_and_refilled() {
    if !privileged("workload maps emptied and refilled") {
        return;
    }
    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listener = TcpListener::bind((loopback, 0)).expect("bind");
    let server = listener.local_addr().expect("addr");
    // (by IP, by endpoint, the server side's expected id)
    let steps = [
        (vec![(loopback, 11)], vec![(server, 22)], 22),
        (vec![(loopback, 11)], vec![], 11),
        (vec![], vec![], 0),
        (vec![], vec![(server, 33)], 33),
    ];
    for (by_ip, by_endpoint, want) in steps {
        capture.set_workloads(&by_ip).expect("set workloads");
        capture
            .set_port_workloads(&by_endpoint)
            .expect("set port workloads");
        let ex = exchange(&listener, 10, 10).expect("exchange");
        let flows = collect_until(
            &mut capture,
            |f| f.local == ex.server && f.remote == ex.client,
            |seen| !seen.is_empty(),
        )
        .await;
        let got = flows.first().map(|f| f.workload_id);
        assert_eq!(
            got,
            Some(want),
            "by ip {by_ip:?}, by endpoint {by_endpoint:?}"
        );
    }
}
