//! The iter/tcp snapshot reports live sockets as ongoing flows, and sockets that existed
//! before capture started are adopted so their close is still reported. Needs root;
//! without it each test prints `SKIPPED (needs root)` and passes.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use common::{collect_until, is_end_of, privileged, Exchange, DEADLINE};
use tenure_node_ebpf::{Capture, CaptureOptions, CapturedFlow, Direction};
use tokio::time::Instant;

/// A connected pair that has exchanged `up` and `down` bytes and stays open.
fn open_pair(
    listener: &TcpListener,
    up: usize,
    down: usize,
) -> std::io::Result<(TcpStream, TcpStream, Exchange)> {
    let server = listener.local_addr()?;
    let mut client = TcpStream::connect(server)?;
    let (mut served, _) = listener.accept()?;
    client.write_all(&vec![1u8; up])?;
    served.read_exact(&mut vec![0u8; up])?;
    served.write_all(&vec![2u8; down])?;
    client.read_exact(&mut vec![0u8; down])?;
    let ex = Exchange {
        client: client.local_addr()?,
        server,
    };
    Ok((client, served, ex))
}

#[tokio::test]
async fn long_lived_flow_is_reported_by_snapshot_before_it_closes() {
    if !privileged("snapshot of a long-lived flow") {
        return;
    }
    const UP: usize = 500;
    const DOWN: usize = 700;
    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    capture
        .set_workloads(&[(Ipv4Addr::LOCALHOST.into(), 33)])
        .expect("set workloads");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let (client, served, ex) = open_pair(&listener, UP, DOWN).expect("open pair");

    // Acknowledgements may trail the reads by a moment: poll until the counters settle.
    // Payload only: the client's acknowledged SYN is not counted.
    let settled = |flows: &[CapturedFlow]| {
        let client = flows.iter().find(|f| f.local == ex.client);
        let server = flows.iter().find(|f| f.local == ex.server);
        matches!((client, server), (Some(c), Some(s))
            if c.bytes_sent == UP as u64 && c.bytes_received == DOWN as u64
                && s.bytes_sent == DOWN as u64 && s.bytes_received == UP as u64)
    };
    let deadline = Instant::now() + DEADLINE;
    let mut flows = Vec::new();
    while Instant::now() < deadline {
        flows = capture.snapshot().expect("snapshot");
        flows.retain(|f| is_end_of(f, &ex));
        if settled(&flows) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        settled(&flows),
        "snapshot never showed both ends settled: {flows:#?}"
    );
    for flow in &flows {
        assert!(flow.ongoing, "{flow:#?}");
        assert!(flow.start_exact, "born after load: {flow:#?}");
        assert_eq!(flow.workload_id, 33);
        assert!(flow.start_unix_ms <= flow.end_unix_ms);
    }
    let direction_of = |local| flows.iter().find(|f| f.local == local).map(|f| f.direction);
    assert_eq!(direction_of(ex.client), Some(Direction::Outbound));
    assert_eq!(direction_of(ex.server), Some(Direction::Inbound));

    // Closing still reports each end once, final and not ongoing.
    drop(client);
    drop(served);
    let closed = collect_until(&mut capture, |f| is_end_of(f, &ex), |seen| seen.len() >= 2).await;
    assert_eq!(closed.len(), 2, "{closed:#?}");
    assert!(closed.iter().all(|f| !f.ongoing && f.start_exact));
}

#[tokio::test]
async fn socket_opened_before_load_is_adopted_and_reported_at_close() {
    if !privileged("adoption of a socket opened before load") {
        return;
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let (client, served, ex) = open_pair(&listener, 10, 20).expect("open pair");

    let mut capture = Capture::load(CaptureOptions::default()).expect("load capture");
    drop(client);
    drop(served);
    let closed = collect_until(&mut capture, |f| is_end_of(f, &ex), |seen| seen.len() >= 2).await;
    assert_eq!(closed.len(), 2, "{closed:#?}");
    for flow in &closed {
        assert!(!flow.start_exact, "capture saw it only at load: {flow:#?}");
        assert!(!flow.ongoing);
        // The whole history is in the counters, even the part before load.
        assert!(flow.bytes_received >= 10, "{flow:#?}");
    }
    // The listener was seen by the adopting snapshot, so directions are known.
    let direction_of = |local| {
        closed
            .iter()
            .find(|f| f.local == local)
            .map(|f| f.direction)
    };
    assert_eq!(direction_of(ex.client), Some(Direction::Outbound));
    assert_eq!(direction_of(ex.server), Some(Direction::Inbound));
}
